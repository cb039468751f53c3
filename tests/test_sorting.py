"""Hard and soft sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import requires_torchsort
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from tolerances import approx, tol

import otloss


def test_hard_sort_is_torch_sort_with_fixed_permutation_gradient():
    x = torch.tensor([3.0, -1.0, 2.0], requires_grad=True)
    vals, idx = otloss.hard_sort(x)
    assert vals.tolist() == [-1.0, 2.0, 3.0] and idx.tolist() == [1, 2, 0]
    (vals * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
    assert x.grad.tolist() == [100.0, 1.0, 10.0]


def test_soft_sort_reference_values():
    x = torch.tensor([[5.0, 1.0, 2.0], [2.0, 1.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(
        otloss.soft_sort(x, 1.0), torch.tensor([[5 / 3, 8 / 3, 11 / 3]] * 2, dtype=torch.float64)
    )
    torch.testing.assert_close(otloss.soft_sort(x, 0.1), torch.tensor([[1.0, 2.0, 5.0]] * 2, dtype=torch.float64))


@given(arrays(np.float64, st.integers(1, 12), elements=st.floats(-20, 20)), st.sampled_from(["l2", "kl"]))
def test_soft_sort_tends_to_hard_sort(x, reg):
    t = torch.as_tensor(x)
    gap = np.diff(np.sort(x))
    eps = 1e-3 / (np.abs(gap).max(initial=0.0) + 1.0)
    out = otloss.soft_sort(t, eps, reg)
    torch.testing.assert_close(out, torch.sort(t).values, **tol(torch.float64))


@given(arrays(np.float64, st.integers(1, 12), elements=st.floats(-20, 20)), st.floats(0.01, 100))
def test_soft_sort_l2_properties(x, eps):
    t = torch.as_tensor(x)
    out = otloss.soft_sort(t, eps)
    assert (torch.diff(out) >= -tol(torch.float64)["atol"]).all()  # sorted
    assert float(out.sum()) == approx(float(t.sum()), torch.float64, "parity")  # on the permutahedron: same sum
    if len(x) > 1 and np.diff(np.sort(x)).max() <= 1 / eps:
        torch.testing.assert_close(out, torch.sort(t).values)  # exact when all gaps <= 1/eps


def test_soft_sort_large_strength_is_the_mean():
    x = torch.randn(4, 7, dtype=torch.float64)
    # special: the l2 soft sort at strength eps is the mean plus terms of order n / eps (3e-9 here), not rounding
    torch.testing.assert_close(otloss.soft_sort(x, 1e9), x.mean(-1, keepdim=True).expand(4, 7), atol=1e-6, rtol=0)


def test_soft_sort_batched_and_low_precision():
    x = torch.randn(2, 3, 9)
    out = otloss.soft_sort(x, 0.5)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], otloss.soft_sort(x[i, j], 0.5))
    xb = x.to(torch.bfloat16)
    ob = otloss.soft_sort(xb, 0.5)
    assert ob.dtype == torch.bfloat16
    # special: one bf16 rounding of the float32 result (<= 2^-9 relative); the bf16 "value" row is looser for |x| > 1.7
    torch.testing.assert_close(ob.float(), otloss.soft_sort(xb.float(), 0.5), atol=0.02, rtol=0.01)


@requires_torchsort
@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("eps", [0.01, 0.3, 1.0, 10.0])
def test_soft_sort_agrees_with_torchsort(reg, eps):
    import torchsort

    x = torch.randn(6, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(int(eps * 100)))
    x = x.requires_grad_(True)
    ours = otloss.soft_sort(x, eps, reg)
    ref = torchsort.soft_sort(x, regularization=reg, regularization_strength=eps)
    torch.testing.assert_close(ours, ref, **tol(torch.float64))
    w = torch.randn(6, 11, dtype=torch.float64)
    (g1,) = torch.autograd.grad((ours * w).sum(), x)
    (g2,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g1, g2, **tol(torch.float64, "grad"))
    via_backend = otloss.soft_sort(x, eps, reg, backend="torchsort")
    torch.testing.assert_close(via_backend, ref)


def test_soft_sort_argument_errors():
    with pytest.raises(ValueError, match="regularization_strength"):
        otloss.SoftSort(0.0)
    with pytest.raises(TypeError, match="regularization_strength"):
        otloss.SoftSort("big")
    with pytest.raises(ValueError, match="regularization"):
        otloss.SoftSort(1.0, "l1")
    with pytest.raises(ValueError, match="backend"):
        otloss.SoftSort(1.0, backend="jax")
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        otloss.soft_sort(torch.arange(3))


def test_ot_with_soft_sort_converges_to_hard():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    cost = otloss.logistic(1.0)
    hard = otloss.ot_h_1d(u, v, cost)
    soft = otloss.ot_h_1d(u, v, cost, sort=otloss.SoftSort(1e-4))
    torch.testing.assert_close(soft, hard)
    with pytest.raises(ValueError, match="soft sort needs uniform weights"):
        otloss.ot_h_1d(u, v, cost, sort="soft", u_weights=torch.ones(3, 8, dtype=torch.float64))
