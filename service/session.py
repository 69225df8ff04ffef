"""Sessions: one optimizer's state and the step semantics that protect it.

A :class:`Session` owns the master parameters and the optimizer state as flat float32 buffers (see
:mod:`optserve.service.layout`), the parameter groups, the step counter and the record of idempotency keys. Every
mutation happens under the session's own lock, so concurrent steps on one session are applied one at a time and
steps on different sessions never wait for each other.

The semantics of :meth:`Session.step`, in the order they are checked:

1. a closed session (deleted or replaced meanwhile) is not found;
2. an ``Idempotency-Key`` already seen is not applied again: the latest step replays its result, an older one
   raises :class:`StepConflict` naming the step it was applied at;
3. an ``If-Match`` precondition that names another step raises :class:`PreconditionFailed`;
4. the gradients must name exactly the session's tensors with the same shapes (F32, F16 or BF16);
5. non-finite gradients raise :class:`NonFiniteGradient` (policy ``error``) or are skipped (policy ``skip``);
6. otherwise the step is applied: every parameter group is stepped by the fused kernel and the counter advances.

Everything is validated before anything is written, so a refused step changes nothing.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optserve.client.wire import Safetensors

from . import fused
from .errors import (
    InvalidInput,
    NonFiniteGradient,
    PreconditionFailed,
    SessionNotFound,
    StepConflict,
)
from .hyperparams import HyperparamError, Hyperparams, make_hyperparams, optimizer_kind, to_json
from .layout import FlatLayout

MAX_IDEMPOTENCY_KEYS = 1024  # per session; older keys are forgotten first
MAX_NAME_LENGTH = 1024


class ParamGroupSpec(BaseModel):
    """A parameter group as torch spells it: the tensor names, plus hyperparameters overriding the session's."""

    model_config = ConfigDict(extra="allow")
    params: list[str] = Field(min_length=1)


class SessionConfig(BaseModel):
    """How a session steps: optimizer, hyperparameters, parameter groups and the non-finite gradient policy."""

    model_config = ConfigDict(extra="forbid")
    optimizer: str = "adamw"
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    param_groups: list[ParamGroupSpec] = Field(default_factory=list)
    nonfinite: Literal["error", "skip"] = "error"


@dataclass
class ParamGroup:
    index: int
    names: list[str]
    hp: Hyperparams


@dataclass(frozen=True)
class KeyRecord:
    """What became of a request carrying an idempotency key: the session's step after it, and whether skipped."""

    step: int
    skipped: bool = False


@dataclass
class StepResult:
    status: Literal["applied", "skipped", "replayed"]
    step: int
    params: np.ndarray | None  # a copy of the flat parameters, taken under the lock; None when not asked for
    skipped: bool = False


@dataclass
class Counters:
    steps_applied: int = 0
    steps_skipped: int = 0
    steps_rejected: int = 0
    replays: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def all_finite(flat: np.ndarray) -> bool:
    """True when no element is NaN or infinite; one BLAS dot product in the common (finite) case."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.dot(flat, flat)):
            return True
    return bool(np.isfinite(flat).all())  # the dot overflowed or is NaN: look element by element


def _check_tensors(params: Mapping[str, np.ndarray]) -> None:
    if not params:
        raise InvalidInput("a session needs at least one tensor")
    for name, value in params.items():
        if not name or len(name) > MAX_NAME_LENGTH:
            raise InvalidInput(f"tensor names must have 1 to {MAX_NAME_LENGTH} characters, got {name!r}")
        if value.dtype.kind != "f":
            raise InvalidInput(f"tensor {name!r} has dtype {value.dtype}; parameters must be floating point")
        if not np.isfinite(value).all():
            raise InvalidInput(f"tensor {name!r} contains NaN or infinity")


def build_groups(config: SessionConfig, names: list[str]) -> tuple[Hyperparams, list[ParamGroup]]:
    """Validate the config against the tensor names; every tensor ends up in exactly one group.

    Tensors not named by any group form a last group with the session's hyperparameters.
    """
    try:
        optimizer_kind(config.optimizer)
        base = make_hyperparams(config.optimizer, config.hyperparams)
        known, seen = set(names), dict[str, int]()
        groups: list[ParamGroup] = []
        for i, spec in enumerate(config.param_groups):
            for n in spec.params:
                if n not in known:
                    raise InvalidInput(f"param_groups[{i}] names unknown tensor {n!r}")
                if n in seen:
                    raise InvalidInput(f"tensor {n!r} is in param_groups[{seen[n]}] and param_groups[{i}]")
                seen[n] = i
            overrides = dict(spec.model_extra or {})
            hp = make_hyperparams(config.optimizer, overrides, base=base)
            groups.append(ParamGroup(i, list(spec.params), hp))
    except HyperparamError as e:
        raise InvalidInput(str(e)) from None
    rest = [n for n in names if n not in seen]
    if rest:
        groups.append(ParamGroup(len(groups), rest, base))
    return base, groups


class Session:
    """A session's optimizer state and its step semantics; all methods are thread-safe."""

    def __init__(self, session_id: str, config: SessionConfig, params: Mapping[str, np.ndarray]) -> None:
        _check_tensors(params)
        self.id = session_id
        self.config = config
        self.base_hp, self.groups = build_groups(config, list(params))
        self.optimizer = optimizer_kind(config.optimizer).name
        group_of = {n: g.index for g in self.groups for n in g.names}
        self.layout = FlatLayout([(n, tuple(a.shape), group_of[n]) for n, a in params.items()])
        self.params = self.layout.flatten(params)
        state_names: dict[str, None] = {}
        for g in self.groups:
            state_names.update(dict.fromkeys(g.hp.state_names()))
        self.state = {name: np.zeros(self.layout.size, dtype=np.float32) for name in state_names}
        self.tensor_steps = np.zeros(len(self.layout.slots), dtype=np.int64)
        self.step_count = 0
        self.counters = Counters()
        self.keys: OrderedDict[str, KeyRecord] = OrderedDict()
        self.created_at = self.updated_at = time.time()
        self.lock = threading.Lock()
        self.closed = False

    # --- stepping -------------------------------------------------------------------------------------------------

    def step(
        self,
        grads: Safetensors | Mapping[str, np.ndarray],
        *,
        if_match: frozenset[int] | None = None,
        key: str | None = None,
        want_params: bool = True,
    ) -> StepResult:
        """Apply one step (see the module docstring for the order of checks)."""
        with self.lock:
            if self.closed:
                raise SessionNotFound(f"session {self.id!r} was deleted or replaced")
            if key is not None and key in self.keys:
                record = self.keys[key]
                if record.step != self.step_count:
                    raise StepConflict(
                        f"Idempotency-Key {key!r} was already applied at step {record.step}; "
                        f"the session is now at step {self.step_count}",
                        applied_at_step=record.step,
                        current_step=self.step_count,
                    )
                self.counters.replays += 1
                return StepResult("replayed", self.step_count, self._params_copy(want_params), record.skipped)
            if if_match is not None and self.step_count not in if_match:
                named = ", ".join(map(str, sorted(if_match))) or "no step number"
                raise PreconditionFailed(
                    f"If-Match names {named}; the session is at step {self.step_count}",
                    current_step=self.step_count,
                )
            try:
                flat = self.layout.gather(grads)
                finite = all_finite(flat)
                if not finite and self.config.nonfinite == "error":
                    raise NonFiniteGradient(
                        "the gradients contain NaN or infinity; nothing was applied "
                        '(create the session with "nonfinite": "skip" to skip such steps instead)'
                    )
            except InvalidInput:
                self.counters.steps_rejected += 1
                raise
            if finite:
                self._apply(flat)
                self.step_count += 1
                self.counters.steps_applied += 1
            else:
                self.counters.steps_skipped += 1
            self.updated_at = time.time()
            if key is not None:
                self._remember(key, KeyRecord(self.step_count, skipped=not finite))
            status: Literal["applied", "skipped"] = "applied" if finite else "skipped"
            return StepResult(status, self.step_count, self._params_copy(want_params), not finite)

    def _apply(self, grads: np.ndarray) -> None:
        """Step every parameter group: one fused call per run of tensors sharing a group and a step number."""
        slots, steps = self.layout.slots, self.tensor_steps
        i = 0
        while i < len(slots):
            j = i + 1
            while j < len(slots) and slots[j].group == slots[i].group and steps[j] == steps[i]:
                j += 1
            group = self.groups[slots[i].group]
            fused.step_range(
                self.optimizer,
                self.params,
                grads,
                self.state,
                slots[i].offset,
                slots[j - 1].stop,
                int(steps[i]) + 1,
                group.hp,
            )
            i = j
        steps += 1

    def _remember(self, key: str, record: KeyRecord) -> None:
        self.keys[key] = record
        self.keys.move_to_end(key)
        while len(self.keys) > MAX_IDEMPOTENCY_KEYS:
            self.keys.popitem(last=False)

    def _params_copy(self, wanted: bool) -> np.ndarray | None:
        return self.params.copy() if wanted else None

    # --- reading and configuring ----------------------------------------------------------------------------------

    def snapshot_params(self) -> tuple[int, np.ndarray]:
        """(step, copy of the flat parameters), consistent with each other."""
        with self.lock:
            if self.closed:
                raise SessionNotFound(f"session {self.id!r} was deleted or replaced")
            return self.step_count, self.params.copy()

    def update_hyperparams(self, values: Mapping[str, Any], group: int | None = None) -> None:
        """Change hyperparameters of every group, or of one; all groups are validated before any changes."""
        with self.lock:
            if group is not None and not 0 <= group < len(self.groups):
                raise InvalidInput(f"group {group} does not exist; the session has {len(self.groups)} group(s)")
            targets = self.groups if group is None else [self.groups[group]]
            try:
                new = [make_hyperparams(self.optimizer, values, base=g.hp) for g in targets]
            except HyperparamError as e:
                raise InvalidInput(str(e)) from None
            for g, hp in zip(targets, new):
                if set(hp.state_names()) != set(g.hp.state_names()):
                    raise InvalidInput(
                        f"cannot change {', '.join(sorted(values))} of group {g.index} after creation: it changes "
                        f"the optimizer state kept ({', '.join(g.hp.state_names()) or 'none'}); create a new session"
                    )
            for g, hp in zip(targets, new):
                g.hp = hp
            if group is None:
                self.base_hp = make_hyperparams(self.optimizer, values, base=self.base_hp)
            self.updated_at = time.time()

    def close(self) -> None:
        """Mark the session gone (deleted or replaced); a step waiting for the lock then fails with 404."""
        with self.lock:
            self.closed = True

    def info(self) -> dict[str, Any]:
        """What the info endpoint reports: config, groups, step, tensors and counters."""
        return {
            "id": self.id,
            "optimizer": self.optimizer,
            "hyperparams": to_json(self.base_hp),
            "param_groups": [{"index": g.index, "params": g.names, "hyperparams": to_json(g.hp)} for g in self.groups],
            "nonfinite": self.config.nonfinite,
            "step": self.step_count,
            "tensors": {
                s.name: {"shape": list(s.shape), "dtype": "float32", "group": s.group} for s in self.layout.slots
            },
            "num_params": self.layout.size,
            "state": sorted(self.state),
            "counters": self.counters.as_dict(),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    def current_config(self) -> SessionConfig:
        """The config with every change made since creation folded in (what a checkpoint stores)."""
        groups = [ParamGroupSpec(params=g.names, **to_json(g.hp)) for g in self.groups]
        return SessionConfig(
            optimizer=self.optimizer,
            hyperparams=to_json(self.base_hp),
            param_groups=groups,
            nonfinite=self.config.nonfinite,
        )
