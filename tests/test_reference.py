"""The reference path's fast pieces: the stable sort with index and the one-node ``SortedOT``.

The oracle is the plain graph formula ``h(sort(u) - sort(v)).mean(-1)`` built from
``torch.sort(stable=True)``, whose gradient autograd derives with the permutation
held fixed.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import tol

import otloss
from otloss import _reference
from otloss._reference import NUMPY_SORT_MIN, sort_with_index

SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 3e38, -3e38, float("inf"), float("-inf"), 2.5, -2.5]
SPECIAL += [float("nan"), -float("nan")]  # torch.sort puts every NaN last, whatever its sign bit


def graph_rows(u, v, cost):
    us = torch.sort(u, dim=-1, stable=True).values
    vs = torch.sort(v, dim=-1, stable=True).values
    return cost(us - vs).mean(dim=-1)


@pytest.fixture
def numpy_sort_everywhere(monkeypatch):
    monkeypatch.setattr(_reference, "NUMPY_SORT_MIN", 1)


@settings(deadline=None)
@given(
    st.lists(st.sampled_from(SPECIAL) | st.floats(-10, 10, width=32), min_size=1, max_size=60),
    st.integers(1, 3),
)
def test_numpy_keys_sort_like_a_stable_torch_sort(values, rows):
    # every value once per row, then shuffled differently per row: ties, -0.0/+0.0, +-inf, denormals
    x = torch.tensor(values, dtype=torch.float32).repeat(rows, 1)
    x = torch.stack([r[torch.randperm(r.numel(), generator=torch.Generator().manual_seed(i))] for i, r in enumerate(x)])
    expected_values, expected_index = torch.sort(x, dim=-1, stable=True)
    index = _reference._numpy_sort_index(x)
    assert torch.equal(index, expected_index)  # ties (and -0.0 with +0.0, NaN with NaN) in index order
    torch.testing.assert_close(x.gather(-1, index), expected_values, rtol=0, atol=0, equal_nan=True)


def test_sort_with_index_picks_numpy_for_large_cpu_float32_only(monkeypatch):
    calls = []
    real = _reference._numpy_sort_index
    monkeypatch.setattr(_reference, "_numpy_sort_index", lambda x: calls.append(x.shape) or real(x))
    g = torch.Generator().manual_seed(0)
    big = torch.randint(-50, 50, (2, NUMPY_SORT_MIN), generator=g).float()  # many ties
    for x in (big, big.double(), big[:, :8], big.T.contiguous().T):
        values, index = sort_with_index(x)
        ref_values, ref_index = torch.sort(x, dim=-1, stable=True)
        assert torch.equal(values, ref_values) and torch.equal(index, ref_index)
    assert calls == [big.shape, big.shape]  # float32 with >= NUMPY_SORT_MIN elements, any strides


def test_sort_with_index_values_carry_the_gradient(numpy_sort_everywhere):
    x = torch.tensor([3.0, -1.0, 2.0], requires_grad=True)
    values, index = sort_with_index(x)
    (values * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
    assert index.tolist() == [1, 2, 0]
    assert x.grad.tolist() == [100.0, 1.0, 10.0]


COSTS = [otloss.logistic(0.7), otloss.logistic(0.3, 0.2), otloss.hinge(0.1), otloss.squared_hinge(0.2)]
COSTS += [otloss.least_squares(0.1), otloss.abs_pow(1.0), otloss.abs_pow(1.5)]


@pytest.mark.parametrize("cost", COSTS, ids=repr)
@pytest.mark.parametrize("needs", ["u", "v", "both"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, NUMPY_SORT_MIN + 3)])
def test_sorted_ot_matches_the_graph_formula(cost, needs, shape):
    g = torch.Generator().manual_seed(1)
    u = torch.randint(-4, 5, shape, generator=g).float() * 0.5  # ties on both sides
    v = torch.randn(shape, generator=g)
    up = torch.randn(shape[:-1], generator=g)  # a per-row upstream gradient
    out = {}
    for name, fn in (("fast", lambda a, b: otloss.ot_h_1d(a, b, cost, reduction="none")), ("graph", graph_rows)):
        a = u.clone().requires_grad_(needs in ("u", "both"))
        b = v.clone().requires_grad_(needs in ("v", "both"))
        rows = fn(a, b) if name == "fast" else fn(a, b, cost)
        (rows * up).sum().backward()
        out[name] = (rows.detach(), a.grad, b.grad)
    torch.testing.assert_close(out["fast"][0], out["graph"][0])
    for fast, graph in zip(out["fast"][1:], out["graph"][1:]):
        if graph is None:
            assert fast is None
        else:
            torch.testing.assert_close(fast, graph)


@pytest.mark.parametrize("cost", [otloss.logistic(0.7), otloss.hinge(0.1), otloss.abs_pow(1.5)], ids=repr)
@pytest.mark.parametrize("n", [6, NUMPY_SORT_MIN + 1])
def test_paired_node_subtracts_inside_and_matches_the_graph(cost, n):
    # SortedOT.apply(u, v, cost, check, u2, v2) is OT_h(u - u2, v - v2): paired AOT's margins in one node
    g = torch.Generator().manual_seed(n)
    ins = [torch.randint(-3, 4, (2, n), generator=g).float() * 0.5 for _ in range(4)]  # ties everywhere
    up = torch.tensor([1.0, -2.5])
    a = [t.clone().requires_grad_(True) for t in ins]
    rows = _reference.SortedOT.apply(a[0], a[2], cost, None, a[1], a[3])
    assert type(rows.grad_fn).__name__ == "SortedOTBackward"
    (rows * up).sum().backward()
    b = [t.clone().requires_grad_(True) for t in ins]
    expected = graph_rows(b[0] - b[1], b[2] - b[3], cost)
    (expected * up).sum().backward()
    torch.testing.assert_close(rows, expected.detach())
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
    if n < NUMPY_SORT_MIN:  # double backward, away from ties and kinks; one input without grad
        c = [torch.randn(2, n, generator=g, dtype=torch.float64).requires_grad_(i != 2) for i in range(4)]
        torch.autograd.gradgradcheck(lambda p, q, r, s: _reference.SortedOT.apply(p, r, cost, None, q, s), c)


def test_sorted_ot_is_one_autograd_node():
    u, v = torch.randn(9, requires_grad=True), torch.randn(9)
    loss = otloss.ot_h_1d(u, v, otloss.logistic(1.0))
    assert type(loss.grad_fn).__name__ == "SortedOTBackward"
    loss = otloss.ot_h_1d(u, v, lambda z: z.square())  # no dh: the autograd graph
    assert type(loss.grad_fn).__name__ != "SortedOTBackward"


@pytest.mark.parametrize("cost", [otloss.logistic(0.9, 0.1), otloss.least_squares(0.2), otloss.abs_pow(1.5)], ids=repr)
def test_double_backward_matches_the_graph_formula(cost):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, b: otloss.ot_h_1d(a, b, cost, reduction="none"), (u, v))
    hvp = {}
    for name, fn in (
        ("fast", lambda a, b: otloss.ot_h_1d(a, b, cost)),
        ("graph", lambda a, b: graph_rows(a, b, cost).mean()),
    ):
        (gu,) = torch.autograd.grad(fn(u, v), u, create_graph=True)
        hvp[name] = torch.autograd.grad((gu * torch.arange(12.0, dtype=torch.float64).view(2, 6)).sum(), (u, v))
    for a, b in zip(hvp["fast"], hvp["graph"]):
        torch.testing.assert_close(a, b)


def test_custom_cost_with_derivative_takes_the_fast_path():
    def h(z):
        return torch.cosh(z) - 1

    cost = otloss.Cost(h, torch.sinh)
    u = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert type(otloss.ot_h_1d(u, v, cost, reduction="none").grad_fn).__name__ == "SortedOTBackward"
    torch.autograd.gradcheck(lambda a, b: otloss.ot_h_1d(a, b, cost, reduction="none"), (u, v))
    # and the same gradient as autograd of h (no dh)
    ga = torch.autograd.grad(otloss.ot_h_1d(u, v, cost), (u, v))
    gb = torch.autograd.grad(otloss.ot_h_1d(u, v, h), (u, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_cost_value_and_grad():
    z = torch.linspace(-30, 30, 101, dtype=torch.float64)
    for cost in [*COSTS, otloss.Cost(torch.exp, torch.exp)]:
        h, d = cost.value_and_grad(z, 0.25)
        torch.testing.assert_close(h, cost(z))
        torch.testing.assert_close(d, 0.25 * cost.grad(z))
    with pytest.raises(TypeError, match="value_and_grad must be callable and comes with dh"):
        otloss.Cost(torch.exp, None, value_and_grad=lambda z, s: (z, z))


@pytest.mark.parametrize("n", [5, NUMPY_SORT_MIN])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("grad", [True, False])
def test_each_non_finite_input_is_named(n, bad, grad):
    # +inf in u gives z = +inf, where the logistic cost is 0: the check must not rely on the loss value
    names = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
    for i, name in enumerate(names):
        t = [torch.randn(n, requires_grad=grad and j < 2) for j in range(4)]
        with torch.no_grad():
            t[i][n // 2] = bad
        with pytest.raises(ValueError, match=f"{name} contains non-finite"):
            otloss.aot_loss(*t)
        with pytest.raises(ValueError, match=f"{name} contains non-finite"):
            otloss.aot_loss(*t, paired=False)
    for name in ("u", "v"):
        u, v = torch.randn(2, n, requires_grad=grad), torch.randn(2, n)
        with torch.no_grad():
            (u if name == "u" else v)[1, 0] = bad
        with pytest.raises(ValueError, match=f"{name} contains non-finite"):
            otloss.ot_h_1d(u, v, otloss.logistic(1.0))


@pytest.mark.parametrize(
    "cost",
    [otloss.logistic(1.0), otloss.hinge(), otloss.squared_hinge(), otloss.least_squares(0.5),
     otloss.abs_pow(1.0), otloss.abs_pow(2.0), otloss.abs_pow(3.0)],
    ids=repr,
)  # fmt: skip
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6,), (1, 6), (3, 6)])
def test_the_loss_node_finds_each_non_finite_value_for_every_cost(cost, reduction, shape):
    # the node tests one cheap probe (the costs of the rows where h is finite exactly on finite z, else z
    # itself) and checks the inputs when it is not finite: +inf or -inf in either input, under each cost
    # (the hinge family and the logistic cost are finite at one infinity), and NaN
    for bad in (float("inf"), float("-inf"), float("nan")):
        for name in ("u", "v"):
            u, v = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
            with torch.no_grad():
                (u if name == "u" else v)[..., 2] = bad
            with pytest.raises(ValueError, match=f"{name} contains non-finite"):
                otloss.ot_h_1d(u, v, cost, reduction=reduction)
    # finite inputs whose cost overflows float32: IEEE inf (or a finite value), never an error
    u = torch.full(shape, 1e30, requires_grad=True)
    out = otloss.ot_h_1d(u, torch.full(shape, -1e30), cost, reduction=reduction)
    assert not torch.isnan(out).any()
    out.sum().backward()
    assert not torch.isnan(u.grad).any()


def test_finite_inputs_whose_margins_overflow_are_let_through():
    big = torch.full((4,), 3e38)
    out = otloss.aot_loss(big, -big, torch.zeros(4), torch.zeros(4), cost="least_squares")
    assert math.isinf(out.item())  # (3e38 - -3e38) overflows float32: IEEE inf, no error
    small = otloss.aot_loss(big, -big, torch.zeros(4), torch.zeros(4))  # logistic(+inf margin) = 0
    assert small.item() == 0.0


@pytest.mark.parametrize("n", [5, NUMPY_SORT_MIN])
def test_nan_rows_give_nan_when_checks_are_off(n):
    u, v = torch.randn(3, n, requires_grad=True), torch.randn(3, n)
    with torch.no_grad():
        u[1, 2] = float("nan")
    rows = otloss.ot_h_1d(u, v, otloss.logistic(1.0), reduction="none", validate_args=False)
    assert math.isnan(rows[1].item()) and rows[[0, 2]].isfinite().all()
    rows.sum().backward()
    assert u.grad[[0, 2]].isfinite().all()


def test_values_are_checked_with_memory_and_without_global_batch():
    t = torch.randn(6)
    bad = t.clone()
    bad[2] = float("inf")
    with pytest.raises(ValueError, match="ref_rejected_logps contains non-finite"):
        otloss.aot_loss(t, t, t, bad, memory=otloss.QuantileMemory())


def test_function_transforms():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(2, 9, generator=g, dtype=torch.float64)
    v = torch.randn(2, 9, generator=g, dtype=torch.float64)
    cost = otloss.logistic(0.8)

    def graph(a, b):
        return graph_rows(a, b, cost).sum()

    def fast(a, b):
        return otloss.ot_h_1d(a, b, cost, reduction="sum")

    for argnums in (0, 1, (0, 1)):
        torch.testing.assert_close(
            torch.func.grad(fast, argnums=argnums)(u, v), torch.func.grad(graph, argnums=argnums)(u, v)
        )
    rows_fast = torch.func.jacrev(lambda a: otloss.ot_h_1d(a, v, cost, reduction="none"))(u)
    rows_graph = torch.func.jacrev(lambda a: graph_rows(a, v, cost))(u)
    torch.testing.assert_close(rows_fast, rows_graph)


def test_a_rejected_micro_batch_leaves_the_memory_as_it_was():
    memory = otloss.QuantileMemory()
    otloss.ot_h_1d(torch.randn(4), torch.randn(4), otloss.logistic(1.0), memory=memory)
    bad = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="u contains non-finite"):
        otloss.ot_h_1d(bad, torch.randn(3), otloss.logistic(1.0), memory=memory)
    assert memory.sizes == (4, 4)
    otloss.ot_h_1d(torch.randn(2), torch.randn(2), otloss.logistic(1.0), memory=memory)  # the step goes on
    assert memory.sizes == (6, 6)


@pytest.mark.parametrize("beta", [1e-3, 0.01, 1.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logistic_hot_path_value_and_gradient(beta, dtype):
    # one logsigmoid for h and h' (h' = beta expm1(logsigmoid(beta z))): each row's mean of h bitwise as
    # cost.h(z).mean() computes it (so values agree with TRL's formula to the last bit), h'/n as the
    # cost's own derivative
    z = torch.cat([torch.linspace(-3000, 3000, 2001, dtype=dtype), torch.tensor([0.0, -0.0, 1e-30], dtype=dtype)])
    cost = otloss.logistic(beta)
    for rows_of in (z, z.reshape(4, -1), z[:7]):
        mean, d = _reference.mean_and_scaled_grad(cost, rows_of)
        assert torch.equal(mean, cost.h(rows_of).mean(dim=-1))
        # below the smallest normal number (float32 denormals) the error is absolute
        torch.testing.assert_close(
            d, cost.dh(rows_of) / rows_of.shape[-1], rtol=tol(dtype, "ulp")["rtol"], atol=torch.finfo(dtype).tiny
        )
    smoothed = otloss.logistic(beta, 0.1)  # label smoothing: the cost's own value_and_grad
    mean, d = _reference.mean_and_scaled_grad(smoothed, z)
    torch.testing.assert_close(mean, smoothed.h(z).mean(), rtol=0, atol=0)
    torch.testing.assert_close(d, smoothed.dh(z) / z.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_w2_hot_path_value_and_gradient(dtype):
    # abs_pow(2): one dot product per row (summed in another order than square().mean(): to rounding)
    z = torch.randn(3, 1000, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 100
    cost = otloss.abs_pow(2.0)
    mean, d = _reference.mean_and_scaled_grad(cost, z)
    torch.testing.assert_close(mean, cost.h(z).mean(dim=-1), **tol(dtype, "value"))
    torch.testing.assert_close(d, cost.dh(z) / z.shape[-1], **tol(dtype, "ulp"))
    for other in (otloss.abs_pow(2.5), otloss.hinge(0.1)):  # the cost's own value_and_grad
        mean, d = _reference.mean_and_scaled_grad(other, z)
        torch.testing.assert_close(mean, other.h(z).mean(dim=-1), rtol=0, atol=0)
        torch.testing.assert_close(d, other.dh(z) / z.shape[-1])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("cost", [otloss.abs_pow(2.0), otloss.logistic(0.5), otloss.hinge(0.1)], ids=repr)
def test_a_single_row_reduces_to_its_own_cost(reduction, cost):
    # rows [1, n]: the reduced loss is the row's cost, a 0-dim tensor, bitwise what reduction="none" gives;
    # the gradient is the row's, scaled by the upstream gradient; the loss is no view, so it can be modified
    # in place (a view returned by an autograd node cannot)
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(1, 50, generator=g), torch.randn(1, 50, generator=g)
    a, b = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    out = otloss.ot_h_1d(a, b, cost, reduction=reduction)
    assert out.shape == () and type(out.grad_fn).__name__ == "SortedOTBackward"
    ar, br = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    row = otloss.ot_h_1d(ar, br, cost, reduction="none")
    assert torch.equal(out.detach(), row.detach()[0])
    (out * 3.0).backward()
    (row * 3.0).sum().backward()
    assert torch.equal(a.grad, ar.grad) and torch.equal(b.grad, br.grad)
    total = otloss.ot_h_1d(u.clone().requires_grad_(True), v, cost, reduction=reduction)
    assert not total._is_view()
    total += 1.0
    total.backward()
    torch.autograd.gradgradcheck(
        lambda x, y: otloss.ot_h_1d(x, y, cost, reduction=reduction),
        (u.double().requires_grad_(True), v.double().requires_grad_(True)),
    )


def test_constants_are_cached_for_plain_tensors_only():
    # the node's constants are cached 0-dim tensors; a fake-tensor trace (as torch.export runs) uses Python
    # numbers instead, so that no fake tensor is cached and no cached tensor meets a fake one
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    _reference._SCALARS.clear()
    with FakeTensorMode():
        u, v = torch.randn(8, requires_grad=True), torch.randn(8)
        out = otloss.ot_h_1d(u, v, otloss.abs_pow(2.0), validate_args=False)
        out = out + otloss.aot_loss(u, u, v, v, beta=0.3, validate_args=False)
        out.backward()
        assert isinstance(out, FakeTensor) and out.shape == () and u.grad.shape == (8,)
    assert not _reference._SCALARS
    u = torch.randn(8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, dtype=torch.float64)
    for cost in (otloss.abs_pow(2.0), otloss.logistic(0.3)):
        value = otloss.ot_h_1d(u, v, cost)
        torch.testing.assert_close(value, otloss.ot_h_1d(u.detach(), v, cost), **tol(torch.float64, "value"))
    cached = [t for t in _reference._SCALARS.values() if isinstance(t, torch.Tensor)]
    assert cached and all(type(t) is torch.Tensor and t.dtype == torch.float64 and t.dim() == 0 for t in cached)


@pytest.mark.parametrize("n", [10, 600, NUMPY_SORT_MIN])
def test_a_side_without_gradient_may_order_its_ties_freely(n):
    # the node sorts stably only the sides whose gradient it scatters; the other side's tie order cannot
    # change a value (tied values are equal) nor a gradient: the same results as with both sides stable
    g = torch.Generator().manual_seed(3)
    ties = torch.randint(0, 4, (4, n), generator=g).double()  # every row full of ties
    pc, pr = torch.randn(2, n, generator=g, dtype=torch.float64).unbind()
    rc, rr = ties[0].clone(), ties[1].clone()
    rc[:3] = torch.tensor([0.0, -0.0, 0.0], dtype=torch.float64)
    for paired in (True, False):
        a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        loss = otloss.aot_loss(a, b, rc, rr, paired=paired, beta=0.7)
        grads = torch.autograd.grad(loss, (a, b))
        both = [t.clone().requires_grad_(True) for t in (pc, pr, rc, rr)]  # every side stable
        loss_both = otloss.aot_loss(*both, paired=paired, beta=0.7)
        grads_both = torch.autograd.grad(loss_both, both[:2])
        assert torch.equal(loss, loss_both)
        for x, y in zip(grads, grads_both):
            assert torch.equal(x, y)
    u = ties[2].reshape(2, -1).requires_grad_(True)  # ties in u, which needs its gradient: stable
    v = ties[3].reshape(2, -1)
    gu = torch.autograd.grad(otloss.ot_h_1d(u, v, otloss.abs_pow(2.0)), u)[0]
    v2 = v.clone().requires_grad_(True)
    gu2 = torch.autograd.grad(otloss.ot_h_1d(u, v2, otloss.abs_pow(2.0)), u)[0]
    assert torch.equal(gu, gu2)
