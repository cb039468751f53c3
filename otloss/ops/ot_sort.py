"""Fused sort + cost + reduction for equal-size rows.

Rows up to ``MAX_FUSED_SIZE``: one program per row.

Each program loads a row of ``u`` and of ``v``, sorts both on chip with keys that
pack an order-preserving integer image of the float32 value with the element's
index (so the sort also returns the permutation), evaluates ``h`` and ``h'`` of
``u_(i) - v_(i)``, writes the row's mean and scatters each element's gradient back
to its original position. Backward only scales the saved gradients by
``grad_output``: no second sort.

Longer rows: ``torch.sort`` returns values and permutations, then a fused
cost/derivative/partial-reduction kernel runs over ``BLOCK``-sized chunks of each
sorted row (grid ``rows x chunks``), scatters the gradients, and writes one partial
sum per chunk (summed by torch, so the result is deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from otloss.ops.utils import CHUNK_SIZE, MAX_FUSED_SIZE, calculate_settings

# cost ids (see otloss.ops.KERNEL_COSTS)
LOGISTIC: tl.constexpr = tl.constexpr(0)
HINGE: tl.constexpr = tl.constexpr(1)
SQUARED_HINGE: tl.constexpr = tl.constexpr(2)
LEAST_SQUARES: tl.constexpr = tl.constexpr(3)
ABS_POW: tl.constexpr = tl.constexpr(4)
# padding for lanes past the row's end: the largest float32, so it sorts after every real value
# (equal keys are ordered by index, and padding indices are >= n) and pads give z = 0, not inf - inf
PAD: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _sort_with_index(x, offs):
    """Sort float32 ``x`` ascending; returns (sorted values, original indices)."""
    bits = x.to(tl.int32, bitcast=True)
    # signed-int order == float order; negatives move up by one so -0.0 and +0.0 both map to 0
    # (a tie, ordered by index: the convention of otloss's reference path and of a stable torch.sort)
    key = tl.where(bits >= 0, bits, (bits ^ 0x7FFFFFFF) + 1)
    packed = tl.sort((key.to(tl.int64) << 32) | offs.to(tl.int64))
    idx = (packed & 0xFFFFFFFF).to(tl.int32)
    k = (packed >> 32).to(tl.int32)
    vals = tl.where(k >= 0, k, (k - 1) ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)  # -0.0 comes back as +0.0
    return vals, idx


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _cost_and_grad(z, beta, ls, p, COST: tl.constexpr):
    if COST == 0:  # logistic with label smoothing
        bz = beta * z
        h = -(1.0 - ls) * _logsigmoid(bz) - ls * _logsigmoid(-bz)
        dh = beta * (ls / (1.0 + tl.exp(-bz)) - (1.0 - ls) / (1.0 + tl.exp(bz)))
    elif COST == 1:  # hinge
        h = tl.maximum(beta - z, 0.0)
        dh = tl.where(z < beta, -1.0, 0.0)
    elif COST == 2:  # squared hinge
        r = tl.maximum(beta - z, 0.0)
        h = r * r
        dh = -2.0 * r
    elif COST == 3:  # least squares
        d = beta - z
        h = d * d
        dh = -2.0 * d
    else:  # |z|^p
        a = tl.abs(z)
        sign = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
        powp = tl.exp(p * tl.log(a))  # a == 0 -> exp(-inf) == 0
        powm1 = tl.exp((p - 1.0) * tl.log(a))
        h = tl.where(p == 1.0, a, powp)
        dh = tl.where(p == 1.0, sign, p * powm1 * sign)
    return h, dh


@triton.jit
def _ot_rows_fwd_kernel(
    U, V, LOSS, GU, GV, n, stride_u, stride_v, stride_g, beta, ls, p, COST: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    # pad after the cast to float32 (PAD is not representable in float16/bfloat16)
    u = tl.where(mask, tl.load(U + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32), PAD)
    v = tl.where(mask, tl.load(V + row * stride_v + offs, mask=mask, other=0.0).to(tl.float32), PAD)
    us, iu = _sort_with_index(u, offs)  # padding sorts last, so sorted slot i < n is real
    vs, iv = _sort_with_index(v, offs)
    h, dh = _cost_and_grad(us - vs, beta, ls, p, COST)
    inv_n = 1.0 / n.to(tl.float32)
    tl.store(LOSS + row, tl.sum(tl.where(mask, h, 0.0), axis=0) * inv_n)
    g = dh * inv_n
    tl.store(GU + row * stride_g + iu, g, mask=mask)
    tl.store(GV + row * stride_g + iv, -g, mask=mask)


@triton.jit
def _ot_sorted_chunks_kernel(
    US, IU, VS, IV, PARTIAL, GU, GV, n, n_chunks, stride_s, stride_g, beta, ls, p,
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
    h, dh = _cost_and_grad(us - vs, beta, ls, p, COST)
    inv_n = 1.0 / n.to(tl.float32)
    tl.store(PARTIAL + row * n_chunks + chunk, tl.sum(tl.where(mask, h, 0.0), axis=0) * inv_n)
    g = dh * inv_n
    tl.store(GU + row * stride_g + iu, g, mask=mask)
    tl.store(GV + row * stride_g + iv, -g, mask=mask)


def _ot_rows_forward_long(u: Tensor, v: Tensor, cost_id: int, beta: float, ls: float, p: float):
    rows, n = u.shape
    us, iu = torch.sort(u, dim=-1, stable=True)
    vs, iv = torch.sort(v, dim=-1, stable=True)
    n_chunks = triton.cdiv(n, CHUNK_SIZE)
    partial = torch.empty((rows, n_chunks), dtype=torch.float32, device=u.device)
    gu = torch.empty((rows, n), dtype=torch.float32, device=u.device)
    gv = torch.empty((rows, n), dtype=torch.float32, device=u.device)
    _ot_sorted_chunks_kernel[(rows, n_chunks)](
        us, iu, vs, iv, partial, gu, gv, n, n_chunks, us.stride(0), gu.stride(0), beta, ls, p,
        COST=cost_id, BLOCK=CHUNK_SIZE, num_warps=4,
    )  # fmt: skip
    return partial.sum(dim=-1), gu, gv


def ot_rows_forward(u: Tensor, v: Tensor, cost_id: int, beta: float, ls: float, p: float):
    """Run the kernels on ``[R, n]`` rows; returns (loss [R], grad_u [R, n], grad_v [R, n]) in float32."""
    rows, n = u.shape
    if n > MAX_FUSED_SIZE:
        return _ot_rows_forward_long(u, v, cost_id, beta, ls, p)
    block, num_warps = calculate_settings(n)
    loss = torch.empty(rows, dtype=torch.float32, device=u.device)
    gu = torch.empty((rows, n), dtype=torch.float32, device=u.device)
    gv = torch.empty((rows, n), dtype=torch.float32, device=u.device)
    _ot_rows_fwd_kernel[(rows,)](
        u, v, loss, gu, gv, n, u.stride(0), v.stride(0), gu.stride(0), beta, ls, p,
        COST=cost_id, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return loss, gu, gv


class FusedSortedOT(torch.autograd.Function):
    """``mean_i h(u_(i) - v_(i))`` per row with the permutation held fixed; saves per-element gradients."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, cost_id: int, beta: float, ls: float, p: float) -> Tensor:
        shape = u.shape[:-1]
        n = u.shape[-1]
        u2 = u.reshape(-1, n).contiguous()
        v2 = v.reshape(-1, n).contiguous()
        loss, gu, gv = ot_rows_forward(u2, v2, cost_id, beta, ls, p)
        ctx.save_for_backward(gu, gv)
        ctx.shapes = (u.shape, u.dtype, v.dtype)
        return loss.reshape(shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gu, gv = ctx.saved_tensors
        shape, udt, vdt = ctx.shapes
        scale = grad_out.reshape(-1, 1).to(torch.float32)
        grad_u = (gu * scale).reshape(shape).to(udt) if ctx.needs_input_grad[0] else None
        grad_v = (gv * scale).reshape(shape).to(vdt) if ctx.needs_input_grad[1] else None
        return grad_u, grad_v, None, None, None, None
