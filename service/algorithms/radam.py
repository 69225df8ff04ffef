"""RAdam (``torch.optim.RAdam``): Adam whose adaptive step is switched on once the variance of its estimate is
tractable, with ``decoupled_weight_decay`` (AdamW's decay) as torch spells it.

With ``g`` negated when ``maximize``, at step ``t``::

    g = g + weight_decay * p              (or p = p * (1 - lr * weight_decay) when decoupled_weight_decay)
    m = lerp(m, g, 1 - b1) ;  v = b2 * v + (1 - b2) * g * g
    rho_inf = 2 / (1 - b2) - 1 ;  rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
    r = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    p = p - m / (1 - b1^t) * lr * sqrt(1 - b2^t) / (sqrt(v) + eps) * r      if rho_t > 5
    p = p - m / (1 - b1^t) * lr                                             otherwise
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import (
    SAFE,
    SQRT_SAFE,
    Bounds,
    State,
    Unprovable,
    as_f32,
    check_betas,
    f32,
    lerp,
    lerp_,
    njit,
    non_negative,
    prepare_grad,
    raise_bound,
)

BUFFERS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class RAdamHyperparams:
    """RAdam, L2 ``weight_decay`` unless ``decoupled_weight_decay``."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        non_negative("learning rate (lr)", self.lr)
        non_negative("epsilon (eps)", self.eps)
        non_negative("weight_decay", self.weight_decay)
        check_betas(self.betas)

    def state_names(self) -> tuple[str, ...]:
        return BUFFERS


def _rectification(beta2: float, t: int) -> float | None:
    """The variance rectification term r at step t (double precision, as torch computes it), None while rho_t <= 5."""
    bias_correction2 = 1 - beta2**t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * (beta2**t) / bias_correction2
    if not rho_t > 5.0:
        return None
    return float(((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5)


def reference(
    p: np.ndarray, g: np.ndarray, state: State, t: int, hp: RAdamHyperparams
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One RAdam step of one tensor."""
    beta1, beta2 = hp.betas
    if hp.maximize:
        g = -g
    if hp.weight_decay != 0:
        if hp.decoupled_weight_decay:
            p = p * (1 - hp.lr * hp.weight_decay)
        else:
            g = g + hp.weight_decay * p
    m = lerp(state["exp_avg"], g, 1 - beta1)
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
    corrected = m / (1 - beta1**t)
    rect = _rectification(beta2, t)
    if rect is None:
        return p - corrected * hp.lr, {"exp_avg": m, "exp_avg_sq": v}
    adaptive = math.sqrt(1 - beta2**t) / (np.sqrt(v) + hp.eps)
    return p - corrected * hp.lr * adaptive * rect, {"exp_avg": m, "exp_avg_sq": v}


def numpy_chunk(
    p: np.ndarray, g: np.ndarray, s: State, t: int, hp: RAdamHyperparams, gbuf: np.ndarray, tmp: np.ndarray
) -> None:
    beta1, beta2 = hp.betas
    decoupled = hp.decoupled_weight_decay
    if hp.weight_decay != 0 and decoupled:
        p *= 1 - hp.lr * hp.weight_decay
    g = prepare_grad(p, g, hp.maximize, 0.0 if decoupled else hp.weight_decay, gbuf, tmp)
    m, v = s["exp_avg"], s["exp_avg_sq"]
    lerp_(m, g, 1 - beta1, tmp)
    v *= beta2
    np.multiply(g, 1 - beta2, out=tmp)
    tmp *= g
    v += tmp
    # g is consumed: gbuf holds the corrected first moment times lr
    np.divide(m, 1 - beta1**t, out=gbuf)
    gbuf *= hp.lr
    rect = _rectification(beta2, t)
    if rect is not None:
        np.sqrt(v, out=tmp)
        tmp += hp.eps
        np.divide(math.sqrt(1 - beta2**t), tmp, out=tmp)
        gbuf *= tmp
        gbuf *= rect
    p -= gbuf


NEGATE, SMALL_W, RECT = 1, 2, 4


def _kernel(p, g, m, v, coef, flags):  # type: ignore[no-untyped-def]
    scale, decay, l2, w, b2, c2, bc1, lr, sqrt_bc2, eps, rect = (
        coef[0], coef[1], coef[2], coef[3], coef[4], coef[5], coef[6], coef[7], coef[8], coef[9], coef[10]
    )  # fmt: skip
    negate, small_w, use_rect = (flags & NEGATE) != 0, (flags & SMALL_W) != 0, (flags & RECT) != 0
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
        x = mi / bc1 * lr
        if use_rect:
            x = x * (sqrt_bc2 / (np.sqrt(vi) + eps))
            x = x * rect
        p[i] = pi - x


_KERNEL = njit(_kernel)


def numba_range(p: np.ndarray, g: np.ndarray, s: State, t: int, hp: RAdamHyperparams, grad_scale: float) -> None:
    beta1, beta2 = hp.betas
    decoupled = hp.decoupled_weight_decay
    w = 1 - beta1
    rect = _rectification(beta2, t)
    coef = np.array(
        [grad_scale, 1 - hp.lr * hp.weight_decay if decoupled else 1.0, 0.0 if decoupled else hp.weight_decay,
         w, beta2, 1 - beta2, 1 - beta1**t, hp.lr, math.sqrt(1 - beta2**t), hp.eps, rect or 0.0],
        dtype=np.float32,
    )  # fmt: skip
    flags = NEGATE * hp.maximize | SMALL_W * (abs(w) < 0.5) | RECT * (rect is not None)
    _KERNEL(p, g, s["exp_avg"], s["exp_avg_sq"], coef, flags)  # type: ignore[misc]


def bounds(hp: RAdamHyperparams, t: int, g: float, b: Bounds, out: Bounds) -> None:
    """Bound ``g + wd * p``, ``g * g``, the moments, the corrected first moment, the smallest denominator and the
    parameter (the rectified step is at most ``m / (1 - b1^t) * lr * sqrt(1 - b2^t) / eps * r``)."""
    beta1, beta2 = hp.betas
    p = b["params"]
    if hp.decoupled_weight_decay:
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
    step = m / (1 - beta1**t) * hp.lr
    rect = _rectification(beta2, t)
    if rect is not None:
        eps = as_f32(hp.eps)
        if eps <= 0:
            raise Unprovable  # sqrt(v) + eps may be 0
        step *= math.sqrt(1 - beta2**t) / eps * rect
    p += step
    if not (step < SAFE and p < SAFE):
        raise OverflowError
    raise_bound(out, "params", p)
    raise_bound(out, "exp_avg", m)
    raise_bound(out, "exp_avg_sq", v)
