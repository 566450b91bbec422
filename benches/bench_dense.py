"""kdfast dense losses vs PyTorch eager and torch.compile (forward+backward, time and memory).

    python benches/bench_dense.py                 # the full run recorded in BENCHMARKS.md
    python benches/bench_dense.py --quick         # smoke test
    python benches/bench_dense.py --help

A thin wrapper: the benchmark lives in kdfast.benchmarks.dense (also `kdfast bench`).
"""

import os
import sys

try:
    from kdfast.benchmarks import dense
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    from kdfast.benchmarks import dense

if __name__ == "__main__":
    sys.exit(dense.main())
