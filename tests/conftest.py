"""Shared test configuration: hypothesis profiles, tolerances and skip markers.

Profiles: ``ci`` (default, a few hundred examples per property), ``dev`` (quick),
``long`` (many more): ``pytest --hypothesis-profile long``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)

# One tolerance table: (rtol, atol) for values computed in each dtype against a float64 oracle.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_torchsort = pytest.mark.skipif(not _has("torchsort"), reason="needs torchsort (pip install otloss[soft])")
requires_pot = pytest.mark.skipif(not _has("ot"), reason="needs POT (pip install otloss[pot])")
