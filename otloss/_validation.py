"""Input checks shared by every public function.

Metadata checks (types, layouts, shapes, dtypes, devices, emptiness) are always on:
they cost nothing. Value checks (NaN/Inf, negative weights, weights that do not sum
to a positive number) read tensor values, which forces a host-device
synchronisation on a GPU; like ``torch.distributions`` they follow a per-call
``validate_args`` argument whose default comes from :func:`set_validate_args`.
Under ``torch.func.vmap`` value checks cannot raise (a vmapped function has no
data-dependent control flow): :func:`otloss.ot_h_1d` then returns NaN for each
problem that fails them (see ``docs/behaviour.md``).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

__all__ = ["get_validate_args", "set_validate_args"]

_VALIDATE_ARGS = True

#: the floating dtypes the library computes with (float8 and other exotic dtypes are refused)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def type_name(x: object) -> str:
    """The type of ``x`` as a message shows it: ``float``, ``numpy.float32``, ``torch.Tensor``."""
    t = type(x)
    module = t.__module__
    return t.__qualname__ if module == "builtins" else f"{module.split('.')[0]}.{t.__qualname__}"


def shown(x: object) -> object:
    """``x`` for a message: a NumPy scalar as its Python value (``1``, not ``np.int64(1)``); show it with ``!r``."""
    return x.item() if isinstance(x, np.generic) else x


def real_number(x: object, name: str) -> float:
    """``x`` as a finite Python ``float``: a Python or NumPy real number (not a ``bool``).

    ``TypeError`` for anything else (a tensor, with the fix), ``ValueError`` for NaN, an infinity
    or an integer too large for a float. Range checks are the caller's.
    """
    if isinstance(x, Tensor):
        raise TypeError(f"{name} must be a real number (Python or NumPy scalar), got a Tensor; use float({name})")
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type_name(x)}")
    try:
        value = float(x)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def integer(x: object, name: str) -> int:
    """``x`` as a Python ``int``: a Python or NumPy integer (not a ``bool``); ``TypeError`` otherwise."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type_name(x)}")
    return int(x)


def as_bool(value: object, name: str) -> bool:
    """``value`` as a ``bool``; Python and NumPy booleans are accepted, anything else is a ``TypeError``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type_name(value)} {shown(value)!r}")


def set_validate_args(value: bool) -> None:
    """Set the default of ``validate_args`` for every otloss function.

    Args:
        value: ``True`` (the initial default) checks values for NaN/Inf and weights
            for negativity on every call; ``False`` skips those checks, which avoids
            a host-device synchronisation per call on a GPU. A NumPy bool is accepted.
    """
    global _VALIDATE_ARGS
    _VALIDATE_ARGS = as_bool(value, "set_validate_args: value")


def get_validate_args() -> bool:
    """Return the current default of ``validate_args``."""
    return _VALIDATE_ARGS


def resolve_validate(validate_args: bool | None) -> bool:
    if validate_args is None:
        return _VALIDATE_ARGS
    if isinstance(validate_args, bool):
        return validate_args
    if isinstance(validate_args, np.bool_):
        return bool(validate_args)
    raise TypeError(f"validate_args must be a bool or None, got {type_name(validate_args)} {shown(validate_args)!r}")


def vmap_active() -> bool:
    """Whether this call runs inside ``torch.func.vmap`` (at any level of nested transforms)."""
    try:
        stack = torch._C._functorch.get_interpreter_stack()
    except (AttributeError, RuntimeError):  # a torch without the functorch interpreter stack
        return False
    if not stack:
        return False
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack)


def check_dense_float(x: Tensor, name: str) -> None:
    """A dense (strided, not nested) tensor of a supported floating dtype."""
    if x.layout != torch.strided or x.is_nested:
        kind = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}; convert it with .to_dense()")
    if x.dtype not in SUPPORTED_DTYPES:
        hint = (
            "; cast it with .float() (float8 is a storage format here, not a compute dtype)"
            if x.is_floating_point()
            else ""
        )
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64), got {x.dtype}{hint}"
        )


def check_values_tensor(x: object, name: str, *, min_dim: int = 1) -> Tensor:
    """Metadata checks for a tensor of values: a dense floating tensor, non-empty."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(x)}")
    check_dense_float(x, name)
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got a tensor of shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got a tensor of shape {tuple(x.shape)}")
    return x


def plain_values(tensors: tuple[object, ...]) -> bool:
    """Whether every entry would pass :func:`check_values_tensor` and has the dtype and device of the first.

    One pass of cheap attribute reads for the common call; ``False`` sends the caller to the named
    checks, which raise the error (so messages and their order do not depend on this shortcut).
    """
    first = tensors[0]
    if not isinstance(first, Tensor) or first.dtype not in SUPPORTED_DTYPES:
        return False
    dtype, device = first.dtype, first.device
    for t in tensors:
        if (
            not isinstance(t, Tensor)
            or t.dtype != dtype
            or t.layout != torch.strided
            or t.is_nested
            or t.dim() < 1
            or t.numel() == 0
            or t.device != device
        ):
            return False
    return True


def check_same_dtype_device(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


class NonFiniteError(ValueError):
    """A value check found NaN or Inf (a ``ValueError``; callers may catch it to name the input)."""


def check_finite(x: Tensor, name: str) -> None:
    if x.device.type == "meta":  # no values to check
        return
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise NonFiniteError(
            f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf); "
            "pass finite values, or validate_args=False to skip this check"
        )


def broadcast_weights(
    w: object, values: Tensor, name: str, values_name: str, *, same_device: bool = True
) -> Tensor | None:
    """Metadata checks of a weight tensor (type, dtype, device) and its broadcast to the values' shape."""
    if w is None:
        return None
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type_name(w)}")
    check_dense_float(w, name)
    if same_device and w.device != values.device:
        raise ValueError(f"{name} must be on the same device as {values_name}, got {w.device} and {values.device}")
    try:
        return w.expand(values.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} must have the shape of {values_name} {tuple(values.shape)} or broadcast to it, "
            f"got {tuple(w.shape)}"
        ) from None


def normalise_weights(w: Tensor) -> Tensor:
    """Each row divided by its largest magnitude, in the weights' own dtype (signs kept).

    Done before any cast or cumulative sum, so that huge finite weights (``1e38`` in
    float32, ``1e300`` in float64 for float32 values) neither overflow the sums nor
    the cast; the plan depends on the weights only through their per-row ratios.
    """
    return w / w.abs().amax(dim=-1, keepdim=True)


def check_weights(w: object, values: Tensor, name: str, values_name: str, validate: bool) -> Tensor | None:
    """Check a weight tensor against its values, broadcast it to their shape and normalise it per row."""
    w = broadcast_weights(w, values, name, values_name)
    if w is None:
        return None
    if validate:
        check_weight_values(w, name)
    return normalise_weights(w)


def check_weight_values(w: Tensor, name: str) -> None:
    """The value checks of weights ``[..., n]``: finite, non-negative, a positive sum in every row.

    Run in the weights' own dtype (finite float64 weights may exceed the compute dtype); meta tensors have
    no values to check.
    """
    if w.device.type == "meta":
        return
    check_finite(w, name)
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative, got a minimum of {float(w.min())}")
    if bool((w.sum(-1) <= 0).any()):
        raise ValueError(
            f"{name} must sum to a positive number along the last dimension (each row needs a positive sum)"
        )


def check_pair(
    u: object, v: object, u_weights: object, v_weights: object, validate: bool, *, values: bool = True
) -> tuple[Tensor | None, Tensor | None]:
    """All checks of two weighted samples ``u [..., n]``, ``v [..., m]``; returns the broadcast weights.

    ``values=False`` leaves the NaN/Inf scan of ``u`` and ``v`` to the caller.
    """
    check_values_tensor(u, "u")
    check_values_tensor(v, "v")
    check_same_dtype_device(u, v, "u", "v")
    if u.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"u and v must have the same leading (batch) dimensions, got {tuple(u.shape)} and {tuple(v.shape)}"
        )
    a = check_weights(u_weights, u, "u_weights", "u", validate)
    b = check_weights(v_weights, v, "v_weights", "v", validate)
    if validate and values:
        check_finite(u, "u")
        check_finite(v, "v")
    return a, b


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
