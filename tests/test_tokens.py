"""token_ot_loss and the PLOT preference loss: closed forms, POT oracles, gradients, memory, bad input."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import requires_pot
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_within_lowp_error, tol

import otloss
from otloss.tokens import PLOTLoss, PLOTOutput, TokenOTLoss, plot_loss, token_ot_loss

F64 = torch.float64


def problem(B=2, T=6, V=13, D=5, dtype=F64, seed=0, n_ignored=2):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :n_ignored] = -100  # a prompt
    E = torch.randn(V, D, generator=g).to(dtype)
    return logits, labels, E


def token_cost(E: torch.Tensor, cost: str) -> torch.Tensor:
    """The dense ``[V, V]`` token cost, written directly from its definition."""
    E = E.double()
    if cost == "cosine":
        n = E.norm(dim=1)
        return 1 - (E @ E.T) / (n[:, None] * n[None, :])
    return ((E[:, None, :] - E[None, :, :]) ** 2).sum(-1)


def hand_position(logits, labels, E, cost, ignore_index=-100):
    """``sum_i p_i C[i, y]`` at every counted position, then the mean per sequence (Python loops)."""
    C = token_cost(E, cost)
    p = logits.double().softmax(-1)
    out = []
    for b in range(logits.shape[0]):
        vals = [(p[b, t] * C[:, labels[b, t]]).sum() for t in range(logits.shape[1]) if labels[b, t] != ignore_index]
        out.append(torch.stack(vals).mean() if vals else torch.zeros((), dtype=F64))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# mode="position": closed form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean"])
def test_position_equals_hand_closed_form(cost):
    logits, labels, E = problem()
    got = token_ot_loss(logits, labels, E, mode="position", cost=cost, reduction="none")
    want = hand_position(logits, labels, E, cost)
    torch.testing.assert_close(got, want, **tol(F64, "value"))
    torch.testing.assert_close(
        token_ot_loss(logits, labels, E, mode="position", cost=cost), want.mean(), **tol(F64, "value")
    )
    torch.testing.assert_close(
        token_ot_loss(logits, labels, E, mode="position", cost=cost, reduction="sum"), want.sum(), **tol(F64, "value")
    )


@requires_pot
@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean"])
@pytest.mark.parametrize("V,T", [(7, 3), (50, 8)])
def test_position_equals_pot_emd2_to_a_dirac(cost, V, T):
    import ot

    logits, labels, E = problem(B=2, T=T, V=V, D=6, seed=V)
    C = token_cost(E, cost).numpy()
    p = logits.softmax(-1).numpy()
    want = []
    for b in range(2):
        vals = []
        for t in range(T):
            if labels[b, t] == -100:
                continue
            dirac = np.zeros(V)
            dirac[labels[b, t]] = 1.0
            vals.append(ot.emd2(p[b, t], dirac, C))
        want.append(np.mean(vals))
    got = token_ot_loss(logits, labels, E, mode="position", cost=cost, reduction="none")
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), **tol(F64, "value"))


def test_position_float32_against_float64():
    logits, labels, E = problem(V=40, T=8)
    for cost in ("cosine", "sqeuclidean"):
        want = hand_position(logits, labels, E, cost)
        got = token_ot_loss(logits.float(), labels, E.float(), mode="position", cost=cost, reduction="none")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, **tol(torch.float32, "value"))


def test_position_sqeuclidean_is_translation_invariant_and_survives_a_large_offset():
    logits, labels, E = problem(V=30)
    far = (E + 1e4).float()  # |e|^2 ~ 1e8: expanded without centring, float32 would lose every digit of an O(10) cost
    got = token_ot_loss(logits.float(), labels, far, mode="position", cost="sqeuclidean", reduction="none")
    want = hand_position(logits.float(), labels, far, "sqeuclidean")  # float64 on the same float32 inputs
    torch.testing.assert_close(got.double(), want, **tol(torch.float32, "value"))
    torch.testing.assert_close(
        token_ot_loss(logits, labels, E + 1e4, mode="position", cost="sqeuclidean"),
        token_ot_loss(logits, labels, E, mode="position", cost="sqeuclidean"),
        **tol(F64, "value"),
    )


def test_position_saturated_logits_and_ties():
    V = 6
    E = torch.randn(V, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    C = token_cost(E, "cosine")
    logits = torch.full((1, 2, V), -1e30, dtype=F64)
    logits[0, 0, 2] = 1e30  # a Dirac at token 2
    logits[0, 1, [1, 4]] = 1e30  # a tie: half on 1, half on 4
    labels = torch.tensor([[5, 0]])
    got = token_ot_loss(logits, labels, E, mode="position", reduction="none")
    want = (C[2, 5] + 0.5 * (C[1, 0] + C[4, 0])) / 2
    torch.testing.assert_close(got, want.reshape(1), **tol(F64, "value"))
    # predicting the label exactly costs 0
    exact = torch.full((1, 1, V), -1e30, dtype=F64)
    exact[0, 0, 3] = 0.0
    zero = token_ot_loss(exact, torch.tensor([[3]]), E, mode="position")
    torch.testing.assert_close(zero, torch.zeros((), dtype=F64), **tol(F64, "value"))


def test_minus_inf_logits_mask_vocabulary_entries():
    logits, labels, E = problem(V=9)
    masked = logits.clone()
    masked[..., :3] = float("-inf")
    got = token_ot_loss(masked, labels, E, mode="position", reduction="none")
    p = logits[..., 3:].softmax(-1)
    full_p = torch.cat([torch.zeros_like(logits[..., :3]), p], -1)
    want = token_ot_loss(full_p.log().nan_to_num(neginf=-1e300), labels, E, mode="position", reduction="none")
    torch.testing.assert_close(got, want, **tol(F64, "value"))


def test_empty_sequence_is_zero_and_left_out_of_the_mean():
    logits, labels, E = problem(B=3)
    labels[1] = -100
    per = token_ot_loss(logits, labels, E, mode="position", reduction="none")
    assert per[1] == 0
    mean = token_ot_loss(logits, labels, E, mode="position")
    torch.testing.assert_close(mean, (per[0] + per[2]) / 2, **tol(F64, "value"))
    lg = logits.clone().requires_grad_(True)
    token_ot_loss(lg, labels, E, mode="position").backward()
    assert lg.grad[1].abs().max() == 0 and lg.grad[0, :2].abs().max() == 0  # ignored positions get no gradient
    assert lg.grad[0, 2:].abs().max() > 0


def test_custom_ignore_index():
    logits, labels, E = problem()
    other = labels.clone()
    other[labels == -100] = 7
    torch.testing.assert_close(
        token_ot_loss(logits, other, E, mode="position", ignore_index=7),
        token_ot_loss(logits, labels.masked_fill(labels == 7, -100), E, mode="position"),
        **tol(F64, "value"),
    )


@settings(max_examples=40)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 6),
    V=st.integers(1, 12),
    D=st.integers(1, 4),
    scale=st.sampled_from([0.0, 1.0, 30.0]),
    chunk=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    cost=st.sampled_from(["cosine", "sqeuclidean"]),
)
def test_position_property(B, T, V, D, scale, chunk, seed, cost):
    """Any shape (V = 1, T = 1 included), flat or peaked logits, any chunk: the closed form, in range."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, T, V, generator=g, dtype=F64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[0, 0] = 0  # at least one counted position
    E = torch.randn(V, D, generator=g, dtype=F64)
    got = token_ot_loss(logits, labels, E, mode="position", cost=cost, chunk_size=chunk, reduction="none")
    torch.testing.assert_close(got, hand_position(logits, labels, E, cost), **tol(F64, "value"))
    assert (got >= 0).all()
    if cost == "cosine":
        assert (got <= 2 + tol(F64, "parity")["atol"]).all()


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean"])
def test_position_gradcheck_logits_and_embeddings(cost):
    logits, labels, E = problem(B=2, T=4, V=7, D=3)
    logits.requires_grad_(True)
    E.requires_grad_(True)
    fn = lambda lg, e: token_ot_loss(  # noqa: E731
        lg, labels, e, mode="position", cost=cost, reduction="none", embedding_grad=True, chunk_size=3
    )
    assert torch.autograd.gradcheck(fn, (logits, E))


def test_embeddings_detached_by_default():
    logits, labels, E = problem()
    logits.requires_grad_(True)
    E.requires_grad_(True)
    token_ot_loss(logits, labels, E, mode="position").backward()
    assert E.grad is None and logits.grad is not None
    token_ot_loss(logits, labels, E, mode="position", embedding_grad=True).backward()
    assert E.grad is not None and E.grad.abs().max() > 0


def test_upstream_gradient_scales():
    logits, labels, E = problem()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    token_ot_loss(a, labels, E, mode="position").backward()
    (2.5 * token_ot_loss(b, labels, E, mode="position")).backward()
    torch.testing.assert_close(b.grad, 2.5 * a.grad, **tol(F64, "grad"))


def test_gradient_matches_plain_autograd_in_float32():
    """The chunked autograd node against ``softmax(logits) @ E`` differentiated by autograd."""
    logits, labels, E = problem(V=31, T=7, dtype=torch.float32)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    token_ot_loss(a, labels, E, mode="position", chunk_size=4).backward()
    En = F.normalize(E, dim=-1)
    mask = labels != -100
    pos = 1 - (b.softmax(-1) @ En * En[labels.clamp_min(0)]).sum(-1)
    per = (pos * mask).sum(1) / mask.sum(1)
    per.mean().backward()
    torch.testing.assert_close(a.grad, b.grad, **tol(torch.float32, "grad"))


def test_first_derivatives_only_and_no_torch_func():
    logits, labels, E = problem(V=7, T=3)
    x = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(token_ot_loss(x, labels, E, mode="position"), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda z: token_ot_loss(z, labels, E, mode="position"))(logits)


# ---------------------------------------------------------------------------------------------
# Memory: chunks over positions, nothing of size [B, T, V] saved
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["position", "sequence"])
def test_chunked_equals_unchunked(mode):
    logits, labels, E = problem(B=3, T=7, V=17, dtype=torch.float32)
    results = []
    for chunk in (1, 3, 5, None, 10_000):
        lg = logits.clone().requires_grad_(True)
        loss = token_ot_loss(lg, labels, E, mode=mode, chunk_size=chunk, reduction="none")
        loss.sum().backward()
        results.append((loss.detach(), lg.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], **tol(torch.float32, "parity"))
        torch.testing.assert_close(grad, results[0][1], **tol(torch.float32, "parity"))


def _saved_big_tensors(fn, logits, limit):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    ptr = logits.untyped_storage().data_ptr()
    return [tuple(t.shape) for t in saved if t.numel() >= limit and t.untyped_storage().data_ptr() != ptr]


@pytest.mark.parametrize("mode", ["position", "sequence"])
def test_no_vocab_sized_tensor_is_saved_for_backward(mode):
    B, T, V = 2, 16, 512
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    E = torch.randn(V, 8)
    limit = 4 * T * V // 4  # a quarter of the [B, T, V] logits
    big = _saved_big_tensors(lambda: token_ot_loss(logits, labels, E, mode=mode, chunk_size=4), logits, limit)
    assert big == []
    # the check can fail: the plain formula saves the [B, T, V] softmax
    naive = _saved_big_tensors(lambda: (logits.softmax(-1) @ E).sum(), logits, limit)
    assert (B, T, V) in naive


@pytest.mark.parametrize("layout", ["sliced", "transposed", "one_position", "one_sequence"])
def test_strided_logits_equal_contiguous(layout):
    """Logits as models hand them out (``logits[:, :-1]``) and other layouts take the same values and gradients."""
    full, labels, E = problem(B=3, T=7, V=11, dtype=torch.float32)
    if layout == "sliced":
        src = torch.cat([full, torch.randn(3, 1, 11)], 1)
        make = lambda x: x[:, :-1]  # noqa: E731
    elif layout == "transposed":
        src = full.transpose(0, 1).contiguous()
        make = lambda x: x.transpose(0, 1)  # noqa: E731
    elif layout == "one_position":
        src, labels = full[:, 3:4].contiguous(), labels[:, 3:4]
        make = lambda x: x  # noqa: E731
    else:
        src, labels = full[1:2].contiguous(), labels[1:2]
        make = lambda x: x  # noqa: E731
    a = src.clone().requires_grad_(True)
    b = make(src).contiguous().requires_grad_(True)
    opts = {"max_iter": 5000}
    for mode in ("position", "sequence"):
        la = token_ot_loss(make(a), labels, E, mode=mode, chunk_size=2, reduction="none", solver_options=opts)
        lb = token_ot_loss(b, labels, E, mode=mode, chunk_size=2, reduction="none", solver_options=opts)
        torch.testing.assert_close(la, lb, **tol(torch.float32, "parity"))
        la.sum().backward()
        lb.sum().backward()
        torch.testing.assert_close(make(a.grad), b.grad, **tol(torch.float32, "parity"))
        a.grad = b.grad = None


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error or a documented result
# ---------------------------------------------------------------------------------------------

_lg, _lab, _E = problem(dtype=torch.float32)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (
            (_lg, _lab, _E[:-1]),
            {},
            ValueError,
            "embeddings must have one row per vocabulary entry of logits \\(vocab = 13\\), got 12",
        ),
        ((_lg[0], _lab, _E), {}, ValueError, "logits must have shape \\[batch, seq_len, vocab\\]"),
        ((_lg[:, :0], _lab[:, :0], _E), {}, ValueError, "logits must be non-empty"),
        ((_lg.long(), _lab, _E), {}, TypeError, "logits must have a floating-point dtype"),
        ((_lg, _lab.float(), _E), {}, TypeError, "labels must have an integer dtype"),
        ((_lg, _lab[:, 1:], _E), {}, ValueError, "labels must have the shape \\[batch, seq_len\\]"),
        ((_lg, _lab, _E[0]), {}, ValueError, "embeddings must have shape \\[vocab, dim\\]"),
        ((_lg, _lab, _E.long()), {}, TypeError, "embeddings must have a floating-point dtype"),
        ((_lg, _lab, _E.to("meta")), {}, ValueError, "embeddings must be on the device of logits"),
        ((_lg, [[1]], _E), {}, TypeError, "labels must be a torch.Tensor"),
        ((_lg, _lab, _E), {"mode": "token"}, ValueError, "mode must be one of"),
        ((_lg, _lab, _E), {"cost": "l1"}, ValueError, "cost must be one of"),
        ((_lg, _lab, _E), {"epsilon": -0.1}, ValueError, "epsilon must be a finite number >= 0"),
        ((_lg, _lab, _E), {"epsilon": float("nan")}, ValueError, "epsilon must be"),
        ((_lg, _lab, _E), {"reduction": "max"}, ValueError, "reduction must be"),
        ((_lg, _lab, _E), {"ignore_index": -100.0}, TypeError, "ignore_index must be an int"),
        ((_lg, _lab, _E), {"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
        ((_lg, _lab, _E), {"embedding_grad": 1}, TypeError, "embedding_grad must be a bool"),
        ((_lg, _lab, _E), {"validate_args": "yes"}, TypeError, "validate_args must be a bool"),
    ],
)
def test_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        token_ot_loss(*args, **({"mode": "position"} | kwargs))


@pytest.mark.parametrize("bad", [13, 100, -1, -7])
def test_labels_out_of_range(bad):
    labels = _lab.clone()
    labels[1, 3] = bad
    with pytest.raises(ValueError, match=f"labels must hold token ids in \\[0, 13\\) or ignore_index=-100, got {bad}"):
        token_ot_loss(_lg, labels, _E, mode="position")
    # unvalidated: an indexing error, never a wrapped-around index
    with pytest.raises((IndexError, RuntimeError)):
        token_ot_loss(_lg, labels, _E, mode="position", validate_args=False)


def test_every_position_ignored():
    labels = torch.full_like(_lab, -100)
    with pytest.raises(ValueError, match="every position of labels equals ignore_index=-100"):
        token_ot_loss(_lg, labels, _E, mode="position")
    lg = _lg.clone().requires_grad_(True)
    for mode in ("position", "sequence"):
        out = token_ot_loss(lg, labels, _E, mode=mode, validate_args=False)
        assert out.item() == 0.0
        out.backward()
        assert lg.grad.abs().max() == 0


@pytest.mark.parametrize("value,what", [(float("nan"), "1 NaN and 0 \\+Inf"), (float("inf"), "0 NaN and 1 \\+Inf")])
def test_non_finite_logits(value, what):
    logits = _lg.clone()
    logits[1, 2, 5] = value
    with pytest.raises(ValueError, match=f"logits at non-ignored positions contain {what}"):
        token_ot_loss(logits, _lab, _E, mode="position")
    assert torch.isnan(token_ot_loss(logits, _lab, _E, mode="position", validate_args=False))
    # at an ignored position it does not matter
    logits = _lg.clone()
    logits[0, 0, 5] = value
    assert torch.isfinite(token_ot_loss(logits, _lab, _E, mode="position"))


def test_rows_of_minus_inf_are_named():
    logits = _lg.clone()
    logits[1, 4] = float("-inf")
    with pytest.raises(ValueError, match="and 1 rows that are -Inf everywhere"):
        token_ot_loss(logits, _lab, _E, mode="position")


def test_non_finite_embeddings():
    E = _E.clone()
    E[3, 1] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains non-finite values"):
        token_ot_loss(_lg, _lab, E, mode="position")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean"])
def test_low_precision_logits(dtype, cost):
    logits, labels, E = problem(V=40, T=8)
    exact = token_ot_loss(logits, labels, E, mode="position", cost=cost, reduction="none")
    got = token_ot_loss(logits.to(dtype), labels, E.to(dtype), mode="position", cost=cost, reduction="none")
    assert got.dtype == dtype
    # PyTorch's own formula in the low dtype
    Ed = E.to(dtype)
    if cost == "cosine":
        En = F.normalize(Ed, dim=-1)
        pos = 1 - ((logits.to(dtype).softmax(-1) @ En) * En[labels.clamp_min(0)]).sum(-1)
    else:
        C = torch.cdist(Ed.float(), Ed.float()).square().to(dtype)
        pos = (logits.to(dtype).softmax(-1) * C[labels.clamp_min(0)]).sum(-1)
    mask = labels != -100
    torch_lowp = (pos * mask).sum(1) / mask.sum(1)
    assert_within_lowp_error(got, torch_lowp, exact)
    # low-precision logits get a gradient in their dtype
    lg = logits.to(dtype).requires_grad_(True)
    token_ot_loss(lg, labels, E, mode="position", cost=cost).backward()
    assert lg.grad.dtype == dtype and torch.isfinite(lg.grad).all()


# ---------------------------------------------------------------------------------------------
# mode="sequence": entropic OT between the soft-embedding and label-embedding clouds
# ---------------------------------------------------------------------------------------------


def cloud_cost(logits, labels, E, cost, b):
    """The ``[n, n]`` cost between sequence ``b``'s soft and label embeddings, in numpy float64."""
    mask = (labels[b] != -100).numpy()
    p = logits[b].double().softmax(-1).numpy()[mask]
    e = E.double().numpy()
    x, y = p @ e, e[labels[b].numpy()[mask]]
    if cost == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        yn = y / np.linalg.norm(y, axis=1, keepdims=True)
        return 1 - xn @ yn.T
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


@requires_pot
@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean"])
def test_sequence_equals_pot_sinkhorn2(cost):
    import ot

    logits, labels, E = problem(B=3, T=8, V=50, D=6, seed=11)
    eps = 0.05 if cost == "cosine" else 0.5
    got = token_ot_loss(
        logits, labels, E, cost=cost, epsilon=eps, reduction="none", solver_options={"tol": 1e-12, "max_iter": 100_000}
    )
    want = []
    for b in range(3):
        M = cloud_cost(logits, labels, E, cost, b)
        n = M.shape[0]
        w = np.full(n, 1 / n)
        want.append(ot.sinkhorn2(w, w, M, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13))
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), **tol(F64, "sinkhorn"))


@requires_pot
@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean"])
def test_sequence_entropic_at_least_exact_and_tends_to_it(cost):
    import ot

    logits, labels, E = problem(B=2, T=8, V=30, D=4, seed=5)
    exact = []
    for b in range(2):
        M = cloud_cost(logits, labels, E, cost, b)
        n = M.shape[0]
        exact.append(ot.emd2(np.full(n, 1 / n), np.full(n, 1 / n), M))
    exact = torch.tensor(exact, dtype=F64)
    scale = 1.0 if cost == "cosine" else float(exact.mean())
    gaps = []
    opts = {"tol": 1e-6, "max_iter": 100_000}
    for eps in (0.1, 0.03, 0.01):
        v = token_ot_loss(logits, labels, E, cost=cost, epsilon=eps * scale, reduction="none", solver_options=opts)
        assert (v >= exact - tol(F64, "value")["atol"]).all()
        gaps.append((v - exact).max().item())
    assert all(g1 <= g0 + tol(F64, "value")["atol"] for g0, g1 in itertools.pairwise(gaps)), gaps
    # special: the entropic bias at eps = 0.01 * scale, which shrinks with eps, not a rounding error
    assert gaps[-1] < 1e-2 * scale and gaps[-1] < gaps[0] / 5, gaps


@requires_pot
def test_sequence_epsilon_zero_is_the_exact_lp():
    import ot

    logits, labels, E = problem(B=2, T=8, V=50, D=4, seed=8)
    want = []
    for b in range(2):
        M = cloud_cost(logits, labels, E, "cosine", b)
        n = M.shape[0]
        want.append(ot.emd2(np.full(n, 1 / n), np.full(n, 1 / n), M))
    got = token_ot_loss(logits, labels, E, epsilon=0, reduction="none")
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), **tol(F64, "value"))


@requires_pot
def test_sequence_default_gradient_holds_the_plan_fixed():
    """The default (envelope) gradient is that of ``<P, C(logits)>`` with POT's plan ``P`` held fixed."""
    import ot

    logits, labels, E = problem(B=1, T=6, V=20, D=4, seed=4, n_ignored=0)
    a = logits.clone().requires_grad_(True)
    token_ot_loss(a, labels, E, epsilon=0.1, solver_options={"tol": 1e-12, "max_iter": 100_000}).backward()
    b = logits.clone().requires_grad_(True)
    x = b[0].softmax(-1) @ E
    C = 1 - F.normalize(x, dim=-1) @ F.normalize(E[labels[0]], dim=-1).T
    w = np.full(6, 1 / 6)
    P = ot.sinkhorn(w, w, C.detach().numpy(), 0.1, method="sinkhorn_log", numItermax=100_000, stopThr=1e-14)
    (torch.as_tensor(P) * C).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **tol(F64, "sinkhorn"))


def test_sequence_one_position_is_the_cost_of_the_pair():
    logits, labels, E = problem(B=1, T=1, V=9, n_ignored=0)
    got = token_ot_loss(logits, labels, E, epsilon=0.5)
    m = logits[0, 0].softmax(-1) @ E
    want = 1 - F.cosine_similarity(m, E[labels[0, 0]], dim=0)
    torch.testing.assert_close(got, want, **tol(F64, "value"))


def test_sequence_is_invariant_to_the_order_of_the_labels_and_ignores_padding():
    logits, labels, E = problem(B=1, T=8, V=20, n_ignored=0, seed=2)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    a = token_ot_loss(logits, labels, E, solver_options={"tol": 1e-10, "max_iter": 100_000})
    b = token_ot_loss(logits, labels[:, perm], E, solver_options={"tol": 1e-10, "max_iter": 100_000})
    torch.testing.assert_close(a, b, **tol(F64, "value"))
    assert not torch.allclose(  # position mode is not
        token_ot_loss(logits, labels, E, mode="position"), token_ot_loss(logits, labels[:, perm], E, mode="position")
    )
    # padding (ignored positions with arbitrary logits) changes nothing
    pad_logits = torch.cat([logits, 100 * torch.randn(1, 3, 20, dtype=F64)], 1)
    pad_labels = torch.cat([labels, torch.full((1, 3), -100)], 1)
    torch.testing.assert_close(
        token_ot_loss(pad_logits, pad_labels, E, solver_options={"tol": 1e-10, "max_iter": 100_000}),
        a,
        **tol(F64, "value"),
    )


def test_sequence_gradcheck():
    logits, labels, E = problem(B=2, T=3, V=5, D=3, n_ignored=1)
    logits.requires_grad_(True)
    E.requires_grad_(True)
    fn = lambda lg, e: token_ot_loss(  # noqa: E731
        lg,
        labels,
        e,
        epsilon=0.1,
        reduction="none",
        embedding_grad=True,
        chunk_size=3,
        solver_options={"tol": 1e-12, "max_iter": 10_000, "grad": "implicit"},
    )
    assert torch.autograd.gradcheck(fn, (logits, E), **tol(F64, "fd"))


def test_sequence_bad_logits_and_empty_sequences():
    logits = _lg.clone()
    logits[1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="logits at non-ignored positions contain 1 NaN"):
        token_ot_loss(logits, _lab, _E)
    labels = _lab.clone()
    labels[1] = -100
    per = token_ot_loss(_lg, labels, _E, reduction="none")
    assert per[1] == 0 and per[0] > 0
    torch.testing.assert_close(token_ot_loss(_lg, labels, _E), per[0], **tol(torch.float32, "value"))


# ---------------------------------------------------------------------------------------------
# The preference loss
# ---------------------------------------------------------------------------------------------


def pref_problem(B=3, T=6, V=15, dtype=F64):
    c_logits, c_labels, E = problem(B=B, T=T, V=V, dtype=dtype, seed=1)
    r_logits, r_labels, _ = problem(B=B, T=T, V=V, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    rc, rr = -10 * torch.rand(B, generator=g, dtype=dtype), -10 * torch.rand(B, generator=g, dtype=dtype)
    return c_logits, c_labels, r_logits, r_labels, E, rc, rr


def seq_logps(logits, labels):
    mask = labels != -100
    lp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (lp * mask).sum(1)


@pytest.mark.parametrize("mode", ["position", "sequence"])
def test_plot_dpo_equals_its_formula(mode):
    cl, cy, rl, ry, E, rc, rr = pref_problem()
    out = plot_loss(
        cl, cy, rl, ry, E, ref_chosen_logps=rc, ref_rejected_logps=rr, alpha=0.7, mode=mode, return_components=True
    )
    assert isinstance(out, PLOTOutput)
    pc, pr = seq_logps(cl, cy), seq_logps(rl, ry)
    dpo = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
    oc = token_ot_loss(cl, cy, E, mode=mode, reduction="none")
    orj = token_ot_loss(rl, ry, E, mode=mode, reduction="none")
    term = oc.mean() + (1.0 - orj).clamp_min(0).mean()
    torch.testing.assert_close(out.base_loss, dpo, **tol(F64, "value"))
    torch.testing.assert_close(out.plot_term, term, **tol(F64, "value"))
    torch.testing.assert_close(out.loss, dpo + 0.7 * term, **tol(F64, "value"))
    torch.testing.assert_close(out.chosen_ot, oc.mean(), **tol(F64, "value"))
    # given policy log-probabilities are used as they are
    same = plot_loss(
        cl,
        cy,
        rl,
        ry,
        E,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        alpha=0.7,
        mode=mode,
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
    )
    torch.testing.assert_close(same, out.loss, **tol(F64, "value"))


def test_plot_gradient_of_the_fused_log_probs():
    cl, cy, rl, ry, E, rc, rr = pref_problem()
    a = cl.clone().requires_grad_(True)
    b = cl.clone().requires_grad_(True)
    plot_loss(a, cy, rl, ry, E, ref_chosen_logps=rc, ref_rejected_logps=rr, mode="position").backward()
    plot_loss(
        b,
        cy,
        rl,
        ry,
        E,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        mode="position",
        policy_chosen_logps=seq_logps(b, cy),
        policy_rejected_logps=seq_logps(rl, ry),
    ).backward()
    torch.testing.assert_close(a.grad, b.grad, **tol(F64, "grad"))
    fn = lambda c, r: plot_loss(  # noqa: E731
        c, cy, r, ry, E, ref_chosen_logps=rc, ref_rejected_logps=rr, mode="position", chunk_size=4
    )
    assert torch.autograd.gradcheck(fn, (cl[:, :, :].clone().requires_grad_(True), rl.clone().requires_grad_(True)))


def test_plot_aot_and_sft_bases():
    cl, cy, rl, ry, E, rc, rr = pref_problem()
    pc, pr = seq_logps(cl, cy), seq_logps(rl, ry)
    kw = dict(ref_chosen_logps=rc, ref_rejected_logps=rr, mode="position", return_components=True)
    aot = plot_loss(cl, cy, rl, ry, E, base="aot", **kw)
    torch.testing.assert_close(aot.base_loss, otloss.aot_loss(pc, pr, rc, rr), **tol(F64, "value"))
    aot5 = plot_loss(cl, cy, rl, ry, E, base="aot", beta=0.5, aot_kwargs={"cost": "hinge"}, **kw)
    torch.testing.assert_close(
        aot5.base_loss, otloss.aot_loss(pc, pr, rc, rr, beta=0.5, cost="hinge"), **tol(F64, "value")
    )
    sft = plot_loss(cl, cy, rl, ry, E, base="sft", mode="position", return_components=True)
    nll = F.cross_entropy(cl.reshape(-1, cl.shape[-1]), cy.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(sft.base_loss, nll, **tol(F64, "value"))
    none = plot_loss(cl, cy, rl, ry, E, base=None, alpha=2.0, mode="position", return_components=True)
    assert none.base_loss == 0
    torch.testing.assert_close(none.loss, 2.0 * none.plot_term, **tol(F64, "value"))


def test_plot_unpaired_hinge_with_aot_unpaired():
    cl, cy, rl, ry, E, rc, rr = pref_problem()
    out = plot_loss(
        cl,
        cy,
        rl[:2],
        ry[:2],
        E,
        base="aot",
        ref_chosen_logps=rc,
        ref_rejected_logps=rr[:2],
        aot_kwargs={"paired": False},
        mode="position",
        return_components=True,
    )
    pc, pr = seq_logps(cl, cy), seq_logps(rl[:2], ry[:2])
    torch.testing.assert_close(out.base_loss, otloss.aot_loss(pc, pr, rc, rr[:2], paired=False), **tol(F64, "value"))
    with pytest.raises(ValueError, match="chosen and rejected batches must have the same size"):
        plot_loss(cl, cy, rl[:2], ry[:2], E, ref_chosen_logps=rc, ref_rejected_logps=rr[:2], mode="position")


def test_plot_logistic_push():
    cl, cy, rl, ry, E, _rc, _rr = pref_problem()
    out = plot_loss(cl, cy, rl, ry, E, base=None, push="logistic", gamma=3.0, mode="position", return_components=True)
    oc = token_ot_loss(cl, cy, E, mode="position", reduction="none")
    orj = token_ot_loss(rl, ry, E, mode="position", reduction="none")
    torch.testing.assert_close(out.plot_term, -F.logsigmoid(3.0 * (orj - oc)).mean(), **tol(F64, "value"))


def test_plot_pulls_chosen_and_pushes_rejected_until_the_margin():
    cl, cy, rl, ry, E, _, _ = pref_problem()
    c = cl.clone().requires_grad_(True)
    r = rl.clone().requires_grad_(True)
    plot_loss(c, cy, r, ry, E, base=None, mode="position").backward()
    step = 0.5
    oc0 = token_ot_loss(cl, cy, E, mode="position")
    or0 = token_ot_loss(rl, ry, E, mode="position")
    assert token_ot_loss(cl - step * c.grad, cy, E, mode="position") < oc0  # pulled toward its tokens
    assert token_ot_loss(rl - step * r.grad, ry, E, mode="position") > or0  # pushed away
    # a rejected response already `margin` away gets no push: the term cannot run away
    r2 = rl.clone().requires_grad_(True)
    plot_loss(cl, cy, r2, ry, E, base=None, margin=0.01, mode="position").backward()
    assert (token_ot_loss(rl, ry, E, mode="position", reduction="none") > 0.01).all()
    assert r2.grad.abs().max() == 0


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"ref_chosen_logps": None}, ValueError, "base='dpo' needs ref_chosen_logps and ref_rejected_logps"),
        ({"base": "ipo"}, ValueError, "base must be one of"),
        ({"push": "linear"}, ValueError, "push must be one of"),
        ({"alpha": -1.0}, ValueError, "alpha must be a finite number >= 0"),
        ({"margin": 0.0}, ValueError, "margin must be a finite number > 0"),
        ({"gamma": 0.0}, ValueError, "gamma must be a finite number > 0"),
        ({"cost": "sqeuclidean"}, ValueError, "margin must be given with cost='sqeuclidean'"),
        ({"ref_chosen_logps": torch.zeros(2, dtype=F64)}, ValueError, "ref_chosen_logps must have shape \\[3\\]"),
        ({"aot_kwargs": {"paired": False}}, ValueError, "aot_kwargs applies to base='aot' only"),
        ({"base": "aot", "beta": 0.1, "aot_kwargs": {"beta": 0.2}}, ValueError, "beta is given twice"),
        ({"solver_options": {"epsilon": 0.1}}, ValueError, "solver_options cannot set \\['epsilon'\\]"),
        ({"solver_options": [1]}, TypeError, "solver_options must be a dict or None"),
        (
            {"ref_rejected_logps": torch.tensor([0.0, float("nan"), 0.0], dtype=F64)},
            ValueError,
            "ref_rejected_logps contains non-finite",
        ),
        ({"embeddings": torch.randn(14, 3, dtype=F64)}, ValueError, "one row per vocabulary entry of chosen_logits"),
        ({"rejected_logits": torch.randn(3, 6, 14, dtype=F64)}, ValueError, "same vocab size, got 15 and 14"),
    ],
)
def test_plot_bad_inputs(kwargs, exc, match):
    cl, cy, rl, ry, E, rc, rr = pref_problem()
    args = {"rejected_logits": rl, "embeddings": E, "ref_chosen_logps": rc, "ref_rejected_logps": rr} | kwargs
    rl, E = args.pop("rejected_logits"), args.pop("embeddings")
    with pytest.raises(exc, match=match):
        plot_loss(cl, cy, rl, ry, E, mode="position", **args)


def test_plot_labels_are_named():
    cl, cy, rl, ry, E, rc, rr = pref_problem()
    ry = ry.clone()
    ry[0, 3] = 99
    with pytest.raises(ValueError, match="rejected_labels must hold token ids in \\[0, 15\\)"):
        plot_loss(cl, cy, rl, ry, E, ref_chosen_logps=rc, ref_rejected_logps=rr, mode="position")


def test_plot_bf16_logits():
    cl, cy, rl, ry, E, rc, rr = pref_problem()
    exact = plot_loss(cl, cy, rl, ry, E, ref_chosen_logps=rc, ref_rejected_logps=rr, mode="position")
    low = plot_loss(
        cl.bfloat16(),
        cy,
        rl.bfloat16(),
        ry,
        E.bfloat16(),
        ref_chosen_logps=rc.bfloat16(),
        ref_rejected_logps=rr.bfloat16(),
        mode="position",
    )
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), exact, **tol(torch.bfloat16, "value"))


# ---------------------------------------------------------------------------------------------
# Modules and exports
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module,function", [(TokenOTLoss, token_ot_loss), (PLOTLoss, plot_loss)])
def test_module_defaults_are_the_functions(module, function):
    fn = inspect.signature(function).parameters
    for name, p in inspect.signature(module.__init__).parameters.items():
        if p.kind is p.KEYWORD_ONLY:
            assert fn[name].default == p.default, name
    assert {
        n
        for n, p in fn.items()
        if p.kind is p.KEYWORD_ONLY
        and n not in ("ref_chosen_logps", "ref_rejected_logps", "policy_chosen_logps", "policy_rejected_logps")
    } <= set(inspect.signature(module.__init__).parameters)


def test_modules_call_the_functions():
    cl, cy, rl, ry, E, rc, rr = pref_problem()
    torch.testing.assert_close(
        TokenOTLoss(mode="position", reduction="none")(cl, cy, E),
        token_ot_loss(cl, cy, E, mode="position", reduction="none"),
    )
    torch.testing.assert_close(
        PLOTLoss(base="sft", alpha=0.3, mode="position")(cl, cy, rl, ry, E),
        plot_loss(cl, cy, rl, ry, E, base="sft", alpha=0.3, mode="position"),
    )
    m = PLOTLoss(mode="position")
    torch.testing.assert_close(
        m(cl, cy, rl, ry, E, rc, rr),
        plot_loss(cl, cy, rl, ry, E, ref_chosen_logps=rc, ref_rejected_logps=rr, mode="position"),
    )
    with pytest.raises(ValueError, match="mode must be one of"):
        TokenOTLoss(mode="x")
    with pytest.raises(ValueError, match="base must be one of"):
        PLOTLoss(base="x")


def test_exported():
    for name in ("token_ot_loss", "plot_loss", "TokenOTLoss", "PLOTLoss", "PLOTOutput"):
        assert getattr(otloss, name) is getattr(otloss.tokens, name)


def test_docs_example_runs_as_written():
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "plot.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks, "docs/plot.md has no python example"
    ns: dict = {}
    exec(compile(blocks[0], "docs/plot.md", "exec"), ns)
    assert ns["loss"].ndim == 0 and torch.isfinite(ns["loss"])
    assert ns["chosen_logits"].grad is not None and ns["rejected_logits"].grad is not None
    assert ns["per_sequence"].shape == (2,)


@pytest.mark.slow
def test_step_benchmark_quick_run(tmp_path):
    import csv
    import importlib.util
    import pathlib

    pytest.importorskip("transformers")
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_plot.py"
    spec = importlib.util.spec_from_file_location("bench_plot", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "plot_step.csv"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench.COLUMNS
    steps = {r["variant"]: r for r in rows if r["kind"] == "step"}
    assert set(steps) == set(bench.VARIANTS)
    assert float(steps["dpo"]["overhead_pct"]) == 0.0
    for r in rows:
        assert 0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"])
        assert r["rounds"] == "3" and r["torch"] == torch.__version__
    comps = {r["variant"] for r in rows if r["kind"] == "component"}
    assert comps == {"model", "soft_pass", "plot_sequence_term", "sinkhorn"}
    assert "| step | dpo |" in bench.summarize(out)
