"""entropic_ot against POT (ot.sinkhorn2, ot.emd2) and the sorted 1-D solver; gradients, padding, batches, errors."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import requires_pot
from tolerances import tol

import otloss
from otloss import entropic as ent

F64 = tol(torch.float64, "value")
BACKENDS = ["torch", pytest.param("pot", marks=requires_pot)]
TIGHT = {"tol": 1e-13, "max_iter": 100_000}  # float64 runs converged to the last digits


def _problem(B=3, n=7, m=9, d=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=dtype)
    y = torch.randn(B, m, d, generator=g, dtype=dtype) + 0.3
    a = torch.rand(B, n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(B, m, generator=g, dtype=dtype) + 0.1
    return torch.cdist(x, y) ** 2, a, b


@requires_pot
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.2, 1.0, 3.0])
def test_equals_pot_sinkhorn2(backend, eps):
    import ot

    C, a, b = _problem()
    ours = otloss.entropic_ot(C, a, b, epsilon=eps, backend=backend, **TIGHT)
    for k in range(C.shape[0]):
        an, bn = (a[k] / a[k].sum()).numpy(), (b[k] / b[k].sum()).numpy()
        ref = ot.sinkhorn2(an, bn, C[k].numpy(), eps, method="sinkhorn_log", stopThr=1e-14, numItermax=50_000)
        torch.testing.assert_close(ours[k], torch.tensor(float(ref), dtype=torch.float64), **F64)


@requires_pot
@pytest.mark.parametrize("backend", BACKENDS)
def test_at_least_exact_and_tends_to_it(backend):
    import ot

    C, a, b = _problem(B=2, n=6, m=5)
    exact = torch.tensor(
        [ot.emd2((a[k] / a[k].sum()).numpy(), (b[k] / b[k].sum()).numpy(), C[k].numpy()) for k in range(2)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(otloss.entropic_ot(C, a, b, epsilon=0), exact, **F64)
    gaps = []
    for eps in [1.0, 0.3, 0.1, 0.03, 0.01]:
        v = otloss.entropic_ot(C, a, b, epsilon=eps, backend=backend, **TIGHT)
        assert bool((v >= exact - tol(torch.float64, "parity")["atol"]).all()), (eps, v, exact)
        gaps.append(float((v - exact).max()))
    assert gaps == sorted(gaps, reverse=True)
    # special: the gap is O(eps log(1/eps)) for a unique LP optimum; at eps = 0.01 it is far below the problem's scale
    assert gaps[-1] < 1e-2 * float(exact.min())


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimension_matches_sorted_solver(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, generator=g, dtype=torch.float64)
    y = torch.randn(25, generator=g, dtype=torch.float64) + 0.5
    cost = otloss.squared_hinge(0.0)
    C = cost(x[:, None] - y[None, :])
    exact = otloss.ot_h_1d(x, y, cost)
    if backend == "pot":
        torch.testing.assert_close(otloss.entropic_ot(C, epsilon=0), exact, **F64)
    kw = dict(backend=backend, tol=1e-10, max_iter=20_000)
    vals = [float(otloss.entropic_ot(C, epsilon=e, **kw)) for e in (0.1, 0.03, 0.01)]
    assert all(v >= float(exact) - tol(torch.float64, "parity")["atol"] for v in vals)
    # special: the entropic gap is O(eps log(1/eps)); at eps = 0.01 (1% of this problem's cost range ~1) it is a few percent
    assert abs(vals[-1] - float(exact)) < 5e-2 * float(exact)
    assert vals == sorted(vals, reverse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_implicit_float64(backend):
    C, a, b = _problem(B=2, n=4, m=5)
    a[0, 1] = 0.0  # a padded row in the problem
    C = C.clone().requires_grad_(True)

    def f(c):
        return otloss.entropic_ot(c, a, b, epsilon=0.4, grad="implicit", backend=backend, **TIGHT)

    assert torch.autograd.gradcheck(f, (C,), **tol(torch.float64, "fd"))
    # a non-unit upstream gradient reaches the backward's scaling
    (2 * f(C)).sum().backward()
    g2 = C.grad.clone()
    C.grad = None
    f(C).sum().backward()
    torch.testing.assert_close(g2, 2 * C.grad, **F64)


def test_gradcheck_implicit_more_rows_than_columns():
    C, a, b = _problem(B=1, n=6, m=3)
    C = C.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda c: otloss.entropic_ot(c, a, b, epsilon=0.7, grad="implicit", backend="torch", **TIGHT), (C,)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_envelope_gradient_is_the_plan_and_reaches_points(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)
    C = torch.cdist(x, y) ** 2
    value, plan = otloss.entropic_ot(C, epsilon=0.2, backend=backend, return_plan=True, **TIGHT)
    assert not plan.requires_grad
    (gC,) = torch.autograd.grad(value.sum(), C, retain_graph=True)
    torch.testing.assert_close(gC, plan, **F64)
    value.sum().backward()
    (ref,) = torch.autograd.grad((plan * (torch.cdist(x, y) ** 2)).sum(), x)
    torch.testing.assert_close(x.grad, ref, **F64)
    # the envelope gradient is the exact gradient of the regularised objective: it matches finite differences of
    # <P, C> + eps KL(P || a b^T) along a random direction
    eps = 0.2

    def reg_obj(c):
        _, p = otloss.entropic_ot(c, epsilon=eps, backend=backend, return_plan=True, **TIGHT)
        ab = torch.full_like(p, 1.0 / (p.shape[-1] * p.shape[-2]))
        return ((p * c).sum((-2, -1)) + eps * (p * (p / ab).log()).sum((-2, -1))).sum()

    D = torch.randn(C.shape, generator=g, dtype=torch.float64)
    h = 1e-5
    fd = (reg_obj(C.detach() + h * D) - reg_obj(C.detach() - h * D)) / (2 * h)
    torch.testing.assert_close(fd, (gC * D).sum(), **tol(torch.float64, "fd"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", ["envelope", "implicit"])
def test_zero_weight_padding_equals_unpadded(backend, grad):
    C, a, b = _problem(B=2, n=5, m=6)
    Cp = torch.cat([C, 50 * torch.rand(2, 3, 6, dtype=torch.float64)], 1)
    Cp = torch.cat([Cp, 50 * torch.rand(2, 8, 2, dtype=torch.float64)], 2).requires_grad_(True)
    ap = torch.cat([a, torch.zeros(2, 3, dtype=torch.float64)], 1)
    bp = torch.cat([b, torch.zeros(2, 2, dtype=torch.float64)], 1)
    C = C.clone().requires_grad_(True)
    kw = dict(epsilon=0.3, backend=backend, grad=grad, return_plan=True, **TIGHT)
    v, p = otloss.entropic_ot(C, a, b, **kw)
    vp, pp = otloss.entropic_ot(Cp, ap, bp, **kw)
    torch.testing.assert_close(vp, v, **F64)
    torch.testing.assert_close(pp[:, :5, :6], p, **F64)
    assert float(pp[:, 5:].abs().max()) == 0.0 and float(pp[:, :, 6:].abs().max()) == 0.0
    v.sum().backward()
    vp.sum().backward()
    torch.testing.assert_close(Cp.grad[:, :5, :6], C.grad, **tol(torch.float64, "sinkhorn"))
    assert float(Cp.grad[:, 5:].abs().max()) == 0.0


@requires_pot
def test_zero_weight_padding_exact_lp():
    C, a, b = _problem(B=2, n=5, m=6)
    Cp = torch.cat([C, torch.rand(2, 2, 6, dtype=torch.float64)], 1)
    ap = torch.cat([a, torch.zeros(2, 2, dtype=torch.float64)], 1)
    torch.testing.assert_close(otloss.entropic_ot(Cp, ap, b, epsilon=0), otloss.entropic_ot(C, a, b, epsilon=0), **F64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_loop_and_unbatched_shapes(backend):
    C, a, b = _problem(B=4, n=6, m=3)
    batched, plans = otloss.entropic_ot(C, a, b, epsilon=0.2, backend=backend, return_plan=True, **TIGHT)
    assert batched.shape == (4,) and plans.shape == (4, 6, 3)
    for k in range(4):
        single, plan = otloss.entropic_ot(C[k], a[k], b[k], epsilon=0.2, backend=backend, return_plan=True, **TIGHT)
        assert single.shape == () and plan.shape == (6, 3)
        torch.testing.assert_close(single, batched[k], **F64)
        torch.testing.assert_close(plan, plans[k], **F64)
        torch.testing.assert_close(plan.sum(-1), a[k] / a[k].sum(), **F64)
        torch.testing.assert_close(plan.sum(-2), b[k] / b[k].sum(), **F64)
    # weights shared by the whole batch ([n]) broadcast
    torch.testing.assert_close(
        otloss.entropic_ot(C, a[0], b[0], epsilon=0.2, backend=backend, **TIGHT),
        otloss.entropic_ot(C, a[0].expand(4, 6), b[0].expand(4, 3), epsilon=0.2, backend=backend, **TIGHT),
        **F64,
    )


@requires_pot
def test_backends_agree():
    C, a, b = _problem(B=3, n=30, m=20)
    torch.testing.assert_close(
        otloss.entropic_ot(C, a, b, epsilon=0.1, backend="torch", **TIGHT),
        otloss.entropic_ot(C, a, b, epsilon=0.1, backend="pot", **TIGHT),
        **F64,
    )


def test_weights_need_not_sum_to_one_and_scale_covariance():
    C, a, b = _problem()
    ref = otloss.entropic_ot(C, a, b, epsilon=0.3, backend="torch", **TIGHT)
    torch.testing.assert_close(otloss.entropic_ot(C, 7 * a, b / 3, epsilon=0.3, backend="torch", **TIGHT), ref, **F64)
    # epsilon is in the units of the cost: OT(s C, s eps) = s OT(C, eps), here with a huge s
    s = 1e6
    torch.testing.assert_close(
        otloss.entropic_ot(s * C, a, b, epsilon=0.3 * s, backend="torch", **TIGHT) / s, ref, **F64
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_computed_in_float32(dtype):
    C, a, b = _problem(dtype=torch.float64)
    Cl = C.to(dtype)
    v = otloss.entropic_ot(Cl, a.to(dtype), b.to(dtype), epsilon=0.3, backend="torch")
    assert v.dtype == dtype
    ref = otloss.entropic_ot(Cl.double(), a.to(dtype).double(), b.to(dtype).double(), epsilon=0.3, backend="torch")
    # the inputs are rounded to dtype; the solve itself runs in float32 (one float32 rounding of the result + tol)
    f32 = tol(torch.float32, "value")
    torch.testing.assert_close(v.double(), ref, rtol=max(tol(dtype, "value")["rtol"], f32["rtol"]), atol=f32["atol"])


def test_non_convergence_warns():
    C, a, b = _problem()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        otloss.entropic_ot(C, a, b, epsilon=0.01, max_iter=2, backend="torch")


def test_without_pot(monkeypatch):
    monkeypatch.setattr(ent, "_pot_batch", lambda: None)
    monkeypatch.setitem(sys.modules, "ot", None)
    C, a, b = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = otloss.entropic_ot(C, a, b, epsilon=0.3, **TIGHT)
    torch.testing.assert_close(v, otloss.entropic_ot(C, a, b, epsilon=0.3, backend="torch", **TIGHT), **F64)
    with pytest.raises(ImportError, match=r"torch-otloss\[pot\]"):
        otloss.entropic_ot(C, epsilon=0.3, backend="pot")
    with pytest.raises(ImportError, match=r"torch-otloss\[pot\]"):
        otloss.entropic_ot(C, epsilon=0)


@requires_pot
def test_exact_lp_too_large(monkeypatch):
    monkeypatch.setattr(ent, "EXACT_MAX_SIZE", 10)
    with pytest.raises(ValueError, match="exact LP"):
        otloss.entropic_ot(torch.rand(4, 4), epsilon=0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(cost=torch.rand(5)), ValueError, "at least 2"),
        (dict(cost=torch.rand(2, 2, 3, 3)), ValueError, r"\[n, m\] or \[batch, n, m\]"),
        (dict(cost=torch.zeros(0, 3)), ValueError, "non-empty"),
        (dict(cost=torch.ones(3, 3, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(cost=[[1.0]]), TypeError, "torch.Tensor"),
        (dict(cost=torch.tensor([[1.0, float("nan")]])), ValueError, "non-finite"),
        (dict(cost=torch.tensor([[1.0, float("inf")]])), ValueError, "non-finite"),
        (dict(a=torch.ones(4)), ValueError, r"a must have shape \[3\]"),
        (dict(b=torch.ones(2, 4)), ValueError, r"b must have shape \[4\]"),
        (dict(a=torch.tensor([1.0, -1.0, 1.0])), ValueError, "non-negative"),
        (dict(a=torch.zeros(3)), ValueError, "positive sum"),
        (dict(b=torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, "non-finite"),
        (dict(a=torch.ones(3, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(a=torch.ones(3, requires_grad=True)), ValueError, "requires grad"),
        (dict(epsilon=-0.1), ValueError, "epsilon must be >= 0"),
        (dict(epsilon=float("nan")), ValueError, "epsilon must be finite"),
        (dict(epsilon=True), TypeError, "epsilon must be a real number"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(tol=0.0), ValueError, "tol must be > 0"),
        (dict(backend="jax"), ValueError, "backend"),
        (dict(grad="unrolled"), ValueError, "grad"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(cost=torch.rand(3, 4), a=None, b=None, epsilon=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        otloss.entropic_ot(args.pop("cost"), args.pop("a"), args.pop("b"), **args)


def test_batched_weights_rejected_for_unbatched_cost():
    with pytest.raises(ValueError, match=r"a must have shape \[3\] to match"):
        otloss.entropic_ot(torch.rand(3, 4), torch.ones(1, 3), epsilon=0.1)


def test_entropic_ot_in_public_api():
    assert otloss.entropic_ot is ent.entropic_ot
    assert "entropic_ot" in otloss.__all__
    np.testing.assert_equal(ent.__all__, sorted(ent.__all__))


def test_an_infinite_cost_entry_ends_instead_of_looping_forever():
    # the epsilon-scaling warm-up starts from the largest finite |C| (inf / 2 stays inf)
    C = torch.tensor([[[0.0, float("inf")], [1.0, 0.0]]])
    with pytest.raises(ValueError, match="cost contains non-finite"):
        otloss.entropic_ot(C, epsilon=0.1, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = otloss.entropic_ot(C, epsilon=0.1, validate_args=False, backend="torch")
    assert out.shape == (1,)
    # finite embeddings whose float32 token cost overflows: a clear error, not a hang
    E = torch.tensor([[1.2e19], [-1.2e19]])
    logits, labels = torch.tensor([[[20.0, -20.0], [-20.0, 20.0]]]), torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="overflowed"):
        otloss.token_ot_loss(logits, labels, E, cost="sqeuclidean", solver_options={"backend": "torch"})


@pytest.mark.parametrize("backend", ["torch", pytest.param("pot", marks=requires_pot)])
def test_huge_finite_weights_give_the_value_of_moderate_ones(backend):
    C = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([3.0, 3.0, 1.0])
    want = otloss.entropic_ot(C, w, epsilon=0.1, backend=backend)
    for big in (w * 1e38, w.double() * 1e300):  # float32 sums would overflow; float64 casts would
        torch.testing.assert_close(otloss.entropic_ot(C, big, epsilon=0.1, backend=backend), want)


@requires_pot
def test_implicit_gradient_is_pots_and_envelope_is_the_plan():
    import ot

    g = torch.Generator().manual_seed(0)
    C = torch.rand(4, 6, generator=g, dtype=torch.float64)
    a, b = torch.full((4,), 0.25, dtype=torch.float64), torch.full((6,), 1 / 6, dtype=torch.float64)
    M = C.clone().requires_grad_(True)
    ot.sinkhorn2(a, b, M, 0.1, numItermax=20_000, stopThr=1e-14).backward()
    grads = {}
    for mode in ("envelope", "implicit"):
        X = C.clone().requires_grad_(True)
        otloss.entropic_ot(X, a, b, epsilon=0.1, grad=mode, tol=1e-13, max_iter=100_000).backward()
        grads[mode] = X.grad
    torch.testing.assert_close(grads["implicit"], M.grad, rtol=0, atol=1e-10)
    _, plan = otloss.entropic_ot(C, a, b, epsilon=0.1, tol=1e-13, max_iter=100_000, return_plan=True)
    torch.testing.assert_close(grads["envelope"], plan, rtol=0, atol=1e-12)
    assert (grads["envelope"] - M.grad).abs().max() > 1e-3  # the two modes differ at eps = 0.1
