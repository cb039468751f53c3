"""Convex costs ``h(z)`` of the difference ``z = u - v`` between quantiles.

A :class:`Cost` is a small object: ``cost(z)`` evaluates ``h`` elementwise and
``cost.grad(z)`` its derivative, with the (sub)gradient at every kink pinned
down and documented so that hand-written kernels and autograd agree.

In AOT, ``z`` is a quantile of the policy's score minus the same quantile of the
score it must dominate. Every built-in surrogate of the 0/1 loss ``1[z < 0]``
penalises ``z < 0`` (violations of first-order stochastic dominance).

Built-ins (``beta`` is a scale for ``logistic`` and a margin for the hinge family,
as in the paper):

=====================  ==========================================  ==========  ==================
cost                   ``h(z)``                                    ``h(0)``    ``h'(0)``
=====================  ==========================================  ==========  ==================
``logistic(beta, ls)``  ``(1-ls) softplus(-beta z) + ls softplus(beta z)``  ``log 2``  ``-beta (1 - 2 ls) / 2``
``hinge(beta)``        ``(beta - z)_+``                            ``beta_+``  ``-1`` if ``beta > 0`` else ``0``
``squared_hinge(beta)`` ``(beta - z)_+^2``                         ``beta_+^2`` ``-2 beta_+``
``least_squares(beta)`` ``(beta - z)^2``                           ``beta^2``  ``-2 beta``
``zero_one()``         ``1[z < 0]`` (metric only, no gradient)     ``0``       none
``abs_pow(p)``         ``|z|^p`` (``p >= 1``; Wasserstein-p^p)     ``0``       ``0``
=====================  ==========================================  ==========  ==================

At the kink of ``hinge`` (``z = beta``) the derivative used is ``0``, and for
``abs_pow(1)`` at ``z = 0`` it is ``0``: both are what ``torch.relu`` and
``torch.abs`` use under autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Cost",
    "abs_pow",
    "get_cost",
    "hinge",
    "least_squares",
    "logistic",
    "squared_hinge",
    "zero_one",
]


class Cost:
    """A cost ``h`` of ``z = u - v``.

    Args:
        h: elementwise function of a tensor ``z``. Must be convex for the quantile
            coupling to be optimal (Santambrogio 2015, Thm 2.9); this is not checked.
        dh: its derivative; ``None`` derives it with autograd. When given, the
            reference path computes the gradient in the forward pass from ``dh``
            (one autograd node per call), so ``dh`` must be the derivative of ``h``.
        name: the family (``"logistic"``, ``"hinge"``, ... or ``"custom"``); kernels
            specialise on it.
        params: the family's parameters, e.g. ``{"beta": 0.01}``.
        differentiable: ``False`` for metric-only costs such as :func:`zero_one`;
            :func:`otloss.ot_h_1d` then returns a value without gradient.
        even: ``h(z) == h(-z)``, so ``OT_h`` is symmetric in ``u, v``.
        degree: ``p`` when ``h(c z) == c**p h(z)`` for ``c > 0``, else ``None``.
        value_and_grad: optional ``(z, scale) -> (h(z), scale * h'(z))`` sharing work
            between the two; ``None`` calls ``h`` and ``dh``.
    """

    def __init__(
        self,
        h: Callable[[Tensor], Tensor],
        dh: Callable[[Tensor], Tensor] | None = None,
        *,
        name: str = "custom",
        params: dict[str, float] | None = None,
        differentiable: bool = True,
        even: bool = False,
        degree: float | None = None,
        value_and_grad: Callable[[Tensor, float], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        if not callable(h):
            raise TypeError(f"h must be callable, got {type(h).__name__}")
        if dh is not None and not callable(dh):
            raise TypeError(f"dh must be callable or None, got {type(dh).__name__}")
        self.h = h
        self.dh = dh
        self.name = name
        self.params = dict(params or {})
        self.differentiable = differentiable
        self.even = even
        self.degree = degree
        if value_and_grad is not None and (dh is None or not callable(value_and_grad)):
            raise TypeError("value_and_grad must be callable and comes with dh")
        self._value_and_grad = value_and_grad

    def __call__(self, z: Tensor) -> Tensor:
        return self.h(z)

    def grad(self, z: Tensor) -> Tensor:
        """Derivative ``h'(z)`` elementwise (autograd of ``h`` when no ``dh`` was given)."""
        if not self.differentiable:
            raise ValueError(f"cost {self!r} is a metric only and has no gradient")
        if self.dh is not None:
            return self.dh(z)
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.h(zz).sum(), zz)
        return g

    def value_and_grad(self, z: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """``(h(z), scale * h'(z))`` elementwise, sharing the work where the family allows.

        The shared path works in place, so when ``z`` requires grad (and grad mode is
        on) ``h`` and ``dh`` are called separately and both results stay differentiable.
        """
        if self._value_and_grad is not None and not (z.requires_grad and torch.is_grad_enabled()):
            return self._value_and_grad(z, scale)
        return self.h(z), self.grad(z) * scale

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cost):
            return NotImplemented
        if self.name == "custom" or other.name == "custom":
            return self is other
        return self.name == other.name and self.params == other.params

    def __hash__(self) -> int:
        if self.name == "custom":
            return id(self)
        return hash((self.name, tuple(sorted(self.params.items()))))


def _real(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def logistic(beta: float = 1.0, label_smoothing: float = 0.0) -> Cost:
    """``h(z) = (1 - ls) * softplus(-beta z) + ls * softplus(beta z)``, computed stably.

    With ``label_smoothing = 0`` this is ``log(1 + exp(-beta z)) = -logsigmoid(beta z)``,
    the loss of DPO and of TRL's ``aot``; ``label_smoothing`` is TRL's conservative
    smoothing (the label is flipped with that probability).

    Args:
        beta: scale, ``> 0``. The paper uses ``0.01`` on sequence log-ratios.
        label_smoothing: in ``[0, 1]``.
    """
    beta = _real(beta, "beta")
    eps = _real(label_smoothing, "label_smoothing")
    if beta <= 0:
        raise ValueError(f"beta must be > 0 for the logistic cost, got {beta}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps}")

    def h(z: Tensor) -> Tensor:
        # softplus(-x) == -logsigmoid(x); written as TRL writes it so values agree to the last bit
        bz = beta * z
        if eps:
            return -F.logsigmoid(bz) * (1 - eps) - F.logsigmoid(-bz) * eps
        return -F.logsigmoid(bz)

    def dh(z: Tensor) -> Tensor:
        return beta * (eps * torch.sigmoid(beta * z) - (1 - eps) * torch.sigmoid(-beta * z))

    def value_and_grad(z: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        if eps:
            return h(z), dh(z) * scale
        bz = beta * z
        return -F.logsigmoid(bz), torch.sigmoid(-bz).mul_(-beta * scale)

    return Cost(
        h, dh, name="logistic", params={"beta": beta, "label_smoothing": eps}, even=False, value_and_grad=value_and_grad
    )


def hinge(beta: float = 0.0) -> Cost:
    """``h(z) = (beta - z)_+``; with ``beta = 0`` ``OT_h`` is the Wasserstein-1 FSD violation.

    The derivative is ``-1`` for ``z < beta`` and ``0`` for ``z >= beta``.
    """
    beta = _real(beta, "beta")

    def h(z: Tensor) -> Tensor:
        return torch.relu(beta - z)

    def dh(z: Tensor) -> Tensor:
        return -(z < beta).to(z.dtype)

    def value_and_grad(z: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        below = z < beta
        return torch.relu(beta - z), below.to(z.dtype).mul_(-scale)

    return Cost(
        h, dh, name="hinge", params={"beta": beta}, degree=1.0 if beta == 0 else None, value_and_grad=value_and_grad
    )


def squared_hinge(beta: float = 0.0) -> Cost:
    """``h(z) = (beta - z)_+^2``; with ``beta = 0`` ``OT_h`` is the squared Wasserstein-2 FSD violation."""
    beta = _real(beta, "beta")

    def h(z: Tensor) -> Tensor:
        return torch.relu(beta - z).square()

    def dh(z: Tensor) -> Tensor:
        return -2 * torch.relu(beta - z)

    def value_and_grad(z: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        r = torch.relu(beta - z)
        return r.square(), r.mul_(-2 * scale)

    return Cost(
        h,
        dh,
        name="squared_hinge",
        params={"beta": beta},
        degree=2.0 if beta == 0 else None,
        value_and_grad=value_and_grad,
    )


def least_squares(beta: float = 0.0) -> Cost:
    """``h(z) = (beta - z)^2`` (the IPO-style loss of the paper). Not a surrogate of 0/1: it also penalises ``z > beta``."""
    beta = _real(beta, "beta")

    def h(z: Tensor) -> Tensor:
        return (beta - z).square()

    def dh(z: Tensor) -> Tensor:
        return 2 * (z - beta)

    def value_and_grad(z: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        d = z - beta
        return d.square(), d.mul_(2 * scale)

    return Cost(
        h,
        dh,
        name="least_squares",
        params={"beta": beta},
        even=beta == 0,
        degree=2.0 if beta == 0 else None,
        value_and_grad=value_and_grad,
    )


def zero_one() -> Cost:
    """``h(z) = 1[z < 0]``: ``OT_h`` is the fraction of quantiles where ``u`` falls below ``v``.

    A metric only: it has no useful gradient, so results computed with it carry none.
    ``h(0) = 0``: tied quantiles are not violations.
    """

    def h(z: Tensor) -> Tensor:
        return (z < 0).to(z.dtype)

    return Cost(h, None, name="zero_one", params={}, differentiable=False, degree=0.0)


def abs_pow(p: float = 1.0) -> Cost:
    """``h(z) = |z|^p`` with ``p >= 1``: ``OT_h`` is the Wasserstein-p distance to the power p.

    The derivative is ``p |z|^(p-1) sign(z)``, taken as ``0`` at ``z = 0``.
    """
    p = _real(p, "p")
    if p < 1:
        raise ValueError(f"p must be >= 1 for abs_pow to be convex, got {p}")

    def h(z: Tensor) -> Tensor:
        return z.abs() if p == 1 else z.abs().pow(p)

    def dh(z: Tensor) -> Tensor:
        return torch.sign(z) if p == 1 else p * z.abs().pow(p - 1) * torch.sign(z)

    def value_and_grad(z: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        if p == 1:
            return z.abs(), torch.sign(z).mul_(scale)
        if p == 2:
            return z.square(), z * (2 * scale)
        a = z.abs()
        return a.pow(p), a.pow(p - 1).mul_(torch.sign(z)).mul_(p * scale)

    return Cost(h, dh, name="abs_pow", params={"p": p}, even=True, degree=p, value_and_grad=value_and_grad)


_FACTORIES: dict[str, Callable[..., Cost]] = {
    "logistic": logistic,
    "hinge": hinge,
    "squared_hinge": squared_hinge,
    "least_squares": least_squares,
    "zero_one": zero_one,
    "abs_pow": abs_pow,
}


def get_cost(cost: str | Cost | Callable[[Tensor], Tensor], **params: float) -> Cost:
    """Turn a name, a :class:`Cost` or a callable ``h`` into a :class:`Cost`.

    Args:
        cost: a built-in name (``"logistic"``, ``"hinge"``, ``"squared_hinge"``,
            ``"least_squares"``, ``"zero_one"``, ``"abs_pow"``), a :class:`Cost`,
            or a callable ``h(z)`` on tensors (its gradient comes from autograd).
        **params: parameters of a built-in named by string, e.g. ``beta=0.01``.
    """
    if isinstance(cost, Cost):
        if params:
            raise ValueError(f"cost {cost!r} already carries its parameters; got extra {sorted(params)}")
        return cost
    if isinstance(cost, str):
        if cost not in _FACTORIES:
            raise ValueError(f"unknown cost {cost!r}; expected one of {sorted(_FACTORIES)}, a Cost or a callable")
        try:
            return _FACTORIES[cost](**params)
        except TypeError as e:
            raise TypeError(f"bad parameters for cost {cost!r}: {e}") from None
    if callable(cost):
        if params:
            raise ValueError(f"a callable cost takes no parameters; got {sorted(params)}")
        return Cost(cost, None, name="custom", params={})
    raise TypeError(f"cost must be a name, a Cost or a callable, got {type(cost).__name__}")
