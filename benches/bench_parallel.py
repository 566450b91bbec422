"""Thin wrapper: python -m kdfast.benchmarks.parallel (see its --help and BENCHMARKS.md)."""

import os
import sys

try:
    from kdfast.benchmarks import parallel
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    from kdfast.benchmarks import parallel

if __name__ == "__main__":
    sys.exit(parallel.main())
