"""Costs and loss modules pickle, deep-copy and go through torch.save / torch.load (issue 12 item 6).

Also the small-class contract of a built-in cost (issue 15 item 2): ``h``, ``dh``, ``kernel_id``
and the value and derivative at 0.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from tolerances import approx, tol

import otloss

BUILT_INS = [
    otloss.logistic(),
    otloss.logistic(0.1),
    otloss.logistic(0.7, label_smoothing=0.2),
    otloss.hinge(),
    otloss.hinge(0.1),
    otloss.hinge(-0.3),
    otloss.squared_hinge(0.25),
    otloss.squared_hinge(-1.0),
    otloss.least_squares(),
    otloss.least_squares(0.5),
    otloss.zero_one(),
    otloss.abs_pow(),
    otloss.abs_pow(1.5),
    otloss.abs_pow(2.0),
    otloss.abs_pow(3.0),
]
IDS = [repr(c) for c in BUILT_INS]
Z = torch.linspace(-4, 4, 33, dtype=torch.float64)


def _torch_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


ROUNDTRIPS = {
    "pickle": lambda x: pickle.loads(pickle.dumps(x)),
    "pickle-protocol-2": lambda x: pickle.loads(pickle.dumps(x, protocol=2)),
    "deepcopy": copy.deepcopy,
    "torch.save": _torch_roundtrip,
}


@pytest.mark.parametrize("how", sorted(ROUNDTRIPS))
@pytest.mark.parametrize("cost", BUILT_INS, ids=IDS)
def test_built_in_costs_round_trip(cost, how):
    back = ROUNDTRIPS[how](cost)
    assert type(back) is type(cost) and back is not cost
    assert back == cost and hash(back) == hash(cost) and repr(back) == repr(cost)
    assert back.kernel_id == cost.kernel_id and back.params == cost.params
    torch.testing.assert_close(back(Z), cost(Z), rtol=0, atol=0)
    if cost.differentiable:
        torch.testing.assert_close(back.grad(Z), cost.grad(Z), rtol=0, atol=0)


def _module_cases():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    logps = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4)]
    return {
        "OTLoss(logistic(0.1))": (otloss.OTLoss(otloss.logistic(0.1)), (u, v)),
        "OTLoss('abs_pow', soft)": (otloss.OTLoss("abs_pow", sort="soft"), (u, u.flip(-1))),
        "AOTLoss(hinge(0.1))": (otloss.AOTLoss(cost=otloss.hinge(0.1)), logps),
        "AOTLoss(squared_hinge, beta)": (otloss.AOTLoss(cost="squared_hinge", beta=0.2, paired=False), logps),
        "AOTLoss(logistic smoothing)": (otloss.AOTLoss(label_smoothing=0.1), logps),
        "FSDViolation(w1)": (otloss.FSDViolation("w1"), (u, v)),
        "FSDViolation(logistic(2))": (otloss.FSDViolation(otloss.logistic(2.0)), (u, v)),
    }


MODULES = _module_cases()


@pytest.mark.parametrize("how", sorted(ROUNDTRIPS))
@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_holding_costs_round_trip(name, how):
    module, args = MODULES[name]
    back = ROUNDTRIPS[how](module)
    assert type(back) is type(module) and repr(back) == repr(module)
    torch.testing.assert_close(back(*args), module(*args), rtol=0, atol=0)


def test_a_module_with_memory_keeps_its_stored_scalars():
    memory = otloss.QuantileMemory()
    loss = otloss.AOTLoss(cost=otloss.hinge(0.1), memory=memory)
    first = [torch.randn(4, dtype=torch.float64) for _ in range(4)]
    second = [torch.randn(4, dtype=torch.float64) for _ in range(4)]
    loss(*first)
    for how, roundtrip in ROUNDTRIPS.items():
        back = roundtrip(loss)
        assert back.memory is not memory and back.memory.sizes == (4, 4), how
        assert back(*second).item() == approx(copy.deepcopy(loss)(*second).item(), torch.float64, "ulp")
    assert memory.sizes == (4, 4)  # the copies did not touch the original


def _module_level_h(z):
    return torch.cosh(z) - 1


def test_custom_costs_pickle_when_their_functions_do():
    cost = otloss.Cost(_module_level_h, torch.sinh, name="cosh", params={"scale": 1.0}, even=True)
    for how, roundtrip in ROUNDTRIPS.items():
        back = roundtrip(cost)
        torch.testing.assert_close(back(Z), cost(Z), **tol(torch.float64))
        torch.testing.assert_close(back.grad(Z), cost.grad(Z), **tol(torch.float64))
        assert back.kernel_id is None and back.even and repr(back) == "cosh(scale=1.0)", how
    # a closure does not pickle (documented); deep copy still works, sharing the function
    closure = otloss.Cost(lambda z: z.square())
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(closure)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(otloss.OTLoss(lambda z: z.abs()))
    twin = copy.deepcopy(otloss.OTLoss(closure))
    assert twin(torch.ones(3), torch.zeros(3)).item() == 1.0


def test_costs_compare_by_family_and_parameters():
    assert otloss.logistic(0.1) == otloss.get_cost("logistic", beta=0.1)
    assert otloss.logistic(0.1) != otloss.logistic(0.2)
    assert otloss.hinge(0.0) != otloss.squared_hinge(0.0)
    assert len({otloss.hinge(0.1), otloss.hinge(0.1), otloss.abs_pow(1.0)}) == 2
    a, b = otloss.Cost(torch.abs), otloss.Cost(torch.abs)
    assert a != b and a == a  # custom costs: identity


# the ids the Triton kernels compare their ``COST`` constexpr with (otloss/ops/ot_sort.py)
KERNEL_IDS = {"logistic": 0, "hinge": 1, "squared_hinge": 2, "least_squares": 3, "abs_pow": 4, "zero_one": None}


@pytest.mark.parametrize("cost", BUILT_INS, ids=IDS)
def test_kernel_id_is_the_one_the_kernels_specialise_on(cost):
    import otloss.ops

    assert cost.kernel_id == KERNEL_IDS[cost.name]
    table = getattr(otloss.ops, "KERNEL_COSTS", None)  # the older name-keyed table, while it exists
    if table is not None:
        assert table.get(cost.name) == cost.kernel_id


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cost", BUILT_INS, ids=IDS)
def test_value_and_derivative_at_zero_are_pinned_down(cost, dtype):
    h0, dh0 = cost.at_zero
    for zero in (0.0, -0.0):
        z = torch.tensor([zero], dtype=dtype)
        assert cost(z).item() == approx(h0, dtype, "ulp")
        if dh0 is None:
            assert not cost.differentiable and cost.dh is None
            with pytest.raises(ValueError, match="metric only"):
                cost.grad(z)
        else:
            assert cost.grad(z).item() == approx(dh0, dtype, "ulp")
            # dh agrees with autograd of h away from kinks
            zz = torch.tensor([0.3, -1.7, 2.5], dtype=torch.float64, requires_grad=True)
            (auto,) = torch.autograd.grad(cost(zz).sum(), zz)
            torch.testing.assert_close(cost.dh(zz.detach()), auto, **tol(torch.float64, "grad"))


def test_value_and_grad_is_derived_from_h_and_dh():
    for cost in [c for c in BUILT_INS if c.differentiable]:
        h, d = cost.value_and_grad(Z, 0.25)
        torch.testing.assert_close(h, cost(Z), rtol=0, atol=0)
        torch.testing.assert_close(d, 0.25 * cost.dh(Z), **tol(torch.float64, "grad"))
        zg = Z.clone().requires_grad_(True)  # with a graph: both results stay differentiable
        h, d = cost.value_and_grad(zg, 2.0)
        assert h.requires_grad and (d.requires_grad or cost.name == "hinge")
    assert math.isclose(otloss.logistic(2.0, 0.25).at_zero[1], -2.0 * 0.5 / 2)


@pytest.mark.parametrize("how", sorted(ROUNDTRIPS))
def test_a_coupling_keeps_its_sizes(how):
    c = otloss.quantile_coupling(torch.randn(2, 3), torch.randn(2, 4), torch.rand(2, 3))
    back = ROUNDTRIPS[how](c)
    assert type(back) is otloss.Coupling and (back.n, back.m) == (3, 4)
    torch.testing.assert_close(back.to_dense(), c.to_dense(), rtol=0, atol=0)


def test_a_checkpoint_holding_built_in_costs_loads_with_weights_only():
    ckpt = {"cost": otloss.logistic(0.1, 0.2), "others": [otloss.hinge(0.3), otloss.zero_one(), otloss.abs_pow(1.5)]}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert back["cost"] == ckpt["cost"] and back["others"] == ckpt["others"]
    torch.testing.assert_close(back["cost"](Z), ckpt["cost"](Z), rtol=0, atol=0)
