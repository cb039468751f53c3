"""Tests of ``otloss.integrations._common``, what the TRL and Lightning adapters share (no framework needed)."""

from __future__ import annotations

import re

import pytest
import torch
from otloss.integrations._common import (
    DEFAULT_BETA,
    aot_uv,
    gather_logps,
    has_both_classes,
    install_hint,
    loss_module,
    preference_metrics,
    split_logps,
    tiny_causal_lm,
)
from tolerances import tol

import otloss


def _logps(n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(k, generator=g, dtype=torch.float64) for k in (n, m, n, m))


def test_loss_module_is_one_core_loss_for_every_mode():
    # memory in training mode only and the option checks: tests/test_modules_auto.py (otloss.AOTLoss)
    loss_fn = loss_module(paired=False, beta=0.5, accumulate_quantiles=True)
    assert type(loss_fn) is otloss.AOTLoss and isinstance(loss_fn.memory, otloss.QuantileMemory)
    assert loss_module().memory is None and loss_module(global_batch=False).global_batch is False
    with pytest.raises(TypeError, match="accumulate_quantiles must be a bool"):
        loss_module(accumulate_quantiles="yes")
    with pytest.raises(ValueError, match=r"global_batch must be True, False or 'auto', got 'yes'"):
        loss_module(global_batch="yes")


def test_global_batch_without_a_process_group_is_the_local_loss():
    logps = _logps(5, 5)
    loss_fn = loss_module(beta=0.3, global_batch=True)
    assert loss_fn.global_batch == "auto" and not loss_fn.is_global()
    assert torch.equal(loss_fn(*logps), otloss.aot_loss(*logps, beta=0.3))
    with pytest.raises(RuntimeError, match="process group"):  # the core refuses it: the adapters' leniency is theirs
        otloss.aot_loss(*logps, beta=0.3, global_batch=True)
    assert has_both_classes(loss_fn, 5, 5, "cpu") and not has_both_classes(loss_fn, 5, 0, "cpu")


def test_split_logps_follows_the_mask():
    policy, ref = torch.arange(5.0), -torch.arange(5.0)
    chosen = torch.tensor([True, False, True, True, False])
    pc, pr, rc, rr = split_logps(policy, ref, chosen)
    assert pc.tolist() == [0, 2, 3] and pr.tolist() == [1, 4] and rc.tolist() == [0, -2, -3] and rr.tolist() == [-1, -4]


def test_preference_metrics_are_beta_scaled_rewards_as_in_trl():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([1.0, 2.0], [0.0, 3.0], [0.5, 0.5], [0.5, 0.5]))
    beta = 0.1
    paired = preference_metrics((pc, pr, rc, rr), beta=beta, pairs=True, paired=True, fsd_quantiles=None)
    assert paired["rewards/chosen"] == pytest.approx(beta * 1.0)  # mean of beta * (pc - rc) = 0.1 * (0.5 + 1.5) / 2
    assert paired["rewards/rejected"] == pytest.approx(beta * 1.0)
    assert paired["rewards/accuracies"] == 0.5  # pair 0 ranked right, pair 1 wrong
    assert paired["rewards/margins"] == pytest.approx(0.0, abs=1e-7)  # float32 inputs
    assert paired["logps/chosen"] == pytest.approx(1.5) and paired["logps/rejected"] == pytest.approx(1.5)
    assert not any(k.startswith(("fsd", "quantile")) for k in paired)
    # unpaired rows: every (desirable, undesirable) pair counts
    pc, rc = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    pr, rr = torch.tensor([1.5]), torch.zeros(1)
    unpaired = preference_metrics((pc, pr, rc, rr), beta=1.0, pairs=False, paired=False, fsd_quantiles=(0.5,))
    assert unpaired["rewards/accuracies"] == pytest.approx(2 / 3)
    assert unpaired["rewards/margins"] == pytest.approx(2.0 - 1.5)
    u, v = aot_uv((pc, pr, rc, rr), paired=False)
    assert unpaired == {**unpaired, **otloss.fsd_report(u, v, (0.5,))}
    # one class missing: only that side's keys
    empty = torch.zeros(0)
    assert set(preference_metrics((pc, empty, rc, empty), beta=1.0, pairs=False, paired=False)) == {
        "rewards/chosen",
        "logps/chosen",
    }
    # non-finite values: rewards still logged, FSD diagnostics left out
    inf = preference_metrics((pc, pr, rc, rr * float("inf")), beta=1.0, pairs=False, paired=False, fsd_quantiles=(0.5,))
    assert "rewards/accuracies" in inf and "fsd_area" not in inf


def test_aot_uv_matches_the_loss_inputs():
    logps = _logps(4, 4)
    for paired in (True, False):
        u, v = aot_uv(logps, paired)
        h = otloss.get_cost("logistic", beta=DEFAULT_BETA)
        torch.testing.assert_close(
            otloss.aot_loss(*logps, paired=paired), otloss.ot_h_1d(u, v, h), **tol(torch.float64)
        )


def test_gather_logps_in_one_process_is_detached_identity():
    logps = tuple(t.requires_grad_() for t in _logps(3, 2))
    gathered = gather_logps(logps)
    assert all(not g.requires_grad and torch.equal(g, t) for g, t in zip(gathered, logps))


def test_install_hint_names_this_project():
    hint = install_hint("trl")
    assert 'pip install "torch-otloss[trl]"' in hint and 'pip install -e ".[trl]"' in hint
    assert not re.search(r"pip install ['\"]?otloss", hint)


def test_tiny_causal_lm_depends_only_on_the_seed():
    pytest.importorskip("transformers")
    a, b, c = tiny_causal_lm(0), tiny_causal_lm(0), tiny_causal_lm(1)
    assert a.config.num_hidden_layers == 2 and a.config.vocab_size == 64
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_plot_term_is_the_core_term_on_each_class_without_copying_rows():
    from otloss.integrations._common import build_plot, plot_term

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (5, 7), generator=g)
    labels[:, :2] = -100
    chosen = torch.tensor([True, False, True, True, False])  # rows not in halves, as on KTO data
    embeddings = torch.randn(11, 4, generator=g, dtype=torch.float64)
    plot = build_plot(0.4, "sequence", "cosine", 0.05, None, False)
    out = plot_term(plot, logits[:, :-1], labels[:, :-1], chosen, embeddings)
    expected = otloss.plot_loss(
        logits[chosen, :-1], labels[chosen, :-1], logits[~chosen, :-1], labels[~chosen, :-1], embeddings,
        base=None, alpha=0.4, return_components=True,
    )  # fmt: skip
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, **tol(torch.float64))
    assert plot_term(plot, logits, labels, torch.ones(5, dtype=torch.bool), embeddings) is None
    assert build_plot(0.0, "position", "cosine", 0.05, None, False) is None
    with pytest.raises(ValueError, match="plot_margin must be given"):
        build_plot(1.0, "sequence", "sqeuclidean", 0.05, None, False)
    with pytest.raises(ValueError, match="alpha"):
        build_plot(-1.0, "sequence", "cosine", 0.05, None, False)
