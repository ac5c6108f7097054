#!/usr/bin/env bash
# The GPU check, in one go (under five minutes on an H100/H200): the CUDA tests on the
# real GPU (simulator off), then the GPU benchmark. Run from the repository root:
#   bash benchmarks/gpu_check.sh [OUTDIR]
# Needs numba-cuda with the CUDA toolkit, torch with CUDA, zarr and tqdm; wheels for
# the missing ones can sit in .whl/ (see the device tool's notes) and are installed
# into a scratch directory, never over the machine's own packages.
set -uo pipefail
OUT=${1:-${OUT:-results/gpu}}
mkdir -p "$OUT"
export NUMBA_ENABLE_CUDASIM=0 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fiited-site .whl/*.whl && \
    export PYTHONPATH=/tmp/fiited-site:${PYTHONPATH:-}
fi
# the package itself, without pip resolving its pins on that machine
mkdir -p /tmp/fiited-src/fiited_store
cp -r fiited_store/* /tmp/fiited-src/fiited_store/
rm -rf /tmp/fiited-src/fiited_store/storage /tmp/fiited-src/fiited_store/adapters
cp -r storage /tmp/fiited-src/fiited_store/storage
cp -r adapters /tmp/fiited-src/fiited_store/adapters
export PYTHONPATH=/tmp/fiited-src:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import numba, numba_cuda, torch; from numba import cuda; print('numba', numba.__version__, 'torch', torch.__version__, cuda.get_current_device().name)" | tee -a "$OUT/gpu.txt"
# the CUDA tests run from a copy that imports the installed package, not the raw folders
rm -rf /tmp/fiited-tests && cp -r tests /tmp/fiited-tests
( cd /tmp && timeout 200 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib fiited-tests/test_cuda.py ) 2>&1 | tee "$OUT/cuda_tests.txt"
timeout 200 python3 benchmarks/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.txt"
