"""Running the rooms' numba kernels: a large range split over threads, and the kernels compiled before the first step.

Each algorithm's kernel lives in its room (:mod:`optserve.service.algorithms`): one pass reading p, g and the state
once and writing p and the state once per element, doing the reference's arithmetic in the same order and in
float32, so it agrees with the reference (and with the numpy form) bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from .algorithms import ALGORITHMS, get
from .algorithms.base import numba
from .hyperparams import Hyperparams, make_hyperparams

AVAILABLE = numba is not None
# The steps are memory-bound, and on these machines each core brings its own share of memory bandwidth: two threads
# step 10M AdamW parameters in about half the time of one (bench/run.py). Ranges below PARALLEL_MIN stay on one:
# handing a part to another thread costs some 50 us, about what stepping 500K parameters on one thread saves.
THREADS = int(os.environ.get("OPTSERVE_KERNEL_THREADS", os.cpu_count() or 1))
PARALLEL_MIN = 1 << 19
_EXECUTOR: ThreadPoolExecutor | None = None


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
    threads: int | None = None,
) -> None:
    """The numba twin of :func:`optserve.service.fused.step_range` (same arguments, same results).

    A range of at least ``PARALLEL_MIN`` elements is split into ``threads`` contiguous parts stepped at the same
    time (the kernels release the GIL); every element's arithmetic is unchanged, so the bits are too.
    """
    threads = THREADS if threads is None else threads
    n = stop - start
    if threads <= 1 or n < PARALLEL_MIN:
        _step_one(optimizer, params, grads, state, start, stop, t, hp, grad_scale)
        return
    bounds = [start + (n * i // threads) // 64 * 64 for i in range(threads)] + [stop]
    futures = [  # every part but the first to the pool; the calling thread steps the first one meanwhile
        _executor().submit(_step_one, optimizer, params, grads, state, lo, hi, t, hp, grad_scale)
        for lo, hi in zip(bounds[1:-1], bounds[2:])
    ]
    try:
        _step_one(optimizer, params, grads, state, bounds[0], bounds[1], t, hp, grad_scale)
    finally:
        wait(futures)  # every part done before returning or raising: none may write after the session's lock is freed
    for future in futures:
        future.result()


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=max(THREADS, 2), thread_name_prefix="optserve-kernel")
    return _EXECUTOR


def _step_one(
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
    kernel = get(optimizer).numba
    if kernel is None:
        raise ValueError(f"{optimizer} has no numba kernel over flat ranges")
    s = {name: buf[start:stop] for name, buf in state.items()}
    kernel(params[start:stop], grads[start:stop], s, t, hp, grad_scale)


# Hyperparameters that reach every branch of a kernel's signature (every buffer present)
WARM: dict[str, dict[str, object]] = {
    "sgd": {"momentum": 0.9},
    "rmsprop": {"momentum": 0.5},
    "adamw": {"amsgrad": True},
}


def warm_up() -> None:
    """Compile, or load from numba's on-disk cache, every kernel signature a server uses (writable and read-only
    gradients), so that no step pays for it."""
    from .fused import step_tensors  # noqa: PLC0415 - fused imports this module
    from .layout import FlatLayout  # noqa: PLC0415

    for name, algorithm in ALGORITHMS.items():
        if algorithm.numba is None or name == "adam":  # adam shares adamw's kernel
            continue
        hp = make_hyperparams(name, WARM.get(name, {}))
        for writable in (True, False):
            for shape in ((64,), (8, 8)) if not algorithm.elementwise else ((64,),):
                layout = FlatLayout([("w", shape, 0)])
                grads = np.zeros(64, np.float32)
                grads.flags.writeable = writable
                layouts = {n: layout.for_state(algorithm.state_shape, n) for n in algorithm.buffers}
                state = {n: np.zeros(layouts[n].size, np.float32) for n in hp.state_names()}
                params = np.zeros(64, np.float32)
                if algorithm.elementwise:
                    _step_one(name, params, grads, state, 0, 64, 1, hp)
                else:
                    step_tensors(name, params, grads, state, layout, layouts, 0, 64, 1, hp)
