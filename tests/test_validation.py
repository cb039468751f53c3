"""Every bad input raises the documented error; NaN/Inf, dtypes, devices, huge values, ties."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import approx, tol

import otloss

x4 = torch.randn(4)


@pytest.fixture
def restore_validate():
    yield
    otloss.set_validate_args(True)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"u": [1.0, 2.0]}, TypeError, "u must be a torch.Tensor"),
        ({"u": torch.arange(4)}, TypeError, "u must have a floating-point dtype"),
        ({"v": torch.ones(4, dtype=torch.bool)}, TypeError, "v must have a floating-point dtype"),
        ({"u": torch.empty(0)}, ValueError, "u must be non-empty"),
        ({"v": torch.empty(3, 0)}, ValueError, "v must be non-empty"),
        ({"u": torch.tensor(1.0)}, ValueError, "u must have at least 1 dimension"),
        ({"u": torch.randn(2, 4)}, ValueError, "same leading"),
        ({"v": torch.randn(4, dtype=torch.float64)}, TypeError, "same dtype"),
        ({"v": torch.randn(4, device="meta")}, ValueError, "same device"),
        ({"u": torch.tensor([1.0, float("nan")])}, ValueError, "u contains non-finite values \\(1 NaN, 0 Inf\\)"),
        ({"v": torch.tensor([1.0, float("inf")])}, ValueError, "v contains non-finite values \\(0 NaN, 1 Inf\\)"),
        ({"u_weights": torch.tensor([1.0, -1.0, 1.0, 1.0])}, ValueError, "u_weights must be non-negative"),
        ({"v_weights": torch.zeros(4)}, ValueError, "v_weights must sum to a positive number"),
        ({"u_weights": torch.ones(3)}, ValueError, "u_weights must have the shape of u"),
        ({"u_weights": torch.ones(4, dtype=torch.int64)}, TypeError, "u_weights must have a floating-point dtype"),
        ({"v_weights": torch.tensor([1.0, float("nan"), 1.0, 1.0])}, ValueError, "v_weights contains non-finite"),
        ({"v_weights": [1.0, 1.0, 1.0, 1.0]}, TypeError, "v_weights must be a torch.Tensor"),
        ({"cost": "cosine"}, ValueError, "unknown cost 'cosine'"),
        ({"cost": 3}, TypeError, "cost must be a name, a Cost or a callable"),
        ({"sort": "bubble"}, ValueError, "sort must be 'hard', 'soft' or a SoftSort"),
        ({"reduction": "max"}, ValueError, "reduction must be 'none', 'mean' or 'sum'"),
        ({"validate_args": 1}, TypeError, "validate_args must be a bool"),
    ],
)
def test_ot_h_1d_bad_inputs(kwargs, exc, match):
    args = {"u": x4, "v": torch.randn(4), "cost": "abs_pow"} | kwargs
    u, v, cost = args.pop("u"), args.pop("v"), args.pop("cost")
    with pytest.raises(exc, match=match):
        otloss.ot_h_1d(u, v, cost, **args)


@pytest.mark.parametrize(
    "factory,kwargs,exc,match",
    [
        (otloss.logistic, {"beta": 0.0}, ValueError, "beta must be > 0"),
        (otloss.logistic, {"beta": float("nan")}, ValueError, "beta must be finite"),
        (otloss.logistic, {"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
        (otloss.hinge, {"beta": "1"}, TypeError, "beta must be a real number"),
        (otloss.abs_pow, {"p": 0.5}, ValueError, "p must be >= 1"),
    ],
)
def test_cost_bad_parameters(factory, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        factory(**kwargs)


def test_aot_bad_inputs():
    t = torch.randn(5)
    with pytest.raises(TypeError, match="ref_rejected_logps must have a floating-point dtype"):
        otloss.aot_loss(t, t, t, torch.arange(5))
    with pytest.raises(TypeError, match="same dtype"):
        otloss.aot_loss(t, t.double(), t, t)
    with pytest.raises(ValueError, match="ref_chosen_logps contains non-finite"):
        otloss.aot_loss(t, t, torch.full((5,), float("nan")), t)
    with pytest.raises(ValueError, match="policy_rejected_logps is \\(3,\\)"):
        otloss.aot_loss(t, t[:3], t, t[:3])
    with pytest.raises(ValueError, match="ref_rejected_logps must have the shape of policy_rejected_logps"):
        otloss.aot_loss(t, t[:3], t, t[:2], paired=False)
    with pytest.raises(ValueError, match="ref_chosen_logps must have the shape of policy_chosen_logps"):
        otloss.aot_loss(t, t[:3], t[:4], t[:3], paired=False)
    with pytest.raises(TypeError, match="paired must be a bool"):
        otloss.aot_loss(t, t, t, t, paired="yes")
    with pytest.raises(ValueError, match="policy_chosen_logps must be non-empty"):
        otloss.aot_loss(t[:0], t[:0], t[:0], t[:0])


def test_coupling_and_quantile_bad_inputs():
    with pytest.raises(ValueError, match="u must be non-empty"):
        otloss.quantile_coupling(torch.empty(0), torch.randn(3))
    with pytest.raises(ValueError, match="v_weights must be non-negative"):
        otloss.quantile_coupling(torch.randn(3), torch.randn(2), v_weights=torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="t must lie in"):
        otloss.quantile_function(torch.randn(3), [0.5, 1.5])
    with pytest.raises(ValueError, match="measure must be one of"):
        otloss.fsd_violation(torch.randn(3), torch.randn(3), "w3")
    with pytest.raises(ValueError, match="fsd_report takes 1-D"):
        otloss.fsd_report(torch.randn(2, 3), torch.randn(2, 3))


def test_validation_can_be_turned_off_and_nan_propagates(restore_validate):
    u = torch.tensor([0.0, float("nan"), 1.0])
    v = torch.randn(3)
    assert math.isnan(otloss.ot_h_1d(u, v, "abs_pow", validate_args=False).item())
    otloss.set_validate_args(False)
    assert otloss.get_validate_args() is False
    assert math.isnan(otloss.ot_h_1d(u, v, "abs_pow").item())
    # a NaN-free row of the batch is unaffected when checks are off
    rows = otloss.ot_h_1d(
        torch.stack([u, torch.zeros(3)]), torch.stack([v, torch.zeros(3)]), "abs_pow", reduction="none"
    )
    assert math.isnan(rows[0].item()) and rows[1].item() == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        otloss.ot_h_1d(u, v, "abs_pow", validate_args=True)  # per-call beats the default
    with pytest.raises(TypeError, match="must be a bool"):
        otloss.set_validate_args("no")


def test_metadata_checks_stay_on_when_values_are_not_checked():
    with pytest.raises(TypeError, match="same dtype"):
        otloss.ot_h_1d(torch.randn(3), torch.randn(3).double(), "abs_pow", validate_args=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32_and_returned_in_input_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    u64, v64 = (
        torch.randn(4, 33, generator=g, dtype=torch.float64),
        torch.randn(4, 20, generator=g, dtype=torch.float64),
    )
    u, v = u64.to(dtype).requires_grad_(True), v64.to(dtype)
    cost = otloss.logistic(1.0)
    out = otloss.ot_h_1d(u, v, cost)
    assert out.dtype == dtype
    out.backward()
    assert u.grad.dtype == dtype
    exact = otloss.ot_h_1d(u.detach().double(), v.double(), cost)  # same rounded inputs, exact arithmetic
    # judged against what plain PyTorch at this precision achieves on the same sorted formula
    naive = cost(torch.sort(u.detach(), -1).values[..., :20] - torch.sort(v, -1).values).mean()
    err_naive = abs(naive.double().item() - otloss.ot_h_1d(u.detach().double()[..., :20], v.double(), cost).item())
    err_ours = abs(out.double().item() - exact.item())
    assert err_ours <= max(2 * err_naive, torch.finfo(dtype).eps * exact.abs().item())


def test_float32_matches_float64_within_table_tolerance():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(3, 50, generator=g, dtype=torch.float64), torch.randn(3, 70, generator=g, dtype=torch.float64)
    for cost in [otloss.logistic(0.5), otloss.squared_hinge(0.1), otloss.abs_pow(1.0)]:
        ref = otloss.ot_h_1d(u, v, cost, reduction="none")
        got = otloss.ot_h_1d(u.float(), v.float(), cost, reduction="none")
        torch.testing.assert_close(got.double(), ref, **tol(torch.float32, "value"))


def test_non_contiguous_inputs():
    base_u, base_v = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    u, v = base_u.t(), base_v.t()  # [6, 8], non-contiguous
    assert not u.is_contiguous()
    torch.testing.assert_close(
        otloss.ot_h_1d(u, v, "abs_pow", reduction="none"),
        otloss.ot_h_1d(u.contiguous(), v.contiguous(), "abs_pow", reduction="none"),
    )
    w = torch.rand(8, 6, dtype=torch.float64).t()
    torch.testing.assert_close(
        otloss.ot_h_1d(u, v, "abs_pow", u_weights=w), otloss.ot_h_1d(u, v, "abs_pow", u_weights=w.contiguous())
    )


def test_huge_magnitudes():
    u = torch.tensor([1e30, -1e30, 3.0])
    v = torch.tensor([0.0, 1.0, 2.0])
    # logistic is computed stably: linear growth, no overflow to inf/nan
    out = otloss.ot_h_1d(u, v, otloss.logistic(1.0))
    assert torch.isfinite(out) and out.item() == approx(1e30 / 3, torch.float32, "ulp")
    # a cost that overflows float32 gives inf, as IEEE arithmetic does
    assert otloss.ot_h_1d(u, v, otloss.least_squares()).item() == float("inf")
    assert torch.isfinite(otloss.ot_h_1d(u.double(), v.double(), otloss.least_squares()))


def test_ties_give_the_same_value_whatever_the_order():
    u = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    v = torch.tensor([0.5, 2.0, 0.5, 0.5], dtype=torch.float64)
    perm = torch.tensor([3, 0, 2, 1])
    for cost in [otloss.logistic(1.0), otloss.hinge(0.0), otloss.abs_pow(2.0)]:
        torch.testing.assert_close(otloss.ot_h_1d(u, v, cost), otloss.ot_h_1d(u[perm], v[perm], cost))
    # -0.0 and 0.0 are the same atom
    assert otloss.ot_h_1d(torch.tensor([-0.0, 1.0]), torch.tensor([0.0, 1.0]), "abs_pow").item() == 0.0
