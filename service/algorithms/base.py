"""What every algorithm room is made of: the :class:`Algorithm` record, hyperparameter validation and the shared
pieces of arithmetic (torch's ``lerp``, in pure and in-place numpy form).

A room (``adam.py``, ``sgd.py``, ...) holds one algorithm family: its hyperparameter dataclass (torch's names and
defaults), its reference form (pure, one tensor at a time: the oracle), its numpy form (in place, over chunks of flat
buffers, or over one tensor when the algorithm is not elementwise) and its numba kernel, each doing the reference's
arithmetic operation for operation so that all three agree bit for bit. The registry in
:mod:`optserve.service.algorithms` names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a server dependency; the numpy forms remain the fallback
    numba = None  # type: ignore[assignment]

State = Mapping[str, np.ndarray]
Shape = tuple[int, ...]
f32 = np.float32
EMPTY = np.empty(0, np.float32)  # the kernels' stand-in for a buffer the configuration does not use


class HyperparamError(ValueError):
    """An unknown optimizer, an unknown hyperparameter or an invalid value."""


def finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise HyperparamError(f"{name} must be finite, got {value!r}")


def non_negative(name: str, value: float) -> None:
    finite(name, value)
    if value < 0:
        raise HyperparamError(f"Invalid {name}: {value!r} (must be >= 0)")


def unit_interval(name: str, value: float) -> None:
    finite(name, value)
    if not 0.0 <= value < 1.0:
        raise HyperparamError(f"Invalid {name}: {value!r} (must be in [0, 1))")


def check_betas(betas: tuple[float, ...]) -> None:
    if len(betas) != 2:
        raise HyperparamError(f"betas must be a pair [beta1, beta2], got {list(betas)!r}")
    unit_interval("beta parameter at index 0 (betas[0])", betas[0])
    unit_interval("beta parameter at index 1 (betas[1])", betas[1])


def lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """``start + weight * (end - start)``, evaluated the way torch's ``lerp`` does for accuracy near weight 1."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def lerp_(start: np.ndarray, end: np.ndarray, weight: float, tmp: np.ndarray) -> None:
    """start <- lerp(start, end, weight), in place, exactly as :func:`lerp` evaluates it."""
    np.subtract(end, start, out=tmp)
    if abs(weight) < 0.5:
        tmp *= weight
        start += tmp
    else:
        tmp *= 1 - weight
        np.subtract(end, tmp, out=start)


def prepare_grad(
    p: np.ndarray, g: np.ndarray, maximize: bool, l2: float, out: np.ndarray, tmp: np.ndarray
) -> np.ndarray:
    """The effective gradient (negated when maximizing, plus L2 decay), written to ``out`` only if it differs."""
    if not maximize and l2 == 0:
        return g
    if maximize:
        np.negative(g, out=out)
    else:
        out[...] = g
    if l2 != 0:
        np.multiply(p, l2, out=tmp)
        out += tmp
    return out


def njit(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """A numba kernel of ``fn`` (None without numba). nogil: kernels run outside the GIL, so parts of one range,
    and steps of different sessions, run at once; ``error_model="numpy"`` keeps division free of Python's
    ZeroDivisionError checks, which would block vectorization; no ``fastmath`` (it would reorder operations)."""
    if numba is None:
        return None
    return numba.njit(error_model="numpy", nogil=True, cache=True)(fn)  # type: ignore[no-any-return]


# --- finiteness bounds (see optserve.service.finite) ----------------------------------------------------------------

SAFE = 1e36  # float32's largest value is 3.4e38: every bound stays below this, a hundredfold margin
SQRT_SAFE = 1e18  # a gradient bound beyond this may overflow when squared
MARGIN = 1.0001  # relative slack for float32 rounding of the few operations each bound covers
TINY = 1.2e-38  # float32's smallest normal number: below it, a coefficient is what float32 makes of it

Bounds = dict[str, float]  # buffer name ("params", "exp_avg", ...) -> upper bound on its values' magnitudes


class Unprovable(Exception):
    """No bound exists for these hyperparameters: only a dry run can tell."""


def as_f32(x: float) -> float:
    """``x`` as the kernels see it (their coefficients are float32): only tiny values differ in a way that matters
    here (they may become 0)."""
    return x if x >= TINY or x == 0 else float(np.float32(x))


def raise_bound(out: Bounds, name: str, value: float) -> None:
    """Make ``out[name]`` at least ``value`` (with the rounding margin); OverflowError beyond the safe range."""
    value *= MARGIN
    if not value < SAFE:  # also NaN
        raise OverflowError
    if value > out.get(name, 0.0):  # a buffer created by this step (momentum switched on) starts at zero
        out[name] = value


def same_shape(name: str, shape: Shape) -> Shape:
    """The state shape of an elementwise algorithm: every buffer has the parameter's shape."""
    return shape


@dataclass(frozen=True)
class Algorithm:
    """One servable optimizer: its hyperparameters, its state and its three forms.

    - ``reference(p, g, state, t, hp) -> (p, state)``: pure, one tensor (the oracle).
    - Elementwise algorithms (``elementwise=True``): ``numpy(p, g, s, t, hp, gbuf, tmp)`` steps one chunk of flat
      buffers in place (two scratch vectors given); ``numba(p, g, s, t, hp, grad_scale)`` steps a flat range in
      place. Flat buffers may then be cut anywhere (threads, shards).
    - Others: both forms step one tensor in place, ``(p, g, s, t, hp, grad_scale)`` with ``p``, ``g`` and the state
      in their own shapes; a range is stepped tensor by tensor.
    - ``state_shape(name, shape)``: the shape of state buffer ``name`` for a parameter of ``shape`` (the
      parameter's own for elementwise state; Adafactor's row and column factors are not); an empty ``(0,)`` when
      that tensor keeps no such buffer. ``initial``: buffers that start at another value than 0.
    - ``bounds(hp, t, g, bounds, out)``: the finiteness bounds (:mod:`optserve.service.finite`); None: a dry run
      decides every step.
    - ``step_key``: torch's state holds a per-parameter ``step`` (not SGD's).
    """

    name: str
    hyperparams: type
    reference: Callable[..., tuple[np.ndarray, dict[str, np.ndarray]]]
    numpy: Callable[..., None]
    numba: Callable[..., None] | None
    buffers: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    bounds: Callable[..., None] | None = None
    elementwise: bool = True
    state_shape: Callable[[str, Shape], Shape] = same_shape
    initial: Mapping[str, float] = field(default_factory=dict)
    step_key: bool = True

    def state_sizes(self, names: tuple[str, ...] | list[str], shapes: list[Shape]) -> dict[str, int]:
        """Elements of each named state buffer over tensors of ``shapes``."""
        return {n: sum(math.prod(self.state_shape(n, s)) for s in shapes) for n in names}
