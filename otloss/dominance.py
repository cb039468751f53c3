r"""Stochastic dominance as a statistic, a test, a ranking and a loss, in one dimension and in many.

Following "Multivariate Stochastic Dominance via Optimal Transport and Applications to Models Benchmarking"
(Rioux, Nitsure, Rigotti, Greenewald and Mroueh, arXiv 2406.06425): ``x`` (samples of a model's metrics, ``[n, d]``)
dominates ``y`` in the first order when some coupling has ``X >= Y`` componentwise almost surely. With the
coordinatewise cost ``c(x, y) = sum_k h(x_k - y_k)``, ``h`` a penalty of ``z < 0``, the **violation ratio**

``ratio(x, y) = OT_c(x, y) / (OT_c(x, y) + OT_c(y, x))``

is ``0`` when ``x`` dominates ``y`` and satisfies ``ratio(x, y) + ratio(y, x) = 1``. In one dimension ``OT_c`` is
solved exactly by sorting (:func:`otloss.ot_h_1d`); in several it is the entropic transport cost
(:func:`otloss.entropic_ot`) with strength ``epsilon`` in the units of the cost. With the default
``h(z) = max(-z, 0)^2`` the 1-D ratio is the W2 almost-stochastic-dominance ratio
``int (F^-1 - G^-1)_-^2 / W2^2``.

Second order (SSD, 1-D only) replaces the quantile functions by their integrals ``L(t) = int_0^t F^-1``
(generalised Lorenz curves): ``int (L_x - L_y)_-^2 / int (L_x - L_y)^2``.

The choices otloss makes where the paper leaves room are listed in ``docs/dominance.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from otloss._validation import (
    check_dense_float,
    check_finite,
    check_weight_values,
    compute_dtype,
    integer,
    normalise_weights,
    real_number,
    resolve_validate,
)
from otloss.costs import Cost, get_cost
from otloss.entropic import _sinkhorn_torch, _warn_unless_converged, entropic_ot
from otloss.functional import ot_h_1d

if TYPE_CHECKING:  # matplotlib is optional: imported when a plot is drawn
    from matplotlib.axes import Axes

__all__ = [
    "DominanceResult",
    "RankingResult",
    "dominance_cost_matrices",
    "dominance_test",
    "multivariate_aot_loss",
    "plot_dominance",
    "rank_models",
    "violation_ratio",
]

CostArg = str | Cost

#: The paper's entropic strength per metric: ``epsilon = 0.01 * d`` for ``d`` metrics (in cost units).
EPS_PER_METRIC = 0.01


# --------------------------------------------------------------------------------------------------- validation
def _check_samples(x: object, name: str, min_n: int = 2) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense_float(x, name)
    if x.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [n] (one metric) or [n, d] (d metrics), got {tuple(x.shape)}")
    if x.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} samples (n >= {min_n}), got shape {tuple(x.shape)}")
    if x.dim() == 2 and x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one metric (d >= 1), got shape {tuple(x.shape)}")
    return x


def _check_pair(x: object, y: object, validate: bool) -> tuple[Tensor, Tensor]:
    x = _check_samples(x, "x")
    y = _check_samples(y, "y")
    if x.dim() != y.dim():
        raise ValueError(f"x and y must both be [n] or both be [n, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() == 2 and x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of metrics d, got {x.shape[1]} and {y.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if validate:
        check_finite(x, "x")
        check_finite(y, "y")
    return x, y


def _resolve_cost(cost: object, beta: float | None) -> Cost:
    if isinstance(cost, Cost):
        if beta is not None:
            raise ValueError("beta configures a cost given by name; a Cost carries its own parameters")
        return cost
    if not isinstance(cost, str):
        raise TypeError(f"cost must be a name or an otloss Cost, got {type(cost).__name__}")
    names = ("squared_hinge", "hinge", "logistic", "zero_one")
    if cost not in names:
        raise ValueError(f"cost must be one of {list(names)} or an otloss Cost, got {cost!r}")
    if cost == "zero_one":
        if beta is not None:
            raise ValueError("zero_one takes no beta")
        return get_cost("zero_one")
    default = 1.0 if cost == "logistic" else 0.0
    return get_cost(cost, beta=default if beta is None else beta)


def _ratio_dtype(dtype: torch.dtype, multivariate: bool) -> torch.dtype:
    """float64 for the exact 1-D ratios, the compute dtype for the entropic ones.

    A 1-D ratio sorts ``n + m`` numbers: in float64 the costs of float32 samples (squares of
    differences from ``1e-45`` to ``3e38``) neither underflow to a false tie ``0 / 0`` nor overflow.
    The entropic ratio works on ``n x m`` cost matrices, kept in the compute dtype for memory.
    """
    return compute_dtype(dtype) if multivariate else torch.float64


def _check_entropic_cost(h: Cost, multivariate: bool) -> None:
    if multivariate and h.name == "zero_one":
        raise ValueError(
            "cost='zero_one' (the area ratio) is for [n] inputs, solved exactly by sorting; [n, d] inputs and "
            "aggregate='multivariate' use the entropic solver: pass a hinge, squared hinge or logistic cost"
        )


def _resolve_eps(epsilon: object, d: int, multivariate: bool) -> float:
    if not multivariate:
        if epsilon is not None:
            raise ValueError(
                "epsilon applies to [n, d] inputs; [n] inputs are solved exactly by sorting "
                "(pass x[:, None] and y[:, None] for the entropic solver)"
            )
        return 0.0
    if epsilon is None:
        return EPS_PER_METRIC * d
    eps = real_number(epsilon, "epsilon")
    if eps < 0:
        raise ValueError(f"epsilon must be finite and >= 0, got {eps}")
    return eps


def _refuse_meta(x: Tensor, name: str, what: str) -> None:
    if x.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device, which holds no values: {what} reports numbers computed from them"
        )


def _check_order(order: object, multivariate: bool) -> int:
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 (first-order dominance) or 2 (second order), got {order!r}")
    if order == 2 and multivariate:
        raise ValueError("order=2 (second-order dominance) is implemented for [n] inputs only")
    return int(order)


def _safe_ratio(fwd: Tensor, rev: Tensor) -> Tensor:
    """``fwd / (fwd + rev)``; ``0.5`` where both are zero (the two samples are tied), NaN where either is NaN."""
    tot = fwd + rev
    tied = torch.where(tot == 0, torch.full_like(tot, 0.5), torch.full_like(tot, float("nan")))
    return torch.where(tot > 0, fwd / torch.where(tot > 0, tot, torch.ones_like(tot)), tied)


# --------------------------------------------------------------------------------------------------- statistics
def dominance_cost_matrices(x: Tensor, y: Tensor, cost: Cost) -> Tensor:
    """``[2, n, m]``: ``C[0, i, j] = sum_k h(x_ik - y_jk)`` and ``C[1, i, j] = sum_k h(y_jk - x_ik)``.

    Built one metric at a time, so memory stays ``O(n m)`` whatever ``d``.

    Args:
        x: ``[n, d]`` samples.
        y: ``[m, d]`` samples, same ``d``.
        cost: the coordinate penalty ``h``.
    """
    C = x.new_zeros((2, x.shape[0], y.shape[0]))
    for k in range(x.shape[1]):
        z = x[:, k, None] - y[None, :, k]
        C[0] = C[0] + cost(z)
        C[1] = C[1] + cost(-z)
    return C


def _ssd_ratio_rows(x: Tensor, y: Tensor, wx: Tensor | None, wy: Tensor | None) -> Tensor:
    """Second-order ratio for rows ``x [R, n]``, ``y [R, m]`` (weights normalised per row), exact piecewise."""
    n = x.shape[1]
    m = y.shape[1]
    wx = torch.full_like(x, 1.0 / n) if wx is None else wx / wx.sum(-1, keepdim=True)
    wy = torch.full_like(y, 1.0 / m) if wy is None else wy / wy.sum(-1, keepdim=True)

    def lorenz(v: Tensor, w: Tensor, t: Tensor) -> Tensor:
        vs, order = torch.sort(v, dim=-1)
        ws = torch.gather(w, -1, order)
        c = torch.cumsum(ws, -1)
        c = c / c[..., -1:]
        S = torch.cumsum(ws * vs, -1)
        c_prev = torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1]], -1)
        S_prev = torch.cat([torch.zeros_like(S[..., :1]), S[..., :-1]], -1)
        k = torch.searchsorted(c.contiguous(), t.contiguous()).clamp_max(v.shape[-1] - 1)
        return torch.gather(S_prev, -1, k) + torch.gather(vs, -1, k) * (t - torch.gather(c_prev, -1, k))

    def cum(w: Tensor) -> Tensor:
        c = torch.cumsum(w, -1)
        return c / c[..., -1:]

    t = torch.sort(torch.cat([torch.zeros_like(x[:, :1]), cum(wx), cum(wy)], -1), dim=-1).values
    D = lorenz(x, wx, t) - lorenz(y, wy, t)  # [R, n + m + 1]; linear between knots
    d0, d1, length = D[:, :-1], D[:, 1:], (t[:, 1:] - t[:, :-1]).clamp_min(0)
    full = length * (d0 * d0 + d0 * d1 + d1 * d1) / 3  # int of D^2 over the segment
    both_neg = (d0 <= 0) & (d1 <= 0)
    cross = (d0 * d1) < 0
    neg_end = torch.minimum(d0, d1)
    span = (d0 - d1).abs()
    frac = torch.where(cross, neg_end.abs() / torch.where(cross, span, torch.ones_like(span)), torch.zeros_like(span))
    neg = torch.where(both_neg, full, torch.where(cross, length * frac * neg_end * neg_end / 3, torch.zeros_like(full)))
    return _safe_ratio(neg.sum(-1), (full - neg).sum(-1))


def _ratio_rows_1d(
    x: Tensor, y: Tensor, cost: Cost, order: int, wx: Tensor | None = None, wy: Tensor | None = None
) -> Tensor:
    """Ratios of rows ``x [R, n]`` and ``y [R, m]`` (exact), ``[R]``."""
    if order == 2:
        return _ssd_ratio_rows(x, y, wx, wy)
    fwd = ot_h_1d(x, y, cost, u_weights=wx, v_weights=wy, reduction="none", validate_args=False)
    rev = ot_h_1d(y, x, cost, u_weights=wy, v_weights=wx, reduction="none", validate_args=False)
    return _safe_ratio(fwd, rev)


def _ratio_from_costs(C2: Tensor, a: Tensor | None, b: Tensor | None, eps: float, solver: dict) -> Tensor:
    vals = entropic_ot(C2, a, b, epsilon=eps, validate_args=False, **solver)
    return _safe_ratio(vals[0], vals[1])


def violation_ratio(
    x: Tensor,
    y: Tensor,
    *,
    cost: CostArg = "squared_hinge",
    beta: float | None = None,
    epsilon: float | None = None,
    order: int = 1,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
    max_iter: int = 5000,
    tol: float = 1e-6,
    backend: Literal["auto", "pot", "torch"] = "auto",
    validate_args: bool | None = None,
) -> Tensor:
    r"""Violation ratio of the dominance of ``x`` over ``y``: ``OT_c(x, y) / (OT_c(x, y) + OT_c(y, x))``.

    ``c(x, y) = sum_k h(x_k - y_k)``. ``0`` means ``x`` dominates ``y``, ``1`` that ``y`` dominates ``x``;
    ``violation_ratio(x, y) + violation_ratio(y, x) == 1``. When both transport costs are zero (identical samples
    under a cost with ``h(0) = 0``) the ratio is ``0.5``.

    Args:
        x: ``[n]`` (one metric: exact, by sorting) or ``[n, d]`` (``d`` metrics: entropic OT), ``n >= 2``.
            Larger is better in every metric.
        y: ``[m]`` or ``[m, d]``, the same ``d``; ``m != n`` is allowed.
        cost: the coordinate penalty ``h``: ``"squared_hinge"`` (default, ``max(beta - z, 0)^2`` with margin
            ``beta = 0``: the W2 ratio), ``"hinge"`` (W1), ``"logistic"`` (``log(1 + exp(-beta z))``, a smooth
            surrogate with gain ``beta``, default ``1``), ``"zero_one"`` (``1[z < 0]``, 1-D only: the area ratio),
            or any :class:`otloss.Cost`.
        beta: the named cost's parameter (margin of the hinges, gain of the logistic).
        epsilon: entropic strength for ``[n, d]`` inputs, in the units of the cost; ``None`` is ``0.01 * d``
            (the paper's choice for ``d`` metrics on a common scale such as ``[0, 1]``); ``0`` is the exact LP
            (small problems, needs POT). Must be ``None`` for ``[n]`` inputs.
        order: ``1`` (first-order dominance) or ``2`` (second order, ``[n]`` inputs only; ``cost`` is then
            unused: the ratio compares the integrated quantile functions with the squared hinge).
        x_weights: optional ``[n]`` non-negative weights of the samples of ``x`` (normalised).
        y_weights: likewise ``[m]`` for ``y``.
        max_iter: Sinkhorn iterations at most (``[n, d]`` inputs); see :func:`otloss.entropic_ot`.
        tol: Sinkhorn marginal tolerance.
        backend: entropic solver, see :func:`otloss.entropic_ot`.
        validate_args: scan the inputs for NaN/Inf; ``None`` uses :func:`otloss.get_validate_args`.

    Returns:
        A 0-d tensor in ``[0, 1]`` in the dtype of ``x``, computed in float64 for ``[n]`` inputs (so that the
        costs of float32 samples neither underflow nor overflow) and in float32 (float64 for float64 input)
        for ``[n, d]`` inputs. It is differentiable in ``x`` and ``y`` for a differentiable cost.
    """
    validate = resolve_validate(validate_args)
    x, y = _check_pair(x, y, validate)
    multivariate = x.dim() == 2
    order = _check_order(order, multivariate)
    h = _resolve_cost(cost, beta)
    if order == 2 and (cost != "squared_hinge" or beta is not None):
        raise ValueError("order=2 uses its own (squared hinge) ratio: leave cost and beta at their defaults")
    eps = _resolve_eps(epsilon, x.shape[-1] if multivariate else 1, multivariate)
    _check_entropic_cost(h, multivariate)
    cdt = _ratio_dtype(x.dtype, multivariate)
    xc, yc = x.to(cdt), y.to(cdt)
    wx = _weights(x_weights, x.shape[0], "x_weights", xc, validate)
    wy = _weights(y_weights, y.shape[0], "y_weights", yc, validate)
    if multivariate:
        C2 = dominance_cost_matrices(xc, yc, h)
        solver = {"max_iter": max_iter, "tol": tol, "backend": backend}
        out = _ratio_from_costs(C2, wx, wy, eps, solver)
    else:
        out = _ratio_rows_1d(
            xc[None], yc[None], h, order, None if wx is None else wx[None], None if wy is None else wy[None]
        )[0]
    return out.to(x.dtype)


def _weights(w: object, n: int, name: str, values: Tensor, validate: bool) -> Tensor | None:
    if w is None:
        return None
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a floating-point torch.Tensor or None, got {type(w).__name__}")
    check_dense_float(w, name)
    if tuple(w.shape) != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {tuple(w.shape)}")
    if w.device != values.device:
        raise ValueError(f"{name} must be on the device of the samples ({values.device}), got {w.device}")
    if validate:
        check_weight_values(w, name)
    # divided by the largest weight before the cast and any sum: huge finite weights cannot overflow
    return normalise_weights(w.detach()).to(values.dtype)


# --------------------------------------------------------------------------------------------------- the test
def _z(p: float) -> float:
    """Standard normal quantile."""
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


@dataclass(frozen=True)
class DominanceResult:
    """Result of :func:`dominance_test`.

    Attributes:
        ratio: the violation ratio of ``x`` over ``y`` on the full samples.
        ci_low: lower end of the two-sided ``1 - alpha`` confidence interval ``ratio -+ z_{1-alpha/2} s.e.``
            (normal approximation, bootstrap standard error), clipped to ``[0, 1]``.
        ci_high: upper end of that interval.
        std_error: bootstrap standard deviation of the ratio.
        upper_bound: one-sided ``1 - alpha`` upper confidence bound, ``ratio + z_{1-alpha} std_error``.
        threshold: the absolute test's threshold ``tau``.
        alpha: the level.
        absolute: ``True`` when ``x`` almost dominates ``y`` at level ``alpha``: ``H0: ratio >= tau`` is rejected
            (``upper_bound < tau``).
        relative: ``True`` when ``x`` dominates ``y`` relatively: ``H0: ratio >= 1/2`` is rejected
            (``upper_bound < 0.5``), i.e. ``x`` violates dominance over ``y`` less than ``y`` does over ``x``.
        bootstrap: the ``[n_bootstrap]`` bootstrap ratios.
    """

    ratio: float
    ci_low: float
    ci_high: float
    std_error: float
    upper_bound: float
    threshold: float
    alpha: float
    absolute: bool
    relative: bool
    bootstrap: Tensor

    def report(self) -> str:
        """One-paragraph text report."""
        verdict_abs = "reject H0 (x almost dominates y)" if self.absolute else "cannot reject H0"
        verdict_rel = "x dominates y relatively" if self.relative else "no relative dominance of x over y"
        return (
            f"violation ratio {self.ratio:.4f}, {100 * (1 - self.alpha):.0f}% CI [{self.ci_low:.4f}, "
            f"{self.ci_high:.4f}] (bootstrap s.e. {self.std_error:.4f}, {self.bootstrap.numel()} replicates)\n"
            f"absolute test H0: ratio >= {self.threshold:g}: {verdict_abs} (upper bound {self.upper_bound:.4f})\n"
            f"relative test H0: ratio >= 0.5: {verdict_rel}"
        )


def _check_test_args(
    n_bootstrap: object, alpha: object, threshold: object, generator: object = None
) -> tuple[int, float, float]:
    """``(n_bootstrap, alpha, threshold)`` as Python numbers (NumPy scalars accepted)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    n_bootstrap = integer(n_bootstrap, "n_bootstrap")
    if n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be an int >= 2, got {n_bootstrap}")
    alpha = real_number(alpha, "alpha")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    threshold = real_number(threshold, "threshold")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return n_bootstrap, alpha, threshold


def _counts(n: int, R: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[R, n]`` multinomial resampling counts (n draws with replacement per replicate)."""
    idx = torch.randint(n, (R, n), generator=generator, device="cpu")
    counts = torch.zeros(R, n, dtype=dtype)
    counts.scatter_add_(1, idx, torch.ones(R, n, dtype=dtype))
    return counts.to(device)


class _Sampler:
    """Ratios of one pair on its full samples and on bootstrap resamples (the same cost matrices throughout).

    With ``eps > 0`` and a backend other than ``"pot"``, the replicates run otloss's torch Sinkhorn warm-started from
    the full-sample potentials (POT's solver takes no starting point): the same fixed point, about twice fewer
    iterations.
    """

    def __init__(self, x: Tensor, y: Tensor, h: Cost, order: int, eps: float, solver: dict) -> None:
        self.x, self.y, self.h, self.order, self.eps, self.solver = x, y, h, order, eps, solver
        self.multivariate = x.dim() == 2
        self.C2 = dominance_cost_matrices(x, y, h) if self.multivariate else None
        self.warm = self.multivariate and eps > 0 and solver.get("backend", "auto") != "pot"
        self.f0: Tensor | None = None

    def _warm_ratio(self, a: Tensor, b: Tensor) -> Tensor:
        C2 = self.C2
        a2, b2 = (a / a.sum()).expand(2, -1), (b / b.sum()).expand(2, -1)
        max_iter, tol = self.solver.get("max_iter", 1000), self.solver.get("tol", 1e-6)
        plan, f = _sinkhorn_torch(C2, a2, b2, self.eps, max_iter, tol, init=self.f0)
        if self.f0 is None:
            self.f0 = f
        _warn_unless_converged(plan, a2, b2, max_iter, tol, stacklevel=3)
        vals = (plan * C2).sum((-2, -1))
        return _safe_ratio(vals[0], vals[1])

    def full(self) -> Tensor:
        if self.warm:
            n, m = self.C2.shape[-2:]
            return self._warm_ratio(self.C2.new_ones(n), self.C2.new_ones(m))
        if self.multivariate:
            return _ratio_from_costs(self.C2, None, None, self.eps, self.solver)
        return _ratio_rows_1d(self.x[None], self.y[None], self.h, self.order)[0]

    def resampled(self, wx: Tensor, wy: Tensor) -> Tensor:
        """Ratios ``[R]`` with resampling counts ``wx [R, n]``, ``wy [R, m]`` as weights."""
        if self.warm:
            if self.f0 is None:
                self.full()
            return torch.stack([self._warm_ratio(wx[r], wy[r]) for r in range(wx.shape[0])])
        if self.multivariate:
            return torch.stack(
                [_ratio_from_costs(self.C2, wx[r], wy[r], self.eps, self.solver) for r in range(wx.shape[0])]
            )
        R = wx.shape[0]
        xs, ys = self.x.expand(R, -1), self.y.expand(R, -1)
        return _ratio_rows_1d(xs, ys, self.h, self.order, wx, wy)


def dominance_test(
    x: Tensor,
    y: Tensor,
    *,
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    threshold: float = 0.25,
    cost: CostArg = "squared_hinge",
    beta: float | None = None,
    epsilon: float | None = None,
    order: int = 1,
    generator: torch.Generator | None = None,
    max_iter: int = 5000,
    tol: float = 1e-6,
    backend: Literal["auto", "pot", "torch"] = "auto",
    validate_args: bool | None = None,
) -> DominanceResult:
    r"""Bootstrap test of (almost) stochastic dominance of ``x`` over ``y``.

    The ratio's standard error is the standard deviation of its bootstrap replicates (both samples resampled
    with replacement, independently); the paper proves a central limit theorem for the (entropic) ratio and
    the consistency of this bootstrap. Intervals use the normal approximation.

    * Absolute test: ``H0: ratio >= threshold`` against ``H1: ratio < threshold`` (``x`` almost dominates ``y``),
      rejected when ``ratio + z_{1-alpha} * s.e. < threshold``.
    * Relative test: the same with ``threshold = 1/2``, i.e. ``ratio(x, y) < ratio(y, x)``.

    Args:
        x: ``[n]`` or ``[n, d]`` samples of the first model (larger is better), ``n >= 2``.
        y: ``[m]`` or ``[m, d]`` samples of the second model.
        n_bootstrap: bootstrap replicates (default 1000). Each ``[n, d]`` replicate solves two entropic problems
            of size ``n x m`` (the cost matrices are built once; resampling becomes integer weights; unless
            ``backend="pot"``, otloss's torch solver starts each replicate from the full-sample potentials).
        alpha: level of the tests; the interval ``[ci_low, ci_high]`` has coverage ``1 - alpha``.
        threshold: ``tau`` of the absolute test (default ``0.25``), in ``(0, 1]``.
        cost: as in :func:`violation_ratio`.
        beta: as in :func:`violation_ratio`.
        epsilon: as in :func:`violation_ratio`.
        order: as in :func:`violation_ratio`.
        max_iter: as in :func:`violation_ratio`.
        tol: as in :func:`violation_ratio`.
        backend: as in :func:`violation_ratio`.
        validate_args: as in :func:`violation_ratio`.
        generator: a ``torch.Generator`` (CPU) for reproducible resampling.

    Returns:
        A :class:`DominanceResult`; ``result.report()`` formats it as text.
    """
    validate = resolve_validate(validate_args)
    x, y = _check_pair(x, y, validate)
    _refuse_meta(x, "x", "dominance_test")
    multivariate = x.dim() == 2
    order = _check_order(order, multivariate)
    n_bootstrap, alpha, threshold = _check_test_args(n_bootstrap, alpha, threshold, generator)
    h = _resolve_cost(cost, beta)
    if order == 2 and (cost != "squared_hinge" or beta is not None):
        raise ValueError("order=2 uses its own (squared hinge) ratio: leave cost and beta at their defaults")
    eps = _resolve_eps(epsilon, x.shape[-1] if multivariate else 1, multivariate)
    _check_entropic_cost(h, multivariate)
    cdt = _ratio_dtype(x.dtype, multivariate)
    with torch.no_grad():
        xc, yc = x.detach().to(cdt), y.detach().to(cdt)
        sampler = _Sampler(xc, yc, h, order, eps, {"max_iter": max_iter, "tol": tol, "backend": backend})
        ratio = float(sampler.full())
        boots = []
        chunk = 1 if multivariate else max(1, 2**22 // (xc.shape[0] + yc.shape[0]))
        for start in range(0, n_bootstrap, chunk):
            R = min(chunk, n_bootstrap - start)
            wx = _counts(xc.shape[0], R, generator, xc.device, cdt)
            wy = _counts(yc.shape[0], R, generator, yc.device, cdt)
            boots.append(sampler.resampled(wx, wy))
        boot = torch.cat(boots).cpu()
    se = float(boot.std())
    z2, z1 = _z(1 - alpha / 2), _z(1 - alpha)
    upper = ratio + z1 * se
    return DominanceResult(
        ratio=ratio,
        ci_low=max(0.0, ratio - z2 * se),
        ci_high=min(1.0, ratio + z2 * se),
        std_error=se,
        upper_bound=upper,
        threshold=float(threshold),
        alpha=float(alpha),
        absolute=upper < threshold,
        relative=upper < 0.5,
        bootstrap=boot,
    )


# --------------------------------------------------------------------------------------------------- ranking
@dataclass(frozen=True)
class RankingResult:
    """Result of :func:`rank_models` (``k`` models, ``M`` metrics; ``M = 1`` for the multivariate ranking).

    Attributes:
        names: the ``k`` model names.
        order: the names from best to worst (Borda score, ties broken by the mean one-versus-all ratio).
        one_vs_all: ``[M, k]`` one-versus-all ratios ``mean_{j != i} ratio(model_i, model_j)`` (lower is better).
        pairwise: ``[M, k, k]`` ratios ``ratio(model_i, model_j)`` (``0.5`` on the diagonal).
        ranks: ``[M, k]`` rank of each model per metric (1 is best).
        borda: ``[k]`` Borda scores ``sum_metrics (k - rank)``.
        better: ``[M, k, k]`` booleans: model ``i`` has a significantly lower one-versus-all ratio than model
            ``j`` under Holm's step-down correction over all ``M k (k - 1)`` one-sided tests, which keeps the
            family-wise error rate at ``alpha``.
        p_values: ``[M, k, k]`` unadjusted one-sided p-values of those tests (``nan`` on the diagonal).
        alpha: the family-wise level.
    """

    names: list[str]
    order: list[str]
    one_vs_all: Tensor
    pairwise: Tensor
    ranks: Tensor
    borda: Tensor
    better: Tensor
    p_values: Tensor
    alpha: float

    def report(self) -> str:
        """A text table: Borda score, one-versus-all ratio per metric and significant wins per model."""
        lines = [f"{'model':<20} {'borda':>6} " + " ".join(f"{'m' + str(k):>8}" for k in range(len(self.ranks)))]
        for name in self.order:
            i = self.names.index(name)
            wins = [self.names[j] for j in range(len(self.names)) if bool(self.better[:, i, j].any())]
            lines.append(
                f"{name:<20} {float(self.borda[i]):>6.0f} "
                + " ".join(f"{float(v):>8.4f}" for v in self.one_vs_all[:, i])
                + (f"  beats {', '.join(wins)}" if wins else "")
            )
        lines.append(f"(one-versus-all violation ratios, lower is better; wins at family-wise level {self.alpha:g})")
        return "\n".join(lines)


def _holm(p: Tensor, alpha: float) -> Tensor:
    """Holm's step-down rejections for a flat tensor of p-values (NaN never rejected)."""
    flat = p.flatten()
    valid = ~torch.isnan(flat)
    idx = torch.nonzero(valid).squeeze(-1)
    order = idx[torch.argsort(flat[idx])]
    reject = torch.zeros_like(flat, dtype=torch.bool)
    m = len(order)
    for rank, k in enumerate(order.tolist()):
        if float(flat[k]) <= alpha / (m - rank):
            reject[k] = True
        else:
            break
    return reject.view(p.shape)


def rank_models(
    samples: Mapping[str, Tensor] | Sequence[Tensor],
    *,
    aggregate: Literal["borda", "multivariate"] = "borda",
    n_bootstrap: int = 200,
    alpha: float = 0.05,
    cost: CostArg = "squared_hinge",
    beta: float | None = None,
    epsilon: float | None = None,
    order: int = 1,
    generator: torch.Generator | None = None,
    max_iter: int = 5000,
    tol: float = 1e-6,
    backend: Literal["auto", "pot", "torch"] = "auto",
    validate_args: bool | None = None,
) -> RankingResult:
    r"""Rank ``k`` models by one-versus-all violation ratios, with family-wise error control.

    For each metric, ``one_vs_all[i] = mean_{j != i} ratio(model_i, model_j)``; lower is better. Models are
    ranked per metric by it, and the ranks are aggregated across metrics with Borda's count. The significance
    of "``i`` is better than ``j``" is the one-sided test ``H0: one_vs_all[i] >= one_vs_all[j]`` with the
    bootstrap standard error of the difference (all models resampled together in each replicate), corrected by
    Holm's method over every pair and metric.

    Args:
        samples: ``k >= 2`` tensors ``[n_i]`` or ``[n_i, d]`` (the same ``d``), as a mapping name -> samples or a
            sequence (named ``"0"``, ``"1"``, ...). Sizes may differ.
        aggregate: ``"borda"`` (default): each of the ``d`` metrics is ranked on its own (exact 1-D ratios) and the
            ranks are combined by Borda's count; ``"multivariate"``: one ranking from the multivariate ratio of the
            ``[n, d]`` samples (entropic OT), which accounts for the dependence between metrics.
        n_bootstrap: bootstrap replicates (default 200).
        alpha: family-wise error rate of the pairwise verdicts.
        cost: as in :func:`violation_ratio`.
        beta: as in :func:`violation_ratio`.
        epsilon: as in :func:`violation_ratio`.
        order: as in :func:`violation_ratio`.
        max_iter: as in :func:`violation_ratio`.
        tol: as in :func:`violation_ratio`.
        backend: as in :func:`violation_ratio`.
        validate_args: as in :func:`violation_ratio`.
        generator: a ``torch.Generator`` (CPU) for reproducible resampling.

    Returns:
        A :class:`RankingResult`; ``result.report()`` formats it as text.
    """
    if isinstance(samples, Mapping):
        names = [str(k) for k in samples]
        tensors = list(samples.values())
        if len(set(names)) < len(names):
            raise ValueError(f"samples' names must be distinct as strings, got {list(samples)} (shown as {names})")
    elif isinstance(samples, Sequence) and not isinstance(samples, (str, bytes)):
        names = [str(i) for i in range(len(samples))]
        tensors = list(samples)
    else:
        raise TypeError(f"samples must be a mapping name -> tensor or a sequence of tensors, got {type(samples)}")
    k = len(tensors)
    if k < 2:
        raise ValueError(f"rank_models needs at least 2 models, got {k}")
    if aggregate not in ("borda", "multivariate"):
        raise ValueError(f"aggregate must be 'borda' or 'multivariate', got {aggregate!r}")
    validate = resolve_validate(validate_args)
    for i in range(1, k):
        _check_pair(tensors[0], tensors[i], False)  # types, shapes, d, dtype, device
    for i, t in enumerate(tensors):
        _check_samples(t, f"samples[{names[i]!r}]")
        _refuse_meta(t, f"samples[{names[i]!r}]", "rank_models")
        if validate:
            check_finite(t, f"samples[{names[i]!r}]")
    n_bootstrap, alpha, _ = _check_test_args(n_bootstrap, alpha, 0.5, generator)
    h = _resolve_cost(cost, beta)
    multivariate = aggregate == "multivariate"
    cdt = _ratio_dtype(tensors[0].dtype, multivariate)
    data = [t.detach().to(cdt) for t in tensors]
    if multivariate:
        data = [t if t.dim() == 2 else t[:, None] for t in data]
        metrics = [data]  # one metric: the joint ratio
    elif data[0].dim() == 1:
        metrics = [data]
    else:
        metrics = [[t[:, c] for t in data] for c in range(data[0].shape[1])]
    order = _check_order(order, multivariate)
    eps = _resolve_eps(epsilon, data[0].shape[-1] if multivariate else 1, multivariate)
    _check_entropic_cost(h, multivariate)
    solver = {"max_iter": max_iter, "tol": tol, "backend": backend}
    M = len(metrics)
    counts = [_counts(t.shape[0], n_bootstrap, generator, t.device, cdt) for t in data]
    pair = torch.full((M, k, k), 0.5, dtype=torch.float64)
    boot_pair = torch.full((M, n_bootstrap, k, k), 0.5, dtype=torch.float64)
    with torch.no_grad():
        for mi, cols in enumerate(metrics):
            for i in range(k):
                for j in range(i + 1, k):
                    s = _Sampler(cols[i], cols[j], h, order, eps, solver)
                    r = float(s.full())
                    pair[mi, i, j], pair[mi, j, i] = r, 1 - r
                    rb = s.resampled(counts[i], counts[j]).double().cpu()
                    boot_pair[mi, :, i, j], boot_pair[mi, :, j, i] = rb, 1 - rb
    off = ~torch.eye(k, dtype=torch.bool)
    ova = (pair * off).sum(-1) / (k - 1)  # [M, k]
    boot_ova = (boot_pair * off).sum(-1) / (k - 1)  # [M, R, k]
    diff = ova[:, :, None] - ova[:, None, :]  # [M, k, k]: i minus j
    boot_diff = boot_ova[:, :, :, None] - boot_ova[:, :, None, :]
    se = boot_diff.std(1)
    p = _normal_cdf(diff / se.clamp_min(1e-300))  # H0: ova_i >= ova_j; small p favours "i better"
    p = torch.where(off.expand_as(p), p, torch.full_like(p, float("nan")))
    better = _holm(p, alpha)
    ranks = torch.empty(M, k, dtype=torch.long)
    for mi in range(M):
        ranks[mi, torch.argsort(ova[mi], stable=True)] = torch.arange(1, k + 1)
    borda = (k - ranks).sum(0).double()
    key = sorted(range(k), key=lambda i: (-float(borda[i]), float(ova[:, i].mean())))
    return RankingResult(
        names=names,
        order=[names[i] for i in key],
        one_vs_all=ova,
        pairwise=pair,
        ranks=ranks,
        borda=borda,
        better=better,
        p_values=p,
        alpha=float(alpha),
    )


# --------------------------------------------------------------------------------------------------- the loss
def multivariate_aot_loss(
    chosen: Tensor,
    rejected: Tensor,
    *,
    cost: CostArg = "logistic",
    beta: float | None = None,
    epsilon: float | None = None,
    chosen_weights: Tensor | None = None,
    rejected_weights: Tensor | None = None,
    grad: Literal["envelope", "implicit"] = "envelope",
    max_iter: int = 5000,
    tol: float = 1e-6,
    backend: Literal["auto", "pot", "torch"] = "auto",
    validate_args: bool | None = None,
) -> Tensor:
    r"""Multi-reward AOT: the entropic transport cost of multivariate dominance of ``chosen`` over ``rejected``.

    ``loss = <P_eps, C>`` with ``C[i, j] = sum_k h(chosen_ik - rejected_jk)``: the smooth penalty of every
    coordinate in which the chosen sample ranks below the rejected sample it is coupled with. Minimising it pushes
    the chosen rewards' distribution to dominate the rejected one's in every reward at once, the ``[n, d]``
    counterpart of :func:`otloss.aot_loss` in its unpaired form (``aot_loss`` sorts ``d = 1`` rewards; here the
    coupling is the entropic plan). With ``d = 1`` and ``epsilon -> 0`` it equals
    ``ot_h_1d(chosen[:, 0], rejected[:, 0], h)``.

    Args:
        chosen: ``[n, d]`` rewards of the chosen (desirable) samples: for example the implicit rewards
            ``beta * (log pi - log pi_ref)`` of ``d`` policy heads, or scores from ``d`` differentiable reward
            models or rubric graders. ``[n]`` is read as ``d = 1``. Larger is better.
        rejected: ``[m, d]`` rewards of the rejected samples; ``m != n`` is allowed (unpaired data).
        cost: ``"logistic"`` (default; ``h(z) = log(1 + exp(-beta z))``, AOT's cost), ``"hinge"``,
            ``"squared_hinge"`` or an :class:`otloss.Cost`.
        beta: the named cost's parameter; ``None`` is AOT's ``0.01`` for the logistic gain and ``0`` for the
            hinge margins.
        epsilon: entropic strength in the units of the cost; ``None`` is ``0.01 * d`` (the paper's choice).
        chosen_weights: optional ``[n]`` non-negative sample weights (zero = padding).
        rejected_weights: optional ``[m]``.
        grad: ``"envelope"`` (default, the plan held fixed) or ``"implicit"`` (exact); see
            :func:`otloss.entropic_ot`.
        max_iter: see :func:`otloss.entropic_ot`.
        tol: see :func:`otloss.entropic_ot`.
        backend: see :func:`otloss.entropic_ot`.
        validate_args: see :func:`otloss.entropic_ot`.

    Returns:
        A differentiable 0-d tensor in the dtype of ``chosen``.
    """
    validate = resolve_validate(validate_args)
    if isinstance(chosen, Tensor) and chosen.dim() == 1:
        chosen = chosen[:, None]
    if isinstance(rejected, Tensor) and rejected.dim() == 1:
        rejected = rejected[:, None]
    x, y = _check_pair(chosen, rejected, validate)
    if isinstance(cost, str) and cost not in ("logistic", "hinge", "squared_hinge"):
        raise ValueError(f"cost must be 'logistic', 'hinge', 'squared_hinge' or an otloss Cost, got {cost!r}")
    if isinstance(cost, str) and beta is None:
        beta = 0.01 if cost == "logistic" else 0.0
    h = _resolve_cost(cost, beta)
    if not h.differentiable:
        raise ValueError(f"multivariate_aot_loss needs a differentiable cost, got {h!r}")
    eps = _resolve_eps(epsilon, x.shape[1], True)
    cdt = compute_dtype(x.dtype)
    xc, yc = x.to(cdt), y.to(cdt)
    wx = _weights(chosen_weights, x.shape[0], "chosen_weights", xc, validate)
    wy = _weights(rejected_weights, y.shape[0], "rejected_weights", yc, validate)
    C = xc.new_zeros((x.shape[0], y.shape[0]))
    for k in range(x.shape[1]):
        C = C + h(xc[:, k, None] - yc[None, :, k])
    value = entropic_ot(
        C, wx, wy, epsilon=eps, grad=grad, max_iter=max_iter, tol=tol, backend=backend, validate_args=False
    )
    return value.to(x.dtype)


# --------------------------------------------------------------------------------------------------- plots
def plot_dominance(result: DominanceResult | RankingResult, ax: Axes | None = None) -> Axes:
    """Plot a test or a ranking with matplotlib (imported lazily; ``pip install matplotlib``).

    * :class:`DominanceResult`: histogram of the bootstrap ratios, the point estimate, the confidence interval,
      the absolute test's threshold and the relative test's 0.5.
    * :class:`RankingResult`: one-versus-all ratio of each model per metric (bars, best model first).

    Args:
        result: what :func:`dominance_test` or :func:`rank_models` returned.
        ax: a matplotlib ``Axes``; ``None`` creates a figure.

    Returns:
        The ``Axes`` drawn on.
    """
    if not isinstance(result, (DominanceResult, RankingResult)):
        raise TypeError(f"result must be a DominanceResult or a RankingResult, got {type(result).__name__}")
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_dominance needs matplotlib: pip install matplotlib") from None
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    if isinstance(result, DominanceResult):
        ax.hist(result.bootstrap.numpy(), bins=30, color="0.8", label=f"bootstrap ({result.bootstrap.numel()})")
        ax.axvline(result.ratio, color="k", label=f"ratio {result.ratio:.3f}")
        ax.axvspan(result.ci_low, result.ci_high, color="C0", alpha=0.2, label=f"{100 * (1 - result.alpha):.0f}% CI")
        ax.axvline(result.threshold, color="C3", ls="--", label=f"threshold {result.threshold:g}")
        ax.axvline(0.5, color="C2", ls=":", label="relative test 0.5")
        ax.set_xlabel("violation ratio of x over y (0: x dominates)")
        ax.legend(fontsize="small")
    else:
        k, M = len(result.names), result.one_vs_all.shape[0]
        width = 0.8 / M
        idx = [result.names.index(n) for n in result.order]
        for m in range(M):
            vals = result.one_vs_all[m, idx].numpy()
            ax.bar([i + m * width for i in range(k)], vals, width=width, label=f"metric {m}" if M > 1 else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(k)], result.order, rotation=45, ha="right")
        ax.set_ylabel("one-versus-all violation ratio (lower is better)")
        if M > 1:
            ax.legend(fontsize="small")
    return ax
