import os

# The CUDA backend's tests run under numba's simulator unless a real GPU run asks
# otherwise (benchmarks/gpu_check.sh sets NUMBA_ENABLE_CUDASIM=0). numba reads this
# when it is first imported, so it is set before anything imports numba.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Compilation happens on first use of each kernel and is cached on disk; a test
# must never be failed by its first call taking seconds.
settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
