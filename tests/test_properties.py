"""Metamorphic properties of ``ot_h_1d`` and the FSD family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_oracles import sweep, values, weights_for
from tolerances import approx

import otloss


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


@sweep
@given(values(), values(), st.floats(-100, 100), st.sampled_from(["logistic", "hinge", "squared_hinge", "abs_pow"]))
def test_translation_invariance(u, v, c, name):
    cost = otloss.get_cost(name)
    base = float(otloss.ot_h_1d(_t(u), _t(v), cost))
    shifted = float(otloss.ot_h_1d(_t(u + c), _t(v + c), cost))
    assert shifted == approx(base, torch.float64)


@sweep
@given(values(), values(), st.sampled_from([otloss.abs_pow(1.0), otloss.abs_pow(2.5), otloss.least_squares(0.0)]))
def test_symmetry_for_even_cost(u, v, cost):
    assert cost.even
    assert float(otloss.ot_h_1d(_t(u), _t(v), cost)) == approx(
        float(otloss.ot_h_1d(_t(v), _t(u), cost)), torch.float64, "parity"
    )


@sweep
@given(
    values(),
    values(),
    st.floats(0.01, 20),
    st.sampled_from([otloss.abs_pow(1.0), otloss.abs_pow(1.7), otloss.hinge(0.0), otloss.squared_hinge(0.0)]),
)
def test_scaling_for_homogeneous_cost(u, v, c, cost):
    p = cost.degree
    base = float(otloss.ot_h_1d(_t(u), _t(v), cost))
    scaled = float(otloss.ot_h_1d(_t(c * u), _t(c * v), cost))
    assert scaled == approx(c**p * base, torch.float64)


@sweep
@given(
    values().flatmap(lambda u: st.tuples(st.just(u), weights_for(len(u)))),
    values().flatmap(lambda v: st.tuples(st.just(v), weights_for(len(v)))),
    st.floats(1e-300, 1e300),
    st.sampled_from([torch.float32, torch.float64]),
    st.sampled_from([otloss.hinge(0.0), otloss.abs_pow(2.0), otloss.logistic(0.5)]),
)
def test_weight_scale_invariance_up_to_huge_and_tiny_scales(ua, vb, c, dtype, cost):
    """Weights are normalised before any cast or cumulative sum: 1e300 float64 weights with float32 values work."""
    (u, a), (v, b) = ua, vb
    uu, vv = _t(u).to(dtype), _t(v).to(dtype)
    base = otloss.ot_h_1d(uu, vv, cost, u_weights=_t(a), v_weights=_t(b)).item()
    scaled = otloss.ot_h_1d(uu, vv, cost, u_weights=_t(a) * c, v_weights=_t(b) / c).item()
    assert scaled == approx(base, dtype)
    # the quantile is a step function of the level: a last-bit change of the normalised weights may move a
    # breakpoint across a level, so the scaled quantile is bracketed by the unscaled ones just around it
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    q = otloss.quantile_function(uu, t, _t(a) * c)
    lo = otloss.quantile_function(uu, (t - 1e-9).clamp(0, 1), _t(a))
    hi = otloss.quantile_function(uu, (t + 1e-9).clamp(0, 1), _t(a))
    assert bool(((lo <= q) & (q <= hi)).all())


@sweep
@given(values(), values(), st.floats(0.0, 10.0))
def test_zero_violation_under_dominance(v, extra, gap):
    """u built to dominate v: every quantile of u is >= the same quantile of v."""
    u = np.sort(v) + gap + np.abs(np.resize(extra, len(v)))
    for m in ("area", "w1", "w2"):
        assert float(otloss.fsd_violation(_t(u), _t(v), m)) == 0.0


@sweep
@given(values(), st.floats(0.001, 10.0))
def test_violation_positive_when_dominance_reversed(v, gap):
    u = v - gap
    assert float(otloss.fsd_violation(_t(u), _t(v), "area")) == 1.0
    assert float(otloss.fsd_violation(_t(u), _t(v), "w1")) == pytest.approx(gap)
    assert float(otloss.fsd_violation(_t(u), _t(v), "w2")) == pytest.approx(gap**2)


def test_w1_violation_is_distance_to_dominating_set():
    g = np.random.default_rng(0)
    u, v = g.normal(size=50), g.normal(0.3, 1.0, size=50)
    us, vs = np.sort(u), np.sort(v)
    nearest = np.maximum(us, vs)  # quantiles of the closest distribution dominating v
    assert float(otloss.fsd_violation(_t(u), _t(v), "w1")) == pytest.approx(np.mean(np.abs(us - nearest)))
    assert float(otloss.fsd_violation(_t(u), _t(v), "w2")) == pytest.approx(np.mean((us - nearest) ** 2))


def test_smooth_surrogate_is_a_differentiable_loss():
    u = torch.randn(16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(16, dtype=torch.float64)
    loss = otloss.fsd_violation(u, v, otloss.logistic(2.0))
    loss.backward()
    assert u.grad is not None and (u.grad <= 0).all()  # raising u reduces a violation loss
    assert otloss.fsd_violation(u, v, "area").grad_fn is None


def test_ties_all_equal_rows():
    u = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(3, dtype=torch.float64)
    out = otloss.ot_h_1d(u, v, otloss.logistic(1.0))
    assert float(out.detach()) == pytest.approx(np.log(2))
    out.backward()
    torch.testing.assert_close(u.grad, torch.full((5,), -0.5 / 5, dtype=torch.float64))
    assert float(otloss.fsd_violation(u.detach(), v, "area")) == 0.0
