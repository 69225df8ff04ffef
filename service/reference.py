"""Reference implementations: one readable formula per algorithm, one tensor at a time.

This module is the numerical oracle. It is written to be read next to the papers and ``torch/optim``; the fast path
(:mod:`optserve.service.fused`) is tested against it, and both are tested against ``torch.optim``. Each function is
pure: it takes a parameter, its gradient, its state and the tensor's step number ``t`` (1 for the first step) and
returns the new parameter and the new state; nothing is modified in place.

The operations follow PyTorch's order (``lerp`` for the first moment, ``sqrt(v) / sqrt(1 - beta2^t)``), so that
results agree with torch to float32 rounding rather than merely to a tolerance.

Adam / AdamW, with ``g`` negated when ``maximize``::

    Adam (L2):  g = g + weight_decay * p
    AdamW:      p = p * (1 - lr * weight_decay)            # decoupled, applied to p_{t-1}
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    v_use = max(v_max, v) if amsgrad (and v_max = v_use) else v
    p = p - lr / (1 - b1^t) * m / (sqrt(v_use / (1 - b2^t) + eps_root) + eps)

SGD::

    g = g + weight_decay * p
    b = g if t == 1 else momentum * b + (1 - dampening) * g      # when momentum != 0
    g = g + momentum * b if nesterov else b
    p = p - lr * g

RMSprop::

    g = g + weight_decay * p
    v = alpha * v + (1 - alpha) * g * g
    a = alpha * a + (1 - alpha) * g ;  d = sqrt(v - a * a) + eps    # centered
    d = sqrt(v) + eps                                               # otherwise
    b = momentum * b + g / d ;  p = p - lr * b                      # when momentum > 0
    p = p - lr * g / d                                              # otherwise
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .hyperparams import AdamHyperparams, Hyperparams, RMSpropHyperparams, SGDHyperparams

State = Mapping[str, np.ndarray]


def lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """``start + weight * (end - start)``, evaluated the way torch's ``lerp`` does for accuracy near weight 1."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1 - weight)


def adam(
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


def sgd(
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


def rmsprop(
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


def step(
    optimizer: str, p: np.ndarray, g: np.ndarray, state: State, t: int, hp: Hyperparams
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Dispatch one reference step by optimizer name (``adam``, ``adamw``, ``sgd``, ``rmsprop``)."""
    if optimizer in ("adam", "adamw"):
        assert isinstance(hp, AdamHyperparams)
        return adam(p, g, state, t, hp, decoupled=optimizer == "adamw")
    if optimizer == "sgd":
        assert isinstance(hp, SGDHyperparams)
        return sgd(p, g, state, t, hp)
    if optimizer == "rmsprop":
        assert isinstance(hp, RMSpropHyperparams)
        return rmsprop(p, g, state, t, hp)
    raise ValueError(f"unknown optimizer {optimizer!r}")
