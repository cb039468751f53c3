"""The per-call shortcuts of ``aot_loss`` and ``ot_h_1d``: cached costs, the fused metadata check, the direct
dispatch to the loss node. Behaviour only (no timing): the shortcuts give the same values and gradients and the
same errors as the general path."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import otloss
from otloss import functional as fn
from otloss._validation import plain_values

NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _logps(n=8, shape=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if shape is None else shape
    t = [(torch.randn(shape, generator=g, dtype=torch.float64) - 50).to(dtype) for _ in range(4)]
    t[0].requires_grad_(True)
    t[1].requires_grad_(True)
    return t


# --- cached costs ------------------------------------------------------------------------------------------


def test_named_cost_is_built_once_and_reused():
    a = fn._aot_cost("logistic", 0.01, 0.0)
    assert fn._aot_cost("logistic", 0.01, 0.0) is a
    assert a == otloss.logistic(0.01, 0.0)
    assert fn._aot_cost("logistic", None, 0.0) == otloss.logistic(fn.AOT_DEFAULT_BETA)
    assert fn._aot_cost("logistic", 0.02, 0.0) is not a
    assert fn._aot_cost("hinge", 0.01, 0.0) == otloss.hinge(0.01)


def test_cache_key_tells_types_and_signed_zeros_apart():
    pos = fn._aot_cost("hinge", 0.0, 0.0)
    neg = fn._aot_cost("hinge", -0.0, 0.0)
    assert pos is not neg
    assert str(pos.beta) == "0.0" and str(neg.beta) == "-0.0"
    as_int = fn._aot_cost("hinge", 1, 0.0)
    as_float = fn._aot_cost("hinge", 1.0, 0.0)
    assert as_int is not as_float and as_int == as_float


@pytest.mark.parametrize(
    ("beta", "ls", "cost", "exc", "match"),
    [
        (float("nan"), 0.0, "logistic", ValueError, "beta must be finite"),
        (-1.0, 0.0, "logistic", ValueError, "beta must be > 0"),
        (0.01, 2.0, "logistic", ValueError, r"label_smoothing must be in \[0, 1\]"),
        (0.01, 0.1, "hinge", ValueError, "label_smoothing applies to the logistic cost only"),
        (True, 0.0, "logistic", TypeError, "beta must be a real number"),
        (0.01, 0.0, "nope", ValueError, "cost must be one of"),
    ],
)
def test_bad_arguments_raise_on_every_call_and_are_not_cached(beta, ls, cost, exc, match):
    before = dict(fn._AOT_COST_CACHE)
    t = _logps()
    for _ in range(2):
        with pytest.raises(exc, match=match):
            otloss.aot_loss(*t, cost=cost, beta=beta, label_smoothing=ls)
    assert fn._AOT_COST_CACHE == before


def test_cached_cost_pickles(tmp_path):
    import pickle

    c = fn._aot_cost("logistic", 0.01, 0.1)
    assert pickle.loads(pickle.dumps(c)) == c


# --- the fused metadata check ------------------------------------------------------------------------------


def test_plain_values_accepts_only_what_every_named_check_accepts():
    x = torch.zeros(3)
    assert plain_values((x, x.clone(), torch.ones(2, 3)[0], x))
    assert not plain_values((x, x.double()))
    assert not plain_values((x, torch.zeros(3, device="meta")))
    assert not plain_values((x, torch.zeros(0)))
    assert not plain_values((x, torch.tensor(1.0)))
    assert not plain_values((x, [0.0, 1.0, 2.0]))
    assert not plain_values((torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)))
    assert not plain_values((x, x.to_sparse()))


@pytest.mark.parametrize(
    ("index", "bad", "exc", "match"),
    [
        (
            2,
            torch.zeros(8, dtype=torch.float64),
            TypeError,
            "policy_chosen_logps and ref_chosen_logps must have the same dtype",
        ),
        (3, torch.zeros(8, device="meta"), ValueError, "must be on the same device"),
        (1, torch.zeros(0), ValueError, "policy_rejected_logps must be non-empty"),
        (0, torch.tensor(1.0), ValueError, "policy_chosen_logps must have at least 1 dimension"),
        (3, [0.0] * 8, TypeError, "ref_rejected_logps must be a torch.Tensor"),
        (1, torch.zeros(8, dtype=torch.int32), TypeError, "policy_rejected_logps must have a floating-point dtype"),
        (2, torch.zeros(9), ValueError, "paired AOT needs the four log-probability tensors to have one shape"),
    ],
)
def test_aot_metadata_errors_unchanged(index, bad, exc, match):
    t = _logps()
    t[index] = bad
    with pytest.raises(exc, match=match):
        otloss.aot_loss(*t)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"sort": "Hard"}, ValueError, "sort must be 'hard', 'soft' or a SoftSort"),
        ({"reduction": "avg"}, ValueError, "reduction must be 'none', 'mean' or 'sum'"),
        ({"backend": "cuda"}, ValueError, "backend must be 'auto', 'torch' or 'triton'"),
        ({"validate_args": 1}, TypeError, "validate_args must be a bool or None"),
        ({"global_batch": 0}, TypeError, "global_batch must be a bool"),
        ({"group": object()}, ValueError, "group is used only with global_batch=True"),
    ],
)
def test_option_errors_unchanged(kwargs, exc, match):
    t = _logps()
    with pytest.raises(exc, match=match):
        otloss.aot_loss(*t, **kwargs)
    with pytest.raises(exc, match=match):
        otloss.ot_h_1d(t[0], t[2], "hinge", **kwargs)


def test_ot_h_1d_metadata_errors_unchanged():
    u, v = torch.zeros(2, 3, requires_grad=True), torch.zeros(3, 3)
    with pytest.raises(ValueError, match="u and v must have the same leading"):
        otloss.ot_h_1d(u, v, "hinge")
    with pytest.raises(TypeError, match="u and v must have the same dtype"):
        otloss.ot_h_1d(u, torch.zeros(2, 3, dtype=torch.float64), "hinge")
    with pytest.raises(ValueError, match="v must be non-empty"):
        otloss.ot_h_1d(u, torch.zeros(2, 0), "hinge")


# --- the direct dispatch to the loss node ----------------------------------------------------------------


def _spy(monkeypatch, name: str) -> list[int]:
    """Wrap ``otloss.functional.<name>`` for the test; the returned list grows by one per call."""
    calls: list[int] = []
    real = getattr(fn, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fn, name, spy)
    return calls


def _no_general_path(*args, **kwargs):
    raise AssertionError("the general path ran")


def test_common_calls_go_straight_to_the_node(monkeypatch):
    t = _logps()
    u, v = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    expected = otloss.aot_loss(*t), otloss.ot_h_1d(u, v, otloss.abs_pow(2.0))
    monkeypatch.setattr(fn, "_ot_h_1d", _no_general_path)
    assert torch.equal(otloss.aot_loss(*t), expected[0])
    assert torch.equal(otloss.ot_h_1d(u, v, otloss.abs_pow(2.0)), expected[1])


@pytest.mark.parametrize(
    "case",
    ["no_grad", "bf16", "meta", "weights", "unequal", "triton", "metric", "soft", "vmap"],
)
def test_other_calls_take_the_general_path(monkeypatch, case):
    calls = _spy(monkeypatch, "_ot_h_1d")
    u, v = torch.randn(8, requires_grad=True), torch.randn(8)
    kwargs = {}
    cost = otloss.abs_pow(2.0)
    if case == "no_grad":
        u = u.detach()
    elif case == "bf16":
        u, v = u.detach().bfloat16().requires_grad_(True), v.bfloat16()
    elif case == "meta":
        u, v = torch.zeros(8, device="meta", requires_grad=True), torch.zeros(8, device="meta")
    elif case == "weights":
        kwargs["u_weights"] = torch.ones(8)
    elif case == "unequal":
        v = torch.randn(5)
    elif case == "triton":
        kwargs["backend"] = "triton"
    elif case == "metric":
        cost = "zero_one"
    elif case == "soft":
        kwargs["sort"] = "soft"
    if case == "vmap":
        torch.func.vmap(lambda a, b: otloss.ot_h_1d(a, b, cost, validate_args=False))(
            torch.randn(2, 8), torch.randn(2, 8)
        )
    elif case == "triton":  # runs under TRITON_INTERPRET=1, or raises naming the reason without it
        try:
            otloss.ot_h_1d(u, v, cost, **kwargs)
        except (ValueError, ImportError):
            pass
    else:
        otloss.ot_h_1d(u, v, cost, **kwargs)
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 33)])
def test_node_path_equals_the_general_path(dtype, shape):
    t = _logps(shape=shape, dtype=dtype)
    loss = otloss.aot_loss(*t, beta=0.1)
    grads = torch.autograd.grad(loss, t[:2])
    named = tuple(zip(t, NAMES))
    h = otloss.logistic(0.1)
    ref = fn._ot_h_1d(t[0], t[2], h, None, None, None, True, "mean", False, None, None, "auto",
                      u2=t[1], v2=t[3], named=named)  # fmt: skip
    assert torch.equal(loss, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, t[:2])):
        assert torch.equal(g, r)
    # and the minimal formula, to the last bit in value
    z = torch.sort(t[0] - t[1]).values - torch.sort(t[2] - t[3]).values
    assert torch.equal(
        loss, (-F.logsigmoid(0.1 * z)).mean(-1).mean() if len(shape) > 1 else (-F.logsigmoid(0.1 * z)).mean()
    )


def test_node_path_value_check_names_the_input():
    t = _logps()
    with torch.no_grad():
        t[3][2] = float("inf")
    with pytest.raises(ValueError, match=r"ref_rejected_logps contains non-finite values \(0 NaN, 1 Inf\)"):
        otloss.aot_loss(*t)
    out = otloss.aot_loss(*t, validate_args=False)  # IEEE arithmetic: z = +inf gives the logistic cost 0 there
    assert torch.isfinite(out)


def test_node_path_follows_the_global_setting():
    t = _logps()
    with torch.no_grad():
        t[0][0] = float("nan")
    otloss.set_validate_args(False)
    try:
        assert torch.isnan(otloss.aot_loss(*t))
    finally:
        otloss.set_validate_args(True)
    with pytest.raises(ValueError, match="policy_chosen_logps contains non-finite values"):
        otloss.aot_loss(*t)


# --- soft sort: one check, by ot_h_1d -----------------------------------------------------------------------


def test_soft_sort_with_checks_off_gives_nan_like_the_hard_sort():
    u = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 2.0, 1.0]])
    v = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    cost = otloss.abs_pow(2.0)
    soft = otloss.ot_h_1d(u, v, cost, sort="soft", validate_args=False, reduction="none")
    hard = otloss.ot_h_1d(u, v, cost, sort="hard", validate_args=False, reduction="none")
    assert torch.isnan(soft[0]) and torch.isnan(hard[0])
    assert torch.isfinite(soft[1]) and torch.isfinite(hard[1])


def test_soft_sort_check_names_ot_h_1d_inputs():
    u = torch.tensor([0.0, 1.0, 2.0])
    v = torch.tensor([0.0, float("inf"), 2.0])
    with pytest.raises(ValueError, match=r"^v contains non-finite values \(0 NaN, 1 Inf\)"):
        otloss.ot_h_1d(u, v, "hinge", sort="soft")


# --- the reduction inside the node -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(1, 5), (3, 33), (2, 3, 4)])
@pytest.mark.parametrize("cost", [otloss.abs_pow(2.0), otloss.logistic(0.5)])
def test_reduction_inside_the_node_equals_reducing_after(reduction, shape, cost):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(shape, generator=g).requires_grad_(True)
    v = torch.randn(shape, generator=g).requires_grad_(True)
    out = otloss.ot_h_1d(u, v, cost, reduction=reduction)
    rows = otloss.ot_h_1d(u, v, cost, reduction="none")
    after = rows.mean() if reduction == "mean" else rows.sum()
    assert out.shape == () and torch.equal(out, after)
    w = torch.tensor(1.7)
    for a, b in zip(torch.autograd.grad(out, (u, v), w), torch.autograd.grad(after, (u, v), w)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_inside_the_node_gradgradcheck(reduction):
    g = torch.Generator().manual_seed(2)
    u = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    v = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    pr = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    rr = torch.randn(3, 6, generator=g, dtype=torch.float64)

    def f(a, b, c):
        return otloss.aot_loss(a, c, b, rr, beta=0.7, reduction=reduction)

    assert torch.autograd.gradcheck(f, (u, v, pr))
    assert torch.autograd.gradgradcheck(f, (u, v, pr))


# --- the lean path: attribute tests in place of the checks that would all pass -----------------------------


def test_lean_path_skips_the_checks_and_equals_the_general_path(monkeypatch):
    t = _logps(n=16)
    otloss.aot_loss(*t, beta=0.3)  # builds and caches the cost
    u, v = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    cost = otloss.abs_pow(2.0)
    general = otloss.aot_loss(*t, beta=0.3, validate_args=np.True_), otloss.ot_h_1d(u, v, cost, validate_args=np.True_)
    grads = torch.autograd.grad(general[0], t[:2]), torch.autograd.grad(general[1], u)
    monkeypatch.setattr(fn, "_check_options", _no_general_path)
    lean = otloss.aot_loss(*t, beta=0.3), otloss.ot_h_1d(u, v, cost)
    for a, b in zip(lean, general):
        assert torch.equal(a, b)
    for a, b in zip(torch.autograd.grad(lean[0], t[:2]), grads[0]):
        assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(lean[1], u)[0], grads[1][0])


@pytest.mark.parametrize(
    "case", ["numpy_bool", "no_grad", "bf16", "meta", "empty_rows", "sparse", "nested", "first_call", "soft", "list"]
)
def test_lean_path_declines_what_it_does_not_check(monkeypatch, case):
    calls = _spy(monkeypatch, "_check_options")
    t = _logps(n=8)
    kwargs = {"beta": 0.2}
    otloss.aot_loss(*t, **kwargs)
    calls.clear()
    expect: type[Exception] | None = None
    if case == "numpy_bool":
        kwargs["validate_args"] = np.True_
    elif case == "no_grad":
        t = [x.detach() for x in t]
    elif case == "bf16":
        t = [x.detach().bfloat16() for x in t]
        t[0].requires_grad_(True)
    elif case == "meta":
        t = [torch.zeros(8, device="meta", requires_grad=i == 0) for i in range(4)]
    elif case == "empty_rows":
        t = [torch.zeros(0, 8, requires_grad=i == 0) for i in range(4)]
        expect = ValueError
    elif case == "sparse":
        t[2] = t[2].detach().to_sparse()
        expect = TypeError
    elif case == "nested":
        t[2] = torch.nested.nested_tensor([t[2].detach()])
        expect = TypeError
    elif case == "first_call":
        kwargs["beta"] = 0.123456
    elif case == "soft":
        kwargs["sort"] = "soft"
    elif case == "list":
        t[3] = t[3].tolist()
        expect = TypeError
    if expect is None:
        otloss.aot_loss(*t, **kwargs)
    else:
        with pytest.raises(expect):
            otloss.aot_loss(*t, **kwargs)
    assert calls, "the lean path took a call it must leave to the checks"


def test_lean_path_value_check_names_the_input():
    t = _logps()
    otloss.aot_loss(*t)
    with torch.no_grad():
        t[1][3] = float("nan")
    with pytest.raises(ValueError, match=r"policy_rejected_logps contains non-finite values \(1 NaN, 0 Inf\)"):
        otloss.aot_loss(*t)
    u, v = torch.randn(5, requires_grad=True), torch.tensor([0.0, 1.0, float("-inf"), 2.0, 3.0])
    with pytest.raises(ValueError, match=r"^v contains non-finite values \(0 NaN, 1 Inf\)"):
        otloss.ot_h_1d(u, v, otloss.abs_pow(2.0))
    assert not torch.isfinite(otloss.ot_h_1d(u, v, otloss.abs_pow(2.0), validate_args=False))
