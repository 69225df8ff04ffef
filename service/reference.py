"""The reference forms: one readable formula per algorithm, one tensor at a time (the numerical oracle).

Each algorithm's reference form lives in its room (:mod:`optserve.service.algorithms`, equations in the room's
docstring); this module steps one by name. Every form is pure: it takes a parameter, its gradient, its state and
the tensor's step number ``t`` (1 for the first step) and returns the new parameter and the new state. The
operations follow PyTorch's order (``lerp`` for a first moment, ``sqrt(v) / sqrt(1 - beta2^t)``), so that results
agree with torch to float32 rounding rather than merely to a tolerance; the fast forms
(:mod:`optserve.service.fused`) agree with these bit for bit.
"""

from __future__ import annotations

import numpy as np

from .algorithms import get
from .algorithms.base import State, lerp
from .hyperparams import Hyperparams

__all__ = ["State", "lerp", "step"]


def step(
    optimizer: str, p: np.ndarray, g: np.ndarray, state: State, t: int, hp: Hyperparams
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One reference step of one tensor of ``optimizer`` (a registry name: ``adam``, ``adamw``, ``sgd``, ...)."""
    return get(optimizer).reference(p, g, state, t, hp)
