"""FSD diagnostics for logging: violation measures and quantile margins."""

from __future__ import annotations

import numbers
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
    type_name,
)
from otloss.functional import fsd_violation

__all__ = ["DEFAULT_QUANTILES", "fsd_report", "quantile_function", "quantile_margins"]

DEFAULT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _level(x: numbers.Real, name: str) -> float:
    try:
        return float(x)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must lie in [0, 1], got an integer too large for a float") from None


def _levels(t: object, dtype: torch.dtype, device: torch.device, name: str = "t") -> Tensor:
    """Levels ``t`` as a 1-D real tensor in ``[0, 1]``: a real number, a sequence of them, or a real tensor."""
    if isinstance(t, (str, bytes)) or t is None or isinstance(t, bool):
        raise TypeError(
            f"{name} must be a real number, a sequence of real numbers or a real tensor, got {type_name(t)}"
        )
    if isinstance(t, Tensor):
        if t.is_complex() or t.dtype == torch.bool or t.layout != torch.strided:
            raise TypeError(f"{name} must be a real dense tensor, got {t.dtype} ({t.layout})")
        levels = t.detach().to(dtype=dtype)
    elif isinstance(t, numbers.Real):
        levels = torch.tensor([_level(t, name)], dtype=dtype)
    else:
        try:
            items = list(t)  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(
                f"{name} must be a real number, a sequence of real numbers or a real tensor, got {type_name(t)}"
            ) from None
        bad = [x for x in items if isinstance(x, bool) or not isinstance(x, numbers.Real)]
        if bad:
            raise TypeError(f"{name} must hold real numbers, got {type_name(bad[0])} {bad[0]!r}")
        levels = torch.tensor([_level(x, name) for x in items], dtype=dtype)
    if levels.dim() > 1:
        raise ValueError(f"{name} must be a number or 1-D, got shape {tuple(levels.shape)}")
    levels = levels.reshape(-1)
    if levels.numel() == 0:
        raise ValueError(f"{name} must hold at least one level")
    if levels.device.type == "meta":
        if torch.device(device).type != "meta":
            raise ValueError(f"{name} is on the meta device (no values) but the samples are on {device}")
        return levels
    # checked where they are, before the move: numbers are checked even for samples on the meta device
    if bool(((levels < 0) | (levels > 1) | torch.isnan(levels)).any()):
        raise ValueError(f"{name} must lie in [0, 1], got {levels.tolist()}")
    return levels.to(device)


def _quantiles(x: Tensor, t: Tensor, w: Tensor | None) -> Tensor:
    """Left-continuous quantiles of checked inputs; ``w`` normalised by its row maximum (no overflow)."""
    cdt = compute_dtype(x.dtype)
    with torch.no_grad():
        xs, perm = torch.sort(x.detach().to(cdt), dim=-1, stable=True)
        w = torch.ones_like(xs) if w is None else w.detach().to(cdt).gather(-1, perm)
        c = torch.cumsum(w, dim=-1)
        total = c[..., -1:]
        c = c / total
        tt = t.expand(*xs.shape[:-1], t.numel()).contiguous()
        idx = torch.searchsorted(c.contiguous(), tt, side="left")
        # Q(0) is the least atom of positive weight (the search at t = 0 would stop at a zero-weight one)
        idx = torch.maximum(idx, (c == 0).sum(-1, keepdim=True)).clamp_max(xs.shape[-1] - 1)
        q = xs.gather(-1, idx)
        # a row whose weights hold NaN or Inf, or sum to 0 (checks off), has no quantiles: NaN
        return q.masked_fill(~(torch.isfinite(total) & (total > 0)), float("nan")).to(x.dtype)


def quantile_function(
    x: Tensor, t: Tensor | Sequence[float] | float, weights: Tensor | None = None, *, validate_args: bool | None = None
) -> Tensor:
    """Left-continuous quantile ``Q(t) = inf{y : F(y) >= t}`` of the empirical measure of each row.

    Args:
        x: ``[..., n]`` atoms.
        t: levels in ``[0, 1]``: a real number, a sequence of them or a real 0-D/1-D
            tensor (``Q(0)`` is taken as the minimum). Strings, ``None``, booleans and
            complex numbers raise ``TypeError``.
        weights: optional ``[..., n]`` non-negative weights, normalised per row (divided
            by the row's largest weight first, so huge finite weights do not overflow).
        validate_args: as in :func:`otloss.ot_h_1d`.

    Returns:
        ``[..., len(t)]`` in the dtype of ``x`` (no gradient).
    """
    validate = resolve_validate(validate_args)
    check_values_tensor(x, "x")
    w = check_weights(weights, x, "weights", "x", validate)
    if validate:
        check_finite(x, "x")
    return _quantiles(x, _levels(t, compute_dtype(x.dtype), x.device), w)


def quantile_margins(
    u: Tensor,
    v: Tensor,
    t: Tensor | Sequence[float] | float = DEFAULT_QUANTILES,
    *,
    u_weights: Tensor | None = None,
    v_weights: Tensor | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    """``Q_u(t) - Q_v(t)`` at the given levels: negative entries are FSD violations.

    Args:
        u: ``[..., n]`` atoms.
        v: ``[..., m]`` atoms; the same leading dimensions as ``u`` (no broadcasting),
            dtype and device.
        t: levels, as in :func:`quantile_function`.
        u_weights: optional weights of ``u``, as in :func:`quantile_function`.
        v_weights: likewise for ``v``.
        validate_args: as in :func:`otloss.ot_h_1d`.

    Returns:
        ``[..., len(t)]`` in the dtype of ``u`` (no gradient).
    """
    validate = resolve_validate(validate_args)
    check_values_tensor(u, "u")
    check_values_tensor(v, "v")
    check_same_dtype_device(u, v, "u", "v")
    if u.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"u and v must have the same leading (batch) dimensions, got {tuple(u.shape)} and {tuple(v.shape)}"
        )
    a = check_weights(u_weights, u, "u_weights", "u", validate)
    b = check_weights(v_weights, v, "v_weights", "v", validate)
    if validate:
        check_finite(u, "u")
        check_finite(v, "v")
    levels = _levels(t, compute_dtype(u.dtype), u.device)
    return _quantiles(u, levels, a) - _quantiles(v, levels, b)


def fsd_report(u: Tensor, v: Tensor, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, float]:
    """Scalar FSD diagnostics of 1-D ``u`` over ``v`` for logging.

    Returns a dict with ``fsd_area``, ``fsd_w1``, ``fsd_w2`` (see
    :func:`otloss.fsd_violation`) and ``quantile_margin_<t>`` for each level (``t`` with six significant
    digits, or as many more as keep distinct levels apart).
    Values are checked as :func:`otloss.get_validate_args` says (NaN/Inf raise ``ValueError``).
    """
    check_values_tensor(u, "u")
    check_values_tensor(v, "v")
    if u.dim() != 1 or v.dim() != 1:
        raise ValueError(f"fsd_report takes 1-D u and v, got shapes {tuple(u.shape)} and {tuple(v.shape)}")
    u, v = u.detach(), v.detach()
    levels = _levels(quantiles, compute_dtype(u.dtype), u.device, "quantiles")
    out = {f"fsd_{m}": float(fsd_violation(u, v, m)) for m in ("area", "w1", "w2")}
    margins = quantile_margins(u, v, quantiles)
    qs = levels.tolist()
    for digits in (6, 7, 8, 9, 17):  # ``:g``'s six digits, more only when distinct levels would share a key
        keys = [f"quantile_margin_{q:.{digits}g}" for q in qs]
        if len(set(keys)) == len(set(qs)):
            break
    out.update(zip(keys, margins.tolist()))
    return out
