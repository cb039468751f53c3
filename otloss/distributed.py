"""Global-batch losses across data-parallel ranks, and a quantile memory for gradient accumulation.

AOT sorts the per-sample scalars (margins or log-ratios) of a batch; a larger
sorted batch estimates the quantile functions better (paper, Corollary 1). With
``global_batch=True`` the losses in :mod:`otloss.functional` all-gather these
scalars from every rank of a process group, so the sort sees the whole global
batch, and gradients flow back to each rank's own elements only.

Gradient convention (``global_batch=True``): every rank computes the same global
loss ``L`` (its *value* is the global loss, identical on all ranks), and each
rank's local elements receive ``W * dL/dx`` where ``W`` is the size of the
group. DDP and FSDP *average* parameter gradients over the ``W`` ranks, so after
their averaging a parameter's gradient is
``(1/W) * sum_r W * dL/dx_r * dx_r/dtheta = dL/dtheta``: exactly the gradient of
the single-process loss on the concatenated batch. For a trainer that *sums*
gradients over ranks instead, divide the loss by ``W``.

:class:`QuantileMemory` keeps the (detached) scalars of earlier micro-batches of
one optimizer step so that the quantiles come from the whole effective batch;
see its docstring for the trade-off.

``import otloss`` works when ``torch.distributed`` is unavailable; only calling
these functions with ``global_batch=True`` needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from otloss._validation import as_bool, broadcast_weights, check_dense_float, check_finite, real_number, type_name

__all__ = ["QuantileMemory", "all_gather_variable"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_DIM = 8
# One metadata row per gathered tensor: status, dtype code, ndim, shape padded to _MAX_DIM.
_ABSENT, _OK, _INVALID = 0, 1, 2
_ROW = 3 + _MAX_DIM


def _dist() -> Any:
    """``torch.distributed``, checked to be available and initialised."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(
            "global_batch=True needs torch.distributed, which this torch build does not provide; "
            "pass global_batch=False"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "global_batch=True needs an initialised default process group: call "
            "torch.distributed.init_process_group(...) first (torchrun, accelerate and Lightning do), "
            "or pass global_batch=False for a single process"
        )
    return dist


def check_local_values(x: object, name: str) -> Tensor:
    """Metadata checks for one rank's share of a batch: a floating tensor with at least one dimension.

    Unlike the single-process checks, an empty last dimension is allowed (a rank may
    hold no sample of a class); the global batch must be non-empty.

    Args:
        x: the value to check.
        name: the argument's name, for error messages.

    Returns:
        ``x``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(x)}")
    check_dense_float(x, name)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a tensor of shape {tuple(x.shape)}")
    return x


class _AllGatherVariable(torch.autograd.Function):
    """Variable-size all-gather along the last dimension; backward returns the local slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], rank: int, group: Any, grad_scale: float) -> Tensor:
        ctx.start = sum(sizes[:rank])
        ctx.size = sizes[rank]
        ctx.grad_scale = grad_scale
        lead = tuple(x.shape[:-1])
        n_max = max(sizes)
        if n_max == 0:  # every rank agrees (same sizes), so none of them calls the collective
            return x.new_empty((*lead, 0))
        padded = x.new_zeros((*lead, n_max))
        padded[..., : x.shape[-1]] = x
        bufs = [torch.empty_like(padded) for _ in sizes]
        _dist().all_gather(bufs, padded, group=group)
        return torch.cat([buf[..., :n] for buf, n in zip(bufs, sizes)], dim=-1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        g = grad[..., ctx.start : ctx.start + ctx.size]
        if ctx.grad_scale != 1.0:
            g = g * ctx.grad_scale
        return g, None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def _meta_row(x: Tensor | None, status: int) -> list[int]:
    row = [status, 0, 0] + [0] * _MAX_DIM
    if status == _OK and x is not None:
        row[1] = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
        row[2] = x.dim()
        row[3 : 3 + x.dim()] = list(x.shape)
    return row


def _gather_many(
    tensors: list[Tensor | None],
    names: list[str],
    errors: list[Exception | None],
    group: Any,
    grad_scale: float,
) -> list[Tensor | None]:
    """All-gather several tensors (``None`` stays ``None``) after one metadata exchange.

    Every rank learns every rank's metadata first, so an invalid argument on one
    rank raises on all of them instead of leaving the others waiting.
    """
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("global_batch=True: this process is not a member of the given group")
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    rows = []
    for t, err in zip(tensors, errors):
        status = _INVALID if err is not None else (_ABSENT if t is None else _OK)
        rows.append(_meta_row(t, status))
    meta = torch.tensor(rows, dtype=torch.int64, device=device)
    bufs = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(bufs, meta, group=group)
    allmeta = torch.stack(bufs).cpu().tolist()  # [world][tensor][row]
    for err in errors:
        if err is not None:
            raise err
    out: list[Tensor | None] = []
    for k, (t, name) in enumerate(zip(tensors, names)):
        ranks_rows = [allmeta[r][k] for r in range(world)]
        bad = [r for r, row in enumerate(ranks_rows) if row[0] == _INVALID]
        if bad:
            raise RuntimeError(f"global_batch=True: rank(s) {bad} passed an invalid {name}; see the error there")
        present = {row[0] for row in ranks_rows}
        if len(present) > 1:
            nones = [r for r, row in enumerate(ranks_rows) if row[0] == _ABSENT]
            raise ValueError(f"global_batch=True: {name} is None on rank(s) {nones} but a tensor on the others")
        if t is None:
            out.append(None)
            continue
        shapes = [tuple(row[3 : 3 + row[2]]) for row in ranks_rows]
        if len({row[1] for row in ranks_rows}) > 1:
            dtypes = [_DTYPES[row[1]] if row[1] < len(_DTYPES) else "other" for row in ranks_rows]
            raise TypeError(f"global_batch=True: {name} must have one dtype on every rank, got {dtypes} by rank")
        if len({s[:-1] for s in shapes}) > 1:
            raise ValueError(
                f"global_batch=True: {name} must have the same leading (batch) dimensions on every rank "
                f"(only the last dimension may differ), got shapes {shapes} by rank"
            )
        sizes = [s[-1] for s in shapes]
        out.append(_AllGatherVariable.apply(t.contiguous(), sizes, rank, group, grad_scale))
    return out


def all_gather_variable(x: Tensor, group: Any = None, *, grad_scale: float = 1.0) -> Tensor:
    """Differentiable all-gather of tensors whose last dimension differs across ranks.

    Sizes are exchanged first, then each rank's tensor is padded to the largest
    size, gathered and unpadded. Every rank must call it (a collective).

    The backward pass returns ``grad_scale`` times the slice of the incoming gradient
    that belongs to this rank, with no communication. That is the exact gradient
    when every rank applies the same computation to the gathered tensor (as the
    global-batch losses do): the gathered tensor, and so its gradient, is then
    identical on all ranks. If ranks compute different functions of it, the other
    ranks' contributions to this rank's gradient are not included.

    Args:
        x: ``[..., n_r]`` floating tensor on this rank (``n_r`` may be 0); leading
            dimensions and dtype must be the same on every rank.
        group: the process group; ``None`` is the default (world) group.
        grad_scale: multiplies the gradient returned to ``x``. The global-batch
            losses pass the group size (see the module docstring).

    Returns:
        ``[..., sum_r n_r]``: the tensors of ranks ``0, 1, ...`` concatenated in rank order.

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable or not initialised.
        ValueError: leading dimensions differ across ranks (raised on every rank).
    """
    err: Exception | None = None
    try:
        check_local_values(x, "x")
        if x.dim() > _MAX_DIM:
            raise ValueError(f"x must have at most {_MAX_DIM} dimensions, got {x.dim()}")
    except (TypeError, ValueError) as e:
        if not isinstance(x, Tensor):
            raise
        err = e
    grad_scale = real_number(grad_scale, "grad_scale")
    check_group(group)
    return _gather_many([x], ["x"], [err], group, grad_scale)[0]  # type: ignore[return-value]


def check_group(group: object, name: str = "group") -> None:
    """``group`` is ``None`` (the default group) or a ``torch.distributed.ProcessGroup``."""
    if group is None:
        return
    import torch.distributed as dist

    pg = getattr(dist, "ProcessGroup", None) if dist.is_available() else None
    if pg is None or not isinstance(group, pg):
        raise TypeError(
            f"{name} must be a torch.distributed.ProcessGroup or None (the default group), got {type_name(group)}; "
            "from a DeviceMesh pass mesh.get_group()"
        )


@contextlib.contextmanager
def rollback_on_error(memory: QuantileMemory | None) -> Iterator[None]:
    """Restore ``memory`` to its state on entry when the body raises, whatever the error."""
    if memory is None:
        yield
        return
    saved = memory._stored  # extend() replaces the list and never modifies stored tensors in place
    try:
        yield
    except BaseException:
        memory._stored = saved
        raise


def _local_weights(w: object, values: Tensor, name: str, values_name: str) -> Tensor | None:
    return broadcast_weights(w, values, name, values_name, same_device=False)


class QuantileMemory:
    """Keeps the scalars of earlier micro-batches of one optimizer step (gradient accumulation).

    Pass it as ``memory=`` to :func:`otloss.ot_h_1d` or :func:`otloss.aot_loss` (or
    the modules) and call :meth:`reset` after every optimizer step. Each call
    computes the loss on the stored scalars of the step's earlier micro-batches
    (detached: no gradient) concatenated with the current ones (with gradient), then
    stores the current ones. With ``global_batch=True`` it stores the gathered
    global scalars, so the quantiles come from every rank's micro-batches so far.
    Every call appends: call the loss once per micro-batch.

    The parameters do not change within an optimizer step, so the stored scalars
    are those a single large batch would have (up to dropout noise). Trade-off:
    micro-batch ``k`` of ``K`` sorts against the first ``k`` micro-batches, not all
    ``K``. The last micro-batch's gradient is that of the full effective batch; the
    earlier ones use a quantile estimate from a prefix, which has less bias and
    variance than their own micro-batch alone but more than the full batch, and
    the micro-batches are not treated symmetrically. Exact full-batch gradients
    need every scalar before any backward pass (an extra forward pass without
    gradient), which this object does not do.

    Gradient scale: the loss on ``N`` stored-plus-current elements weights each
    element ``1/N``; with ``rescale_grad=True`` (default) the gradient to the current
    ``n`` elements is multiplied by ``N / n`` (counted separately for ``u`` and
    ``v``, by number of elements, weights ignored), so that every micro-batch has
    the gradient scale of a mean over its own elements, as in ordinary gradient
    accumulation (where the trainer divides each micro-batch loss by the number of
    micro-batches). The loss *value* is the loss over all ``N`` elements.

    Args:
        rescale_grad: see above.

    Example:
        >>> memory = otloss.QuantileMemory()
        >>> for step_batches in loader:  # the micro-batches of one optimizer step
        ...     for batch in step_batches:
        ...         loss = otloss.aot_loss(*logps(batch), memory=memory) / len(step_batches)
        ...         loss.backward()
        ...     optimizer.step(); optimizer.zero_grad(); memory.reset()
    """

    def __init__(self, rescale_grad: bool = True) -> None:
        self.rescale_grad = as_bool(rescale_grad, "rescale_grad")
        self._stored: list[Tensor | None] | None = None

    def reset(self) -> None:
        """Forget every stored scalar (call after each optimizer step)."""
        self._stored = None

    @property
    def sizes(self) -> tuple[int, int]:
        """Number of stored ``u`` and ``v`` scalars per row (``(0, 0)`` after :meth:`reset`)."""
        if self._stored is None:
            return (0, 0)
        return tuple(0 if t is None else t.shape[-1] for t in self._stored[:2])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"QuantileMemory(rescale_grad={self.rescale_grad}, sizes={self.sizes})"

    def extend(
        self, u: Tensor, v: Tensor, u_weights: Tensor | None = None, v_weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Concatenate the stored scalars before the current ones, then store the current ones.

        The losses call this for you; it is public for custom losses.

        Args:
            u: ``[..., n]`` current values (gradient flows, scaled as in the class docstring).
            v: ``[..., m]`` current values.
            u_weights: ``None`` or weights of the shape of ``u``; ``None`` or a tensor on
                every call of one step.
            v_weights: likewise for ``v``.

        Returns:
            ``(u, v, u_weights, v_weights)`` over stored plus current elements.

        Raises:
            TypeError, ValueError: an argument is invalid or does not match the stored
                ones; the memory is then left as it was.
        """
        check_local_values(u, "u")
        check_local_values(v, "v")
        if u.shape[:-1] != v.shape[:-1]:
            raise ValueError(
                f"u and v must have the same leading (batch) dimensions, got {tuple(u.shape)} and {tuple(v.shape)}"
            )
        u_weights = _local_weights(u_weights, u, "u_weights", "u")
        v_weights = _local_weights(v_weights, v, "v_weights", "v")
        current = [u, v, u_weights, v_weights]
        names = ["u", "v", "u_weights", "v_weights"]
        if self._stored is not None:
            for cur, old, name in zip(current, self._stored, names):
                if (cur is None) != (old is None):
                    raise ValueError(
                        f"memory: {name} was {'None' if old is None else 'a tensor'} in an earlier micro-batch of "
                        f"this step and is {'None' if cur is None else 'a tensor'} now; call memory.reset() "
                        "between optimizer steps"
                    )
                if cur is None or old is None:
                    continue
                if cur.shape[:-1] != old.shape[:-1] or cur.dtype != old.dtype or cur.device != old.device:
                    raise ValueError(
                        f"memory: {name} has shape {tuple(cur.shape)}, {cur.dtype} on {cur.device}, but the stored "
                        f"one has shape {tuple(old.shape)}, {old.dtype} on {old.device}; the leading dimensions, "
                        "dtype and device must not change within a step (call memory.reset() between steps)"
                    )
        old = self._stored if self._stored is not None else [None] * 4
        n_old = [0 if t is None else t.shape[-1] for t in old]
        out: list[Tensor | None] = []
        for i, cur in enumerate(current):
            if cur is None:
                out.append(None)
                continue
            side = i % 2  # 0: u side, 1: v side
            n_cur = current[side].shape[-1]
            if self.rescale_grad and n_cur > 0 and n_old[side] > 0:
                cur = _ScaleGrad.apply(cur, (n_old[side] + n_cur) / n_cur)
            prev = old[i]
            out.append(cur if prev is None else torch.cat([prev, cur], dim=-1))
        # a copy, not a view: a caller that writes the next micro-batch into the same buffer must not
        # change what is stored
        self._stored = [
            None if t is None else (t.detach().clone() if p is None else torch.cat([p, t.detach()], dim=-1))
            for t, p in zip(current, old)
        ]
        return out[0], out[1], out[2], out[3]  # type: ignore[return-value]


def check_global_options(global_batch: object, group: object, memory: object) -> bool:
    """Check ``global_batch``, ``group`` and ``memory`` without communicating; returns ``global_batch``."""
    global_batch = as_bool(global_batch, "global_batch")
    if memory is not None and not isinstance(memory, QuantileMemory):
        raise TypeError(f"memory must be a QuantileMemory or None, got {type_name(memory)}")
    if group is not None and not global_batch:
        raise ValueError("group is used only with global_batch=True; pass group=None or global_batch=True")
    check_group(group)
    return global_batch


def prepare_global_batch(
    u: Tensor,
    v: Tensor,
    u_weights: Tensor | None,
    v_weights: Tensor | None,
    *,
    global_batch: bool,
    group: Any,
    memory: QuantileMemory | None,
    validate: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gather ``u``, ``v`` and their weights across ranks and/or prepend the memory.

    Used by :func:`otloss.ot_h_1d` before its own checks, which then apply to the
    global (and remembered) batch. Local shares may be empty. With ``validate`` the
    (gathered) values are checked for NaN/Inf before the memory stores them, so a
    rejected micro-batch leaves the memory as it was.
    """
    global_batch = check_global_options(global_batch, group, memory)
    if global_batch:
        dist = _dist()
        names = ["u", "v", "u_weights", "v_weights"]
        values: list[Tensor | None] = [None] * 4
        errors: list[Exception | None] = [None] * 4
        for i, (x, name) in enumerate(zip((u, v), names)):
            try:
                values[i] = check_local_values(x, name)
                if x.dim() > _MAX_DIM:
                    raise ValueError(f"{name} must have at most {_MAX_DIM} dimensions, got {x.dim()}")
            except (TypeError, ValueError) as e:
                if not isinstance(x, Tensor):
                    raise
                values[i], errors[i] = x, e
        for i, (w, x) in enumerate(((u_weights, u), (v_weights, v)), start=2):
            try:
                values[i] = _local_weights(w, x, names[i], names[i - 2]) if errors[i - 2] is None else None
            except (TypeError, ValueError) as e:
                if not isinstance(w, Tensor):
                    raise
                values[i], errors[i] = w, e
        if errors[0] is None and errors[1] is None and u.shape[:-1] != v.shape[:-1]:
            errors[1] = ValueError(
                f"u and v must have the same leading (batch) dimensions, got {tuple(u.shape)} and {tuple(v.shape)}"
            )
        scale = float(dist.get_world_size(group))
        u, v, u_weights, v_weights = _gather_many(values, names, errors, group, scale)  # type: ignore[assignment]
        total = [0 if t is None else t.numel() for t in (u, v)]
        for side, (n, name) in enumerate(zip(total, ("u", "v"))):
            if n == 0 and memory is None:
                raise ValueError(f"{name} is empty on every rank: the global batch needs at least one element")
            if n == 0 and memory.sizes[side] == 0:  # the earlier micro-batches may hold this side
                raise ValueError(
                    f"{name} is empty on every rank and in the memory: the global batch needs at least one element"
                )
    else:
        check_local_values(u, "u")
        check_local_values(v, "v")
        u_weights = _local_weights(u_weights, u, "u_weights", "u")
        v_weights = _local_weights(v_weights, v, "v_weights", "v")
    if memory is not None:
        if validate:
            check_finite(u, "u")
            check_finite(v, "v")
        u, v, u_weights, v_weights = memory.extend(u, v, u_weights, v_weights)
    return u, v, u_weights, v_weights
