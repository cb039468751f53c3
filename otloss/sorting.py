"""Hard and soft sorting along the last dimension.

Hard sort (:func:`hard_sort`) is ``torch.sort``: its gradient routes each output
back to the element it came from, i.e. the permutation is held fixed, which is
the rule the AOT paper prescribes.

Soft sort (:func:`soft_sort`) is the regularised sort of Blondel et al. (2020),
"Fast Differentiable Sorting and Ranking" (arXiv 2002.08871): the projection of
``rho / eps`` (``rho = (n, ..., 1)``) onto the permutahedron of the values.

For ``regularization="l2"`` the projection has a simple form. With ``xs`` the row
sorted ascending, the soft sort ``y`` is the Euclidean projection of ``xs`` onto
``{y : y[i+1] - y[i] <= 1 / eps}``: the closest vector whose consecutive gaps are
at most ``1 / eps``. It equals the hard sort exactly whenever every gap between
consecutive sorted values is below ``1 / eps``. Runs of values whose gaps are
larger are pooled: inside a pooled block the outputs keep the block's mean and are
spaced exactly ``1 / eps`` apart. So ``eps`` is in units of 1 / (your values):
``eps -> 0`` is the hard sort, ``eps -> inf`` maps every value to the row mean.
For log-ratios of order 1 the paper's ``eps = 0.1`` is close to a hard sort;
``eps = 1`` already pools neighbours more than 1 apart.

The built-in l2 backend finds the blocks by pool-adjacent-violators run on all
rows at once with array operations (NumPy for CPU tensors, torch elsewhere, a
Triton kernel for CUDA tensors when triton is installed), never a Python loop
over rows or elements; see ``docs/soft_sort.md``. Every pooling decision compares block means in the scale-free form
``eps * (mean_right - mean_left) >= (size_left + size_right) / 2``, in float64,
and each output is ``block_mean + offset / eps`` from exact block sums (nothing
of size ``n / eps`` is added to a value and subtracted again), so a float32 result
is the float64 result rounded once, for every ``eps > 0``.

``regularization="kl"`` is the entropic variant (values pooled through a
log-sum-exp instead of a mean; as ``eps -> inf`` a row tends to the constant
``log(n) - logsumexp(-x)``, a soft minimum); it still runs its PAV pass as a
Python loop per row on the CPU. ``backend="torchsort"`` uses the torchsort package
when it is installed; both backends compute the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from otloss._reference import functorch_active, sort_with_index
from otloss._validation import check_finite, check_values_tensor, compute_dtype, real_number, resolve_validate

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


def _soft_sort_kl(x: Tensor, eps: float) -> Tensor:
    """Entropic soft sort: PAV pass in Python per row (on the CPU, float64), then differentiable segment reductions."""
    n = x.shape[-1]
    dtype = compute_dtype(x.dtype)
    xs, _ = torch.sort(x.to(dtype), dim=-1)
    ids = _segment_ids(xs, eps, "kl")
    rho = torch.arange(n, 0, -1, dtype=dtype, device=x.device) / eps
    rho = rho.expand_as(xs)
    # out_i = -(rho_i - lse_B(rho) + lse_B(-x))
    out = _segment_reduce(rho, ids, "lse") - rho - _segment_reduce(-xs, ids, "lse")
    # a row holding NaN or Inf (checks off) gives NaN, as the l2 soft sort does (log-sum-exp absorbs an inf)
    out = torch.where(torch.isfinite(xs).all(-1, keepdim=True), out, torch.full_like(out, float("nan")))
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# l2 soft sort: pool-adjacent-violators on all rows at once, with tensor operations.
#
# For a sorted row xs and delta = 1 / eps, the soft sort is y = v + i * delta where v is the
# non-increasing isotonic regression of g_i = xs_i - i * delta. PAV pools adjacent blocks A
# (left) and B (right) while mean_A(g) <= mean_B(g), which for adjacent blocks reads
#     eps * (mean_B(xs) - mean_A(xs)) >= (|A| + |B|) / 2,
# a comparison of block means of the values themselves: no term of size n / eps ever meets a
# value, so nothing cancels and nothing overflows for any eps > 0. Pooling any adjacent
# violating pair of a partition whose blocks each lie inside a final block keeps that
# property (the pair lies in one final block), so violating pairs may be pooled in any order
# and in parallel; the result is the unique PAV solution.
# ---------------------------------------------------------------------------------------------


def _violates(m_left: Tensor, n_left: Tensor, m_right: Tensor, n_right: Tensor, eps: float) -> Tensor:
    """Whether adjacent blocks (means, sizes) violate: ``eps * (m_right - m_left) >= (n_left + n_right) / 2``.

    Halves first so that the difference of two values near the float64 maximum stays finite;
    ``eps`` multiplies when it is at most 1 and divides the other side when larger, so
    neither side overflows.
    """
    half_gap = m_right * 0.5 - m_left * 0.5
    quarter = (n_left + n_right) * 0.25
    if eps <= 1.0:
        return half_gap * eps >= quarter
    return half_gap >= quarter / eps


def _pool(link: Tensor, s: Tensor, c: Tensor, start: Tensor, row: Tensor) -> tuple[Tensor, ...]:
    """Pool the blocks joined by ``link`` (``link[j]``: block j with block j + 1); returns the new blocks.

    ``s``, ``c``: block sums and sizes (float64); ``start``: first position of each block in its
    row; ``row``: its row. The last output marks the blocks that grew.
    """
    first = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    first[1:] = ~link
    gid = torch.cumsum(first, 0) - 1
    keep = first.nonzero().squeeze(1)
    g = keep.numel()
    s2 = s.new_zeros(g).index_add_(0, gid, s)
    c2 = c.new_zeros(g).index_add_(0, gid, c)
    return s2, c2, start.index_select(0, keep), row.index_select(0, keep), c2 != c.index_select(0, keep)


def _extend(s: Tensor, c: Tensor, row: Tensor, grown: Tensor, eps: float) -> Tensor | None:
    """Links that pool each grown block with the stable neighbours PAV would pool it with.

    Between two grown blocks of a row no adjacent pair violates (a "stable" stretch). A grown
    block B pooling leftwards into such a stretch keeps violating up to some count k and never
    again after (the pooled mean only rises while the next neighbour's mean is higher still).
    That reach is found for all grown blocks at once (:func:`_reach_dense`, or
    :func:`_reach_lifting` when grown blocks x stretch length is large); the same to the right.
    Each step pools an adjacent violating pair, hence is exact, and so is pooling the two
    sides' results together.
    """
    m = s.numel()
    f = grown.nonzero().squeeze(1)
    if f.numel() == 0:
        return None
    rf = row.index_select(0, f)
    # first and one-past-last block index of each grown block's row (row is sorted)
    row_lo = torch.searchsorted(row, rf)
    row_hi = torch.searchsorted(row, rf, right=True)
    prev = torch.cat([f.new_full((1,), -1), f[:-1]])
    nxt = torch.cat([f[1:], f.new_full((1,), m)])
    lim_left = f - torch.maximum(prev + 1, row_lo)
    lim_right = torch.minimum(nxt, row_hi) - f - 1
    top = int(torch.maximum(lim_left, lim_right).max())
    if top <= 0:
        return None
    if f.numel() * top <= _DENSE_EXTEND_MAX:
        reach = [_reach_dense(s, c, f, lim, top, left, eps) for left, lim in ((True, lim_left), (False, lim_right))]
    else:
        reach = _reach_lifting(s, c, f, lim_left, lim_right, top, eps)
    mark = torch.zeros(m + 1, dtype=torch.int64, device=s.device)
    mark.index_add_(0, f - reach[0], torch.ones_like(f))
    mark.index_add_(0, f + reach[1], -torch.ones_like(f))
    link = torch.cumsum(mark[: m - 1], 0) > 0
    return link if bool(link.any()) else None


#: grown blocks x longest stretch up to which :func:`_extend` tries every reach at once
_DENSE_EXTEND_MAX = 1 << 20


def _reach_dense(s: Tensor, c: Tensor, f: Tensor, lim: Tensor, top: int, left: bool, eps: float) -> Tensor:
    """How many stable neighbours each grown block ``f`` pools on one side, trying every count at once.

    The pooled sums are running sums outward from the block, the very additions a sequential
    PAV makes; the reach is the length of the leading run of violations.
    """
    m = s.numel()
    d = torch.arange(1, top + 1, device=s.device)
    nb = f.unsqueeze(1) - d if left else f.unsqueeze(1) + d  # [grown, top]: the k-th neighbour
    valid = d <= lim.unsqueeze(1)
    nb = torch.where(valid, nb, f.unsqueeze(1)).clamp(0, m - 1)
    ns = torch.where(valid, s[nb], 0.0)
    nc = torch.where(valid, c[nb], 1.0)
    zero = ns.new_zeros(f.numel(), 1)
    ps = s[f].unsqueeze(1) + torch.cat([zero, torch.cumsum(ns, 1)[:, :-1]], 1)  # B with neighbours 1 .. k-1
    pc = c[f].unsqueeze(1) + torch.cat([zero, torch.cumsum(nc, 1)[:, :-1]], 1)
    if left:
        viol = _violates(ns / nc, nc, ps / pc, pc, eps)
    else:
        viol = _violates(ps / pc, pc, ns / nc, nc, eps)
    return torch.cumprod((viol & valid).to(torch.int64), 1).sum(1)


def _reach_lifting(
    s: Tensor, c: Tensor, f: Tensor, lim_left: Tensor, lim_right: Tensor, top: int, eps: float
) -> list[Tensor]:
    """:func:`_reach_dense` for both sides by binary lifting over power-of-two window sums (many grown blocks).

    Window sums are sums of sums (no prefix-sum cancellation); the predicate "the k-th pooling
    still violates" holds for every k up to the reach and for none after, so testing counts
    from the largest power of two down finds the reach in ``log2(top)`` steps.
    """
    levels = top.bit_length()
    # win_*[l][i]: sum over blocks i .. i + 2**l - 1, for the i where that window fits in the array
    # (a window that does not fit crosses a row end and is never used: its index is clamped)
    win_s, win_c = [s], [c]
    for lev in range(1, levels):
        h = 1 << (lev - 1)
        win_s.append(win_s[-1][:-h] + win_s[-1][h:])
        win_c.append(win_c[-1][:-h] + win_c[-1][h:])
    mean = s / c
    reach = []
    for left, lim in ((True, lim_left), (False, lim_right)):
        k = torch.zeros_like(f)  # neighbours pooled so far
        ks = torch.zeros(f.shape, dtype=s.dtype, device=s.device)  # sum and size of B with them
        kc = torch.zeros(f.shape, dtype=s.dtype, device=s.device)
        for lev in reversed(range(levels)):
            kp = k + (1 << lev)
            ok = kp <= lim
            last = win_s[lev].numel() - 1
            if left:  # candidate: blocks f-kp+1 .. f pooled, against neighbour f-kp
                w = (f - kp + 1).clamp(0, last)
                nb = torch.where(ok, f - kp, f)
            else:  # candidate: blocks f .. f+kp-1 pooled, against neighbour f+kp
                w = (f + k).clamp(0, last)
                nb = torch.where(ok, f + kp, f)
            cs = ks + win_s[lev].index_select(0, w)
            cc = kc + win_c[lev].index_select(0, w)
            mn, cn = mean.index_select(0, nb), c.index_select(0, nb)
            if left:
                ok &= _violates(mn, cn, cs / cc, cc, eps)
            else:
                ok &= _violates(cs / cc, cc, mn, cn, eps)
            k = torch.where(ok, kp, k)
            ks = torch.where(ok, cs, ks)
            kc = torch.where(ok, cc, kc)
        reach.append(k)
    return reach


def _l2_blocks(xs: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PAV blocks of the l2 soft sort of every row of ``xs [rows, n]`` (sorted, finite, float64).

    Returns the blocks in order over all rows: sums, sizes (float64), rows and first positions
    in their rows. A round pools every run of violating neighbours and, from the second round
    on, extends each grown block over its stable neighbours (:func:`_extend`), so that a
    cascade of poolings takes a few rounds, not one per element; rounds repeat until no pair
    violates.
    A round is a fixed number of tensor operations over all rows at once, whatever their number.
    """
    rows, n = xs.shape
    dev = xs.device
    s = xs.reshape(-1)
    c = torch.ones_like(s)
    start = torch.arange(n, device=dev).repeat(rows)
    row = torch.arange(rows, device=dev).unsqueeze(1).expand(rows, n).reshape(-1)
    rounds = 0
    while True:
        mean = s / c
        viol = _violates(mean[:-1], c[:-1], mean[1:], c[1:], eps) & (row[1:] == row[:-1])
        if not bool(viol.any()):
            return s, c, row, start
        s, c, start, row, grown = _pool(viol, s, c, start, row)
        rounds += 1
        if rounds > _EXTEND_AFTER:  # pooling cascades: extend grown blocks at once rather than one neighbour a round
            link = _extend(s, c, row, grown, eps)
            if link is not None:
                s, c, start, row, _ = _pool(link, s, c, start, row)


# The same block search in NumPy, for CPU tensors: the same decisions and sums (so the same
# result), at a fraction of the per-operation cost, with contiguous segment sums (reduceat)
# and reaches found by windows that grow only for the blocks still pooling.


def _pool_np(link: np.ndarray, s: np.ndarray, c: np.ndarray, rs: np.ndarray) -> tuple[np.ndarray, ...]:
    """:func:`_pool` in NumPy; ``rs`` marks the blocks that start a row."""
    first = np.empty(s.shape[0], dtype=bool)
    first[0] = True
    np.logical_not(link, out=first[1:])
    keep = np.flatnonzero(first)
    s2 = np.add.reduceat(s, keep)
    c2 = np.add.reduceat(c, keep)
    return s2, c2, rs[keep], c2 != c[keep]


def _reach_np(s: np.ndarray, c: np.ndarray, f: np.ndarray, lim: np.ndarray, left: bool, eps: float) -> np.ndarray:
    """:func:`_reach_dense` in NumPy, trying 8 neighbours first and 4 times more for the blocks that pool them all.

    A block still pooling at window ``w`` reaches at least ``w / 4`` neighbours, so the work stays
    within a small multiple of the total reach (at most twice the number of blocks).
    """
    m = s.shape[0]
    reach = np.zeros(f.shape[0], dtype=np.int64)
    todo = np.arange(f.shape[0])
    w = 8
    while todo.size:
        ft, lt = f[todo], lim[todo]
        top = int(min(w, lt.max()))
        d = np.arange(1, top + 1)
        nb = ft[:, None] - d if left else ft[:, None] + d
        valid = d <= lt[:, None]
        nb = np.clip(np.where(valid, nb, ft[:, None]), 0, m - 1)
        ns = np.where(valid, s[nb], 0.0)
        nc = np.where(valid, c[nb], 1.0)
        ps = np.empty_like(ns)
        pc = np.empty_like(nc)
        ps[:, 0] = 0.0
        pc[:, 0] = 0.0
        np.cumsum(ns[:, :-1], axis=1, out=ps[:, 1:])  # running sums outward: neighbours 1 .. k-1
        np.cumsum(nc[:, :-1], axis=1, out=pc[:, 1:])
        ps += s[ft][:, None]
        pc += c[ft][:, None]
        if left:
            viol = _violates(ns / nc, nc, ps / pc, pc, eps)
        else:
            viol = _violates(ps / pc, pc, ns / nc, nc, eps)
        k = np.cumprod(viol & valid, axis=1).sum(axis=1)
        reach[todo] = k
        todo = todo[(k == top) & (lt > top)]
        w *= 4
    return reach


def _extend_np(s: np.ndarray, c: np.ndarray, rs: np.ndarray, grown: np.ndarray, eps: float) -> np.ndarray | None:
    """:func:`_extend` in NumPy."""
    m = s.shape[0]
    f = np.flatnonzero(grown)
    if f.size == 0:
        return None
    rowid = np.cumsum(rs) - 1
    rf = rowid[f]
    row_lo = np.searchsorted(rowid, rf)
    row_hi = np.searchsorted(rowid, rf, side="right")
    prev = np.concatenate([[-1], f[:-1]])
    nxt = np.concatenate([f[1:], [m]])
    lim_left = f - np.maximum(prev + 1, row_lo)
    lim_right = np.minimum(nxt, row_hi) - f - 1
    mark = np.zeros(m + 1, dtype=np.int64)
    if lim_left.max() > 0:
        mark[f - _reach_np(s, c, f, lim_left, True, eps)] += 1  # f - reach is increasing in f: no repeats
    else:
        mark[f] += 1
    if lim_right.max() > 0:
        mark[f + _reach_np(s, c, f, lim_right, False, eps)] -= 1
    else:
        mark[f] -= 1
    link = np.cumsum(mark[: m - 1]) > 0
    return link if link.any() else None


def _l2_blocks_np(xs: np.ndarray, eps: float) -> tuple[np.ndarray, ...]:
    """:func:`_l2_blocks` in NumPy (same rounds, same decisions): sums, sizes, rows and first positions."""
    n = xs.shape[1]
    s = xs.reshape(-1).copy()
    c = np.ones_like(s)
    rs = np.zeros(s.shape[0], dtype=bool)
    rs[::n] = True
    rounds = 0
    while True:
        mean = s / c
        viol = _violates(mean[:-1], c[:-1], mean[1:], c[1:], eps)
        viol &= ~rs[1:]
        if not viol.any():
            break
        s, c, rs, grown = _pool_np(viol, s, c, rs)
        rounds += 1
        if rounds > _EXTEND_AFTER:
            link = _extend_np(s, c, rs, grown, eps)
            if link is not None:
                s, c, rs, _ = _pool_np(link, s, c, rs)
    row = np.cumsum(rs) - 1
    first = np.concatenate([[0], np.cumsum(c[:-1].astype(np.int64))])
    return s, c, row, first - row * n


#: CPU tensors run the block search in NumPy (False: in torch, as on other devices)
_BLOCKS_IN_NUMPY = True

#: rounds of plain pooling before grown blocks are also extended over their stable neighbours
_EXTEND_AFTER = 2


def _l2_values(v: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Soft sort of the sorted float64 rows ``v [k, n]``, flat: values, block sizes and block first positions."""
    k, n = v.shape
    s, c, row, start = _l2_blocks(v, eps)
    # block of every position: a 1 at each block's first position, summed up
    heads = torch.zeros(k * n, dtype=torch.int64, device=v.device)
    heads.index_fill_(0, row * n + start, 1)
    bid = torch.cumsum(heads, 0) - 1
    size = c.index_select(0, bid)
    first = start.index_select(0, bid)
    offset = torch.arange(n, dtype=torch.float64, device=v.device).repeat(k) - first - (size - 1) * 0.5
    y = (s / c).index_select(0, bid) + offset / eps  # offset is 0 for a block of one: y is the value itself
    return y, size, first


def _l2_values_np(v: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_l2_values` in NumPy."""
    k, n = v.shape
    s, c, _, start = _l2_blocks_np(v, eps)
    bid = np.repeat(np.arange(s.shape[0]), c.astype(np.int64))
    size = c[bid]
    first = start[bid]
    offset = np.tile(np.arange(n, dtype=np.float64), k) - first - (size - 1) * 0.5
    return (s / c)[bid] + offset / eps, size, first


def _block_mean_np(g: np.ndarray, first: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Mean of ``g [rows, n]`` over each block (given per position by ``first``/``size``), at every position.

    Blocks are contiguous: sums by ``reduceat`` at the block heads. Size 0 (a NaN/Inf row) gives NaN.
    """
    rows, n = g.shape
    flat_first, flat_size = first.reshape(-1), size.reshape(-1)
    heads = np.flatnonzero(flat_first == np.tile(np.arange(n), rows))
    sums = np.add.reduceat(g.reshape(-1), heads)
    lengths = np.diff(np.append(heads, rows * n))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.repeat(sums / flat_size[heads], lengths)
    mean[flat_size == 0] = np.nan
    return mean.reshape(rows, n)


#: float64 inputs beyond this magnitude are scaled by 2**-64 (exactly) before pooling, so block sums stay finite
_F64_RESCALE_ABOVE = 2.0**1000


class _L2SoftSort(torch.autograd.Function):
    """l2 soft sort of the last dimension of a float32/float64 tensor.

    Outputs ``(y, perm, start, size)``: the soft sort, the sorting permutation, and for every
    sorted position the first position and the size of its pooled block (``[..., 0]`` when no
    row pools anything; size 0 marks a row that held NaN or Inf). Only ``y`` is differentiable;
    its Jacobian averages over each block, so the backward is a block mean of the upstream
    gradient scattered back through the permutation.
    """

    @staticmethod
    def forward(
        x: Tensor, eps: float, check: bool, xs: Tensor | None = None, perm: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # xs, perm: the sort of x when the caller has it already (and found that some block pools)
        n = x.shape[-1]
        if xs is None or perm is None:
            xs, perm = sort_with_index(x)
            if _use_kernel(x):
                if check:
                    check_finite(x, "x")  # the one host synchronisation, only when checking
                return _forward_kernel(xs, perm, eps)
            if _no_pooling(xs, eps, x, check):
                none = torch.empty((*x.shape[:-1], 0), dtype=torch.int64, device=x.device)
                return xs, perm, none, none.to(torch.float64)
        else:
            perm = perm.view_as(perm)  # an input returned as an output must be a view
        rows = x.numel() // n
        xs2 = xs.reshape(rows, n)
        # Only rows where some gap reaches 1 / eps (or that hold NaN/Inf) can pool: the others are done.
        gap_top = (xs2[:, 1:] - xs2[:, :-1]).amax(dim=1).to(torch.float64)
        act = (~(gap_top * eps * (1.0 + 2.0**-20) < 1.0)).nonzero().squeeze(1)
        v = xs2.index_select(0, act).to(torch.float64)
        k = act.numel()
        bad = ~torch.isfinite(v).all(dim=1)
        any_bad = bool(bad.any())
        if any_bad:
            v = v.masked_fill(bad.unsqueeze(1), 0.0)
        scale = 1.0
        if x.dtype == torch.float64 and float(v.abs().max()) > _F64_RESCALE_ABOVE:
            scale = 2.0**64  # y(x) = scale * y(x / scale) with eps * scale: exact powers of two
            v = v / scale
        e = eps * scale
        if v.device.type == "cpu" and _BLOCKS_IN_NUMPY:
            y, size, first = (torch.from_numpy(a) for a in _l2_values_np(v.numpy(), e))
        else:
            y, size, first = _l2_values(v, e)
        if scale != 1.0:
            y = y * scale
        y, size, first = y.reshape(k, n), size.reshape(k, n), first.reshape(k, n)
        if any_bad:
            y = y.masked_fill(bad.unsqueeze(1), math.nan)
            size = size.masked_fill(bad.unsqueeze(1), 0.0)
        # the rows that do not pool keep their sorted values, in blocks of one. y_all is a new tensor in
        # its final shape (a view returned by an autograd node could not be modified in place by the
        # caller), and contiguous (xs keeps the strides of x, whose leading dimensions may not merge)
        y_all = xs.clone(memory_format=torch.contiguous_format)
        y_all.view(rows, n).index_copy_(0, act, y.to(x.dtype))
        size_all = torch.ones(rows, n, dtype=torch.float64, device=x.device).index_copy_(0, act, size)
        first_all = torch.arange(n, device=x.device).expand(rows, n).index_copy(0, act, first)
        return y_all, perm, first_all.reshape(xs.shape), size_all.reshape(xs.shape)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, perm, first, size = output
        ctx.mark_non_differentiable(perm, first, size)
        ctx.save_for_backward(perm, first, size)

    @staticmethod
    def backward(ctx, grad_y: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        perm, first, size = ctx.saved_tensors
        if first.shape[-1] == 0:
            grad_sorted = grad_y
        elif grad_y.device.type == "cpu" and not torch.is_grad_enabled() and not functorch_active():
            n = grad_y.shape[-1]
            g = grad_y.detach().to(torch.float64).reshape(-1, n).numpy()
            mean = _block_mean_np(g, first.reshape(-1, n).numpy(), size.reshape(-1, n).numpy())
            grad_sorted = torch.from_numpy(mean).reshape(grad_y.shape).to(grad_y.dtype)
        else:  # also differentiable, for double backward
            n = grad_y.shape[-1]
            g = grad_y.to(torch.float64).reshape(-1, n)
            rows = g.shape[0]
            ids = (torch.arange(rows, device=g.device).unsqueeze(1) * n + first.reshape(rows, n)).reshape(-1)
            sums = torch.zeros(rows * n, dtype=torch.float64, device=g.device).index_add(0, ids, g.reshape(-1))
            sz = size.reshape(-1)
            mean = torch.where(sz > 0, sums.index_select(0, ids) / sz.clamp_min(1.0), math.nan)
            grad_sorted = mean.reshape(grad_y.shape).to(grad_y.dtype)
        return torch.zeros_like(grad_sorted).scatter(-1, perm, grad_sorted), None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x: Tensor, eps: float, check: bool, xs: Tensor | None = None, perm: Tensor | None = None):
        # Every leading dimension is already a batch of rows: move the mapped one to the front.
        # (Under torch.func the caller never passes a precomputed sort.)
        if in_dims[0] is None:
            return _L2SoftSort.apply(x, eps, check), (None, None, None, None)
        return _L2SoftSort.apply(x.movedim(in_dims[0], 0), eps, check), (0, 0, 0, 0)


class _L2SoftSortEager(torch.autograd.Function):
    """:class:`_L2SoftSort` without ``setup_context``, for calls outside ``torch.func`` transforms.

    ``Function.apply`` binds the arguments of a function that defines ``setup_context`` through
    ``inspect.signature`` on every call, tens of microseconds; this form skips that. Same forward,
    outputs, saved tensors and backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float, check: bool, xs: Tensor | None, perm: Tensor | None):
        out = _L2SoftSort.forward(x, eps, check, xs, perm)
        _L2SoftSort.setup_context(ctx, (x, eps, check, xs, perm), out)
        return out

    backward = _L2SoftSort.backward


def _use_kernel(x: Tensor) -> bool:
    """Whether the block search runs in the Triton kernel (CUDA tensors, triton installed)."""
    if not x.is_cuda:
        return False
    from otloss.ops import triton_available

    return triton_available()


def _forward_kernel(xs: Tensor, perm: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:class:`_L2SoftSort`'s outputs with the block search in the Triton kernel: no host synchronisation.

    Rows holding NaN or Inf are searched as zeros and come out NaN (size 0), as on the CPU. float64
    inputs are not rescaled here (that needs their maximum on the host): block sums of float64
    values beyond about 1e307 can overflow on this path.
    """
    from otloss.ops.soft_sort import l2_blocks_triton

    n = xs.shape[-1]
    rows = xs.numel() // n
    v = xs.reshape(rows, n).to(torch.float64)
    bad = ~torch.isfinite(v).all(dim=1, keepdim=True)
    v = torch.where(bad, 0.0, v)
    first, size = l2_blocks_triton(v, eps)
    ids = (torch.arange(rows, device=v.device).unsqueeze(1) * n + first).reshape(-1)
    sums = torch.zeros(rows * n, dtype=torch.float64, device=v.device).index_add(0, ids, v.reshape(-1))
    offset = torch.arange(n, dtype=torch.float64, device=v.device) - first - (size - 1) * 0.5
    y = (sums.index_select(0, ids) / size.reshape(-1)).reshape(rows, n) + offset / eps
    y = torch.where(bad, math.nan, y)
    size = torch.where(bad, 0.0, size)
    # y in its final shape and dtype as a new tensor, no view (the caller may modify it in place)
    return y.reshape(xs.shape).to(xs.dtype, copy=True), perm, first.reshape(xs.shape), size.reshape(xs.shape)


def _no_pooling(xs: Tensor, eps: float, x: Tensor, check: bool) -> bool:
    """Whether no block of the sorted rows ``xs`` pools, so the soft sort is ``xs`` itself.

    True when no gap reaches ``1 / eps`` with a margin for the rounding of the gaps (the
    general path decides the near misses exactly). A NaN or Inf anywhere makes some gap NaN
    or Inf, which fails the test, so the test doubles as the finiteness check of ``x`` when
    ``check`` is set: one reduction over the gaps, one host read.
    """
    if xs.shape[-1] == 1:
        if check:
            check_finite(x, "x")
        return True
    top = float((xs[..., 1:] - xs[..., :-1]).max())
    if top * eps * (1.0 + 2.0**-20) < 1.0:
        return True
    if check and not math.isfinite(top):
        check_finite(x, "x")  # raises unless only a gap between two finite values overflowed
    return False


def _soft_sort_l2(x: Tensor, eps: float, check: bool) -> Tensor:
    """l2 soft sort in the compute dtype; ``check``: raise on NaN/Inf (tested on real tensors, inside the node).

    On the CPU, when no block pools (the common case for small ``eps``), the result is the
    sort itself and its gradient the sort's own (permutation held fixed), with no custom node.
    Under ``torch.func`` transforms, and on CUDA with triton (block search in the kernel of
    :mod:`otloss.ops.soft_sort`, no host synchronisation unless ``check``), the whole
    computation goes through :class:`_L2SoftSort`, whose ``vmap`` rule maps over rows; outside
    transforms through its twin :class:`_L2SoftSortEager`, which ``Function.apply`` calls without
    binding the arguments through ``inspect``.
    """
    xc = x.to(compute_dtype(x.dtype))
    if functorch_active():
        return _L2SoftSort.apply(xc, eps, check)[0].to(x.dtype)
    if _use_kernel(xc):
        return _L2SoftSortEager.apply(xc, eps, check, None, None)[0].to(x.dtype)
    xs, perm = sort_with_index(xc)
    if _no_pooling(xs.detach(), eps, xc, check):
        return xs.to(x.dtype)
    return _L2SoftSortEager.apply(xc, eps, False, xs.detach(), perm)[0].to(x.dtype)


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
    *,
    validate_args: bool | None = None,
) -> Tensor:
    """Differentiable soft sort (ascending) along the last dimension.

    For ``regularization="l2"`` the result is the projection of the sorted row onto
    the vectors whose consecutive gaps are at most ``1 / eps`` (see the module
    docstring): exactly the hard sort when no gap of the sorted row reaches
    ``1 / eps``, the row mean as ``eps -> inf``.

    Args:
        x: values ``[..., n]``, floating point; every leading dimension is a batch
            of independent rows. float32 and float64 are computed in float64
            internally for the l2 built-in backend and returned in their dtype (a
            float32 result is the float64 result rounded once); bfloat16/float16
            are computed in float32 and returned in the input dtype.
        regularization_strength: ``eps > 0``, in units of 1 / (your values); any
            finite positive value is honoured, down to subnormal ones (which give
            the hard sort). ``0.1`` is the value of the AOT paper's code.
        regularization: ``"l2"`` (quadratic) or ``"kl"`` (entropic).
        backend: ``"otloss"`` (built in, no compile step) or ``"torchsort"``
            (requires the optional package: ``pip install "torch-otloss[soft]"``).
        validate_args: scan ``x`` for NaN/Inf and raise ``ValueError`` naming
            ``x``. ``None`` (the default) follows :func:`otloss.set_validate_args`.
            With the check off, the l2 built-in backend returns NaN for every
            position of a row (of length >= 2) that holds a NaN or an Inf, and a
            NaN gradient for that row; other rows are unaffected.

    Returns:
        A tensor of the shape and dtype of ``x``, non-decreasing along the last
        dimension, differentiable in ``x`` (also under ``torch.func.grad`` and
        ``torch.func.vmap`` for the l2 built-in backend).

    Raises:
        TypeError: ``x`` is not a floating-point tensor, or ``regularization_strength``
            is not a number.
        ValueError: ``x`` is empty or 0-dimensional, ``regularization_strength`` is
            not finite and positive, an unknown ``regularization`` or ``backend``,
            or (with checks on) ``x`` holds NaN or Inf.
    """
    return SoftSort(regularization_strength, regularization, backend)(x, validate_args=validate_args)


@dataclass(frozen=True)
class SoftSort:
    """A soft-sort configuration that can be passed as ``sort=`` to the otloss losses.

    ``sort="soft"`` means ``SoftSort()``: l2 regularisation with strength 0.1, the
    AOT paper's setting. See :func:`soft_sort` for the arguments; calling the object
    on ``x`` is ``soft_sort(x, ...)`` with its settings.
    """

    regularization_strength: float = 0.1
    regularization: Literal["l2", "kl"] = "l2"
    backend: Literal["otloss", "torchsort"] = "otloss"

    def __post_init__(self) -> None:
        eps = real_number(self.regularization_strength, "regularization_strength")
        if not eps > 0:
            raise ValueError(f"regularization_strength must be finite and > 0, got {eps}")
        if self.regularization not in ("l2", "kl"):
            raise ValueError(f"regularization must be 'l2' or 'kl', got {self.regularization!r}")
        if self.backend not in ("otloss", "torchsort"):
            raise ValueError(f"backend must be 'otloss' or 'torchsort', got {self.backend!r}")
        if self.backend == "torchsort" and not torchsort_available():
            raise ImportError(
                "SoftSort(backend='torchsort') needs the torchsort package: pip install 'torch-otloss[soft]' "
                "(or use backend='otloss', which needs no compile step)"
            )

    def __call__(self, x: Tensor, *, validate_args: bool | None = None) -> Tensor:
        """Soft sort of ``x [..., n]`` along the last dimension; see :func:`soft_sort`."""
        check_values_tensor(x, "x")
        check = resolve_validate(validate_args)
        eps = float(self.regularization_strength)
        if x.device.type == "meta":  # no values: a result of the right shape, dtype and autograd graph
            return torch.sort(x, dim=-1).values
        if self.backend == "otloss" and self.regularization == "l2":
            return _soft_sort_l2(x, eps, check)
        if check:
            check_finite(x, "x")
        if self.backend == "torchsort":
            return _soft_sort_torchsort(x, eps, self.regularization)
        return _soft_sort_kl(x, eps)
