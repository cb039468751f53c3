"""``otloss.sliced_ot``: against POT's sliced Wasserstein with the same directions, the exact 1-D answer for d = 1,
the batched form, random directions, gradients, low precision and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import quantile_integral
from tolerances import tol

import otloss
from otloss.sliced import DEFAULT_N_PROJECTIONS, random_projections, sliced_ot

F64 = torch.float64


def _problem(n=30, m=45, d=4, L=20, *, dtype=F64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=F64, generator=g)
    y = torch.randn(m, d, dtype=F64, generator=g) * 1.5 + 0.3
    a = torch.rand(n, dtype=F64, generator=g) + 0.1
    b = torch.rand(m, dtype=F64, generator=g) + 0.1
    P = random_projections(L, d, generator=g, dtype=F64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, y, a, b, P))


# ------------------------------------------------------------------ oracles


@pytest.mark.requires_pot
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sizes", [(30, 45), (40, 40)])
def test_matches_pot_with_the_same_projections(p, weighted, sizes):
    import ot

    x, y, a, b, P = _problem(*sizes)
    if not weighted:
        a = b = None
    ours = sliced_ot(x, y, otloss.abs_pow(p), projections=P, u_weights=a, v_weights=b)
    # POT: directions as columns [d, L], normalised weights, and the p-th root of the mean of W_p^p
    pot = ot.sliced_wasserstein_distance(
        x, y, None if a is None else a / a.sum(), None if b is None else b / b.sum(), p=p, projections=P.T
    )
    torch.testing.assert_close(ours, pot**p, **tol(F64, "value"))
    torch.testing.assert_close(ours ** (1 / p), pot, **tol(F64, "value"))


@pytest.mark.requires_pot
def test_float32_matches_pot_in_float64():
    import ot

    x, y, a, b, P = _problem(200, 150, d=8, L=64)
    ours = sliced_ot(
        x.float(), y.float(), otloss.abs_pow(2), projections=P.float(), u_weights=a.float(), v_weights=b.float()
    )
    pot = ot.sliced_wasserstein_distance(x, y, a / a.sum(), b / b.sum(), p=2, projections=P.T)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), pot**2, **tol(torch.float32, "value"))


@pytest.mark.parametrize("cost", [otloss.abs_pow(1), otloss.abs_pow(2), otloss.abs_pow(1.5)], ids=repr)
@pytest.mark.parametrize("weighted", [False, True])
def test_d1_random_directions_give_the_exact_1d_answer(cost, weighted):
    # in d = 1 the unit directions are +1 and -1; an even cost gives OT_h(x, y) for both
    x, y, a, b, _ = _problem(13, 21, d=1)
    if not weighted:
        a = b = None
    ours = sliced_ot(x, y, cost, n_projections=7, generator=torch.Generator().manual_seed(3), u_weights=a, v_weights=b)
    exact = quantile_integral(x[:, 0], y[:, 0], lambda z: cost(torch.from_numpy(z)).numpy(), a, b)
    torch.testing.assert_close(ours, torch.tensor(exact, dtype=F64), **tol(F64, "value"))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_d1_given_direction_with_a_cost_that_is_not_even(sign):
    x, y, a, b, _ = _problem(13, 21, d=1)
    h = otloss.logistic(0.7)
    ours = sliced_ot(x, y, h, projections=torch.tensor([[sign]], dtype=F64), u_weights=a, v_weights=b)
    exact = quantile_integral(sign * x[:, 0], sign * y[:, 0], lambda z: h(torch.from_numpy(z)).numpy(), a, b)
    torch.testing.assert_close(ours, torch.tensor(exact, dtype=F64), **tol(F64, "value"))
    other = sliced_ot(x, y, h, projections=torch.tensor([[-sign]], dtype=F64), u_weights=a, v_weights=b)
    assert not torch.allclose(ours, other)  # theta and -theta differ for a cost that is not even


def test_value_is_the_mean_of_ot_h_1d_over_directions():
    x, y, a, b, P = _problem(9, 11, d=3, L=5)
    h = otloss.squared_hinge(0.2)
    per_direction = [
        otloss.ot_h_1d(x @ P[i], y @ P[i], h, u_weights=a, v_weights=b, backend="torch") for i in range(len(P))
    ]
    ours = sliced_ot(x, y, h, projections=P, u_weights=a, v_weights=b)
    torch.testing.assert_close(ours, torch.stack(per_direction).mean(), **tol(F64, "value"))


# ------------------------------------------------------------------ properties


def test_given_projections_are_used_as_is():
    x, y, _, _, P = _problem(10, 12, d=3, L=6)
    base = sliced_ot(x, y, otloss.abs_pow(2), projections=P)
    # not normalised: a direction of norm 3 scales its squared-distance term by 9
    torch.testing.assert_close(sliced_ot(x, y, otloss.abs_pow(2), projections=3 * P), 9 * base, **tol(F64, "value"))


def test_even_cost_is_symmetric_and_translation_invariant():
    x, y, a, b, P = _problem(10, 14, d=3, L=8)
    h = otloss.abs_pow(2)
    v = sliced_ot(x, y, h, projections=P, u_weights=a, v_weights=b)
    torch.testing.assert_close(sliced_ot(y, x, h, projections=P, u_weights=b, v_weights=a), v, **tol(F64, "value"))
    c = torch.tensor([5.0, -2.0, 0.5], dtype=F64)
    torch.testing.assert_close(
        sliced_ot(x + c, y + c, h, projections=P, u_weights=a, v_weights=b), v, **tol(F64, "value")
    )


def test_zero_weight_drops_a_sample():
    x, y, a, b, P = _problem(10, 14, d=3, L=8)
    a[3] = 0.0
    keep = torch.arange(10) != 3
    ours = sliced_ot(x, y, otloss.abs_pow(2), projections=P, u_weights=a, v_weights=b)
    dropped = sliced_ot(x[keep], y, otloss.abs_pow(2), projections=P, u_weights=a[keep], v_weights=b)
    torch.testing.assert_close(ours, dropped, **tol(F64, "value"))


def test_ties_and_identical_clouds():
    x, _, _, _, P = _problem(6, 6, d=3, L=8)
    x = torch.cat([x, x])  # every point twice
    assert float(sliced_ot(x, x.flip(0), otloss.abs_pow(1), projections=P)) == 0.0
    # identical points: every direction sees one atom per cloud
    z = torch.zeros(5, 3, dtype=F64)
    o = torch.ones(4, 3, dtype=F64)
    expected = (P.sum(-1) ** 2).mean()
    torch.testing.assert_close(sliced_ot(z, o, otloss.abs_pow(2), projections=P), expected, **tol(F64, "value"))


# ------------------------------------------------------------------ batched form


@pytest.mark.parametrize("shared", [True, False])
def test_batched_form_matches_one_call_per_problem(shared):
    g = torch.Generator().manual_seed(1)
    B, n, m, d, L = 3, 8, 11, 4, 6
    x = torch.randn(B, n, d, dtype=F64, generator=g)
    y = torch.randn(B, m, d, dtype=F64, generator=g)
    a = torch.rand(B, n, dtype=F64, generator=g) + 0.1
    b = torch.rand(m, dtype=F64, generator=g) + 0.1  # broadcast over the batch
    P = random_projections(L, d, generator=g, dtype=F64) if shared else torch.randn(B, L, d, dtype=F64, generator=g)
    h = otloss.abs_pow(2)
    rows = sliced_ot(x, y, h, projections=P, u_weights=a, v_weights=b, reduction="none")
    loop = torch.stack(
        [sliced_ot(x[i], y[i], h, projections=P if shared else P[i], u_weights=a[i], v_weights=b) for i in range(B)]
    )
    assert rows.shape == (B,)
    torch.testing.assert_close(rows, loop, **tol(F64, "value"))
    mean = sliced_ot(x, y, h, projections=P, u_weights=a, v_weights=b)
    total = sliced_ot(x, y, h, projections=P, u_weights=a, v_weights=b, reduction="sum")
    torch.testing.assert_close(mean, loop.mean(), **tol(F64, "value"))
    torch.testing.assert_close(total, loop.sum(), **tol(F64, "value"))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_one_problem_gives_a_scalar(reduction):
    x, y, _, _, P = _problem(5, 6, d=2, L=3)
    assert sliced_ot(x, y, "abs_pow", projections=P, reduction=reduction).shape == ()


# ------------------------------------------------------------------ random directions


def test_random_directions_come_from_the_generator():
    x, y, *_ = _problem(10, 12, d=5)
    h = otloss.abs_pow(2)
    drawn = sliced_ot(x, y, h, n_projections=17, generator=torch.Generator().manual_seed(7))
    P = random_projections(17, 5, generator=torch.Generator().manual_seed(7), dtype=F64)
    torch.testing.assert_close(drawn, sliced_ot(x, y, h, projections=P), **tol(F64, "value"))
    other = sliced_ot(x, y, h, n_projections=17, generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(drawn, other)
    torch.manual_seed(0)
    first = sliced_ot(x, y, h)  # the global generator, DEFAULT_N_PROJECTIONS directions
    torch.manual_seed(0)
    torch.testing.assert_close(sliced_ot(x, y, h, n_projections=DEFAULT_N_PROJECTIONS), first, rtol=0, atol=0)


def test_random_directions_are_uniform_on_the_sphere():
    d, L = 3, 20_000
    P = random_projections(L, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert P.shape == (L, d) and P.dtype == F64
    torch.testing.assert_close(P.norm(dim=-1), torch.ones(L, dtype=F64), **tol(F64, "value"))
    # special, Monte Carlo: E[theta theta^T] = I / d for the uniform law on the sphere (sd of each entry ~ 0.3 / sqrt(L))
    torch.testing.assert_close(P.T @ P / L, torch.eye(d, dtype=F64) / d, rtol=0, atol=0.01)
    # through sliced_ot: shifting a cloud by t gives (theta . t)^2 on every direction, whose mean is |t|^2 / d
    # (special, Monte Carlo over L directions: relative sd ~ 0.6% at L = 20k, so 3% is 5 sd)
    x = torch.randn(16, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    value = sliced_ot(x, x + t, otloss.abs_pow(2), n_projections=L, generator=torch.Generator().manual_seed(2))
    assert float(value) == pytest.approx(float(t @ t) / d, rel=0.03)


def test_random_projections_dtype_and_device():
    P = random_projections(4, 3, dtype=torch.bfloat16)
    assert P.dtype == torch.bfloat16 and P.device.type == "cpu"
    with pytest.raises(TypeError, match="dtype"):
        random_projections(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="n_projections"):
        random_projections(0, 3)
    with pytest.raises(ValueError, match="d must"):
        random_projections(4, 0)


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("cost", [otloss.abs_pow(2), otloss.abs_pow(1.5), otloss.logistic(0.5)], ids=repr)
def test_gradcheck_float64(cost):
    x, y, a, b, P = _problem(7, 5, d=3, L=4, seed=2)
    inputs = tuple(t.requires_grad_() for t in (x, y, P, a, b))
    assert torch.autograd.gradcheck(
        lambda x, y, P, a, b: sliced_ot(x, y, cost, projections=P, u_weights=a, v_weights=b), inputs
    )
    x, y, _, _, P = _problem(6, 6, d=3, L=4, seed=3)
    inputs = tuple(t.requires_grad_() for t in (x, y, P))
    assert torch.autograd.gradcheck(lambda x, y, P: sliced_ot(x, y, cost, projections=P), inputs)


def test_gradient_scales_with_the_upstream_gradient_and_is_batched():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 3, dtype=F64, generator=g, requires_grad=True)
    y = torch.randn(2, 9, 3, dtype=F64, generator=g)
    P = random_projections(5, 3, generator=g, dtype=F64)
    (grad1,) = torch.autograd.grad(sliced_ot(x, y, otloss.abs_pow(2), projections=P, reduction="sum"), x)
    (grad2,) = torch.autograd.grad(2 * sliced_ot(x, y, otloss.abs_pow(2), projections=P, reduction="sum"), x)
    torch.testing.assert_close(grad2, 2 * grad1, **tol(F64, "grad"))
    (grad0,) = torch.autograd.grad(sliced_ot(x[0], y[0], otloss.abs_pow(2), projections=P), x)
    torch.testing.assert_close(grad1[0], grad0[0], **tol(F64, "grad"))


# ------------------------------------------------------------------ dtypes and magnitudes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_computed_in_float32(dtype):
    x, y, a, _, P = _problem(40, 30, d=4, L=16)
    xl, yl, Pl = x.to(dtype), y.to(dtype), P.to(dtype)
    ours = sliced_ot(xl, yl, otloss.abs_pow(2), projections=Pl, u_weights=a.to(dtype))
    assert ours.dtype == dtype
    # the exact answer for the rounded inputs, rounded once to the output dtype
    exact = sliced_ot(
        xl.double(), yl.double(), otloss.abs_pow(2), projections=Pl.double(), u_weights=a.to(dtype).double()
    )
    torch.testing.assert_close(ours.double(), exact, **tol(dtype, "value"))


def test_large_magnitudes_stay_accurate_in_float32():
    x, y, _, _, P = _problem(50, 50, d=3, L=8)
    scale = 1e15
    ours = sliced_ot((x * scale).float(), (y * scale).float(), otloss.abs_pow(1), projections=P.float())
    exact = sliced_ot(x, y, otloss.abs_pow(1), projections=P) * scale
    torch.testing.assert_close(ours.double(), exact, **tol(torch.float32, "value"))


def test_an_overflowing_cost_gives_inf():
    x, y, _, _, P = _problem(5, 5, d=2, L=3)
    out = sliced_ot((x * 1e30).float(), y.float(), otloss.abs_pow(2), projections=P.float())
    assert math.isinf(float(out))


# ------------------------------------------------------------------ errors


def _bad_calls():
    x, y, a, b, P = _problem(6, 7, d=3, L=4)
    nan_x = x.clone()
    nan_x[2, 1] = float("nan")
    inf_y = y.clone()
    inf_y[0, 0] = float("inf")
    nan_p = P.clone()
    nan_p[1, 2] = float("nan")
    h = otloss.abs_pow(2)
    return [
        ("d mismatch", lambda: sliced_ot(x, y[:, :2], h), ValueError, "same dimension d"),
        ("batch mismatch", lambda: sliced_ot(x[None].expand(2, -1, -1), y[None], h), ValueError, "batch dimensions"),
        ("1-D x", lambda: sliced_ot(x[:, 0], y, h), ValueError, "x must have at least 2"),
        ("empty x", lambda: sliced_ot(x[:0], y, h), ValueError, "x must be non-empty"),
        ("empty y", lambda: sliced_ot(x, y[:0], h), ValueError, "y must be non-empty"),
        ("d = 0", lambda: sliced_ot(x[:, :0], y[:, :0], h), ValueError, "non-empty"),
        ("int x", lambda: sliced_ot(x.long(), y.long(), h), TypeError, "x must have a floating-point dtype"),
        ("list x", lambda: sliced_ot(x.tolist(), y, h), TypeError, "x must be a torch.Tensor"),
        ("dtype mismatch", lambda: sliced_ot(x, y.float(), h), TypeError, "same dtype"),
        ("NaN x", lambda: sliced_ot(nan_x, y, h), ValueError, "x contains non-finite values"),
        ("Inf y", lambda: sliced_ot(x, inf_y, h), ValueError, "y contains non-finite values"),
        ("NaN projections", lambda: sliced_ot(x, y, h, projections=nan_p), ValueError, "projections contains"),
        ("projections d", lambda: sliced_ot(x, y, h, projections=P[:, :2]), ValueError, r"projections must have shape"),
        ("projections 1-D", lambda: sliced_ot(x, y, h, projections=P[0]), ValueError, r"projections must have shape"),
        ("projections L=0", lambda: sliced_ot(x, y, h, projections=P[:0]), ValueError, r"L >= 1"),
        (
            "projections batch",
            lambda: sliced_ot(x, y, h, projections=P[None].expand(2, -1, -1)),
            ValueError,
            "batched projections",
        ),
        ("projections dtype", lambda: sliced_ot(x, y, h, projections=P.float()), TypeError, "projections"),
        ("projections type", lambda: sliced_ot(x, y, h, projections=P.numpy()), TypeError, "projections must be"),
        ("both", lambda: sliced_ot(x, y, h, projections=P, n_projections=4), ValueError, "either projections"),
        (
            "generator with projections",
            lambda: sliced_ot(x, y, h, projections=P, generator=torch.Generator()),
            ValueError,
            "generator",
        ),
        ("n_projections 0", lambda: sliced_ot(x, y, h, n_projections=0), ValueError, "n_projections"),
        ("n_projections float", lambda: sliced_ot(x, y, h, n_projections=2.5), TypeError, "n_projections"),
        ("n_projections bool", lambda: sliced_ot(x, y, h, n_projections=True), TypeError, "n_projections"),
        ("generator type", lambda: sliced_ot(x, y, h, generator=np.random.default_rng(0)), TypeError, "generator"),
        ("negative weight", lambda: sliced_ot(x, y, h, u_weights=-a), ValueError, "u_weights must be non-negative"),
        ("weight shape", lambda: sliced_ot(x, y, h, v_weights=b[:3]), ValueError, "v_weights must have the shape"),
        ("reduction", lambda: sliced_ot(x, y, h, reduction="max"), ValueError, "reduction"),
        ("cost", lambda: sliced_ot(x, y, "l7"), ValueError, "unknown cost"),
        (
            "overflow",
            lambda: sliced_ot(x.float() * 1e30, y.float(), h, projections=P.float() * 1e10),
            ValueError,
            "overflow",
        ),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_a_clear_error(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


def test_without_validation_a_nan_gives_nan():
    x, y, _, _, P = _problem(6, 7, d=3, L=4)
    x[0, 0] = float("nan")
    assert math.isnan(float(sliced_ot(x, y, otloss.abs_pow(2), projections=P, validate_args=False)))


# ------------------------------------------------------------------ CUDA


@pytest.mark.requires_cuda
def test_cuda_matches_the_float64_cpu_reference():
    dev = torch.device("cuda")
    h = otloss.abs_pow(2)
    # equal sizes, uniform weights: the batched-rows kernel when triton imports
    B, n, d, L = 4, 1024, 16, 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, n, d, dtype=F64, generator=g)
    y = torch.randn(B, n, d, dtype=F64, generator=g) + 0.25
    P = random_projections(L, d, generator=g, dtype=F64)
    ref = sliced_ot(x, y, h, projections=P, reduction="none")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = sliced_ot(x.to(dev, dtype), y.to(dev, dtype), h, projections=P.to(dev, dtype), reduction="none")
        assert got.device.type == "cuda" and got.dtype == dtype
        exact = sliced_ot(
            x.to(dtype).double(), y.to(dtype).double(), h, projections=P.to(dtype).double(), reduction="none"
        )
        torch.testing.assert_close(got.cpu().double(), exact, **tol(dtype, "value"))
    torch.testing.assert_close(
        sliced_ot(x.to(dev, torch.float32), y.to(dev, torch.float32), h, projections=P.to(dev, torch.float32))
        .cpu()
        .double(),
        ref.mean(),
        **tol(torch.float32, "value"),
    )
    # unequal sizes, weights and gradients
    x, y, a, _, P = _problem(300, 200, d=8, L=64)
    xc = x.float().to(dev).requires_grad_()
    got = sliced_ot(xc, y.float().to(dev), h, projections=P.float().to(dev), u_weights=a.to(dev).float())
    got.backward()
    x64 = x.clone().requires_grad_()
    exact = sliced_ot(x64, y, h, projections=P, u_weights=a)
    exact.backward()
    torch.testing.assert_close(got.cpu().double(), exact.detach(), **tol(torch.float32, "value"))
    torch.testing.assert_close(xc.grad.cpu().double(), x64.grad, **tol(torch.float32, "grad"))
    # random directions from a CUDA generator; a CPU generator is refused
    out = sliced_ot(xc.detach(), y.float().to(dev), h, generator=torch.Generator(device=dev).manual_seed(0))
    assert out.device.type == "cuda" and math.isfinite(float(out))
    with pytest.raises(ValueError, match="generator must be on the device"):
        sliced_ot(xc.detach(), y.float().to(dev), h, generator=torch.Generator().manual_seed(0))
