"""Hyperparameters from JSON: lookup by optimizer name, type checks, defaults, inheritance and the echo.

Each algorithm's hyperparameter dataclass (torch's names and defaults, validated in ``__post_init__``) lives in its
room under :mod:`optserve.service.algorithms`; this module turns JSON values into one, so a typo or a wrong type is
refused with a message meant for the user.

Nothing here knows about HTTP: bad values raise :class:`HyperparamError`, a ``ValueError`` whose message is meant
for the user.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .algorithms import ALGORITHMS, Algorithm, get
from .algorithms.adafactor import AdafactorHyperparams
from .algorithms.adam import AdamHyperparams
from .algorithms.base import HyperparamError
from .algorithms.nadam import NAdamHyperparams
from .algorithms.radam import RAdamHyperparams
from .algorithms.rmsprop import RMSpropHyperparams
from .algorithms.sgd import SGDHyperparams

__all__ = [
    "AdafactorHyperparams",
    "AdamHyperparams",
    "HyperparamError",
    "Hyperparams",
    "NAdamHyperparams",
    "OPTIMIZERS",
    "RAdamHyperparams",
    "RMSpropHyperparams",
    "SGDHyperparams",
    "make_hyperparams",
    "optimizer_kind",
    "to_json",
]


Hyperparams = (
    AdamHyperparams | SGDHyperparams | RMSpropHyperparams | RAdamHyperparams | NAdamHyperparams | AdafactorHyperparams
)
OptimizerKind = Algorithm  # the registry's entries
OPTIMIZERS = ALGORITHMS


def optimizer_kind(name: str) -> Algorithm:
    """Look up an optimizer by name (case-insensitive), or raise HyperparamError listing the known ones."""
    return get(name)


def _coerce(field: dataclasses.Field[Any], value: Any) -> Any:
    """Check one JSON value against the field's type; JSON has no tuples, so pairs (betas, Adafactor's eps) arrive
    as lists, and ``None`` stands where the type allows it (Adafactor's eps1: float32's epsilon)."""
    name, kind = field.name, str(field.type)
    if kind == "bool":
        if not isinstance(value, bool):
            raise HyperparamError(f"{name} must be true or false, got {value!r}")
        return value
    if kind.startswith("tuple["):
        items = [k.strip() for k in kind[len("tuple[") : -1].split(",")]
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise HyperparamError(f"{name} must be a pair [{name}[0], {name}[1]], got {value!r}")
        return tuple(None if v is None and "None" in k else _coerce_number(name, v) for k, v in zip(items, value))
    if value is None and "None" in kind:
        return None
    return _coerce_number(name, value)


def _coerce_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HyperparamError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise HyperparamError(f"{name} is out of range") from None


def make_hyperparams(
    optimizer: str, values: Mapping[str, Any] | None = None, base: Hyperparams | None = None
) -> Hyperparams:
    """Build validated hyperparameters for ``optimizer`` from ``values``.

    Missing values come from ``base`` when given (a parameter group inherits the session's values), else from the
    optimizer's PyTorch defaults. Unknown names are refused, so a typo never silently falls back to a default.
    """
    kind = get(optimizer)
    fields = {f.name: f for f in dataclasses.fields(kind.hyperparams)}
    values = dict(values or {})
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise HyperparamError(
            f"unknown hyperparameter(s) for {kind.name}: {', '.join(unknown)}; known: {', '.join(fields)}"
        )
    merged: dict[str, Any] = dataclasses.asdict(base) if base is not None else dict(kind.defaults)
    for name, value in values.items():
        merged[name] = _coerce(fields[name], value)
    return kind.hyperparams(**merged)  # type: ignore[no-any-return]


def to_json(hp: Hyperparams) -> dict[str, Any]:
    """The effective values, as the server echoes them back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(hp).items()}
