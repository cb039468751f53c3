"""Triton kernels: fused sort + cost + reduction, forward and backward.

Rows of up to ``MAX_FUSED_SIZE`` elements are sorted on chip, one program per row;
longer rows are sorted with ``torch.sort`` and then reduced by a fused chunked kernel.
The kernels specialise on a built-in cost's ``kernel_id`` (``None`` for costs they
do not implement).

Nothing here imports triton at module import time; :func:`unsupported_reason`
says whether a problem can run on the kernels, and :func:`ot_rows_triton` runs it.
Importing the kernels registers the custom op ``torch.ops.otloss.sorted_ot_rows``
(see :mod:`otloss.ops.ot_sort`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from otloss.costs import Cost
from otloss.ops.utils import MAX_FUSED_SIZE

__all__ = [
    "MAX_FUSED_SIZE",
    "interpret_mode",
    "ot_rows_triton",
    "triton_available",
    "unsupported_reason",
]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_TRITON: list[bool] = []  # filled by the first triton_available() call


def triton_available() -> bool:
    """Whether triton imports (checked once)."""
    if not _TRITON:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON.append(False)
        else:
            _TRITON.append(True)
    return _TRITON[0]


def interpret_mode() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, set before kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=512)
def _reason(
    device_type: str, dtype: torch.dtype, n: int, m: int, weighted: bool, soft: bool, kernel_id: int | None, cost: str
) -> str | None:
    """The cached part of :func:`unsupported_reason`: it depends on metadata only."""
    if not triton_available():
        return "triton is not installed: pip install 'torch-otloss[triton]'"
    if not (device_type == "cuda" or (device_type == "cpu" and interpret_mode())):
        return (
            f"the inputs are on {device_type}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before otloss's kernels are imported, to run them on the CPU interpreter)"
        )
    if dtype not in _KERNEL_DTYPES:
        return f"the kernels take float32, float16 and bfloat16 inputs, got {dtype}; use backend='torch'"
    if n != m:
        return f"the kernels need equal sizes (got n={n}, m={m}); use backend='torch'"
    if weighted:
        return "the kernels take uniform weights only; use backend='torch' for weighted problems"
    if soft:
        return "the kernels implement hard sort only; use backend='torch' for soft sort"
    if kernel_id is None:
        return (
            f"the kernels implement the costs logistic, hinge, squared_hinge, least_squares and abs_pow (built-in), "
            f"got {cost}; use backend='torch'"
        )
    return None


def unsupported_reason(u: Tensor, v: Tensor, cost: Cost, weighted: bool, soft: bool) -> str | None:
    """Why the fused kernel cannot take this problem, or ``None`` when it can (cached per metadata).

    Under ``torch.func`` transforms the kernels cannot run (their autograd node saves constants):
    that reason is not cached.
    """
    kernel_id = cost.kernel_id
    reason = (_reason.__wrapped__ if torch.compiler.is_compiling() else _reason)(  # dynamo traces it anyway
        u.device.type,
        u.dtype,
        u.shape[-1],
        v.shape[-1],
        weighted,
        soft,
        kernel_id,
        repr(cost) if kernel_id is None else "",
    )
    if reason is None and not torch.compiler.is_compiling():
        from otloss._reference import functorch_active

        if functorch_active():
            return "torch.func transforms (grad, vmap, jacrev, ...) run on the reference path only; use backend='torch'"
    return reason


def ot_rows_triton(
    u: Tensor,
    v: Tensor,
    cost: Cost,
    *,
    u2: Tensor | None = None,
    v2: Tensor | None = None,
    check_values: Callable[[], None] | None = None,
) -> Tensor:
    """Per-row ``mean_i h(a_(i) - b_(i))`` with ``a = u - u2``, ``b = v - v2`` (``None``: ``a = u``).

    Inputs ``[..., n]``; float32 result ``[...]``. ``check_values`` (the ``validate_args`` scan) runs
    when the kernel's per-row sum of sorted differences is not finite. Under ``torch.compile`` the
    custom op ``torch.ops.otloss.sorted_ot_rows`` is called instead (no graph break when
    ``check_values`` is ``None``; otherwise the inputs are scanned first).
    """
    from otloss.ops.ot_sort import FusedSortedOT, sorted_ot_rows

    p = cost.params
    args = (cost.kernel_id, float(p.get("beta", 0.0)), float(p.get("label_smoothing", 0.0)), float(p.get("p", 1.0)))
    if torch.compiler.is_compiling():
        if check_values is not None:  # validate_args under compile: the full scan (a graph break)
            check_values()
        return sorted_ot_rows(u, u2, v, v2, *args)[0]
    return FusedSortedOT.apply(u, u2, v, v2, *args, check_values)
