"""The registry of algorithms: one entry per servable optimizer name, naming its room's pieces.

Each room (one module per algorithm family) holds the hyperparameters, the reference form, the numpy form and the
numba kernel of its algorithms (see :class:`~optserve.service.algorithms.base.Algorithm`). A new optimizer is a new
room and an entry here; the session, the layout, checkpoints, the memory budget, the finiteness guard and the tests
binding the fast forms to the reference ask this registry about it.
"""

from __future__ import annotations

from functools import partial

from . import adafactor, adam, nadam, radam, rmsprop, sgd
from .base import Algorithm, HyperparamError

__all__ = ["ALGORITHMS", "Algorithm", "HyperparamError", "get"]


def _adam(name: str, decoupled: bool, defaults: dict[str, float]) -> Algorithm:
    return Algorithm(
        name,
        adam.AdamHyperparams,
        partial(adam.reference, decoupled=decoupled),
        partial(adam.numpy_chunk, decoupled=decoupled),
        partial(adam.numba_range, decoupled=decoupled),
        adam.BUFFERS,
        defaults,
        bounds=partial(adam.bounds, decoupled=decoupled),
    )


ALGORITHMS: dict[str, Algorithm] = {
    "adam": _adam("adam", False, {}),
    "adamw": _adam("adamw", True, {"weight_decay": 1e-2}),  # AdamW: Adam with decoupled decay, not a copy
    "sgd": Algorithm(
        "sgd",
        sgd.SGDHyperparams,
        sgd.reference,
        sgd.numpy_chunk,
        sgd.numba_range,
        ("momentum_buffer",),
        bounds=sgd.bounds,
        step_key=False,
    ),
    "rmsprop": Algorithm(
        "rmsprop",
        rmsprop.RMSpropHyperparams,
        rmsprop.reference,
        rmsprop.numpy_chunk,
        rmsprop.numba_range,
        ("square_avg", "momentum_buffer", "grad_avg"),
        bounds=rmsprop.bounds,
    ),
    "nadam": Algorithm(
        "nadam",
        nadam.NAdamHyperparams,
        nadam.reference,
        nadam.numpy_tensor,
        nadam.numba_tensor,
        nadam.BUFFERS,
        elementwise=False,  # one mu_product per tensor
        state_shape=nadam.state_shape,
        initial={"mu_product": 1.0},
        bounds=nadam.bounds,
    ),
    "radam": Algorithm(
        "radam",
        radam.RAdamHyperparams,
        radam.reference,
        radam.numpy_chunk,
        radam.numba_range,
        radam.BUFFERS,
        bounds=radam.bounds,
    ),
    "adafactor": Algorithm(
        "adafactor",
        adafactor.AdafactorHyperparams,
        adafactor.reference,
        adafactor.numpy_tensor,
        None,  # its numpy form serves both backends (see the room)
        adafactor.BUFFERS,
        elementwise=False,  # factored state; norms of whole tensors
        state_shape=adafactor.state_shape,
    ),
}


def get(name: str) -> Algorithm:
    """The algorithm called ``name`` (case-insensitive), or HyperparamError listing the known ones."""
    algorithm = ALGORITHMS.get(str(name).lower())
    if algorithm is None:
        raise HyperparamError(f"unknown optimizer {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    return algorithm
