"""Fused numba kernels: one pass over the flat buffers per step, at the memory-bandwidth limit.

Each kernel reads p, g and the state once and writes p and the state once per element, doing the arithmetic of
:mod:`optserve.service.reference` in the same order and in float32, so it agrees with the reference (and with the
numpy chunked path) bit for bit. ``error_model="numpy"`` keeps division free of Python's ZeroDivisionError checks,
which would otherwise block vectorization; there is no ``fastmath`` (it would reorder and contract operations).

The scalar coefficients are computed once per call in Python (double precision, as numpy computes them from Python
floats) and passed in as float32, exactly the values numpy's weak-scalar rule would use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from .hyperparams import AdamHyperparams, Hyperparams, RMSpropHyperparams, SGDHyperparams, make_hyperparams

try:
    import numba
except ImportError:  # pragma: no cover - numba is a server dependency; the numpy path remains the fallback
    numba = None  # type: ignore[assignment]

AVAILABLE = numba is not None
f32 = np.float32
# The steps are memory-bound, and on these machines each core brings its own share of memory bandwidth: two threads
# step 10M AdamW parameters in about half the time of one (bench/run.py). Ranges below PARALLEL_MIN stay on one:
# handing a part to another thread costs some 50 us, about what stepping 500K parameters on one thread saves.
THREADS = int(os.environ.get("OPTSERVE_KERNEL_THREADS", os.cpu_count() or 1))
PARALLEL_MIN = 1 << 19
_EXECUTOR: ThreadPoolExecutor | None = None


# The kernels take their scalars packed in one float32 array and their switches in one int: numba types every
# argument on every call, and for a small step that typing cost more than the arithmetic.
AMSGRAD, NEGATE, SMALL_W, HAS_BUF, FIRST, NESTEROV, CENTERED, MOMENTUM = (1 << i for i in range(8))


def _adam(p, g, m, v, vmax, coef, flags):  # type: ignore[no-untyped-def]
    scale, decay, l2, w, b2, c2, eps_root_bc2, sqrt_bc2, eps, step_size = (
        coef[0], coef[1], coef[2], coef[3], coef[4], coef[5], coef[6], coef[7], coef[8], coef[9]
    )  # fmt: skip
    amsgrad, negate, small_w = (flags & AMSGRAD) != 0, (flags & NEGATE) != 0, (flags & SMALL_W) != 0
    one = f32(1.0)
    for i in range(p.size):
        gi = g[i] * scale
        if negate:
            gi = -gi
        pi = p[i] * decay
        gi = gi + l2 * pi
        mi = m[i]
        mi = mi + w * (gi - mi) if small_w else gi - (gi - mi) * (one - w)
        vi = v[i] * b2 + c2 * gi * gi
        m[i] = mi
        v[i] = vi
        if amsgrad:
            if vmax[i] > vi:
                vi = vmax[i]
            vmax[i] = vi
        denom = np.sqrt(vi + eps_root_bc2) / sqrt_bc2 + eps
        p[i] = pi - step_size * (mi / denom)


def _sgd(p, g, buf, coef, flags):  # type: ignore[no-untyped-def]
    scale, l2, momentum, damp, lr = coef[0], coef[1], coef[2], coef[3], coef[4]
    negate, has_buf = (flags & NEGATE) != 0, (flags & HAS_BUF) != 0
    first, nesterov = (flags & FIRST) != 0, (flags & NESTEROV) != 0
    for i in range(p.size):
        gi = g[i] * scale
        if negate:
            gi = -gi
        pi = p[i]
        gi = gi + l2 * pi
        if has_buf:
            bi = gi if first else buf[i] * momentum + damp * gi
            buf[i] = bi
            gi = gi + momentum * bi if nesterov else bi
        p[i] = pi - lr * gi


def _rmsprop(p, g, sq, buf, gavg, coef, flags):  # type: ignore[no-untyped-def]
    scale, l2, alpha, c_alpha, w, momentum, eps, lr = (
        coef[0], coef[1], coef[2], coef[3], coef[4], coef[5], coef[6], coef[7]
    )  # fmt: skip
    negate, small_w = (flags & NEGATE) != 0, (flags & SMALL_W) != 0
    centered, use_momentum = (flags & CENTERED) != 0, (flags & MOMENTUM) != 0
    one = f32(1.0)
    for i in range(p.size):
        gi = g[i] * scale
        if negate:
            gi = -gi
        pi = p[i]
        gi = gi + l2 * pi
        vi = sq[i] * alpha + c_alpha * gi * gi
        sq[i] = vi
        if centered:
            ai = gavg[i]
            ai = ai + w * (gi - ai) if small_w else gi - (gi - ai) * (one - w)
            gavg[i] = ai
            denom = np.sqrt(vi - ai * ai) + eps
        else:
            denom = np.sqrt(vi) + eps
        if use_momentum:
            bi = buf[i] * momentum + gi / denom
            buf[i] = bi
            p[i] = pi - lr * bi
        else:
            p[i] = pi - lr * (gi / denom)


if AVAILABLE:
    # nogil: the kernels run outside the GIL, so parts of one range, and steps of different sessions, run at once.
    _KERNELS = {
        name: numba.njit(error_model="numpy", nogil=True, cache=True)(fn)
        for name, fn in (("adam", _adam), ("sgd", _sgd), ("rmsprop", _rmsprop))
    }


_EMPTY = np.empty(0, np.float32)


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
    p, g = params[start:stop], grads[start:stop]
    s = {name: buf[start:stop] for name, buf in state.items()}
    if isinstance(hp, AdamHyperparams):
        beta1, beta2 = hp.betas
        decoupled = optimizer == "adamw"
        w = 1 - beta1
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        coef = np.array(
            [grad_scale, 1 - hp.lr * hp.weight_decay if decoupled else 1.0, 0.0 if decoupled else hp.weight_decay,
             w, beta2, 1 - beta2, hp.eps_root * bc2, math.sqrt(bc2), hp.eps, hp.lr / bc1],
            dtype=np.float32,
        )  # fmt: skip
        flags = AMSGRAD * hp.amsgrad | NEGATE * hp.maximize | SMALL_W * (abs(w) < 0.5)
        _KERNELS["adam"](p, g, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq", _EMPTY), coef, flags)
    elif isinstance(hp, SGDHyperparams):
        has_buf = hp.momentum != 0
        coef = np.array([grad_scale, hp.weight_decay, hp.momentum, 1 - hp.dampening, hp.lr], dtype=np.float32)
        flags = NEGATE * hp.maximize | HAS_BUF * has_buf | FIRST * (t == 1) | NESTEROV * hp.nesterov
        _KERNELS["sgd"](p, g, s["momentum_buffer"] if has_buf else _EMPTY, coef, flags)
    elif isinstance(hp, RMSpropHyperparams):
        w = 1 - hp.alpha
        coef = np.array(
            [grad_scale, hp.weight_decay, hp.alpha, 1 - hp.alpha, w, hp.momentum, hp.eps, hp.lr], dtype=np.float32
        )
        flags = NEGATE * hp.maximize | SMALL_W * (abs(w) < 0.5) | CENTERED * hp.centered | MOMENTUM * (hp.momentum > 0)
        _KERNELS["rmsprop"](
            p, g, s["square_avg"], s.get("momentum_buffer", _EMPTY), s.get("grad_avg", _EMPTY), coef, flags
        )
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")


def warm_up() -> None:
    """Compile, or load from numba's on-disk cache, every kernel signature a server uses (writable and read-only
    gradients), so that no step pays for it."""
    for optimizer, values in (("adamw", {"amsgrad": True}), ("sgd", {"momentum": 0.9}), ("rmsprop", {"momentum": 0.5})):
        hp = make_hyperparams(optimizer, values)
        for writable in (True, False):
            grads = np.zeros(64, np.float32)
            grads.flags.writeable = writable
            state = {name: np.zeros(64, np.float32) for name in hp.state_names()}
            _step_one(optimizer, np.zeros(64, np.float32), grads, state, 0, 64, 1, hp)
