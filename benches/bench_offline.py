"""kdfast offline distillation vs PyTorch: compression (compress_topk / compress_sample),
sparse_kl forward+backward, and the storage/fidelity of sparse targets on a real teacher.

    python benches/bench_offline.py                 # the full run recorded in BENCHMARKS.md
    python benches/bench_offline.py --quick         # smoke test
    python benches/bench_offline.py --help

A thin wrapper: the benchmark lives in kdfast.benchmarks.offline
(also `python -m kdfast.benchmarks.offline`).
"""

import os
import sys

try:
    from kdfast.benchmarks import offline
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    from kdfast.benchmarks import offline

if __name__ == "__main__":
    sys.exit(offline.main())
