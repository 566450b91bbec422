#!/usr/bin/env bash
# Build what benches/gpu_check.sh installs on a GPU machine that has no network:
#   dist/kdfast-*-cp39-abi3-*.whl   (this checkout, release build; abi3: any CPython >= 3.9)
#   dist/liger_kernel-*.whl          (the anchor the GPU benchmark compares against)
# Then carry dist/ to the GPU machine and run `bash benches/gpu_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f dist/kdfast-*.whl
python3 -m pip install -q "maturin>=1.5,<2"
python3 -m maturin build --release -o dist
python3 -m pip download -q --no-deps --only-binary=:all: -d dist "liger-kernel==0.8.5"
ls -l dist
