"""Compile every CUDA kernel for a real GPU, without one.

The CUDA tests run under numba's simulator, which executes Python and so never
compiles anything. This records the argument types of every kernel launch the
CUDA tests make (simulator on), then compiles each kernel with those types to PTX
for a Hopper GPU (sm_90) with NVVM, which needs the CUDA toolkit wheels
(``pip install "numba-cuda[cu12]"``) but no GPU:

    python benchmarks/check_cuda_compiles.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

RECORD = r"""
import json, os, sys
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
import numba, pytest
from numba.cuda.simulator import kernel as simkernel
from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
seen = {}
launch = simkernel.FakeCUDAKernel.__call__
def call(self, *args):
    sig = tuple(str(numba.typeof(a._ary if isinstance(a, FakeCUDAArray) else a)) for a in args)
    seen.setdefault(self.fn.__name__, set()).add(sig)
    return launch(self, *args)
simkernel.FakeCUDAKernel.__call__ = call
rc = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "tests/kernels/test_cuda.py"])
json.dump({k: sorted(v) for k, v in seen.items() if k.endswith("_kernel")}, open(sys.argv[1], "w"))
sys.exit(rc)
"""


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(tempfile.mkdtemp(), "signatures.json")
    rc = subprocess.call([sys.executable, "-c", RECORD, out], cwd=root)
    if rc != 0:
        print("the CUDA tests failed under the simulator; nothing compiled")
        return rc
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    from numba import cuda, types

    from fiited_store.kernels import cuda as kernels

    def parse(s: str):
        m = re.match(r"array\((\w+), (\d)d, (\w)\)", s)
        if m:
            return types.Array(getattr(types, m.group(1)), int(m.group(2)), m.group(3))
        return types.boolean if s == "bool" else getattr(types, s)

    failed = 0
    signatures = json.load(open(out))
    for name, variants in sorted(signatures.items()):
        for v in variants:
            try:
                cuda.compile_ptx(getattr(kernels, name).py_func, tuple(parse(a) for a in v), cc=(9, 0))
            except Exception as exc:  # report every failure, not just the first
                failed += 1
                print(f"FAIL {name}{tuple(v)}: {str(exc).splitlines()[0]}")
    total = sum(len(v) for v in signatures.values())
    print(f"{total - failed} of {total} kernel signatures compile to PTX for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
