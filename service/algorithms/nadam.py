"""NAdam (``torch.optim.NAdam``): Adam with Nesterov momentum and a momentum schedule, with torch's
``momentum_decay`` and ``decoupled_weight_decay``.

With ``g`` negated when ``maximize``, at step ``t``::

    g = g + weight_decay * p              (or p = p * (1 - lr * weight_decay) when decoupled_weight_decay)
    mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay)) ;  mu_{t+1} likewise
    mu_product = mu_product * mu_t        # one float32 per tensor, starting at 1
    m = lerp(m, g, 1 - b1) ;  v = b2 * v + (1 - b2) * g * g ;  d = sqrt(v / (1 - b2^t)) + eps
    p = p - lr (1 - mu_t) / (1 - mu_product) * g / d - lr mu_{t+1} / (1 - mu_product mu_{t+1}) * m / d

``mu_product`` is state of its own per tensor (shape ``()``, as torch keeps it), so NAdam steps tensor by tensor and
is not elementwise: a flat range cannot be cut inside a tensor without its ``mu_product``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import (
    MARGIN,
    SAFE,
    SQRT_SAFE,
    Bounds,
    Shape,
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

BUFFERS = ("exp_avg", "exp_avg_sq", "mu_product")


@dataclass(frozen=True)
class NAdamHyperparams:
    """NAdam, L2 ``weight_decay`` unless ``decoupled_weight_decay``."""

    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum_decay: float = 4e-3
    decoupled_weight_decay: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        non_negative("learning rate (lr)", self.lr)
        non_negative("epsilon (eps)", self.eps)
        non_negative("weight_decay", self.weight_decay)
        non_negative("momentum_decay", self.momentum_decay)
        check_betas(self.betas)

    def state_names(self) -> tuple[str, ...]:
        return BUFFERS


def state_shape(name: str, shape: Shape) -> Shape:
    return () if name == "mu_product" else shape


def _coefficients(hp: NAdamHyperparams, t: int, mu_product: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(the new mu_product, float32 as torch keeps it; the coefficients of g / d and m / d, in double)."""
    beta1 = hp.betas[0]
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (t * hp.momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * hp.momentum_decay)))
    product = np.asarray(mu_product * mu, dtype=np.float32)
    value = float(product)
    return product, -hp.lr * (1.0 - mu) / (1.0 - value), (-hp.lr * mu_next) / (1.0 - value * mu_next)


def reference(
    p: np.ndarray, g: np.ndarray, state: State, t: int, hp: NAdamHyperparams
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One NAdam step of one tensor."""
    beta1, beta2 = hp.betas
    if hp.maximize:
        g = -g
    if hp.weight_decay != 0:
        if hp.decoupled_weight_decay:
            p = p * (1 - hp.lr * hp.weight_decay)
        else:
            g = g + hp.weight_decay * p
    product, c_grad, c_avg = _coefficients(hp, t, state["mu_product"])
    m = lerp(state["exp_avg"], g, 1 - beta1)
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g * g
    denom = np.sqrt(v / (1 - beta2**t)) + hp.eps
    p = p + c_grad * g / denom
    p = p + c_avg * m / denom
    return p, {"exp_avg": m, "exp_avg_sq": v, "mu_product": product}


def numpy_tensor(p: np.ndarray, g: np.ndarray, s: State, t: int, hp: NAdamHyperparams, grad_scale: float) -> None:
    """One NAdam step of one tensor, in place (``p``, ``g`` and the moments flattened, ``mu_product`` a 0-d array)."""
    beta1, beta2 = hp.betas
    p, g = p.reshape(-1), g.reshape(-1)
    if grad_scale != 1.0:
        g = g * np.float32(grad_scale)
    gbuf, tmp, denom = np.empty_like(p), np.empty_like(p), np.empty_like(p)
    decoupled = hp.decoupled_weight_decay
    if hp.weight_decay != 0 and decoupled:
        p *= 1 - hp.lr * hp.weight_decay
    g = prepare_grad(p, g, hp.maximize, 0.0 if decoupled else hp.weight_decay, gbuf, tmp)
    product, c_grad, c_avg = _coefficients(hp, t, s["mu_product"])
    s["mu_product"][...] = product
    m, v = s["exp_avg"].reshape(-1), s["exp_avg_sq"].reshape(-1)
    lerp_(m, g, 1 - beta1, tmp)
    v *= beta2
    np.multiply(g, 1 - beta2, out=tmp)
    tmp *= g
    v += tmp
    np.divide(v, 1 - beta2**t, out=denom)
    np.sqrt(denom, out=denom)
    denom += hp.eps
    np.multiply(g, c_grad, out=tmp)
    tmp /= denom
    p += tmp
    np.multiply(m, c_avg, out=tmp)
    tmp /= denom
    p += tmp


NEGATE, SMALL_W = 1, 2


def _kernel(p, g, m, v, coef, flags):  # type: ignore[no-untyped-def]
    scale, decay, l2, w, b2, c2, bc2, eps, c_grad, c_avg = (
        coef[0], coef[1], coef[2], coef[3], coef[4], coef[5], coef[6], coef[7], coef[8], coef[9]
    )  # fmt: skip
    negate, small_w = (flags & NEGATE) != 0, (flags & SMALL_W) != 0
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
        denom = np.sqrt(vi / bc2) + eps
        pi = pi + c_grad * gi / denom
        p[i] = pi + c_avg * mi / denom


_KERNEL = njit(_kernel)


def numba_tensor(p: np.ndarray, g: np.ndarray, s: State, t: int, hp: NAdamHyperparams, grad_scale: float) -> None:
    """The kernel over one tensor, with its mu_product advanced here (one float32 multiply, as torch does)."""
    beta1, beta2 = hp.betas
    decoupled = hp.decoupled_weight_decay
    w = 1 - beta1
    product, c_grad, c_avg = _coefficients(hp, t, s["mu_product"])
    s["mu_product"][...] = product
    coef = np.array(
        [grad_scale, 1 - hp.lr * hp.weight_decay if decoupled else 1.0, 0.0 if decoupled else hp.weight_decay,
         w, beta2, 1 - beta2, 1 - beta2**t, hp.eps, c_grad, c_avg],
        dtype=np.float32,
    )  # fmt: skip
    flags = NEGATE * hp.maximize | SMALL_W * (abs(w) < 0.5)
    _KERNEL(p.reshape(-1), g.reshape(-1), s["exp_avg"].reshape(-1), s["exp_avg_sq"].reshape(-1), coef, flags)  # type: ignore[misc]


def bounds(hp: NAdamHyperparams, t: int, g: float, b: Bounds, out: Bounds) -> None:
    """Bound ``g + wd * p``, ``g * g``, the moments, the coefficients (``1 - mu_product`` stays at least
    ``1 - |mu_product| mu``, mu_product's bound being that of every tensor's), the smallest denominator (eps) and the
    parameter."""
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
    eps = as_f32(hp.eps)
    product = b.get("mu_product", 1.0)
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (t * hp.momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * hp.momentum_decay)))
    low, low_next = 1.0 - product * mu * MARGIN, 1.0 - product * mu * mu_next * MARGIN
    if eps <= 0 or low <= 0 or low_next <= 0:
        raise Unprovable  # a zero denominator
    step = hp.lr * abs(1.0 - mu) / low * g / eps + hp.lr * mu_next / low_next * m / eps
    p += step
    if not (step < SAFE and p < SAFE):
        raise OverflowError
    raise_bound(out, "params", p)
    raise_bound(out, "exp_avg", m)
    raise_bound(out, "exp_avg_sq", v)
