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
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .hyperparams import AdamHyperparams, Hyperparams, RMSpropHyperparams, SGDHyperparams

try:
    import numba
except ImportError:  # pragma: no cover - numba is a server dependency; the numpy path remains the fallback
    numba = None  # type: ignore[assignment]

AVAILABLE = numba is not None
f32 = np.float32
# The steps are memory-bound, and on these machines each core brings its own share of memory bandwidth: two threads
# step 10M AdamW parameters in about half the time of one (bench/run.py). Ranges below PARALLEL_MIN stay on one.
THREADS = int(os.environ.get("OPTSERVE_KERNEL_THREADS", os.cpu_count() or 1))
PARALLEL_MIN = 1 << 20
_EXECUTOR: ThreadPoolExecutor | None = None


def _adam(p, g, m, v, vmax, amsgrad, scale, negate, decay, l2, w, small_w, b2, c2, eps_root_bc2, sqrt_bc2, eps,
          step_size):  # fmt: skip
    for i in range(p.size):
        gi = g[i] * scale
        if negate:
            gi = -gi
        pi = p[i] * decay
        gi = gi + l2 * pi
        mi = m[i]
        mi = mi + w * (gi - mi) if small_w else gi - (gi - mi) * (f32(1.0) - w)
        vi = v[i] * b2 + c2 * gi * gi
        m[i] = mi
        v[i] = vi
        if amsgrad:
            if vmax[i] > vi:
                vi = vmax[i]
            vmax[i] = vi
        denom = np.sqrt(vi + eps_root_bc2) / sqrt_bc2 + eps
        p[i] = pi - step_size * (mi / denom)


def _sgd(p, g, buf, has_buf, first, scale, negate, l2, momentum, damp, nesterov, lr):  # fmt: skip
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


def _rmsprop(p, g, sq, buf, gavg, scale, negate, l2, alpha, c_alpha, w, small_w, centered, momentum, use_momentum,
             eps, lr):  # fmt: skip
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
            ai = ai + w * (gi - ai) if small_w else gi - (gi - ai) * (f32(1.0) - w)
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


def _empty() -> np.ndarray:
    return np.empty(0, np.float32)


def step_range(
    optimizer: str,
    params: np.ndarray,
    grads: np.ndarray,
    state: dict[str, np.ndarray],
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
    futures = [
        _executor().submit(_step_one, optimizer, params, grads, state, lo, hi, t, hp, grad_scale)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
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
    state: dict[str, np.ndarray],
    start: int,
    stop: int,
    t: int,
    hp: Hyperparams,
    grad_scale: float = 1.0,
) -> None:
    p, g = params[start:stop], grads[start:stop]
    s = {name: buf[start:stop] for name, buf in state.items()}
    scale = f32(grad_scale)
    if isinstance(hp, AdamHyperparams):
        beta1, beta2 = hp.betas
        decoupled = optimizer == "adamw"
        w = 1 - beta1
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        _KERNELS["adam"](
            p, g, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq", _empty()), hp.amsgrad, scale,
            hp.maximize, f32(1 - hp.lr * hp.weight_decay) if decoupled else f32(1.0),
            f32(0.0) if decoupled else f32(hp.weight_decay), f32(w), abs(w) < 0.5, f32(beta2), f32(1 - beta2),
            f32(hp.eps_root * bc2), f32(math.sqrt(bc2)), f32(hp.eps), f32(hp.lr / bc1),
        )  # fmt: skip
    elif isinstance(hp, SGDHyperparams):
        has_buf = hp.momentum != 0
        _KERNELS["sgd"](
            p, g, s["momentum_buffer"] if has_buf else _empty(), has_buf, t == 1, scale, hp.maximize,
            f32(hp.weight_decay), f32(hp.momentum), f32(1 - hp.dampening), hp.nesterov, f32(hp.lr),
        )  # fmt: skip
    elif isinstance(hp, RMSpropHyperparams):
        w = 1 - hp.alpha
        _KERNELS["rmsprop"](
            p, g, s["square_avg"], s.get("momentum_buffer", _empty()), s.get("grad_avg", _empty()), scale,
            hp.maximize, f32(hp.weight_decay), f32(hp.alpha), f32(1 - hp.alpha), f32(w), abs(w) < 0.5, hp.centered,
            f32(hp.momentum), hp.momentum > 0, f32(hp.eps), f32(hp.lr),
        )  # fmt: skip
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
