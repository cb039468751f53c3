"""Convex costs ``h(z)`` of the difference ``z = u - v`` between quantiles.

A :class:`Cost` is a small object: ``cost(z)`` evaluates ``h`` elementwise and
``cost.grad(z)`` its derivative, with the (sub)gradient at every kink pinned
down and documented so that hand-written kernels and autograd agree. Each
built-in cost is a small class holding its parameters, ``h``, ``dh``, the
``kernel_id`` the Triton kernels specialise on and ``at_zero`` (``h(0)`` and the
derivative used at ``0``). Built-in costs, and modules holding them, pickle,
deep-copy and go through ``torch.save``/``torch.load(weights_only=False)``; a
checkpoint holding bare built-in costs (not modules) also loads with the default
``weights_only=True``.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from otloss._validation import real_number

__all__ = [
    "AbsPow",
    "Cost",
    "Hinge",
    "LeastSquares",
    "Logistic",
    "SquaredHinge",
    "ZeroOne",
    "abs_pow",
    "get_cost",
    "hinge",
    "least_squares",
    "logistic",
    "squared_hinge",
    "zero_one",
]


class _Checked:
    """A user's ``h`` or ``dh`` with its output checked: a floating tensor of the shape of ``z``.

    A module-level class (not a closure), so a user cost pickles whenever its own functions do.
    """

    __slots__ = ("fn", "what")

    def __init__(self, fn: Callable[[Tensor], Tensor], what: str) -> None:
        self.fn, self.what = fn, what

    def __getstate__(self) -> tuple[Any, str]:
        return self.fn, self.what

    def __setstate__(self, state: tuple[Any, str]) -> None:
        self.fn, self.what = state

    def __call__(self, z: Tensor) -> Tensor:
        return _check_output(self.fn(z), z, self.what)


def _check_output(out: object, z: Tensor, what: str) -> Tensor:
    if not isinstance(out, Tensor) or not out.is_floating_point() or out.shape != z.shape:
        got = f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the cost's {what} must return a floating tensor of the shape of z {tuple(z.shape)} "
            f"(elementwise), got {got}"
        )
    return out


class Cost:
    """A cost ``h`` of ``z = u - v``, built from your own functions.

    The built-in costs (:func:`logistic`, :func:`hinge`, ...) are subclasses; build
    a custom one with ``Cost(h, dh)``. A custom cost pickles (``torch.save``,
    ``copy.deepcopy`` always works) only when ``h`` and ``dh`` do: module-level
    functions do, lambdas and local closures do not.

    Args:
        h: elementwise function of a tensor ``z``, returning a floating tensor of the
            shape of ``z`` (checked on every call: a wrong shape raises ``ValueError``).
            Must be convex for the quantile coupling to be optimal (Santambrogio 2015,
            Thm 2.9); this is not checked.
        dh: its derivative; ``None`` derives it with autograd. When given, the
            reference path computes the gradient in the forward pass from ``dh``
            (one autograd node per call), so ``dh`` must be the derivative of ``h``.
        name: a label used in ``repr``; the built-in names are reserved for the
            built-in costs (the kernels specialise on those).
        params: the cost's parameters, shown in ``repr``.
        differentiable: ``False`` for metric-only costs such as :func:`zero_one`;
            :func:`otloss.ot_h_1d` then returns a value without gradient.
        even: ``h(z) == h(-z)``, so ``OT_h`` is symmetric in ``u, v``.
        degree: ``p`` when ``h(c z) == c**p h(z)`` for ``c > 0``, else ``None``.
        value_and_grad: optional ``(z, scale) -> (h(z), scale * h'(z))`` sharing work
            between the two; ``None`` calls ``h`` and ``dh``.

    Attributes:
        kernel_id: the id the Triton kernels specialise on; ``None`` (every custom
            cost) runs the PyTorch reference.
    """

    name: str = "custom"
    kernel_id: int | None = None
    differentiable: bool = True
    even: bool = False
    degree: float | None = None
    _value_and_grad: Callable[[Tensor, float], tuple[Tensor, Tensor]] | None = None

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
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if name in _FACTORIES:
            raise ValueError(
                f"name {name!r} belongs to the built-in cost otloss.{name}(...); use it, or give your cost another name"
            )
        if value_and_grad is not None and (dh is None or not callable(value_and_grad)):
            raise TypeError("value_and_grad must be callable and comes with dh")
        self.h = _Checked(h, "h")
        self.dh = None if dh is None else _Checked(dh, "dh")
        self.name = name
        self.params = dict(params or {})
        self.differentiable = bool(differentiable)
        self.even = bool(even)
        self.degree = degree
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
        """``(h(z), scale * h'(z))`` elementwise; both stay differentiable when ``z`` requires grad."""
        if self._value_and_grad is not None and not (z.requires_grad and torch.is_grad_enabled()):
            h, d = self._value_and_grad(z, scale)
            return _check_output(h, z, "value_and_grad value"), _check_output(d, z, "value_and_grad gradient")
        return self.h(z), self.grad(z) * scale

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in getattr(self, "params", {}).items())
        return f"{self.name}({args})"


class _Builtin(Cost):
    """A built-in family: equal (and hashing alike) when the family and parameters are.

    Immutable once built: every code path (the reference ``h``/``dh``, the fused logistic path, the kernels,
    ``repr``, equality and hashing) reads the same parameters, so none can see a changed copy.
    """

    def __init__(self, **params: float) -> None:  # no functions to wrap: h and dh are methods
        object.__setattr__(self, "_params", tuple(params.items()))

    @property
    def params(self) -> dict[str, float]:
        return dict(self._params)

    def __setattr__(self, name: str, value: object) -> None:
        if "_params" in self.__dict__:
            raise AttributeError(
                f"{self!r} is immutable: build a new cost, e.g. otloss.{self.name}(...), instead of setting {name!r}"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{self!r} is immutable")

    def value_and_grad(self, z: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        if z.requires_grad and torch.is_grad_enabled():
            return self.h(z), self.dh(z) * scale
        return self.h(z), self.dh(z).mul_(scale)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cost):
            return NotImplemented
        return type(self) is type(other) and self.params == other.params

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self._params))))


class Logistic(_Builtin):
    """See :func:`logistic`. ``h(0) = log 2``, ``h'(0) = -beta (1 - 2 ls) / 2``."""

    name, kernel_id = "logistic", 0

    def __init__(self, beta: float = 1.0, label_smoothing: float = 0.0) -> None:
        self.beta, self.ls = real_number(beta, "beta"), real_number(label_smoothing, "label_smoothing")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 for the logistic cost, got {self.beta}")
        if not 0.0 <= self.ls <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.ls}")
        super().__init__(beta=self.beta, label_smoothing=self.ls)

    def h(self, z: Tensor) -> Tensor:  # as TRL writes it, so values agree to the last bit
        bz = self.beta * z
        return -F.logsigmoid(bz) * (1 - self.ls) - F.logsigmoid(-bz) * self.ls if self.ls else -F.logsigmoid(bz)

    def dh(self, z: Tensor) -> Tensor:  # beta (ls sigmoid(bz) - (1 - ls) sigmoid(-bz)) = beta (ls - sigmoid(-bz))
        s = torch.sigmoid(-self.beta * z)
        return (s - self.ls if self.ls else s).mul(-self.beta)

    @property
    def at_zero(self) -> tuple[float, float]:
        return math.log(2.0), -self.beta * (1 - 2 * self.ls) / 2


class Hinge(_Builtin):
    """See :func:`hinge`. ``h'(beta) = 0`` at the kink."""

    name, kernel_id = "hinge", 1

    def __init__(self, beta: float = 0.0) -> None:
        self.beta = real_number(beta, "beta")
        self.degree = 1.0 if self.beta == 0 else None
        super().__init__(beta=self.beta)

    def h(self, z: Tensor) -> Tensor:
        return torch.relu(self.beta - z)

    def dh(self, z: Tensor) -> Tensor:
        return (z < self.beta).to(z.dtype).neg_()

    @property
    def at_zero(self) -> tuple[float, float]:
        return max(self.beta, 0.0), -1.0 if self.beta > 0 else 0.0


class SquaredHinge(_Builtin):
    """See :func:`squared_hinge`."""

    name, kernel_id = "squared_hinge", 2

    def __init__(self, beta: float = 0.0) -> None:
        self.beta = real_number(beta, "beta")
        self.degree = 2.0 if self.beta == 0 else None
        super().__init__(beta=self.beta)

    def h(self, z: Tensor) -> Tensor:
        return torch.relu(self.beta - z).square()

    def dh(self, z: Tensor) -> Tensor:
        return torch.relu(self.beta - z).mul(-2)

    @property
    def at_zero(self) -> tuple[float, float]:
        return max(self.beta, 0.0) ** 2, -2 * max(self.beta, 0.0)


class LeastSquares(_Builtin):
    """See :func:`least_squares`."""

    name, kernel_id = "least_squares", 3

    def __init__(self, beta: float = 0.0) -> None:
        self.beta = real_number(beta, "beta")
        self.even, self.degree = self.beta == 0, 2.0 if self.beta == 0 else None
        super().__init__(beta=self.beta)

    def h(self, z: Tensor) -> Tensor:
        return (self.beta - z).square()

    def dh(self, z: Tensor) -> Tensor:
        return (z - self.beta).mul(2)

    def value_and_grad(self, z: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        if z.requires_grad and torch.is_grad_enabled():
            return self.h(z), self.dh(z) * scale
        return self.h(z), (z - self.beta).mul_(2 * scale)  # one product: 2 (z - beta) scale, exact in 2

    @property
    def at_zero(self) -> tuple[float, float]:
        return self.beta**2, -2 * self.beta


class ZeroOne(_Builtin):
    """See :func:`zero_one`. A metric: no derivative (``dh`` is ``None``)."""

    name, differentiable, degree, dh = "zero_one", False, 0.0, None

    def h(self, z: Tensor) -> Tensor:
        # NaN stays NaN (a comparison alone would count it as no violation)
        return torch.where(torch.isnan(z), z, (z < 0).to(z.dtype))

    at_zero = (0.0, None)


class AbsPow(_Builtin):
    """See :func:`abs_pow`. ``h'(0) = 0``."""

    name, kernel_id, even = "abs_pow", 4, True

    def __init__(self, p: float = 1.0) -> None:
        self.p = self.degree = real_number(p, "p")
        if self.p < 1:
            raise ValueError(f"p must be >= 1 for abs_pow to be convex, got {self.p}")
        super().__init__(p=self.p)

    def h(self, z: Tensor) -> Tensor:
        return z.abs() if self.p == 1 else z.square() if self.p == 2 else z.abs().pow(self.p)

    def dh(self, z: Tensor) -> Tensor:
        if self.p == 1:
            return torch.sign(z)
        return z.mul(2) if self.p == 2 else z.abs().pow(self.p - 1).mul(torch.sign(z)).mul_(self.p)

    def value_and_grad(self, z: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        if self.p == 2 and not (z.requires_grad and torch.is_grad_enabled()):
            return z.square(), z.mul(2 * scale)  # one product (W2's hot path): 2 z scale
        return super().value_and_grad(z, scale)

    at_zero = (0.0, 0.0)


def logistic(beta: float = 1.0, label_smoothing: float = 0.0) -> Logistic:
    """``h(z) = (1 - ls) * softplus(-beta z) + ls * softplus(beta z)``, computed stably.

    With ``label_smoothing = 0`` this is ``log(1 + exp(-beta z)) = -logsigmoid(beta z)``,
    the loss of DPO and of TRL's ``aot``; ``label_smoothing`` is TRL's conservative
    smoothing (the label is flipped with that probability).

    Args:
        beta: scale, ``> 0``. The default ``1.0`` is the unit scale of a generic loss;
            :func:`otloss.aot_loss` uses the paper's ``0.01`` on sequence log-ratios.
        label_smoothing: in ``[0, 1]``.
    """
    return Logistic(beta, label_smoothing)


def hinge(beta: float = 0.0) -> Hinge:
    """``h(z) = (beta - z)_+``; with ``beta = 0`` ``OT_h`` is the Wasserstein-1 FSD violation.

    The derivative is ``-1`` for ``z < beta`` and ``0`` for ``z >= beta``.
    """
    return Hinge(beta)


def squared_hinge(beta: float = 0.0) -> SquaredHinge:
    """``h(z) = (beta - z)_+^2``; with ``beta = 0`` ``OT_h`` is the squared Wasserstein-2 FSD violation."""
    return SquaredHinge(beta)


def least_squares(beta: float = 0.0) -> LeastSquares:
    """``h(z) = (beta - z)^2`` (the IPO-style loss of the paper). Not a surrogate of 0/1: it also penalises ``z > beta``."""
    return LeastSquares(beta)


def zero_one() -> ZeroOne:
    """``h(z) = 1[z < 0]``: ``OT_h`` is the fraction of quantiles where ``u`` falls below ``v``.

    A metric only: it has no useful gradient, so results computed with it carry none.
    ``h(0) = 0``: tied quantiles are not violations.
    """
    return ZeroOne()


def abs_pow(p: float = 1.0) -> AbsPow:
    """``h(z) = |z|^p`` with ``p >= 1``: ``OT_h`` is the Wasserstein-p distance to the power p.

    The derivative is ``p |z|^(p-1) sign(z)``, taken as ``0`` at ``z = 0``.
    """
    return AbsPow(p)


# Built-in costs hold numbers only: a checkpoint that contains one loads with torch.load's default weights_only=True.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([Logistic, Hinge, SquaredHinge, LeastSquares, ZeroOne, AbsPow])

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
            A name without parameters takes the factory's defaults (``"logistic"``
            means ``beta = 1``).
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
            if "must be" in str(e):  # a parameter's own type check names it
                raise
            raise TypeError(f"bad parameters for cost {cost!r}: {e}") from None
    if isinstance(cost, type):
        raise TypeError(
            f"cost must be a name, a Cost or a callable h(z), got the class {cost.__name__}; instantiate it"
        )
    if callable(cost):
        if params:
            raise ValueError(f"a callable cost takes no parameters; got {sorted(params)}")
        return Cost(cost, None, name="custom", params={})
    raise TypeError(f"cost must be a name, a Cost or a callable, got {type(cost).__name__}")
