"""The l2 soft sort: exactness in float32, extreme eps and magnitudes, NaN/Inf, transforms, batching.

The oracle is an independent sequential pool-adjacent-violators pass in numpy float64,
written from Blondel et al. (2020), "Fast Differentiable Sorting and Ranking"
(arXiv 2002.08871). In the ascending form used here, ``y_i = v_i + i / eps`` with ``v`` the
non-increasing isotonic regression of ``xs_i - i / eps`` (``xs`` sorted ascending).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import requires_torchsort
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tolerances import approx, tol

import otloss
from otloss import sorting

F32_MAX = float(torch.finfo(torch.float32).max)


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(not _has_triton(), reason="needs triton (pip install 'torch-otloss[triton]')")


def pav_soft_sort(x: np.ndarray, eps: float) -> np.ndarray:
    """l2 soft sort (ascending) of one row: sequential PAV in float64, block values ``mean(xs) - centre / eps``."""
    xs = np.sort(np.asarray(x, dtype=np.float64))
    sums: list[float] = []
    sizes: list[int] = []
    starts: list[int] = []
    for i, value in enumerate(xs):
        s, c, first = float(value), 1, i
        while sums:
            ps, pc, pfirst = sums[-1], sizes[-1], starts[-1]
            left = ps / pc - (pfirst + (pc - 1) / 2) / eps
            right = s / c - (first + (c - 1) / 2) / eps
            if left > right:
                break
            sums.pop(), sizes.pop(), starts.pop()
            s, c, first = s + ps, c + pc, pfirst
        sums.append(s), sizes.append(c), starts.append(first)
    out = np.empty(len(xs))
    for s, c, first in zip(sums, sizes, starts):
        out[first : first + c] = s / c + (np.arange(c) - (c - 1) / 2) / eps
    return out


def ulp_error(y32: torch.Tensor, y64: torch.Tensor) -> float:
    """Largest |y32 - y64| in units of the float32 spacing at |y64| (subnormal spacing as the floor)."""
    spacing = torch.finfo(torch.float32).eps * y64.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return float(((y32.double() - y64).abs() / spacing).max())


rows_strategy = arrays(
    np.float64,
    st.tuples(st.integers(1, 3), st.integers(1, 40)),
    elements=st.one_of(
        st.floats(-100, 100, width=32),
        st.sampled_from([0.0, 1.0, -1.0, 2.5]),  # ties
        st.floats(-(2.0**100), 2.0**100, width=32),
    ),
)
eps_strategy = st.floats(1e-6, 1e6).map(lambda e: float(np.float64(e)))


# ----------------------------------------------------------------------------- exactness


@given(rows_strategy, eps_strategy)
def test_matches_float64_pav_oracle(x, eps):
    out = otloss.soft_sort(torch.as_tensor(x), eps)
    for r in range(x.shape[0]):
        ref = torch.as_tensor(pav_soft_sort(x[r], eps))
        scale = float(np.abs(x[r]).max()) + x.shape[1] / eps
        torch.testing.assert_close(out[r], ref, rtol=0, atol=tol(torch.float64)["atol"] * scale)


@given(rows_strategy, eps_strategy)
def test_float32_is_the_float64_result_rounded_once(x, eps):
    """Computed internally in float64: a float32 result is within half an ulp of the float64 one."""
    x32 = torch.as_tensor(x, dtype=torch.float32)
    y32 = otloss.soft_sort(x32, eps)
    y64 = otloss.soft_sort(x32.double(), eps)
    assert torch.equal(y32, y64.float())
    assert ulp_error(y32, y64) <= 0.5


@pytest.mark.parametrize("eps", [0.1, 1.0, 30.0])
def test_float32_within_an_ulp_of_float64_at_n_1e5(eps):
    # the old (x + rho) - rho form with rho = n / eps lost ~0.03 here
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 10
    y32 = otloss.soft_sort(x, eps)
    y64 = otloss.soft_sort(x.double(), eps)
    assert ulp_error(y32, y64) <= 1.0
    ref = torch.as_tensor(pav_soft_sort(x.double().numpy(), eps))
    torch.testing.assert_close(y64, ref, **tol(torch.float64, "parity", scale=1e6))


def test_acceptance_randn_1000_is_the_hard_sort():
    # every gap of randn(1000) is far below 1 / 0.1: the soft sort is exactly the hard sort (was off by 5e-4)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(otloss.soft_sort(x, 0.1), torch.sort(x).values)


def test_acceptance_n_1e5_is_the_hard_sort():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(otloss.soft_sort(x, 0.1), torch.sort(x).values)


@pytest.mark.parametrize("eps", [1e-7, 1e-39, 1e-300, 5e-324])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_eps_is_the_hard_sort(eps, dtype):
    # was: values collapsed (1e-7) or NaN (1e-39)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(3, 1000, generator=g) * 1e3, torch.full((3, 5), 7.0)], dim=1).to(dtype)
    out = otloss.soft_sort(x, eps)
    assert torch.equal(out, torch.sort(x, dim=-1).values)


@pytest.mark.parametrize("eps", [1e-39, 1e-38, 1e-30, 0.1, 1.0, 1e30])
def test_values_near_the_float32_maximum(eps):
    x = torch.tensor([[F32_MAX, -F32_MAX, 0.5 * F32_MAX, 0.0, -0.9 * F32_MAX], [F32_MAX] * 3 + [-F32_MAX] * 2])
    y32 = otloss.soft_sort(x, eps)
    assert torch.isfinite(y32).all()
    assert (y32.diff(dim=-1) >= 0).all()
    y64 = otloss.soft_sort(x.double(), eps)
    assert torch.equal(y32, y64.float())
    for r in range(2):
        ref = pav_soft_sort(x[r].double().numpy(), eps)
        np.testing.assert_allclose(y64[r].numpy(), ref, **tol(torch.float64, "parity", scale=F32_MAX))
        # on the permutahedron: the row sum is kept
        assert float(y64[r].sum()) == approx(float(x[r].double().sum()), torch.float64, "parity", scale=F32_MAX)


def test_float64_values_near_the_float64_maximum():
    big = float(torch.finfo(torch.float64).max)
    x = torch.tensor([big, -big, 0.5 * big, 0.0], dtype=torch.float64)
    for eps in [1e-300, 1e-308, 1.0]:
        out = otloss.soft_sort(x, eps)
        assert torch.isfinite(out).all()
        ref = pav_soft_sort((x / 2.0**64).numpy(), eps * 2.0**64) * 2.0**64  # the oracle on scaled values
        np.testing.assert_allclose(out.numpy(), ref, **tol(torch.float64, "parity", scale=0.0))


@pytest.mark.parametrize("eps", [1e9, 1e30, 1e300])
def test_huge_eps_is_the_row_mean(eps):
    x = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = otloss.soft_sort(x, eps)
    # special: the soft sort at strength eps is the mean plus terms of order n / eps (5e-8 at 1e9), not rounding
    torch.testing.assert_close(out, x.mean(-1, keepdim=True).expand_as(x), rtol=0, atol=1e-6)


@given(arrays(np.float64, st.integers(2, 30), elements=st.sampled_from([-2.0, 0.0, 0.5, 3.0, 40.0])), eps_strategy)
def test_ties(x, eps):
    t = torch.as_tensor(x, dtype=torch.float32)
    y = otloss.soft_sort(t, eps)
    torch.testing.assert_close(
        y.double(), torch.as_tensor(pav_soft_sort(t.double().numpy(), eps)), **tol(torch.float32)
    )
    assert (y.diff() >= 0).all()
    # a row of equal values is returned as it is
    same = torch.full((9,), float(x[0]))
    assert torch.equal(otloss.soft_sort(same, eps), same)


@pytest.mark.parametrize("eps", [0.05, 0.5, 5.0])
def test_batched_rows_equal_rows_one_by_one(eps):
    x = torch.randn(3, 4, 33, generator=torch.Generator().manual_seed(4)) * 5
    out = otloss.soft_sort(x, eps)
    for i in range(3):
        for j in range(4):
            assert torch.equal(out[i, j], otloss.soft_sort(x[i, j], eps))


# ----------------------------------------------------------------------------- no loop per row


def test_rounds_do_not_grow_with_rows_or_cascades(monkeypatch):
    """One block search serves all rows, and a long pooling cascade takes a few rounds, not n."""
    calls = []
    pool, pool_np = sorting._pool, sorting._pool_np
    monkeypatch.setattr(sorting, "_pool", lambda *a: calls.append(1) or pool(*a))
    monkeypatch.setattr(sorting, "_pool_np", lambda *a: calls.append(1) or pool_np(*a))
    cascade = torch.cat([torch.zeros(1, 3000), torch.full((1, 1), 1e6)], dim=1)  # one outlier pools ~half the row
    cascade = torch.cat([cascade, -cascade.flip(-1)])  # and the mirror image
    otloss.soft_sort(cascade, 0.1)
    few = len(calls)
    assert 1 <= few <= 8
    calls.clear()
    out = otloss.soft_sort(cascade.repeat(256, 1), 0.1)
    assert len(calls) == few
    ref = pav_soft_sort(cascade[0].double().numpy(), 0.1)
    np.testing.assert_allclose(out[0].double().numpy(), ref, **tol(torch.float32, "ulp"))
    np.testing.assert_allclose(out[1].double().numpy(), -ref[::-1], **tol(torch.float32, "ulp"))


@pytest.mark.parametrize(
    ("in_numpy", "dense_max"), [(True, 1 << 20), (False, 0), (False, 1 << 20)], ids=["numpy", "torch-lifting", "torch"]
)
@pytest.mark.parametrize("extend_after", [0, 2, 10**9])
def test_every_block_search_variant_matches_the_oracle(monkeypatch, in_numpy, dense_max, extend_after):
    """NumPy or torch; reach by running sums or binary lifting; block extension from the first round or never."""
    monkeypatch.setattr(sorting, "_BLOCKS_IN_NUMPY", in_numpy)
    monkeypatch.setattr(sorting, "_DENSE_EXTEND_MAX", dense_max)
    monkeypatch.setattr(sorting, "_EXTEND_AFTER", extend_after)
    rng = np.random.default_rng(14)
    for _ in range(40):
        n = int(rng.integers(2, 200))
        x = rng.standard_normal((3, n)) * 10 ** rng.uniform(0, 2)
        x[0, -1], x[1, 0] = 1e4, -1e4  # cascades from either end
        eps = float(10 ** rng.uniform(-2, 1))
        out = otloss.soft_sort(torch.as_tensor(x), eps)
        for r in range(3):
            want = pav_soft_sort(x[r], eps)
            np.testing.assert_allclose(out[r].numpy(), want, **tol(torch.float64, scale=1e4 + n / eps))


def test_rows_that_pool_and_rows_that_do_not():
    x = torch.randn(6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    x[1] *= 50  # gaps above 1 / eps: pools
    x[4, 3] = 80.0
    out = otloss.soft_sort(x, 0.2)
    assert torch.equal(out[[0, 2, 3, 5]], torch.sort(x[[0, 2, 3, 5]], dim=-1).values)
    for r in (1, 4):
        assert not torch.equal(out[r], torch.sort(x[r]).values)
        np.testing.assert_allclose(out[r].numpy(), pav_soft_sort(x[r].numpy(), 0.2), **tol(torch.float64, "parity"))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("eps", [0.3, 3.0])
def test_gradcheck_float64_with_pooled_blocks(eps):
    x = (torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3).requires_grad_()
    assert (otloss.soft_sort(x, eps) != torch.sort(x, dim=-1).values).any()  # some blocks pool
    assert torch.autograd.gradcheck(lambda t: otloss.soft_sort(t, eps), (x,))
    assert torch.autograd.gradgradcheck(lambda t: otloss.soft_sort(t, eps), (x,))


def test_the_eager_node_is_the_transformable_node_without_argument_binding():
    # outside torch.func transforms a pooled call goes through _L2SoftSortEager (no setup_context, so
    # Function.apply does not bind arguments through inspect); same outputs and gradients, bitwise
    x = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    w = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = otloss.soft_sort(x.clone().requires_grad_(), 2.0)
    assert type(y.grad_fn).__name__ == "_L2SoftSortEagerBackward"
    outs, grads = [], []
    for node, extra in ((sorting._L2SoftSortEager, (None, None)), (sorting._L2SoftSort, ())):
        a = x.clone().requires_grad_()
        out = node.apply(a, 2.0, True, *extra)
        (g,) = torch.autograd.grad((out[0] * w).sum(), a)
        outs.append(out)
        grads.append(g)
    assert (outs[0][2] != torch.arange(40)).any()  # some blocks pool
    for p, q in zip(outs[0], outs[1]):
        assert torch.equal(p, q)
    assert torch.equal(grads[0], grads[1])


def test_gradient_is_the_block_mean_of_a_non_unit_upstream_gradient():
    x = torch.tensor([0.0, 5.0, 0.3, 9.0, -4.0], dtype=torch.float64, requires_grad=True)
    eps = 0.5  # sorted [-4, 0, 0.3, 5, 9]: three gaps exceed 1 / eps = 2, so blocks pool
    y = otloss.soft_sort(x, eps)
    want = pav_soft_sort(x.detach().numpy(), eps)
    np.testing.assert_allclose(y.detach().numpy(), want, **tol(torch.float64, "parity", scale=0.0))
    w = torch.tensor([1.0, -2.0, 3.0, 0.5, 7.0], dtype=torch.float64)
    (3.0 * (y * w).sum()).backward()
    # finite differences of the oracle along each coordinate
    fd = np.empty(5)
    for i in range(5):
        d = np.zeros(5)
        d[i] = 1e-6
        hi = pav_soft_sort(x.detach().numpy() + d, eps)
        lo = pav_soft_sort(x.detach().numpy() - d, eps)
        fd[i] = 3.0 * ((hi - lo) / 2e-6 * w.numpy()).sum()
    np.testing.assert_allclose(x.grad.numpy(), fd, **tol(torch.float64, "fd"))


@requires_torchsort
@pytest.mark.parametrize("eps", [1e-3, 0.1, 1.0, 10.0, 100.0])
def test_value_and_gradient_agree_with_torchsort_float64(eps):
    import torchsort

    x = (torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 4).requires_grad_()
    w = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ours = otloss.soft_sort(x, eps)
    ref = torchsort.soft_sort(x, regularization="l2", regularization_strength=eps)
    torch.testing.assert_close(ours, ref, **tol(torch.float64))
    (g1,) = torch.autograd.grad((ours * w).sum(), x)
    (g2,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g1, g2, **tol(torch.float64, "grad"))


@requires_torchsort
def test_float32_more_exact_than_torchsort_at_n_1e5():
    import torchsort

    x = torch.randn(1, 100_000, generator=torch.Generator().manual_seed(8)) * 10
    y64 = otloss.soft_sort(x.double(), 1.0)
    ours = (otloss.soft_sort(x, 1.0).double() - y64).abs().max()
    theirs = (torchsort.soft_sort(x, regularization_strength=1.0).double() - y64).abs().max()
    assert ours <= torch.finfo(torch.float32).eps * y64.abs().max()
    assert ours < theirs


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_whose_leading_dimensions_do_not_merge_pool_as_contiguous_ones(dtype):
    # a permuted 3-D input (no [rows, n] view of it exists) and vmap over a middle dimension
    x = (torch.randn(4, 5, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 5).to(dtype)
    xt = x.transpose(0, 1)
    assert not xt.is_contiguous()
    expected = otloss.soft_sort(xt.contiguous(), 2.0)
    assert bool((expected != torch.sort(xt, dim=-1).values).any())  # blocks pool
    assert torch.equal(otloss.soft_sort(xt, 2.0), expected)
    batched = torch.func.vmap(lambda r: otloss.soft_sort(r, 2.0), in_dims=1, out_dims=1)(x)
    assert torch.equal(batched, otloss.soft_sort(x, 2.0))
    xr = xt.detach().requires_grad_()
    (g,) = torch.autograd.grad((otloss.soft_sort(xr, 2.0) * torch.arange(40.0, dtype=dtype)).sum(), xr)
    xc = xt.contiguous().requires_grad_()
    (gc,) = torch.autograd.grad((otloss.soft_sort(xc, 2.0) * torch.arange(40.0, dtype=dtype)).sum(), xc)
    assert torch.equal(g, gc)


def test_vmap_and_func_grad():
    x = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 3
    w = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(10))

    def f(row):
        return otloss.soft_sort(row, 0.7)

    assert torch.equal(torch.func.vmap(f)(x), f(x))
    assert torch.equal(torch.func.vmap(f, in_dims=1, out_dims=1)(x.T), f(x).T)

    def loss(row):
        return (otloss.soft_sort(row, 0.7) * w).sum()

    per_row = torch.func.vmap(torch.func.grad(loss))(x)
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad((otloss.soft_sort(xr, 0.7) * w).sum(), xr)
    torch.testing.assert_close(per_row, expected, **tol(torch.float64, "grad"))
    torch.testing.assert_close(torch.func.grad(loss)(x[0]), expected[0], **tol(torch.float64, "grad"))
    jac = torch.func.jacrev(f)(x[0])
    torch.testing.assert_close(jac.T @ w, expected[0], **tol(torch.float64, "grad"))


def test_vmap_raises_on_nan_with_checks_on():
    x = torch.randn(3, 5)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains non-finite values"):
        torch.func.vmap(lambda r: otloss.soft_sort(r, 0.1))(x)


# ----------------------------------------------------------------------------- NaN / Inf / dtypes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("n", [1, 2, 40])
def test_non_finite_values_raise_naming_x(bad, n):
    x = torch.randn(3, n)
    x[1, n // 2] = bad
    with pytest.raises(ValueError, match=r"x contains non-finite values"):
        otloss.soft_sort(x, 0.1)
    with pytest.raises(ValueError, match=r"x contains non-finite values"):
        otloss.SoftSort(0.1)(x)


def test_finite_values_whose_gaps_overflow_are_accepted():
    x = torch.tensor([F32_MAX, -F32_MAX])  # the float32 gap overflows; the values are finite
    out = otloss.soft_sort(x, 0.1)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_give_nan_with_checks_off(bad):
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(11)) * 5
    x[1, 4] = bad
    x.requires_grad_()
    y = otloss.soft_sort(x, 0.5, validate_args=False)
    assert torch.isnan(y[1]).all()
    clean = torch.cat([x[:1], x[2:]]).detach()
    assert torch.equal(torch.cat([y[:1], y[2:]]), otloss.soft_sort(clean, 0.5))
    y.sum().backward()
    assert torch.isnan(x.grad[1]).all()
    assert torch.isfinite(x.grad[0]).all() and torch.isfinite(x.grad[2]).all()
    # the global default is honoured the same way
    otloss.set_validate_args(False)
    try:
        assert torch.isnan(otloss.soft_sort(x.detach(), 0.5)[1]).all()
    finally:
        otloss.set_validate_args(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_low_precision_is_computed_in_float32(dtype, eps):
    x = (torch.randn(4, 50, generator=torch.Generator().manual_seed(12)) * 4).to(dtype).requires_grad_()
    y = otloss.soft_sort(x, eps)
    assert y.dtype == dtype
    assert torch.equal(y, otloss.soft_sort(x.detach().float(), eps).to(dtype))
    y.float().sum().backward()
    assert x.grad.dtype == dtype
    assert torch.allclose(x.grad.float(), torch.ones(4, 50))  # the Jacobian's columns sum to one


def test_validate_args_type_and_metadata_errors():
    with pytest.raises(TypeError, match="validate_args"):
        otloss.soft_sort(torch.randn(3), 0.1, validate_args="no")
    with pytest.raises(ValueError, match="x must be non-empty"):
        otloss.soft_sort(torch.randn(2, 0), 0.1)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        otloss.soft_sort([1.0, 2.0], 0.1)


# ----------------------------------------------------------------------------- Triton kernel


def _kernel_cases():
    rng = np.random.default_rng(16)
    for n in (1, 2, 7, 33, 64):
        x = rng.standard_normal((3, n)) * 3
        if n > 2:
            x[0, -1] = 200.0  # a cascade
            x[2, : n // 2] = 1.5  # ties
        yield torch.as_tensor(x), float(10 ** rng.uniform(-1.5, 1))


@requires_triton
def test_triton_kernel_matches_the_torch_path(monkeypatch):
    """The CUDA path (kernel block search, no host sync) against the CPU path: on CUDA, or interpreted on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    if device == "cpu":
        monkeypatch.setattr(sorting, "_use_kernel", lambda x: True)
    for x, eps in _kernel_cases():
        for dtype in (torch.float64, torch.float32):
            xd = x.to(device, dtype).detach().clone().requires_grad_()
            ref_x = x.to(dtype).detach().clone().requires_grad_()
            w = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(x.shape[-1]))
            with monkeypatch.context() as m:
                m.setattr(sorting, "_use_kernel", lambda x: False)
                ref = otloss.soft_sort(ref_x, eps)
            out = otloss.soft_sort(xd, eps)
            torch.testing.assert_close(out.cpu(), ref, **tol(dtype))
            (out * w.to(device)).sum().backward()
            (ref * w).sum().backward()
            torch.testing.assert_close(xd.grad.cpu(), ref_x.grad, **tol(dtype, "grad"))
        vm = torch.func.vmap(lambda r, eps=eps: otloss.soft_sort(r, eps))(x.to(device))
        torch.testing.assert_close(vm.cpu(), otloss.soft_sort(x.to(device), eps).cpu(), **tol(torch.float64))
    # NaN and Inf rows with checks off: NaN rows, the others exact; with checks on: the error naming x
    x = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(17)) * 4
    x[1, 3] = float("inf")
    out = otloss.soft_sort(x.to(device), 0.5, validate_args=False).cpu()
    assert torch.isnan(out[1]).all()
    with monkeypatch.context() as m:
        m.setattr(sorting, "_use_kernel", lambda x: False)
        ref = otloss.soft_sort(x[[0, 2]], 0.5)
    torch.testing.assert_close(out[[0, 2]], ref, **tol(torch.float64))
    with pytest.raises(ValueError, match="x contains non-finite values"):
        otloss.soft_sort(x.to(device), 0.5)


def test_import_otloss_does_not_import_the_kernels():
    code = "import sys, otloss; otloss.soft_sort(__import__('torch').randn(4), 1.0); print('otloss.ops.soft_sort' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.requires_cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(13)) * 3
    for eps in [0.1, 1.0]:
        assert torch.equal(otloss.soft_sort(x.cuda(), eps).cpu(), otloss.soft_sort(x, eps))
