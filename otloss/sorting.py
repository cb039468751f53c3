"""Hard and soft sorting along the last dimension.

Hard sort (:func:`hard_sort`) is ``torch.sort``: its gradient routes each output
back to the element it came from, i.e. the permutation is held fixed, which is
the rule the AOT paper prescribes.

Soft sort (:func:`soft_sort`) is the regularised sort of Blondel et al. (2020),
"Fast Differentiable Sorting and Ranking": the projection of ``rho / eps``
(``rho = (n, ..., 1)``) onto the permutahedron of the values, solved exactly by
isotonic regression with pool-adjacent-violators (PAV). The built-in backend is
plain PyTorch plus a PAV pass in Python (no compile step); ``backend="torchsort"``
uses the torchsort package when it is installed. Both compute the same function.

What ``regularization_strength`` (``eps``) means, for ``regularization="l2"``:
the soft sort of a row equals its hard sort exactly whenever every gap between
consecutive sorted values is at most ``1 / eps``. Runs of values whose gaps are
larger are pooled: inside a pooled block the outputs keep the block's mean and are
spaced exactly ``1 / eps`` apart. So ``eps`` is in units of 1 / (your values):
``eps -> 0`` is the hard sort, ``eps -> inf`` maps every value to the row mean.
For log-ratios of order 1 the paper's ``eps = 0.1`` is close to a hard sort;
``eps = 1`` already pools neighbours more than 1 apart.
``regularization="kl"`` is the entropic variant (values pooled through a
log-sum-exp instead of a mean; as ``eps -> inf`` a row tends to the constant
``log(n) - logsumexp(-x)``, a soft minimum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from otloss._validation import check_values_tensor

__all__ = ["SoftSort", "hard_sort", "soft_sort", "torchsort_available"]


def torchsort_available() -> bool:
    """Whether the optional torchsort package imports."""
    try:
        import torchsort  # noqa: F401
    except ImportError:
        return False
    return True


def hard_sort(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sort ascending along the last dimension; returns ``(values, indices)``.

    Differentiable with the permutation held fixed. NaN sorts last.
    """
    check_values_tensor(x, "x")
    return torch.sort(x, dim=-1, stable=True)


def _pav_blocks(target: list[float], lse_y: list[float] | None, lse_w: list[float] | None) -> list[int]:
    """Pool-adjacent-violators for a non-increasing fit; returns block sizes.

    ``l2``: block value = mean of ``target``. ``kl`` (when ``lse_y``/``lse_w`` given):
    block value = logsumexp(y_B) - logsumexp(w_B). Adjacent blocks are merged while
    the left value is ``<=`` the right one (a violation of non-increase).
    """
    sizes: list[int] = []
    num: list[float] = []  # l2: sum of targets; kl: lse of y
    den: list[float] = []  # l2: count; kl: lse of w
    vals: list[float] = []
    n = len(target) if lse_y is None else len(lse_y)
    for i in range(n):
        if lse_y is None:
            s, c = target[i], 1.0
            v = s
        else:
            s, c = lse_y[i], lse_w[i]
            v = s - c
        size = 1
        while vals and vals[-1] <= v:
            ps, pc, psize = num.pop(), den.pop(), sizes.pop()
            vals.pop()
            if lse_y is None:
                s, c = s + ps, c + pc
                v = s / c
            else:
                s, c = _logaddexp(s, ps), _logaddexp(c, pc)
                v = s - c
            size += psize
        sizes.append(size)
        num.append(s)
        den.append(c)
        vals.append(v)
    return sizes


def _logaddexp(a: float, b: float) -> float:
    m = max(a, b)
    if m == -math.inf:
        return m
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def _segment_ids(x_sorted: Tensor, eps: float, regularization: str) -> Tensor:
    """Block index of every sorted position, per row, from a PAV pass on the CPU in float64."""
    n = x_sorted.shape[-1]
    rows = x_sorted.detach().reshape(-1, n).to("cpu", torch.float64)
    rho = torch.arange(n, 0, -1, dtype=torch.float64) / eps
    ids = torch.empty(rows.shape, dtype=torch.int64)
    for r in range(rows.shape[0]):
        if regularization == "l2":
            sizes = _pav_blocks((rho + rows[r]).tolist(), None, None)
        else:
            sizes = _pav_blocks([], rho.tolist(), (-rows[r]).tolist())
        ids[r] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.int64))
    return ids.reshape(x_sorted.shape).to(x_sorted.device)


def _segment_reduce(vals: Tensor, ids: Tensor, op: str) -> Tensor:
    """Per-row segment mean or logsumexp, broadcast back to every position (differentiable)."""
    n = vals.shape[-1]
    flat_vals = vals.reshape(-1, n)
    rows = flat_vals.shape[0]
    offsets = torch.arange(rows, device=vals.device).unsqueeze(-1) * n
    flat_ids = (ids.reshape(-1, n) + offsets).reshape(-1)
    v = flat_vals.reshape(-1)
    size = rows * n
    if op == "mean":
        sums = torch.zeros(size, dtype=vals.dtype, device=vals.device).index_add(0, flat_ids, v)
        counts = torch.zeros(size, dtype=vals.dtype, device=vals.device).index_add(0, flat_ids, torch.ones_like(v))
        out = (sums / counts.clamp_min(1))[flat_ids]
    else:  # logsumexp
        mx = torch.full((size,), -math.inf, dtype=vals.dtype, device=vals.device)
        mx = mx.scatter_reduce(0, flat_ids, v.detach(), reduce="amax")
        shifted = torch.exp(v - mx[flat_ids])
        sums = torch.zeros(size, dtype=vals.dtype, device=vals.device).index_add(0, flat_ids, shifted)
        out = torch.log(sums[flat_ids]) + mx[flat_ids]
    return out.reshape(vals.shape)


def _soft_sort_builtin(x: Tensor, eps: float, regularization: str) -> Tensor:
    n = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs, _ = torch.sort(x.to(dtype), dim=-1)
    ids = _segment_ids(xs, eps, regularization)
    rho = torch.arange(n, 0, -1, dtype=dtype, device=x.device) / eps
    rho = rho.expand_as(xs)
    if regularization == "l2":
        # out_i = mean_B(x) + (mean_B(rho) - rho_i), with rho already divided by eps
        out = _segment_reduce(xs, ids, "mean") + _segment_reduce(rho, ids, "mean") - rho
    else:
        # out_i = -(rho_i - lse_B(rho) + lse_B(-x))
        out = _segment_reduce(rho, ids, "lse") - rho - _segment_reduce(-xs, ids, "lse")
    return out.to(x.dtype)


def _soft_sort_torchsort(x: Tensor, eps: float, regularization: str) -> Tensor:
    import torchsort

    n = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.to(dtype).reshape(-1, n)
    out = torchsort.soft_sort(flat, regularization=regularization, regularization_strength=eps)
    return out.reshape(x.shape).to(x.dtype)


def soft_sort(
    x: Tensor,
    regularization_strength: float = 0.1,
    regularization: Literal["l2", "kl"] = "l2",
    backend: Literal["otloss", "torchsort"] = "otloss",
) -> Tensor:
    """Differentiable soft sort (ascending) along the last dimension.

    Args:
        x: values ``[..., n]``, floating point. bfloat16/float16 are computed in
            float32 and returned in the input dtype.
        regularization_strength: ``eps > 0``; see the module docstring for what it
            means for your values. ``0.1`` is the value of the AOT paper's code.
        regularization: ``"l2"`` (quadratic) or ``"kl"`` (entropic).
        backend: ``"otloss"`` (built in, no compile step) or ``"torchsort"``
            (requires the optional package: ``pip install otloss[soft]``).

    Returns:
        A tensor of the shape and dtype of ``x``, non-decreasing along the last
        dimension, differentiable in ``x``.
    """
    check_values_tensor(x, "x")
    return SoftSort(regularization_strength, regularization, backend)(x)


@dataclass(frozen=True)
class SoftSort:
    """A soft-sort configuration that can be passed as ``sort=`` to the otloss losses.

    ``sort="soft"`` means ``SoftSort()``: l2 regularisation with strength 0.1, the
    AOT paper's setting. See :func:`soft_sort` for the arguments.
    """

    regularization_strength: float = 0.1
    regularization: Literal["l2", "kl"] = "l2"
    backend: Literal["otloss", "torchsort"] = "otloss"

    def __post_init__(self) -> None:
        eps = self.regularization_strength
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"regularization_strength must be a positive number, got {type(eps).__name__}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"regularization_strength must be finite and > 0, got {eps}")
        if self.regularization not in ("l2", "kl"):
            raise ValueError(f"regularization must be 'l2' or 'kl', got {self.regularization!r}")
        if self.backend not in ("otloss", "torchsort"):
            raise ValueError(f"backend must be 'otloss' or 'torchsort', got {self.backend!r}")
        if self.backend == "torchsort" and not torchsort_available():
            raise ImportError(
                "SoftSort(backend='torchsort') needs the torchsort package: pip install 'otloss[soft]' "
                "(or use backend='otloss', which needs no compile step)"
            )

    def __call__(self, x: Tensor) -> Tensor:
        eps = float(self.regularization_strength)
        if self.backend == "torchsort":
            return _soft_sort_torchsort(x, eps, self.regularization)
        return _soft_sort_builtin(x, eps, self.regularization)
