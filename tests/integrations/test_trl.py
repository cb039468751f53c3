"""Tests of the TRL adapter (``otloss.integrations.trl``): offline, CPU, tiny models built in code."""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

import torch
from datasets import Dataset
from helpers import run_process
from otloss.integrations import trl as otloss_trl
from otloss.integrations.trl import AOTConfig, AOTTrainer, PLOTDPOConfig, PLOTDPOTrainer
from peft import LoraConfig
from tolerances import tol
from trl import DPOConfig, DPOTrainer

import otloss

pytestmark = pytest.mark.requires_trl

REPO = Path(__file__).resolve().parents[2]
FSD_KEYS = ("fsd/area", "fsd/w1", "fsd/w2", "fsd/quantile_margin_0.5")
TRL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _common(tmp_path, **overrides):
    kw = dict(
        output_dir=str(tmp_path / "out"),
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=4,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        learning_rate=1e-2,
        beta=0.1,
    )
    kw.update(overrides)
    return kw


def _aot(tmp_path, model, train_rows, *, ref_model=None, peft_config=None, tokenizer, **cfg):
    return AOTTrainer(
        model,
        ref_model=ref_model,
        args=AOTConfig(**_common(tmp_path, **cfg)),
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _batch(trainer, n=None, rows=None):
    ds = trainer.train_dataset
    rows = range(len(ds) if n is None else n) if rows is None else rows
    return trainer.data_collator([ds[i] for i in rows])


def _loss_and_grads(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")


# ---------------------------------------------------------------- import


def test_missing_trl_gives_friendly_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "otloss.integrations.trl")
    with pytest.raises(ImportError, match=r'pip install "torch-otloss\[trl\]"'):
        importlib.import_module("otloss.integrations.trl")


# ---------------------------------------------------------------- parity with TRL


@pytest.mark.parametrize(
    ("loss_type", "paired", "label_smoothing"),
    [("aot", True, 0.0), ("aot_unpaired", False, 0.0), ("aot", True, 0.2), ("aot_unpaired", False, 0.3)],
)
def test_loss_and_gradients_equal_trl(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows, loss_type, paired, label_smoothing
):
    common = _common(tmp_path, beta=0.5, label_smoothing=label_smoothing)
    ds = Dataset.from_list(tiny_preference_rows)
    # The reference differs from the policy (another seed), so the sorted margins differ and the loss is not log 2.
    trl_trainer = DPOTrainer(
        tiny_model_factory(0),
        ref_model=tiny_model_factory(1),
        args=DPOConfig(loss_type=[loss_type], **common),
        train_dataset=ds,
        processing_class=tiny_tokenizer,
    )
    ours = AOTTrainer(
        tiny_model_factory(0),
        ref_model=tiny_model_factory(1),
        args=AOTConfig(paired=paired, cost="logistic", sort="hard", **common),
        train_dataset=ds,
        processing_class=tiny_tokenizer,
    )
    assert ours.args.loss_type == [loss_type]
    batch = _batch(trl_trainer, 6)
    loss_trl, grads_trl = _loss_and_grads(trl_trainer, batch)
    loss_ours, grads_ours = _loss_and_grads(ours, batch)
    assert abs(loss_trl.item() - math.log(2)) > 1e-4
    torch.testing.assert_close(loss_ours, loss_trl, **tol(torch.float32, "parity"))
    assert grads_ours.keys() == grads_trl.keys() and len(grads_trl) > 0
    for name, g in grads_trl.items():
        assert g.abs().max() > 0 or name.endswith("norm.weight")
        torch.testing.assert_close(grads_ours[name], g, **tol(torch.float32, "parity"), msg=name)
    # TRL's metrics are logged with the same values, plus the FSD diagnostics.
    trl_metrics, our_metrics = trl_trainer._metrics["train"], ours._metrics["train"]
    for key in (*TRL_KEYS, "logps/rejected", "entropy", "logits/chosen", "mean_token_accuracy"):
        assert our_metrics[key] == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-7), key
    for key in FSD_KEYS:
        assert len(our_metrics[key]) == 1 and math.isfinite(our_metrics[key][0])
    assert 0.0 <= our_metrics["fsd/area"][0] <= 1.0


@pytest.mark.parametrize(("cost", "sort"), [("squared_hinge", "soft"), ("least_squares", "hard"), ("hinge", "soft")])
def test_other_costs_and_soft_sort_follow_otloss(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows, cost, sort
):
    trainer = _aot(
        tmp_path,
        tiny_model_factory(0),
        tiny_preference_rows,
        ref_model=tiny_model_factory(1),
        tokenizer=tiny_tokenizer,
        paired=True,
        cost=cost,
        sort=sort,
        soft_sort_strength=0.5,
        beta=0.05,
    )
    batch = _batch(trainer, 8)
    loss, grads = _loss_and_grads(trainer, batch)
    with torch.no_grad():
        pc, pr = trainer._reference_logps(trainer.model, batch).chunk(2)  # policy forward, no adapters involved
        rc, rr = trainer._reference_logps(trainer.ref_model, batch).chunk(2)
    sort_arg = otloss.SoftSort(0.5) if sort == "soft" else "hard"
    expected = otloss.aot_loss(pc, pr, rc, rr, paired=True, cost=cost, beta=0.05, sort=sort_arg)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert any(g.abs().max() > 0 for g in grads.values())


# ---------------------------------------------------------------- unpaired, KTO format


def test_kto_batch_with_unequal_class_counts(tmp_path, tiny_model_factory, tiny_tokenizer, tiny_unpaired_rows):
    trainer = _aot(
        tmp_path,
        tiny_model_factory(0),
        tiny_unpaired_rows,
        ref_model=tiny_model_factory(1),
        tokenizer=tiny_tokenizer,
        paired=False,
    )
    batch = _batch(trainer, 9)
    labels = batch["label"].bool()
    n, m = int(labels.sum()), int((~labels).sum())
    assert n != m and n > 0 and m > 0
    loss, grads = _loss_and_grads(trainer, batch)
    with torch.no_grad():
        policy = trainer._reference_logps(trainer.model, batch)
        ref = trainer._reference_logps(trainer.ref_model, batch)
    expected = otloss.aot_loss(policy[labels], policy[~labels], ref[labels], ref[~labels], paired=False, beta=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert any(g.abs().max() > 0 for g in grads.values())
    metrics = trainer._metrics["train"]
    assert metrics["aot/num_chosen"] == [n] and metrics["aot/num_rejected"] == [m]
    assert metrics["aot/empty_class"] == [0.0]
    assert 0.0 <= metrics["rewards/accuracies"][0] <= 1.0
    for key in FSD_KEYS:
        assert math.isfinite(metrics[key][0])


@pytest.mark.parametrize("plot_alpha", [0.0, 0.5])
def test_kto_batch_without_one_class_is_skipped(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_unpaired_rows, plot_alpha
):
    trainer = _aot(
        tmp_path,
        tiny_model_factory(0),
        tiny_unpaired_rows,
        ref_model=tiny_model_factory(1),
        tokenizer=tiny_tokenizer,
        paired=False,
        plot_alpha=plot_alpha,  # a batch without both classes adds no PLOT term either
    )
    ds = trainer.train_dataset
    for wanted in (True, False):
        rows = [i for i in range(len(ds)) if ds[i]["label"] is wanted][:3]
        loss, grads = _loss_and_grads(trainer, _batch(trainer, rows=rows))
        assert loss.item() == 0.0 and torch.isfinite(loss)
        assert len(grads) > 0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
    metrics = trainer._metrics["train"]
    assert metrics["aot/empty_class"] == [1.0, 1.0]
    assert "fsd/area" not in metrics and "plot/term" not in metrics
    assert all(math.isfinite(v) for vals in metrics.values() for v in vals)


def test_kto_carry_over_joins_the_next_batch(tmp_path, tiny_model_factory, tiny_tokenizer, tiny_unpaired_rows):
    def make(mode):
        return _aot(
            tmp_path,
            tiny_model_factory(0),
            tiny_unpaired_rows,
            ref_model=tiny_model_factory(1),
            tokenizer=tiny_tokenizer,
            paired=False,
            empty_class=mode,
        )

    carry, skip = make("carry_over"), make("skip")
    ds = carry.train_dataset
    good = [i for i in range(len(ds)) if ds[i]["label"]][:3]
    bad = [i for i in range(len(ds)) if not ds[i]["label"]][:2]
    first, _ = _loss_and_grads(carry, _batch(carry, rows=good))
    assert first.item() == 0.0
    second, grads = _loss_and_grads(carry, _batch(carry, rows=bad))
    # The carried desirable rows and the new undesirable rows form one batch.
    expected, expected_grads = _loss_and_grads(skip, _batch(skip, rows=good + bad))
    assert expected.item() > 0
    torch.testing.assert_close(second, expected, rtol=1e-6, atol=1e-7)
    for name, g in expected_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-8)
    assert carry._metrics["train"]["aot/num_chosen"] == [3, 3]
    assert carry._carry is None


# ---------------------------------------------------------------- PLOT


def _pair(tmp_path, kind, model_factory, rows, tokenizer, **plot):
    """(plain trainer, trainer with the PLOT options ``plot``) on the same models and data."""
    common = _common(tmp_path, beta=0.5)
    if kind == "dpo":
        plain, cls, args = DPOTrainer, PLOTDPOTrainer, (DPOConfig(**common), PLOTDPOConfig(**common, **plot))
    else:
        paired = kind == "aot"
        plain = cls = AOTTrainer
        args = (AOTConfig(paired=paired, **common), AOTConfig(paired=paired, **common, **plot))
    ds = Dataset.from_list(rows)
    return tuple(
        c(model_factory(0), ref_model=model_factory(1), args=a, train_dataset=ds, processing_class=tokenizer)
        for c, a in zip((plain, cls), args)
    )


@pytest.mark.parametrize(
    ("kind", "mode"), [("aot", "sequence"), ("aot", "position"), ("aot_kto", "sequence"), ("dpo", "sequence")]
)
def test_plot_adds_alpha_times_the_core_term(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows, tiny_unpaired_rows, kind, mode
):
    rows = tiny_unpaired_rows if kind == "aot_kto" else tiny_preference_rows
    plain, ours = _pair(tmp_path, kind, tiny_model_factory, rows, tiny_tokenizer, plot_alpha=0.7, plot_mode=mode)
    batch = _batch(plain, 6)
    loss0, grads0 = _loss_and_grads(plain, batch)
    loss1, grads1 = _loss_and_grads(ours, batch)
    # Independently: the model's own logits, chosen and rejected rows sliced, through otloss.plot_loss.
    model = tiny_model_factory(0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    n = batch["input_ids"].size(0)
    rows_c = batch["label"].bool() if "label" in batch else torch.arange(n) < n // 2
    assert rows_c.any() and not rows_c.all()
    term = otloss.plot_loss(
        logits[rows_c], labels[rows_c], logits[~rows_c], labels[~rows_c], model.get_input_embeddings().weight,
        base=None, alpha=0.7, mode=mode, return_components=True,
    )  # fmt: skip
    term.loss.backward()
    assert term.plot_term > 0
    torch.testing.assert_close(loss1 - loss0, term.loss.detach(), rtol=1e-5, atol=1e-6)
    grads_term = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads1.keys() == grads0.keys() and any(g.abs().max() > 0 for g in grads_term.values())
    assert "model.embed_tokens.weight" in grads_term  # through the forward; the cost's embeddings are detached
    for name, g in grads1.items():
        torch.testing.assert_close(g - grads0[name], grads_term[name], rtol=1e-4, atol=1e-6, msg=name)
    metrics = ours._metrics["train"]
    assert metrics["plot/term"] == [pytest.approx(term.plot_term.item(), rel=1e-5)]
    assert metrics["plot/chosen_ot"] == [pytest.approx(term.chosen_ot.item(), rel=1e-5)]
    assert metrics["plot/rejected_ot"] == [pytest.approx(term.rejected_ot.item(), rel=1e-5)]
    assert not any(k.startswith("plot/") for k in plain._metrics["train"])


def test_plot_forms_the_logits_once(tmp_path, tiny_model_factory, tiny_tokenizer, tiny_unpaired_rows):
    plain, ours = _pair(tmp_path, "aot_kto", tiny_model_factory, tiny_unpaired_rows, tiny_tokenizer, plot_alpha=0.5)
    batch, vocab = _batch(plain, 6), ours.model.get_input_embeddings().weight.shape[0]
    found: list[set[int]] = []

    def pack(t):
        if t.dim() == 3 and t.shape[-1] == vocab:
            found[-1].add(t.untyped_storage().data_ptr())
        return t

    for trainer, expected in ((plain, 0), (ours, 1)):  # TRL's fused head forms none; PLOT forms one [rows, T, V]
        found.append(set())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.compute_loss(trainer.model, batch)
        assert len(found[-1]) == expected


@pytest.mark.parametrize("kind", ["aot", "dpo"])
def test_plot_alpha_zero_is_the_plain_trainer_exactly(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows, kind
):
    plain, ours = _pair(
        tmp_path, kind, tiny_model_factory, tiny_preference_rows, tiny_tokenizer, plot_alpha=0.0, plot_mode="position"
    )
    assert ours.plot_loss is None
    batch = _batch(plain, 6)
    (loss0, grads0), (loss1, grads1) = _loss_and_grads(plain, batch), _loss_and_grads(ours, batch)
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    assert all(torch.equal(g, grads1[n]) for n, g in grads0.items())
    assert not any(k.startswith("plot/") for k in ours._metrics["train"])


def test_plot_trains_with_lora_and_gradient_checkpointing(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows
):
    trainer = _aot(
        tmp_path, tiny_model_factory(0), tiny_preference_rows, peft_config=_lora(), tokenizer=tiny_tokenizer,
        plot_alpha=1.0, max_steps=3, gradient_checkpointing=True,
    )  # fmt: skip
    assert trainer.ref_model is None  # the reference forward runs the same backbone after the policy's
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"plot/term", "plot/chosen_ot", "plot/rejected_ot"} <= logged
    # The term is the policy's (adapters on), not the reference's (adapters off), once they differ clearly.
    batch, model = _batch(trainer, 4), trainer.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    trainer._metrics["train"].clear()
    model.train()
    assert torch.isfinite(trainer.compute_loss(model, batch))
    logged_term = trainer._metrics["train"]["plot/term"][0]
    labels = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    terms = []
    with torch.no_grad():
        for adapters in (contextlib.nullcontext(), model.disable_adapter()):
            with adapters:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            term = otloss.plot_loss(
                logits[:4], labels[:4], logits[4:], labels[4:], model.get_input_embeddings().weight,
                base=None, return_components=True,
            )  # fmt: skip
            terms.append(term.plot_term.item())
    assert logged_term == pytest.approx(terms[0], rel=1e-5) and abs(terms[0] - terms[1]) > 1e-4


PLOT_REFUSED = [
    (dict(plot_alpha=-1.0), "alpha"),
    (dict(plot_mode="token"), "mode"),
    (dict(plot_cost="l1"), "cost"),
    (dict(plot_epsilon=-0.1), "epsilon"),
    (dict(plot_alpha=1.0, plot_cost="sqeuclidean"), "plot_margin must be given"),
]


@pytest.mark.parametrize(("options", "match"), PLOT_REFUSED, ids=[str(o) for o, _ in PLOT_REFUSED])
def test_plot_options_refused_in_configs(tmp_path, options, match):
    for cls in (AOTConfig, PLOTDPOConfig):
        with pytest.raises(ValueError, match=match):
            cls(output_dir=str(tmp_path), use_cpu=True, bf16=False, **options)


def test_plot_dpo_trainer_needs_its_config(tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows):
    with pytest.raises(TypeError, match="PLOTDPOConfig"):
        PLOTDPOTrainer(
            tiny_model_factory(0),
            args=DPOConfig(**_common(tmp_path)),
            train_dataset=Dataset.from_list(tiny_preference_rows),
            processing_class=tiny_tokenizer,
        )


# ---------------------------------------------------------------- training


CASES = {
    "paired-full": dict(data="pref", paired=True, ref=True, lora=False, precompute=False),
    "paired-lora": dict(data="pref", paired=True, ref=False, lora=True, precompute=False),
    "unpaired-kto-full-precompute": dict(data="kto", paired=False, ref=False, lora=False, precompute=True),
    "unpaired-kto-lora": dict(data="kto", paired=False, ref=False, lora=True, precompute=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_lowers_loss_and_updates_parameters(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows, tiny_unpaired_rows, case
):
    c = CASES[case]
    rows = tiny_preference_rows if c["data"] == "pref" else tiny_unpaired_rows
    trainer = _aot(
        tmp_path,
        tiny_model_factory(0),
        rows,
        ref_model=tiny_model_factory(1) if c["ref"] else None,
        peft_config=_lora() if c["lora"] else None,
        tokenizer=tiny_tokenizer,
        paired=c["paired"],
        precompute_ref_log_probs=c["precompute"],
        max_steps=8,
    )
    if c["lora"]:
        assert trainer.ref_model is None  # reference = adapters disabled
    if c["precompute"]:
        assert trainer.ref_model is None and "ref_logps" in trainer.train_dataset.column_names
    batch = _batch(trainer)  # the whole training set as one fixed batch
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        loss_before = trainer.compute_loss(trainer.model, batch).item()
        ref_before = trainer._reference_logps(trainer.ref_model or trainer.model, batch)
    trainer.train()
    with torch.no_grad():
        loss_after = trainer.compute_loss(trainer.model, batch).item()
        ref_after = trainer._reference_logps(trainer.ref_model or trainer.model, batch)
    assert math.isfinite(loss_after) and loss_after < loss_before - 1e-4
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    if c["lora"]:
        assert all("lora_" in n for n in changed)
        # Disabling the adapters gives the untouched base model, so the reference does not move.
        torch.testing.assert_close(ref_after, ref_before)
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"loss", *TRL_KEYS, *FSD_KEYS} <= logged


@pytest.mark.parametrize("data", ["pref", "kto"])
def test_precomputed_reference_matches_explicit_reference(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows, tiny_unpaired_rows, data
):
    rows = tiny_preference_rows if data == "pref" else tiny_unpaired_rows
    paired = data == "pref"
    pre = _aot(
        tmp_path,
        tiny_model_factory(0),
        rows,
        tokenizer=tiny_tokenizer,
        paired=paired,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=3,
    )
    explicit = _aot(
        tmp_path, tiny_model_factory(0), rows, ref_model=tiny_model_factory(0), tokenizer=tiny_tokenizer, paired=paired
    )
    # Move the policies away from the initial model so that the reference matters.
    with torch.no_grad():
        for p_pre, p_exp in zip(pre.model.parameters(), explicit.model.parameters()):
            noise = 0.05 * torch.randn(p_pre.shape, generator=torch.Generator().manual_seed(p_pre.numel()))
            p_pre.add_(noise)
            p_exp.add_(noise)
    rows_idx = list(range(7))
    loss_pre, _ = _loss_and_grads(pre, _batch(pre, rows=rows_idx))
    loss_exp, _ = _loss_and_grads(explicit, _batch(explicit, rows=rows_idx))
    assert abs(loss_exp.item() - math.log(2)) > 1e-5
    torch.testing.assert_close(loss_pre, loss_exp, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- refused options


REFUSED = [
    (dict(use_weighting=True), ValueError, "WPO"),
    (dict(f_divergence_type="forward_kl"), ValueError, "f_divergence_type"),
    (dict(loss_type="aot_pair"), ValueError, "unpaired"),
    (dict(loss_type="sigmoid"), ValueError, "only computes the AOT loss"),
    (dict(loss_type=["aot", "sft"]), ValueError, "single AOT loss"),
    (dict(loss_type="aot_unpaired", paired=True), ValueError, "contradicts"),
    (dict(loss_weights=[0.5]), ValueError, "loss_weights"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(sort="bitonic"), ValueError, "sort"),
    (dict(sort="soft", soft_sort_strength=0.0), ValueError, "regularization_strength"),
    (dict(cost="zero_one"), ValueError, "cost"),
    (dict(cost="hinge", label_smoothing=0.1), ValueError, "label_smoothing"),
    (dict(empty_class="drop"), ValueError, "empty_class"),
    (dict(paired="yes"), TypeError, "paired"),
]


@pytest.mark.parametrize(("options", "error", "match"), REFUSED, ids=[str(r[0]) for r in REFUSED])
def test_refused_options_in_config(tmp_path, options, error, match):
    with pytest.raises(error, match=match):
        AOTConfig(**_common(tmp_path, **options))


@pytest.mark.parametrize(
    ("options", "error", "match"), REFUSED[:3] + REFUSED[7:8], ids=["wpo", "fdiv", "aot_pair", "backend"]
)
def test_refused_options_in_trainer_init(
    tmp_path, tiny_model, tiny_model_factory, tiny_tokenizer, tiny_preference_rows, options, error, match
):
    args = AOTConfig(**_common(tmp_path))
    for key, value in options.items():  # edited after the config was built
        setattr(args, key, value)
    with pytest.raises(error, match=match):
        AOTTrainer(
            tiny_model,
            ref_model=tiny_model_factory(1),
            args=args,
            train_dataset=Dataset.from_list(tiny_preference_rows),
            processing_class=tiny_tokenizer,
        )


def test_trainer_refuses_dpo_config_and_bad_data_combinations(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows, tiny_unpaired_rows
):
    def build(args, rows, eval_rows=None):
        return AOTTrainer(
            tiny_model_factory(0),
            ref_model=tiny_model_factory(1),
            args=args,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=None if eval_rows is None else Dataset.from_list(eval_rows),
            processing_class=tiny_tokenizer,
        )

    with pytest.raises(TypeError, match="AOTConfig"):
        build(DPOConfig(loss_type=["aot"], **_common(tmp_path)), tiny_preference_rows)
    with pytest.raises(ValueError, match="paired=False"):
        build(AOTConfig(**_common(tmp_path, paired=True)), tiny_unpaired_rows)
    with pytest.raises(ValueError, match="ld_alpha"):
        build(AOTConfig(**_common(tmp_path, paired=False, ld_alpha=0.5)), tiny_unpaired_rows)
    with pytest.raises(ValueError, match="one format"):
        build(AOTConfig(**_common(tmp_path, paired=False)), tiny_unpaired_rows, tiny_preference_rows)


def test_kto_rows_with_a_label_that_is_not_a_bool_are_refused(tmp_path, tiny_model_factory, tiny_tokenizer):
    rows = [{"prompt": "the cat", "completion": " sat", "label": label} for label in ("yes", "no")]
    with pytest.raises(ValueError, match=r"'label' must be a bool \(True: desirable\), got .*'yes'"):
        _aot(
            tmp_path,
            tiny_model_factory(0),
            rows,
            ref_model=tiny_model_factory(1),
            tokenizer=tiny_tokenizer,
            paired=False,
        )


def test_global_batch_in_one_process_is_the_local_loss(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_unpaired_rows
):
    losses = []
    for global_batch in (False, True):
        trainer = _aot(
            tmp_path,
            tiny_model_factory(0),
            tiny_unpaired_rows,
            ref_model=tiny_model_factory(1),
            tokenizer=tiny_tokenizer,
            paired=False,
            global_batch=global_batch,
        )
        # the adapter's global_batch=True is the core's "auto": gather only with several ranks
        assert trainer.aot_loss.global_batch == ("auto" if global_batch else False)
        assert not trainer.aot_loss.is_global()
        losses.append(_loss_and_grads(trainer, _batch(trainer, 9))[0])
    assert losses[0].item() > 0
    torch.testing.assert_close(losses[1], losses[0])


def test_global_batch_refuses_a_process_group_the_trainer_does_not_use(
    tmp_path, monkeypatch, tiny_model_factory, tiny_tokenizer, tiny_unpaired_rows
):
    # e.g. two processes launched on CPU without --use_cpu: each Trainer runs alone on the whole dataset
    monkeypatch.setattr(otloss_trl, "world_size", lambda: 2)
    kwargs = {"ref_model": tiny_model_factory(1), "tokenizer": tiny_tokenizer, "paired": False}
    with pytest.raises(ValueError, match=r"torch\.distributed has 2 processes but the Trainer runs 1,.*--use_cpu True"):
        _aot(tmp_path, tiny_model_factory(0), tiny_unpaired_rows, global_batch=True, **kwargs)
    _aot(tmp_path, tiny_model_factory(0), tiny_unpaired_rows, global_batch=False, **kwargs)  # local loss: fine


def test_accumulate_quantiles_sorts_with_the_earlier_micro_batches_of_the_step(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows
):
    kwargs = {"ref_model": tiny_model_factory(1), "tokenizer": tiny_tokenizer, "paired": True}
    plain = _aot(tmp_path, tiny_model_factory(0), tiny_preference_rows, **kwargs)
    acc = _aot(tmp_path, tiny_model_factory(0), tiny_preference_rows, accumulate_quantiles=True, **kwargs)
    first, second = range(0, 3), range(3, 7)
    loss_a, _ = _loss_and_grads(acc, _batch(acc, rows=first))
    loss_b, _ = _loss_and_grads(acc, _batch(acc, rows=second))
    assert acc.aot_loss.memory.sizes == (7, 7)
    torch.testing.assert_close(loss_a, _loss_and_grads(plain, _batch(plain, rows=first))[0])
    # the second micro-batch is sorted with the first: its loss is that of the two together ...
    both, _ = _loss_and_grads(plain, _batch(plain, rows=[*first, *second]))
    torch.testing.assert_close(loss_b, both)
    alone, _ = _loss_and_grads(plain, _batch(plain, rows=second))
    assert not torch.allclose(loss_b, alone)
    # ... until the optimizer step ends
    reset = next(c for c in acc.callback_handler.callbacks if type(c).__name__ == "_ResetQuantileMemory")
    reset.on_step_end(acc.args, acc.state, acc.control)
    assert acc.aot_loss.memory.sizes == (0, 0)
    torch.testing.assert_close(_loss_and_grads(acc, _batch(acc, rows=second))[0], alone)
    # evaluation never uses the memory
    acc.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(acc.compute_loss(acc.model, _batch(acc, rows=first)), loss_a)
    assert acc.aot_loss.memory.sizes == (4, 4)  # what the last training micro-batch stored, untouched by evaluation


def test_accumulate_quantiles_trains_with_gradient_accumulation(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows
):
    trainer = _aot(
        tmp_path,
        tiny_model_factory(0),
        tiny_preference_rows,
        ref_model=tiny_model_factory(1),
        tokenizer=tiny_tokenizer,
        accumulate_quantiles=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
    )
    sizes = []
    trainer.aot_loss.register_forward_pre_hook(lambda module, args: sizes.append(module.memory.sizes))
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    # two micro-batches of two pairs per optimizer step: the second sees the first, then the memory is reset
    assert sizes == [(0, 0), (2, 2)] * 3


def test_defaults(tmp_path):
    cpu = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    args = AOTConfig(**cpu)
    assert args.paired is True and args.loss_type == ["aot"]
    assert args.cost == "logistic" and args.sort == "hard" and args.backend == "auto"
    assert args.empty_class == "skip" and args.global_batch is False and args.log_fsd is True
    assert AOTConfig(**cpu, loss_type="aot_unpaired").paired is False
    assert AOTConfig(**cpu, loss_type="aot").paired is True
    assert AOTConfig(**cpu, paired=False).loss_type == ["aot_unpaired"]


def test_default_beta_is_dpo_configs_so_the_swap_is_safe(
    tmp_path, tiny_model_factory, tiny_tokenizer, tiny_preference_rows
):
    # DPOConfig(loss_type="aot") -> AOTConfig without beta: the same beta, so the same loss
    common = _common(tmp_path)
    del common["beta"]
    dpo_args, aot_args = DPOConfig(loss_type=["aot"], **common), AOTConfig(**common)
    assert aot_args.beta == dpo_args.beta == 0.1
    ds = Dataset.from_list(tiny_preference_rows)
    trainers = [
        cls(
            tiny_model_factory(0),
            ref_model=tiny_model_factory(1),
            args=a,
            train_dataset=ds,
            processing_class=tiny_tokenizer,
        )
        for cls, a in ((DPOTrainer, dpo_args), (AOTTrainer, aot_args))
    ]
    batch = _batch(trainers[0], 6)
    loss_dpo, loss_aot = (_loss_and_grads(t, batch)[0] for t in trainers)
    torch.testing.assert_close(loss_aot, loss_dpo, **tol(torch.float32, "parity"))
    assert AOTConfig(**common, beta=0.01).beta == 0.01  # the AOT paper's value, when asked for


def test_bf16_left_unset_is_off_without_a_bf16_accelerator(tmp_path):
    from transformers.utils import is_torch_bf16_gpu_available

    out = str(tmp_path)
    for config in (AOTConfig, PLOTDPOConfig):
        assert config(output_dir=out).bf16 is is_torch_bf16_gpu_available()
        assert config(output_dir=out, use_cpu=True).bf16 is DPOConfig(output_dir=out, use_cpu=True).bf16 is True
        assert config(output_dir=out, bf16=False).bf16 is False
        if not is_torch_bf16_gpu_available():  # an explicit request is refused as by DPOConfig
            with pytest.raises(ValueError, match="bf16"):
                config(output_dir=out, bf16=True)
            with pytest.raises(ValueError, match="bf16"):
                DPOConfig(output_dir=out)


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_docs_first_snippet_runs_as_pasted(tmp_path, monkeypatch):
    from transformers.utils import is_torch_bf16_gpu_available

    first = _python_blocks(REPO / "docs" / "trl.md")[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first, "docs/trl.md", "exec"), namespace)
    args = namespace["args"]
    assert isinstance(args, AOTConfig) and args.loss_type == ["aot"] and args.beta == 0.01
    assert args.bf16 is is_torch_bf16_gpu_available()  # float32 on a CPU-only machine


def test_docs_plot_config_lines_run_as_pasted(tmp_path, monkeypatch):
    # the PLOT snippet's import and config lines (its trainer line needs a model and data)
    block = next(b for b in _python_blocks(REPO / "docs" / "trl.md") if "PLOTDPOConfig(" in b)
    lines = [line for line in block.splitlines() if line.startswith(("from ", "args = "))]
    assert len(lines) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(lines), "docs/trl.md", "exec"), namespace)
    args = namespace["args"]
    assert isinstance(args, PLOTDPOConfig) and args.plot_alpha == 0.5 and args.plot_mode == "position"


# ---------------------------------------------------------------- example script


def test_example_script_runs_offline(tmp_path, tiny_model_dir, tiny_unpaired_rows):
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_unpaired_rows))
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(REPO / "integrations" / "examples" / "train_aot_trl.py"),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--paired",
        "False",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--use_peft",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--use_cpu",
        "--report_to",
        "none",
    ]
    run_process(cmd, cwd=tmp_path, env=env, timeout=300)
    metrics = json.loads((out / "train_results.json").read_text())
    assert metrics["global_step"] == 3 and math.isfinite(metrics["train_loss"])
    assert (out / "adapter_config.json").exists()
