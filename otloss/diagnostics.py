"""FSD diagnostics for logging: violation measures and quantile margins."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from otloss._validation import (
    check_finite,
    check_same_dtype_device,
    check_values_tensor,
    check_weights,
    compute_dtype,
    resolve_validate,
)
from otloss.functional import fsd_violation

__all__ = ["DEFAULT_QUANTILES", "fsd_report", "quantile_function", "quantile_margins"]

DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def quantile_function(
    x: Tensor, t: Tensor | Sequence[float], weights: Tensor | None = None, *, validate_args: bool | None = None
) -> Tensor:
    """Left-continuous quantile ``Q(t) = inf{y : F(y) >= t}`` of the empirical measure of each row.

    Args:
        x: ``[..., n]`` atoms.
        t: levels in ``[0, 1]`` (``Q(0)`` is taken as the minimum).
        weights: optional ``[..., n]`` non-negative weights, normalised per row.
        validate_args: as in :func:`otloss.ot_h_1d`.

    Returns:
        ``[..., len(t)]`` in the dtype of ``x`` (no gradient).
    """
    validate = resolve_validate(validate_args)
    check_values_tensor(x, "x")
    w = check_weights(weights, x, "weights", "x", validate)
    if validate:
        check_finite(x, "x")
    cdt = compute_dtype(x.dtype)
    t = torch.as_tensor(t, dtype=cdt, device=x.device).reshape(-1)
    if t.numel() == 0:
        raise ValueError("t must hold at least one level")
    if bool(((t < 0) | (t > 1) | torch.isnan(t)).any()):
        raise ValueError(f"t must lie in [0, 1], got {t.tolist()}")
    with torch.no_grad():
        xs, perm = torch.sort(x.to(cdt), dim=-1, stable=True)
        w = torch.ones_like(xs) if w is None else w.to(cdt).gather(-1, perm)
        c = torch.cumsum(w, dim=-1)
        c = c / c[..., -1:]
        tt = t.expand(*xs.shape[:-1], t.numel()).contiguous()
        idx = torch.searchsorted(c.contiguous(), tt, side="left").clamp(0, xs.shape[-1] - 1)
        return xs.gather(-1, idx).to(x.dtype)


def quantile_margins(u: Tensor, v: Tensor, t: Tensor | Sequence[float] = DEFAULT_QUANTILES) -> Tensor:
    """``Q_u(t) - Q_v(t)`` at the given levels: negative entries are FSD violations."""
    check_values_tensor(u, "u")
    check_values_tensor(v, "v")
    check_same_dtype_device(u, v, "u", "v")
    return quantile_function(u, t) - quantile_function(v, t)


def fsd_report(u: Tensor, v: Tensor, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, float]:
    """Scalar FSD diagnostics of 1-D ``u`` over ``v`` for logging.

    Returns a dict with ``fsd_area``, ``fsd_w1``, ``fsd_w2`` (see
    :func:`otloss.fsd_violation`) and ``quantile_margin_<t>`` for each level.
    """
    check_values_tensor(u, "u")
    check_values_tensor(v, "v")
    if u.dim() != 1 or v.dim() != 1:
        raise ValueError(f"fsd_report takes 1-D u and v, got shapes {tuple(u.shape)} and {tuple(v.shape)}")
    u, v = u.detach(), v.detach()
    out = {f"fsd_{m}": float(fsd_violation(u, v, m)) for m in ("area", "w1", "w2")}
    margins = quantile_margins(u, v, quantiles)
    for q, d in zip(quantiles, margins.tolist()):
        out[f"quantile_margin_{q:g}"] = d
    return out
