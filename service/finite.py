"""Keeping a session finite: a step that would make its parameters or its optimizer state NaN or infinite is refused.

torch writes the infinities (a gradient of 1e22 overflows AdamW's ``exp_avg_sq``; ``eps=0`` with a zero gradient
divides 0 by 0; an ``lr`` of 1e30 overflows the parameters). A session that held them could never step again, and
its snapshot would not load. So each step is first proven harmless, cheaply, from bounds:

- the session keeps, per buffer, an upper bound on the magnitude of its values (exact at creation and load, then
  carried forward by the same arithmetic as the bounds below, in float64 with a margin for float32 rounding);
- with the gradient's global norm (an upper bound on each of its elements, computed for clipping anyway), the step's
  hyperparameters and the step number, a few operations bound every intermediate and result of the update (for
  Adam: ``g + wd * p``, ``g * g``, the moments, the smallest denominator, the parameter);
- when every bound stays well inside float32's range (``SAFE``), the step cannot overflow, and runs as usual.

When a bound is too large, the exact magnitudes are read once (a pass over the buffers) and tried again. When that
fails too, or when no bound exists (``eps = 0``, whose denominator may be 0; centered RMSprop, whose ``v - a * a``
can round below zero; RMSprop with ``alpha > 1``), a dry run steps copies of the ranges chunk by chunk with the
same kernels and checks that every result is finite. Only then is the real step applied: a refused step changes
nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from . import fused
from .hyperparams import AdamHyperparams, Hyperparams, RMSpropHyperparams, SGDHyperparams

SAFE = 1e36  # float32's largest value is 3.4e38: every bound stays below this, a hundredfold margin
SQRT_SAFE = 1e18  # a gradient bound beyond this may overflow when squared
MARGIN = 1.0001  # relative slack for float32 rounding of the few operations each bound covers
GRAD_MARGIN = 1.01  # the norm (float32 dot products) may be a little below the largest gradient element
UNDERFLOW = 1.1e-19  # elements below this square to less than float32's smallest normal: the norm may be 0 for them
DRY_CHUNK = 1 << 16  # elements stepped at a time in a dry run (the copies stay in cache)

Bounds = dict[str, float]  # buffer name ("params", "exp_avg", ...) -> upper bound on its values' magnitudes


class Unprovable(Exception):
    """No bound exists for these hyperparameters: only a dry run can tell."""


def exact(params: np.ndarray, state: Mapping[str, np.ndarray]) -> Bounds:
    """The largest magnitude in each buffer (one pass each); inf if a value is not finite."""
    out = {"params": _max_abs(params)}
    for name, buf in state.items():
        out[name] = _max_abs(buf)
    return out


def _max_abs(x: np.ndarray) -> float:
    if x.size == 0:
        return 0.0
    return max(abs(float(x.max())), abs(float(x.min())))


TINY = 1.2e-38  # float32's smallest normal number: below it, a coefficient is what float32 makes of it


def _f32(x: float) -> float:
    """``x`` as the kernels see it (their coefficients are float32): only tiny values differ in a way that matters
    here (they may become 0)."""
    return x if x >= TINY or x == 0 else float(np.float32(x))


def _adam(hp: AdamHyperparams, decoupled: bool, t: int, g: float, b: Bounds, out: Bounds) -> None:
    beta1, beta2 = hp.betas
    p = b["params"]
    if decoupled:
        if hp.weight_decay:
            p *= abs(1 - hp.lr * hp.weight_decay)
    else:
        g += hp.weight_decay * p
    if g > SQRT_SAFE:
        raise OverflowError
    m, v = b.get("exp_avg", 0.0), b.get("exp_avg_sq", 0.0)
    m = m if m > g else g
    v1 = beta2 * v + (1 - beta2) * g * g
    v = v if v > v1 else v1
    smallest = _f32(hp.eps)  # of the denominators sqrt(v + eps_root * bc2) / sqrt(bc2) + eps, v >= 0
    if hp.eps_root:
        bc2 = 1 - beta2**t
        smallest += math.sqrt(_f32(hp.eps_root * bc2) / bc2) / MARGIN
    if smallest <= 0:
        raise Unprovable  # a zero denominator: 0 / 0 where the moments are 0
    ratio = m / smallest  # m / denom, before the step size multiplies it
    p += hp.lr / (1 - beta1**t) * ratio
    if not (ratio < SAFE and p < SAFE):
        raise OverflowError
    _raise(out, "params", p)
    _raise(out, "exp_avg", m)
    _raise(out, "exp_avg_sq", v)
    if hp.amsgrad:
        _raise(out, "max_exp_avg_sq", v)


def _sgd(hp: SGDHyperparams, t: int, g: float, b: Bounds, out: Bounds) -> None:
    p = b["params"]
    g += hp.weight_decay * p
    if not g < SAFE:  # the gradient with its weight decay, before anything else
        raise OverflowError
    if hp.momentum != 0:
        momentum = abs(hp.momentum)
        buf = momentum * b.get("momentum_buffer", 0.0) + abs(1 - hp.dampening) * g
        buf = buf if buf > g else g
        _raise(out, "momentum_buffer", buf)
        g = g + momentum * buf if hp.nesterov else buf
        if not g < SAFE:
            raise OverflowError
    _raise(out, "params", p + hp.lr * g)


def _rmsprop(hp: RMSpropHyperparams, t: int, g: float, b: Bounds, out: Bounds) -> None:
    if hp.centered or not 0 <= hp.alpha <= 1:
        raise Unprovable  # v - a * a may round below zero; with alpha > 1, v itself goes negative
    p = b["params"]
    g += hp.weight_decay * p
    if g > SQRT_SAFE:
        raise OverflowError
    eps = _f32(hp.eps)
    if eps <= 0:
        raise Unprovable  # sqrt(v) + eps may be 0
    _raise(out, "square_avg", hp.alpha * b.get("square_avg", 0.0) + (1 - hp.alpha) * g * g)
    ratio = g / eps  # |g| / (sqrt(v) + eps)
    if not ratio < SAFE:
        raise OverflowError
    if hp.momentum > 0:
        buf = hp.momentum * b.get("momentum_buffer", 0.0) + ratio
        _raise(out, "momentum_buffer", buf)
        ratio = buf
    _raise(out, "params", p + hp.lr * ratio)


def _raise(out: Bounds, name: str, value: float) -> None:
    """Make ``out[name]`` at least ``value`` (with the rounding margin); OverflowError beyond the safe range."""
    value *= MARGIN
    if not value < SAFE:  # also NaN
        raise OverflowError
    if value > out.get(name, 0.0):  # a buffer created by this step (momentum switched on) starts at zero
        out[name] = value


def step_bounds(optimizer: str, hp: Hyperparams, t: int, grad_bound: float, bounds: Bounds, out: Bounds) -> None:
    """Raise ``out`` (a copy of ``bounds``) to bound the buffers after one step of a range at step number ``t``
    (the smallest of its tensors' numbers) whose gradients are at most ``grad_bound`` in magnitude. Raises
    OverflowError when a bound leaves the safe range and :class:`Unprovable` when these hyperparameters admit no
    bound."""
    if type(hp) is AdamHyperparams:
        _adam(hp, optimizer == "adamw", t, grad_bound, bounds, out)
    elif type(hp) is SGDHyperparams:
        _sgd(hp, t, grad_bound, bounds, out)
    elif type(hp) is RMSpropHyperparams:
        _rmsprop(hp, t, grad_bound, bounds, out)
    else:  # pragma: no cover - every optimizer has its bounds
        raise Unprovable


Run = tuple[int, int, int, Hyperparams]  # start, stop, step number, hyperparameters of a range to step


def dry_run(
    optimizer: str,
    params: np.ndarray,
    grads: np.ndarray,
    state: Mapping[str, np.ndarray],
    runs: Sequence[Run],
    grad_scale: float,
) -> bool:
    """Step copies of ``runs`` chunk by chunk with the real kernels: True if every result is finite."""
    largest = max((stop - start for start, stop, _, _ in runs), default=0)
    n = min(DRY_CHUNK, largest)
    p_copy = np.empty(n, np.float32)
    names = set(state).union(*(hp.state_names() for _, _, _, hp in runs))  # with buffers this step creates
    s_copy = {name: np.empty(n, np.float32) for name in names}
    for start, stop, t, hp in runs:
        for lo in range(start, stop, DRY_CHUNK):
            hi = min(lo + DRY_CHUNK, stop)
            k = hi - lo
            p = p_copy[:k]
            p[:] = params[lo:hi]
            s = {name: buf[:k] for name, buf in s_copy.items()}
            for name, buf in s.items():
                if name in state:
                    buf[:] = state[name][lo:hi]
                else:
                    buf[:] = 0.0
            fused.step_range(optimizer, p, grads[lo:hi], s, 0, k, t, hp, grad_scale)
            if not (np.isfinite(p).all() and all(np.isfinite(buf).all() for buf in s.values())):
                return False
    return True
