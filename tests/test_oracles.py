"""``ot_h_1d`` against exact oracles: POT's LP, Santambrogio's quantile integral, SciPy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import pot_value, quantile_integral
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tolerances import approx, tol

import otloss

#: ``OTLOSS_PROPERTY_EXAMPLES=10000`` gives every property of the core that many examples (a long local sweep)
_SWEEP = int(os.environ.get("OTLOSS_PROPERTY_EXAMPLES", "0"))


def sweep(test):
    """The active hypothesis profile, with ``max_examples`` from ``OTLOSS_PROPERTY_EXAMPLES`` when it is set."""
    return settings(max_examples=_SWEEP)(test) if _SWEEP else test


CONVEX_COSTS = [
    otloss.logistic(1.0),
    otloss.logistic(0.7, label_smoothing=0.2),
    otloss.hinge(0.0),
    otloss.hinge(0.3),
    otloss.squared_hinge(0.0),
    otloss.squared_hinge(0.5),
    otloss.least_squares(0.2),
    otloss.abs_pow(1.0),
    otloss.abs_pow(1.5),
    otloss.abs_pow(2.0),
]
cost_ids = [repr(c) for c in CONVEX_COSTS]

finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=64)


def values(max_size=12):
    return st.integers(1, max_size).flatmap(lambda n: arrays(np.float64, n, elements=finite))


def weights_for(n):
    # non-negative weights with zeros allowed, at least one positive
    return arrays(np.float64, n, elements=st.one_of(st.just(0.0), st.floats(0.01, 10.0))).filter(lambda w: w.sum() > 0)


@st.composite
def problems(draw, weighted: bool):
    u = draw(values())
    v = draw(values())
    a = draw(weights_for(len(u))) if weighted else None
    b = draw(weights_for(len(v))) if weighted else None
    cost = draw(st.sampled_from(CONVEX_COSTS))
    return u, v, a, b, cost


def _t(x):
    return None if x is None else torch.as_tensor(x, dtype=torch.float64)


def _scale(u, v, cost):
    # the size of the costs involved, which scales the absolute tolerance
    z = np.abs(np.subtract.outer(u, v)).max() + 1.0
    return z ** cost.params.get("p", 2) + 1.0


@sweep
@given(problems(weighted=False))
def test_equals_pot_lp_uniform(problem):
    u, v, _, _, cost = problem
    got = float(otloss.ot_h_1d(_t(u), _t(v), cost))
    assert got == approx(pot_value(u, v, cost), torch.float64, scale=_scale(u, v, cost))


@sweep
@given(problems(weighted=True))
def test_equals_pot_lp_weighted_with_zeros(problem):
    u, v, a, b, cost = problem
    got = float(otloss.ot_h_1d(_t(u), _t(v), cost, u_weights=_t(a), v_weights=_t(b)))
    assert got == approx(pot_value(u, v, cost, a, b), torch.float64, scale=_scale(u, v, cost))


@sweep
@given(problems(weighted=True))
def test_santambrogio_identity_exact_integral(problem):
    u, v, a, b, cost = problem
    got = float(otloss.ot_h_1d(_t(u), _t(v), cost, u_weights=_t(a), v_weights=_t(b)))

    def h(z):
        return cost(torch.as_tensor(z)).numpy()

    assert got == approx(quantile_integral(u, v, h, a, b), torch.float64, scale=_scale(u, v, cost))


@pytest.mark.parametrize("cost", CONVEX_COSTS, ids=cost_ids)
@pytest.mark.parametrize("n,m", [(5, 5), (7, 3), (4, 11)])
def test_santambrogio_identity_quadrature(cost, n, m):
    """A fine midpoint quadrature of the quantile integral, independent of the breakpoints."""
    g = np.random.default_rng(n * 31 + m)
    u, v = g.normal(size=n), g.normal(0.5, 2.0, size=m)
    grid = 200_000
    ref = quantile_integral(u, v, lambda z: cost(torch.as_tensor(z)).numpy(), grid=grid)
    got = float(otloss.ot_h_1d(_t(u), _t(v), cost))
    # each of the n + m breakpoints costs at most one grid cell of error
    hmax = float(cost(torch.as_tensor(np.subtract.outer(u, v))).abs().max())
    assert abs(got - ref) <= (n + m) * hmax / grid + tol(torch.float64, "parity")["atol"]


@sweep
@given(values(), values(), st.booleans())
def test_scipy_wasserstein_distance(u, v, weighted):
    from scipy.stats import wasserstein_distance

    a = np.linspace(0.5, 2.0, len(u)) if weighted else None
    b = np.linspace(2.0, 0.5, len(v)) if weighted else None
    ref = wasserstein_distance(u, v, a, b)
    got = float(otloss.ot_h_1d(_t(u), _t(v), otloss.abs_pow(1.0), u_weights=_t(a), v_weights=_t(b)))
    assert got == approx(ref, torch.float64)


def test_batched_rows_are_independent_problems():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    a = torch.rand(3, 4, 6, generator=g, dtype=torch.float64)
    cost = otloss.squared_hinge(0.1)
    rows = otloss.ot_h_1d(u, v, cost, u_weights=a, reduction="none")
    assert rows.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            ref = pot_value(u[i, j].numpy(), v[i, j].numpy(), cost, a[i, j].numpy())
            assert float(rows[i, j]) == approx(ref, torch.float64, "parity")
    assert float(otloss.ot_h_1d(u, v, cost, u_weights=a)) == pytest.approx(float(rows.mean()))
    assert float(otloss.ot_h_1d(u, v, cost, u_weights=a, reduction="sum")) == pytest.approx(float(rows.sum()))


def test_one_dimensional_input_gives_scalar():
    out = otloss.ot_h_1d(torch.randn(5), torch.randn(5), "abs_pow", reduction="none")
    assert out.shape == ()


def test_custom_callable_cost_matches_builtin():
    u, v = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    got = otloss.ot_h_1d(u, v, lambda z: torch.relu(0.1 - z) ** 2)
    ref = otloss.ot_h_1d(u, v, otloss.squared_hinge(0.1))
    torch.testing.assert_close(got, ref)


def test_zero_one_is_the_quantile_integral_not_the_lp():
    """The FSD area is the quantile integral; the 0/1 cost is not convex, so the LP can be smaller."""
    u = np.array([0.0, 1.5])
    v = np.array([1.0, 2.0])
    got = float(otloss.ot_h_1d(_t(u), _t(v), otloss.zero_one()))
    assert got == pytest.approx(1.0)  # Q_u(t) < Q_v(t) on all of [0, 1]
    assert pot_value(u, v, otloss.zero_one()) == pytest.approx(0.5)  # pairing 1.5 with 1 violates only once
