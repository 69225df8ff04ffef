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

from collections.abc import Mapping, Sequence

import numpy as np

from . import fused
from .algorithms import get
from .algorithms.base import MARGIN, SAFE, SQRT_SAFE, TINY, Bounds, Unprovable
from .hyperparams import Hyperparams
from .layout import FlatLayout

__all__ = ["MARGIN", "SAFE", "SQRT_SAFE", "TINY", "Bounds", "Run", "Unprovable", "dry_run", "exact", "step_bounds"]

GRAD_MARGIN = 1.01  # the norm (float32 dot products) may be a little below the largest gradient element
UNDERFLOW = 1.1e-19  # elements below this square to less than float32's smallest normal: the norm may be 0 for them
DRY_CHUNK = 1 << 16  # elements stepped at a time in a dry run (the copies stay in cache)


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


def step_bounds(optimizer: str, hp: Hyperparams, t: int, grad_bound: float, bounds: Bounds, out: Bounds) -> None:
    """Raise ``out`` (a copy of ``bounds``) to bound the buffers after one step of a range at step number ``t``
    (the smallest of its tensors' numbers) whose gradients are at most ``grad_bound`` in magnitude, with the
    algorithm's own bounds (its room's ``bounds``). Raises OverflowError when a bound leaves the safe range and
    :class:`Unprovable` when these hyperparameters, or this algorithm, admit no bound."""
    algorithm = get(optimizer)
    if algorithm.bounds is None or type(hp) is not algorithm.hyperparams:
        raise Unprovable
    algorithm.bounds(hp, t, grad_bound, bounds, out)


Run = tuple[int, int, int, Hyperparams]  # start, stop, step number, hyperparameters of a range to step


def dry_run(
    optimizer: str,
    params: np.ndarray,
    grads: np.ndarray,
    state: Mapping[str, np.ndarray],
    runs: Sequence[Run],
    grad_scale: float,
    layout: FlatLayout | None = None,
    state_layouts: Mapping[str, FlatLayout] | None = None,
) -> bool:
    """Step copies of ``runs`` with the real kernels: True if every result is finite. An elementwise algorithm's
    copies are chunks; any other's are whole tensors (``layout`` and ``state_layouts`` say where they lie). Overflows
    are what a dry run looks for: numpy's warnings about them are silenced."""
    with np.errstate(all="ignore"):
        return _dry_run(optimizer, params, grads, state, runs, grad_scale, layout, state_layouts)


def _dry_run(
    optimizer: str,
    params: np.ndarray,
    grads: np.ndarray,
    state: Mapping[str, np.ndarray],
    runs: Sequence[Run],
    grad_scale: float,
    layout: FlatLayout | None,
    state_layouts: Mapping[str, FlatLayout] | None,
) -> bool:
    algorithm = get(optimizer)
    names = set(state).union(*(hp.state_names() for _, _, _, hp in runs))  # with buffers this step creates
    if not algorithm.elementwise:
        assert layout is not None and state_layouts is not None
        return _dry_run_tensors(optimizer, params, grads, state, runs, grad_scale, layout, state_layouts, names)
    largest = max((stop - start for start, stop, _, _ in runs), default=0)
    n = min(DRY_CHUNK, largest)
    p_copy = np.empty(n, np.float32)
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
                    buf[:] = algorithm.initial.get(name, 0.0)
            fused.step_range(optimizer, p, grads[lo:hi], s, 0, k, t, hp, grad_scale)
            if not (np.isfinite(p).all() and all(np.isfinite(buf).all() for buf in s.values())):
                return False
    return True


def _dry_run_tensors(
    optimizer: str,
    params: np.ndarray,
    grads: np.ndarray,
    state: Mapping[str, np.ndarray],
    runs: Sequence[Run],
    grad_scale: float,
    layout: FlatLayout,
    state_layouts: Mapping[str, FlatLayout],
    names: set[str],
) -> bool:
    algorithm = get(optimizer)
    for start, stop, t, hp in runs:
        for i, slot in enumerate(layout.slots):
            if slot.offset < start or slot.stop > stop or slot.size == 0:
                continue
            one = FlatLayout([(slot.name, slot.shape, 0)])
            p = params[slot.offset : slot.stop].copy()
            s = {}
            for name in names:
                part = state_layouts[name].slots[i]
                if name in state:
                    s[name] = state[name][part.offset : part.stop].copy()
                else:
                    s[name] = np.full(part.size, algorithm.initial.get(name, 0.0), np.float32)
            one_layouts = {name: FlatLayout([(slot.name, state_layouts[name].slots[i].shape, 0)]) for name in names}
            g = grads[slot.offset : slot.stop]
            fused.step_tensors(optimizer, p, g, s, one, one_layouts, 0, slot.size, t, hp, grad_scale)
            if not (np.isfinite(p).all() and all(np.isfinite(buf).all() for buf in s.values())):
                return False
    return True
