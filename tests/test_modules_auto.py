"""``AOTLoss`` as the adapters use it, and ``OTLoss`` alike: ``memory`` in training mode only, ``global_batch="auto"``.

The multi-process case runs two gloo processes: with ``"auto"`` each rank's loss and
gradients must equal those of ``global_batch=True`` (bitwise: the same computation),
and in a one-rank group ``"auto"`` must be the local loss.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import init_gloo, spawn_world
from tolerances import tol

import otloss

DT = torch.float64


def _logps(n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(k, generator=g, dtype=DT) for k in (n, m, n, m))


def test_memory_is_used_in_training_mode_only():
    loss_fn = otloss.AOTLoss(paired=False, beta=0.5, memory=otloss.QuantileMemory())
    first, second = _logps(3, 2, seed=1), _logps(4, 5, seed=2)
    loss_fn(*first)
    assert loss_fn.memory.sizes == (3, 2)
    both = [torch.cat([a, b]) for a, b in zip(first, second)]
    torch.testing.assert_close(loss_fn(*second), otloss.aot_loss(*both, paired=False, beta=0.5), **tol(DT))
    assert loss_fn.memory.sizes == (7, 7)
    loss_fn.eval()  # evaluation neither reads nor extends the memory
    torch.testing.assert_close(loss_fn(*second), otloss.aot_loss(*second, paired=False, beta=0.5), **tol(DT))
    assert loss_fn.memory.sizes == (7, 7)
    loss_fn.train()  # and training reads it again
    memory = otloss.QuantileMemory()
    for batch in (first, second):
        expected = otloss.aot_loss(*batch, paired=False, beta=0.5, memory=memory)
    loss_fn.memory.reset()
    loss_fn(*first)
    torch.testing.assert_close(loss_fn(*second), expected, **tol(DT))


def test_global_batch_auto_without_a_process_group_is_the_local_loss():
    assert not (dist.is_available() and dist.is_initialized())
    logps = _logps(5, 5)
    loss_fn = otloss.AOTLoss(beta=0.3, global_batch="auto")
    assert loss_fn.global_batch == "auto" and not loss_fn.is_global()
    assert torch.equal(loss_fn(*logps), otloss.aot_loss(*logps, beta=0.3))
    with pytest.raises(RuntimeError, match="process group"):  # True still refuses a missing group
        otloss.AOTLoss(beta=0.3, global_batch=True)(*logps)
    assert otloss.AOTLoss(global_batch=True).is_global() and not otloss.AOTLoss().is_global()
    # the option survives copies and pickling
    for back in (copy.deepcopy(loss_fn), pickle.loads(pickle.dumps(loss_fn))):
        assert back.global_batch == "auto" and torch.equal(back(*logps), loss_fn(*logps))


def test_ot_loss_shares_the_training_only_memory_and_auto():
    g = torch.Generator().manual_seed(3)
    first = (torch.randn(4, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT))
    second = (torch.randn(2, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT))
    loss_fn = otloss.OTLoss("abs_pow", memory=otloss.QuantileMemory(), global_batch="auto")
    assert loss_fn.global_batch == "auto" and not loss_fn.is_global()
    loss_fn(*first)
    both = [torch.cat([a, b]) for a, b in zip(first, second)]
    torch.testing.assert_close(loss_fn(*second), otloss.ot_h_1d(*both, "abs_pow"), **tol(DT))
    assert loss_fn.memory.sizes == (6, 8)
    loss_fn.eval()
    assert torch.equal(loss_fn(*first), otloss.ot_h_1d(*first, "abs_pow"))
    assert loss_fn.memory.sizes == (6, 8)
    with pytest.raises(ValueError, match=r"global_batch must be True, False or 'auto', got 'on'"):
        otloss.OTLoss("abs_pow", global_batch="on")
    with pytest.raises(RuntimeError, match="process group"):
        otloss.OTLoss("abs_pow", global_batch=True)(*first)


def test_options_checked_at_construction():
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton', got 'cuda'"):
        otloss.AOTLoss(backend="cuda")
    with pytest.raises(ValueError, match=r"global_batch must be True, False or 'auto', got 'yes'"):
        otloss.AOTLoss(global_batch="yes")
    with pytest.raises(TypeError, match=r"global_batch must be a bool.*got int"):
        otloss.AOTLoss(global_batch=1)
    with pytest.raises(TypeError, match=r"group must be a torch\.distributed\.ProcessGroup"):
        otloss.AOTLoss(global_batch="auto", group="world")
    with pytest.raises(ValueError, match="group is used only with global_batch=True"):
        otloss.AOTLoss(global_batch=False, group=object())
    with pytest.raises(TypeError, match="memory must be a QuantileMemory"):
        otloss.AOTLoss(global_batch="auto", memory=[])
    with pytest.raises(ValueError, match="cost must be one of"):
        otloss.AOTLoss(cost="zero_one")
    assert otloss.AOTLoss(backend="triton").backend == "triton"  # checked when it runs, as in the functional


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    init_gloo(rank, world, port)
    try:
        res: dict = {}
        local = [t.requires_grad_() for t in _logps(3 + rank, 2 + 2 * rank, seed=10 + rank)]
        for name, option in (("auto", "auto"), ("true", True), ("false", False)):
            loss_fn = otloss.AOTLoss(paired=False, beta=0.5, global_batch=option)
            loss = loss_fn(*local)
            grads = torch.autograd.grad(loss, local)
            res[name] = {"is_global": loss_fn.is_global(), "loss": loss.detach(), "grads": grads}
        # with a memory (the adapters' accumulate_quantiles): "auto" stores the gathered scalars, as True does
        for name, option in (("auto_memory", "auto"), ("true_memory", True)):
            loss_fn = otloss.AOTLoss(paired=False, beta=0.5, global_batch=option, memory=otloss.QuantileMemory())
            loss_fn(*(t.detach() for t in _logps(2, 1 + rank, seed=20 + rank)))
            loss = loss_fn(*local)
            res[name] = {
                "loss": loss.detach(),
                "grads": torch.autograd.grad(loss, local),
                "sizes": loss_fn.memory.sizes,
            }
        solo = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
        loss_fn = otloss.AOTLoss(paired=False, beta=0.5, global_batch="auto", group=solo)
        res["solo"] = {"is_global": loss_fn.is_global(), "loss": loss_fn(*local).detach()}
        torch.save(res, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()  # no rank leaves the group while another still talks to it
    finally:
        dist.destroy_process_group()


def test_global_batch_auto_gathers_with_several_ranks(tmp_path):
    results = spawn_world(_worker, 2, tmp_path)
    ranks = [_logps(3 + r, 2 + 2 * r, seed=10 + r) for r in range(2)]
    whole = otloss.aot_loss(*(torch.cat([r[i] for r in ranks]) for i in range(4)), paired=False, beta=0.5)
    for rank, res in enumerate(results):
        assert res["auto"]["is_global"] and res["true"]["is_global"] and not res["false"]["is_global"]
        assert torch.equal(res["auto"]["loss"], res["true"]["loss"])
        assert all(torch.equal(a, b) for a, b in zip(res["auto"]["grads"], res["true"]["grads"]))
        torch.testing.assert_close(res["auto"]["loss"], whole, **tol(DT))
        own = otloss.aot_loss(*ranks[rank], paired=False, beta=0.5)
        torch.testing.assert_close(res["false"]["loss"], own, **tol(DT))
        assert res["auto_memory"]["sizes"] == res["true_memory"]["sizes"] == (2 + 2 + 3 + 4, 1 + 2 + 2 + 4)
        assert torch.equal(res["auto_memory"]["loss"], res["true_memory"]["loss"])
        assert all(torch.equal(a, b) for a, b in zip(res["auto_memory"]["grads"], res["true_memory"]["grads"]))
        # a group of one rank: "auto" is the local loss
        assert not res["solo"]["is_global"]
        torch.testing.assert_close(res["solo"]["loss"], own, **tol(DT))
