"""RMSprop (``torch.optim.RMSprop``): momentum, centering, L2 weight decay.

With ``g`` negated when ``maximize``::

    g = g + weight_decay * p
    v = alpha * v + (1 - alpha) * g * g
    a = alpha * a + (1 - alpha) * g ;  d = sqrt(v - a * a) + eps    # centered
    d = sqrt(v) + eps                                               # otherwise
    b = momentum * b + g / d ;  p = p - lr * b                      # when momentum > 0
    p = p - lr * g / d                                              # otherwise
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import (
    EMPTY,
    SAFE,
    SQRT_SAFE,
    Bounds,
    State,
    Unprovable,
    as_f32,
    f32,
    lerp,
    lerp_,
    njit,
    non_negative,
    prepare_grad,
    raise_bound,
)


@dataclass(frozen=True)
class RMSpropHyperparams:
    """RMSprop with optional momentum, centering and L2 weight decay."""

    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        non_negative("learning rate (lr)", self.lr)
        non_negative("alpha", self.alpha)
        non_negative("epsilon (eps)", self.eps)
        non_negative("weight_decay", self.weight_decay)
        non_negative("momentum", self.momentum)

    def state_names(self) -> tuple[str, ...]:
        names = ["square_avg"]
        if self.momentum > 0:
            names.append("momentum_buffer")
        if self.centered:
            names.append("grad_avg")
        return tuple(names)


def reference(
    p: np.ndarray, g: np.ndarray, state: State, t: int, hp: RMSpropHyperparams
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One RMSprop step of one tensor."""
    if hp.maximize:
        g = -g
    if hp.weight_decay != 0:
        g = g + hp.weight_decay * p
    v = state["square_avg"] * hp.alpha + (1 - hp.alpha) * g * g
    new_state = {"square_avg": v}
    if hp.centered:
        a = lerp(state["grad_avg"], g, 1 - hp.alpha)
        new_state["grad_avg"] = a
        denom = np.sqrt(v - a * a) + hp.eps
    else:
        denom = np.sqrt(v) + hp.eps
    if hp.momentum > 0:
        buf = state["momentum_buffer"] * hp.momentum + g / denom
        new_state["momentum_buffer"] = buf
        return p - hp.lr * buf, new_state
    return p - hp.lr * (g / denom), new_state


def numpy_chunk(
    p: np.ndarray, g: np.ndarray, s: State, t: int, hp: RMSpropHyperparams, gbuf: np.ndarray, tmp: np.ndarray
) -> None:
    g = prepare_grad(p, g, hp.maximize, hp.weight_decay, gbuf, tmp)
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
        lerp_(a, g, 1 - hp.alpha, tmp)
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


NEGATE, SMALL_W, CENTERED, MOMENTUM = 1, 2, 4, 8


def _kernel(p, g, sq, buf, gavg, coef, flags):  # type: ignore[no-untyped-def]
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


_KERNEL = njit(_kernel)


def numba_range(p: np.ndarray, g: np.ndarray, s: State, t: int, hp: RMSpropHyperparams, grad_scale: float) -> None:
    w = 1 - hp.alpha
    coef = np.array(
        [grad_scale, hp.weight_decay, hp.alpha, 1 - hp.alpha, w, hp.momentum, hp.eps, hp.lr], dtype=np.float32
    )
    flags = NEGATE * hp.maximize | SMALL_W * (abs(w) < 0.5) | CENTERED * hp.centered | MOMENTUM * (hp.momentum > 0)
    _KERNEL(p, g, s["square_avg"], s.get("momentum_buffer", EMPTY), s.get("grad_avg", EMPTY), coef, flags)  # type: ignore[misc]


def bounds(hp: RMSpropHyperparams, t: int, g: float, b: Bounds, out: Bounds) -> None:
    if hp.centered or not 0 <= hp.alpha <= 1:
        raise Unprovable  # v - a * a may round below zero; with alpha > 1, v itself goes negative
    p = b["params"]
    g += hp.weight_decay * p
    if g > SQRT_SAFE:
        raise OverflowError
    eps = as_f32(hp.eps)
    if eps <= 0:
        raise Unprovable  # sqrt(v) + eps may be 0
    raise_bound(out, "square_avg", hp.alpha * b.get("square_avg", 0.0) + (1 - hp.alpha) * g * g)
    ratio = g / eps  # |g| / (sqrt(v) + eps)
    if not ratio < SAFE:
        raise OverflowError
    if hp.momentum > 0:
        buf = hp.momentum * b.get("momentum_buffer", 0.0) + ratio
        raise_bound(out, "momentum_buffer", buf)
        ratio = buf
    raise_bound(out, "params", p + hp.lr * ratio)
