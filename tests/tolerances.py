"""The one tolerance table of the test suite.

Every comparison between two computations of the same quantity takes its ``rtol``/``atol`` from here::

    from tolerances import tol

    torch.testing.assert_close(ours, ref, **tol(torch.float32, "value"))

The key is the dtype the computation under test runs in, and the kind of comparison:

- ``"value"``: a loss, a plan or a sorted tensor against a float64 oracle (POT, SciPy, the quantile integral).
- ``"grad"``: a gradient against a float64 oracle; gradients pass through one more cancellation than values.
- ``"parity"``: two implementations of the same computation in one dtype that differ only in the order of their
  sums: TRL's AOT formula written out against ours in float64; a whole model's loss and parameter gradients
  computed by TRL's trainer and by ours, or by FSDP and one process, in float32.
- ``"ulp"``: one result that is only rounded a few times, with no sum to accumulate error (a mass 1/6, a cost's
  value at one point): a few units in the last place, relative.
- ``"kernel"``: a Triton kernel against the PyTorch path in float32; both sum blocks of a row in different orders.
- ``"sinkhorn"``: two log-domain Sinkhorn solves of the same problem, each run to a marginal error <= 1e-12.
- ``"fd"``: an analytic gradient against central finite differences in float64 (also ``gradcheck``'s tolerance).

``scale`` multiplies ``atol`` when the compared quantities are far from 1 (costs of size ``z**p``, say);
``scale=0.0`` keeps only the relative part.
``approx`` is the same table for ``pytest.approx``.

Low precision (bf16, fp16) is judged against PyTorch's own error at that precision, not against a fixed number:
see :func:`assert_within_lowp_error`.
"""

from __future__ import annotations

import pytest
import torch

__all__ = ["TOLERANCES", "approx", "assert_within_lowp_error", "tol"]

# (dtype, kind) -> (rtol, atol, reason)
TOLERANCES: dict[tuple[torch.dtype, str], tuple[float, float, str]] = {
    (torch.float64, "value"): (1e-10, 1e-10, "sorting is exact; a mean of n terms loses ~n*eps64 relative"),
    (torch.float64, "grad"): (1e-10, 1e-10, "the gradient is h'(z)/n per element, as exact as the value"),
    (torch.float64, "parity"): (1e-12, 1e-12, "same float64 formula, only the order of a few sums differs"),
    (torch.float32, "value"): (1e-5, 1e-5, "float32 inputs carry 6e-8 relative error; sums of <=1e5 terms ~1e-5"),
    (torch.float32, "grad"): (1e-5, 1e-6, "per-element h'(z)/n in float32; atol covers h'~0 entries"),
    (torch.float32, "parity"): (
        1e-5,
        1e-6,
        "two float32 backward passes through a model sum in different orders: observed up to 3e-8 on O(1) grads",
    ),
    (torch.float64, "ulp"): (4 * torch.finfo(torch.float64).eps, 0.0, "a few roundings of one result, no sum"),
    (torch.float32, "ulp"): (4 * torch.finfo(torch.float32).eps, 0.0, "a few roundings of one result, no sum"),
    (torch.float32, "kernel"): (
        2e-5,
        2e-6,
        "kernel and PyTorch path sum rows of up to 16k float32 terms in different block orders",
    ),
    (torch.float64, "sinkhorn"): (
        1e-8,
        1e-9,
        "two Sinkhorn solves stopped at marginal error <= 1e-12 agree to ~1e-9 on O(1) values, plans and gradients",
    ),
    (torch.float64, "fd"): (
        1e-6,
        1e-8,
        "central differences, step 1e-5..1e-6: truncation ~h^2, rounding ~eps/h, a solver's stopping error / h",
    ),
    (torch.bfloat16, "value"): (1.6e-2, 1e-2, "bf16 has 8 mantissa bits (eps 7.8e-3); two roundings"),
    (torch.float16, "value"): (2e-3, 1e-3, "fp16 has 11 mantissa bits (eps 9.8e-4); two roundings"),
}


def tol(dtype: torch.dtype, kind: str = "value", *, scale: float = 1.0) -> dict[str, float]:
    """``{"rtol": ..., "atol": ...}`` for a computation in ``dtype`` compared as ``kind``; ``atol`` times ``scale``."""
    if kind == "grad" and (dtype, kind) not in TOLERANCES:
        kind = "value"
    try:
        rtol, atol, _ = TOLERANCES[(dtype, kind)]
    except KeyError:
        raise KeyError(
            f"no tolerance for ({dtype}, {kind!r}); add a row with its reason to tests/tolerances.py"
        ) from None
    return {"rtol": rtol, "atol": atol * scale}


def approx(expected, dtype: torch.dtype, kind: str = "value", *, scale: float = 1.0):
    """``pytest.approx(expected)`` with the table's ``rtol``/``atol`` for ``(dtype, kind)`` as ``rel``/``abs``."""
    t = tol(dtype, kind, scale=scale)
    return pytest.approx(expected, rel=t["rtol"], abs=t["atol"])


def assert_within_lowp_error(ours: torch.Tensor, torch_lowp: torch.Tensor, exact: torch.Tensor, factor: float = 2.0):
    """Low precision passes when its error is at most ``factor`` times PyTorch's own error at that precision.

    ``torch_lowp`` is the plain PyTorch formula run in the low dtype, ``exact`` the float64 result. A floor of one
    ulp of the result's magnitude keeps an exactly right PyTorch result from demanding perfection.
    """
    exact = exact.double()
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (torch_lowp.double() - exact).abs().max().item()
    ulp = torch.finfo(ours.dtype).eps * max(exact.abs().max().item(), 1.0)
    bound = factor * max(err_torch, ulp)
    if not err_ours <= bound:
        raise AssertionError(f"{ours.dtype} error {err_ours:.3g} exceeds {factor} x PyTorch's error ({err_torch:.3g})")
