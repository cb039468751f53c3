"""Triton kernels: fused sort + cost + reduction, forward and backward.

Rows of up to ``MAX_FUSED_SIZE`` elements are sorted on chip, one program per row;
longer rows are sorted with ``torch.sort`` and then reduced by a fused chunked kernel.

Nothing here imports triton at module import time; :func:`unsupported_reason`
says whether a problem can run on the kernels, and :func:`ot_rows_triton` runs it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from otloss.costs import Cost
from otloss.ops.utils import MAX_FUSED_SIZE

__all__ = [
    "KERNEL_COSTS",
    "MAX_FUSED_SIZE",
    "interpret_mode",
    "ot_rows_triton",
    "triton_available",
    "unsupported_reason",
]

#: cost families the kernels specialise on (``Cost.name`` -> ``tl.constexpr`` id)
KERNEL_COSTS = {"logistic": 0, "hinge": 1, "squared_hinge": 2, "least_squares": 3, "abs_pow": 4}


def triton_available() -> bool:
    """Whether triton imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_mode() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, set before kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(u: Tensor, v: Tensor, cost: Cost, weighted: bool, soft: bool) -> str | None:
    """Why the fused kernel cannot take this problem, or ``None`` when it can."""
    if not triton_available():
        return "triton is not installed: pip install 'otloss[triton]'"
    if not (u.is_cuda or (interpret_mode() and u.device.type == "cpu")):
        return (
            f"the inputs are on {u.device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before otloss's kernels are imported, to run them on the CPU interpreter)"
        )
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernels take float32, float16 and bfloat16 inputs, got {u.dtype}; use backend='torch'"
    if u.shape[-1] != v.shape[-1]:
        return f"the kernels need equal sizes (got n={u.shape[-1]}, m={v.shape[-1]}); use backend='torch'"
    if weighted:
        return "the kernels take uniform weights only; use backend='torch' for weighted problems"
    if soft:
        return "the kernels implement hard sort only; use backend='torch' for soft sort"
    if cost.name not in KERNEL_COSTS:
        return f"the kernels implement the costs {sorted(KERNEL_COSTS)}, got {cost!r}; use backend='torch'"
    return None


def ot_rows_triton(u: Tensor, v: Tensor, cost: Cost) -> Tensor:
    """Per-row ``mean_i h(u_(i) - v_(i))`` for ``u, v`` of shape ``[..., n]``; float32 result ``[...]``."""
    from otloss.ops.ot_sort import FusedSortedOT

    p = cost.params
    return FusedSortedOT.apply(
        u,
        v,
        KERNEL_COSTS[cost.name],
        float(p.get("beta", 0.0)),
        float(p.get("label_smoothing", 0.0)),
        float(p.get("p", 1.0)),
    )
