r"""Sliced optimal transport between point clouds in ``R^d``: ``sliced_ot`` and ``random_projections``.

The sliced cost of two empirical measures ``mu = sum_i a_i delta(x_i)`` and
``nu = sum_j b_j delta(y_j)`` in ``R^d`` is the mean over directions ``theta_1 .. theta_L``
of the one-dimensional ``OT_h`` between their projections,

``SOT_h(mu, nu) = (1 / L) sum_l OT_h(<theta_l, x>, <theta_l, y>)``,

each term computed exactly by sorting (:func:`otloss.ot_h_1d`). With ``h = abs_pow(p)``
and random unit directions this is the Monte Carlo estimate of the sliced
Wasserstein distance to the power ``p`` (Bonneel et al., "Sliced and Radon Wasserstein
Barycenters of Measures", 2015): POT's ``ot.sliced_wasserstein_distance(..., p=p)``
returns its ``p``-th root.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from otloss._validation import (
    check_finite,
    check_same_dtype_device,
    check_values_tensor,
    check_weights,
    compute_dtype,
    resolve_validate,
)
from otloss.costs import get_cost
from otloss.functional import Backend, CostArg, Reduction, ot_h_1d

__all__ = ["DEFAULT_N_PROJECTIONS", "random_projections", "sliced_ot"]

#: directions drawn when neither ``projections`` nor ``n_projections`` is given (POT's default too)
DEFAULT_N_PROJECTIONS = 50


def _check_count(n: object, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"{name} must be a positive int, got {n}")
    return int(n)


def _check_generator(generator: object, device: torch.device) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = torch.device(generator.device)
    same = gdev.type == device.type and (gdev.index or 0) == (device.index or 0)
    if not same:
        raise ValueError(
            f"generator must be on the device of the samples ({device}), got a generator on {gdev}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )
    return generator


def random_projections(
    n_projections: int,
    d: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Directions drawn uniformly on the unit sphere of ``R^d``: normalised standard Gaussian vectors.

    :func:`sliced_ot` draws its random directions with this function, so
    ``sliced_ot(x, y, cost, n_projections=L, generator=g)`` equals
    ``sliced_ot(x, y, cost, projections=random_projections(L, d, generator=g2))``
    when ``g`` and ``g2`` are in the same state. POT takes projections as ``[d, L]``:
    pass it ``random_projections(L, d).T``.

    Args:
        n_projections: the number of directions ``L`` (a positive int).
        d: the dimension (a positive int).
        generator: the random stream; ``None`` uses torch's global one for ``device``.
            Must be on ``device``.
        device: where to draw; ``None`` is the generator's device, else the CPU.
        dtype: a floating dtype; ``None`` is torch's default dtype. The draw is in
            float32 or float64 (float32 for half types), then cast.

    Returns:
        A ``[n_projections, d]`` tensor whose rows have unit Euclidean norm.
    """
    n_projections = _check_count(n_projections, "n_projections")
    d = _check_count(d, "d")
    if device is None:
        device = torch.device(generator.device) if isinstance(generator, torch.Generator) else torch.device("cpu")
    device = torch.device(device)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    generator = _check_generator(generator, device)
    return _draw(n_projections, d, generator, device, compute_dtype(dtype)).to(dtype)


def _draw(n: int, d: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    theta = torch.randn(n, d, generator=generator, device=device, dtype=dtype)
    # a Gaussian vector has norm 0 with probability 0; normalize's eps keeps such a row at 0 rather than NaN
    return F.normalize(theta, dim=-1)


def _check_projections(p: object, x: Tensor) -> Tensor:
    batch, d = x.shape[:-2], x.shape[-1]
    if not isinstance(p, Tensor):
        raise TypeError(f"projections must be a torch.Tensor of shape [L, d] or None, got {type(p).__name__}")
    if p.dim() < 2 or p.shape[-1] != d or p.shape[-2] < 1:
        raise ValueError(
            f"projections must have shape [L, {d}] with L >= 1 (one direction per row, d = x.shape[-1]), "
            f"got {tuple(p.shape)}"
        )
    if p.dim() > 2 and p.shape[:-2] != batch:
        raise ValueError(
            f"batched projections must have shape [*batch, L, d] with the batch dimensions of x {tuple(batch)}, "
            f"got {tuple(p.shape)}; pass [L, d] to share the directions across the batch"
        )
    check_same_dtype_device(x, p, "x", "projections")
    return p


def _check_values(x: Tensor, y: Tensor, p: Tensor | None, u: Tensor, v: Tensor) -> None:
    """One host sync when everything is finite; otherwise name the culprit. Meta tensors have no values to check."""
    if x.device.type == "meta":
        return
    ok = torch.isfinite(x).all() & torch.isfinite(y).all() & torch.isfinite(u).all() & torch.isfinite(v).all()
    if p is not None:
        ok = ok & torch.isfinite(p).all()
    if bool(ok):
        return
    check_finite(x, "x")
    check_finite(y, "y")
    if p is not None:
        check_finite(p, "projections")
    raise ValueError(
        f"the projections of x or y onto the directions overflow {u.dtype} (largest |x| {float(x.abs().max()):.3g}, "
        f"|y| {float(y.abs().max()):.3g}); rescale the samples"
    )


def sliced_ot(
    x: Tensor,
    y: Tensor,
    cost: CostArg,
    *,
    projections: Tensor | None = None,
    n_projections: int | None = None,
    generator: torch.Generator | None = None,
    u_weights: Tensor | None = None,
    v_weights: Tensor | None = None,
    reduction: Reduction = "mean",
    validate_args: bool | None = None,
    backend: Backend = "auto",
) -> Tensor:
    r"""Sliced optimal-transport cost: the mean over directions of ``OT_h`` between projected samples.

    ``sliced_ot(x, y, h) = (1 / L) sum_l OT_h(x @ theta_l, y @ theta_l)``, where
    ``OT_h`` is :func:`otloss.ot_h_1d` (exact, by sorting). The ``L`` one-dimensional
    problems of every batch element are solved in one batched ``ot_h_1d`` call over
    ``[..., L, n]`` rows (the batched-rows kernel on a GPU when it applies).

    With ``cost=abs_pow(p)`` and random directions this estimates the sliced
    Wasserstein distance to the power ``p``: POT's
    ``ot.sliced_wasserstein_distance(x, y, a, b, p=p, projections=P.T)`` equals
    ``sliced_ot(x, y, abs_pow(p), projections=P, u_weights=a, v_weights=b) ** (1 / p)``.

    Args:
        x: ``[n, d]`` samples of ``mu``, or ``[*batch, n, d]`` for a batch of
            independent problems.
        y: ``[m, d]`` samples of ``nu`` (``[*batch, m, d]``); same ``d``, batch
            dimensions, dtype and device as ``x``. ``n != m`` is allowed.
        cost: a :class:`~otloss.Cost`, a built-in name or a callable ``h(z)`` with
            ``z = <theta, x> - <theta, y>``, as in :func:`otloss.ot_h_1d`. ``abs_pow(p)``
            gives ``SW_p^p``. A cost that is not even (``h(z) != h(-z)``, such as
            ``logistic``) gives different values for ``theta`` and ``-theta``.
        projections: ``[L, d]`` directions, one per row, shared by the batch, or
            ``[*batch, L, d]``; same dtype and device as ``x``. Used as given: rows
            are **not** normalised, so a row of norm ``r`` scales that direction's
            projected samples by ``r`` (and its ``abs_pow(p)`` term by ``r**p``).
            ``None`` (default) draws random unit directions with
            :func:`random_projections`, shared by the batch.
        n_projections: the number of random directions ``L``; ``None`` means
            :data:`DEFAULT_N_PROJECTIONS` (50). Only without ``projections``.
        generator: the random stream of the directions (a ``torch.Generator`` on the
            device of ``x``); ``None`` uses torch's global one. Only without
            ``projections``.
        u_weights: optional ``[n]`` (or ``[*batch, n]``) non-negative weights of the
            samples of ``x``, normalised per problem; ``None`` is uniform.
        v_weights: likewise for ``y``.
        reduction: over the batch dimensions: ``"mean"`` (default), ``"sum"`` or
            ``"none"`` (a ``[*batch]`` tensor). The mean over directions is part of
            the definition and always taken; a single problem gives a scalar.
        validate_args: check ``x``, ``y``, ``projections`` and the projected values
            for NaN/Inf and the weights for negativity (host syncs on a GPU); ``None``
            uses :func:`otloss.get_validate_args`. When off, a non-finite input gives
            a non-finite result and no error.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, as in :func:`otloss.ot_h_1d`.

    Returns:
        A tensor in the dtype of ``x``. The projections and the transport are
        computed in float32 (float64 for float64 input, float32 for float16 and
        bfloat16). Differentiable in ``x``, ``y``, ``projections`` and the weights.
        Values follow IEEE arithmetic: a cost that overflows gives ``inf``.

    Raises:
        TypeError: a non-tensor, non-floating or mismatched-dtype input, a bad
            ``n_projections`` or ``generator`` type.
        ValueError: fewer than 2 dimensions, an empty ``x`` or ``y``, different ``d``
            or batch dimensions, bad ``projections`` shape, ``projections`` together
            with ``n_projections`` or ``generator``, a generator on another device,
            NaN/Inf values, overflowing projections, bad weights, an unknown
            ``reduction``.
    """
    validate = resolve_validate(validate_args)
    check_values_tensor(x, "x", min_dim=2)
    check_values_tensor(y, "y", min_dim=2)
    check_same_dtype_device(x, y, "x", "y")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"x and y must have the same dimension d (last axis), got x of shape {tuple(x.shape)} "
            f"and y of shape {tuple(y.shape)}"
        )
    if x.shape[:-2] != y.shape[:-2]:
        raise ValueError(
            f"x and y must have the same batch dimensions, got x of shape {tuple(x.shape)} and y of shape "
            f"{tuple(y.shape)}"
        )
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    cost = get_cost(cost)
    if projections is not None:
        if n_projections is not None:
            raise ValueError("pass either projections or n_projections, not both (L is projections.shape[-2])")
        if generator is not None:
            raise ValueError("generator draws random directions; it cannot be used with given projections")
        _check_projections(projections, x)
    else:
        n_projections = DEFAULT_N_PROJECTIONS if n_projections is None else _check_count(n_projections, "n_projections")
        generator = _check_generator(generator, x.device)
    # weights of the samples: [*batch, n] against the sample axis of x, then one row per direction
    a = check_weights(u_weights, x[..., 0], "u_weights", "the samples of x [*batch, n]", validate)
    b = check_weights(v_weights, y[..., 0], "v_weights", "the samples of y [*batch, m]", validate)

    cdt = compute_dtype(x.dtype)
    xc, yc = x.to(cdt), y.to(cdt)
    if projections is None:
        theta = _draw(n_projections, x.shape[-1], generator, x.device, cdt)
    else:
        theta = projections.to(cdt)
    # [L, d] @ [*batch, d, n] -> [*batch, L, n]: row l holds the samples projected on direction l
    u = torch.matmul(theta, xc.mT)
    v = torch.matmul(theta, yc.mT)
    if validate:
        _check_values(x, y, projections, u, v)
    rows = ot_h_1d(
        u,
        v,
        cost,
        u_weights=None if a is None else a.unsqueeze(-2),
        v_weights=None if b is None else b.unsqueeze(-2),
        reduction="none",
        validate_args=False,  # every value was checked above, under the caller's names
        backend=backend,
    )
    value = rows.mean(dim=-1)
    if value.dim() > 0 and reduction == "mean":
        value = value.mean()
    elif value.dim() > 0 and reduction == "sum":
        value = value.sum()
    return value.to(x.dtype)
