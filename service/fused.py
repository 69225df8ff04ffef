"""The fast path: each algorithm stepping a contiguous range of flat float32 buffers in place.

A session keeps one flat buffer per state (params, exp_avg, ...). :func:`step_range` updates a range
``[start, stop)`` of all of them at once, for one parameter group at one step number, with one of two backends:

- ``numba`` (:mod:`optserve.service.kernels`): one fused loop, one read and one write of every buffer, at the
  memory-bandwidth limit; the default when numba is installed.
- ``numpy`` (:func:`step_range_numpy`, below): the fallback. The range is walked in cache-sized chunks with in-place
  ufuncs and two scratch vectors, so nothing is allocated per tensor and the working set stays in L2.

Both do :mod:`optserve.service.reference`'s arithmetic operation for operation, so all three agree bit for bit.
``OPTSERVE_KERNEL=numpy`` forces the fallback.

The gradient is only read, never written: it may be a read-only view straight into the request body.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np

from . import kernels
from .hyperparams import AdamHyperparams, Hyperparams, RMSpropHyperparams, SGDHyperparams

CHUNK = 1 << 14  # elements per chunk: 64 KiB per vector, a dozen vectors stay inside a 1-2 MiB L2


def _lerp_(start: np.ndarray, end: np.ndarray, weight: float, tmp: np.ndarray) -> None:
    """start <- lerp(start, end, weight), in place, exactly as reference.lerp evaluates it."""
    np.subtract(end, start, out=tmp)
    if abs(weight) < 0.5:
        tmp *= weight
        start += tmp
    else:
        tmp *= 1 - weight
        np.subtract(end, tmp, out=start)


def _prepare_grad(
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


def _adam_chunk(
    p: np.ndarray,
    g: np.ndarray,
    s: Mapping[str, np.ndarray],
    t: int,
    hp: AdamHyperparams,
    decoupled: bool,
    gbuf: np.ndarray,
    tmp: np.ndarray,
) -> None:
    beta1, beta2 = hp.betas
    if hp.weight_decay != 0 and decoupled:
        p *= 1 - hp.lr * hp.weight_decay
    g = _prepare_grad(p, g, hp.maximize, 0.0 if decoupled else hp.weight_decay, gbuf, tmp)
    m, v = s["exp_avg"], s["exp_avg_sq"]
    _lerp_(m, g, 1 - beta1, tmp)
    v *= beta2
    np.multiply(g, 1 - beta2, out=tmp)
    tmp *= g
    v += tmp
    if hp.amsgrad:
        vmax = s["max_exp_avg_sq"]
        np.maximum(vmax, v, out=vmax)
        v = vmax
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    if hp.eps_root != 0:
        np.add(v, hp.eps_root * bias_correction2, out=tmp)
        np.sqrt(tmp, out=tmp)
    else:
        np.sqrt(v, out=tmp)
    tmp /= math.sqrt(bias_correction2)
    tmp += hp.eps
    np.divide(m, tmp, out=tmp)
    tmp *= hp.lr / bias_correction1
    p -= tmp


def _sgd_chunk(
    p: np.ndarray,
    g: np.ndarray,
    s: Mapping[str, np.ndarray],
    t: int,
    hp: SGDHyperparams,
    gbuf: np.ndarray,
    tmp: np.ndarray,
) -> None:
    g = _prepare_grad(p, g, hp.maximize, hp.weight_decay, gbuf, tmp)
    if hp.momentum != 0:
        buf = s["momentum_buffer"]
        if t == 1:
            buf[...] = g
        else:
            buf *= hp.momentum
            np.multiply(g, 1 - hp.dampening, out=tmp)
            buf += tmp
        if hp.nesterov:
            np.multiply(buf, hp.momentum, out=tmp)
            tmp += g
            g = tmp
        else:
            g = buf
    np.multiply(g, hp.lr, out=tmp)
    p -= tmp


def _rmsprop_chunk(
    p: np.ndarray,
    g: np.ndarray,
    s: Mapping[str, np.ndarray],
    t: int,
    hp: RMSpropHyperparams,
    gbuf: np.ndarray,
    tmp: np.ndarray,
) -> None:
    g = _prepare_grad(p, g, hp.maximize, hp.weight_decay, gbuf, tmp)
    v = s["square_avg"]
    v *= hp.alpha
    np.multiply(g, 1 - hp.alpha, out=tmp)
    tmp *= g
    v += tmp
    # The denominator needs a vector of its own while tmp serves the lerp; gbuf is free once g is consumed,
    # but g may live in gbuf, so the centered case takes a third vector only when it must.
    denom = np.empty_like(tmp) if g is gbuf else gbuf
    if hp.centered:
        a = s["grad_avg"]
        _lerp_(a, g, 1 - hp.alpha, tmp)
        np.multiply(a, a, out=tmp)
        np.subtract(v, tmp, out=denom)
        np.sqrt(denom, out=denom)
    else:
        np.sqrt(v, out=denom)
    denom += hp.eps
    np.divide(g, denom, out=tmp)
    if hp.momentum > 0:
        buf = s["momentum_buffer"]
        buf *= hp.momentum
        buf += tmp
        np.multiply(buf, hp.lr, out=tmp)
    else:
        tmp *= hp.lr
    p -= tmp


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
        if optimizer in ("adam", "adamw"):
            assert isinstance(hp, AdamHyperparams)
            _adam_chunk(p, g, s, t, hp, optimizer == "adamw", gbuf[:n], tmp[:n])
        elif optimizer == "sgd":
            assert isinstance(hp, SGDHyperparams)
            _sgd_chunk(p, g, s, t, hp, gbuf[:n], tmp[:n])
        elif optimizer == "rmsprop":
            assert isinstance(hp, RMSpropHyperparams)
            _rmsprop_chunk(p, g, s, t, hp, gbuf[:n], tmp[:n])
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")


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
    """Apply one step to elements ``[start, stop)`` of the flat buffers, in place, with the fastest backend.

    ``params`` and every array in ``state`` are flat float32 buffers of the session; ``grads`` is a flat float32
    vector of the same length (read only). ``t`` is the step number of every tensor in the range (1 for the first).
    ``grad_scale`` multiplies the gradient first (gradient clipping). Both backends give the same bits.
    """
    if BACKEND == "numba":
        kernels.step_range(optimizer, params, grads, state, start, stop, t, hp, grad_scale)
    else:
        step_range_numpy(optimizer, params, grads, state, start, stop, t, hp, grad_scale)


def warm_up() -> None:
    """Ready the backend before the first step (numba: compile or load the kernels)."""
    if BACKEND == "numba":
        kernels.warm_up()
