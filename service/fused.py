"""The fast path: each algorithm stepping the flat float32 buffers of a session in place.

A session keeps one flat buffer per state (params, exp_avg, ...). :func:`step_range` updates a range
``[start, stop)`` of all of them at once, for one parameter group at one step number, with one of two backends:

- ``numba``: the room's fused kernel, one read and one write of every buffer, at the memory-bandwidth limit (split
  over threads for large ranges, :mod:`optserve.service.kernels`); the default when numba is installed.
- ``numpy``: the room's numpy form. The range is walked in cache-sized chunks with in-place ufuncs and two scratch
  vectors, so nothing is allocated per tensor and the working set stays in L2.

An algorithm that is not elementwise (its state is not one float per parameter, or its update reads a whole tensor:
Adafactor, NAdam) is stepped tensor by tensor instead, by :func:`step_tensors`, with state buffers laid out by
their own layouts. Both backends do the reference's arithmetic operation for operation, so all three agree bit for
bit. ``OPTSERVE_KERNEL=numpy`` forces the fallback.

The gradient is only read, never written: it may be a read-only view straight into the request body.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from . import kernels
from .algorithms import get
from .hyperparams import Hyperparams
from .layout import FlatLayout

CHUNK = 1 << 14  # elements per chunk: 64 KiB per vector, a dozen vectors stay inside a 1-2 MiB L2


def step_range_numpy(
    optimizer: str,
    params: np.ndarray,
    grads: np.ndarray,
    state: Mapping[str, np.ndarray],
    start: int,
    stop: int,
    t: int,
    hp: Hyperparams,
    grad_scale: float = 1.0,
) -> None:
    """Apply one step to elements ``[start, stop)`` of the flat buffers, in place, with numpy ufuncs.

    ``params`` and every array in ``state`` are flat float32 buffers of the session; ``grads`` is a flat float32
    vector of the same length (read only). ``t`` is the step number of every tensor in the range (1 for the first).
    ``grad_scale`` multiplies the gradient first (gradient clipping), as ``g * grad_scale`` in float32.
    """
    chunk = get(optimizer).numpy
    gbuf = np.empty(min(CHUNK, stop - start), dtype=np.float32)
    tmp = np.empty_like(gbuf)
    scaled = np.empty_like(gbuf) if grad_scale != 1.0 else None
    for lo in range(start, stop, CHUNK):
        hi = min(lo + CHUNK, stop)
        n = hi - lo
        p, g = params[lo:hi], grads[lo:hi]
        if scaled is not None:
            g = np.multiply(g, np.float32(grad_scale), out=scaled[:n])
        s = {name: buf[lo:hi] for name, buf in state.items()}
        chunk(p, g, s, t, hp, gbuf[:n], tmp[:n])


def _backend() -> str:
    choice = os.environ.get("OPTSERVE_KERNEL", "auto").lower()
    if choice not in ("auto", "numba", "numpy"):
        raise ValueError(f"OPTSERVE_KERNEL must be auto, numba or numpy, got {choice!r}")
    if choice == "numpy" or (choice == "auto" and not kernels.AVAILABLE):
        return "numpy"
    if not kernels.AVAILABLE:
        raise RuntimeError("OPTSERVE_KERNEL=numba but numba is not installed")
    return "numba"


BACKEND = _backend()  # "numba" (one fused pass per range) or "numpy" (the chunked ufunc fallback)


def step_range(
    optimizer: str,
    params: np.ndarray,
    grads: np.ndarray,
    state: Mapping[str, np.ndarray],
    start: int,
    stop: int,
    t: int,
    hp: Hyperparams,
    grad_scale: float = 1.0,
) -> None:
    """Apply one step of an elementwise algorithm to elements ``[start, stop)`` of the flat buffers, in place.

    ``params`` and every array in ``state`` are flat float32 buffers of the session; ``grads`` is a flat float32
    vector of the same length (read only). ``t`` is the step number of every tensor in the range (1 for the first).
    ``grad_scale`` multiplies the gradient first (gradient clipping). Both backends give the same bits.
    """
    if BACKEND == "numba":
        kernels.step_range(optimizer, params, grads, state, start, stop, t, hp, grad_scale)
    else:
        step_range_numpy(optimizer, params, grads, state, start, stop, t, hp, grad_scale)


def step_tensors(
    optimizer: str,
    params: np.ndarray,
    grads: np.ndarray,
    state: Mapping[str, np.ndarray],
    layout: FlatLayout,
    state_layouts: Mapping[str, FlatLayout],
    start: int,
    stop: int,
    t: int,
    hp: Hyperparams,
    grad_scale: float = 1.0,
) -> None:
    """Apply one step to the tensors whose elements lie in ``[start, stop)``, one at a time, in place: each gets its
    parameter and gradient in its shape and each state buffer's part in the shape ``state_layouts[name]`` gives.
    Any algorithm can be stepped so; one that is not elementwise must be."""
    algorithm = get(optimizer)
    form = algorithm.numba if BACKEND == "numba" and algorithm.numba is not None else algorithm.numpy
    for i, slot in enumerate(layout.slots):
        if slot.offset < start or slot.stop > stop or slot.size == 0:  # an empty tensor has nothing to step
            continue
        p = params[slot.offset : slot.stop].reshape(slot.shape)
        g = grads[slot.offset : slot.stop].reshape(slot.shape)
        s = {}
        for name, buf in state.items():
            part = state_layouts[name].slots[i]
            s[name] = buf[part.offset : part.stop].reshape(part.shape)
        form(p, g, s, t, hp, grad_scale)


def step_run(
    optimizer: str,
    params: np.ndarray,
    grads: np.ndarray,
    state: Mapping[str, np.ndarray],
    layout: FlatLayout,
    state_layouts: Mapping[str, FlatLayout],
    start: int,
    stop: int,
    t: int,
    hp: Hyperparams,
    grad_scale: float = 1.0,
) -> None:
    """One step of a session's range: :func:`step_range` for an elementwise algorithm, else :func:`step_tensors`."""
    if get(optimizer).elementwise:
        step_range(optimizer, params, grads, state, start, stop, t, hp, grad_scale)
    else:
        step_tensors(optimizer, params, grads, state, layout, state_layouts, start, stop, t, hp, grad_scale)


def warm_up() -> None:
    """Ready the backend before the first step (numba: compile or load the kernels)."""
    if BACKEND == "numba":
        kernels.warm_up()
