"""Adafactor (``torch.optim.Adafactor``): a second moment factored into row and column averages, and a step
relative to the parameter's own scale.

With ``g`` negated when ``maximize``, at step ``t``, for one tensor of ``n`` elements::

    beta2_t = t ** beta2_decay ;  rho = min(lr, 1 / sqrt(t)) ;  alpha = max(eps2, ||p|| / sqrt(n)) * rho
    p = p * (1 - lr * weight_decay)
    2-D and more (over the last two dimensions):
        row_var = lerp(row_var, mean(g * g, -1), beta2_t) ;  col_var = lerp(col_var, mean(g * g, -2), beta2_t)
        v = row_var @ col_var / max(mean(row_var, -2), eps1)
    0-D and 1-D:
        variance = lerp(variance, g * g, beta2_t) ;  v = variance
    u = g / sqrt(max(v, eps1 * eps1)) ;  p = p - alpha / max(1, ||u|| / (sqrt(n) d)) * u

``eps1`` None means float32's epsilon (torch: the parameter dtype's; the master copy here is float32). A 2-D tensor's
state is its rows plus its columns, not its size: ``row_var`` (..., R, 1) and ``col_var`` (..., 1, C) for a tensor
(..., R, C), ``variance`` only for tensors of fewer than two dimensions (the others keep an empty entry, as torch
keeps none). The norms make the step read a whole tensor: not elementwise. One form serves both backends here (the
update is a handful of whole-tensor numpy operations, reductions included, which a numba loop would have to sum in
numpy's order to give the same bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import HyperparamError, Shape, State, finite, lerp, non_negative

BUFFERS = ("row_var", "col_var", "variance")
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class AdafactorHyperparams:
    """Adafactor with torch's names: ``eps`` is the pair (eps1, eps2), eps1 None for float32's epsilon."""

    lr: float = 1e-2
    beta2_decay: float = -0.8
    eps: tuple[float | None, float] = (None, 1e-3)
    d: float = 1.0
    weight_decay: float = 0.0
    maximize: bool = False

    def __post_init__(self) -> None:
        non_negative("learning rate (lr)", self.lr)
        finite("beta2_decay", self.beta2_decay)
        if self.beta2_decay > 0:
            raise HyperparamError(f"Invalid beta2_decay: {self.beta2_decay!r} (must be <= 0)")
        if len(self.eps) != 2:
            raise HyperparamError(f"eps must be a pair [eps1, eps2], got {list(self.eps)!r}")
        if self.eps[0] is not None:
            non_negative("epsilon1 (eps[0])", self.eps[0])
        non_negative("epsilon2 (eps[1])", self.eps[1])
        finite("clipping threshold (d)", self.d)
        if self.d < 1:
            raise HyperparamError(f"Invalid clipping threshold (d): {self.d!r} (must be >= 1)")
        non_negative("weight_decay", self.weight_decay)

    def state_names(self) -> tuple[str, ...]:
        return BUFFERS


def state_shape(name: str, shape: Shape) -> Shape:
    """Rows (..., R, 1) and columns (..., 1, C) of a tensor of two dimensions or more; its own shape for the
    variance of a smaller one; (0,) where the tensor keeps no such buffer."""
    factored = len(shape) > 1
    if name == "row_var":
        return (*shape[:-1], 1) if factored else (0,)
    if name == "col_var":
        return (*shape[:-2], 1, shape[-1]) if factored else (0,)
    return (0,) if factored else shape


def _norm(x: np.ndarray) -> float:
    """The L2 norm of a float32 tensor, as a Python float (torch's ``norm(2).item()``)."""
    flat = x.reshape(-1)
    return float(np.sqrt(np.dot(flat, flat)))


def _mean_of_squares(g: np.ndarray, axis: int) -> np.ndarray:
    """``norm(g, dim=axis, keepdim=True).square_().div_(size)``, torch's mean of squares along ``axis``."""
    norm = np.sqrt(np.sum(g * g, axis=axis, keepdims=True))
    return np.asarray(norm * norm / np.float32(g.shape[axis]), dtype=np.float32)


def _scalars(p: np.ndarray, t: int, hp: AdafactorHyperparams) -> tuple[float, float, float]:
    """(eps1, the lerp weight beta2_t, alpha) for this step, before p is decayed."""
    eps1 = FLOAT32_EPS if hp.eps[0] is None else hp.eps[0]
    step = float(t)
    rho = min(hp.lr, 1 / (step**0.5))
    alpha = max(hp.eps[1], _norm(p) / (p.size**0.5)) * rho
    return eps1, step**hp.beta2_decay, alpha


def _update(g: np.ndarray, v: np.ndarray, eps1: float, d: float) -> tuple[np.ndarray, float]:
    """(u = g / sqrt(max(v, eps1^2)), the clipping denominator max(1, ||u|| / (sqrt(n) d))); v is consumed."""
    np.maximum(v, np.float32(eps1 * eps1), out=v)
    np.sqrt(v, out=v)
    np.divide(np.float32(1.0), v, out=v)
    v *= g
    return v, max(1.0, _norm(v) / ((v.size**0.5) * d))


def reference(
    p: np.ndarray, g: np.ndarray, state: State, t: int, hp: AdafactorHyperparams
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One Adafactor step of one tensor."""
    if hp.maximize:
        g = -g
    eps1, beta2_t, alpha = _scalars(p, t, hp)
    if hp.weight_decay != 0:
        p = p * (1 - hp.lr * hp.weight_decay)
    new_state = dict(state)
    if g.ndim > 1:
        row = lerp(state["row_var"], _mean_of_squares(g, -1), beta2_t)
        col = lerp(state["col_var"], _mean_of_squares(g, -2), beta2_t)
        v = np.matmul(row, col)
        v = v / np.maximum(np.mean(row, axis=-2, keepdims=True), np.float32(eps1))
        new_state.update(row_var=row, col_var=col)
    else:
        variance = lerp(state["variance"], g * g, beta2_t)
        v = variance.copy()
        new_state["variance"] = variance
    u, denom = _update(g, np.asarray(v, dtype=np.float32), eps1, hp.d)
    return p + np.float32(-alpha / denom) * u, new_state


def numpy_tensor(p: np.ndarray, g: np.ndarray, s: State, t: int, hp: AdafactorHyperparams, grad_scale: float) -> None:
    """One Adafactor step of one tensor, in place (``p``, ``g`` and the state in their own shapes)."""
    if grad_scale != 1.0:
        g = g * np.float32(grad_scale)
    if hp.maximize:
        g = -g
    eps1, beta2_t, alpha = _scalars(p, t, hp)
    if hp.weight_decay != 0:
        p *= 1 - hp.lr * hp.weight_decay
    if g.ndim > 1:
        row, col = s["row_var"], s["col_var"]
        row[...] = lerp(row, _mean_of_squares(g, -1), beta2_t)
        col[...] = lerp(col, _mean_of_squares(g, -2), beta2_t)
        v = np.matmul(row, col)
        v /= np.maximum(np.mean(row, axis=-2, keepdims=True), np.float32(eps1))
    else:
        variance = s["variance"]
        variance[...] = lerp(variance, g * g, beta2_t)
        v = variance.copy()
    u, denom = _update(g, v, eps1, hp.d)
    u *= np.float32(-alpha / denom)
    p += u
