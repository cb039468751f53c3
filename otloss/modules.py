"""``nn.Module`` wrappers: each stores its options and calls the functional API.

The defaults are those of the functions in :mod:`otloss.functional` (a test checks
that every module default equals the function's). Every option is checked in
``__init__`` by the same code the functions use, so a bad ``reduction``, ``backend``,
``sort``, measure or cost fails when the module is built, not at its first forward.
Modules holding a built-in cost pickle, deep-copy and go through ``torch.save``;
a module holding a process ``group`` does not pickle (process groups do not).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from otloss._validation import as_bool
from otloss.costs import Cost, get_cost
from otloss.distributed import QuantileMemory
from otloss.functional import (
    Backend,
    CostArg,
    Reduction,
    SortArg,
    _aot_cost,
    _check_options,
    _fsd_cost,
    aot_loss,
    fsd_violation,
    ot_h_1d,
)

__all__ = ["AOTLoss", "FSDViolation", "OTLoss"]


def _global_option(
    global_batch: object, sort: object, reduction: object, backend: object, validate_args: object, group, memory
) -> bool | str:
    """``global_batch`` checked with the other options: ``True``, ``False`` or ``"auto"``."""
    auto = isinstance(global_batch, str)
    if auto and global_batch != "auto":
        raise ValueError(f"global_batch must be True, False or 'auto', got {global_batch!r}")
    _, _, checked = _check_options(
        sort, reduction, backend, validate_args, True if auto else global_batch, group, memory
    )
    return "auto" if auto else checked


class _RankAware(nn.Module):
    """What :class:`OTLoss` and :class:`AOTLoss` share: ``global_batch="auto"`` and a training-only ``memory``."""

    global_batch: bool | str
    group: object | None
    memory: QuantileMemory | None

    def is_global(self) -> bool:
        """Whether the next call sorts across ranks: ``global_batch=True``, or ``"auto"`` with several ranks."""
        if self.global_batch != "auto":
            return bool(self.global_batch)
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def _call_options(self) -> dict[str, object]:
        gathers = self.is_global()
        return {
            "global_batch": gathers,
            "group": self.group if gathers else None,
            "memory": self.memory if self.training else None,
        }


class OTLoss(_RankAware):
    """``OT_h(u, v)`` as a module; see :func:`otloss.ot_h_1d`.

    ``memory`` and ``global_batch`` behave as in :class:`AOTLoss`: the memory is used in
    training mode only, and ``global_batch="auto"`` sorts across ranks only with an
    initialised process group of more than one rank.

    Example:
        >>> loss_fn = OTLoss("abs_pow")
        >>> loss = loss_fn(u, v)  # u: [batch, n], v: [batch, m]

    Raises:
        ValueError: ``global_batch`` is a string other than ``"auto"``; any option
            :func:`otloss.ot_h_1d` refuses, at construction.
    """

    def __init__(
        self,
        cost: CostArg,
        *,
        sort: SortArg = "hard",
        reduction: Reduction = "mean",
        validate_args: bool | None = None,
        global_batch: bool | Literal["auto"] = False,
        group: object | None = None,
        memory: QuantileMemory | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.cost = get_cost(cost)
        global_batch = _global_option(global_batch, sort, reduction, backend, validate_args, group, memory)
        self.sort = sort
        self.reduction = reduction
        self.validate_args = validate_args
        self.global_batch = global_batch
        self.group = group
        self.memory = memory
        self.backend = backend

    def forward(self, u: Tensor, v: Tensor, u_weights: Tensor | None = None, v_weights: Tensor | None = None) -> Tensor:
        return ot_h_1d(
            u,
            v,
            self.cost,
            u_weights=u_weights,
            v_weights=v_weights,
            sort=self.sort,
            reduction=self.reduction,
            validate_args=self.validate_args,
            backend=self.backend,
            **self._call_options(),
        )

    def extra_repr(self) -> str:
        return f"cost={self.cost!r}, sort={self.sort!r}, reduction={self.reduction!r}"


class FSDViolation(nn.Module):
    """An FSD-violation measure of ``u`` over ``v``; see :func:`otloss.fsd_violation`."""

    def __init__(
        self,
        measure: str | Cost = "area",
        *,
        sort: SortArg = "hard",
        reduction: Reduction = "mean",
        validate_args: bool | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        _fsd_cost(measure)
        _check_options(sort, reduction, backend, validate_args, False, None, None)
        self.measure = measure
        self.sort = sort
        self.reduction = reduction
        self.validate_args = validate_args
        self.backend = backend

    def forward(self, u: Tensor, v: Tensor, u_weights: Tensor | None = None, v_weights: Tensor | None = None) -> Tensor:
        return fsd_violation(
            u,
            v,
            self.measure,
            u_weights=u_weights,
            v_weights=v_weights,
            sort=self.sort,
            reduction=self.reduction,
            validate_args=self.validate_args,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"measure={self.measure!r}, sort={self.sort!r}, reduction={self.reduction!r}"


class AOTLoss(_RankAware):
    """The AOT loss as a module; see :func:`otloss.aot_loss` for every argument.

    One object serves training and evaluation, in one process or many:

    * ``memory`` (an :class:`otloss.QuantileMemory`) is used in training mode only: after
      ``eval()`` the loss neither reads nor extends it (the call is the loss of the
      batch alone), and ``train()`` turns it back on.
    * ``global_batch="auto"`` sorts across ranks only when ``torch.distributed`` has an
      initialised process group (``group``, else the default one) of more than one
      rank; otherwise each call is the local loss. ``True`` always gathers (and
      raises without an initialised group); ``False`` (the default) never does.

    Example:
        >>> loss_fn = AOTLoss(paired=True, beta=0.01)
        >>> loss = loss_fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)

    Raises:
        ValueError: ``global_batch`` is a string other than ``"auto"``; any option
            :func:`otloss.aot_loss` refuses, at construction.
    """

    def __init__(
        self,
        *,
        paired: bool = True,
        cost: CostArg = "logistic",
        beta: float | None = None,
        label_smoothing: float = 0.0,
        sort: SortArg = "hard",
        reduction: Reduction = "mean",
        validate_args: bool | None = None,
        global_batch: bool | Literal["auto"] = False,
        group: object | None = None,
        memory: QuantileMemory | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        paired = as_bool(paired, "paired")
        _aot_cost(cost, beta, label_smoothing)
        global_batch = _global_option(global_batch, sort, reduction, backend, validate_args, group, memory)
        self.paired = paired
        self.cost = cost
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.sort = sort
        self.reduction = reduction
        self.validate_args = validate_args
        self.global_batch = global_batch
        self.group = group
        self.memory = memory
        self.backend = backend

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
    ) -> Tensor:
        return aot_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            paired=self.paired,
            cost=self.cost,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            sort=self.sort,
            reduction=self.reduction,
            validate_args=self.validate_args,
            backend=self.backend,
            **self._call_options(),
        )

    def extra_repr(self) -> str:
        return (
            f"paired={self.paired}, cost={self.cost!r}, beta={self.beta}, "
            f"label_smoothing={self.label_smoothing}, sort={self.sort!r}"
        )
