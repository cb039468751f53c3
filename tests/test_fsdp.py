"""FSDP2 (``fully_shard``) with global-batch AOT on a LoRA-wrapped causal LM, two gloo processes on CPU.

Two processes each build the same tiny ``LlamaForCausalLM`` (from a config, same
seed), wrap it with a PEFT LoRA adapter on every linear projection of the decoder
layers, and apply ``torch.distributed.fsdp.fully_shard`` to each decoder layer and
to the root, on a CPU device mesh over the gloo process group. Each rank trains on
its own uneven slice of one fixed synthetic preference batch for a few SGD steps:
sequence log-probabilities of chosen and rejected completions under the policy and
under the reference (the same model inside ``model.disable_adapter()``), then
``otloss.aot_loss(..., global_batch=True)``. The parent runs a single process on
the whole batch from the same initialisation and checks that the losses and the
final LoRA weights are the same: FSDP2 averages gradients over ranks, and the
global-batch loss scales each rank's local gradient by the world size, so the
sharded run follows the single-process trajectory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import init_gloo, spawn_world
from otloss.integrations._common import tiny_causal_lm
from tolerances import tol

import otloss

pytestmark = pytest.mark.distributed

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

WORLD = 2
STEPS = 3
LR = 0.5
VOCAB = 64
PROMPT_LEN, COMPLETION_LEN = 4, 5
RANK_SIZES = (3, 5)  # preference pairs per rank: uneven on purpose
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = tol(torch.float32, "parity")  # FSDP and one process: the same float32 steps, sums in another order
CASES = {
    "paired": {"paired": True, "beta": 0.5},
    "unpaired_hinge": {"paired": False, "cost": "squared_hinge", "beta": 0.1},
}


# ---------------------------------------------------------------------------
# Model and data, rebuilt identically in the workers and the parent
# ---------------------------------------------------------------------------


def _model() -> torch.nn.Module:
    """The tiny Llama with LoRA on all linear projections (random A and B, so policy != reference)."""
    base = tiny_causal_lm(0, vocab_size=VOCAB)  # the tiny Llama of every integration test
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False, bias="none"
    )
    torch.manual_seed(1)
    model = peft.get_peft_model(base, lora)
    model.train()
    return model


def _batch() -> dict[str, torch.Tensor]:
    """A fixed paired preference batch of ``sum(RANK_SIZES)`` pairs.

    ``chosen`` / ``rejected``: token ids ``(N, PROMPT_LEN + COMPLETION_LEN)`` sharing the
    prompt; ``mask``: ``(N, COMPLETION_LEN)`` completion-token mask (variable completion
    lengths, right-padded with 0); for the unpaired case, ``label`` says whether pair ``i``
    contributes its chosen (True) or its rejected (False) completion.
    """
    g = torch.Generator().manual_seed(2024)
    n = sum(RANK_SIZES)
    prompt = torch.randint(3, VOCAB, (n, PROMPT_LEN), generator=g)
    lengths = torch.randint(2, COMPLETION_LEN + 1, (2, n), generator=g)
    mask = (torch.arange(COMPLETION_LEN) < lengths[..., None]).long()  # (2, N, C)
    comp = torch.randint(3, VOCAB, (2, n, COMPLETION_LEN), generator=g) * mask
    label = torch.tensor([True, True, True, False, False, True, False, False])  # rank 0: no rejected
    return {
        "chosen": torch.cat([prompt, comp[0]], dim=1),
        "rejected": torch.cat([prompt, comp[1]], dim=1),
        "chosen_mask": mask[0],
        "rejected_mask": mask[1],
        "label": label[:n],
    }


def _slice(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    start = sum(RANK_SIZES[:rank])
    return {k: v[start : start + RANK_SIZES[rank]] for k, v in batch.items()}


def _seq_logps(model: torch.nn.Module, ids: torch.Tensor, comp_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the completion tokens' log-probabilities, one value per sequence."""
    attention = torch.cat([torch.ones(ids.shape[0], PROMPT_LEN, dtype=torch.long), comp_mask], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, PROMPT_LEN - 1 : -1].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, PROMPT_LEN:, None]).squeeze(-1)
    return (token_logps * comp_mask).sum(-1)


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], kw: dict, global_batch: bool) -> torch.Tensor:
    n = batch["chosen"].shape[0]
    ids = torch.cat([batch["chosen"], batch["rejected"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    with torch.no_grad(), model.disable_adapter():
        ref = _seq_logps(model, ids, mask)
    pol = _seq_logps(model, ids, mask)
    pc, pr, rc, rr = pol[:n], pol[n:], ref[:n], ref[n:]
    if not kw["paired"]:  # unpaired: each pair gives one desirable or one undesirable completion
        keep = batch["label"]
        pc, rc, pr, rr = pc[keep], rc[keep], pr[~keep], rr[~keep]
    return otloss.aot_loss(pc, pr, rc, rr, global_batch=global_batch, **kw)


def _disable_adapter_changes_output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    """Inside ``disable_adapter()`` the output must differ from the adapted model's (B != 0 here)."""
    ids, mask = batch["chosen"], batch["chosen_mask"]
    with torch.no_grad():
        with model.disable_adapter():
            ref = _seq_logps(model, ids, mask)
        pol = _seq_logps(model, ids, mask)
    return not torch.allclose(ref, pol)


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) values of the trainable LoRA parameters, by name."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().clone()
    return out


def _train(model: torch.nn.Module, batch: dict[str, torch.Tensor], kw: dict, global_batch: bool):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = _loss(model, batch, kw, global_batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    init_gloo(rank, world, port, timeout_s=60)
    try:
        mesh = init_device_mesh("cpu", (world,))
        local = _slice(_batch(), rank)
        res: dict = {}
        for name, kw in CASES.items():
            model = _model()
            for layer in model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            params = list(model.parameters())
            res[name] = {
                "sharded": all(isinstance(p, DTensor) for p in params),
                "local_numel": sum(p.to_local().numel() for p in params),
                "full_numel": sum(p.numel() for p in params),
                "adapter_disabled_differs": _disable_adapter_changes_output(model, local),
                "losses": _train(model, local, kw, global_batch=True),
                "lora": _lora_state(model),
            }
        torch.save(res, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()  # no rank leaves the group while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return spawn_world(_worker, WORLD, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """Single process, whole batch, same initialisation, ``global_batch=False``."""
    out = {}
    for name, kw in CASES.items():
        model = _model()
        initial = _lora_state(model)
        losses = _train(model, _batch(), kw, global_batch=False)
        out[name] = {"losses": losses, "lora": _lora_state(model), "initial": initial}
    return out


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_parameters_are_sharded(results, name):
    for rank in range(WORLD):
        r = results[rank][name]
        assert r["sharded"], "fully_shard did not turn the parameters into DTensors"
        assert r["local_numel"] < r["full_numel"]


@pytest.mark.parametrize("name", list(CASES))
def test_disable_adapter_works_under_fully_shard(results, name):
    assert all(results[rank][name]["adapter_disabled_differs"] for rank in range(WORLD))


@pytest.mark.parametrize("name", list(CASES))
def test_losses_match_single_process(results, reference, name):
    expected = torch.tensor(reference[name]["losses"], dtype=torch.float64)
    for rank in range(WORLD):
        torch.testing.assert_close(torch.tensor(results[rank][name]["losses"], dtype=torch.float64), expected, **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_lora_weights_match_single_process(results, reference, name):
    ref = reference[name]
    assert set(ref["lora"]) == set(results[0][name]["lora"])
    assert len(ref["lora"]) == 2 * len(LORA_TARGETS) * 2  # A and B, 7 projections, 2 layers
    moved = max((ref["lora"][k] - ref["initial"][k]).abs().max().item() for k in ref["lora"])
    assert moved > 1e-3, "the single-process run did not move the LoRA weights: the comparison would be vacuous"
    for rank in range(WORLD):
        for key, value in ref["lora"].items():
            torch.testing.assert_close(results[rank][name]["lora"][key], value, **TOL, msg=key)


@pytest.mark.parametrize("name", list(CASES))
def test_global_batch_differs_from_a_rank_alone(results, reference, name):
    """The loss value is the global one: a single process on rank 1's slice alone gives another."""
    model = _model()
    local = _loss(model, _slice(_batch(), 1), CASES[name], global_batch=False).item()
    assert abs(local - results[1][name]["losses"][0]) > 1e-4
