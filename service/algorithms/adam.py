"""Adam and AdamW (``torch.optim.Adam``/``AdamW``): one family, AdamW being Adam with decoupled weight decay.

With ``g`` negated when ``maximize``, at step ``t`` (1 for the first)::

    Adam (L2):  g = g + weight_decay * p
    AdamW:      p = p * (1 - lr * weight_decay)            # decoupled, applied to p_{t-1}
    m = b1 * m + (1 - b1) * g                              # torch's lerp
    v = b2 * v + (1 - b2) * g * g
    v_use = max(v_max, v) if amsgrad (and v_max = v_use) else v
    p = p - lr / (1 - b1^t) * m / (sqrt(v_use / (1 - b2^t) + eps_root) + eps)

``eps_root`` (optax's name) puts a term under the square root. The registry entries ``adam`` and ``adamw`` are the
one place deciding which of the two decays a name means (``decoupled``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .base import (
    EMPTY,
    MARGIN,
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

BUFFERS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True)
class AdamHyperparams:
    """Adam / AdamW. ``weight_decay`` is L2 (added to the gradient) for ``adam``, decoupled for ``adamw``."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    maximize: bool = False
    eps_root: float = 0.0

    def __post_init__(self) -> None:
        non_negative("learning rate (lr)", self.lr)
        non_negative("epsilon (eps)", self.eps)
        non_negative("eps_root", self.eps_root)
        non_negative("weight_decay", self.weight_decay)
        check_betas(self.betas)

    def state_names(self) -> tuple[str, ...]:
        return BUFFERS if self.amsgrad else BUFFERS[:2]


def reference(
    p: np.ndarray, g: np.ndarray, state: State, t: int, hp: AdamHyperparams, decoupled: bool
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One Adam (``decoupled=False``) or AdamW (``decoupled=True``) step of one tensor."""
    beta1, beta2 = hp.betas
    if hp.maximize:
        g = -g
    if hp.weight_decay != 0:
        if decoupled:
            p = p * (1 - hp.lr * hp.weight_decay)
        else:
            g = g + hp.weight_decay * p
    m = lerp(state["exp_avg"], g, 1 - beta1)
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
    new_state = {"exp_avg": m, "exp_avg_sq": v}
    if hp.amsgrad:
        v = np.maximum(state["max_exp_avg_sq"], v)
        new_state["max_exp_avg_sq"] = v
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    # sqrt(v / bc2 + eps_root) written as sqrt(v + eps_root * bc2) / sqrt(bc2): equal, and torch's form when eps_root=0.
    denom = np.sqrt(v + hp.eps_root * bias_correction2) / math.sqrt(bias_correction2) + hp.eps
    p = p - (hp.lr / bias_correction1) * (m / denom)
    return p, new_state


def numpy_chunk(
    p: np.ndarray,
    g: np.ndarray,
    s: State,
    t: int,
    hp: AdamHyperparams,
    gbuf: np.ndarray,
    tmp: np.ndarray,
    decoupled: bool,
) -> None:
    beta1, beta2 = hp.betas
    if hp.weight_decay != 0 and decoupled:
        p *= 1 - hp.lr * hp.weight_decay
    g = prepare_grad(p, g, hp.maximize, 0.0 if decoupled else hp.weight_decay, gbuf, tmp)
    m, v = s["exp_avg"], s["exp_avg_sq"]
    lerp_(m, g, 1 - beta1, tmp)
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


# The kernels take their scalars packed in one float32 array and their switches in one int: numba types every
# argument on every call, and for a small step that typing cost more than the arithmetic.
AMSGRAD, NEGATE, SMALL_W = 1, 2, 4


def _kernel(p, g, m, v, vmax, coef, flags):  # type: ignore[no-untyped-def]
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


_KERNEL = njit(_kernel)


def numba_range(
    p: np.ndarray, g: np.ndarray, s: State, t: int, hp: AdamHyperparams, grad_scale: float, decoupled: bool
) -> None:
    """The kernel over a flat range; the scalar coefficients computed once, in double precision as numpy computes
    them from Python floats, and passed as float32, exactly the values numpy's weak-scalar rule uses."""
    beta1, beta2 = hp.betas
    w = 1 - beta1
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    coef = np.array(
        [grad_scale, 1 - hp.lr * hp.weight_decay if decoupled else 1.0, 0.0 if decoupled else hp.weight_decay,
         w, beta2, 1 - beta2, hp.eps_root * bc2, math.sqrt(bc2), hp.eps, hp.lr / bc1],
        dtype=np.float32,
    )  # fmt: skip
    flags = AMSGRAD * hp.amsgrad | NEGATE * hp.maximize | SMALL_W * (abs(w) < 0.5)
    _KERNEL(p, g, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq", EMPTY), coef, flags)  # type: ignore[misc]


def bounds(hp: AdamHyperparams, t: int, g: float, b: Bounds, out: Bounds, decoupled: bool) -> None:
    """Bound ``g + wd * p``, ``g * g``, the moments, the smallest denominator and the parameter."""
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
    smallest = as_f32(hp.eps)  # of the denominators sqrt(v + eps_root * bc2) / sqrt(bc2) + eps, v >= 0
    if hp.eps_root:
        bc2 = 1 - beta2**t
        smallest += math.sqrt(as_f32(hp.eps_root * bc2) / bc2) / MARGIN
    if smallest <= 0:
        raise Unprovable  # a zero denominator: 0 / 0 where the moments are 0
    ratio = m / smallest  # m / denom, before the step size multiplies it
    p += hp.lr / (1 - beta1**t) * ratio
    if not (ratio < SAFE and p < SAFE):
        raise OverflowError
    raise_bound(out, "params", p)
    raise_bound(out, "exp_avg", m)
    raise_bound(out, "exp_avg_sq", v)
    if hp.amsgrad:
        raise_bound(out, "max_exp_avg_sq", v)
