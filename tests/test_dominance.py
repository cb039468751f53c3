"""Stochastic dominance: ratios against independent oracles, the bootstrap test, rankings, the multi-reward loss."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers import quantile_integral, requires_pot
from tolerances import tol

import otloss
from otloss import dominance as dom

F64 = tol(torch.float64, "value")
SINKHORN = tol(torch.float64, "sinkhorn")


def _neg2(z):
    return np.maximum(-z, 0.0) ** 2


def _oracle_ratio_1d(x, y):
    fwd = quantile_integral(x.numpy(), y.numpy(), _neg2)
    rev = quantile_integral(y.numpy(), x.numpy(), _neg2)
    return fwd / (fwd + rev)


@pytest.mark.parametrize(("n", "m"), [(50, 50), (37, 81)])
def test_1d_ratio_equals_quantile_integral(n, m):
    g = torch.Generator().manual_seed(n + m)
    x = torch.randn(n, generator=g, dtype=torch.float64) + 0.2
    y = 1.5 * torch.randn(m, generator=g, dtype=torch.float64)
    r = dom.violation_ratio(x, y)
    torch.testing.assert_close(r, torch.tensor(_oracle_ratio_1d(x, y), dtype=torch.float64), **F64)
    torch.testing.assert_close(r + dom.violation_ratio(y, x), torch.tensor(1.0, dtype=torch.float64), **F64)
    # the W2 reading: violation / W2^2
    w2 = otloss.ot_h_1d(x, y, otloss.abs_pow(2))
    torch.testing.assert_close(r * w2, otloss.ot_h_1d(x, y, otloss.squared_hinge(0.0)), **F64)


def test_1d_ratio_with_weights_matches_repeated_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, generator=g, dtype=torch.float64)
    y = torch.randn(12, generator=g, dtype=torch.float64)
    wx = torch.randint(1, 4, (10,), generator=g).double()
    r = dom.violation_ratio(x, y, x_weights=wx)
    torch.testing.assert_close(r, dom.violation_ratio(x.repeat_interleave(wx.long()), y), **F64)


def _lorenz_grid(v, t):
    q = np.sort(v)[np.minimum((t * len(v)).astype(int), len(v) - 1)]
    return np.cumsum(q) / len(t)


@pytest.mark.parametrize(("n", "m"), [(40, 40), (30, 55)])
def test_ssd_ratio_matches_grid_integration(n, m):
    g = torch.Generator().manual_seed(7 + n)
    x = torch.randn(n, generator=g, dtype=torch.float64) + 0.1
    y = 0.5 * torch.randn(m, generator=g, dtype=torch.float64)
    grid = 400_000
    t = (np.arange(grid) + 0.5) / grid
    D = _lorenz_grid(x.numpy(), t) - _lorenz_grid(y.numpy(), t)
    ref = np.sum(np.minimum(D, 0) ** 2) / np.sum(D**2)
    r = dom.violation_ratio(x, y, order=2)
    # special: the reference is a midpoint quadrature on 400k points, not exact
    assert abs(float(r) - ref) < 1e-4, (float(r), ref)
    torch.testing.assert_close(r + dom.violation_ratio(y, x, order=2), torch.tensor(1.0, dtype=torch.float64), **F64)


def test_ssd_is_weaker_than_fsd():
    # same mean, y more spread: x dominates y in the second order but not in the first
    g = torch.Generator().manual_seed(2)
    z = torch.randn(400, generator=g, dtype=torch.float64)
    x, y = z, 2 * z
    assert float(dom.violation_ratio(x, y)) > 0.3
    assert float(dom.violation_ratio(x, y, order=2)) <= tol(torch.float64, "parity")["atol"]
    assert float(dom.violation_ratio(y, x, order=2)) == pytest.approx(1.0)


def test_identical_samples_give_one_half():
    x = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    assert float(dom.violation_ratio(x, x.clone())) == 0.5
    assert float(dom.violation_ratio(x, x.clone(), order=2)) == 0.5


@requires_pot
def test_multivariate_entropic_matches_pot_sinkhorn2():
    import ot

    g = torch.Generator().manual_seed(4)
    x = torch.rand(25, 3, generator=g, dtype=torch.float64)
    y = torch.rand(30, 3, generator=g, dtype=torch.float64) - 0.1
    eps = 0.05
    r = dom.violation_ratio(x, y, epsilon=eps, tol=1e-12, max_iter=50_000)
    xn, yn = x.numpy(), y.numpy()
    Cf = (np.maximum(-(xn[:, None, :] - yn[None, :, :]), 0) ** 2).sum(-1)
    Cr = (np.maximum(-(yn[None, :, :] - xn[:, None, :]), 0) ** 2).sum(-1)
    a, b = np.full(25, 1 / 25), np.full(30, 1 / 30)
    kw = dict(method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
    f, rv = ot.sinkhorn2(a, b, Cf, eps, **kw), ot.sinkhorn2(a, b, Cr, eps, **kw)
    torch.testing.assert_close(r, torch.tensor(float(f / (f + rv)), dtype=torch.float64), **SINKHORN)
    torch.testing.assert_close(
        r + dom.violation_ratio(y, x, epsilon=eps, tol=1e-12, max_iter=50_000),
        torch.tensor(1.0, dtype=torch.float64),
        **SINKHORN,
    )


@requires_pot
def test_multivariate_with_one_metric_tends_to_1d():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(30, generator=g, dtype=torch.float64) + 0.05
    y = torch.rand(24, generator=g, dtype=torch.float64)
    exact = dom.violation_ratio(x, y)
    torch.testing.assert_close(dom.violation_ratio(x[:, None], y[:, None], epsilon=0), exact, **F64)
    errs = [
        abs(float(dom.violation_ratio(x[:, None], y[:, None], epsilon=e, tol=1e-8, max_iter=100_000)) - float(exact))
        for e in (1e-2, 3e-3, 1e-3)
    ]
    # special: the entropic bias at eps = 1e-3, which shrinks with eps, not a rounding error
    assert errs[-1] < 0.02 and errs[-1] < errs[0], errs


def test_dominance_by_design():
    g = torch.Generator().manual_seed(6)
    y = torch.randn(80, 3, generator=g, dtype=torch.float64)
    x = y + torch.randn(80, 3, generator=g, dtype=torch.float64).abs()
    r = float(dom.violation_ratio(x, y, epsilon=0.1, backend="torch"))
    assert r < 0.05, r  # special: near 0 by design, up to the entropic bias at eps = 0.1
    # special: both solves stop at the default marginal error tol=1e-6, so they agree to that, not to "sinkhorn"
    assert float(dom.violation_ratio(y, x, epsilon=0.1, backend="torch")) == pytest.approx(1 - r, abs=1e-6)
    # 1-D: exact zero under componentwise dominance
    assert float(dom.violation_ratio(x[:, 0], y[:, 0])) == 0.0
    assert float(dom.violation_ratio(y[:, 0], x[:, 0])) == 1.0


def test_smooth_costs_and_gradient():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(15, 2, generator=g, dtype=torch.float64)
    r = dom.violation_ratio(x, y, cost="logistic", beta=4.0, epsilon=0.1)
    assert 0 < float(r.detach()) < 1
    r.backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    assert float(dom.violation_ratio(x.detach()[:, 0], y[:, 0], cost="zero_one")) <= 1.0


def test_dominance_test_verdicts_and_reproducibility():
    g = torch.Generator().manual_seed(9)
    y = torch.randn(300, generator=g, dtype=torch.float64)
    x = torch.randn(300, generator=g, dtype=torch.float64) + 1.0
    res = dom.dominance_test(x, y, n_bootstrap=300, generator=torch.Generator().manual_seed(1))
    assert res.absolute and res.relative
    assert res.ci_low <= res.ratio <= res.ci_high and res.bootstrap.shape == (300,)
    again = dom.dominance_test(x, y, n_bootstrap=300, generator=torch.Generator().manual_seed(1))
    assert again.ratio == res.ratio and again.ci_high == res.ci_high
    rev = dom.dominance_test(y, x, n_bootstrap=300, generator=torch.Generator().manual_seed(1))
    assert not rev.absolute and not rev.relative
    assert rev.ratio == pytest.approx(1 - res.ratio)
    assert "violation ratio" in res.report() and "reject H0" in res.report()
    ssd = dom.dominance_test(x, y, order=2, n_bootstrap=100, generator=torch.Generator().manual_seed(1))
    assert ssd.absolute


def test_dominance_test_multivariate_small():
    g = torch.Generator().manual_seed(10)
    y = torch.rand(40, 2, generator=g, dtype=torch.float64)
    x = y + 0.3 * torch.rand(40, 2, generator=g, dtype=torch.float64)
    res = dom.dominance_test(x, y, n_bootstrap=8, generator=g, backend="torch")
    assert res.bootstrap.shape == (8,) and 0 <= res.ratio < 0.5


def _true_ratio_normals(mu1, s1, mu2, s2, grid=2_000_000):
    from scipy.stats import norm

    t = (np.arange(grid) + 0.5) / grid
    d = (mu1 - mu2) + (s1 - s2) * norm.ppf(t)
    return float(np.sum(np.minimum(d, 0) ** 2) / np.sum(d**2))


def _coverage(reps, n, n_boot, seed):
    truth = _true_ratio_normals(0.3, 1.0, 0.0, 1.5)
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(reps):
        x = 0.3 + torch.randn(n, generator=g, dtype=torch.float64)
        y = 1.5 * torch.randn(n, generator=g, dtype=torch.float64)
        res = dom.dominance_test(x, y, n_bootstrap=n_boot, alpha=0.1, generator=g)
        hits += res.ci_low <= truth <= res.ci_high
    return hits / reps


def test_bootstrap_coverage_small():
    # CI's small version: 40 repetitions; a 90% interval covering fewer than 70% would be a broken interval
    assert _coverage(40, 300, 200, seed=11) >= 0.7


@pytest.mark.slow
def test_bootstrap_coverage_nominal():
    # 200 repetitions of a 90% interval: the binomial s.e. is 2.1%, so [0.84, 0.96] is +-3 s.e.
    cov = _coverage(200, 1000, 400, seed=12)
    assert 0.84 <= cov <= 0.96, cov


def test_rank_models_borda_and_family_wise_control():
    g = torch.Generator().manual_seed(13)
    models = {f"m{i}": torch.randn(200, 2, generator=g, dtype=torch.float64) + 0.5 * i for i in range(4)}
    res = dom.rank_models(models, n_bootstrap=100, generator=g)
    assert res.order == ["m3", "m2", "m1", "m0"]
    assert res.one_vs_all.shape == (2, 4) and res.pairwise.shape == (2, 4, 4) and res.ranks.shape == (2, 4)
    torch.testing.assert_close(res.borda, torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64))
    assert bool(res.better[:, 3, 0].all()) and not bool(res.better[:, 0, 3].any())
    assert "m3" in res.report()
    # no real differences: Holm keeps the family-wise error rate, so no pair is declared better here
    same = [torch.randn(150, generator=g, dtype=torch.float64) for _ in range(4)]
    assert not bool(dom.rank_models(same, n_bootstrap=100, generator=g).better.any())


def test_rank_models_multivariate():
    g = torch.Generator().manual_seed(14)
    models = [torch.rand(30, 2, generator=g, dtype=torch.float64) + 0.4 * i for i in range(3)]
    res = dom.rank_models(models, aggregate="multivariate", n_bootstrap=4, generator=g, backend="torch")
    assert res.order == ["2", "1", "0"] and res.one_vs_all.shape == (1, 3)


def test_holm():
    p = torch.tensor([0.01, 0.04, 0.03, float("nan"), 0.5])
    assert dom._holm(p, 0.05).tolist() == [True, False, False, False, False]
    assert dom._holm(p, 0.2).tolist() == [True, True, True, False, False]


def test_multivariate_aot_loss_one_metric_exact_and_trains():
    g = torch.Generator().manual_seed(15)
    c = torch.randn(12, generator=g, dtype=torch.float64)
    r = torch.randn(9, generator=g, dtype=torch.float64)
    if importlib.util.find_spec("ot") is not None:
        torch.testing.assert_close(
            dom.multivariate_aot_loss(c, r, beta=1.0, epsilon=0), otloss.ot_h_1d(c, r, otloss.logistic(1.0)), **F64
        )
    chosen = torch.randn(64, 3, generator=g, requires_grad=True)
    rejected = torch.randn(64, 3, generator=g) + 0.5
    opt = torch.optim.SGD([chosen], lr=5.0)
    before = float(dom.violation_ratio(chosen.detach().double(), rejected.double(), epsilon=0.1))
    for _ in range(30):
        opt.zero_grad()
        loss = dom.multivariate_aot_loss(chosen, rejected, beta=1.0, epsilon=0.05)
        loss.backward()
        opt.step()
    after = float(dom.violation_ratio(chosen.detach().double(), rejected.double(), epsilon=0.1))
    assert after < before / 2, (before, after)


def test_multivariate_aot_loss_gradcheck():
    g = torch.Generator().manual_seed(16)
    c = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 2, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda t: dom.multivariate_aot_loss(
            t, r, beta=1.0, epsilon=0.3, grad="implicit", tol=1e-13, max_iter=100_000, backend="torch"
        ),
        (c,),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    g = torch.Generator().manual_seed(17)
    x = torch.randn(50, generator=g)
    y = torch.randn(40, generator=g)
    r = dom.violation_ratio(x.to(dtype), y.to(dtype))
    assert r.dtype == dtype
    ref = dom.violation_ratio(x.to(dtype).double(), y.to(dtype).double())
    torch.testing.assert_close(r.double(), ref, **tol(dtype, "value"))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: dom.violation_ratio(torch.rand(5, 2), torch.rand(5, 3)), ValueError, "same number of metrics"),
        (lambda: dom.violation_ratio(torch.rand(5, 2), torch.rand(5)), ValueError, "both be"),
        (lambda: dom.violation_ratio(torch.tensor([0.0, float("nan")]), torch.rand(3)), ValueError, "non-finite"),
        (lambda: dom.violation_ratio(torch.rand(1), torch.rand(3)), ValueError, "n >= 2"),
        (lambda: dom.violation_ratio(torch.rand(2, 2, 2), torch.rand(3)), ValueError, r"\[n, d\]"),
        (lambda: dom.violation_ratio(torch.rand(5), torch.rand(5).double()), TypeError, "same dtype"),
        (lambda: dom.violation_ratio([1.0, 2.0], torch.rand(5)), TypeError, "torch.Tensor"),
        (lambda: dom.violation_ratio(torch.rand(5), torch.rand(5), epsilon=0.1), ValueError, "epsilon applies"),
        (lambda: dom.violation_ratio(torch.rand(5, 2), torch.rand(5, 2), order=2), ValueError, "order=2"),
        (lambda: dom.violation_ratio(torch.rand(5), torch.rand(5), order=3), ValueError, "order must be"),
        (lambda: dom.violation_ratio(torch.rand(5), torch.rand(5), cost="cubic"), ValueError, "cost must be"),
        (
            lambda: dom.violation_ratio(torch.rand(5), torch.rand(5), cost=otloss.hinge(), beta=1.0),
            ValueError,
            "beta",
        ),
        (lambda: dom.violation_ratio(torch.rand(5, 2), torch.rand(5, 2), epsilon=-1.0), ValueError, "epsilon"),
        (
            lambda: dom.violation_ratio(torch.rand(5), torch.rand(5), x_weights=torch.ones(4)),
            ValueError,
            "x_weights",
        ),
        (
            lambda: dom.violation_ratio(torch.rand(5), torch.rand(5), x_weights=-torch.ones(5)),
            ValueError,
            "non-negative",
        ),
        (lambda: dom.dominance_test(torch.rand(5), torch.rand(5), alpha=1.5), ValueError, "alpha"),
        (lambda: dom.dominance_test(torch.rand(5), torch.rand(5), n_bootstrap=1), ValueError, "n_bootstrap"),
        (lambda: dom.dominance_test(torch.rand(5), torch.rand(5), threshold=0.0), ValueError, "threshold"),
        (lambda: dom.rank_models([torch.rand(5)]), ValueError, "at least 2"),
        (lambda: dom.rank_models([torch.rand(5), torch.rand(5)], aggregate="mean"), ValueError, "aggregate"),
        (lambda: dom.rank_models([torch.rand(5, 2), torch.rand(5, 3)]), ValueError, "same number of metrics"),
        (lambda: dom.multivariate_aot_loss(torch.rand(5, 2), torch.rand(5, 2), cost="zero_one"), ValueError, "cost"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_plots():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    g = torch.Generator().manual_seed(18)
    x, y = torch.randn(50, generator=g) + 1, torch.randn(50, generator=g)
    ax = dom.plot_dominance(dom.dominance_test(x, y, n_bootstrap=50, generator=g))
    assert len(ax.lines) == 3 and len(ax.patches) > 0
    models = {f"m{i}": torch.randn(40, 2, generator=g) + i for i in range(3)}
    ax = dom.plot_dominance(dom.rank_models(models, n_bootstrap=20, generator=g))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["m2", "m1", "m0"] and len(ax.patches) == 6
    with pytest.raises(TypeError, match="DominanceResult"):
        dom.plot_dominance(0.3)


def test_warm_started_replicates_equal_cold_solves():
    g = torch.Generator().manual_seed(19)
    x = torch.rand(30, 2, generator=g, dtype=torch.float64) + 0.05
    y = torch.rand(25, 2, generator=g, dtype=torch.float64)
    solver = {"max_iter": 50_000, "tol": 1e-12, "backend": "auto"}
    s = dom._Sampler(x, y, otloss.squared_hinge(0.0), 1, 0.05, solver)
    assert s.warm
    torch.testing.assert_close(s.full(), dom.violation_ratio(x, y, epsilon=0.05, tol=1e-12, max_iter=50_000), **F64)
    wx = dom._counts(30, 3, g, x.device, x.dtype)
    wy = dom._counts(25, 3, g, x.device, x.dtype)
    warm = s.resampled(wx, wy)
    cold = torch.stack([dom._ratio_from_costs(s.C2, wx[r], wy[r], 0.05, solver) for r in range(3)])
    torch.testing.assert_close(warm, cold, **SINKHORN)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("scale", [1e-23, 1e-30, 1e20, 1e30])
def test_the_ratio_does_not_depend_on_the_scale_of_the_samples(order, scale):
    # float32 squares of tiny values underflow (0 / 0 read as a tie) and of huge ones overflow
    x, y = torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1.0, 1.5, 4.0])
    want = dom.violation_ratio(x.double(), y.double(), order=order).item()
    assert want not in (0.0, 0.5, 1.0) or order == 2
    assert dom.violation_ratio(x * scale, y * scale, order=order).item() == pytest.approx(want, rel=1e-5)
    for cost in ("hinge", "zero_one"):
        if order == 1:
            got = dom.violation_ratio(x * scale, y * scale, cost=cost).item()
            assert got == pytest.approx(dom.violation_ratio(x, y, cost=cost).item(), rel=1e-5)
    # the gradient follows the scale: d ratio / dx at x * scale is (d ratio / dx) / scale
    xs = (x.double() * scale).requires_grad_(True)
    dom.violation_ratio(xs, y.double() * scale, order=order).backward()
    xd = x.double().requires_grad_(True)
    dom.violation_ratio(xd, y.double(), order=order).backward()
    torch.testing.assert_close(xs.grad * scale, xd.grad)


def test_tests_and_rankings_of_tiny_samples_and_the_entropic_ratio_with_its_epsilon():
    x, y = torch.tensor([0.0, 2.0, 3.0, 1.0]), torch.tensor([1.0, 1.5, 4.0, 2.0])
    g = torch.Generator()
    small = dom.dominance_test(x * 1e-23, y * 1e-23, n_bootstrap=20, generator=g.manual_seed(0))
    plain = dom.dominance_test(x, y, n_bootstrap=20, generator=g.manual_seed(0))
    assert small.ratio == pytest.approx(plain.ratio, rel=1e-5) and small.ratio not in (0.5,)
    torch.testing.assert_close(small.bootstrap, plain.bootstrap)
    ranked = dom.rank_models({"a": x * 1e-23, "b": y * 1e-23}, n_bootstrap=10, generator=g.manual_seed(0))
    torch.testing.assert_close(ranked.pairwise, dom.rank_models({"a": x, "b": y}, n_bootstrap=10).pairwise)
    # the joint (entropic) ratio: with epsilon in the units of the cost, scaling both keeps the ratio
    X = torch.rand(6, 2, generator=g.manual_seed(0))
    Y = torch.rand(5, 2, generator=g.manual_seed(1))
    want = dom.violation_ratio(X, Y, backend="torch")
    got = dom.violation_ratio(X * 64.0, Y * 64.0, epsilon=0.02 * 64.0**2, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_nan_ratio_is_not_reported_as_a_tie():
    x, y = torch.tensor([0.0, float("nan"), 3.0]), torch.tensor([1.0, 1.5, 4.0])
    assert torch.isnan(dom.violation_ratio(x, y, validate_args=False))
    assert torch.isnan(dom.violation_ratio(x, y, order=2, validate_args=False))
    same = torch.tensor([1.0, 2.0, 3.0])
    assert dom.violation_ratio(same, same.clone()).item() == 0.5  # tied samples: 0 / 0 is a tie


@pytest.mark.parametrize("order", [1, 2])
def test_huge_finite_weights_give_the_ratio_of_moderate_ones(order):
    x, y = torch.tensor([0.0, 2.0, 3.0]), torch.tensor([1.0, 1.5, 4.0])
    w = torch.tensor([1.0, 2.0, 1.0])
    want = dom.violation_ratio(x, y, x_weights=w, order=order)
    for big in (w * 1e38, w.double() * 1e300):
        torch.testing.assert_close(dom.violation_ratio(x, y, x_weights=big, order=order), want)


def test_one_d_ratios_keep_tiny_differences_next_to_large_values():
    T = torch.tensor
    # float64 costs: a difference of 1e-20 next to values of 1000 is not flushed to a tie
    assert dom.violation_ratio(T([0.0, 1000.0]), T([1e-20, 1000.0])).item() == 1.0
    assert dom.violation_ratio(T([0.0, 1e6]), T([1e-17, 1e6])).item() == 1.0
    r = dom.dominance_test(T([0.0, 1000.0, 5.0]), T([1e-20, 1000.0, 5.0]), n_bootstrap=4)
    assert r.ratio == 1.0
    assert dom.violation_ratio(T([1e-20, 3e30]), T([2e-20, 1e30]), cost="zero_one").item() == 0.5
    # float32 subnormals
    x, y = T([0.0, 2e-42, 3e-42]), T([1e-42, 1.5e-42, 4e-42])
    assert dom.violation_ratio(x, y, cost="hinge").item() == pytest.approx(0.8, rel=1e-3)
    assert dom.violation_ratio(x, y, cost="zero_one").item() == pytest.approx(2 / 3, rel=1e-6)
    # a pair's ratio in a ranking does not depend on the other models
    a, b = T([0.0, 1.0, 0.5]), T([1e-20, 1.0, 0.5])
    two = dom.rank_models({"a": a, "b": b}, n_bootstrap=4).pairwise
    three = dom.rank_models({"a": a, "b": b, "c": T([1e6, 1e6, 1e6])}, n_bootstrap=4).pairwise
    assert two[0, 0, 1].item() == three[0, 0, 1].item() == 1.0


def test_violation_ratio_under_vmap_and_per_example_gradients():
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(3, 6, generator=g), torch.randn(5, generator=g)
    f = lambda x: dom.violation_ratio(x, y, validate_args=False)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f)(X), torch.stack([f(x) for x in X]))
    per = torch.func.vmap(torch.func.grad(f))(X)
    for i in range(3):
        xi = X[i].clone().requires_grad_(True)
        f(xi).backward()
        torch.testing.assert_close(per[i], xi.grad)


def test_weighted_ratios_on_meta_and_numpy_levels():
    m = torch.empty(5, device="meta")
    out = dom.violation_ratio(m, torch.empty(4, device="meta"), x_weights=torch.empty(5, device="meta"))
    assert out.device.type == "meta" and out.shape == ()
    x, y = torch.rand(6), torch.rand(5)
    g = torch.Generator()
    numpy_levels = dict(alpha=np.float64(0.05), threshold=np.float32(0.25), n_bootstrap=np.int32(4))
    a = dom.dominance_test(x, y, generator=g.manual_seed(0), **numpy_levels)
    b = dom.dominance_test(x, y, n_bootstrap=4, generator=g.manual_seed(0))
    assert torch.equal(a.bootstrap, b.bootstrap) and (a.ratio, a.ci_low, a.upper_bound) == (
        b.ratio,
        b.ci_low,
        b.upper_bound,
    )
    assert type(a.alpha) is float and type(a.threshold) is float and type(a.absolute) is bool
    with pytest.raises(TypeError, match="alpha must be a real number, got str"):
        dom.dominance_test(x, y, alpha="0.05")
