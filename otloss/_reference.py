"""The PyTorch reference path for equal-size, uniform-weight, hard-sort rows.

Two pieces, both used by :func:`otloss.ot_h_1d` on every device:

* :func:`sort_with_index`: a stable ascending sort along the last dimension that
  returns values and the permutation. Ties (``-0.0`` and ``+0.0`` included) keep
  their index order, the same convention as the Triton kernels. For CPU float32
  tensors of at least ``NUMPY_SORT_MIN`` elements it sorts packed integer keys
  with NumPy (an order-preserving ``int32`` image of each value in the high half,
  the index in the low half, so a plain sort of the keys is a stable argsort),
  which is several times faster than a stable ``torch.sort`` there.
* :class:`SortedOT`: ``mean_i h(a_(i) - b_(i))`` per row as one autograd node,
  with ``a = u`` or ``a = u - u2`` (paired AOT's margins, computed inside the node so
  that the two subtractions add no autograd nodes), and ``b`` likewise.
  The forward evaluates ``h`` and ``h'`` of the sorted differences and scatters
  ``h'/n`` back to each element's original position; the backward multiplies
  these saved gradients by the upstream gradient, without the sort-backward
  graph. The gradient is the one autograd gives with the permutation held fixed;
  double backward (``create_graph=True``) recomputes that graph from the saved
  inputs and permutations, so the inputs must not be modified in place before
  the backward pass. Under ``torch.func`` transforms :func:`otloss.ot_h_1d`
  builds the plain graph instead (an autograd node without ``setup_context`` is
  not transformable, and the NumPy sort cannot see functorch's wrapped tensors).
  Under ``torch.compile`` the node is traced as it is, with ``torch.sort`` in
  place of the NumPy sort.

NaN sorts after ``+inf`` (every NaN, in index order), as ``torch.sort`` and the
kernels order it, so a row holding NaN gives NaN on every path. Inside
:class:`SortedOT` a side whose gradient is not needed (paired AOT's reference
margins) is sorted for its values only, with ``torch.sort``'s faster unstable order:
tied values are equal, so neither the loss nor any gradient can tell.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from otloss.costs import AbsPow, Cost, LeastSquares, Logistic

#: CPU float32 inputs with at least this many elements are sorted with NumPy keys
NUMPY_SORT_MIN = 2048


def float32_order_keys(bits: np.ndarray) -> np.ndarray:
    """Map float32 bit patterns (as ``int32``) to ``int32`` keys with the same order.

    Non-negative floats keep their bits; negative ones flip the magnitude bits and
    move up by one, so ``-0.0`` and ``+0.0`` both map to ``0`` (a tie, as ``==`` says).
    Every NaN (either sign, any payload) maps to the largest key, after ``+inf``.
    """
    keys = np.where(bits < 0, (bits ^ np.int32(0x7FFFFFFF)) + np.int32(1), bits)
    keys[(bits & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000)] = np.int32(0x7FFFFFFF)
    return keys


def _numpy_sort_index(x: Tensor) -> Tensor:
    """Stable argsort of a CPU float32 tensor along its last dimension, through packed int64 keys."""
    n = x.shape[-1]
    a = x.detach().contiguous().numpy()
    keys = float32_order_keys(a.view(np.int32)).astype(np.int64)
    keys <<= 32
    keys |= np.arange(n, dtype=np.int64)
    keys.sort(axis=-1)
    keys &= 0xFFFFFFFF
    return torch.from_numpy(keys)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jacrev, vmap, ...) is running this call."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def sort_with_index(x: Tensor, stable: bool = True) -> tuple[Tensor, Tensor]:
    """Stable ascending sort along the last dimension; ``(values, indices)``, values differentiable.

    ``stable=False`` lets ``torch.sort`` order tied values as it likes (a few microseconds less from
    a few hundred elements); the values are the same, only the indices of ties may differ.
    """
    if (
        x.numel() >= NUMPY_SORT_MIN
        and x.shape[-1] > 1
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not functorch_active()
    ):
        idx = _numpy_sort_index(x)
        return x.gather(-1, idx), idx
    return torch.sort(x, dim=-1, stable=stable)


_SCALARS: dict[tuple, Tensor | tuple[Tensor, ...]] = {}
_SCALARS_MAX = 4096


def _plain(like: Tensor) -> bool:
    """Whether ``like`` is a plain tensor in eager mode (not a fake, functional or other subclass, not traced)."""
    return not torch.compiler.is_compiling() and type(like) is Tensor and not like.is_inference()


def scalar(value: float, like: Tensor) -> Tensor | float:
    """``value`` as a cached 0-dim CPU tensor in ``like``'s dtype, an operand on any device.

    A Python number operand is wrapped in a new tensor on every call (about 1 us of the hot path's
    few tens on the CPU); the cached tensor skips that and gives the same result: a Python float
    operand is rounded to the tensor's dtype as well. For anything but a plain eager tensor (fake
    tensors, tracing, inference tensors) the Python number itself is returned, so that no cached
    tensor ever meets, or is made under, another tensor mode.
    """
    if not _plain(like):
        return value
    key = (value, like.dtype)
    t = _SCALARS.get(key)
    if t is None:
        t = torch.tensor(value, dtype=like.dtype)
        if len(_SCALARS) < _SCALARS_MAX:
            _SCALARS[key] = t
    return t


def _hot_scalars(key: tuple, values: tuple[float, ...], like: Tensor) -> tuple[Tensor | float, ...]:
    """The hot path's constants for ``key`` (cost parameters, ``n``, dtype), cached as in :func:`scalar`."""
    if not _plain(like):
        return values
    hit = _SCALARS.get(key)
    if hit is None:
        hit = tuple(scalar(x, like) for x in values)
        if len(_SCALARS) < _SCALARS_MAX:
            _SCALARS[key] = hit
    return hit


def mean_and_scaled_grad(cost: Cost, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean_i h(z_i), h'(z) / n)`` for ``z [..., n]``: each row's cost and the gradient it scatters.

    The two hot costs share work. The logistic cost without label smoothing (paired AOT's default)
    takes one ``logsigmoid`` for both: ``h = -logsigmoid(beta z)`` (bitwise what ``cost.h`` computes;
    the mean is the sum divided by ``n``, as ``Tensor.mean`` computes it) and
    ``h'(z) = -beta sigmoid(-beta z) = beta expm1(logsigmoid(beta z))``. ``abs_pow(2)`` (W2) takes one
    dot product per row. Every other cost calls :meth:`Cost.value_and_grad`.
    """
    n = z.shape[-1]
    kind = type(cost)
    if kind is Logistic and not cost.ls:
        beta = cost.beta
        b, neg_n, b_n = _hot_scalars((0, beta, n, z.dtype), (beta, -n, beta / n), z)
        log_sig = F.logsigmoid(z * b)
        return torch.div(log_sig.sum(-1), neg_n), torch.expm1(log_sig).mul_(b_n)
    if kind is AbsPow and cost.p == 2.0:
        n_, two_n = _hot_scalars((4, 2.0, n, z.dtype), (n, 2.0 / n), z)
        return torch.div(torch.linalg.vecdot(z, z), n_), z * two_n
    h, d = cost.value_and_grad(z, 1.0 / n)
    return h.mean(dim=-1), d


def finite_probe(cost: Cost, z: Tensor, rows: Tensor) -> Tensor:
    """A tensor whose sum is finite only if ``z`` is (a NaN or Inf in ``z`` makes it NaN or Inf).

    ``rows`` (the rows' costs, or their sum or mean) serves when ``h`` is finite exactly on finite
    ``z`` and non-negative (``abs_pow``, ``least_squares``: no cancellation); otherwise ``z`` itself.
    A finite ``z`` may still give a non-finite probe (an overflowing cost): the caller then checks
    the inputs themselves.
    """
    return rows if type(cost) in (AbsPow, LeastSquares) else z


def check_sum(z: Tensor, check_values: Callable[[], None] | None) -> None:
    """Run ``check_values`` when ``z`` holds a NaN or Inf (its sum is then not finite; a 0-dim ``z`` is read as is)."""
    if check_values is not None and not math.isfinite(z.item() if z.dim() == 0 else z.detach().sum().item()):
        check_values()


class SortedOT(torch.autograd.Function):
    """Per-row ``mean_i h(a_(i) - b_(i))`` for ``a = u - u2``, ``b = v - v2`` (``None``: ``a = u``).

    ``SortedOT.apply(u, v, cost, check_values[, u2, v2[, reduction]])``: inputs ``[..., n]`` in the
    compute dtype, ``cost.dh`` given. ``check_values`` (or ``None``) is run when the sorted differences
    hold a NaN or Inf. ``reduction`` (``"none"``, ``"mean"`` or ``"sum"``) reduces the rows inside the
    node (one autograd node fewer for a batch of rows; the same values and gradients as reducing after).
    """

    @staticmethod
    def forward(
        ctx, u, v, cost: Cost, check_values: Callable[[], None] | None, u2=None, v2=None, reduction: str = "none"
    ) -> Tensor:
        need = ctx.needs_input_grad
        need_a = need[0] or (len(need) > 4 and need[4])
        need_b = need[1] or (len(need) > 5 and need[5])
        a = u if u2 is None else u - u2
        b = v if v2 is None else v - v2
        # a side whose gradient is not needed is sorted for its values only: the order of its ties is free
        us, pu = sort_with_index(a, stable=need_a)
        vs, pv = sort_with_index(b, stable=need_b)
        z = us - vs
        rows, d = mean_and_scaled_grad(cost, z)
        out, ctx.reduce = rows, None
        if reduction != "none" and rows.dim() > 0:  # the sum, divided by the count for the mean (as mean does)
            ctx.reduce = (reduction, rows.shape)
            count = rows.numel()
            out = rows.sum()  # (not a view of rows even for one row: a view output cannot be modified in place)
            if reduction == "mean" and count > 1:
                out = torch.div(out, scalar(count, out))
        check_sum(finite_probe(cost, z, out), check_values)
        # the gradients and permutations are intermediates, kept on ctx (unpacking saved tensors costs
        # per tensor on every backward); the inputs are saved (version-checked) for double backward only
        # (each permutation overwrites every entry, so ``d`` itself serves as the out-of-place base)
        ctx.grads = (
            torch.scatter(d, -1, pu, d) if need_a else None,
            torch.scatter(d, -1, pv, d).neg_() if need_b else None,
        )
        ctx.perms = (pu, pv)
        ctx.save_for_backward(u, v, u2, v2)
        ctx.cost = cost
        return out

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: rebuild the differentiable graph
            u, v, u2, v2 = ctx.saved_tensors
            pu, pv = ctx.perms
            inputs = (u, v, None, None, u2, v2, None)[: len(need)]
            a = u if u2 is None else u - u2
            b = v if v2 is None else v - v2
            rows = ctx.cost.h(a.gather(-1, pu) - b.gather(-1, pv)).mean(dim=-1)
            if ctx.reduce is not None:
                rows = rows.mean() if ctx.reduce[0] == "mean" else rows.sum()
            wrt = [t for t, nd in zip(inputs, need) if nd]
            grads = iter(torch.autograd.grad(rows, wrt, grad_rows, create_graph=True))
            return tuple(next(grads) if nd else None for nd in need)
        gu, gv = ctx.grads
        if ctx.reduce is not None:  # each row's gradient: grad (sum) or grad / rows (mean), as autograd gives
            reduction, shape = ctx.reduce
            count = shape.numel()
            g = torch.div(grad_rows, scalar(count, grad_rows)) if reduction == "mean" and count > 1 else grad_rows
        else:
            g = grad_rows if grad_rows.dim() == 0 else grad_rows.unsqueeze(-1)
        ga = gu * g if gu is not None else None
        gb = gv * g if gv is not None else None
        out = (
            ga if need[0] else None,
            gb if need[1] else None,
            None,
            None,
            ga.neg() if len(need) > 4 and need[4] else None,
            gb.neg() if len(need) > 5 and need[5] else None,
            None,
        )
        return out[: len(need)]
