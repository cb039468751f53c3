"""Shared test configuration: hypothesis profiles, tolerances and skip markers.

Profiles: ``ci`` (default, a few hundred examples per property), ``dev`` (quick),
``long`` (many more): ``pytest --hypothesis-profile long``.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU interpreter; must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)


def _speed_up_interpreted_sort() -> None:
    """Test-only: route the interpreter's xor reduction (inside ``tl.sort``) to numpy.

    Triton's CPU interpreter runs that reduction as a Python loop over elements; the
    numpy reduction computes the same integers much faster. The library never does this.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    ops = interpreter.ReduceOps
    original = ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn is tl.standard._xor_combine and self.axis is not None:
            data = input[0].handle.data
            return self.to_tensor(np.bitwise_xor.reduce(data, axis=self.axis, keepdims=self.keep_dims), input[0].dtype)
        return original(self, input)

    ops.apply_impl = apply_impl


_speed_up_interpreted_sort()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# The skip markers, defined once: marker -> (available here?, how to get it). Registered in pyproject.toml
# (--strict-markers); a GPU run is a marker expression over this same suite (`-m requires_cuda`).
_REQUIREMENTS = {
    "requires_cuda": (torch.cuda.is_available, "needs a CUDA device"),
    "requires_triton": (lambda: _has("triton"), "needs triton (pip install 'torch-otloss[triton]')"),
    "requires_torchsort": (lambda: _has("torchsort"), "needs torchsort (pip install 'torch-otloss[soft]')"),
    "requires_pot": (lambda: _has("ot"), "needs POT (pip install 'torch-otloss[pot]')"),
    "requires_trl": (lambda: _has("trl") and _has("peft"), "needs trl (pip install 'torch-otloss[trl]')"),
    "requires_lightning": (lambda: _has("lightning"), "needs lightning (pip install 'torch-otloss[lightning]')"),
}


def pytest_collection_modifyitems(config, items):
    available = {}
    for item in items:
        for name, (check, reason) in _REQUIREMENTS.items():
            if item.get_closest_marker(name) is None:
                continue
            if name not in available:
                available[name] = bool(check())
            if not available[name]:
                item.add_marker(pytest.mark.skip(reason=reason))
