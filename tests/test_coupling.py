"""``quantile_coupling``: marginals, optimality against POT, reduction to order statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import np_cost, pot_value
from hypothesis import given
from hypothesis import strategies as st
from test_oracles import CONVEX_COSTS, sweep, values, weights_for
from tolerances import approx, tol

import otloss


def _t(x):
    return None if x is None else torch.as_tensor(x, dtype=torch.float64)


@st.composite
def weighted_problem(draw):
    u, v = draw(values()), draw(values())
    return u, v, draw(weights_for(len(u))), draw(weights_for(len(v))), draw(st.sampled_from(CONVEX_COSTS))


@sweep
@given(weighted_problem())
def test_marginals_equal_the_weights(problem):
    u, v, a, b, _ = problem
    c = otloss.quantile_coupling(_t(u), _t(v), _t(a), _t(b))
    P = c.to_dense(len(u), len(v)).numpy()
    np.testing.assert_allclose(P.sum(1), a / a.sum(), **tol(torch.float64, "parity"))
    np.testing.assert_allclose(P.sum(0), b / b.sum(), **tol(torch.float64, "parity"))
    assert (c.mass > 0).all()


@sweep
@given(weighted_problem())
def test_plan_cost_is_the_pot_optimum(problem):
    u, v, a, b, cost = problem
    c = otloss.quantile_coupling(_t(u), _t(v), _t(a), _t(b))
    P = c.to_dense(len(u), len(v)).numpy()
    M = np_cost(cost, np.subtract.outer(u, v))
    z = np.abs(np.subtract.outer(u, v)).max() + 1
    assert float((P * M).sum()) == approx(pot_value(u, v, cost, a, b), torch.float64, scale=z**2 + 1)


def test_plan_matches_pot_emd_plan_for_strictly_convex_cost():
    import ot

    g = np.random.default_rng(3)
    u, v = g.normal(size=6), g.normal(size=4)
    a, b = g.uniform(0.1, 1, 6), g.uniform(0.1, 1, 4)
    P = otloss.quantile_coupling(_t(u), _t(v), _t(a), _t(b)).to_dense(6, 4).numpy()
    ref = ot.emd(a / a.sum(), b / b.sum(), np.subtract.outer(u, v) ** 2)
    np.testing.assert_allclose(P, ref, **tol(torch.float64, "parity"))  # unique optimum for a strictly convex cost


def test_equal_size_uniform_pairs_order_statistics():
    u = torch.tensor([3.0, -1.0, 2.0, 0.5])
    v = torch.tensor([10.0, 7.0, 8.0, 9.0])
    c = otloss.quantile_coupling(u, v)
    assert c.u_index.tolist() == torch.argsort(u).tolist()
    assert c.v_index.tolist() == torch.argsort(v).tolist()
    torch.testing.assert_close(c.mass, torch.full((4,), 0.25))


def test_unequal_sizes_split_mass():
    c = otloss.quantile_coupling(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0, 2.0]))
    pairs = list(zip(c.u_index.tolist(), c.v_index.tolist(), c.mass.tolist()))
    expected = [(0, 0, 1 / 3), (0, 1, 1 / 6), (1, 1, 1 / 6), (1, 2, 1 / 3)]
    assert [(i, j) for i, j, _ in pairs] == [(i, j) for i, j, _ in expected]
    masses = [m for *_, m in pairs]
    np.testing.assert_allclose(masses, [m for *_, m in expected], **tol(torch.float32, "ulp"))  # float32


def test_batched_coupling_has_fixed_width_and_zero_mass_padding():
    u, v = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    c = otloss.quantile_coupling(u, v)
    assert c.mass.shape == (3, 5 + 4 - 1)
    torch.testing.assert_close(c.mass.sum(-1), torch.ones(3, dtype=torch.float64))
    for r in range(3):
        single = otloss.quantile_coupling(u[r], v[r])
        torch.testing.assert_close(c.to_dense(5, 4)[r], single.to_dense(5, 4))


def test_plan_cost_is_differentiable_in_values_and_mass_in_weights():
    u = torch.randn(6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    a = torch.rand(6, dtype=torch.float64, requires_grad=True)
    c = otloss.quantile_coupling(u, v, a)
    cost = otloss.squared_hinge(0.2)
    val = (c.mass * cost(u[c.u_index] - v[c.v_index])).sum()
    torch.testing.assert_close(val, otloss.ot_h_1d(u, v, cost, u_weights=a))
    gu, gv, ga = torch.autograd.grad(val, (u, v, a))
    ru, rv, ra = torch.autograd.grad(otloss.ot_h_1d(u, v, cost, u_weights=a), (u, v, a))
    torch.testing.assert_close((gu, gv, ga), (ru, rv, ra))


def test_named_tuple_helpers_keep_or_forget_the_sizes_explicitly():
    c = otloss.quantile_coupling(torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    r = c._replace(mass=c.mass * 1)
    assert (r.n, r.m) == (4, 3)
    torch.testing.assert_close(r.to_dense(), c.to_dense())
    made = type(c)._make(c)  # no sizes: like a plan built by hand
    with pytest.raises(ValueError, match="n is needed"):
        made.to_dense()
    torch.testing.assert_close(made.to_dense(4, 3), c.to_dense())
