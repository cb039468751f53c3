"""The monotone (quantile, north-west-corner) optimal coupling on the real line.

For a convex cost ``h(u - v)`` the coupling that pairs the ``t``-quantile of ``mu``
with the ``t``-quantile of ``nu`` for every ``t in (0, 1]`` is optimal
(Santambrogio 2015, Thm 2.9). For empirical measures it is found by merging the
two cumulative-weight sequences: each merged interval ``(t_{k-1}, t_k]`` carries
mass ``t_k - t_{k-1}`` from one sorted ``u`` atom to one sorted ``v`` atom.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from otloss._validation import check_pair, compute_dtype, resolve_validate, type_name

__all__ = ["Coupling", "quantile_coupling"]


class _Plan(NamedTuple):
    u_index: Tensor
    v_index: Tensor
    mass: Tensor


def _size(x: object, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type_name(x)}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")
    return int(x)


class Coupling(_Plan):
    """A sparse transport plan: ``mass[k]`` moves from ``u[u_index[k]]`` to ``v[v_index[k]]``.

    Indices point into the original (unsorted) inputs along the last dimension;
    entries are listed in increasing quantile order. Masses sum to 1 per row.
    A named tuple of ``(u_index, v_index, mass)``; a plan made by
    :func:`quantile_coupling` also remembers the sizes ``n`` and ``m`` of ``u`` and ``v``
    (``None`` for a plan built by hand).
    """

    def __new__(
        cls, u_index: Tensor, v_index: Tensor, mass: Tensor, *, n: int | None = None, m: int | None = None
    ) -> Coupling:
        self = super().__new__(cls, u_index, v_index, mass)
        self.n = None if n is None else _size(n, "n")
        self.m = None if m is None else _size(m, "m")
        return self

    # Built without __new__ (by the named tuple's _make): the sizes are unknown, as for a plan built by hand.
    n: int | None = None
    m: int | None = None

    def _check_fields(self) -> None:
        """A plan built by hand: tensors, integer indices, floating masses, one shape for the three."""
        for field in ("u_index", "v_index", "mass"):
            value = getattr(self, field)
            if not isinstance(value, Tensor):
                raise TypeError(f"{field} must be a torch.Tensor, got {type_name(value)}")
        for field in ("u_index", "v_index"):
            index = getattr(self, field)
            if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
                raise TypeError(f"{field} must hold integer indices, got {index.dtype}")
        if not self.mass.is_floating_point():
            raise TypeError(f"mass must have a floating-point dtype, got {self.mass.dtype}")
        if not self.u_index.shape == self.v_index.shape == self.mass.shape:
            raise ValueError(
                "u_index, v_index and mass must have one shape, got "
                f"{tuple(self.u_index.shape)}, {tuple(self.v_index.shape)} and {tuple(self.mass.shape)}"
            )

    def _replace(self, **fields: Tensor) -> Coupling:
        """A copy with some of ``u_index``, ``v_index``, ``mass`` replaced; the sizes are kept."""
        return type(self)(**{**self._asdict(), **fields}, n=self.n, m=self.m)

    def to_dense(self, n: int | None = None, m: int | None = None) -> Tensor:
        """The plan as a dense ``[..., n, m]`` matrix (the layout of POT's ``ot.emd``).

        Args:
            n: the size of ``u``; ``None`` takes the size the plan remembers. A size
                that differs from the remembered one raises ``ValueError`` (so swapped
                sizes cannot give a wrong plan), and so does one that an index exceeds.
            m: likewise for ``v``.
        """
        self._check_fields()
        sizes = []
        for given, known, name, index in ((n, self.n, "n", self.u_index), (m, self.m, "m", self.v_index)):
            if given is None and known is None:
                raise ValueError(f"{name} is needed: this plan was built by hand and does not know its sizes")
            size = known if given is None else _size(given, name)
            if known is not None and size != known:
                raise ValueError(
                    f"{name}={size} but the plan was made for n={self.n}, m={self.m} "
                    "(to_dense takes the size of u, then the size of v)"
                )
            if index.numel() and int(index.max()) >= size:
                raise ValueError(f"{name}={size} is too small for this plan: an index is {int(index.max())}")
            if index.numel() and int(index.min()) < 0:
                field = "u_index" if name == "n" else "v_index"
                raise ValueError(f"{field} must be non-negative, got {int(index.min())}")
            sizes.append(size)
        n, m = sizes
        batch = self.mass.shape[:-1]
        dense = torch.zeros((*batch, n * m), dtype=self.mass.dtype, device=self.mass.device)
        flat = self.u_index * m + self.v_index
        dense = dense.scatter_add(-1, flat, self.mass)
        return dense.reshape(*batch, n, m)


def _cumulative(w: Tensor) -> Tensor:
    """Normalised cumulative weights with the last entry exactly 1 (NaN for a row whose total is not finite and > 0).

    The last entry is ``total / total`` without gradient: exactly 1 in IEEE arithmetic for a finite
    positive total, and NaN when the row's weights hold a NaN or an Inf or sum to 0 (checks off), so
    that such a row gives NaN rather than a plan that ignores the bad weight.
    """
    c = torch.cumsum(w, dim=-1)
    total = c[..., -1:]
    last = total.detach() / total.detach()
    return torch.cat([(c / total)[..., :-1], last], dim=-1)


def merge_sorted_weights(a_sorted: Tensor, b_sorted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """North-west-corner merge of two weight rows given in sorted-support order.

    Args:
        a_sorted: ``[..., n]`` non-negative weights of the sorted ``u`` atoms.
        b_sorted: ``[..., m]`` likewise for ``v``.

    Returns:
        ``(iu, iv, mass)``, each ``[..., n + m - 1]``: positions in the sorted rows
        and the mass of each merged quantile interval (some masses may be 0).
    """
    n, m = a_sorted.shape[-1], b_sorted.shape[-1]
    A = _cumulative(a_sorted)
    B = _cumulative(b_sorted)
    t, _ = torch.sort(torch.cat([A, B], dim=-1), dim=-1)
    t = t[..., :-1]  # the two largest breakpoints are both exactly 1
    mass = torch.diff(t, dim=-1, prepend=torch.zeros_like(t[..., :1]))
    td = t.detach().contiguous()
    iu = torch.searchsorted(A.detach().contiguous(), td, side="left").clamp_max(n - 1)
    iv = torch.searchsorted(B.detach().contiguous(), td, side="left").clamp_max(m - 1)
    return iu, iv, mass


def merged_cost(mass: Tensor, hz: Tensor) -> Tensor:
    """``sum_k mass_k h(z_k)`` over the merged intervals, with ``0 * h = 0`` on zero-mass intervals.

    A zero-mass interval either pairs the same two atoms as the positive-mass interval it closes, or
    (at ``t = 0``) pairs an atom of zero weight, which is what carries the derivative with respect to
    that weight. When such a term's cost overflows, IEEE arithmetic gives ``0 * inf = NaN``: those terms
    count 0 instead, so an overflow on an atom of zero weight leaves the cost finite, and an overflow on
    a pair that carries mass gives ``inf``. Terms whose cost is finite are unchanged, values and
    gradients; a NaN cost (a NaN input with checks off) still gives NaN.
    """
    terms = mass * hz
    return torch.where((mass == 0) & torch.isinf(hz), torch.zeros_like(terms), terms).sum(dim=-1)


def quantile_coupling(
    u: Tensor,
    v: Tensor,
    u_weights: Tensor | None = None,
    v_weights: Tensor | None = None,
    *,
    validate_args: bool | None = None,
) -> Coupling:
    """The optimal plan between ``sum_i a_i delta(u_i)`` and ``sum_j b_j delta(v_j)`` for any convex ``h(u - v)``.

    Args:
        u: ``[..., n]`` support of the first measure (each leading index a separate problem).
        v: ``[..., m]`` support of the second; leading dimensions equal to ``u``'s.
        u_weights: ``[..., n]`` (or broadcastable) non-negative weights, normalised per
            row; ``None`` is uniform.
        v_weights: likewise for ``v``.
        validate_args: check values and weights (NaN/Inf, negativity); ``None`` uses
            :func:`otloss.get_validate_args`.

    Weights are divided by their row's largest entry before any cast or cumulative
    sum, so huge finite weights (``1e38`` in float32, ``1e300`` float64 weights with
    float32 values) give the same plan as moderate ones.

    Returns:
        A :class:`Coupling` that knows ``n`` and ``m``. For 1-D inputs zero-mass entries are dropped, so equal-size
        uniform inputs give exactly ``n`` pairs ``(argsort(u)[i], argsort(v)[i], 1/n)``.
        For batched inputs every row has ``n + m - 1`` entries, zero-mass ones included.
        ``mass`` is differentiable in the weights; the plan's cost
        ``(mass * h(u[u_index] - v[v_index])).sum(-1)`` is differentiable in ``u`` and ``v``.
    """
    a, b = check_pair(u, v, u_weights, v_weights, resolve_validate(validate_args))
    cdt = compute_dtype(u.dtype)
    _, pu = torch.sort(u.detach(), dim=-1, stable=True)
    _, pv = torch.sort(v.detach(), dim=-1, stable=True)
    a = torch.ones(u.shape, dtype=cdt, device=u.device) if a is None else a.to(cdt).gather(-1, pu)
    b = torch.ones(v.shape, dtype=cdt, device=v.device) if b is None else b.to(cdt).gather(-1, pv)
    iu, iv, mass = merge_sorted_weights(a, b)
    u_index = pu.gather(-1, iu)
    v_index = pv.gather(-1, iv)
    if u.dim() == 1:
        if mass.device.type == "meta":
            raise ValueError(
                "quantile_coupling of 1-D meta tensors: the number of pairs depends on the values, which meta "
                "tensors do not have; pass [1, n] and [1, m] rows for a plan of fixed width n + m - 1"
            )
        keep = mass > 0
        u_index, v_index, mass = u_index[keep], v_index[keep], mass[keep]
    return Coupling(u_index, v_index, mass, n=u.shape[-1], m=v.shape[-1])
