#!/usr/bin/env bash
# The GPU check, in one go (under ten minutes on an H100/H200): the CUDA tests on the
# real GPU (simulator off), then the GPU benchmark. Run from the repository root:
#   bash benchmarks/gpu_check.sh [OUTDIR]
# Needs numba-cuda with the CUDA toolkit, torch with CUDA, zarr and tqdm. Wheels for
# the missing ones can sit in .whl/ (zarr, numcodecs, donfig, google-crc32c for a
# machine with none; see docs/benchmarks.md) and are installed into a scratch directory, never
# over the machine's own packages.
#
# To check the script itself without a GPU (slow: numba's simulator runs the kernels):
#   FIITED_SIM=1 PYTEST_ARGS="-k device" BENCH_ARGS="--dry-run --scale 0.00003 \
#     --batch-size 8 --sections lookup --repeats 2" bash benchmarks/gpu_check.sh /tmp/gpu
set -uo pipefail
OUT=${1:-${OUT:-results/gpu}}
mkdir -p "$OUT"
export NUMBA_ENABLE_CUDASIM=${FIITED_SIM:-0} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fiited-site .whl/*.whl && \
    export PYTHONPATH=/tmp/fiited-site:${PYTHONPATH:-}
fi
# the package itself, laid out as installed, without pip resolving its pins there
rm -rf /tmp/fiited-src && mkdir -p /tmp/fiited-src/fiited_store
cp -r fiited_store/* /tmp/fiited-src/fiited_store/
rm -rf /tmp/fiited-src/fiited_store/storage /tmp/fiited-src/fiited_store/adapters
cp -r storage /tmp/fiited-src/fiited_store/storage
cp -r adapters /tmp/fiited-src/fiited_store/adapters
find /tmp/fiited-src -name '*.nb[ic]' -delete
export PYTHONPATH=/tmp/fiited-src:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
python3 -c "import numba, numba_cuda, torch, zarr; print('numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'torch', torch.__version__, 'zarr', zarr.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
# the CUDA tests run from a copy that imports the package above, not the raw folders
# (tests import each other as tests.*: the copy sits in a folder of its own, the current one)
rm -rf /tmp/fiited-run && mkdir -p /tmp/fiited-run && cp -r tests /tmp/fiited-run/tests
( cd /tmp/fiited-run && timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider --import-mode=importlib \
    -W ignore::DeprecationWarning ${PYTEST_ARGS:-} tests/kernels/test_cuda.py ) 2>&1 | tee "$OUT/cuda_tests.txt"
echo "cuda tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/cuda_tests.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" ${BENCH_ARGS:-} 2>&1 \
  | grep -v -i "warning" | tee "$OUT/gpu_bench.txt"
