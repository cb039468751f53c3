"""torch.compile and host syncs on the hot path (CPU: the reference path, and the Triton op under the interpreter).

With value checks off, a training step that calls ``aot_loss`` or ``ot_h_1d`` compiles with
``fullgraph=True`` (any graph break raises) and its loss and gradients are those of eager mode.
Host-device synchronisations are counted as ``aten._local_scalar_dense`` calls (what ``.item()``,
``bool()``, ``float()`` and ``int()`` of a tensor dispatch to) and data-dependent-shape ops: with
checks off there are none, with checks on exactly one (the fused finiteness test). CUDA-graph
capture itself needs a GPU; the GPU run of the same suite covers it (``-m requires_cuda``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import otloss
from otloss.ops import triton_available

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "is_nonzero"}


class CountSyncs(TorchDispatchMode):
    """Records every aten op that would make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def checks_off():
    before = otloss.get_validate_args()
    otloss.set_validate_args(False)
    yield
    otloss.set_validate_args(before)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _aot_step(model, x, ref, backend):
    scores = model(x).squeeze(-1)  # [2, B]: chosen and rejected log-probabilities of the policy
    return otloss.aot_loss(scores[0], scores[1], ref[0], ref[1], beta=0.5, backend=backend)


def _ot_step(model, x, ref, backend):
    scores = model(x).squeeze(-1)
    return otloss.ot_h_1d(scores, ref, otloss.squared_hinge(0.1), backend=backend)


def _compare_compiled(step, backend, compile_backend="aot_eager", expect_op=None):
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # cpu: the interpreter
    x = torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(1)).to(device)
    ref = torch.randn(2, 12, generator=torch.Generator().manual_seed(2)).to(device)
    eager_model, compiled_model = _model().to(device), _model().to(device)
    loss = step(eager_model, x, ref, backend)
    loss.backward()
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return (torch._dynamo.lookup_backend(compile_backend))(gm, example_inputs)

    compiled = torch.compile(step, fullgraph=True, backend=record)  # a graph break raises
    for _ in range(2):  # the second call reuses the compiled graph
        compiled_model.zero_grad()
        closs = compiled(compiled_model, x, ref, backend)
        closs.backward()
    torch.testing.assert_close(closs, loss)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert len(graphs) == 1
    if expect_op is not None:  # the kernel enters the graph as one opaque custom op
        targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
        assert sum(expect_op in t for t in targets) == 1, targets


@pytest.mark.parametrize("step", [_aot_step, _ot_step], ids=["aot_loss", "ot_h_1d"])
@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_training_step_compiles_without_graph_break_on_the_reference_path(checks_off, step, compile_backend):
    _compare_compiled(step, "torch", compile_backend)


def test_per_call_option_also_compiles_without_graph_break():
    def step(model, x, ref, backend):
        scores = model(x).squeeze(-1)
        return otloss.aot_loss(scores[0], scores[1], ref[0], ref[1], validate_args=False, backend=backend)

    _compare_compiled(step, "torch")


def test_large_rows_compile_without_the_numpy_sort(checks_off):
    # CPU float32 rows of >= NUMPY_SORT_MIN elements sort through NumPy in eager mode; compiled, through torch.sort
    from otloss._reference import NUMPY_SORT_MIN

    u = torch.randn(3, NUMPY_SORT_MIN + 1, requires_grad=True)
    v = torch.randn(3, NUMPY_SORT_MIN + 1)
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: otloss.ot_h_1d(a, b, otloss.logistic(1.0)), fullgraph=True, backend="aot_eager")
    out = f(u, v)
    (g,) = torch.autograd.grad(out, u)
    ref = otloss.ot_h_1d(u, v, otloss.logistic(1.0))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, torch.autograd.grad(ref, u)[0])


needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton (pip install 'torch-otloss[triton]')")


@pytest.mark.requires_triton
@needs_triton
@pytest.mark.parametrize("step", [_aot_step, _ot_step], ids=["aot_loss", "ot_h_1d"])
def test_training_step_compiles_around_the_triton_custom_op(checks_off, step):
    # on the CPU the op runs Triton's interpreter; with a GPU, the CUDA kernel
    _compare_compiled(step, "triton", expect_op="otloss.sorted_ot_rows")


@pytest.mark.requires_triton
@needs_triton
def test_custom_op_registration_passes_opcheck():
    from otloss.ops import ot_sort

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    u, u2, v = (torch.randn(2, 9, generator=g).to(device) for _ in range(3))
    for args in ((u.requires_grad_(True), None, v, None), (u, u2.requires_grad_(True), v, u2)):
        torch.library.opcheck(
            ot_sort.sorted_ot_rows,
            (*args, 0, 0.5, 0.0, 1.0),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


def _fwd_bwd(fn):
    loss = fn()
    loss.backward()
    return loss


def _aot_inputs(n, device="cpu"):
    g = torch.Generator().manual_seed(n)
    ins = [(torch.randn(n, generator=g) - 30).to(device) for _ in range(4)]
    ins[0].requires_grad_(True)
    ins[1].requires_grad_(True)
    return ins


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=[pytest.mark.requires_triton, needs_triton])]
)
@pytest.mark.parametrize("loss", ["aot_loss", "ot_h_1d"])
def test_no_host_sync_with_checks_off_and_one_with_checks_on(loss, backend, validate):
    from otloss._reference import NUMPY_SORT_MIN

    n = 64
    assert n < NUMPY_SORT_MIN  # the NumPy sort is a CPU-only path, never taken for CUDA tensors
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pc, pr, rc, rr = _aot_inputs(n, device)
    u = torch.randn(3, n, device=device, requires_grad=True)
    v = torch.randn(3, n, device=device)
    with CountSyncs() as mode:
        if loss == "aot_loss":
            out = otloss.aot_loss(pc, pr, rc, rr, validate_args=validate, backend=backend)
        else:
            out = otloss.ot_h_1d(u, v, "logistic", validate_args=validate, backend=backend)
        out.backward()
    assert mode.syncs == (["_local_scalar_dense"] if validate else [])


def test_the_sync_counter_sees_item_and_bool():
    x = torch.randn(3)
    with CountSyncs() as mode:
        x.sum().item()
        bool((x > 0).any())
    assert mode.syncs == ["_local_scalar_dense", "_local_scalar_dense"]
