"""Every loss and soft sort returns a tensor of its own: the caller can modify it in place.

A view returned by an autograd node cannot be modified in place (``loss += penalty`` raises
"Output 0 of ... is a view and is being modified inplace"). The kernel path returned such views
(rows of one output buffer), and so did the pooled soft sort; these tests guard every path.
"""

from __future__ import annotations

import pytest
import torch

import otloss
from otloss import sorting
from otloss.ops import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the kernels under the interpreter
triton_case = pytest.mark.skipif(not triton_available(), reason="needs triton (pip install 'torch-otloss[triton]')")
BACKENDS = ["torch", pytest.param("triton", marks=[pytest.mark.requires_triton, triton_case])]


def _modify_in_place_and_backward(out, *leaves):
    assert not out._is_view()
    out += 1.0
    out.mul_(2.0)
    out.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize(
    "backend,n_extra",
    [("torch", 0), *(pytest.param("triton", k, marks=BACKENDS[1].marks) for k in (0, 8200))],
    ids=["torch", "triton-fused", "triton-chunked"],
)
@pytest.mark.parametrize("shape,reduction", [((16,), "mean"), ((2, 8), "none"), ((1, 16), "mean"), ((3, 2, 8), "sum")])
def test_ot_h_1d_output_is_no_view(backend, n_extra, shape, reduction):
    shape = (*shape[:-1], shape[-1] + n_extra)  # n_extra: rows longer than MAX_FUSED_SIZE (the chunked kernel)
    g = torch.Generator().manual_seed(0)
    device = DEVICE if backend == "triton" else "cpu"
    u = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    v = torch.randn(shape, generator=g).to(device)
    out = otloss.ot_h_1d(u, v, otloss.abs_pow(2.0), reduction=reduction, backend=backend)
    _modify_in_place_and_backward(out, u)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paired", [True, False])
def test_aot_loss_output_is_no_view(backend, paired):
    g = torch.Generator().manual_seed(1)
    device = DEVICE if backend == "triton" else "cpu"
    x = [(torch.randn(12, generator=g) - 30).to(device) for _ in range(4)]
    x[0].requires_grad_(True)
    if not paired and backend == "triton":
        x[1].requires_grad_(True)
    out = otloss.aot_loss(*x, paired=paired, backend=backend)
    _modify_in_place_and_backward(out, x[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(9,), (2, 9), (2, 3, 9)])
@pytest.mark.parametrize("eps", [0.01, 3.0], ids=["no-pooling", "pooled"])
def test_soft_sort_output_is_no_view(dtype, shape, eps):
    x = (torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2)) * 5).requires_grad_(True)
    _modify_in_place_and_backward(otloss.soft_sort(x, eps), x)


@pytest.mark.requires_triton
@triton_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_sort_kernel_path_output_is_no_view(monkeypatch, dtype):
    if DEVICE == "cpu":
        monkeypatch.setattr(sorting, "_use_kernel", lambda x: True)  # the CUDA path, interpreted
    x = torch.randn(2, 9, dtype=dtype, generator=torch.Generator().manual_seed(3)) * 5
    x = x.to(DEVICE).requires_grad_(True)
    _modify_in_place_and_backward(otloss.soft_sort(x, 3.0), x)


def _same_on_permuted_input(fn, x):
    """``fn`` of a permuted (non-contiguous) 3-D ``x`` equals ``fn`` of its contiguous copy: value and gradient."""
    xt = x.transpose(0, 1).detach().requires_grad_(True)
    xc = xt.detach().contiguous().requires_grad_(True)
    assert not xt.is_contiguous()
    out_t, out_c = fn(xt), fn(xc)
    assert torch.equal(out_t, out_c)
    w = torch.arange(out_c.numel(), dtype=out_c.dtype, device=out_c.device).reshape(out_c.shape)
    (g_t,) = torch.autograd.grad((out_t * w).sum(), xt)
    (g_c,) = torch.autograd.grad((out_c * w).sum(), xc)
    assert torch.equal(g_t, g_c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ot_h_1d_of_a_permuted_input_is_that_of_its_contiguous_copy(backend):
    device = DEVICE if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 10, generator=g).to(device)
    v = torch.randn(2, 3, 10, generator=g).to(device)
    _same_on_permuted_input(lambda u: otloss.ot_h_1d(u, v, "logistic", reduction="none", backend=backend), x)


@pytest.mark.parametrize(
    "kernel", [pytest.param(False, id="torch"), pytest.param(True, id="kernel", marks=BACKENDS[1].marks)]
)
def test_soft_sort_of_a_permuted_input_is_that_of_its_contiguous_copy(monkeypatch, kernel):
    if kernel and DEVICE == "cpu":
        monkeypatch.setattr(sorting, "_use_kernel", lambda x: True)  # the CUDA path, interpreted
    x = torch.randn(3, 2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 5
    _same_on_permuted_input(lambda t: otloss.soft_sort(t, 3.0), x.to(DEVICE if kernel else "cpu"))
