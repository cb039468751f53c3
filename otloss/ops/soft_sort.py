"""Triton kernel for the block search of the l2 soft sort (CUDA, no host synchronisation).

One program per row runs the sequential pool-adjacent-violators pass of
:mod:`otloss.sorting` on the sorted row, in float64: each value enters as a block of
one and pools with the block on top of the stack while
``eps * (mean_top_new - mean_top) >= (size_top + size_new) / 2``; block sums are the
running sums a sequential pass makes. The stack lives in a scratch buffer in global
memory (cached on chip), so rows of any length run. The program then writes, for every
sorted position, the first position and the size of its block; the values
``block_mean + offset / eps`` and the backward are computed by :mod:`otloss.sorting`
from these, as on the CPU.

This module imports triton: :mod:`otloss.sorting` imports it only for CUDA tensors and
only when :func:`otloss.ops.triton_available` says triton imports.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["l2_blocks_triton"]


@triton.jit
def _l2_pav_rows_kernel(
    XS,  # [rows, n] float64, sorted rows
    FIRST,  # [rows, n] int32 out: first position of each position's block
    SIZE,  # [rows, n] float64 out: size of that block
    STK_S,  # [rows, n] float64 scratch: block sums
    STK_C,  # [rows, n] float64 scratch: block sizes
    STK_F,  # [rows, n] int32 scratch: block first positions
    EPS,  # [1] float64: eps (a float argument would be passed as float32)
    n,
    EPS_AT_MOST_ONE: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * n
    eps = tl.load(EPS)
    top = 0
    for i in range(0, n):
        s = tl.load(XS + base + i)
        c = tl.full([], 1.0, tl.float64)
        f = tl.full([], 0, tl.int32) + i
        go = top > 0
        while go:
            ps = tl.load(STK_S + base + top - 1)
            pc = tl.load(STK_C + base + top - 1)
            gap = s / c - ps / pc
            if EPS_AT_MOST_ONE:
                viol = gap * eps >= (pc + c) * 0.5
            else:
                viol = gap >= (pc + c) * 0.5 / eps
            if viol:
                s = s + ps
                c = c + pc
                f = tl.load(STK_F + base + top - 1)
                top = top - 1
                go = top > 0
            else:
                go = top < 0
        tl.store(STK_S + base + top, s)
        tl.store(STK_C + base + top, c)
        tl.store(STK_F + base + top, f)
        top = top + 1
    for b in range(0, top):
        f = tl.load(STK_F + base + b)
        c = tl.load(STK_C + base + b)
        for j in range(f, f + c.to(tl.int32)):
            tl.store(FIRST + base + j, f)
            tl.store(SIZE + base + j, c)


def l2_blocks_triton(xs: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Block of every position of the sorted rows ``xs [rows, n]`` (float64): ``(first int64, size float64)``.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    """
    if xs.dtype != torch.float64 or xs.dim() != 2:
        raise ValueError(
            f"l2_blocks_triton: xs must be a 2-D float64 tensor, got {xs.dtype} of shape {tuple(xs.shape)}"
        )
    rows, n = xs.shape
    xs = xs.contiguous()
    first = torch.empty((rows, n), dtype=torch.int32, device=xs.device)
    size = torch.empty((rows, n), dtype=torch.float64, device=xs.device)
    stk_s = torch.empty((rows, n), dtype=torch.float64, device=xs.device)
    stk_c = torch.empty((rows, n), dtype=torch.float64, device=xs.device)
    stk_f = torch.zeros((rows, n), dtype=torch.int32, device=xs.device)
    eps_t = torch.full((1,), eps, dtype=torch.float64, device=xs.device)
    _l2_pav_rows_kernel[(rows,)](
        xs, first, size, stk_s, stk_c, stk_f, eps_t, n, EPS_AT_MOST_ONE=eps <= 1.0, num_warps=1
    )
    return first.to(torch.int64), size
