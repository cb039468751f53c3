r"""Entropic optimal transport between discrete measures, batched and differentiable.

For a cost matrix ``C [n, m]`` and weights ``a [n]``, ``b [m]`` (normalised to sum to one), the entropic plan is

``P_eps = argmin_{P 1 = a, P^T 1 = b, P >= 0} <P, C> + eps * KL(P || a b^T)``

and :func:`entropic_ot` returns its transport cost ``<P_eps, C>`` (the value ``ot.sinkhorn2`` returns), not the
regularised objective. ``eps`` is in the units of the cost: nothing is rescaled by the cost's median or maximum,
so ``eps = 0.1`` means the same thing for every input of a given cost. ``<P_eps, C>`` is at least the exact
optimum and tends to it as ``eps -> 0``. ``eps = 0`` solves the exact linear program with POT's ``ot.emd``.

Solvers (``backend``):

* ``"pot"``: POT's batched log-domain Sinkhorn, ``ot.batch.solve_batch(method="log_sinkhorn")``, torch backend
  (POT >= 0.9.6). It runs under ``torch.no_grad``; the gradient is attached by otloss (see below).
* ``"torch"``: otloss's own log-domain Sinkhorn with potentials kept in the units of the cost, so zero weights
  (padding) give ``-inf`` only inside ``log a``/``log b`` and never in a potential, warm-started by epsilon
  scaling (``max|C|`` halved down to ``eps``); it needs no POT.
* ``"auto"`` (default): POT when it imports, else the torch solver. Both stop on the same rule and give the same
  plan up to ``tol``.

Gradients flow to ``cost`` only (the weights are constants; weights that require grad are rejected):

* ``grad="envelope"`` (default): ``d value / d C = P_eps``, the plan held fixed. This is the exact gradient of the
  regularised objective (envelope theorem); as a derivative of the returned ``<P_eps, C>`` it leaves out the
  term from the plan's own dependence on ``C``, which vanishes as ``eps -> 0``. It costs nothing beyond the
  forward pass.
* ``grad="implicit"``: the exact derivative of ``<P_eps, C>``, by implicit differentiation of the Sinkhorn
  fixed point (a dense ``k x k`` linear solve per problem, ``k = min(n, m)``); this is what ``gradcheck`` sees,
  and what POT's ``ot.sinkhorn2`` (torch backend) gives at convergence by differentiating through its iterations.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import Tensor

from otloss._validation import (
    check_dense_float,
    check_finite,
    check_values_tensor,
    check_weight_values,
    compute_dtype,
    integer,
    normalise_weights,
    real_number,
    resolve_validate,
)

__all__ = ["EXACT_MAX_SIZE", "entropic_ot"]

#: Largest ``n * m`` that ``epsilon = 0`` (the exact LP with ``ot.emd``) accepts per problem.
EXACT_MAX_SIZE = 4_000_000

Backend = Literal["auto", "pot", "torch"]

_SCALING_ITERS = 5  # Sinkhorn iterations per halving of epsilon in the torch solver's warm start
Grad = Literal["envelope", "implicit"]

_POT_HINT = 'pip install "torch-otloss[pot]"'


def _pot_batch():
    """``ot.batch`` or ``None`` when POT (>= 0.9.6, which has ``ot.batch``) is missing."""
    try:
        import ot.batch
    except ImportError:
        return None
    return ot.batch


def _check_real(x: object, name: str, *, positive: bool = False) -> float:
    """A finite real ``>= 0`` (``> 0`` when ``positive``)."""
    x = real_number(x, name)
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return x


def _check_weights(w: object, name: str, batch: int, size: int, unbatched: bool, cost: Tensor, validate: bool):
    """``[B, size]`` normalised weights in the compute dtype (``None`` is uniform)."""
    cdt = compute_dtype(cost.dtype)
    if w is None:
        return torch.full((batch, size), 1.0 / size, dtype=cdt, device=cost.device)
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    check_dense_float(w, name)
    if w.device != cost.device:
        raise ValueError(f"{name} must be on the device of cost ({cost.device}), got {w.device}")
    if w.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but entropic_ot gives gradients to the cost only; pass {name}.detach()"
        )
    expected = f"[{size}]" if unbatched else f"[{size}] or [{batch}, {size}]"
    if w.dim() == 1 and w.shape[0] == size:
        w = w.expand(batch, size)
    elif not unbatched and w.dim() == 2 and tuple(w.shape) == (batch, size):
        pass
    else:
        raise ValueError(f"{name} must have shape {expected} to match cost, got {tuple(w.shape)}")
    if validate:
        check_weight_values(w, name)
    w = normalise_weights(w).to(cdt)  # divided by the row's largest weight first: huge weights cannot overflow
    return w / w.sum(-1, keepdim=True)


def _marginal_error(plan: Tensor, a: Tensor, b: Tensor) -> float:
    """Largest L1 marginal violation over the batch (rows and columns)."""
    ea = (plan.sum(-1) - a).abs().sum(-1)
    eb = (plan.sum(-2) - b).abs().sum(-1)
    return float(torch.maximum(ea, eb).max())


def _warn_unless_converged(plan: Tensor, a: Tensor, b: Tensor, max_iter: int, tol: float, stacklevel: int) -> None:
    """Warn (``RuntimeWarning``) when the plan's marginal error is not below ``10 * tol``.

    ``stacklevel`` counts from the caller of this function, as for :func:`warnings.warn`.
    """
    err = _marginal_error(plan, a, b)
    if not err < 10 * tol:
        warnings.warn(
            f"entropic_ot: Sinkhorn did not converge in max_iter={max_iter} iterations (marginal error "
            f"{err:.3g} > tol={tol:g}); raise max_iter or epsilon",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )


def _sinkhorn_torch(
    C: Tensor, a: Tensor, b: Tensor, eps: float, max_iter: int, tol: float, init: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Log-domain Sinkhorn; potentials ``f, g`` in cost units. Returns the plan ``[B, n, m]`` and ``f [B, n]``.

    ``init``: starting row potentials ``f`` (for example from a nearby problem); skips the epsilon scaling.
    """
    log_a, log_b = a.log(), b.log()  # -inf on zero weights
    neg = C / -eps  # [B, n, m]; the closures below read neg and eps as they change

    def update_f(g: Tensor) -> Tensor:  # f_i = -eps LSE_j(log b_j + (g_j - C_ij) / eps); finite even where a_i = 0
        return -eps * torch.logsumexp(neg + (g / eps + log_b).unsqueeze(-2), dim=-1)

    def update_g(f: Tensor) -> Tensor:
        return -eps * torch.logsumexp(neg + (f / eps + log_a).unsqueeze(-1), dim=-2)

    # epsilon scaling: warm-start the potentials (kept in cost units) through eps_k = max|C| / 2^k down to eps,
    # a few iterations each; the fixed point is that of eps alone, reached far sooner when max|C| / eps is large
    f = torch.zeros_like(a) if init is None else init.clone()
    target = eps
    # (the largest finite |C|: an infinite entry, a forbidden pair or an overflow, would never halve down to eps)
    eps = target if init is not None else max(target, float(C.abs().nan_to_num(posinf=0.0).amax()))
    while eps > target:
        neg = C / -eps
        for _ in range(_SCALING_ITERS):
            f = update_f(update_g(f))
        eps = max(target, eps / 2)
    eps, neg = target, C / -target
    f = update_f(update_g(f))
    for it in range(max_iter):
        g = update_g(f)  # the columns of the plan (f, g) are now exact
        f_next = update_f(g)
        if it % 10 == 9 or it == max_iter - 1:
            # row sums of the plan (f, g) are a_i exp((f_i - f_next_i) / eps): the check costs no extra pass
            err = (a * torch.expm1((f - f_next) / eps)).abs().sum(-1).max()
            if float(err) < tol:
                break
        f = f_next
    return torch.exp(neg + (f / eps + log_a).unsqueeze(-1) + (g / eps + log_b).unsqueeze(-2)), f


def _sinkhorn_pot(C: Tensor, a: Tensor, b: Tensor, eps: float, max_iter: int, tol: float) -> Tensor:
    batch = _pot_batch()
    # POT stops when the L2 norm of the row-marginal error is < its tol; tol / sqrt(n) bounds the L1 error by tol.
    res = batch.solve_batch(
        C, eps, a=a, b=b, max_iter=max_iter, tol=tol / math.sqrt(C.shape[-2]), method="log_sinkhorn", grad="detach"
    )
    return res.plan


def _emd(C: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Exact plans with ``ot.emd``, one problem at a time, zero-weight rows and columns dropped."""
    try:
        import ot
    except ImportError:
        raise ImportError(f"entropic_ot with epsilon=0 solves the exact LP with POT: {_POT_HINT}") from None
    n, m = C.shape[-2:]
    if n * m > EXACT_MAX_SIZE:
        raise ValueError(
            f"epsilon=0 (exact LP) is for small problems: n * m = {n} * {m} exceeds "
            f"otloss.entropic.EXACT_MAX_SIZE = {EXACT_MAX_SIZE}; pass epsilon > 0"
        )
    plans = torch.zeros_like(C)
    for k in range(C.shape[0]):
        ia = torch.nonzero(a[k] > 0).squeeze(-1)
        ib = torch.nonzero(b[k] > 0).squeeze(-1)
        sub = C[k][ia][:, ib].double().cpu().numpy()
        aa = a[k][ia].double().cpu().numpy()
        bb = b[k][ib].double().cpu().numpy()
        aa, bb = aa / aa.sum(), bb / bb.sum()
        p = ot.emd(aa, bb, sub, numItermax=10_000_000)
        plans[k, ia[:, None], ib[None, :]] = torch.as_tensor(p, dtype=C.dtype, device=C.device)
    return plans


def _implicit_grad(P: Tensor, C: Tensor, a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Exact ``d <P_eps(C), C> / d C`` by implicit differentiation of the Sinkhorn optimality conditions.

    With ``r = (P * C) 1``, ``c = (P * C)^T 1`` and ``[x; y]`` solving ``[[diag a, P], [P^T, diag b]] [x; y] = [r; c]``
    (consistent and singular along ``(1, -1)``), the gradient is ``P + P * (x_i + y_j - C_ij) / eps``.
    """
    if P.shape[-2] < P.shape[-1]:
        return _implicit_grad(P.transpose(-1, -2), C.transpose(-1, -2), b, a, eps).transpose(-1, -2)
    dt = torch.float64
    P64, C64, a64, b64 = P.to(dt), C.to(dt), a.to(dt), b.to(dt)
    r = (P64 * C64).sum(-1)
    c = (P64 * C64).sum(-2)
    inv_a = torch.where(a64 > 0, 1.0 / a64.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(a64))
    # Schur complement on the columns: (diag b - P^T diag(1/a) P) y = c - P^T (r / a); x = (r - P y) / a
    S = torch.diag_embed(b64) - P64.transpose(-1, -2) @ (P64 * inv_a.unsqueeze(-1))
    rhs = c - (P64.transpose(-1, -2) @ (r * inv_a).unsqueeze(-1)).squeeze(-1)
    support = (b64 > 0).to(dt)
    k = support.sum(-1, keepdim=True).unsqueeze(-1)
    # S is PSD with null space span(1) on the support: adding 1 1^T / k (and 1 on zero-weight columns) makes it
    # definite without changing the solution orthogonal to 1, and the gradient is invariant to that constant.
    S = S + support.unsqueeze(-1) * support.unsqueeze(-2) / k + torch.diag_embed(1.0 - support)
    y = torch.linalg.solve(S, rhs.unsqueeze(-1)).squeeze(-1)
    x = (r - (P64 @ y.unsqueeze(-1)).squeeze(-1)) * inv_a
    G = P64 + P64 * (x.unsqueeze(-1) + y.unsqueeze(-2) - C64) / eps
    return G.to(P.dtype)


class _EntropicValue(torch.autograd.Function):
    """``<P, C>`` with the plan computed outside; the backward gives the chosen gradient."""

    @staticmethod
    def forward(ctx, C: Tensor, P: Tensor, a: Tensor, b: Tensor, eps: float, grad: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(C, P, a, b)
        ctx.eps, ctx.grad = eps, grad
        return (P * C).sum((-2, -1))

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        C, P, a, b = ctx.saved_tensors
        G = P if ctx.grad == "envelope" or ctx.eps == 0 else _implicit_grad(P, C, a, b, ctx.eps)
        return grad_out[:, None, None] * G, None, None, None, None, None


def entropic_ot(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    epsilon: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    return_plan: bool = False,
    backend: Backend = "auto",
    grad: Grad = "envelope",
    validate_args: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Transport cost ``<P_eps, C>`` of the entropic optimal plan, for one problem or a batch.

    Args:
        cost: ``[batch, n, m]`` or ``[n, m]`` cost matrix ``C[i, j] = c(x_i, y_j)``; finite. Build it from
            differentiable points and the gradient reaches them.
        a: weights of the rows, ``[batch, n]``, ``[n]`` (shared by every problem) or ``None`` (uniform).
            Non-negative, not all zero; normalised to sum to one in each problem, so they need not sum to one.
            Zero weights are allowed (padding): a zero-weight row gets no mass, and the result equals that of the
            problem without it.
        b: likewise for the columns, ``[batch, m]``, ``[m]`` or ``None``.
        epsilon: entropic strength ``eps >= 0``, in the units of the cost (never rescaled). ``0`` solves the
            exact LP with POT's ``ot.emd`` (needs POT; ``n * m`` up to ``EXACT_MAX_SIZE`` per problem).
            Small ``eps`` needs more iterations: the number grows roughly like ``max|C| / eps``.
        max_iter: at most this many Sinkhorn iterations at ``epsilon`` (default 1000); a ``RuntimeWarning`` says
            when the plan's marginals are still off by more than ``10 * tol`` (L1) after them. The torch solver
            first warms its potentials up with 5 iterations per halving of ``epsilon`` from ``max|C|``, not counted.
        tol: stop when the L1 norm of the row-marginal error is below ``tol`` in every problem (checked every 10
            iterations; default ``1e-6``, about the float32 floor).
        return_plan: also return the plan ``[batch, n, m]`` (carries no gradient).
        backend: ``"auto"`` (POT's batched log-domain Sinkhorn when POT imports, else the torch solver),
            ``"pot"`` (raises ``ImportError`` without POT) or ``"torch"``.
        grad: ``"envelope"`` (default): the gradient with respect to ``cost`` is the plan ``P_eps`` (exact for the
            regularised objective); ``"implicit"``: the exact derivative of ``<P_eps, C>`` (a dense
            ``min(n, m)``-sized solve per problem in the backward pass; ``ot.sinkhorn2``'s gradient at convergence).
        validate_args: scan for NaN/Inf and bad weights (a host sync on GPU); ``None`` uses
            :func:`otloss.get_validate_args`.

    Returns:
        The transport cost ``[batch]`` (a 0-d tensor for ``[n, m]`` input) in the dtype of ``cost``, computed in
        float32 (float64 for float64 input); with ``return_plan=True``, the tuple ``(value, plan)``.

    Example:
        >>> x, y = torch.randn(5, 2), torch.randn(7, 2)
        >>> value = entropic_ot(torch.cdist(x, y) ** 2, epsilon=0.1)
    """
    validate = resolve_validate(validate_args)
    check_values_tensor(cost, "cost", min_dim=2)
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must have shape [n, m] or [batch, n, m], got {tuple(cost.shape)}")
    eps = _check_real(epsilon, "epsilon")
    max_iter = integer(max_iter, "max_iter")
    if max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter}")
    tol = _check_real(tol, "tol", positive=True)
    if backend not in ("auto", "pot", "torch"):
        raise ValueError(f"backend must be 'auto', 'pot' or 'torch', got {backend!r}")
    if grad not in ("envelope", "implicit"):
        raise ValueError(f"grad must be 'envelope' or 'implicit', got {grad!r}")
    if not isinstance(return_plan, bool):
        raise TypeError(f"return_plan must be a bool, got {type(return_plan).__name__}")
    unbatched = cost.dim() == 2
    C3 = cost.unsqueeze(0) if unbatched else cost
    B, n, m = C3.shape
    aw = _check_weights(a, "a", B, n, unbatched, C3, validate)
    bw = _check_weights(b, "b", B, m, unbatched, C3, validate)
    if validate:
        check_finite(cost, "cost")
    cdt = compute_dtype(cost.dtype)
    Cc = C3.to(cdt)
    with torch.no_grad():
        Cd = Cc.detach()
        if Cd.device.type == "meta":  # no values to solve for: the plan's shape only
            plan = torch.empty_like(Cd)
        elif eps == 0:
            plan = _emd(Cd, aw, bw)
        else:
            use_pot = backend == "pot" or (backend == "auto" and _pot_batch() is not None)
            if backend == "pot" and _pot_batch() is None:
                raise ImportError(f"backend='pot' needs POT >= 0.9.6 (ot.batch): {_POT_HINT}, or backend='torch'")
            if use_pot:
                plan = _sinkhorn_pot(Cd, aw, bw, eps, max_iter, tol)
            else:
                plan, _ = _sinkhorn_torch(Cd, aw, bw, eps, max_iter, tol)
            _warn_unless_converged(plan, aw, bw, max_iter, tol, stacklevel=2)
    value = _EntropicValue.apply(Cc, plan, aw, bw, eps, grad)
    value = value.to(cost.dtype)
    plan = plan.to(cost.dtype)
    if unbatched:
        value, plan = value[0], plan[0]
    return (value, plan) if return_plan else value
