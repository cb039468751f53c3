"""Fused sort + cost + reduction for equal-size rows, and its ``torch.library`` custom op.

Rows up to ``MAX_FUSED_SIZE``: one program per row.

Each program loads a row of ``u`` and of ``v`` (with ``PAIRED``, two rows each and
their difference: paired AOT's margins ``u = pc - pr``, ``v = rc - rr`` in one
launch), sorts both on chip with keys that pack an order-preserving integer image
of the float32 value with the element's index (so the sort also returns the
permutation), evaluates ``h`` and ``h'`` of ``u_(i) - v_(i)``, writes the row's
mean and the row's sum of differences (one finiteness test for ``validate_args``)
and scatters each element's gradient back to its original position. Backward
only scales the saved gradients by ``grad_output``: no second sort.

Keys follow ``torch.sort``: ascending, ties (``-0.0`` with ``+0.0``) in index
order, every NaN after ``+inf`` in index order; lanes past the row's end get the
largest key and indices ``>= n``, so they sort after every real element, NaN
included. A row holding NaN or ``+inf`` thus gives what the PyTorch reference
gives.

Longer rows: ``torch.sort`` returns values and permutations, then a fused
cost/derivative/partial-reduction kernel runs over ``BLOCK``-sized chunks of each
sorted row (grid ``rows x chunks``), scatters the gradients, and writes one partial
sum per chunk (summed by torch, so the result is deterministic).

Two entry points share one forward: :class:`FusedSortedOT` (an autograd function,
the eager path: the least Python per call) and the custom op
``torch.ops.otloss.sorted_ot_rows`` (with a fake implementation and autograd
registration; what :func:`otloss.ot_h_1d` calls under ``torch.compile``, which then
traces it without a graph break).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from otloss.ops.utils import CHUNK_SIZE, MAX_FUSED_SIZE, calculate_settings

__all__ = ["FusedSortedOT", "ot_rows_forward", "sorted_ot_rows"]

#: the sort key of lanes past the row's end and of every NaN: the largest int32
LAST_KEY: tl.constexpr = tl.constexpr(0x7FFFFFFF)
NAN_ALL: tl.constexpr = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _sort_with_index(x, offs, mask):
    """Sort float32 ``x`` ascending (NaN last, then the lanes outside ``mask``); (values, original indices)."""
    bits = x.to(tl.int32, bitcast=True)
    # signed-int order == float order; negatives move up by one so -0.0 and +0.0 both map to 0
    # (a tie, ordered by index: the convention of otloss's reference path and of a stable torch.sort)
    key = tl.where(bits >= 0, bits, (bits ^ 0x7FFFFFFF) + 1)
    key = tl.where((x != x) | ~mask, LAST_KEY, key)  # NaN and padding last, by index
    packed = tl.sort((key.to(tl.int64) << 32) | offs.to(tl.int64))
    idx = (packed & 0xFFFFFFFF).to(tl.int32)
    k = (packed >> 32).to(tl.int32)
    # -0.0 comes back as +0.0; LAST_KEY comes back as a NaN
    vals = tl.where(k >= 0, k, (k - 1) ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    return vals, idx


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0, propagate_nan=NAN_ALL) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _cost_and_grad(z, beta, ls, p, COST: tl.constexpr):
    """``h(z)`` and ``h'(z)`` of the cost family ``COST`` (a built-in cost's ``kernel_id``)."""
    if COST == 0:  # logistic with label smoothing
        bz = beta * z
        smoothed = -(1.0 - ls) * _logsigmoid(bz) - ls * _logsigmoid(-bz)
        h = tl.where(ls == 0.0, -_logsigmoid(bz), smoothed)  # ls = 0: h(+inf) = 0, not 0 * inf
        dh = beta * (ls / (1.0 + tl.exp(-bz)) - (1.0 - ls) / (1.0 + tl.exp(bz)))
    elif COST == 1:  # hinge
        h = tl.maximum(beta - z, 0.0, propagate_nan=NAN_ALL)
        dh = tl.where(z < beta, -1.0, 0.0)
    elif COST == 2:  # squared hinge
        r = tl.maximum(beta - z, 0.0, propagate_nan=NAN_ALL)
        h = r * r
        dh = -2.0 * r
    elif COST == 3:  # least squares
        d = beta - z
        h = d * d
        dh = -2.0 * d
    else:  # |z|^p
        a = tl.abs(z)
        sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))  # sign(NaN) = 0, as torch.sign
        powp = tl.exp(p * tl.log(a))  # a == 0 -> exp(-inf) == 0
        powm1 = tl.exp((p - 1.0) * tl.log(a))
        h = tl.where(p == 1.0, a, powp)
        dh = tl.where(p == 1.0, sign, p * powm1 * sign)
    return h, dh


@triton.jit
def _load_row(X, X2, row, stride, stride2, offs, mask, PAIRED: tl.constexpr):
    x = tl.load(X + row * stride + offs, mask=mask, other=0.0).to(tl.float32)
    if PAIRED:
        x = x - tl.load(X2 + row * stride2 + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _ot_rows_fwd_kernel(
    U, U2, V, V2, LOSS, ZSUM, GU, GV, n, stride_u, stride_u2, stride_v, stride_v2, stride_g, beta, ls, p,
    COST: tl.constexpr, PAIRED_U: tl.constexpr, PAIRED_V: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    u = _load_row(U, U2, row, stride_u, stride_u2, offs, mask, PAIRED_U)
    v = _load_row(V, V2, row, stride_v, stride_v2, offs, mask, PAIRED_V)
    us, iu = _sort_with_index(u, offs, mask)  # sorted slot i < n holds a real element
    vs, iv = _sort_with_index(v, offs, mask)
    z = us - vs
    h, dh = _cost_and_grad(z, beta, ls, p, COST)
    inv_n = 1.0 / n.to(tl.float32)
    tl.store(LOSS + row, tl.sum(tl.where(mask, h, 0.0), axis=0) * inv_n)
    tl.store(ZSUM + row, tl.sum(tl.where(mask, z, 0.0), axis=0))
    g = dh * inv_n
    tl.store(GU + row * stride_g + iu, g, mask=mask)
    tl.store(GV + row * stride_g + iv, -g, mask=mask)


@triton.jit
def _ot_sorted_chunks_kernel(
    US, IU, VS, IV, PARTIAL, ZPARTIAL, GU, GV, n, n_chunks, stride_s, stride_g, beta, ls, p,
    COST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    us = tl.load(US + row * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
    vs = tl.load(VS + row * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
    iu = tl.load(IU + row * stride_s + offs, mask=mask, other=0)
    iv = tl.load(IV + row * stride_s + offs, mask=mask, other=0)
    z = us - vs
    h, dh = _cost_and_grad(z, beta, ls, p, COST)
    inv_n = 1.0 / n.to(tl.float32)
    tl.store(PARTIAL + row * n_chunks + chunk, tl.sum(tl.where(mask, h, 0.0), axis=0) * inv_n)
    tl.store(ZPARTIAL + row * n_chunks + chunk, tl.sum(tl.where(mask, z, 0.0), axis=0))
    g = dh * inv_n
    tl.store(GU + row * stride_g + iu, g, mask=mask)
    tl.store(GV + row * stride_g + iv, -g, mask=mask)


def _rows(x: Tensor, n: int) -> Tensor:
    return x.reshape(-1, n).contiguous()


def _margin(x: Tensor, x2: Tensor | None) -> Tensor:
    return x.float() if x2 is None else x.float() - x2.float()


def _ot_rows_forward_long(u, u2, v, v2, gu, gv, shape, cost_id: int, beta: float, ls: float, p: float):
    u, v = _margin(u, u2), _margin(v, v2)
    rows, n = u.shape
    us, iu = torch.sort(u, dim=-1, stable=True)
    vs, iv = torch.sort(v, dim=-1, stable=True)
    n_chunks = triton.cdiv(n, CHUNK_SIZE)
    partial = torch.empty((2, rows, n_chunks), dtype=torch.float32, device=u.device)
    _ot_sorted_chunks_kernel[(rows, n_chunks)](
        us, iu, vs, iv, partial[0], partial[1], gu, gv, n, n_chunks, us.stride(0), n, beta, ls, p,
        COST=cost_id, BLOCK=CHUNK_SIZE, num_warps=4,
    )  # fmt: skip
    # summed by torch in a fixed order (deterministic), each into a tensor of its own (no view)
    return partial[0].view(*shape, n_chunks).sum(dim=-1), partial[1].view(*shape, n_chunks).sum(dim=-1)


def ot_rows_forward(
    u: Tensor, u2: Tensor | None, v: Tensor, v2: Tensor | None, cost_id: int, beta: float, ls: float, p: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the kernels on rows ``[..., n]`` of ``u - u2`` and ``v - v2`` (``None``: no subtraction).

    Returns float32 ``(loss [...], grad_u [..., n], grad_v [..., n], zsum [...])``; ``zsum`` is each
    row's sum of sorted differences, finite when every input is. Each is a tensor of its own, made in
    its final shape, not a view: a view returned by an autograd node cannot be modified in place.
    """
    shape, n = u.shape[:-1], u.shape[-1]
    u, v = _rows(u, n), _rows(v, n)
    u2 = None if u2 is None else _rows(u2, n)
    v2 = None if v2 is None else _rows(v2, n)
    rows = u.shape[0]
    gu = torch.empty((*shape, n), dtype=torch.float32, device=u.device)  # contiguous: row r starts at r * n
    gv = torch.empty((*shape, n), dtype=torch.float32, device=u.device)
    if n > MAX_FUSED_SIZE:
        loss, zsum = _ot_rows_forward_long(u, u2, v, v2, gu, gv, shape, cost_id, beta, ls, p)
    else:
        block, num_warps = calculate_settings(n)
        loss = torch.empty(shape, dtype=torch.float32, device=u.device)
        zsum = torch.empty(shape, dtype=torch.float32, device=u.device)
        uu2 = u if u2 is None else u2
        vv2 = v if v2 is None else v2
        _ot_rows_fwd_kernel[(rows,)](
            u, uu2, v, vv2, loss, zsum, gu, gv, n, u.stride(0), uu2.stride(0), v.stride(0), vv2.stride(0), n,
            beta, ls, p,
            COST=cost_id, PAIRED_U=u2 is not None, PAIRED_V=v2 is not None, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return loss, gu, gv, zsum


def _scaled_grads(gu, gv, grad_rows, dtypes, needs):
    """The four inputs' gradients from the saved per-element ones (``u2`` gets ``-grad_u``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "backend='triton' has no double backward (create_graph=True): its saved gradients are constants; "
            "use backend='torch', whose reference path supports it"
        )
    scale = grad_rows.unsqueeze(-1).to(torch.float32)
    out = []
    for g, sign_dtypes, sign_needs in ((gu, dtypes[:2], needs[:2]), (gv, dtypes[2:], needs[2:])):
        gs = g * scale if any(sign_needs) else None
        out.append(gs.to(sign_dtypes[0]) if sign_needs[0] else None)
        out.append(gs.neg().to(sign_dtypes[1]) if sign_needs[1] else None)
    return out


class FusedSortedOT(torch.autograd.Function):
    """Per-row ``mean_i h(a_(i) - b_(i))``, ``a = u - u2``, ``b = v - v2``, the permutations held fixed.

    ``check_values`` (or ``None``) runs when a row's sum of sorted differences is not finite.
    """

    @staticmethod
    def forward(ctx, u, u2, v, v2, cost_id, beta, ls, p, check_values):
        loss, gu, gv, zsum = ot_rows_forward(u, u2, v, v2, cost_id, beta, ls, p)
        if check_values is not None and not bool(torch.isfinite(zsum.sum())):
            check_values()
        ctx.save_for_backward(gu, gv)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (u, u2, v, v2))
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        gu, gv = ctx.saved_tensors
        return (*_scaled_grads(gu, gv, grad_rows, ctx.dtypes, ctx.needs_input_grad[:4]), None, None, None, None, None)


@torch.library.custom_op("otloss::sorted_ot_rows", mutates_args=())
def sorted_ot_rows(
    u: Tensor, u2: Tensor | None, v: Tensor, v2: Tensor | None, cost_id: int, beta: float, ls: float, p: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Custom op: per-row loss ``[...]`` and per-element gradients ``[..., n]`` (all float32)."""
    loss, gu, gv, _ = ot_rows_forward(u, u2, v, v2, cost_id, beta, ls, p)
    return loss, gu, gv


@sorted_ot_rows.register_fake
def _(u, u2, v, v2, cost_id, beta, ls, p):
    return (
        u.new_empty(u.shape[:-1], dtype=torch.float32),
        u.new_empty(u.shape, dtype=torch.float32),
        v.new_empty(v.shape, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs[:4])
    ctx.needs = tuple(t is not None and t.requires_grad for t in inputs[:4])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_rows, _grad_gu, _grad_gv):
    gu, gv = ctx.saved_tensors
    return (*_scaled_grads(gu, gv, grad_rows, ctx.dtypes, ctx.needs), None, None, None, None)


sorted_ot_rows.register_autograd(_backward, setup_context=_setup_context)
