"""Gradients: float64 gradcheck, analytic derivatives, non-unit upstream gradients, weights."""

from __future__ import annotations

import pytest
import torch
from tolerances import approx
from torch.autograd import gradcheck

import otloss

DIFF_COSTS = [
    otloss.logistic(1.3),
    otloss.logistic(0.5, label_smoothing=0.1),
    otloss.hinge(0.2),
    otloss.squared_hinge(0.3),
    otloss.least_squares(0.1),
    otloss.abs_pow(1.0),
    otloss.abs_pow(2.0),
]
ids = [repr(c) for c in DIFF_COSTS]


def _distinct(*shape, seed=0):
    # well-separated distinct values: gradcheck's finite differences never cross a sort boundary or a kink
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod())
    return (torch.randperm(n, generator=g).to(torch.float64) * 0.37 + 0.011).reshape(shape).requires_grad_(True)


@pytest.mark.parametrize("cost", DIFF_COSTS, ids=ids)
@pytest.mark.parametrize("n,m", [(6, 6), (5, 3)])
def test_gradcheck_hard_sort(cost, n, m):
    u, v = _distinct(2, n, seed=1), _distinct(2, m, seed=2) - 0.5
    assert gradcheck(lambda a, b: otloss.ot_h_1d(a, b, cost, reduction="none"), (u, v))


@pytest.mark.parametrize("cost", DIFF_COSTS, ids=ids)
@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_gradcheck_soft_sort(cost, regularization):
    u, v = _distinct(2, 5, seed=3), _distinct(2, 5, seed=4) - 0.5
    sort = otloss.SoftSort(0.7, regularization)
    assert gradcheck(lambda a, b: otloss.ot_h_1d(a, b, cost, sort=sort, reduction="none"), (u, v))


def test_gradcheck_weights_on_the_simplex():
    """Finite differences along directions that keep the weights' total fixed."""
    u, v = _distinct(5, seed=5), _distinct(4, seed=6)
    # generic weights: no cumulative sum of a equals one of b (those are the kinks in the weights)
    a = torch.tensor([0.113, 0.297, 0.211, 0.243, 0.136], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.389, 0.127, 0.291, 0.193], dtype=torch.float64, requires_grad=True)
    cost = otloss.squared_hinge(0.1)
    f = otloss.ot_h_1d(u, v, cost, u_weights=a, v_weights=b)
    ga, gb = torch.autograd.grad(f, (a, b))
    for d_a, d_b in [
        (torch.tensor([1.0, -1, 0, 0, 0]), torch.zeros(4)),
        (torch.zeros(5), torch.tensor([0.0, 1, -1, 0])),
        (torch.tensor([0.5, 0, 0, -0.25, -0.25]), torch.tensor([-0.3, 0, 0, 0.3])),
    ]:
        d_a, d_b = d_a.double(), d_b.double()
        eps = 1e-6
        with torch.no_grad():
            plus = otloss.ot_h_1d(u, v, cost, u_weights=a + eps * d_a, v_weights=b + eps * d_b)
            minus = otloss.ot_h_1d(u, v, cost, u_weights=a - eps * d_a, v_weights=b - eps * d_b)
        fd = (plus - minus) / (2 * eps)
        assert float(fd) == approx(float((ga * d_a).sum() + (gb * d_b).sum()), torch.float64, "fd")


@pytest.mark.parametrize("cost", DIFF_COSTS, ids=ids)
def test_grad_is_permutation_held_fixed(cost):
    """d/du_k of mean_i h(u_(i) - v_(i)) = h'(u_k - v_(rank of u_k)) / n (paper, Appendix G)."""
    u, v = _distinct(7, seed=7), _distinct(7, seed=8) * 1.1
    otloss.ot_h_1d(u, v, cost).backward()
    rank = torch.argsort(torch.argsort(u.detach()))
    v_sorted = torch.sort(v.detach()).values
    expected = cost.grad(u.detach() - v_sorted[rank]) / 7
    torch.testing.assert_close(u.grad, expected)


@pytest.mark.parametrize("cost", DIFF_COSTS, ids=ids)
def test_cost_grad_matches_autograd_away_from_kinks(cost):
    z = torch.linspace(-3, 3, 61, dtype=torch.float64) + 0.0123
    torch.testing.assert_close(cost.grad(z), otloss.get_cost(cost.h).grad(z))


def test_pinned_values_at_kinks():
    z0 = torch.zeros(1, dtype=torch.float64)
    assert float(otloss.hinge(0.0).grad(z0)) == 0.0
    assert float(otloss.hinge(0.5).grad(torch.tensor([0.5], dtype=torch.float64))) == 0.0
    assert float(otloss.abs_pow(1.0).grad(z0)) == 0.0
    assert float(otloss.abs_pow(1.5).grad(z0)) == 0.0
    assert float(otloss.logistic(2.0).grad(z0)) == pytest.approx(-1.0)
    assert float(otloss.logistic(2.0, 0.25).grad(z0)) == pytest.approx(-2.0 * 0.5 / 2)
    assert float(otloss.logistic(2.0)(z0)) == pytest.approx(0.6931471805599453)
    assert float(otloss.zero_one()(z0)) == 0.0
    with pytest.raises(ValueError, match="no gradient"):
        otloss.zero_one().grad(z0)


def test_non_unit_upstream_gradient():
    u, v = _distinct(3, 6, seed=9), _distinct(3, 4, seed=10)
    cost = otloss.logistic(0.8)
    (g1,) = torch.autograd.grad(otloss.ot_h_1d(u, v, cost), u)
    (g2,) = torch.autograd.grad(2.5 * otloss.ot_h_1d(u, v, cost), u)
    torch.testing.assert_close(g2, 2.5 * g1)
    rows = otloss.ot_h_1d(u, v, cost, reduction="none")
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (g3,) = torch.autograd.grad(rows, u, grad_outputs=w)
    for r in range(3):
        (gr,) = torch.autograd.grad(otloss.ot_h_1d(u[r], v[r], cost), u)
        torch.testing.assert_close(g3[r], w[r] * gr[r])


def test_zero_one_result_has_no_grad():
    u = torch.randn(5, requires_grad=True)
    out = otloss.ot_h_1d(u, torch.randn(5), otloss.zero_one())
    assert not out.requires_grad
