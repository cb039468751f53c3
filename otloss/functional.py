"""Functional API: ``ot_h_1d``, ``fsd_violation`` and ``aot_loss``.

Every function validates its inputs, computes in float32 (float64 for float64
inputs) and returns a result in the dtype of its first input.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from otloss._reference import SortedOT, check_sum, functorch_active, sort_with_index
from otloss._validation import (
    NonFiniteError,
    as_bool,
    check_finite,
    check_pair,
    check_same_dtype_device,
    check_values_tensor,
    compute_dtype,
    get_validate_args,
    plain_values,
    real_number,
    resolve_validate,
    type_name,
    vmap_active,
)
from otloss.costs import Cost, ZeroOne, get_cost, hinge, logistic, squared_hinge, zero_one
from otloss.coupling import merge_sorted_weights, merged_cost
from otloss.distributed import (
    QuantileMemory,
    check_global_options,
    check_local_values,
    prepare_global_batch,
    rollback_on_error,
)
from otloss.sorting import SoftSort

__all__ = ["AOT_DEFAULT_BETA", "aot_loss", "fsd_violation", "ot_h_1d"]

#: ``beta`` of :func:`aot_loss` when none is given: the paper's value on sequence log-ratios (Section 4).
#: The ``logistic`` cost itself defaults to ``beta = 1`` (a unit scale for a generic loss on any values).
AOT_DEFAULT_BETA = 0.01

SortArg = Literal["hard", "soft"] | SoftSort
Reduction = Literal["none", "mean", "sum"]
Backend = Literal["auto", "torch", "triton"]
CostArg = str | Cost | Callable[[Tensor], Tensor]


def _resolve_sort(sort: object) -> SoftSort | None:
    """``None`` means hard sort."""
    if isinstance(sort, SoftSort):
        return sort
    if isinstance(sort, str) and sort == "hard":
        return None
    if isinstance(sort, str) and sort == "soft":
        return SoftSort()
    raise ValueError(f"sort must be 'hard', 'soft' or a SoftSort, got {sort!r}")


def _use_triton(backend: object, u: Tensor, v: Tensor, cost: Cost, weighted: bool, soft: bool) -> bool:
    """Pick the fused kernel or the reference by named checks (see ``otloss.ops.unsupported_reason``)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or (backend == "auto" and not u.is_cuda):
        return False
    from otloss.ops import unsupported_reason

    reason = unsupported_reason(u, v, cost, weighted, soft)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this problem: {reason}")
        return True
    return reason is None and u.is_cuda


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without the dispatch when it is already that dtype (the hot path of small batches)."""
    return x if x.dtype == dtype else x.to(dtype)


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if rows.dim() == 0:  # one problem: every reduction is the identity
        return rows
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


_REDUCTIONS = frozenset(("none", "mean", "sum"))
_BACKENDS = frozenset(("auto", "torch", "triton"))


def _check_reduction(reduction: object) -> None:
    if not isinstance(reduction, str) or reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _check_backend(backend: object) -> None:
    if not isinstance(backend, str) or backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def _check_options(
    sort: object,
    reduction: object,
    backend: object,
    validate_args: object,
    global_batch: object,
    group: object,
    memory: object,
) -> tuple[SoftSort | None, bool, bool]:
    """Every option shared by the losses, checked before any work; the modules call it in ``__init__``.

    Returns ``(sorter, validate, global_batch)``: ``sorter`` is ``None`` for hard sort.
    """
    if (
        sort.__class__ is str
        and sort == "hard"
        and reduction.__class__ is str
        and reduction in _REDUCTIONS
        and backend.__class__ is str
        and backend in _BACKENDS
        and global_batch is False
        and group is None
        and memory is None
    ):  # the common call, decided without the checks below (which would all pass)
        return None, resolve_validate(validate_args), False  # type: ignore[arg-type]
    sorter = _resolve_sort(sort)
    _check_reduction(reduction)
    _check_backend(backend)
    validate = resolve_validate(validate_args)  # type: ignore[arg-type]
    return sorter, validate, check_global_options(global_batch, group, memory)


def _nan_unless_valid(
    out: Tensor, u: Tensor, v: Tensor, a: Tensor | None, b: Tensor | None, raise_checks: Callable[[], None]
) -> Tensor:
    """The value checks under ``torch.func.vmap``: NaN for each problem that fails them, values and derivatives.

    ``a`` and ``b`` are the weights after :func:`~otloss._validation.check_weights` (divided by the
    largest magnitude of their row, so signs and non-finite entries are kept). When the values are not
    batched (``jacfwd`` and ``hessian`` run ``vmap`` over the tangents only), the check can be read as in
    an eager call, and a failing one runs ``raise_checks``, which raises the eager call's error.
    Otherwise the output is multiplied by 1 (each valid problem: bitwise unchanged) or NaN, so that
    tangents and gradients of a failing problem are NaN too, not the zeros ``where`` would give.
    """
    ok = torch.isfinite(u).all(-1) & torch.isfinite(v).all(-1)
    for w in (a, b):
        if w is not None:
            ok = ok & torch.isfinite(w).all(-1) & (w >= 0).all(-1)
    if out.dim() == 0:
        ok = ok.all()
    try:
        valid = bool(ok.all())
    except RuntimeError as e:  # batched values: vmap has no data-dependent control flow
        if "vmap" not in str(e):
            raise
    else:
        if valid:
            return out
        raise_checks()  # the eager call's error
    # batched values (or, defensively, a failed check that did not raise): NaN for each failing problem
    return out * torch.where(ok, torch.ones_like(out), torch.full_like(out, float("nan")))


def _ot_rows(
    u: Tensor,
    v: Tensor,
    cost: Cost,
    a: Tensor | None,
    b: Tensor | None,
    sorter: SoftSort | None,
    check_values: Callable[[], None] | None,
    u2: Tensor | None = None,
    v2: Tensor | None = None,
) -> Tensor:
    """``OT_h`` of every row of ``u - u2`` and ``v - v2`` (``None``: no subtraction).

    Inputs already checked (but for their values) and in the compute dtype; ``u2``/``v2`` only
    with uniform weights and hard sort (paired AOT's margins, subtracted inside the loss node).
    ``check_values`` scans the caller's named inputs for NaN/Inf and raises; on the hard-sort,
    equal-size path it runs only when the loss node's probe (the loss, or the sum of the sorted
    differences; :func:`otloss._reference.finite_probe`) is not finite (any non-finite input makes
    it so), saving a pass over the inputs.
    """
    n, m = u.shape[-1], v.shape[-1]
    uniform = a is None and b is None and n == m
    if sorter is None and uniform:
        # one autograd node with h' computed in the forward; under torch.func transforms (grad, jacrev,
        # vmap) the plain graph below instead, which they all support (sort_with_index then uses torch.sort)
        if cost.dh is not None and torch.is_grad_enabled() and _any_requires_grad(u, v, u2, v2):
            if torch.compiler.is_compiling() or not functorch_active():
                if u2 is None and v2 is None:
                    return SortedOT.apply(u, v, cost, check_values)
                return SortedOT.apply(u, v, cost, check_values, u2, v2)
        if u2 is not None:
            u = u - u2
        if v2 is not None:
            v = v - v2
        z = sort_with_index(u)[0] - sort_with_index(v)[0]
        check_sum(z, check_values)
        return cost(z).mean(dim=-1)
    if u2 is not None or v2 is not None:
        raise ValueError("u2 and v2 need equal sizes, uniform weights and hard sort")  # internal misuse
    if check_values is not None:
        check_values()
    if sorter is not None:  # soft sort: uniform weights; the values were checked above (or checks are off)
        us, vs = sorter(u, validate_args=False), sorter(v, validate_args=False)
        if uniform:
            return cost(us - vs).mean(dim=-1)
        a, b = torch.ones_like(u), torch.ones_like(v)
    else:
        us, pu = sort_with_index(u)
        vs, pv = sort_with_index(v)
        a = torch.ones_like(u) if a is None else a.to(u.dtype).gather(-1, pu)
        b = torch.ones_like(v) if b is None else b.to(v.dtype).gather(-1, pv)
    iu, iv, mass = merge_sorted_weights(a, b)
    rows = merged_cost(mass, cost(us.gather(-1, iu) - vs.gather(-1, iv)))
    # a fraction of the quantiles: the rounded interval masses may sum to an ulp above 1
    return rows.clamp_max(1.0) if type(cost) is ZeroOne else rows


def _any_requires_grad(u: Tensor, v: Tensor, u2: Tensor | None, v2: Tensor | None) -> bool:
    return (
        u.requires_grad
        or v.requires_grad
        or (u2 is not None and u2.requires_grad)
        or (v2 is not None and v2.requires_grad)
    )


def _finite_check(*named: tuple[Tensor, str]) -> Callable[[], None]:
    def check() -> None:
        for t, name in named:
            check_finite(t, name)

    return check


def ot_h_1d(
    u: Tensor,
    v: Tensor,
    cost: CostArg,
    *,
    u_weights: Tensor | None = None,
    v_weights: Tensor | None = None,
    sort: SortArg = "hard",
    reduction: Reduction = "mean",
    validate_args: bool | None = None,
    global_batch: bool = False,
    group: object | None = None,
    memory: QuantileMemory | None = None,
    backend: Backend = "auto",
) -> Tensor:
    r"""Optimal-transport cost ``OT_h(mu, nu)`` between two empirical measures on the line.

    ``OT_h(mu, nu) = min_gamma E_gamma[h(u - v)] = \int_0^1 h(Q_mu(t) - Q_nu(t)) dt``
    for convex ``h`` (Santambrogio's identity). With equal sizes and uniform weights
    this is ``mean_i h(u_(i) - v_(i))`` after sorting both rows.

    Args:
        u: ``[..., n]`` atoms of ``mu``; every leading index is an independent problem.
        v: ``[..., m]`` atoms of ``nu``; same leading dimensions, same dtype and device.
            ``n != m`` is allowed (quantile coupling).
        cost: a :class:`~otloss.Cost`, a built-in name (``"logistic"`` means beta 1)
            or a callable ``h(z)`` with ``z = u - v``.
        u_weights: optional ``[..., n]`` non-negative weights (broadcastable), normalised
            per row. ``None`` is uniform.
        v_weights: likewise for ``v``.
        sort: ``"hard"`` (gradient with the permutation held fixed), ``"soft"``
            (:class:`~otloss.SoftSort` with the paper's strength 0.1) or a
            ``SoftSort``. Soft sort requires uniform weights.
        reduction: over the batch of rows: ``"mean"`` (default), ``"sum"`` or ``"none"``
            (a ``[...]`` tensor of per-row costs). A 1-D problem gives a scalar.
        validate_args: check for NaN/Inf values and bad weights (a host sync on GPU).
            ``None`` uses :func:`otloss.get_validate_args`. When off, a row holding NaN
            gives NaN and no error is raised.
        global_batch: all-gather ``u``, ``v`` (and weights) from every rank of
            ``group`` along the last dimension and compute the loss on the global
            batch; the local last dimension may differ across ranks and be 0. The
            value is the global loss on every rank; the gradient to the local
            elements is scaled by the group size so that DDP/FSDP averaging gives
            the single-process gradient (see :mod:`otloss.distributed`). Needs an
            initialised process group (``RuntimeError`` otherwise).
        group: the process group for ``global_batch=True``; ``None`` is the default group.
        memory: a :class:`~otloss.QuantileMemory` holding the earlier micro-batches of
            this optimizer step (gradient accumulation); ``None`` keeps none.
        backend: ``"auto"`` (default) runs the fused Triton kernel for CUDA tensors when
            triton imports and the problem is supported (equal sizes, uniform weights,
            hard sort, float32/16 inputs, a built-in cost other than ``zero_one``,
            rows up to ``otloss.ops.MAX_FUSED_SIZE``), else the PyTorch reference;
            ``"torch"`` always uses the reference; ``"triton"`` requires the kernel and
            raises ``ValueError`` with the reason and the fix when it cannot run.

    Returns:
        A tensor in the dtype of ``u`` (computed in float32, or float64 for float64
        input). With a metric-only cost (``zero_one``) it carries no gradient.
        For a non-convex ``h`` (such as ``zero_one``) the result is the quantile
        integral ``\int_0^1 h(Q_mu - Q_nu) dt``, which is what the FSD measures
        need, and may exceed the transport minimum. Values follow IEEE arithmetic
        in the compute dtype: a cost that overflows gives ``inf``.
    """
    if (
        isinstance(cost, Cost)
        and cost.dh is not None
        and cost.differentiable
        and sort.__class__ is str
        and sort == "hard"
        and u_weights is None
        and v_weights is None
        and global_batch is False
        and memory is None
        and group is None
        and (validate_args is None or validate_args.__class__ is bool)
        and _lean((u, v), reduction, backend)
    ):  # the common training call: straight to the loss node (every check below would pass)
        validate = get_validate_args() if validate_args is None else validate_args
        return SortedOT.apply(
            u, v, cost, _finite_check((u, "u"), (v, "v")) if validate else None, None, None, reduction
        )
    sorter, validate, global_batch = _check_options(
        sort, reduction, backend, validate_args, global_batch, group, memory
    )
    cost = get_cost(cost)
    if (
        sorter is None
        and u_weights is None
        and v_weights is None
        and not global_batch
        and memory is None
        and plain_values((u, v))
        and u.shape[:-1] == v.shape[:-1]
    ):  # every metadata check of check_pair passes: try the loss node directly
        out = _node(u, v, cost, validate, reduction, backend, ((u, "u"), (v, "v")))
        if out is not None:
            return out
    return _ot_h_1d(u, v, cost, u_weights, v_weights, sorter, validate, reduction, global_batch, group, memory, backend)


def _lean(tensors: tuple[object, ...], reduction: object, backend: object) -> bool:
    """Whether a call may go straight to the loss node: the plain eager training call on the CPU.

    ``tensors`` are dense CPU float32/float64 tensors of one shape and dtype, at least one requires
    grad, grad mode is on, no ``torch.func`` transform or compilation runs, ``reduction`` is valid and
    ``backend`` is ``"auto"`` or ``"torch"``. Then every check of the general path passes and that path
    ends in the same :class:`SortedOT` call (``tests/test_overhead.py``); these attribute tests replace
    it. Anything else (including every error) takes the general path, which names what fails.
    """
    if not (reduction.__class__ is str and reduction in _REDUCTIONS and (backend == "auto" or backend == "torch")):
        return False
    first = tensors[0]
    if not isinstance(first, Tensor) or first.is_nested:  # (a nested tensor has no .shape)
        return False
    dtype, shape = first.dtype, first.shape
    if not ((dtype is torch.float32 or dtype is torch.float64) and len(shape) > 0 and first.numel() > 0):
        return False
    grad = False
    for t in tensors:
        if not (
            isinstance(t, Tensor)
            and t.dtype is dtype
            and t.is_cpu
            and not t.is_nested
            and t.layout is torch.strided
            and t.shape == shape
        ):
            return False
        grad = grad or t.requires_grad
    return grad and torch.is_grad_enabled() and not functorch_active() and not torch.compiler.is_compiling()


def _lean_paired(
    pc: object,
    pr: object,
    rc: object,
    rr: object,
    cost: str,
    beta: object,
    label_smoothing: object,
    reduction: object,
    validate_args: bool | None,
    backend: object,
) -> Tensor | None:
    """Paired hard-sort AOT through :func:`_lean` with a cost already built (cached), or ``None``."""
    if not (
        beta.__class__ in _KEY_TYPES
        and label_smoothing.__class__ in _KEY_TYPES
        and _lean((pc, pr, rc, rr), reduction, backend)
    ):
        return None
    h = _AOT_COST_CACHE.get((cost, _number_key(beta), _number_key(label_smoothing)))
    if h is None or h.dh is None or not h.differentiable:  # the first call builds (and validates) the cost
        return None
    validate = get_validate_args() if validate_args is None else validate_args
    check = _finite_check(*zip((pc, pr, rc, rr), _AOT_NAMES)) if validate else None
    return SortedOT.apply(pc, rc, h, check, pr, rr, reduction)


_AOT_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
_NO_MEMORY = contextlib.nullcontext()
_NODE_DTYPES = (torch.float32, torch.float64)  # the compute dtypes: no cast on the way in or out


def _node(
    u: Tensor,
    v: Tensor,
    cost: Cost,
    validate: bool,
    reduction: str,
    backend: str,
    named: tuple[tuple[Tensor, str], ...],
    u2: Tensor | None = None,
    v2: Tensor | None = None,
) -> Tensor | None:
    """The common call straight to the loss node, or ``None`` when :func:`_ot_h_1d` must decide.

    Inputs metadata-checked, on the local batch, uniform weights and hard sort (``u2``/``v2``: paired
    AOT's margins). Taken exactly when :func:`_ot_h_1d` would end in :class:`SortedOT` without a cast
    (the reference backend, a float32/float64 input, equal sizes, a differentiable cost with ``dh``,
    a gradient to compute, no ``torch.func`` transform, no compilation, real values); the value check
    and the result are then the same, without the layers in between.
    """
    if (
        (backend == "torch" or (backend == "auto" and not u.is_cuda))
        and u.dtype in _NODE_DTYPES
        and u.shape[-1] == v.shape[-1]
        and cost.dh is not None
        and cost.differentiable
        and torch.is_grad_enabled()
        and _any_requires_grad(u, v, u2, v2)
        and not functorch_active()
        and not torch.compiler.is_compiling()
        and u.device.type != "meta"
    ):
        check = _finite_check(*named) if validate else None
        return SortedOT.apply(u, v, cost, check, u2, v2, reduction)  # reduced inside: one node
    return None


def _ot_h_1d(
    u: Tensor,
    v: Tensor,
    cost: Cost,
    u_weights: Tensor | None,
    v_weights: Tensor | None,
    sorter: SoftSort | None,
    validate: bool,
    reduction: str,
    global_batch: bool,
    group: object | None,
    memory: QuantileMemory | None,
    backend: str,
    *,
    u2: Tensor | None = None,
    v2: Tensor | None = None,
    named: tuple[tuple[Tensor, str], ...] | None = None,
) -> Tensor:
    """The one path from every loss to the dispatcher, after :func:`_check_options`.

    Args:
        u2, v2: with ``named``, for paired AOT on the local batch with hard sort: the problem is
            ``u - u2`` against ``v - v2``, subtracted inside the loss node or kernel.
        named: the caller's own inputs ``(tensor, name)``, already metadata-checked (``u``/``v``
            are then not checked again, and weights must be ``None``); the value check names them.
            ``None`` checks ``u``, ``v`` and the weights here, after any gather.
    """
    # under vmap the value checks cannot raise: failing problems give NaN instead (_nan_unless_valid)
    vmapped = validate and vmap_active()
    if vmapped:
        validate = False
    a = b = None
    with rollback_on_error(memory) if memory is not None else _NO_MEMORY:  # an error leaves the memory as it was
        if global_batch or memory is not None:
            u, v, u_weights, v_weights = prepare_global_batch(
                u, v, u_weights, v_weights, global_batch=global_batch, group=group, memory=memory, validate=validate
            )
        if named is None:
            a, b = check_pair(u, v, u_weights, v_weights, validate, values=False)
            if sorter is not None and (a is not None or b is not None):
                raise ValueError(
                    "soft sort needs uniform weights: pass u_weights=None and v_weights=None, or sort='hard'"
                )
            named = ((u, "u"), (v, "v"))
        # meta tensors carry no values to check (shape inference, deferred initialisation)
        check_values = _finite_check(*named) if validate and u.device.type != "meta" else None
        out = _dispatch(u, v, cost, a, b, sorter, reduction, backend, check_values, u2, v2)
    if vmapped:

        def raise_checks() -> None:
            for t, name in named:
                check_finite(t, name)
            check_pair(u, v, u_weights, v_weights, True, values=False)

        out = _nan_unless_valid(out, u if u2 is None else u - u2, v if v2 is None else v - v2, a, b, raise_checks)
    return out


def _dispatch(
    u: Tensor,
    v: Tensor,
    cost: Cost,
    a: Tensor | None,
    b: Tensor | None,
    sorter: SoftSort | None,
    reduction: str,
    backend: str,
    check_values: Callable[[], None] | None,
    u2: Tensor | None = None,
    v2: Tensor | None = None,
) -> Tensor:
    """Checked inputs to the loss: backend choice, value check, compute dtype, reduction.

    Its one caller is :func:`_ot_h_1d` (the path of :func:`ot_h_1d` and :func:`aot_loss`). Paired AOT
    with hard sort on the local batch passes the four log-probabilities (``u - u2``, ``v - v2``) so
    that the margins are subtracted inside the fused kernel or reference node (one launch, no extra
    autograd nodes).
    """
    use_triton = _use_triton(backend, u, v, cost, a is not None or b is not None, sorter is not None)
    if not cost.differentiable and torch.is_grad_enabled():
        with torch.no_grad():
            return _dispatch(u, v, cost, a, b, sorter, reduction, backend, check_values, u2, v2)
    if use_triton:
        from otloss.ops import ot_rows_triton

        rows = ot_rows_triton(u, v, cost, u2=u2, v2=v2, check_values=check_values)
    else:
        cdt = compute_dtype(u.dtype)
        if u2 is not None:
            u2 = _cast(u2, cdt)
        if v2 is not None:
            v2 = _cast(v2, cdt)
        rows = _ot_rows(_cast(u, cdt), _cast(v, cdt), cost, a, b, sorter, check_values, u2, v2)
    return _cast(_reduce(rows, reduction), u.dtype)


_FSD_MEASURES: dict[str, Callable[[], Cost]] = {
    "area": zero_one,
    "w1": lambda: hinge(0.0),
    "w2": lambda: squared_hinge(0.0),
}


def _fsd_cost(measure: object) -> Cost:
    if isinstance(measure, Cost):
        return measure
    if isinstance(measure, str):
        if measure not in _FSD_MEASURES:
            raise ValueError(f"measure must be one of {sorted(_FSD_MEASURES)} or a Cost, got {measure!r}")
        return _FSD_MEASURES[measure]()
    raise TypeError(f"measure must be a name or a Cost, got {type_name(measure)}")


def fsd_violation(
    u: Tensor,
    v: Tensor,
    measure: Literal["area", "w1", "w2"] | Cost = "area",
    *,
    u_weights: Tensor | None = None,
    v_weights: Tensor | None = None,
    sort: SortArg = "hard",
    reduction: Reduction = "mean",
    validate_args: bool | None = None,
    backend: Backend = "auto",
) -> Tensor:
    r"""How far ``u`` is from first-order stochastic dominance (FSD) over ``v``.

    ``u`` dominates ``v`` when ``Q_u(t) >= Q_v(t)`` for every ``t``; each measure
    integrates a penalty of the quantile shortfall (paper, Appendix F):

    * ``"area"``: ``\int 1[Q_u(t) < Q_v(t)] dt``, the fraction of quantiles in
      violation (in ``[0, 1]``; a metric, no gradient).
    * ``"w1"``: ``\int (Q_v(t) - Q_u(t))_+ dt``, the Wasserstein-1 distance from ``u``
      to the nearest distribution that dominates ``v``.
    * ``"w2"``: ``\int (Q_v(t) - Q_u(t))_+^2 dt``, the *squared* Wasserstein-2 distance
      to that set.
    * a :class:`~otloss.Cost` such as ``logistic(beta)`` or ``squared_hinge(beta)``:
      the smooth surrogate as a differentiable loss (same as :func:`ot_h_1d`).

    All are 0 when ``u`` dominates ``v`` (the smooth surrogates are not: they keep
    rewarding larger margins). Other arguments are those of :func:`ot_h_1d`.
    """
    cost = _fsd_cost(measure)
    return ot_h_1d(
        u,
        v,
        cost,
        u_weights=u_weights,
        v_weights=v_weights,
        sort=sort,
        reduction=reduction,
        validate_args=validate_args,
        backend=backend,
    )


_AOT_COSTS = ("logistic", "hinge", "squared_hinge", "least_squares")


#: built-in costs of aot_loss by (name, beta, label_smoothing) key; only built and validated ones go in
_AOT_COST_CACHE: dict[tuple, Cost] = {}
_AOT_COST_CACHE_MAX = 64


def _number_key(x: object) -> tuple:
    """A cache key for a number argument: its type and value, and the sign of a zero (``-0.0`` is not ``0.0``)."""
    return (x.__class__, x, x == 0 and math.copysign(1.0, x))  # type: ignore[arg-type]


def _aot_cost(cost: CostArg, beta: float | None, label_smoothing: float) -> Cost:
    """The cost of :func:`aot_loss`: a name with ``beta`` (``None``: :data:`AOT_DEFAULT_BETA`), or a ready cost.

    A cost given by name is built once per ``(name, beta, label_smoothing)`` and reused (eagerly; under
    ``torch.compile`` it is built while tracing): arguments that fail validation are never cached, so
    they raise on every call.
    """
    if (
        cost.__class__ is str
        and beta.__class__ in _KEY_TYPES
        and label_smoothing.__class__ in _KEY_TYPES
        and not torch.compiler.is_compiling()  # a traced dict lookup would guard on the cache's contents
    ):
        key = (cost, _number_key(beta), _number_key(label_smoothing))
        hit = _AOT_COST_CACHE.get(key)
        if hit is None:
            hit = _build_aot_cost(cost, beta, label_smoothing)
            if len(_AOT_COST_CACHE) < _AOT_COST_CACHE_MAX:
                _AOT_COST_CACHE[key] = hit
        return hit
    return _build_aot_cost(cost, beta, label_smoothing)


_KEY_TYPES = (type(None), float, int)


def _build_aot_cost(cost: CostArg, beta: float | None, label_smoothing: float) -> Cost:
    if beta is not None:
        real_number(beta, "beta")
    label_smoothing = real_number(label_smoothing, "label_smoothing")
    if isinstance(cost, str):
        if cost not in _AOT_COSTS:
            raise ValueError(f"cost must be one of {list(_AOT_COSTS)}, a Cost or a callable for AOT, got {cost!r}")
        beta = AOT_DEFAULT_BETA if beta is None else beta
        if cost == "logistic":
            return logistic(beta, label_smoothing)
        if label_smoothing != 0:
            raise ValueError(f"label_smoothing applies to the logistic cost only, got {label_smoothing} with {cost!r}")
        return get_cost(cost, beta=beta)
    if beta is not None or label_smoothing != 0:
        raise ValueError(
            "beta and label_smoothing configure a cost given by name; a Cost or callable carries its own "
            "parameters (e.g. cost=otloss.logistic(beta=0.01, label_smoothing=0.1))"
        )
    return get_cost(cost)


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    paired: bool = True,
    cost: CostArg = "logistic",
    beta: float | None = None,
    label_smoothing: float = 0.0,
    sort: SortArg = "hard",
    reduction: Reduction = "mean",
    validate_args: bool | None = None,
    global_batch: bool = False,
    group: object | None = None,
    memory: QuantileMemory | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Alignment via Optimal Transport (AOT) loss from sequence log-probabilities.

    * ``paired=True`` (TRL ``loss_type="aot"``, paper Algorithm 2): ``u`` are the
      policy margins ``policy_chosen - policy_rejected``, ``v`` the reference margins
      ``ref_chosen - ref_rejected``; all four are ``[..., B]``.
    * ``paired=False`` (TRL ``"aot_unpaired"``, Algorithm 1): ``u`` are the chosen
      log-ratios ``policy_chosen - ref_chosen`` (``[..., n]``), ``v`` the rejected
      log-ratios ``policy_rejected - ref_rejected`` (``[..., m]``); ``n != m`` is
      allowed and uses the quantile coupling.

    The loss is ``OT_h(u, v)``: with hard sort and the logistic cost,
    ``mean_i -logsigmoid(beta (u_(i) - v_(i)))`` (with TRL's label smoothing), equal in
    value and gradient to TRL's implementation.

    Args:
        policy_chosen_logps: policy log-probabilities of the chosen completions.
        policy_rejected_logps: policy log-probabilities of the rejected completions.
        ref_chosen_logps: reference log-probabilities of the chosen completions.
        ref_rejected_logps: reference log-probabilities of the rejected completions.
        paired: see above.
        cost: ``"logistic"`` (default), ``"hinge"``, ``"squared_hinge"``,
            ``"least_squares"``, or a :class:`~otloss.Cost` / callable.
        beta: for a cost given by name; ``None`` means :data:`AOT_DEFAULT_BETA` ``= 0.01``,
            the paper's value on sequence log-ratios (a scale for logistic, a margin for
            the hinge family). It differs on purpose from ``otloss.logistic()``'s unit
            default ``beta = 1``, which :func:`ot_h_1d` uses for ``cost="logistic"``.
        label_smoothing: logistic cost only, in ``[0, 1]``.
        sort: ``"hard"``, ``"soft"`` or a :class:`~otloss.SoftSort`.
        reduction: over leading batch dimensions, as in :func:`ot_h_1d`.
        validate_args: as in :func:`ot_h_1d`; the error names the input holding a NaN or
            Inf. With ``global_batch=True`` the values are checked after the gather, so
            every rank raises (the rank holding the value names the input, the others
            ``u``/``v``). Finite inputs whose margins overflow the compute dtype are let
            through (IEEE arithmetic: an infinite margin), except with ``global_batch``.
        global_batch: sort the ``u`` and ``v`` of every rank together, as in
            :func:`ot_h_1d`; a rank may hold no chosen or no rejected sample.
        group: as in :func:`ot_h_1d`.
        memory: as in :func:`ot_h_1d`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, as in :func:`ot_h_1d`.

    Returns:
        The loss, in the dtype of ``policy_chosen_logps``.
    """
    if (
        paired is True
        and sort.__class__ is str
        and sort == "hard"
        and global_batch is False
        and memory is None
        and group is None
        and cost.__class__ is str
        and (validate_args is None or validate_args.__class__ is bool)
    ):  # the common training call: straight to the loss node when every check would pass
        out = _lean_paired(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            cost, beta, label_smoothing, reduction, validate_args, backend,
        )  # fmt: skip
        if out is not None:
            return out
    paired = as_bool(paired, "paired")
    sorter, validate, global_batch = _check_options(
        sort, reduction, backend, validate_args, global_batch, group, memory
    )
    names = _AOT_NAMES
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    local = not global_batch and memory is None
    if not (local and plain_values(tensors)):  # the named checks, which raise (skipped when all would pass)
        for t, name in zip(tensors, names):
            if local:
                check_values_tensor(t, name)
            else:
                check_local_values(t, name)
        for t, name in zip(tensors[1:], names[1:]):
            check_same_dtype_device(tensors[0], t, names[0], name)
    pc, pr, rc, rr = tensors
    if paired:
        for t, name in zip(tensors[1:], names[1:]):
            if t.shape != pc.shape:
                raise ValueError(
                    f"paired AOT needs the four log-probability tensors to have one shape; "
                    f"{names[0]} is {tuple(pc.shape)} but {name} is {tuple(t.shape)} "
                    "(for different numbers of chosen and rejected samples use paired=False)"
                )
    else:
        if rc.shape != pc.shape:
            raise ValueError(
                f"ref_chosen_logps must have the shape of policy_chosen_logps {tuple(pc.shape)}, got {tuple(rc.shape)}"
            )
        if rr.shape != pr.shape:
            raise ValueError(
                f"ref_rejected_logps must have the shape of policy_rejected_logps {tuple(pr.shape)}, "
                f"got {tuple(rr.shape)}"
            )
        if pc.shape[:-1] != pr.shape[:-1]:
            raise ValueError(
                "chosen and rejected log-probabilities must have the same leading (batch) dimensions, "
                f"got {tuple(pc.shape)} and {tuple(pr.shape)}"
            )
    h = _aot_cost(cost, beta, label_smoothing)
    if local:
        # the local batch: the value check names the four inputs (finite inputs whose margins overflow are
        # computed in IEEE arithmetic); paired hard sort subtracts the margins inside the loss node or kernel
        named = tuple(zip(tensors, names))
        if paired and sorter is None:
            out = _node(pc, rc, h, validate, reduction, backend, named, pr, rr)
            if out is not None:
                return out
            return _ot_h_1d(pc, rc, h, None, None, None, validate, reduction, False, None, None, backend,
                            u2=pr, v2=rr, named=named)  # fmt: skip
        cdt = compute_dtype(pc.dtype)
        c_pc, c_pr, c_rc, c_rr = (_cast(t, cdt) for t in tensors)
        u, v = (c_pc - c_pr, c_rc - c_rr) if paired else (c_pc - c_rc, c_pr - c_rr)
        out = _ot_h_1d(u, v, h, None, None, sorter, validate, reduction, False, None, None, backend, named=named)
        return _cast(out, policy_chosen_logps.dtype)
    # global batch or memory: the margins are gathered/stored, then checked by name u/v
    cdt = compute_dtype(pc.dtype)
    pc, pr, rc, rr = (_cast(t, cdt) for t in tensors)
    u, v = (pc - pr, rc - rr) if paired else (pc - rc, pr - rr)
    args = (sorter, validate, reduction, global_batch, group, memory, backend)
    try:
        out = _ot_h_1d(u, v, h, None, None, *args)
    except NonFiniteError:
        # a non-finite input always makes a non-finite margin: name the input that holds it
        for t, name in zip(tensors, names):
            check_finite(t, name)
        if global_batch:  # after the gather: the value may come from another rank
            raise
        # finite inputs whose margins overflow: computed in IEEE arithmetic, as on the local batch
        out = _ot_h_1d(u, v, h, None, None, sorter, False, reduction, global_batch, group, memory, backend)
    return _cast(out, policy_chosen_logps.dtype)
