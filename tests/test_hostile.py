"""Hostile inputs (issue 12): huge weights, a rejected micro-batch, torch.func transforms, bad options.

Each test here failed, or gave a plausible wrong number, before the fix it guards.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import pot_value
from tolerances import approx, tol

import otloss
from otloss.distributed import QuantileMemory

# ---------------------------------------------------------------------------
# Item 2: huge finite weights are normalised before any cast or cumulative sum
# ---------------------------------------------------------------------------


def _weighted_problem(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(7, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)
    a = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    return u, v, a, b


@pytest.mark.parametrize(
    "scale,wdtype",
    [(1e38, torch.float32), (3e38, torch.float32), (1e300, torch.float64), (1e-300, torch.float64)],
    ids=["1e38-f32", "3e38-f32", "1e300-f64", "1e-300-f64"],
)
def test_huge_weights_give_the_plan_of_moderate_ones(scale, wdtype):
    u, v, a, b = _weighted_problem()
    big_a, big_b = (a * scale).to(wdtype), (b * scale).to(wdtype)
    assert torch.isfinite(big_a).all() and torch.isfinite(big_b).all()
    for cost in (otloss.hinge(0.0), otloss.abs_pow(1.0), otloss.logistic(1.0)):
        want = pot_value(u.double().numpy(), v.double().numpy(), cost, a.numpy(), b.numpy())
        got = otloss.ot_h_1d(u, v, cost, u_weights=big_a, v_weights=big_b)
        assert math.isfinite(got.item())
        assert got.item() == approx(want, torch.float32)
    plan = otloss.quantile_coupling(u, v, big_a, big_b).to_dense()
    ref = otloss.quantile_coupling(u, v, a.float(), b.float()).to_dense()
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan, ref, **tol(torch.float32))
    q = otloss.quantile_function(u, [0.0, 0.2, 0.5, 0.8, 1.0], big_a)
    torch.testing.assert_close(q, otloss.quantile_function(u, [0.0, 0.2, 0.5, 0.8, 1.0], a.float()))
    m = otloss.quantile_margins(u, v, [0.25, 0.75], u_weights=big_a, v_weights=big_b)
    assert torch.isfinite(m).all()


def test_huge_weights_batched_and_with_gradient():
    u, v, a, b = _weighted_problem(torch.float64)
    a2 = torch.stack([a, a * 1e300])
    b2 = torch.stack([b * 1e300, b])
    u2 = torch.stack([u, u]).requires_grad_(True)
    rows = otloss.ot_h_1d(u2, torch.stack([v, v]), otloss.abs_pow(2.0), u_weights=a2, v_weights=b2, reduction="none")
    torch.testing.assert_close(rows[0], rows[1], **tol(torch.float64))
    rows.sum().backward()
    assert torch.isfinite(u2.grad).all()
    torch.testing.assert_close(u2.grad[0], u2.grad[1], **tol(torch.float64, "grad"))


def test_weight_signs_survive_normalisation_under_checks():
    u, v, a, _ = _weighted_problem()
    with pytest.raises(ValueError, match="u_weights must be non-negative"):
        otloss.ot_h_1d(u, v, "abs_pow", u_weights=-a.float())


# ---------------------------------------------------------------------------
# Item 3: a call that raises leaves QuantileMemory exactly as it was
# ---------------------------------------------------------------------------


def _bad_calls():
    u, v = torch.randn(6), torch.randn(6)
    nan = u.clone()
    nan[2] = float("nan")
    inf = v.clone()
    inf[0] = float("inf")
    t = torch.randn(6)
    return {
        "nan_u": lambda m: otloss.ot_h_1d(nan, v, "abs_pow", memory=m),
        "inf_v": lambda m: otloss.ot_h_1d(u, inf, "abs_pow", memory=m),
        "unknown_cost": lambda m: otloss.ot_h_1d(u, v, "cosine", memory=m),
        "bad_reduction": lambda m: otloss.ot_h_1d(u, v, "abs_pow", memory=m, reduction="max"),
        "bad_sort": lambda m: otloss.ot_h_1d(u, v, "abs_pow", memory=m, sort="bubble"),
        "bad_backend": lambda m: otloss.ot_h_1d(u, v, "abs_pow", memory=m, backend="cuda"),
        "triton_cannot": lambda m: otloss.ot_h_1d(u[:5], v, "abs_pow", memory=m, backend="triton"),
        "soft_with_weights": lambda m: otloss.ot_h_1d(u, v, "abs_pow", memory=m, sort="soft", u_weights=torch.ones(6)),
        "negative_weights": lambda m: otloss.ot_h_1d(u, v, "abs_pow", memory=m, u_weights=-torch.ones(6)),
        "zero_weights": lambda m: otloss.ot_h_1d(u, v, "abs_pow", memory=m, v_weights=torch.zeros(6)),
        "weights_appear": lambda m: otloss.ot_h_1d(u, v, "abs_pow", memory=m, u_weights=torch.ones(6)),
        "dtype_changes": lambda m: otloss.ot_h_1d(u.double(), v.double(), "abs_pow", memory=m),
        "u_v_dtypes": lambda m: otloss.ot_h_1d(u, v.double(), "abs_pow", memory=m),
        "leading_dims": lambda m: otloss.ot_h_1d(u.view(2, 3), v.view(3, 2), "abs_pow", memory=m),
        "int_values": lambda m: otloss.ot_h_1d(torch.arange(6), v, "abs_pow", memory=m),
        "custom_cost_shape": lambda m: otloss.ot_h_1d(u, v, lambda z: z.sum(), memory=m),
        "group_without_global": lambda m: otloss.ot_h_1d(u, v, "abs_pow", memory=m, group=object()),
        "aot_nan_ref": lambda m: otloss.aot_loss(t, t, nan, t, memory=m),
        "aot_smoothing_hinge": lambda m: otloss.aot_loss(t, t, t, t, memory=m, cost="hinge", label_smoothing=0.1),
        "aot_shapes": lambda m: otloss.aot_loss(t, t[:3], t, t[:3], memory=m),
        "module_nan": lambda m: otloss.AOTLoss(memory=m)(t, t, t, nan),
    }


BAD = _bad_calls()


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_rejected_call_leaves_the_memory_as_it_was(name):
    g = torch.Generator().manual_seed(0)
    first = (torch.randn(6, generator=g), torch.randn(6, generator=g))
    second = (torch.randn(6, generator=g, requires_grad=True), torch.randn(6, generator=g))
    memory = QuantileMemory()
    otloss.ot_h_1d(*first, "abs_pow", memory=memory)
    before = list(memory._stored)
    with pytest.raises((TypeError, ValueError)):
        BAD[name](memory)
    assert memory.sizes == (6, 6)
    assert all(x is y for x, y in zip(memory._stored, before))
    # and the next micro-batch sees exactly the first one, as if the bad call never happened
    fresh = QuantileMemory()
    otloss.ot_h_1d(*first, "abs_pow", memory=fresh)
    assert (
        otloss.ot_h_1d(*second, "abs_pow", memory=memory).item()
        == otloss.ot_h_1d(*second, "abs_pow", memory=fresh).item()
    )


def test_extend_checks_its_arguments_before_storing():
    memory = QuantileMemory()
    with pytest.raises(TypeError, match=r"u must be a torch.Tensor"):
        memory.extend([1.0], torch.randn(2))
    with pytest.raises(ValueError, match="same leading"):
        memory.extend(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="u_weights must have the shape of u"):
        memory.extend(torch.randn(3), torch.randn(3), torch.ones(4))
    assert memory.sizes == (0, 0) and memory._stored is None


# ---------------------------------------------------------------------------
# Item 5: torch.func transforms with the default checks
# ---------------------------------------------------------------------------


def test_vmap_with_default_checks_matches_the_batched_call():
    assert otloss.get_validate_args() is True
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    for cost in (otloss.logistic(0.5), otloss.hinge(0.1), otloss.abs_pow(2.0)):
        got = torch.func.vmap(lambda a, b, c=cost: otloss.ot_h_1d(a, b, c))(u, v)
        torch.testing.assert_close(got, otloss.ot_h_1d(u, v, cost, reduction="none"), **tol(torch.float64))
    w = torch.rand(5, 8, generator=g, dtype=torch.float64)
    got = torch.func.vmap(lambda a, b, c: otloss.ot_h_1d(a, b, "abs_pow", u_weights=c))(u, v, w)
    torch.testing.assert_close(got, otloss.ot_h_1d(u, v, "abs_pow", u_weights=w, reduction="none"))
    for custom in (lambda z: z.square(), otloss.Cost(torch.cosh, torch.sinh)):  # checked custom costs vmap too
        got = torch.func.vmap(lambda a, b, c=custom: otloss.ot_h_1d(a, b, c))(u[:, :6], v)
        torch.testing.assert_close(got, otloss.ot_h_1d(u[:, :6], v, custom, reduction="none"), **tol(torch.float64))
    # equal sizes, uniform weights: the fast path's plain-graph twin under vmap
    got = torch.func.vmap(lambda a, b: otloss.aot_loss(a, b, b, a))(u, u.flip(-1))
    want = torch.stack([otloss.aot_loss(a, b, b, a) for a, b in zip(u, u.flip(-1))])
    torch.testing.assert_close(got, want, **tol(torch.float64))


def test_vmap_turns_a_failed_check_into_nan_for_that_problem_only():
    u, v = torch.randn(4, 6), torch.randn(4, 6)
    u[1, 3] = float("inf")  # logistic(+inf) = 0: without the check this row would look finite
    v[2, 0] = float("nan")
    f = torch.func.vmap(lambda a, b: otloss.ot_h_1d(a, b, otloss.logistic(1.0)))
    rows = f(u, v)
    assert torch.isnan(rows[1]) and torch.isnan(rows[2])
    assert torch.isfinite(rows[[0, 3]]).all()
    # checks off: IEEE arithmetic, as documented (the +inf row is finite)
    off = torch.func.vmap(lambda a, b: otloss.ot_h_1d(a, b, otloss.logistic(1.0), validate_args=False))(u, v)
    assert torch.isfinite(off[1]) and torch.isnan(off[2])
    w = torch.ones(4, 6)
    w[3] = -1.0
    rows = torch.func.vmap(lambda a, b, c: otloss.ot_h_1d(a, b, "abs_pow", u_weights=c))(
        u.nan_to_num(), v.nan_to_num(), w
    )
    assert torch.isnan(rows[3]) and torch.isfinite(rows[:3]).all()
    # an inner batch dimension with reduction="none" is masked row by row
    rows = torch.func.vmap(lambda a, b: otloss.ot_h_1d(a, b, "abs_pow", reduction="none"))(
        u.view(2, 2, 6), v.view(2, 2, 6)
    )
    assert (
        rows.shape == (2, 2)
        and torch.isnan(rows.view(-1)[[1, 2]]).all()
        and torch.isfinite(rows.view(-1)[[0, 3]]).all()
    )


def test_func_grad_keeps_the_checks_and_matches_autograd():
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(9, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    cost = otloss.logistic(0.7)
    got = torch.func.grad(lambda a: otloss.ot_h_1d(a, v, cost))(u)
    uu = u.clone().requires_grad_(True)
    otloss.ot_h_1d(uu, v, cost).backward()
    torch.testing.assert_close(got, uu.grad, **tol(torch.float64, "grad"))
    bad = u.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="u contains non-finite"):
        torch.func.grad(lambda a: otloss.ot_h_1d(a, v, cost))(bad)
    # per-example gradients: vmap over grad
    U = torch.randn(3, 9, generator=g, dtype=torch.float64)
    per = torch.func.vmap(torch.func.grad(lambda a: otloss.ot_h_1d(a, v, cost)))(U)
    for i in range(3):
        torch.testing.assert_close(per[i], torch.func.grad(lambda a: otloss.ot_h_1d(a, v, cost))(U[i]))
    jac = torch.func.jacrev(lambda a: otloss.ot_h_1d(a, v, cost))(u)
    torch.testing.assert_close(jac, got)
    fwd = torch.func.jacfwd(lambda a: otloss.ot_h_1d(a, v, cost))(u)
    torch.testing.assert_close(fwd, got, **tol(torch.float64, "grad"))
    _, pullback = torch.func.vjp(lambda a: otloss.ot_h_1d(a, v, cost), u)
    torch.testing.assert_close(pullback(torch.tensor(2.0, dtype=torch.float64))[0], 2 * got)
    w = torch.rand(9, generator=g, dtype=torch.float64)
    weighted = torch.func.grad(lambda a: otloss.ot_h_1d(a, v[:5], "abs_pow", u_weights=w))(u)
    uu = u.clone().requires_grad_(True)
    otloss.ot_h_1d(uu, v[:5], "abs_pow", u_weights=w).backward()
    torch.testing.assert_close(weighted, uu.grad, **tol(torch.float64, "grad"))


# ---------------------------------------------------------------------------
# Item 7 and more of each kind
# ---------------------------------------------------------------------------


def test_quantile_margins_refuses_mismatched_leading_shapes_and_names_its_arguments():
    with pytest.raises(ValueError, match="u and v must have the same leading"):
        otloss.quantile_margins(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="u and v must have the same leading"):
        otloss.quantile_margins(torch.randn(2, 4), torch.randn(1, 4))  # no silent broadcasting
    with pytest.raises(ValueError, match="v contains non-finite"):
        otloss.quantile_margins(torch.randn(4), torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match=r"v must be a torch.Tensor"):
        otloss.quantile_margins(torch.randn(4), [1.0, 2.0])
    out = otloss.quantile_margins(torch.randn(2, 4), torch.randn(2, 7), 0.5)
    assert out.shape == (2, 1)


@pytest.mark.parametrize(
    "t,exc,match",
    [
        ("0.5", TypeError, "t must be a real number"),
        (None, TypeError, "t must be a real number"),
        (0.5j, TypeError, "t must be a real number"),
        ([0.5j], TypeError, "t must hold real numbers, got complex"),
        (torch.tensor([0.5 + 0j]), TypeError, "t must be a real dense tensor"),
        (True, TypeError, "t must be a real number"),
        ([0.1, "a"], TypeError, "t must hold real numbers, got str"),
        ([[0.1, 0.5]], TypeError, "t must hold real numbers"),
        (torch.tensor([[0.1, 0.5]]), ValueError, "t must be a number or 1-D"),
        ([], ValueError, "at least one level"),
        ([0.5, float("nan")], ValueError, "t must lie in"),
        (1.5, ValueError, "t must lie in"),
    ],
)
def test_quantile_function_levels(t, exc, match):
    with pytest.raises(exc, match=match):
        otloss.quantile_function(torch.randn(4), t)


def test_quantile_function_accepts_numbers_arrays_and_tensors():
    x = torch.tensor([3.0, 1.0, 2.0, 4.0])
    want = torch.tensor([2.0])
    for t in (0.5, np.float32(0.5), [0.5], (0.5,), np.array([0.5]), torch.tensor(0.5), torch.tensor([0.5]).double()):
        torch.testing.assert_close(otloss.quantile_function(x, t), want)


def test_to_dense_refuses_swapped_or_small_sizes():
    u, v = torch.randn(3), torch.randn(5)
    c = otloss.quantile_coupling(u, v)
    assert (c.n, c.m) == (3, 5)
    dense = c.to_dense()
    assert dense.shape == (3, 5)
    torch.testing.assert_close(c.to_dense(3, 5), dense)
    with pytest.raises(ValueError, match="n=5 but the plan was made for n=3, m=5"):
        c.to_dense(5, 3)
    with pytest.raises(TypeError, match="n must be an int"):
        c.to_dense(3.0, 5)
    by_hand = otloss.Coupling(c.u_index, c.v_index, c.mass)
    with pytest.raises(ValueError, match="does not know its sizes"):
        by_hand.to_dense()
    with pytest.raises(ValueError, match="m=3 is too small"):
        by_hand.to_dense(5, 3)
    torch.testing.assert_close(by_hand.to_dense(3, 5), dense)
    iu, iv, mass = c  # still a 3-tuple
    assert iu is c.u_index and iv is c.v_index and mass is c.mass


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: torch.randn(4).to_sparse(), "dense \\(strided\\) tensor, got layout torch.sparse_coo"),
        (lambda: torch.randn(2, 4).to_sparse_csr(), "dense \\(strided\\) tensor, got layout torch.sparse_csr"),
        (lambda: torch.randn(4).to(torch.float8_e4m3fn), "got torch.float8_e4m3fn; cast it with .float\\(\\)"),
        (lambda: torch.randn(4).to(torch.float8_e5m2), "got torch.float8_e5m2"),
        (lambda: torch.randn(4, dtype=torch.complex64), "floating-point dtype .* got torch.complex64"),
    ],
    ids=["coo", "csr", "f8e4m3", "f8e5m2", "complex"],
)
def test_sparse_float8_and_complex_inputs_are_refused_everywhere(make, match):
    x = make()
    dense = torch.randn(x.shape)
    calls = [
        ("u", lambda: otloss.ot_h_1d(x, dense, "abs_pow")),
        ("v", lambda: otloss.ot_h_1d(dense, x, "abs_pow")),
        ("u_weights", lambda: otloss.ot_h_1d(dense, dense, "abs_pow", u_weights=x)),
        ("u", lambda: otloss.quantile_coupling(x, dense)),
        ("x", lambda: otloss.quantile_function(x, 0.5)),
        ("policy_chosen_logps", lambda: otloss.aot_loss(x, dense, dense, dense)),
    ]
    for name, call in calls:
        with pytest.raises(TypeError, match=f"{name} must .*{match}"):
            call()
    with pytest.raises(TypeError, match=match):
        QuantileMemory().extend(x, dense)


def test_global_batch_refuses_an_object_that_is_not_a_process_group():
    u = torch.randn(4)
    for group in ("world", 0, object()):
        with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup or None"):
            otloss.ot_h_1d(u, u, "abs_pow", global_batch=True, group=group)
        with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup"):
            otloss.all_gather_variable(u, group)
        with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup"):
            otloss.AOTLoss(global_batch=True, group=group)
    with pytest.raises(TypeError, match="global_batch must be a bool"):
        otloss.ot_h_1d(u, u, "abs_pow", global_batch="yes")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_all_gather_variable_refuses_a_non_finite_grad_scale(scale):
    with pytest.raises(ValueError, match="grad_scale must be finite"):
        otloss.all_gather_variable(torch.randn(3), grad_scale=scale)
    with pytest.raises(TypeError, match="grad_scale must be a real number"):
        otloss.all_gather_variable(torch.randn(3), grad_scale="1")


@pytest.mark.parametrize(
    "h,dh,match",
    [
        (lambda z: z.sum(), None, r"h must return a floating tensor of the shape of z .* shape \(\)"),
        (lambda z: z.mean(-1, keepdim=True), None, "shape \\(2, 1\\)"),  # would broadcast in a weighted sum
        (lambda z: (z < 0).long(), None, "torch.int64"),
        (lambda z: 1.0, None, "got float"),
        (lambda z: z.square(), lambda z: 2 * z.sum(), "dh must return"),
    ],
)
def test_a_custom_cost_with_the_wrong_output_shape_raises(h, dh, match):
    u = torch.randn(2, 5, requires_grad=True)
    v = torch.randn(2, 5)
    cost = otloss.Cost(h, dh)
    with pytest.raises(ValueError, match=match):
        otloss.ot_h_1d(u, v, cost).backward()
    if dh is None:  # the quantile-merge path (n != m) calls h only
        with pytest.raises(ValueError, match=match):
            otloss.ot_h_1d(u, torch.randn(2, 3), cost).backward()


def test_custom_cost_cannot_take_a_built_in_name():
    # the kernels specialise on built-in costs: a custom h under that name would be replaced by the built-in
    with pytest.raises(ValueError, match="name 'logistic' belongs to the built-in cost"):
        otloss.Cost(torch.abs, name="logistic")
    assert otloss.Cost(torch.abs, name="my_abs").kernel_id is None


def test_cost_arguments_hostile_types():
    assert otloss.logistic(np.float32(0.5)).beta == 0.5
    assert otloss.hinge(np.int64(1)).beta == 1.0
    with pytest.raises(TypeError, match=r"beta must be a real number .* got a Tensor"):
        otloss.logistic(torch.tensor(0.5))
    with pytest.raises(TypeError, match="beta must be a real number, got bool"):
        otloss.hinge(True)
    with pytest.raises(TypeError, match="got the class Logistic; instantiate it"):
        otloss.ot_h_1d(torch.randn(3), torch.randn(3), otloss.costs.Logistic)
    with pytest.raises(TypeError, match="beta must be a real number"):
        otloss.aot_loss(*[torch.randn(3)] * 4, beta="0.1")
    with pytest.raises(TypeError, match="label_smoothing must be a real number"):
        otloss.aot_loss(*[torch.randn(3)] * 4, label_smoothing=None)


@pytest.mark.parametrize(
    "build,exc,match",
    [
        (lambda: otloss.OTLoss("abs_pow", reduction="max"), ValueError, "reduction must be"),
        (lambda: otloss.OTLoss("abs_pow", backend="cuda"), ValueError, "backend must be"),
        (lambda: otloss.OTLoss("abs_pow", sort="bubble"), ValueError, "sort must be"),
        (lambda: otloss.OTLoss("cosine"), ValueError, "unknown cost"),
        (lambda: otloss.OTLoss("abs_pow", validate_args="yes"), TypeError, "validate_args must be a bool"),
        (lambda: otloss.OTLoss("abs_pow", memory=[]), TypeError, "memory must be a QuantileMemory"),
        (lambda: otloss.OTLoss("abs_pow", group=object()), ValueError, "group is used only with global_batch"),
        (lambda: otloss.FSDViolation("w3"), ValueError, "measure must be one of"),
        (lambda: otloss.FSDViolation(3), TypeError, "measure must be a name or a Cost"),
        (lambda: otloss.FSDViolation(reduction=None), ValueError, "reduction must be"),
        (lambda: otloss.FSDViolation(backend="gpu"), ValueError, "backend must be"),
        (lambda: otloss.AOTLoss(reduction="avg"), ValueError, "reduction must be"),
        (lambda: otloss.AOTLoss(backend="TRITON"), ValueError, "backend must be"),
        (lambda: otloss.AOTLoss(paired="yes"), TypeError, "paired must be a bool"),
        (lambda: otloss.AOTLoss(cost="cosine"), ValueError, "cost must be one of"),
        (lambda: otloss.AOTLoss(cost="hinge", label_smoothing=0.1), ValueError, "label_smoothing applies"),
        (lambda: otloss.AOTLoss(cost=otloss.hinge(0.1), beta=0.1), ValueError, "beta and label_smoothing"),
        (lambda: otloss.AOTLoss(global_batch=1), TypeError, "global_batch must be a bool"),
    ],
)
def test_modules_validate_every_option_in_init(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_numpy_bools_are_accepted_and_other_types_named():
    try:
        otloss.set_validate_args(np.bool_(False))
        assert otloss.get_validate_args() is False
        otloss.set_validate_args(np.bool_(True))
        assert otloss.get_validate_args() is True
    finally:
        otloss.set_validate_args(True)
    with pytest.raises(TypeError, match="must be a bool \\(True or False\\), got int 1"):
        otloss.set_validate_args(1)
    with pytest.raises(TypeError, match=r"got torch.Tensor"):
        otloss.set_validate_args(torch.tensor(True))
    with pytest.raises(TypeError, match=r"validate_args must be a bool or None, got numpy.int64 1$"):
        otloss.ot_h_1d(torch.randn(3), torch.randn(3), "abs_pow", validate_args=np.int64(1))
    u = torch.tensor([0.0, float("nan")])
    assert math.isnan(otloss.ot_h_1d(u, torch.zeros(2), "abs_pow", validate_args=np.bool_(False)).item())
    t = torch.randn(4)
    assert otloss.aot_loss(t, t, t, t, paired=np.bool_(False)).isfinite()


def test_meta_tensors_shape_inference_with_checks_on():
    m = torch.empty(3, 5, device="meta", requires_grad=True)
    out = otloss.ot_h_1d(m, m, "logistic", reduction="none")
    assert out.shape == (3,) and out.device.type == "meta"
    w = torch.ones(3, 4, device="meta")
    assert otloss.ot_h_1d(torch.empty(3, 4, device="meta"), m, "abs_pow", u_weights=w).shape == ()
    assert otloss.aot_loss(m, m, m, m).shape == ()


def _meta(*shape, grad=False):
    return torch.empty(*shape, device="meta", requires_grad=grad)


@pytest.mark.parametrize(
    "call, shape",
    [
        (lambda: otloss.soft_sort(_meta(3, 5, grad=True), 0.5), (3, 5)),
        (lambda: otloss.soft_sort(_meta(3, 5), 0.5, regularization="kl"), (3, 5)),
        (lambda: otloss.ot_h_1d(_meta(3, 5, grad=True), _meta(3, 5), "abs_pow", sort="soft", reduction="none"), (3,)),
        (lambda: otloss.fsd_violation(_meta(5), _meta(4)), ()),
        (lambda: otloss.quantile_function(_meta(3, 5), [0.25, 0.5]), (3, 2)),
        (lambda: otloss.quantile_margins(_meta(3, 5), _meta(3, 4), [0.5]), (3, 1)),
        (lambda: otloss.entropic_ot(_meta(2, 3, 4, grad=True), epsilon=0.1), (2,)),
        (lambda: otloss.entropic_ot(_meta(3, 4), _meta(3), epsilon=0.0), ()),
        (lambda: otloss.sliced_ot(_meta(5, 3, grad=True), _meta(4, 3), otloss.abs_pow(2)), ()),
        (lambda: otloss.violation_ratio(_meta(5), _meta(4)), ()),
        (lambda: otloss.violation_ratio(_meta(5, 2), _meta(4, 2)), ()),
        (lambda: otloss.multivariate_aot_loss(_meta(5, 2, grad=True), _meta(4, 2)), ()),
    ],
)
def test_meta_tensors_give_meta_results_of_the_right_shape(call, shape):
    out = call()
    assert out.device.type == "meta" and tuple(out.shape) == shape


def test_meta_tensors_are_refused_by_name_where_the_result_depends_on_values():
    with pytest.raises(ValueError, match="1-D meta tensors"):
        otloss.quantile_coupling(_meta(5), _meta(4))
    assert otloss.quantile_coupling(_meta(1, 5), _meta(1, 4)).mass.shape == (1, 8)
    labels = torch.zeros(1, 2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="logits is on the meta device"):
        otloss.token_ot_loss(_meta(1, 2, 3), labels, _meta(3, 4))
    for call in (lambda: otloss.dominance_test(_meta(5), _meta(4)), lambda: otloss.rank_models([_meta(5), _meta(4)])):
        with pytest.raises(ValueError, match="is on the meta device, which holds no values"):
            call()
    with pytest.raises(ValueError, match="t is on the meta device"):
        otloss.quantile_function(torch.randn(3, 5), _meta(2))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):  # numbers are checked for meta samples too
        otloss.quantile_function(_meta(3, 5), [1.5])


def test_non_tensor_options_never_compare_elementwise():
    u = torch.randn(3)
    with pytest.raises(ValueError, match="sort must be"):
        otloss.ot_h_1d(u, u, "abs_pow", sort=np.array(["hard", "soft"]))
    with pytest.raises(ValueError, match="reduction must be"):
        otloss.ot_h_1d(u, u, "abs_pow", reduction=np.array(["mean"]))
    with pytest.raises(ValueError, match="backend must be"):
        otloss.ot_h_1d(u, u, "abs_pow", backend=["torch"])


def test_aot_loss_names_the_input_and_lets_overflowing_margins_through():
    t = torch.randn(4)
    bad = t.clone()
    bad[1] = -float("inf")
    with pytest.raises(ValueError, match="policy_rejected_logps contains non-finite values \\(0 NaN, 1 Inf\\)"):
        otloss.aot_loss(t, bad, t, t, paired=False)
    memory = QuantileMemory()
    with pytest.raises(ValueError, match="ref_chosen_logps contains non-finite"):
        otloss.aot_loss(t, t, bad, t, memory=memory)
    assert memory.sizes == (0, 0)
    big = torch.full((4,), 3e38)
    assert otloss.aot_loss(big, -big, t * 0, t * 0).item() == 0.0  # +inf margins: logistic gives 0


def test_memory_stores_a_copy_not_a_view_of_the_callers_buffer():
    memory, fresh = QuantileMemory(), QuantileMemory()
    buf_u, buf_v = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5.0, 6.0, 7.0])
    otloss.ot_h_1d(buf_u, buf_v, "abs_pow", memory=memory)
    otloss.ot_h_1d(buf_u.clone(), buf_v.clone(), "abs_pow", memory=fresh)
    buf_u.copy_(torch.tensor([10.0, 11.0, 12.0]))  # the next micro-batch written into the same buffer
    buf_v.copy_(torch.tensor([-1.0, -2.0, -3.0]))
    torch.testing.assert_close(memory._stored[0], torch.tensor([0.0, 1.0, 2.0]))
    assert (
        otloss.ot_h_1d(buf_u, buf_v, "abs_pow", memory=memory).item()
        == otloss.ot_h_1d(buf_u, buf_v, "abs_pow", memory=fresh).item()
    )


@pytest.mark.parametrize(
    ("make", "attr"),
    [
        (lambda: otloss.logistic(1.0), "beta"),
        (lambda: otloss.logistic(1.0, label_smoothing=0.1), "ls"),
        (lambda: otloss.hinge(0.0), "beta"),
        (lambda: otloss.squared_hinge(0.5), "beta"),
        (lambda: otloss.least_squares(0.0), "beta"),
        (lambda: otloss.abs_pow(2.0), "p"),
    ],
)
def test_builtin_costs_are_immutable_so_no_path_sees_a_stale_parameter(make, attr):
    # Every path (fused logistic, kernels, h/dh, repr, ==, hash) reads one set of parameters: a changed
    # attribute would be seen by some paths and not by others, a silent disagreement.
    cost = make()
    before = (repr(cost), hash(cost), cost.params)
    with pytest.raises(AttributeError, match="immutable"):
        setattr(cost, attr, 5.0)
    with pytest.raises(AttributeError, match="immutable"):
        cost.params_override = 1
    cost.params["beta"] = 123.0  # a copy: the cost keeps its own parameters
    assert (repr(cost), hash(cost), cost.params) == before
    u, v = torch.randn(6, requires_grad=True), torch.randn(6)
    with torch.no_grad():
        expected = otloss.ot_h_1d(u, v, cost)
    torch.testing.assert_close(otloss.ot_h_1d(u, v, cost).detach(), expected)


# --- zero weights, overflow and NaN on the merged-interval path (n != m or weights) ---


@pytest.mark.parametrize("side", ["u", "v"])
@pytest.mark.parametrize("dtype, far", [(torch.float32, -1e20), (torch.float64, -1e200)])
def test_an_overflowing_atom_of_zero_weight_does_not_count(side, dtype, far):
    # the zero-weight atom is no part of the measure: the cost is that of the rest (0.5), not 0 * inf = NaN
    near, other = torch.tensor([far, 0.0], dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype)
    w = torch.tensor([0.0, 1.0], dtype=dtype)
    for cost in ("least_squares", otloss.abs_pow(2.0), otloss.abs_pow(3.0)):
        if side == "u":
            got = otloss.ot_h_1d(near, other, cost, u_weights=w)
            want = otloss.ot_h_1d(near[1:], other, cost)
        else:
            got = otloss.ot_h_1d(other, near, cost, v_weights=w)
            want = otloss.ot_h_1d(other, near[1:], cost)
        assert got.item() == pytest.approx(0.5) and got.item() == pytest.approx(want.item())
    # the gradient to the values is that of the measure without the atom
    u = near.clone().requires_grad_(True)
    otloss.ot_h_1d(u, other, "least_squares", u_weights=w).backward()
    assert u.grad.tolist() == [0.0, -1.0]


def test_a_zero_weight_keeps_its_finite_derivative():
    # the derivative with respect to a zero weight is the cost of moving mass onto its atom (9 here)
    u = torch.tensor([-3.0, 0.0], dtype=torch.float64)
    v = torch.tensor([0.0, 1.0], dtype=torch.float64)
    w = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    otloss.ot_h_1d(u, v, "least_squares", u_weights=w).backward()

    def f(e):
        return otloss.ot_h_1d(u, v, "least_squares", u_weights=torch.tensor([e, 1.0], dtype=torch.float64))

    assert w.grad[0].item() == pytest.approx(((f(1e-7) - f(0.0)) / 1e-7).item(), rel=1e-5)
    assert w.grad[0].item() == pytest.approx(9.0)


def test_an_overflowing_cost_with_unequal_sizes_is_inf_not_nan():
    u, v = torch.tensor([1e20, 2e20]), torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert otloss.ot_h_1d(u, v, otloss.abs_pow(2)).item() == math.inf  # n == m gives inf too
    assert otloss.ot_h_1d(u[:1].expand(4), v, otloss.abs_pow(2)).item() == math.inf
    assert otloss.ot_h_1d(u, v, "least_squares", u_weights=torch.tensor([1.0, 3.0])).item() == math.inf
    got = otloss.sliced_ot(u[:, None], v[:, None], otloss.abs_pow(2), projections=torch.ones(1, 1))
    assert got.item() == math.inf
    # a NaN input with checks off still gives NaN on that path
    bad = torch.tensor([0.0, float("nan")])
    assert torch.isnan(otloss.ot_h_1d(bad, v, "least_squares", validate_args=False))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [0, 1])
def test_a_non_finite_weight_with_checks_off_gives_nan_for_its_row_only(bad, where):
    u, v = torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0, 5.0], [0.0, 1.0, 5.0]])
    w = torch.ones(2, 2)
    w[0, where] = bad
    for cost in ("abs_pow", "logistic"):
        rows = otloss.ot_h_1d(u, v, cost, u_weights=w, validate_args=False, reduction="none")
        assert torch.isnan(rows[0]) and rows[1].item() == pytest.approx(otloss.ot_h_1d(u[1], v[1], cost).item())
        rows = otloss.ot_h_1d(v, u, cost, v_weights=w, validate_args=False, reduction="none")
        assert torch.isnan(rows[0]) and torch.isfinite(rows[1])
    q = otloss.quantile_function(u, [0.0, 0.25, 1.0], w, validate_args=False)
    assert torch.isnan(q[0]).all() and q[1].tolist() == [0.0, 0.0, 1.0]
    zero = otloss.ot_h_1d(u[0], v[0], "abs_pow", u_weights=torch.zeros(2), validate_args=False)
    assert torch.isnan(zero)


def test_quantile_at_zero_is_the_least_atom_of_positive_weight():
    x, w = torch.tensor([-100.0, 1.0, 2.0]), torch.tensor([0.0, 1.0, 1.0])
    assert otloss.quantile_function(x, [0.0, 1e-6, 0.5, 1.0], w).tolist() == [1.0, 1.0, 1.0, 2.0]
    margins = otloss.quantile_margins(x, torch.tensor([0.0, 0.5]), [0.0], u_weights=w)
    assert margins.tolist() == [1.0]
    # without zero weights Q(0) is the minimum, as before
    assert otloss.quantile_function(torch.tensor([3.0, 1.0, 2.0]), [0.0, 0.25, 0.5, 1.0]).tolist() == [1, 1, 2, 3]


def test_the_area_measure_propagates_nan_and_stays_a_fraction():
    nan = float("nan")
    u, v = torch.tensor([[0.0, 1.0, nan], [0.0, 1.0, 2.0]]), torch.ones(2, 3)
    for vv in (v, torch.ones(2, 4)):  # the sorted path and the merged path
        rows = otloss.fsd_violation(u, vv, "area", reduction="none", validate_args=False)
        assert torch.isnan(rows[0]) and rows[1].item() == pytest.approx(1 / 3)
    # float32 interval masses can sum to an ulp above 1: the fraction is clamped to [0, 1]
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(100, generator=g), torch.randn(60, generator=g) + 0.5
    assert otloss.fsd_violation(a, b, "area").item() <= 1.0
    assert otloss.fsd_violation(torch.zeros(100), torch.ones(60), "area").item() == 1.0


def test_jacfwd_and_hessian_raise_on_nan_like_eager_calls():
    # jacfwd runs vmap over the tangents only: the values are not batched and are checked as eagerly
    v = torch.randn(4, dtype=torch.float64)
    x = torch.tensor([1.0, float("nan"), 0.0, 2.0], dtype=torch.float64)
    for cost in ("logistic", "abs_pow"):
        for transform in (torch.func.jacfwd, torch.func.jacrev, torch.func.hessian):
            with pytest.raises(ValueError, match="u contains non-finite"):
                transform(lambda a, c=cost: otloss.ot_h_1d(a, v, c))(x)
    with pytest.raises(ValueError, match="u_weights must be non-negative"):
        w = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
        torch.func.jacfwd(lambda a: otloss.ot_h_1d(a, v, "abs_pow", u_weights=w))(x.nan_to_num())
    with pytest.raises(ValueError, match="policy_chosen_logps contains non-finite"):
        torch.func.jacfwd(lambda a: otloss.aot_loss(a, v, v, v))(x)
    # finite values: jacfwd is the gradient
    y = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(
        torch.func.jacfwd(lambda a: otloss.ot_h_1d(a, v, "logistic"))(y),
        torch.func.grad(lambda a: otloss.ot_h_1d(a, v, "logistic"))(y),
    )


def test_vmapped_gradients_and_tangents_of_a_failed_problem_are_nan_not_zero():
    v = torch.randn(4)
    U = torch.randn(3, 4)
    U[1, 2] = float("nan")
    f = lambda a: otloss.ot_h_1d(a, v, "logistic")  # noqa: E731
    for transform in (torch.func.grad, torch.func.jacfwd, torch.func.jacrev):
        per = torch.func.vmap(transform(f))(U)
        assert torch.isnan(per[1]).all() and torch.isfinite(per[[0, 2]]).all()
        torch.testing.assert_close(per[0], torch.func.grad(f)(U[0]))
    # the valid problems' values are bitwise those of the eager call
    rows = torch.func.vmap(f)(U)
    assert torch.isnan(rows[1]) and rows[0].item() == f(U[0]).item() and rows[2].item() == f(U[2]).item()


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda big: otloss.logistic(big), "beta"),
        (lambda big: otloss.hinge(big), "beta"),
        (lambda big: otloss.abs_pow(big), "p"),
        (lambda big: otloss.aot_loss(*[torch.randn(3)] * 4, beta=big), "beta"),
        (lambda big: otloss.AOTLoss(beta=big), "beta"),
        (lambda big: otloss.SoftSort(big), "regularization_strength"),
        (lambda big: otloss.entropic_ot(torch.rand(2, 3), epsilon=big), "epsilon"),
        (lambda big: otloss.violation_ratio(torch.rand(4, 2), torch.rand(3, 2), epsilon=big), "epsilon"),
        (lambda big: otloss.quantile_function(torch.randn(3), [big]), "t"),
        (
            lambda big: otloss.token_ot_loss(
                torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.randn(3, 4), epsilon=big
            ),
            "epsilon",
        ),
    ],
)
def test_an_integer_beyond_the_float_range_is_a_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must (be finite|lie in \[0, 1\]), got an integer too large"):
        call(10**400)


def test_numpy_float32_scalars_are_real_numbers_everywhere():
    x = torch.randn(5)
    eps = np.float32(0.5)
    assert torch.equal(otloss.soft_sort(x, eps), otloss.soft_sort(x, 0.5))
    C = torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(otloss.entropic_ot(C, epsilon=eps), otloss.entropic_ot(C, epsilon=0.5))
    X, Y = torch.rand(5, 2), torch.rand(4, 2)
    torch.testing.assert_close(
        otloss.violation_ratio(X, Y, epsilon=eps, backend="torch"),
        otloss.violation_ratio(X, Y, epsilon=0.5, backend="torch"),
    )
    assert otloss.logistic(np.float32(2.0)).beta == 2.0


def test_to_dense_checks_a_plan_built_by_hand():
    T = torch.tensor
    with pytest.raises(ValueError, match="u_index must be non-negative, got -1"):
        otloss.Coupling(T([-1, 0]), T([0, 1]), T([0.5, 0.5])).to_dense(2, 2)
    with pytest.raises(TypeError, match="u_index must hold integer indices"):
        otloss.Coupling(T([0.0, 1.0]), T([0, 1]), T([0.5, 0.5])).to_dense(2, 2)
    with pytest.raises(ValueError, match="must have one shape"):
        otloss.Coupling(T([0, 1, 1]), T([0, 1]), T([0.5, 0.5])).to_dense(2, 2)
    with pytest.raises(TypeError, match=r"u_index must be a torch\.Tensor, got list"):
        otloss.Coupling([0, 1], [0, 1], [0.5, 0.5]).to_dense(2, 2)
    with pytest.raises(TypeError, match="mass must have a floating-point dtype"):
        otloss.Coupling(T([0, 1]), T([0, 1]), T([1, 1])).to_dense(2, 2)
    dense = otloss.Coupling(T([0, 1]), T([1, 0]), T([0.5, 0.5])).to_dense(2, 2)
    assert dense.tolist() == [[0.0, 0.5], [0.5, 0.0]]


def test_fsd_report_keeps_distinct_levels_apart():
    u, v = torch.randn(50), torch.randn(40)
    keys = [k for k in otloss.fsd_report(u, v) if k.startswith("quantile_margin_")]
    assert keys == [f"quantile_margin_{q}" for q in ("0.1", "0.25", "0.5", "0.75", "0.9")]
    report = otloss.fsd_report(u, v, [0.1, 0.1000001, 0.5])
    assert [k for k in report if k.startswith("quantile_margin_")] == [
        "quantile_margin_0.1",
        "quantile_margin_0.1000001",
        "quantile_margin_0.5",
    ]


def test_option_types_of_the_dominance_and_token_functions():
    x, y = torch.rand(6), torch.rand(5)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, got int"):
        otloss.dominance_test(x, y, n_bootstrap=2, generator=5)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None"):
        otloss.rank_models([x, y], n_bootstrap=2, generator="seed")
    # NumPy integers are ints
    g = torch.Generator()
    a = otloss.dominance_test(x, y, n_bootstrap=np.int64(4), generator=g.manual_seed(0))
    b = otloss.dominance_test(x, y, n_bootstrap=4, generator=g.manual_seed(0))
    assert a.ratio == b.ratio and torch.equal(a.bootstrap, b.bootstrap)
    C = torch.rand(2, 3)
    with_numpy = otloss.entropic_ot(C, epsilon=0.5, max_iter=np.int64(50))
    torch.testing.assert_close(with_numpy, otloss.entropic_ot(C, epsilon=0.5, max_iter=50))
    with pytest.raises(TypeError, match="max_iter must be an int, got float"):
        otloss.entropic_ot(C, epsilon=0.5, max_iter=50.0)
    labels = torch.tensor([[0, -100]])
    E = torch.randn(3, 4)
    logits = torch.randn(1, 2, 3)
    with_numpy = otloss.token_ot_loss(logits, labels, E, ignore_index=np.int64(-100))
    torch.testing.assert_close(with_numpy, otloss.token_ot_loss(logits, labels, E))
    # sparse and float8 inputs are refused by name
    with pytest.raises(TypeError, match="a must be a dense"):
        otloss.entropic_ot(torch.rand(3, 4), torch.ones(3).to_sparse(), epsilon=0.1)
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match=r"x must have a floating-point dtype .*float8"):
            otloss.violation_ratio(x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn))
        with pytest.raises(TypeError, match="x_weights must have a floating-point dtype"):
            otloss.violation_ratio(x, y, x_weights=torch.ones(6).to(torch.float8_e4m3fn))
    # zero_one is the 1-D area ratio; duplicate model names are refused
    with pytest.raises(ValueError, match="cost='zero_one' \\(the area ratio\\) is for \\[n\\] inputs"):
        otloss.violation_ratio(torch.rand(5, 2), torch.rand(4, 2), cost="zero_one")
    with pytest.raises(ValueError, match="names must be distinct"):
        otloss.rank_models({1: x, "1": y})


@pytest.mark.parametrize(
    "options, exc, match",
    [
        (dict(margin=-1.0), ValueError, "margin must be a finite number > 0"),
        (dict(gamma=0.0), ValueError, "gamma must be a finite number > 0"),
        (dict(beta="x"), TypeError, "beta must be a real number"),
        (dict(beta=-1.0), ValueError, "beta must be a finite number > 0"),
        (dict(cost="sqeuclidean"), ValueError, "margin must be given with cost='sqeuclidean'"),
        (dict(base=None, aot_kwargs={"paired": False}), ValueError, "aot_kwargs applies to base='aot' only"),
        (dict(return_components=1), TypeError, "return_components must be a bool"),
    ],
)
def test_plot_loss_module_checks_its_options_when_built(options, exc, match):
    with pytest.raises(exc, match=match):
        otloss.PLOTLoss(**options)


def test_kl_soft_sort_gives_nan_for_a_non_finite_row_with_checks_off():
    x = torch.tensor([[1.0, float("inf"), 2.0], [1.0, 3.0, 2.0]])
    for reg in ("kl", "l2"):
        out = otloss.soft_sort(x, 1.0, regularization=reg, validate_args=False)
        assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
        with pytest.raises(ValueError, match="x contains non-finite"):
            otloss.soft_sort(x, 1.0, regularization=reg)
