"""Global-batch losses across ranks (two gloo processes) and the gradient-accumulation memory.

The multi-process tests share one spawn of two CPU processes (``_worker``): every
case runs on both ranks with ``global_batch=True``, each rank saves its loss and
its local gradients, and the parent compares them with the single-process result
on the batch concatenated in rank order. Convention under test: the value is the
global loss on every rank, and local gradients are ``W`` times the single-process
ones, so that DDP's average over ``W`` ranks gives the single-process gradient.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import init_gloo, spawn_world
from tolerances import tol

import otloss

WORLD = 2
DT = torch.float64
TOL = tol(DT, "parity")


# ---------------------------------------------------------------------------
# Cases: inputs per rank (deterministic, rebuilt identically in the workers and the parent)
# ---------------------------------------------------------------------------


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def _cases() -> dict[str, dict]:
    """``name -> {"kind", "ranks": [inputs of rank 0, inputs of rank 1], "kw"}``."""
    g = torch.Generator().manual_seed(1234)
    c: dict[str, dict] = {}
    # ot_h_1d, equal n == m per rank but uneven across ranks (last batch)
    c["ot_uneven"] = {
        "kind": "ot",
        "ranks": [(_randn(g, 5), _randn(g, 5)), (_randn(g, 3), _randn(g, 3))],
        "kw": {"cost": otloss.logistic(0.7)},
    }
    # ot_h_1d, batched rows, n != m, weights on both sides
    c["ot_weighted_rows"] = {
        "kind": "ot",
        "ranks": [
            (_randn(g, 2, 4), _randn(g, 2, 2), torch.rand(2, 4, generator=g, dtype=DT) + 0.1, None),
            (_randn(g, 2, 1), _randn(g, 2, 5), torch.rand(2, 1, generator=g, dtype=DT) + 0.1, None),
        ],
        "kw": {"cost": otloss.squared_hinge(0.2), "reduction": "sum"},
    }
    c["ot_soft"] = {
        "kind": "ot",
        "ranks": [(_randn(g, 4), _randn(g, 4)), (_randn(g, 6), _randn(g, 6))],
        "kw": {"cost": "abs_pow", "sort": "soft"},
    }
    # paired AOT with uneven local batches
    c["aot_paired"] = {
        "kind": "aot",
        "ranks": [tuple(_randn(g, 5) for _ in range(4)), tuple(_randn(g, 3) for _ in range(4))],
        "kw": {"paired": True, "beta": 0.5},
    }
    # unpaired AOT: rank 0 holds no rejected sample, rank 1 chosen 2 / rejected 5
    r0 = (_randn(g, 4), _randn(g, 0), _randn(g, 4), _randn(g, 0))
    r1 = (_randn(g, 2), _randn(g, 5), _randn(g, 2), _randn(g, 5))
    c["aot_unpaired_zero_class"] = {"kind": "aot", "ranks": [r0, r1], "kw": {"paired": False, "beta": 0.5}}
    c["aot_unpaired_hinge_none"] = {
        "kind": "aot",
        "ranks": [
            tuple(_randn(g, 2, n) for n in (3, 1, 3, 1)),
            tuple(_randn(g, 2, n) for n in (1, 4, 1, 4)),
        ],
        "kw": {"paired": False, "cost": "squared_hinge", "beta": 0.1, "reduction": "none"},
    }
    c["gather"] = {"kind": "gather", "ranks": [(_randn(g, 2, 0),), (_randn(g, 2, 3),)], "kw": {}}
    return c


def _features(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1).to(DT)


# Model cases: policy log-probabilities come from a shared linear model.
# paired: rank sizes 5 and 2 pairs; unpaired: rank 0 has 3 chosen / 0 rejected, rank 1 1 / 4.
MODEL_SIZES = {"paired": [(5, 5), (2, 2)], "unpaired": [(3, 0), (1, 4)]}


def _model_inputs(kind: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    nc, nr = MODEL_SIZES[kind][rank]
    xc, xr = _features(10 + rank, nc), _features(20 + rank, nr)
    refc, refr = _features(30 + rank, nc)[:, 0], _features(40 + rank, nr)[:, 0]
    return xc, xr, refc, refr


def _model_loss(model, xc, xr, refc, refr, paired, **kw):
    out = model(torch.cat([xc, xr])).squeeze(-1)
    pc, pr = out[: len(xc)], out[len(xc) :]
    return otloss.aot_loss(pc, pr, refc, refr, paired=paired, beta=0.5, **kw)


# Memory (gradient accumulation) case: two micro-batches per rank, unpaired, chosen / rejected counts.
# micro-batch 3 has no rejected sample on any rank: valid, since the memory holds earlier ones
MEM_SIZES = [[(3, 2), (1, 3)], [(2, 0), (2, 2)], [(2, 0), (1, 0)]]  # [micro][rank] -> (n_chosen, n_rejected)


def _mem_inputs(micro: int, rank: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 + 10 * micro + rank)
    nc, nr = MEM_SIZES[micro][rank]
    return (_randn(g, nc), _randn(g, nr), _randn(g, nc), _randn(g, nr))


def _compute(kind: str, inputs, kw: dict, **extra) -> torch.Tensor:
    if kind == "ot":
        u, v, *w = inputs
        uw, vw = [*w, None, None][:2]
        kw = dict(kw)
        cost = kw.pop("cost")
        return otloss.ot_h_1d(u, v, cost, u_weights=uw, v_weights=vw, **kw, **extra)
    if kind == "aot":
        return otloss.aot_loss(*inputs, **kw, **extra)
    raise AssertionError(kind)


def _leaves(inputs):
    return [None if t is None else t.clone().requires_grad_(True) for t in inputs]


def _grads(leaves):
    return [None if t is None else t.grad.detach().clone() for t in leaves]


# ---------------------------------------------------------------------------
# The worker (one per rank)
# ---------------------------------------------------------------------------


def _try(fn):
    try:
        fn()
    except Exception as e:  # the builtin type a caller catches (NonFiniteError is a ValueError)
        return (next(c.__name__ for c in type(e).__mro__ if c.__module__ == "builtins"), str(e))
    return None


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    init_gloo(rank, world, port)
    try:
        res: dict = {}
        for name, case in _cases().items():
            leaves = _leaves(case["ranks"][rank])
            if case["kind"] == "gather":
                out = otloss.all_gather_variable(leaves[0])
                coef = torch.arange(1, out.numel() + 1, dtype=DT).reshape(out.shape)
                loss = (out * coef).sum()
                res[name] = {"out": out.detach(), "loss": loss.detach()}
            else:
                loss = _compute(case["kind"], leaves, case["kw"], global_batch=True)
                res[name] = {"loss": loss.detach()}
            loss.sum().backward()
            res[name]["grads"] = _grads(leaves)

        # DDP on a tiny model, paired AOT with uneven local batches
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        _model_loss(ddp, *_model_inputs("paired", rank), paired=True, global_batch=True).backward()
        res["ddp_paired"] = [p.grad.detach().clone() for p in ddp.module.parameters()]
        # Unpaired with a rank holding no rejected sample: local parameter gradients, averaged by the parent
        model = _model()
        loss = _model_loss(model, *_model_inputs("unpaired", rank), paired=False, global_batch=True)
        loss.backward()
        res["param_unpaired"] = {"loss": loss.detach(), "grads": [p.grad.detach().clone() for p in model.parameters()]}

        # Gradient accumulation with a QuantileMemory over the global batch
        memory = otloss.QuantileMemory()
        res["memory"] = []
        for micro in range(len(MEM_SIZES)):
            leaves = _leaves(_mem_inputs(micro, rank))
            loss = otloss.aot_loss(*leaves, paired=False, beta=0.5, global_batch=True, memory=memory)
            loss.backward()
            res["memory"].append({"loss": loss.detach(), "grads": _grads(leaves), "sizes": memory.sizes})
        memory.reset()

        # Errors must be raised on every rank (no rank left waiting in a collective)
        errs = {}
        errs["leading_dims"] = _try(
            lambda: otloss.ot_h_1d(torch.zeros(2 + rank, 3, dtype=DT), torch.zeros(2 + rank, 3, dtype=DT), "hinge",
                                   global_batch=True)
        )  # fmt: skip
        nan = torch.tensor([0.0, float("nan") if rank == 1 else 1.0], dtype=DT)
        errs["nan_one_rank"] = _try(lambda: otloss.aot_loss(nan, nan, nan, nan, global_batch=True))
        w = torch.ones(2, dtype=DT) if rank == 0 else None
        errs["weights_one_rank"] = _try(
            lambda: otloss.ot_h_1d(torch.zeros(2, dtype=DT), torch.zeros(2, dtype=DT), "hinge", u_weights=w,
                                   global_batch=True)
        )  # fmt: skip
        bad = torch.zeros(2, dtype=DT) if rank == 0 else torch.zeros(2, dtype=torch.int64)
        errs["int_one_rank"] = _try(lambda: otloss.ot_h_1d(bad, torch.zeros(2, dtype=DT), "hinge", global_batch=True))
        errs["empty_everywhere"] = _try(
            lambda: otloss.aot_loss(*(torch.zeros(n, dtype=DT) for n in (2, 0, 2, 0)), paired=False, global_batch=True)
        )
        errs["empty_with_memory"] = _try(
            lambda: otloss.aot_loss(*(torch.zeros(n, dtype=DT) for n in (2, 0, 2, 0)), paired=False, global_batch=True,
                                    memory=otloss.QuantileMemory())
        )  # fmt: skip
        dtype_mix = torch.zeros(2, dtype=DT if rank == 0 else torch.float32)
        errs["dtype_mix"] = _try(lambda: otloss.all_gather_variable(dtype_mix))
        res["errors"] = errs
        # still in step after the errors
        res["after_errors"] = otloss.all_gather_variable(torch.full((rank + 1,), float(rank), dtype=DT))
        torch.save(res, Path(outdir) / f"rank{rank}.pt")
        dist.barrier()  # no rank leaves the group while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return spawn_world(_worker, WORLD, tmp_path_factory.mktemp("dist"))


def _reference(kind: str, ranks, kw: dict):
    """Single-process loss and per-rank gradient slices on the concatenated batch."""
    cat = [None if ranks[0][i] is None else torch.cat([r[i] for r in ranks], dim=-1) for i in range(len(ranks[0]))]
    leaves = _leaves(cat)
    loss = _compute(kind, leaves, kw)
    loss.sum().backward()
    grads = _grads(leaves)
    per_rank = []
    for rank in range(WORLD):
        slices = []
        for i, g in enumerate(grads):
            if g is None:
                slices.append(None)
                continue
            start = sum(ranks[r][i].shape[-1] for r in range(rank))
            slices.append(g[..., start : start + ranks[rank][i].shape[-1]])
        per_rank.append(slices)
    return loss.detach(), per_rank


# ---------------------------------------------------------------------------
# Multi-process tests
# ---------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name",
    ["ot_uneven", "ot_weighted_rows", "ot_soft", "aot_paired", "aot_unpaired_zero_class", "aot_unpaired_hinge_none"],
)
def test_global_loss_and_gradients_equal_single_process(results, name):
    case = _cases()[name]
    ref_loss, ref_grads = _reference(case["kind"], case["ranks"], case["kw"])
    for rank in range(WORLD):
        got = results[rank][name]
        torch.testing.assert_close(got["loss"], ref_loss, **TOL)
        for g, r in zip(got["grads"], ref_grads[rank]):
            assert (g is None) == (r is None)
            if g is not None:
                assert g.shape == case["ranks"][rank][0].shape[:-1] + g.shape[-1:]
                torch.testing.assert_close(g, WORLD * r, **TOL)
    # the gradients are not trivially zero
    assert max(float(g.abs().max()) for g in ref_grads[1] if g is not None and g.numel()) > 1e-3


@pytest.mark.distributed
def test_global_batch_differs_from_per_rank_sorting(results):
    """The global sort is not what each rank computes alone (so the gather matters)."""
    case = _cases()["aot_paired"]
    local = otloss.aot_loss(*case["ranks"][0], **case["kw"])
    assert abs(float(local) - float(results[0]["aot_paired"]["loss"])) > 1e-6


@pytest.mark.distributed
def test_all_gather_variable_values_and_gradient(results):
    ranks = _cases()["gather"]["ranks"]
    full = torch.cat([r[0] for r in ranks], dim=-1)
    coef = torch.arange(1, full.numel() + 1, dtype=DT).reshape(full.shape)
    start = 0
    for rank in range(WORLD):
        got = results[rank]["gather"]
        torch.testing.assert_close(got["out"], full, rtol=0, atol=0)
        n = ranks[rank][0].shape[-1]
        assert got["grads"][0].shape == ranks[rank][0].shape
        torch.testing.assert_close(got["grads"][0], coef[..., start : start + n], rtol=0, atol=0)
        start += n


@pytest.mark.distributed
def test_ddp_averaged_gradient_equals_single_process(results):
    """Real DDP (gradient averaging over 2 ranks) gives the single-process parameter gradient."""
    model = _model()
    ins = [torch.cat([_model_inputs("paired", r)[i] for r in range(WORLD)]) for i in range(4)]
    _model_loss(model, *ins, paired=True).backward()
    for rank in range(WORLD):
        for got, p in zip(results[rank]["ddp_paired"], model.parameters()):
            torch.testing.assert_close(got, p.grad, **TOL)


@pytest.mark.distributed
def test_rank_average_of_parameter_gradients_unpaired(results):
    """sum_r grad_r / W (what DDP computes) equals the single-process gradient; a rank has no rejected sample."""
    model = _model()
    ins = [torch.cat([_model_inputs("unpaired", r)[i] for r in range(WORLD)]) for i in range(4)]
    loss = _model_loss(model, *ins, paired=False)
    loss.backward()
    for i, p in enumerate(model.parameters()):
        avg = sum(results[r]["param_unpaired"]["grads"][i] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(avg, p.grad, **TOL)
        # a single rank's gradient alone is not the answer
        assert not torch.allclose(results[0]["param_unpaired"]["grads"][i], p.grad)
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["param_unpaired"]["loss"], loss.detach(), **TOL)


@pytest.mark.distributed
def test_memory_with_global_batch(results):
    """Micro-batch 2 sorts against micro-batch 1 of every rank; gradient scaled by W and N / n."""
    micro = [[_mem_inputs(m, r) for r in range(WORLD)] for m in range(2)]
    cat = [[torch.cat([micro[m][r][i] for r in range(WORLD)]) for i in range(4)] for m in range(2)]
    # micro-batch 1: plain global batch
    ref1, grads1 = _reference("aot", micro[0], {"paired": False, "beta": 0.5})
    # micro-batch 2: stored micro-batch 1 (no gradient) followed by the current one
    leaves = _leaves(cat[1])
    ins = [torch.cat([cat[0][i], leaves[i]]) for i in range(4)]
    ref2 = otloss.aot_loss(*ins, paired=False, beta=0.5)
    ref2.backward()
    n_old = (len(cat[0][0]), len(cat[0][1]))
    n_cur = (len(cat[1][0]), len(cat[1][1]))
    ratio = [(n_old[i % 2] + n_cur[i % 2]) / n_cur[i % 2] for i in range(4)]
    for rank in range(WORLD):
        got = results[rank]["memory"]
        torch.testing.assert_close(got[0]["loss"], ref1, **TOL)
        for g, r in zip(got[0]["grads"], grads1[rank]):
            torch.testing.assert_close(g, WORLD * r, **TOL)
        torch.testing.assert_close(got[1]["loss"], ref2.detach(), **TOL)
        assert got[1]["sizes"] == (n_old[0] + n_cur[0], n_old[1] + n_cur[1])
        for i, g in enumerate(got[1]["grads"]):
            start = sum(len(micro[1][r][i]) for r in range(rank))
            expect = leaves[i].grad[start : start + len(g)] * WORLD * ratio[i]
            torch.testing.assert_close(g, expect, **TOL)
    # the memory changes the loss: a margin far above TOL, not a tolerance
    assert abs(float(ref2.detach()) - float(otloss.aot_loss(*cat[1], paired=False, beta=0.5))) > 1e-6


def test_memory_makes_a_class_empty_on_every_rank_valid(results):
    """Micro-batch 3 has no rejected sample anywhere: it sorts against the stored ones, as in one process."""
    micro = [[_mem_inputs(m, r) for r in range(WORLD)] for m in range(3)]
    cat = [[torch.cat([micro[m][r][i] for r in range(WORLD)]) for i in range(4)] for m in range(3)]
    assert cat[2][1].numel() == 0 and cat[2][0].numel() > 0
    leaves = _leaves(cat[2])
    ins = [torch.cat([cat[0][i], cat[1][i], leaves[i]]) for i in range(4)]
    ref = otloss.aot_loss(*ins, paired=False, beta=0.5)
    ref.backward()
    n_old = len(cat[0][0]) + len(cat[1][0])
    ratio = (n_old + len(cat[2][0])) / len(cat[2][0])
    for rank in range(WORLD):
        got = results[rank]["memory"][2]
        torch.testing.assert_close(got["loss"], ref.detach(), **TOL)
        start = sum(len(micro[2][r][0]) for r in range(rank))
        for i in (0, 2):  # the chosen side: scaled by W and N / n, as the earlier micro-batches
            g = got["grads"][i]
            torch.testing.assert_close(g, leaves[i].grad[start : start + len(g)] * WORLD * ratio, **TOL)
        assert got["grads"][1].numel() == 0 and got["grads"][3].numel() == 0


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name,rank0,rank1",
    [
        ("leading_dims", ("ValueError", "leading"), ("ValueError", "leading")),
        ("nan_one_rank", ("ValueError", "non-finite"), ("ValueError", "non-finite")),
        ("weights_one_rank", ("ValueError", "None on rank"), ("ValueError", "None on rank")),
        ("int_one_rank", ("RuntimeError", "rank(s) [1]"), ("TypeError", "floating-point")),
        ("empty_everywhere", ("ValueError", "empty on every rank"), ("ValueError", "empty on every rank")),
        (
            "empty_with_memory",
            ("ValueError", "empty on every rank and in the memory"),
            ("ValueError", "empty on every rank and in the memory"),
        ),
        ("dtype_mix", ("TypeError", "one dtype"), ("TypeError", "one dtype")),
    ],
)
def test_errors_raise_on_every_rank(results, name, rank0, rank1):
    for rank, (etype, text) in enumerate((rank0, rank1)):
        got = results[rank]["errors"][name]
        assert got is not None, f"rank {rank} raised nothing for {name}"
        assert got[0] == etype, got
        assert text in got[1], got


@pytest.mark.distributed
def test_ranks_stay_in_step_after_errors(results):
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank]["after_errors"], torch.tensor([0.0, 1.0, 1.0], dtype=DT))


# ---------------------------------------------------------------------------
# Single-process tests
# ---------------------------------------------------------------------------


def _aot_inputs(seed: int, n: int, m: int | None = None):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    return (_randn(g, n), _randn(g, m), _randn(g, n), _randn(g, m))


def test_global_batch_without_process_group_raises():
    assert not dist.is_initialized()
    u = torch.randn(4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        otloss.ot_h_1d(u, u, "hinge", global_batch=True)
    with pytest.raises(RuntimeError, match="global_batch=False"):
        otloss.aot_loss(*_aot_inputs(0, 3), global_batch=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        otloss.AOTLoss(global_batch=True)(*_aot_inputs(0, 3))
    with pytest.raises(RuntimeError, match="init_process_group"):
        otloss.all_gather_variable(u)


def test_global_batch_when_distributed_unavailable(monkeypatch):
    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="does not provide"):
        otloss.ot_h_1d(torch.randn(3), torch.randn(3), "hinge", global_batch=True)


def test_option_validation():
    u = torch.randn(3)
    with pytest.raises(TypeError, match="global_batch must be a bool"):
        otloss.ot_h_1d(u, u, "hinge", global_batch=1)
    with pytest.raises(ValueError, match="group is used only with global_batch=True"):
        otloss.ot_h_1d(u, u, "hinge", group=object())
    with pytest.raises(TypeError, match="memory must be a QuantileMemory"):
        otloss.aot_loss(*_aot_inputs(0, 3), memory=[])
    with pytest.raises(TypeError, match="rescale_grad"):
        otloss.QuantileMemory(rescale_grad=1)
    with pytest.raises(TypeError, match="grad_scale"):
        otloss.all_gather_variable(u, grad_scale="2")


def test_defaults_unchanged():
    ins = _aot_inputs(1, 6)
    torch.testing.assert_close(
        otloss.aot_loss(*ins, beta=0.3), otloss.aot_loss(*ins, beta=0.3, global_batch=False, memory=None)
    )
    with pytest.raises(ValueError, match="non-empty"):
        otloss.aot_loss(*_aot_inputs(0, 2, 0), paired=False)


def test_memory_single_process_accumulation():
    memory = otloss.QuantileMemory()
    assert memory.sizes == (0, 0)
    a1 = _aot_inputs(2, 4, 3)
    loss1 = otloss.aot_loss(*a1, paired=False, beta=0.5, memory=memory)
    torch.testing.assert_close(loss1, otloss.aot_loss(*a1, paired=False, beta=0.5))
    assert memory.sizes == (4, 3)
    # second micro-batch: no rejected sample at all, which memory makes valid
    a2 = [t.clone().requires_grad_(True) for t in _aot_inputs(3, 2, 0)]
    loss2 = otloss.aot_loss(*a2, paired=False, beta=0.5, memory=memory)
    loss2.backward()
    ref = [t.detach().clone().requires_grad_(True) for t in a2]
    joint = [torch.cat([a1[i], ref[i]]) for i in range(4)]
    ref_loss = otloss.aot_loss(*joint, paired=False, beta=0.5)
    ref_loss.backward()
    torch.testing.assert_close(loss2, ref_loss)
    torch.testing.assert_close(a2[0].grad, ref[0].grad * (6 / 2))
    torch.testing.assert_close(a2[2].grad, ref[2].grad * (6 / 2))
    assert a2[1].grad.numel() == 0
    assert memory.sizes == (6, 3)
    assert "sizes=(6, 3)" in repr(memory)
    memory.reset()
    assert memory.sizes == (0, 0)


def test_memory_without_rescale_and_ot_module():
    memory = otloss.QuantileMemory(rescale_grad=False)
    loss_fn = otloss.OTLoss("abs_pow", memory=memory)
    u1, v1 = torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT)
    loss_fn(u1, v1)
    u2 = torch.randn(2, 5, dtype=DT, requires_grad=True)
    v2 = torch.randn(2, 5, dtype=DT)
    loss_fn(u2, v2).backward()
    ur = u2.detach().clone().requires_grad_(True)
    otloss.ot_h_1d(torch.cat([u1, ur], -1), torch.cat([v1, v2], -1), "abs_pow").backward()
    torch.testing.assert_close(u2.grad, ur.grad, rtol=0, atol=0)
    assert memory.sizes == (8, 8)


def test_memory_rejects_changes_within_a_step():
    memory = otloss.QuantileMemory()
    u = torch.randn(2, 3)
    otloss.ot_h_1d(u, u, "hinge", memory=memory)
    with pytest.raises(ValueError, match="leading dimensions"):
        otloss.ot_h_1d(torch.randn(3, 3), torch.randn(3, 3), "hinge", memory=memory)
    with pytest.raises(ValueError, match="u_weights was None"):
        otloss.ot_h_1d(u, u, "hinge", u_weights=torch.ones(2, 3), memory=memory)
    memory.reset()
    otloss.ot_h_1d(torch.randn(3, 3), torch.randn(3, 3), "hinge", memory=memory)
    assert memory.sizes == (3, 3)


def test_modules_store_and_pass_options():
    memory = otloss.QuantileMemory()
    m = otloss.AOTLoss(beta=0.5, memory=memory)
    assert m.global_batch is False and m.group is None and m.memory is memory
    ins = _aot_inputs(4, 5)
    torch.testing.assert_close(m(*ins), otloss.aot_loss(*ins, beta=0.5))
    assert memory.sizes == (5, 5)


def test_public_names_exported():
    assert "QuantileMemory" in otloss.__all__ and "all_gather_variable" in otloss.__all__
