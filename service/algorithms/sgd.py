"""SGD (``torch.optim.SGD``): momentum, dampening, Nesterov momentum, L2 weight decay.

With ``g`` negated when ``maximize``::

    g = g + weight_decay * p
    b = g if t == 1 else momentum * b + (1 - dampening) * g      # when momentum != 0
    g = g + momentum * b if nesterov else b
    p = p - lr * g

The momentum buffer starts as the gradient at the tensor's first step with momentum (the step number 1 here; the
session passes 1 when momentum is switched on mid-run, see ``Session.momentum_started``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import (
    EMPTY,
    SAFE,
    Bounds,
    HyperparamError,
    State,
    finite,
    njit,
    non_negative,
    prepare_grad,
    raise_bound,
)


@dataclass(frozen=True)
class SGDHyperparams:
    """SGD with optional momentum, dampening, Nesterov momentum and L2 weight decay."""

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        non_negative("learning rate (lr)", self.lr)
        non_negative("momentum", self.momentum)
        finite("dampening", self.dampening)
        non_negative("weight_decay", self.weight_decay)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise HyperparamError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum != 0 else ()


def reference(
    p: np.ndarray, g: np.ndarray, state: State, t: int, hp: SGDHyperparams
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One SGD step of one tensor (momentum buffer starts as the first gradient, like torch)."""
    if hp.maximize:
        g = -g
    if hp.weight_decay != 0:
        g = g + hp.weight_decay * p
    new_state: dict[str, np.ndarray] = {}
    if hp.momentum != 0:
        buf = g.copy() if t == 1 else state["momentum_buffer"] * hp.momentum + (1 - hp.dampening) * g
        new_state["momentum_buffer"] = buf
        g = g + hp.momentum * buf if hp.nesterov else buf
    return p - hp.lr * g, new_state


def numpy_chunk(
    p: np.ndarray, g: np.ndarray, s: State, t: int, hp: SGDHyperparams, gbuf: np.ndarray, tmp: np.ndarray
) -> None:
    g = prepare_grad(p, g, hp.maximize, hp.weight_decay, gbuf, tmp)
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


NEGATE, HAS_BUF, FIRST, NESTEROV = 1, 2, 4, 8


def _kernel(p, g, buf, coef, flags):  # type: ignore[no-untyped-def]
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


_KERNEL = njit(_kernel)


def numba_range(p: np.ndarray, g: np.ndarray, s: State, t: int, hp: SGDHyperparams, grad_scale: float) -> None:
    has_buf = hp.momentum != 0
    coef = np.array([grad_scale, hp.weight_decay, hp.momentum, 1 - hp.dampening, hp.lr], dtype=np.float32)
    flags = NEGATE * hp.maximize | HAS_BUF * has_buf | FIRST * (t == 1) | NESTEROV * hp.nesterov
    _KERNEL(p, g, s["momentum_buffer"] if has_buf else EMPTY, coef, flags)  # type: ignore[misc]


def bounds(hp: SGDHyperparams, t: int, g: float, b: Bounds, out: Bounds) -> None:
    p = b["params"]
    g += hp.weight_decay * p
    if not g < SAFE:  # the gradient with its weight decay, before anything else
        raise OverflowError
    if hp.momentum != 0:
        momentum = abs(hp.momentum)
        buf = momentum * b.get("momentum_buffer", 0.0) + abs(1 - hp.dampening) * g
        buf = buf if buf > g else g
        raise_bound(out, "momentum_buffer", buf)
        g = g + momentum * buf if hp.nesterov else buf
        if not g < SAFE:
            raise OverflowError
    raise_bound(out, "params", p + hp.lr * g)
