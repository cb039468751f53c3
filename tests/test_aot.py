"""AOT losses: parity with TRL's ``aot`` / ``aot_unpaired`` formula, unequal sizes, modules."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import trl_aot_reference
from tolerances import approx, tol

import otloss


def _logps(b, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(-30 * torch.rand(b, generator=g, dtype=dtype) - 5).requires_grad_(True) for _ in range(4)]


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("beta,ls", [(0.01, 0.0), (0.1, 0.0), (0.5, 0.2), (2.0, 0.5)])
@pytest.mark.parametrize("b", [1, 2, 7, 35])
def test_trl_parity_value_and_gradient(paired, beta, ls, b):
    ours_in = _logps(b, seed=b)
    ref_in = [t.detach().clone().requires_grad_(True) for t in ours_in]
    ours = otloss.aot_loss(*ours_in, paired=paired, beta=beta, label_smoothing=ls)
    ref = trl_aot_reference(*ref_in, beta=beta, label_smoothing=ls, paired=paired)
    torch.testing.assert_close(ours, ref, **tol(torch.float64, "parity"))
    g_ours = torch.autograd.grad(ours, ours_in)
    g_ref = torch.autograd.grad(ref, ref_in)
    torch.testing.assert_close(g_ours, g_ref, **tol(torch.float64, "parity"))


def test_trl_parity_float32_and_default_beta():
    ins = _logps(16, seed=3, dtype=torch.float32)
    ours = otloss.aot_loss(*ins)
    ref = trl_aot_reference(*[t.detach() for t in ins], beta=0.01, label_smoothing=0.0, paired=True)
    torch.testing.assert_close(ours.detach(), ref)
    assert ours.dtype == torch.float32


def test_paired_uses_margins_unpaired_uses_log_ratios():
    pc, pr, rc, rr = (t.detach() for t in _logps(9, seed=4))
    cost = otloss.logistic(0.3)
    paired = otloss.aot_loss(pc, pr, rc, rr, cost=cost)
    unpaired = otloss.aot_loss(pc, pr, rc, rr, cost=cost, paired=False)
    torch.testing.assert_close(paired, otloss.ot_h_1d(pc - pr, rc - rr, cost))
    torch.testing.assert_close(unpaired, otloss.ot_h_1d(pc - rc, pr - rr, cost))


def test_unpaired_unequal_class_counts_uses_quantile_coupling():
    g = torch.Generator().manual_seed(5)
    pc, rc = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    pr, rr = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    pc.requires_grad_(True)
    loss = otloss.aot_loss(pc, pr, rc, rr, paired=False, beta=0.5)
    torch.testing.assert_close(loss, otloss.ot_h_1d(pc - rc, pr - rr, otloss.logistic(0.5)))
    loss.backward()
    assert torch.isfinite(pc.grad).all() and (pc.grad < 0).all()
    with pytest.raises(ValueError, match="paired=False"):
        otloss.aot_loss(pc, pr, rc, rr, paired=True)


@pytest.mark.parametrize("cost", ["hinge", "squared_hinge", "least_squares"])
def test_other_costs_use_beta_as_margin(cost):
    pc, pr, rc, rr = (t.detach() for t in _logps(8, seed=6))
    got = otloss.aot_loss(pc, pr, rc, rr, cost=cost, beta=0.2)
    torch.testing.assert_close(got, otloss.ot_h_1d(pc - pr, rc - rr, otloss.get_cost(cost, beta=0.2)))


def test_soft_sort_aot_matches_paper_code_shape():
    """The paper's soft-sort variant: soft_sort each margin vector with strength 0.1, then the logistic loss."""
    pc, pr, rc, rr = (t.detach() for t in _logps(12, seed=7))
    got = otloss.aot_loss(pc, pr, rc, rr, sort="soft", beta=0.05)
    u = otloss.soft_sort(pc - pr, 0.1)
    v = otloss.soft_sort(rc - rr, 0.1)
    torch.testing.assert_close(got, torch.nn.functional.softplus(-0.05 * (u - v)).mean())


def test_cost_object_carries_its_parameters():
    ins = [t.detach() for t in _logps(6, seed=8)]
    a = otloss.aot_loss(*ins, cost=otloss.logistic(0.3, 0.1))
    b = otloss.aot_loss(*ins, beta=0.3, label_smoothing=0.1)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="carries its own"):
        otloss.aot_loss(*ins, cost=otloss.logistic(0.3), beta=0.3)
    with pytest.raises(ValueError, match="label_smoothing applies to the logistic cost only"):
        otloss.aot_loss(*ins, cost="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="cost must be one of"):
        otloss.aot_loss(*ins, cost="zero_one")


def test_modules_call_the_functional():
    ins = [t.detach() for t in _logps(10, seed=9)]
    torch.testing.assert_close(
        otloss.AOTLoss(paired=False, beta=0.2)(*ins), otloss.aot_loss(*ins, paired=False, beta=0.2)
    )
    u, v = ins[0], ins[1]
    torch.testing.assert_close(otloss.OTLoss("abs_pow")(u, v), otloss.ot_h_1d(u, v, "abs_pow"))
    torch.testing.assert_close(otloss.FSDViolation("w1")(u, v), otloss.fsd_violation(u, v, "w1"))
    with pytest.raises(ValueError, match="label_smoothing"):
        otloss.AOTLoss(cost="hinge", label_smoothing=0.2)
    with pytest.raises(ValueError, match="sort must be"):
        otloss.AOTLoss(sort="fast")


@pytest.mark.parametrize(
    "module,function",
    [(otloss.AOTLoss, otloss.aot_loss), (otloss.OTLoss, otloss.ot_h_1d), (otloss.FSDViolation, otloss.fsd_violation)],
)
def test_module_defaults_equal_function_defaults(module, function):
    fn = inspect.signature(function).parameters
    for name, p in inspect.signature(module.__init__).parameters.items():
        if name == "self":
            continue
        assert name in fn, f"{module.__name__}.{name} is not an argument of {function.__name__}"
        assert p.default == fn[name].default, f"default of {name} differs"


def test_training_step_lowers_violation():
    """A few SGD steps on free policy margins lower the paired AOT loss and the FSD violation area."""
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(64, generator=g), torch.randn(64, generator=g)
    pc = rc.clone().requires_grad_(True)
    pr = rr.clone().requires_grad_(True)
    opt = torch.optim.SGD([pc, pr], lr=50.0)
    before = otloss.fsd_violation(pc - pr, rc - rr + 0.5, "area").item()
    losses = []
    for _ in range(20):
        loss = otloss.aot_loss(pc, pr, rc, rr, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = otloss.fsd_violation((pc - pr).detach(), rc - rr + 0.5, "area").item()
    assert after < before


def test_the_two_logistic_defaults_are_each_defined_once():
    """``"logistic"`` is beta 1 as a generic cost and beta AOT_DEFAULT_BETA = 0.01 in the AOT loss."""
    from otloss.functional import AOT_DEFAULT_BETA

    assert AOT_DEFAULT_BETA == 0.01
    g = torch.Generator().manual_seed(5)
    t = [torch.randn(12, generator=g, dtype=torch.float64) * 50 for _ in range(4)]
    u, v = t[0] - t[1], t[2] - t[3]
    assert otloss.get_cost("logistic") == otloss.logistic(1.0)
    assert otloss.ot_h_1d(u, v, "logistic").item() == otloss.ot_h_1d(u, v, otloss.logistic(1.0)).item()
    for cost in ("logistic", "hinge", "squared_hinge", "least_squares"):
        want = otloss.ot_h_1d(u, v, otloss.get_cost(cost, beta=AOT_DEFAULT_BETA)).item()
        assert otloss.aot_loss(*t, cost=cost).item() == approx(want, torch.float64, "parity")
        assert otloss.AOTLoss(cost=cost)(*t).item() == approx(want, torch.float64, "parity")
