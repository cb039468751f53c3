"""Tests of the PyTorch Lightning adapter (offline, CPU).

The tiny model, tokenizer and toy data come from the example script
``integrations/examples/train_aot_lightning.py`` (built in code, nothing downloaded),
so the example and the tests exercise the same objects.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

import lightning.pytorch as pl
from helpers import run_process
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from otloss.integrations._hf import (
    check_transformers_peft,
    disable_adapters,
    is_peft_model,
    sequence_logps,
    tokenize_example,
)
from otloss.integrations.lightning import (
    AOTAlignmentModule,
    AOTDataModule,
    PairedCollator,
    QuantilePlotCallback,
    UnpairedCollator,
)
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

import otloss

pytestmark = pytest.mark.requires_lightning

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "integrations" / "examples" / "train_aot_lightning.py"

torch.set_num_threads(1)


def _load_example():
    spec = importlib.util.spec_from_file_location("train_aot_lightning_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ex = _load_example()


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def tok():
    return ex.tiny_tokenizer()


def _lora(model, seed: int = 0, dropout: float = 0.0, perturb: bool = True):
    """LoRA on q/v projections; ``perturb`` makes the adapters non-zero so policy != reference."""
    torch.manual_seed(seed)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=dropout)
    )
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
    return model


def _trainer(tmp_path, **kw):
    opts = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    opts.update(kw)
    return pl.Trainer(**opts)


def _manual_logp(model, tok, prompt: str, completion: str) -> float:
    """Completion log-probability from one unpadded float64 forward pass (independent of _hf)."""
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return float(sum(logp[len(p) + j - 1, c[j]] for j in range(len(c))))


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


class _Recorder(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs is not None:
            self.losses.append(float(outputs["loss"]))


# ------------------------------------------------------------------ import guard


def test_missing_lightning_raises_friendly_import_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "otloss.integrations.lightning", raising=False)
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    with pytest.raises(ImportError, match=r'pip install "torch-otloss\[lightning\]"'):
        importlib.import_module("otloss.integrations.lightning")


def test_no_top_level_integrations_package():
    assert importlib.util.find_spec("otloss.integrations") is not None
    spec = importlib.util.find_spec("integrations")
    # importable only through otloss.integrations (when run from the repo root, a namespace lookup may
    # find the folder; it must not be an installed top-level package)
    assert spec is None or spec.origin is None or Path(spec.origin).parent == REPO / "integrations"


# ------------------------------------------------------------------ collators


def test_paired_collator_masks_prompt_and_pads(tok):
    rows = [
        {"prompt": "the cat sat", "chosen": "good", "rejected": "bad awful no"},
        {"prompt": "why", "chosen": "yes thanks please", "rejected": "no"},
    ]
    batch = PairedCollator(tok)(rows)
    assert set(batch) == {
        f"{k}_{s}" for k in ("chosen", "rejected") for s in ("input_ids", "attention_mask", "loss_mask")
    }
    t = batch["chosen_input_ids"].shape[1]
    assert all(v.shape == (2, t) for v in batch.values())
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    # row 0 chosen: <s> the cat sat | good </s> | pad
    ids0 = batch["chosen_input_ids"][0].tolist()
    assert ids0[:6] == [
        bos,
        *tok("the cat sat", add_special_tokens=False)["input_ids"],
        tok.convert_tokens_to_ids("good"),
        eos,
    ]
    assert batch["chosen_loss_mask"][0].tolist()[:6] == [0, 0, 0, 0, 1, 1]
    assert batch["chosen_attention_mask"][0].tolist() == [1] * 6 + [0] * (t - 6)
    assert all(i == pad for i in ids0[6:])
    # row 1 rejected: <s> why | no </s> | pad; longest row (row 0 rejected: 4 + 4 tokens) sets T
    assert t == 8
    assert batch["rejected_loss_mask"][1].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert batch["rejected_loss_mask"].sum().item() == 4 + 2


def test_truncation_keeps_prompt_end_and_cuts_completion(tok):
    ids, mask = tokenize_example(tok, "the cat sat on mat", "good great yes", max_prompt_length=3, max_length=5)
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["sat", "on", "mat", "good", "great"]
    assert mask == [0, 0, 0, 1, 1]
    # a prompt longer than max_length still leaves one completion token
    ids, mask = tokenize_example(tok, "the cat sat on mat", "good", max_length=3)
    assert tok.convert_ids_to_tokens(ids) == ["on", "mat", "good"] and mask == [0, 0, 1]
    with pytest.raises(ValueError, match="tokenises to no token"):
        tokenize_example(tok, "why", "", add_eos=False)


def test_unpaired_collator_labels_and_errors(tok):
    rows = [
        {"prompt": "the cat", "completion": "good", "label": True},
        {"prompt": "a dog ran", "completion": "bad no", "label": False},
        {"prompt": "why", "completion": "yes", "label": 1},
    ]
    batch = UnpairedCollator(tok, pad_to_multiple_of=8)(rows)
    assert batch["label"].tolist() == [True, False, True]
    assert batch["input_ids"].shape == (3, 8)
    assert batch["loss_mask"].sum(1).tolist() == [2, 3, 2]
    with pytest.raises(ValueError, match="label must be a bool"):
        UnpairedCollator(tok)([{"prompt": "why", "completion": "yes", "label": "good"}])
    with pytest.raises(KeyError, match="completion"):
        UnpairedCollator(tok)([{"prompt": "why", "chosen": "yes", "label": True}])


def test_sequence_logps_mean_is_sum_over_tokens(tok):
    model = ex.tiny_model(0).eval()
    batch = UnpairedCollator(tok)(ex.toy_data(5, paired=False))
    args = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    with torch.no_grad():
        total = sequence_logps(model, *args)
        mean = sequence_logps(model, *args, reduction="mean")
    torch.testing.assert_close(mean, total / batch["loss_mask"].sum(1))


# ------------------------------------------------------------------ the loss equals otloss.aot_loss


def _paired_rows():
    return ex.toy_data(6, paired=True, seed=3)


@pytest.mark.parametrize("cost", ["logistic", "hinge", "squared_hinge", "least_squares"])
@pytest.mark.parametrize("sort", ["hard", "soft"])
def test_paired_loss_with_lora_reference_equals_aot_loss(tok, cost, sort):
    base = ex.tiny_model(0).eval()
    frozen_base = copy.deepcopy(base)
    policy = _lora(base).eval()
    module = AOTAlignmentModule(policy, cost=cost, beta=0.5, sort=sort)
    assert module.ref_model is None and is_peft_model(policy)
    rows = _paired_rows()
    loss, logps = module.compute_loss(PairedCollator(tok)(rows))

    def lp(model, key):
        return torch.tensor([_manual_logp(model, tok, r["prompt"], r[key]) for r in rows], dtype=torch.float32)

    expected_logps = {
        "policy_chosen": lp(policy, "chosen"),
        "policy_rejected": lp(policy, "rejected"),
        "ref_chosen": lp(frozen_base, "chosen"),  # the reference is the base model without adapters
        "ref_rejected": lp(frozen_base, "rejected"),
    }
    for key, value in expected_logps.items():
        torch.testing.assert_close(logps[key].detach(), value, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected_logps["policy_chosen"], expected_logps["ref_chosen"], atol=1e-3)
    expected = otloss.aot_loss(*expected_logps.values(), paired=True, cost=cost, beta=0.5, sort=sort)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert loss.requires_grad


def test_reward_metrics_use_the_loss_beta_also_from_a_cost_object():
    policy = ex.tiny_model(1).eval()
    ref = ex.tiny_model(2)
    cases = [
        (dict(cost="logistic", beta=0.3), 0.3),
        (dict(cost=otloss.logistic(0.5)), 0.5),  # beta travels inside the Cost: the rewards use it too
        (dict(cost=otloss.hinge(0.2)), 0.2),
        (dict(cost="logistic"), 0.01),
        (dict(cost=otloss.Cost(lambda z: torch.nn.functional.softplus(-z), lambda z: -torch.sigmoid(-z))), 0.01),
    ]
    lp = [torch.randn(4) for _ in range(4)]
    for options, factor in cases:
        module = AOTAlignmentModule(policy, ref_model=ref, **options)
        assert module.reward_beta == factor
        metrics = module._metrics(lp)
        torch.testing.assert_close(torch.as_tensor(metrics["rewards/chosen"]), (factor * (lp[0] - lp[2])).mean())


def test_unpaired_loss_with_explicit_reference_equals_aot_loss(tok):
    policy = ex.tiny_model(1).eval()
    ref = ex.tiny_model(2)
    module = AOTAlignmentModule(policy, ref_model=ref, paired=False, cost="logistic", beta=0.3, label_smoothing=0.1)
    assert not any(p.requires_grad for p in ref.parameters())
    rows = ex.toy_data(7, paired=False, seed=4)
    n = sum(r["label"] for r in rows)
    assert 0 < n < len(rows) and 2 * n != len(rows)  # unequal numbers of desirable and undesirable samples
    loss, logps = module.compute_loss(UnpairedCollator(tok)(rows))
    good = [r for r in rows if r["label"]]
    bad = [r for r in rows if not r["label"]]

    def lp(model, subset):
        return torch.tensor(
            [_manual_logp(model, tok, r["prompt"], r["completion"]) for r in subset], dtype=torch.float64
        )

    pc, pr, rc, rr = lp(policy, good), lp(policy, bad), lp(ref, good), lp(ref, bad)
    for key, value in zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"), (pc, pr, rc, rr)):
        torch.testing.assert_close(logps[key].double(), value, rtol=1e-4, atol=1e-4)
    expected = otloss.aot_loss(pc, pr, rc, rr, paired=False, beta=0.3, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_global_batch_in_one_process_is_the_local_loss(tok):
    policy = _lora(ex.tiny_model(0)).eval()
    batch = PairedCollator(tok)(_paired_rows())
    local, _ = AOTAlignmentModule(policy, beta=0.5).compute_loss(batch)
    module = AOTAlignmentModule(policy, beta=0.5, global_batch=True)
    assert module.loss_fn.global_batch == "auto" and not module.loss_fn.is_global()  # the adapter's True
    globl, _ = module.compute_loss(batch)  # no process group: the local loss
    assert torch.equal(local, globl)


def test_accumulate_quantiles_sorts_with_the_earlier_micro_batches(tok):
    policy = _lora(ex.tiny_model(0))
    rows = ex.toy_data(7, paired=True, seed=5)
    collate = PairedCollator(tok)
    plain = AOTAlignmentModule(policy, beta=0.5).eval()
    module = AOTAlignmentModule(policy, beta=0.5, accumulate_quantiles=True).eval()  # no dropout: same logps
    module.training = True  # the memory is for training steps; eval() only so that the logps are deterministic
    first, _ = module.compute_loss(collate(rows[:3]))
    second, _ = module.compute_loss(collate(rows[3:]))
    assert module._memory.sizes == (7, 7)
    with torch.no_grad():
        torch.testing.assert_close(first.detach(), plain.compute_loss(collate(rows[:3]))[0])
        torch.testing.assert_close(second.detach(), plain.compute_loss(collate(rows))[0])  # sorted with the first
        alone = plain.compute_loss(collate(rows[3:]))[0]
    assert not torch.allclose(second.detach(), alone)
    module.training = False  # validation never uses the memory
    with torch.no_grad():
        torch.testing.assert_close(module.compute_loss(collate(rows[3:]))[0], alone)
    assert module._memory.sizes == (7, 7)


def test_accumulate_quantiles_resets_after_each_optimizer_step(tmp_path, tok):
    module = AOTAlignmentModule(_lora(ex.tiny_model(0)), beta=0.5, lr=1e-2, accumulate_quantiles=True)
    sizes = []
    module.loss_fn.register_forward_pre_hook(lambda loss_fn, args: sizes.append(loss_fn.memory.sizes))
    data = AOTDataModule(tok, ex.toy_data(16, paired=True, seed=0), batch_size=2)
    _trainer(tmp_path, max_steps=3, accumulate_grad_batches=2).fit(module, datamodule=data)
    assert sizes == [(0, 0), (2, 2)] * 3  # two micro-batches of two pairs per optimizer step


def test_accumulate_quantiles_refuses_a_strategy_that_accumulates_itself():
    from types import SimpleNamespace

    module = AOTAlignmentModule(_lora(ex.tiny_model(0)), accumulate_quantiles=True)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(handles_gradient_accumulation=True))
    with pytest.raises(ValueError, match="accumulate_quantiles=True needs Lightning to accumulate"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(handles_gradient_accumulation=False))
    module.on_fit_start()


def test_transformers_adapter_integration_reference(tok):
    model = ex.tiny_model(0).eval()
    frozen = copy.deepcopy(model)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    try:
        check_transformers_peft()
    except ImportError:  # transformers >= 5.24 with peft < 0.22: transformers itself refuses the integration
        with pytest.raises(ValueError, match="PEFT"):
            model.add_adapter(lora)
        return
    model.add_adapter(lora)
    assert is_peft_model(model)
    batch = PairedCollator(tok)(_paired_rows())
    args = (batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"])
    with torch.no_grad():
        with disable_adapters(model):
            ref = sequence_logps(model, *args)
        policy = sequence_logps(model, *args)
        expected = sequence_logps(frozen, *args)
    torch.testing.assert_close(ref, expected)
    assert not torch.allclose(policy, expected, atol=1e-3)  # adapters are back on after the context


# ------------------------------------------------------------------ PLOT


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("paired", "mode"), [(True, "sequence"), (True, "position"), (False, "sequence")])
def test_plot_adds_alpha_times_the_core_term(tok, paired, mode):
    policy = _lora(ex.tiny_model(0)).eval() if paired else ex.tiny_model(1).eval()
    ref = None if paired else ex.tiny_model(2)
    plain = AOTAlignmentModule(policy, ref_model=ref, paired=paired, beta=0.5)
    ours = AOTAlignmentModule(policy, ref_model=ref, paired=paired, beta=0.5, plot_alpha=0.3, plot_mode=mode)
    rows = _paired_rows() if paired else ex.toy_data(7, paired=False, seed=4)
    batch = (PairedCollator if paired else UnpairedCollator)(tok)(rows)
    results = []
    for module in (plain, ours):
        policy.zero_grad(set_to_none=True)
        loss, logps = module.compute_loss(batch)
        loss.backward()
        results.append((loss.detach(), logps, _grads(module)))
    (loss0, logps0, grads0), (loss1, logps1, grads1) = results
    # Independently: the policy's logits of each side, through otloss.plot_loss.
    policy.zero_grad(set_to_none=True)
    sides = []
    for prefix, keep in (("chosen_", None), ("rejected_", None)) if paired else (("", True), ("", False)):
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}loss_mask"]
        logits = policy(input_ids=ids, attention_mask=batch[f"{prefix}attention_mask"]).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        rows_kept = slice(None) if keep is None else batch["label"] == keep
        sides += [logits[rows_kept], labels[rows_kept]]
    term = otloss.plot_loss(
        *sides, policy.get_input_embeddings().weight, base=None, alpha=0.3, mode=mode, return_components=True
    )
    term.loss.backward()
    grads_term = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert term.plot_term > 0 and any(g.abs().max() > 0 for g in grads_term.values())
    torch.testing.assert_close(loss1 - loss0, term.loss.detach(), rtol=1e-5, atol=1e-6)
    assert grads0.keys() == grads1.keys() == grads_term.keys()
    for name, g in grads1.items():
        torch.testing.assert_close(g - grads0[name], grads_term[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(logps1["plot/term"], term.plot_term)
    torch.testing.assert_close(logps1["plot/rejected_ot"], term.rejected_ot)
    assert not any(k.startswith("plot/") for k in logps0)


def _vocab_storages_saved(fn, vocab: int) -> set[int]:
    """The storages of the ``[rows, T, vocab]`` tensors that autograd saves while ``fn`` runs."""
    found: set[int] = set()

    def pack(t):
        if t.dim() == 3 and t.shape[-1] == vocab:
            found.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return found


@pytest.mark.parametrize("paired", [True, False])
def test_plot_keeps_no_copy_of_the_logits(tok, paired):
    policy = _lora(ex.tiny_model(0)).train()
    batch = (PairedCollator if paired else UnpairedCollator)(tok)(ex.toy_data(6, paired=paired, seed=4))
    vocab = policy.get_input_embeddings().weight.shape[0]
    for alpha in (0.0, 0.5):  # the logits the forward made, and nothing else of their size
        module = AOTAlignmentModule(policy, paired=paired, plot_alpha=alpha)
        assert len(_vocab_storages_saved(lambda m=module: m.compute_loss(batch), vocab)) == 1


def test_plot_alpha_zero_is_the_plain_module_exactly(tok):
    policy = _lora(ex.tiny_model(0)).eval()
    batch = PairedCollator(tok)(_paired_rows())
    plain, off = AOTAlignmentModule(policy), AOTAlignmentModule(policy, plot_alpha=0.0, plot_mode="position")
    assert off.plot is None
    (loss0, logps0), (loss1, logps1) = plain.compute_loss(batch), off.compute_loss(batch)
    assert torch.equal(loss0, loss1) and logps0.keys() == logps1.keys()


def test_plot_training_logs_the_term(tmp_path, tok):
    module = AOTAlignmentModule(_lora(ex.tiny_model(0)), lr=1e-2, plot_alpha=1.0, plot_mode="position")
    data = AOTDataModule(tok, ex.toy_data(8, paired=True), ex.toy_data(4, paired=True, seed=1), batch_size=4)
    trainer = _trainer(tmp_path, max_epochs=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    logged = trainer.callback_metrics
    for key in ("train/plot/term", "val/plot/term", "val/plot/chosen_ot", "val/plot/rejected_ot"):
        assert math.isfinite(float(logged[key])), key
    assert module.hparams.plot_alpha == 1.0 and module.hparams.plot_mode == "position"


def test_plot_options_rejected():
    peft_model = _lora(ex.tiny_model(0), perturb=False)
    for options, match in (
        (dict(plot_alpha=-1.0), "alpha"),
        (dict(plot_mode="token"), "mode"),
        (dict(plot_epsilon=-1.0), "epsilon"),
        (dict(plot_alpha=0.5, plot_cost="sqeuclidean"), "plot_margin must be given"),
    ):
        with pytest.raises(ValueError, match=match):
            AOTAlignmentModule(peft_model, **options)
    assert AOTAlignmentModule(peft_model, plot_alpha=0.5, plot_cost="sqeuclidean", plot_margin=2.0).plot is not None


def test_transformers_adapter_integration_names_the_versions_that_work(tok, monkeypatch):
    model = ex.tiny_model(0).eval()
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    installed = importlib.metadata.version

    def simulate(transformers: str, peft: str) -> None:
        versions = {"transformers": transformers, "peft": peft}
        monkeypatch.setattr(importlib.metadata, "version", lambda name: versions.get(name) or installed(name))

    simulate("5.24.0", "0.21.2")  # transformers' add_adapter then needs peft >= 0.22
    match = r"transformers 5\.24\.0 needs peft>=0\.22.*transformers<5\.24 with peft>=0\.20.*peft\.get_peft_model"
    with pytest.raises(ImportError, match=match):
        AOTAlignmentModule(model)
    with pytest.raises(ImportError, match=match):
        with disable_adapters(model):
            pass
    peft_model = _lora(ex.tiny_model(0), perturb=False)  # a PeftModel does not use the integration
    assert AOTAlignmentModule(peft_model).ref_model is None
    for transformers, peft in (("5.24.0", "0.22.0"), ("5.23.0", "0.21.2"), ("6.0.0", "1.0.0")):
        simulate(transformers, peft)
        assert AOTAlignmentModule(model).ref_model is None


# ------------------------------------------------------------------ options


def test_incompatible_options_rejected():
    peft_model = _lora(ex.tiny_model(0), perturb=False)
    assert AOTAlignmentModule(peft_model, backend="triton").loss_fn.backend == "triton"
    with pytest.raises(ValueError, match="backend"):
        AOTAlignmentModule(peft_model, backend="cuda")
    with pytest.raises(ValueError, match="not a PEFT model"):
        AOTAlignmentModule(ex.tiny_model(0))
    plain = ex.tiny_model(0)
    with pytest.raises(ValueError, match="policy itself"):
        AOTAlignmentModule(plain, ref_model=plain)
    with pytest.raises(ValueError, match="cost must be one of"):
        AOTAlignmentModule(peft_model, cost="zero_one")
    with pytest.raises(ValueError, match="label_smoothing applies to the logistic cost only"):
        AOTAlignmentModule(peft_model, cost="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="sort must be"):
        AOTAlignmentModule(peft_model, sort="bubble")
    with pytest.raises(ValueError, match="lr"):
        AOTAlignmentModule(peft_model, lr=0.0)
    with pytest.raises(ValueError, match="logps_reduction"):
        AOTAlignmentModule(peft_model, logps_reduction="max")
    frozen = ex.tiny_model(0).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        AOTAlignmentModule(frozen, ref_model=ex.tiny_model(1))
    with pytest.raises(ValueError, match="keys"):
        AOTDataModule(None, [{"prompt": "a", "completion": "b", "label": True}], paired=True)


def test_batch_of_wrong_kind_gives_actionable_error(tok):
    module = AOTAlignmentModule(_lora(ex.tiny_model(0)), paired=True)
    with pytest.raises(KeyError, match="PairedCollator"):
        module.compute_loss(UnpairedCollator(tok)(ex.toy_data(3, paired=False)))


# ------------------------------------------------------------------ training


def _eval_loss(module, batch) -> float:
    module.eval()
    with torch.no_grad():
        loss, _ = module.compute_loss(batch)
    return float(loss)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full_with_ref_model"])
def test_training_lowers_loss(tmp_path, tok, use_lora):
    pl.seed_everything(0)
    base = ex.tiny_model(0)
    if use_lora:
        model, ref = _lora(base, perturb=False), None
        frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    else:
        model, ref = base, copy.deepcopy(base)
        frozen_before = {n: p.clone() for n, p in ref.named_parameters()}
    module = AOTAlignmentModule(model, ref_model=ref, beta=0.5, lr=2e-2 if use_lora else 5e-3)
    rows = ex.toy_data(16, paired=True, seed=0)
    probe = PairedCollator(tok)(rows)
    before = _eval_loss(module, probe)
    data = AOTDataModule(tok, rows, batch_size=8)
    _trainer(tmp_path, max_steps=10).fit(module, datamodule=data)
    after = _eval_loss(module, probe)
    assert after < before - 0.02, (before, after)
    # the reference did not move: LoRA base weights / the explicit reference model are unchanged
    after_frozen = dict(model.named_parameters()) if use_lora else dict(ref.named_parameters())
    for name, value in frozen_before.items():
        assert torch.equal(after_frozen[name], value), name


def test_unpaired_batches_lacking_a_class_are_skipped(tmp_path, tok):
    module = AOTAlignmentModule(_lora(ex.tiny_model(0)), paired=False, beta=0.5, lr=1e-2)
    collate = UnpairedCollator(tok)
    only_good = [r for r in ex.toy_data(12, paired=False) if r["label"]][:4]
    start = _trainable(module)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=DataLoader(only_good, batch_size=2, collate_fn=collate))
    # Lightning still counts the steps, but the optimizer saw no gradient: no update, no Adam state
    assert trainer.global_step == 2
    assert len(trainer.optimizers[0].state) == 0
    assert float(trainer.callback_metrics["train/skipped_batches"]) == 2.0
    for name, value in _trainable(module).items():
        assert torch.equal(value, start[name]), name

    # 3 desirable + 1 undesirable in one batch: n != m trains
    mixed = ex.toy_data(4, paired=False)
    assert sum(r["label"] for r in mixed) == 3
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=DataLoader(mixed, batch_size=4, collate_fn=collate))
    assert trainer.global_step == 2
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    assert any(not torch.equal(v, start[n]) for n, v in _trainable(module).items())


def test_custom_optimizer_and_scheduler(tmp_path, tok):
    seen = {}

    def make_opt(params):
        seen["n_params"] = len(params)
        return torch.optim.SGD(params, lr=0.5)

    def make_sched(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    model = _lora(ex.tiny_model(0), perturb=False)
    module = AOTAlignmentModule(model, optimizer=make_opt, lr_scheduler=make_sched)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=AOTDataModule(tok, ex.toy_data(8), batch_size=4))
    n_lora = sum(1 for n, p in model.named_parameters() if p.requires_grad)
    assert seen["n_params"] == n_lora == 8  # q/v LoRA A and B in two layers
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**2)  # stepped once per optimizer step


# ------------------------------------------------------------------ checkpoint and resume


def _resume_module(global_seed: int):
    # the same weights every time; LoRA dropout on, so the resumed run must also restore the RNG
    model = _lora(ex.tiny_model(0), seed=0, dropout=0.2, perturb=False)
    torch.manual_seed(global_seed)  # a different global RNG state in each run: the checkpoint restores it
    return AOTAlignmentModule(model, beta=0.5, lr=1e-2)


def test_checkpoint_resume_gives_identical_losses(tmp_path, tok):
    rows = ex.toy_data(16, paired=True, seed=5)
    ckpt_dir = tmp_path / "ckpt"

    module_a = _resume_module(123)
    rec_a = _Recorder()
    ckpt = ModelCheckpoint(ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    _trainer(tmp_path / "a", max_epochs=3, callbacks=[rec_a, ckpt], enable_checkpointing=True).fit(
        module_a, datamodule=AOTDataModule(tok, rows, batch_size=4, seed=7)
    )
    assert len(rec_a.losses) == 12
    # epochs are shuffled differently (the data order depends on the epoch)
    assert rec_a.losses[:4] != rec_a.losses[4:8]

    state = torch.load(ckpt_dir / "epoch=0.ckpt", weights_only=False)
    assert {"state_dict", "optimizer_states", "loops", "otloss_rng_states"} <= set(state)
    assert state["global_step"] == 4

    module_b = _resume_module(456)
    rec_b = _Recorder()
    _trainer(tmp_path / "b", max_epochs=3, callbacks=[rec_b]).fit(
        module_b, datamodule=AOTDataModule(tok, rows, batch_size=4, seed=7), ckpt_path=ckpt_dir / "epoch=0.ckpt"
    )
    assert rec_b.losses == rec_a.losses[4:]  # bit-identical on CPU
    for (name, a), b in zip(module_a.model.state_dict().items(), module_b.model.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ quantile-plot callback


class _ImageLogger(Logger):
    """A logger that takes images (the ``log_image`` interface of WandbLogger)."""

    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, list[str], int]] = []

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None):
        self.images.append((key, list(images), step))


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "unpaired"])
def test_quantile_callback_writes_png_and_logs_image(tmp_path, tok, paired):
    module = AOTAlignmentModule(_lora(ex.tiny_model(0)), paired=paired, beta=0.5, lr=1e-2)
    data = AOTDataModule(
        tok,
        ex.toy_data(12, paired=paired, seed=1),
        ex.toy_data(9, paired=paired, seed=2),
        paired=paired,
        batch_size=4,
        val_batch_size=4,
    )
    plots = QuantilePlotCallback(tmp_path / "plots", num_levels=19)
    logger = _ImageLogger()
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[plots], logger=logger, num_sanity_val_steps=1)
    trainer.fit(module, datamodule=data)
    assert [p.name for p in plots.paths] == ["aot_quantiles_epoch0_step3.png", "aot_quantiles_epoch1_step6.png"]
    for path in plots.paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert [(k, s) for k, _, s in logger.images] == [("val/aot_quantiles", 3), ("val/aot_quantiles", 6)]
    assert logger.images[0][1] == [str(plots.paths[0])]
    # epoch-level validation diagnostics over the whole validation set
    metrics = trainer.callback_metrics
    assert {"val/loss", "val/fsd_area", "val/fsd_w1", "val/quantile_margin_0.5", "val/rewards/margins"} <= set(metrics)
    assert 0.0 <= float(metrics["val/fsd_area"]) <= 1.0
    scores_keys = {"chosen", "rejected"} | ({"policy_margins", "ref_margins"} if paired else set())
    module.on_validation_epoch_start()
    assert set(module.validation_scores()) == scores_keys


# ------------------------------------------------------------------ example script and multi-process runs


def _run(cmd, cwd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return run_process(cmd, cwd=cwd, env=env, timeout=timeout, attempts=2)


@pytest.mark.slow
def test_example_script_runs_offline(tmp_path):
    out = tmp_path / "out"
    _run(
        [sys.executable, str(EXAMPLE), "--max-epochs", "1", "--unpaired", "--output-dir", str(out)],
        cwd=tmp_path,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 16 and summary["world_size"] == 1  # 128 training rows, batches of 8
    assert "train/loss" in summary["metrics"] and "val/fsd_area" in summary["metrics"]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert len(list((out / "aot_quantiles").glob("*.png"))) == 1


_DIST_SCRIPT = """
import importlib.util, json, sys
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("ex", {example!r})
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from peft import LoraConfig, get_peft_model

from otloss.integrations._hf import PairedCollator
from otloss.integrations.lightning import AOTAlignmentModule, AOTDataModule, QuantilePlotCallback


class Probe(pl.Callback):
    def on_train_start(self, trainer, module):
        # after sharding / wrapping: log-probs of a fixed batch, policy and reference
        with torch.no_grad():
            self.logps = {{k: v.tolist() for k, v in module.compute_logps(PROBE).items()}}
            # each rank holds two of the four probe pairs; with global_batch the loss is that of all four
            r = trainer.global_rank
            self.split_loss = float(module.compute_loss({{k: v[2 * r : 2 * r + 2] for k, v in PROBE.items()}})[0])
        self.backend = torch.distributed.get_backend()

    def on_validation_epoch_end(self, trainer, module):
        self.val_sizes = {{k: v.numel() for k, v in module.validation_scores().items()}}


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out, strategy, global_batch):
    torch.set_num_threads(1)
    pl.seed_everything(0)
    tok = ex.tiny_tokenizer()
    global PROBE
    PROBE = PairedCollator(tok)(ex.toy_data(4, seed=9))
    torch.manual_seed(0)
    model = get_peft_model(ex.tiny_model(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    init = {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
    module = AOTAlignmentModule(model, beta=0.5, lr=1e-2, global_batch=global_batch == "global")
    # 32 rows: 16 per rank, 4 steps of 4 pairs, then a validation over 8 pairs (4 per rank)
    data = AOTDataModule(tok, ex.toy_data(32), ex.toy_data(8, seed=1), batch_size=4)
    if strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    probe, plots = Probe(), QuantilePlotCallback(Path(out) / "plots")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[probe, plots],
    )
    trainer.fit(module, datamodule=data)
    params = {{n: full(p.detach()) for n, p in module.model.named_parameters() if p.requires_grad}}
    result = {{
        "world_size": trainer.world_size,
        "backend": probe.backend,
        "global_step": trainer.global_step,
        "logps": probe.logps,
        "split_loss": probe.split_loss,
        "val_sizes": probe.val_sizes,
        "sharded": any(type(p).__name__ == "DTensor" for p in module.model.parameters()),
        "moved": {{n: bool((params[n] - init[n]).abs().max() > 0) for n in init}},
        "loss": float(trainer.callback_metrics["train/loss"]),
        "plots": len(plots.paths),
    }}
    torch.save(params, Path(out) / f"params{{trainer.global_rank}}.pt")
    (Path(out) / f"rank{{trainer.global_rank}}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("strategy", "batch_mode"), [("ddp", "global"), ("fsdp2", "local")], ids=["ddp-global_batch", "fsdp2-local"]
)
def test_two_process_cpu_training(tmp_path, tok, strategy, batch_mode):
    """Two CPU processes (gloo): DDP, and FSDP2 through Lightning's ModelParallelStrategy."""
    script = tmp_path / "dist_run.py"
    script.write_text(textwrap.dedent(_DIST_SCRIPT.format(example=str(EXAMPLE))))
    _run([sys.executable, str(script), str(tmp_path), strategy, batch_mode], cwd=tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert res["world_size"] == 2 and res["backend"] == "gloo" and res["global_step"] == 4
        assert res["sharded"] == (strategy == "fsdp2")
        assert all(res["moved"].values())
        assert res["val_sizes"]["chosen"] == 8  # the validation log-ratios of both ranks, gathered
        assert torch.isfinite(torch.tensor(res["loss"]))
    assert results[0]["plots"] == 1 and results[1]["plots"] == 0  # plotted on rank 0 only
    # the ranks hold the same weights after training (gradients were averaged)
    p0, p1 = (torch.load(tmp_path / f"params{r}.pt") for r in range(2))
    assert p0.keys() == p1.keys() and len(p0) == 8
    for name in p0:
        torch.testing.assert_close(p0[name], p1[name], rtol=0, atol=1e-6)

    # log-probs computed in the (wrapped or sharded) processes, reference by disabled adapters included,
    # equal those of the unwrapped model here
    torch.manual_seed(0)
    model = get_peft_model(ex.tiny_model(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    module = AOTAlignmentModule(model, beta=0.5).eval()
    probe = PairedCollator(tok)(ex.toy_data(4, seed=9))
    with torch.no_grad():
        expected = module.compute_logps(probe)
        full_loss = float(module.compute_loss(probe)[0])
        half_losses = [
            float(module.compute_loss({k: v[2 * r : 2 * r + 2] for k, v in probe.items()})[0]) for r in range(2)
        ]
    assert not torch.allclose(expected["policy_chosen"], expected["ref_chosen"], atol=1e-3)
    for r, res in enumerate(results):
        for key, value in expected.items():
            torch.testing.assert_close(torch.tensor(res["logps"][key]), value, rtol=1e-4, atol=1e-4)
        # global_batch: every rank's loss is the loss of the four pairs; local: of its own two
        target = full_loss if batch_mode == "global" else half_losses[r]
        assert res["split_loss"] == pytest.approx(target, rel=1e-5, abs=1e-6)
    assert abs(full_loss - half_losses[0]) > 1e-4  # the two cases are distinguishable


@pytest.mark.slow
@pytest.mark.distributed
def test_example_script_recipe_flags_two_cpu_processes(tmp_path):
    # the Lightning 7B recipe's flags on the tiny model: FSDP2 over two processes, global batch,
    # gradient accumulation with the quantile memory, activation checkpointing
    out = tmp_path / "out"
    cmd = [sys.executable, str(EXAMPLE), "--accelerator", "cpu", "--devices", "2", "--strategy", "fsdp2"]
    cmd += ["--global-batch", "--accumulate-grad-batches", "2", "--accumulate-quantiles", "--activation-checkpointing"]
    cmd += ["--batch-size", "4", "--max-steps", "2", "--lora-r", "4", "--lora-alpha", "8", "--output-dir", str(out)]
    _run(cmd, cwd=tmp_path, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    assert math.isfinite(summary["metrics"]["train/loss"])
