"""The optimizer family: names, hyperparameters, defaults and validation, as PyTorch spells them.

Four optimizers are served: ``adam`` (with optional L2 ``weight_decay``), ``adamw`` (decoupled weight decay; Adam
with a flag, not a copy), ``sgd`` (momentum, dampening, nesterov) and ``rmsprop`` (momentum, centered). The
hyperparameter names and defaults are ``torch.optim``'s, plus ``eps_root`` (optax's name) for Adam/AdamW.

Nothing here knows about HTTP: bad values raise :class:`HyperparamError`, a ``ValueError`` whose message is meant
for the user.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class HyperparamError(ValueError):
    """An unknown optimizer, an unknown hyperparameter or an invalid value."""


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise HyperparamError(f"{name} must be finite, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    _finite(name, value)
    if value < 0:
        raise HyperparamError(f"Invalid {name}: {value!r} (must be >= 0)")


def _unit_interval(name: str, value: float) -> None:
    _finite(name, value)
    if not 0.0 <= value < 1.0:
        raise HyperparamError(f"Invalid {name}: {value!r} (must be in [0, 1))")


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
        _non_negative("learning rate (lr)", self.lr)
        _non_negative("epsilon (eps)", self.eps)
        _non_negative("eps_root", self.eps_root)
        _non_negative("weight_decay", self.weight_decay)
        if len(self.betas) != 2:
            raise HyperparamError(f"betas must be a pair [beta1, beta2], got {list(self.betas)!r}")
        _unit_interval("beta parameter at index 0 (betas[0])", self.betas[0])
        _unit_interval("beta parameter at index 1 (betas[1])", self.betas[1])

    def state_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if self.amsgrad else ("exp_avg", "exp_avg_sq")


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
        _non_negative("learning rate (lr)", self.lr)
        _non_negative("momentum", self.momentum)
        _finite("dampening", self.dampening)
        _non_negative("weight_decay", self.weight_decay)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise HyperparamError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum != 0 else ()


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
        _non_negative("learning rate (lr)", self.lr)
        _non_negative("alpha", self.alpha)
        _non_negative("epsilon (eps)", self.eps)
        _non_negative("weight_decay", self.weight_decay)
        _non_negative("momentum", self.momentum)

    def state_names(self) -> tuple[str, ...]:
        names = ["square_avg"]
        if self.momentum > 0:
            names.append("momentum_buffer")
        if self.centered:
            names.append("grad_avg")
        return tuple(names)


Hyperparams = AdamHyperparams | SGDHyperparams | RMSpropHyperparams


@dataclass(frozen=True)
class OptimizerKind:
    """One servable optimizer: its name, hyperparameter class, defaults and every state buffer it may keep."""

    name: str
    hyperparams: type
    defaults: Mapping[str, Any]
    buffers: tuple[str, ...]


_ADAM_BUFFERS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
OPTIMIZERS: dict[str, OptimizerKind] = {
    "adam": OptimizerKind("adam", AdamHyperparams, {}, _ADAM_BUFFERS),
    "adamw": OptimizerKind("adamw", AdamHyperparams, {"weight_decay": 1e-2}, _ADAM_BUFFERS),
    "sgd": OptimizerKind("sgd", SGDHyperparams, {}, ("momentum_buffer",)),
    "rmsprop": OptimizerKind("rmsprop", RMSpropHyperparams, {}, ("square_avg", "momentum_buffer", "grad_avg")),
}


def optimizer_kind(name: str) -> OptimizerKind:
    """Look up an optimizer by name (case-insensitive), or raise HyperparamError listing the known ones."""
    kind = OPTIMIZERS.get(str(name).lower())
    if kind is None:
        raise HyperparamError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return kind


def _coerce(field: dataclasses.Field[Any], value: Any) -> Any:
    """Check one JSON value against the field's type; JSON has no tuples, so betas arrive as a list."""
    name = field.name
    if field.type in ("bool", bool):
        if not isinstance(value, bool):
            raise HyperparamError(f"{name} must be true or false, got {value!r}")
        return value
    if name == "betas":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise HyperparamError(f"betas must be a pair [beta1, beta2], got {value!r}")
        return tuple(_coerce_number("betas", v) for v in value)
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
    kind = optimizer_kind(optimizer)
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
    out = dataclasses.asdict(hp)
    if "betas" in out:
        out["betas"] = list(out["betas"])
    return out
