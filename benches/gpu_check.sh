#!/usr/bin/env bash
# The GPU check of kdfast, for one CUDA machine with PyTorch and Triton installed and no network
# (under 8 minutes on an H100: at most 200 s of tests and 2 × 170 s of benchmark):
#   1. installs the wheels in dist/ (made here by benches/prepare_gpu_check.sh) into a private
#      target directory, without dependencies;
#   2. runs the CUDA test suite of the Triton kernels, the fused linear loss and torch.compile;
#   3. runs the GPU benchmark (python -m kdfast.benchmarks.gpu) against eager, torch.compile
#      and Liger-Kernel.
# Results go to $OUT (when set, e.g. by a device runner) or bench-results/gpu/: env.txt,
#   tests.log, bench-{dense,fused}.md (the tables for BENCHMARKS.md), .json and .log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-results/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"

shopt -s nullglob
wheels=(dist/kdfast-*.whl dist/liger_kernel-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "gpu_check: no wheels in dist/; run benches/prepare_gpu_check.sh first" >&2
  exit 2
fi
site=/tmp/kdfast-site
rm -rf "$site"
"$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" || exit 2
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$py" -c "import sys, torch, triton, kdfast; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'kdfast', kdfast.__version__, kdfast.__file__)"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

status=0
# The CUDA tests: the Triton kernels, fused linear and torch.compile (about 2 minutes).
timeout 200 "$py" -m pytest -q -x -p no:cacheprovider \
  tests/test_triton_dense.py tests/test_triton_sparse.py tests/test_triton_compress.py \
  tests/test_fused_linear.py tests/test_compile.py 2>&1 | tee "$out/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# The benchmark: dense jsd/forward_kl at 8192x128256, then fused linear JSD at H=4096,
# V=128256, BT 1024/4096/8192 (bf16), each against eager, torch.compile and Liger-Kernel.
for part in dense fused; do
  PYTHONUNBUFFERED=1 timeout 170 "$py" -m kdfast.benchmarks.gpu --parts $part --repeats 3 --warmup 1 \
    --json "$out/bench-$part.json" >"$out/bench-$part.md" 2>"$out/bench-$part.log" || status=1
  cat "$out/bench-$part.md"; tail -3 "$out/bench-$part.log"
done
echo "gpu_check: status $status; results in $out"
exit $status
