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
4. the gradients must name exactly the session's tensors with the same shapes (F32, F16 or BF16); with
   ``partial`` a subset is enough, and the absent tensors are left alone for this step, as torch does for
   parameters whose ``grad`` is None;
5. hyperparameter changes sent with the step are validated;
6. non-finite gradients raise :class:`NonFiniteGradient` (policy ``error``) or make the step skipped (``skip``);
7. with ``accumulate = k``, contributions before the k-th are summed and answered "accepted"; the k-th averages
   them and goes on;
8. the gradient is clipped to ``max_grad_norm`` (global L2 norm, like ``torch.nn.utils.clip_grad_norm_``), the
   schedule scales each group's ``lr`` for the step number being applied, and every parameter group is stepped by
   the fused kernel.

Everything is validated before anything is written, so a refused request changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optserve.client.wire import Safetensors

from . import finite as finite_math
from . import fused
from .errors import (
    InvalidInput,
    NonFiniteGradient,
    NonFiniteResult,
    PreconditionFailed,
    SessionNotFound,
    StepConflict,
)
from .hyperparams import (
    AdamHyperparams,
    HyperparamError,
    Hyperparams,
    SGDHyperparams,
    make_hyperparams,
    optimizer_kind,
    to_json,
)
from .layout import FlatLayout
from .schedules import Constant, Schedule

# \Z, not $: "$" also matches before a final newline, and "a\n" would pass (an id that breaks the Location header)
SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # also a safe file name for snapshots
MAX_IDEMPOTENCY_KEYS = 1024  # per session; older keys are forgotten first
MAX_NAME_LENGTH = 1024
NORM_CHUNK = 1 << 16
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s
FLOAT32_MAX = float(np.finfo(np.float32).max)


class SessionBusy(Exception):
    """Raised by a non-blocking step when another request holds the session."""


class SessionMoved(SessionNotFound):
    """The session object was evicted to disk or replaced under its id while a request waited for it: the store
    looks the id up again (a 404 only if it escapes, which it must not)."""


class _Held:
    """Releases an already acquired lock on exit."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class ParamGroupSpec(BaseModel):
    """A parameter group as torch spells it: the tensor names, plus hyperparameters overriding the session's."""

    model_config = ConfigDict(extra="allow")
    params: list[str] = Field(min_length=1)


MAX_SHARDS = 64


class ShardOf(BaseModel):
    """What a shard session is a part of (set by the Ray store, never by clients): shard ``index`` of ``count``
    holds the range ``lo:hi`` of the whole session's flat buffers, whose tensors are ``names`` with ``shapes``; the
    shard's own tensors are the pieces of those the range covers, 1-D, under the same names."""

    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    count: int = Field(ge=2, le=MAX_SHARDS)
    lo: int = Field(ge=0)
    hi: int = Field(gt=0)
    names: list[str]
    shapes: list[list[int]]


class SessionConfig(BaseModel):
    """How a session steps: optimizer, hyperparameters, parameter groups and the server-side training features."""

    model_config = ConfigDict(extra="forbid")
    optimizer: str = "adamw"
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    param_groups: list[ParamGroupSpec] = Field(default_factory=list)
    nonfinite: Literal["error", "skip"] = "error"
    max_grad_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    schedule: Schedule = Field(default_factory=Constant)
    accumulate: int = Field(default=1, ge=1, le=4096)
    # On the Ray store: split the session's flat buffers into this many contiguous ranges on as many hosts (a single
    # server holds the whole session whatever it says).
    shards: int = Field(default=1, ge=1, le=MAX_SHARDS)
    shard: ShardOf | None = None


@dataclass
class ParamGroup:
    index: int
    names: list[str]
    hp: Hyperparams
    spec_names: list[str] | None = None  # a shard's: the whole session's tensors of the group (``names``: its own)


@dataclass(frozen=True)
class KeyRecord:
    """What became of a request carrying an idempotency key: the session's step after it and the outcome."""

    step: int
    outcome: Literal["applied", "skipped", "accepted"] = "applied"
    grad_norm: float | None = None  # so that a replay answers exactly as the original did


@dataclass
class StepResult:
    """``applied``/``skipped``/``replayed`` carry params (unless minimal); ``accepted`` is a contribution that
    awaits ``awaiting`` more before the step is applied."""

    status: Literal["applied", "skipped", "replayed", "accepted", "checked"]
    step: int
    params: np.ndarray | None  # a copy of the flat parameters, taken under the lock; None when not asked for
    skipped: bool = False
    grad_norm: float | None = None
    awaiting: int = 0
    layout: FlatLayout | None = None  # of ``params``: the session's, set by the store for the answer
    hyperparams: str = ""  # a dry run's: a digest of the hyperparameters the step starts from (shards must agree)


@dataclass
class Counters:
    steps_applied: int = 0
    steps_skipped: int = 0
    steps_rejected: int = 0
    replays: int = 0
    contributions: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Pending:
    """Gradient contributions received for the next step (``accumulate`` > 1)."""

    total: np.ndarray
    present: np.ndarray  # bool per slot: the tensors any contribution carried
    count: int = 0
    nonfinite: bool = False
    keys: list[str] = dataclasses.field(default_factory=list)  # idempotency keys of the contributions


def sum_of_squares(flat: np.ndarray) -> float:
    """Sum of squares in float64 over float32 chunk dot products; NaN or inf when a value is non-finite."""
    # np.dot is BLAS: no floating-point error state to manage, an overflow just gives inf
    if flat.size <= NORM_CHUNK:
        total = float(np.dot(flat, flat))
    else:
        total = 0.0
        for lo in range(0, flat.size, NORM_CHUNK):
            chunk = flat[lo : lo + NORM_CHUNK]
            total += float(np.dot(chunk, chunk))
    if not math.isfinite(total) and np.isfinite(flat).all():  # float32 overflow of huge but finite values
        return float(np.sum(np.square(flat, dtype=np.float64)))
    return total


def clip_scale(norm: float, max_norm: float | None) -> float:
    """The factor torch's ``clip_grad_norm_`` multiplies gradients by, in float32 as torch computes it."""
    if max_norm is None:
        return 1.0
    coef = np.float32(max_norm) / (np.float32(norm) + np.float32(CLIP_EPS))
    return float(min(coef, np.float32(1.0)))


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _check_tensors(params: Mapping[str, np.ndarray]) -> None:
    if not params:
        raise InvalidInput("a session needs at least one tensor")
    for name, value in params.items():
        if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable() or _lone_surrogate(name):
            raise InvalidInput(f"tensor names must have 1 to {MAX_NAME_LENGTH} printable characters, got {name!r}")
        if value.dtype.kind != "f":
            raise InvalidInput(f"tensor {name!r} has dtype {value.dtype}; parameters must be floating point")


def _check_finite(layout: FlatLayout, flat: np.ndarray) -> None:
    """Refuse parameters that are not finite as float32 (a float64 3.5e38 is finite, its float32 is not)."""
    if np.isfinite(flat).all():
        return
    bad = next(s.name for s in layout.slots if not np.isfinite(flat[s.offset : s.stop]).all())
    raise InvalidInput(f"tensor {bad!r} contains NaN or infinity (as float32, the precision the session keeps)")


def build_groups(config: SessionConfig, names: list[str]) -> tuple[Hyperparams, list[ParamGroup]]:
    """Validate the config against the tensor names; every tensor ends up in exactly one group.

    Tensors not named by any group form a last group with the session's hyperparameters. A shard's groups are the
    whole session's, each holding the shard's pieces of its tensors (possibly none).
    """
    if config.shard is not None:
        whole_base, whole_groups = build_groups(config.model_copy(update={"shard": None}), config.shard.names)
        own = set(names)
        for g in whole_groups:
            g.spec_names, g.names = g.names, [n for n in g.names if n in own]
        return whole_base, whole_groups
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
            hp = make_hyperparams(config.optimizer, dict(spec.model_extra or {}), base=base)
            groups.append(ParamGroup(i, list(spec.params), hp))
    except HyperparamError as e:
        raise InvalidInput(str(e)) from None
    rest = [n for n in names if n not in seen]
    if rest:
        groups.append(ParamGroup(len(groups), rest, base))
    return base, groups


HyperparamChanges = Mapping[str, Any] | Sequence[Mapping[str, Any] | None]


class Session:
    """A session's optimizer state and its step semantics; all methods are thread-safe."""

    def __init__(self, session_id: str, config: SessionConfig, params: Mapping[str, np.ndarray]) -> None:
        _check_tensors(params)
        self.id = session_id
        self.config = config
        self.base_hp, self.groups = build_groups(config, list(params))
        self.algorithm = optimizer_kind(config.optimizer)
        self.optimizer = self.algorithm.name
        group_of = {n: g.index for g in self.groups for n in g.names}
        self.layout = FlatLayout([(n, tuple(a.shape), group_of[n]) for n, a in params.items()])
        # Each state buffer's layout: the parameters' for elementwise state, else the algorithm's shapes per tensor
        self.state_layouts = {n: self.layout.for_state(self.algorithm.state_shape, n) for n in self.algorithm.buffers}
        with np.errstate(over="ignore"):  # beyond float32's range becomes infinity, refused just below
            self.params = self.layout.flatten(params)
        _check_finite(self.layout, self.params)
        self._owned_refs = sys.getrefcount(self.params)  # see _own_params
        state_names: dict[str, None] = {}
        for g in self.groups:
            state_names.update(dict.fromkeys(g.hp.state_names()))
        self.state: dict[str, np.ndarray] = {}
        self.hold_buffers(state_names)
        self.tensor_steps = np.zeros(len(self.layout.slots), dtype=np.int64)
        # Upper bounds on the magnitudes of every buffer's values (see optserve.service.finite); None: unknown
        self.bounds: finite_math.Bounds | None = finite_math.exact(self.params, self.state)
        self._bounds_exact = True
        self._next_bounds: finite_math.Bounds | None = None
        # SGD: whether each tensor's momentum buffer holds a value. torch creates it at the tensor's first step with
        # momentum != 0 (from the gradient), which is not its first step when momentum is switched on mid-run.
        self.momentum_started = np.zeros(len(self.layout.slots), dtype=bool)
        self.lent_copies = 0  # steps that found the parameters still lent to an answer and wrote into a copy
        self.step_count = 0
        self.pending: Pending | None = None
        self.last_grad_norm: float | None = None
        self.counters = Counters()
        self.keys: OrderedDict[str, KeyRecord] = OrderedDict()
        self.created_at = self.updated_at = time.time()
        self.lock = threading.Lock()
        # None while the session is the one its store holds under its id; else why it is not any more: "deleted"
        # (requests answer 404), "evicted" (to disk, for idleness) or "replaced" (by a restored checkpoint): requests
        # that waited for this object look the id up again.
        self.gone: Literal["deleted", "evicted", "replaced"] | None = None
        # Persistence bookkeeping: every accepted change bumps version; a snapshot records what it saved.
        self.token_digest: str | None = None  # SHA-256 of the session's bearer token (auth on)
        self.version = 0
        self.saved_version = -1
        self.saved_step = -1
        self.saved_at = 0.0
        # Set by the store: raises LimitExceeded when its memory budget cannot hold this many more bytes.
        self.budget: Callable[[int], None] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of state held: parameters, every state buffer and pending contributions."""
        pending = self.pending.total.nbytes if self.pending is not None else 0
        return self.params.nbytes + sum(b.nbytes for b in self.state.values()) + pending

    # --- stepping -------------------------------------------------------------------------------------------------

    def step(
        self,
        grads: Safetensors | Mapping[str, np.ndarray],
        *,
        if_match: frozenset[int] | None = None,
        key: str | None = None,
        want_params: bool = True,
        partial: bool = False,
        changes: HyperparamChanges | None = None,
        blocking: bool = True,
        sumsq: float | None = None,
        dry: bool = False,
        skip: bool = False,
        out: np.ndarray | None = None,
    ) -> StepResult:
        """Apply one step, or one contribution to it (see the module docstring for the order of checks).

        With ``blocking=False`` a session busy with another request raises :class:`SessionBusy` at once. A shard
        (see :class:`ShardOf`) is stepped with the whole gradient's ``sumsq`` (its norm decides clipping), first
        ``dry`` (every check made, nothing written: "checked", ``skipped`` if the step would be skipped), then for
        real, with ``skip`` when any shard would skip it. The parameters answered are copied into ``out`` when it
        is given and of their size (shared memory: a Ray front's, or a client's on the server's Unix socket), else
        lent (a read-only view of the session's own buffer, see :meth:`_lend`).
        """
        if not self.lock.acquire(blocking):
            raise SessionBusy(self.id)
        with _Held(self.lock):
            self._check_open()
            if key is not None and key in self.keys:
                if dry:
                    return self._replay_check(key, self.keys[key])
                return self._replay(key, self.keys[key], want_params, out)
            if if_match is not None and self.step_count not in if_match:
                named = ", ".join(map(str, sorted(if_match))) or "no step number"
                raise PreconditionFailed(
                    f"If-Match names {named}; the session is at step {self.step_count}",
                    current_step=self.step_count,
                )
            try:
                flat, present = self.layout.gather(grads, partial)
                planned, new_base = self._plan_changes(changes) if changes is not None else ([], None)
                hyperparams = [g.hp for g in self.groups]
                for group, hp in planned:  # changes sent with this step take effect in it
                    hyperparams[group.index] = hp
                scheduled = self._scheduled(hyperparams)
                self._check_coefficients(scheduled)
                if sumsq is None:
                    sumsq = sum_of_squares(flat)
                finite = math.isfinite(sumsq)
                if not finite and self.config.nonfinite == "error":
                    raise NonFiniteGradient(
                        "the gradients contain NaN or infinity; nothing was applied "
                        '(create the session with "nonfinite": "skip" to skip such steps instead)'
                    )
                awaiting, pending = 0, self.pending
                if self.config.accumulate > 1:
                    awaiting = self.config.accumulate - (pending.count if pending else 0) - 1
                    if not awaiting:  # the last contribution: the step is the average (computed, nothing changed)
                        flat, present, finite = self._average(flat, present, finite)
                        sumsq = sum_of_squares(flat) if finite else math.nan
                norm = math.sqrt(sumsq) if finite else None
                scale = clip_scale(norm, self.config.max_grad_norm) if norm is not None else 1.0
                fresh = self._momentum_starting(scheduled)
                runs = self._runs(present, scheduled, fresh) if not awaiting and norm is not None else []
                safe = awaiting > 0 or norm is None or self._stays_finite(flat, runs, scale, norm)
                if not safe and self.config.nonfinite == "error":
                    raise NonFiniteResult(
                        "this step would make the parameters or the optimizer state NaN or infinite (a gradient, "
                        "learning rate or weight decay too large for float32, or a zero eps); nothing was applied"
                    )
            except InvalidInput:
                self.counters.steps_rejected += 1
                raise
            if dry:
                return StepResult("checked", self.step_count, None, skipped=norm is None or not safe,
                                  hyperparams=self._hyperparams_digest())  # fmt: skip
            safe = safe and not skip
            self._assign(planned, new_base)
            self.updated_at = time.time()
            self.version += 1

            contributors: list[str] = []
            if awaiting:  # a contribution, added to the pending sum
                self._contribute(flat, present, finite, key)
                return StepResult("accepted", self.step_count, None, awaiting=awaiting)
            if pending is not None and self.config.accumulate > 1:
                contributors, self.pending = pending.keys, None
            applied = norm is not None and safe
            if applied:
                self._apply(flat, present, scale, runs, fresh)
                self.step_count += 1
                self.counters.steps_applied += 1
                self.last_grad_norm = norm
            else:
                self.counters.steps_skipped += 1
            # every contribution to this step now shares its outcome, so any of them replays the same answer
            record = KeyRecord(self.step_count, "applied" if applied else "skipped", norm)
            for contributor in contributors:
                if contributor in self.keys:
                    self.keys[contributor] = record
            if key is not None:
                self._remember(key, record)
            status: Literal["applied", "skipped"] = "applied" if applied else "skipped"
            return StepResult(status, self.step_count, self._answer_params(want_params, out), not applied, norm)

    @property
    def closed(self) -> bool:
        return self.gone is not None

    def _check_open(self) -> None:
        if self.gone == "deleted":
            raise SessionNotFound(f"session {self.id!r} was deleted")
        if self.gone is not None:
            raise SessionMoved(f"session {self.id!r} was {self.gone}")

    def _replay(self, key: str, record: KeyRecord, want_params: bool, out: np.ndarray | None = None) -> StepResult:
        """The answer to a retried request whose key is known (without applying anything)."""
        if record.outcome == "accepted":  # a contribution to the step still being gathered
            self.counters.replays += 1
            return StepResult("accepted", self.step_count, None, awaiting=self._awaiting())
        if record.step != self.step_count:
            raise StepConflict(
                f"Idempotency-Key {key!r} was already applied at step {record.step}; "
                f"the session is now at step {self.step_count}",
                applied_at_step=record.step,
                current_step=self.step_count,
            )
        self.counters.replays += 1
        return StepResult(
            "replayed",
            self.step_count,
            self._answer_params(want_params, out),
            record.outcome == "skipped",
            record.grad_norm,
        )

    def _replay_check(self, key: str, record: KeyRecord) -> StepResult:
        """What :meth:`_replay` would answer, without counting it (a dry run)."""
        if record.outcome != "accepted" and record.step != self.step_count:
            self._replay(key, record, False)  # raises StepConflict
        return StepResult("checked", self.step_count, None, skipped=record.outcome == "skipped",
                          hyperparams=self._hyperparams_digest())  # fmt: skip

    def _hyperparams_digest(self) -> str:
        """What every shard of a session must hold alike: its groups' hyperparameters and the base ones."""
        return hashlib.blake2b(repr(([g.hp for g in self.groups], self.base_hp)).encode(), digest_size=16).hexdigest()

    def _awaiting(self) -> int:
        return self.config.accumulate - (self.pending.count if self.pending else 0)

    def _average(
        self, flat: np.ndarray, present: np.ndarray | None, finite: bool
    ) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """The step's gradient once the last of ``accumulate`` contributions came: the average of all (a new array;
        the pending sum is left as it is until the step is committed)."""
        pending = self.pending
        if pending is None:  # accumulate == 1 cannot come here; a fresh sum of one contribution
            return flat, present, finite
        average = pending.total + flat
        average /= np.float32(self.config.accumulate)
        seen = pending.present | (True if present is None else present)
        return average, None if seen.all() else seen, finite and not pending.nonfinite

    def _contribute(self, flat: np.ndarray, present: np.ndarray | None, finite: bool, key: str | None) -> None:
        """Add a contribution to the pending sum (accumulate > 1, not the last one)."""
        if self.pending is None:
            self.pending = Pending(np.zeros(self.layout.size, np.float32), np.zeros(len(self.layout.slots), bool))
        pending = self.pending
        pending.total += flat
        pending.present |= True if present is None else present
        pending.count += 1
        pending.nonfinite |= not finite
        self.counters.contributions += 1
        if key is not None:
            pending.keys.append(key)
            self._remember(key, KeyRecord(self.step_count, "accepted"))

    def _scheduled(self, hyperparams: list[Hyperparams]) -> list[Hyperparams]:
        """Each group's hyperparameters for the step being applied: lr times the schedule's factor.

        Computed before anything is written, so that an lr the schedule drives out of range refuses the step."""
        factor = self.config.schedule.factor(self.step_count + 1)
        if factor == 1.0:
            return hyperparams
        try:
            scheduled = [dataclasses.replace(hp, lr=hp.lr * factor) for hp in hyperparams]
        except HyperparamError as e:
            raise InvalidInput(
                f"the schedule gives an invalid learning rate at step {self.step_count + 1}: {e}"
            ) from None
        if any(hp.lr > FLOAT32_MAX for hp in scheduled):
            raise InvalidInput(f"the schedule drives the learning rate beyond float32 at step {self.step_count + 1}")
        return scheduled

    def _check_coefficients(self, hyperparams: list[Hyperparams]) -> None:
        """Refuse a step whose float32 coefficients would overflow: Adam's step size lr / (1 - beta1^t) and AdamW's
        decay lr * weight_decay, for an lr near float32's largest value. The step would write infinities or NaN
        into the parameters (as torch's would); here it is refused with nothing written. The smallest step number
        of any tensor gives the largest step size."""
        for hp in hyperparams:
            if not isinstance(hp, AdamHyperparams):
                continue
            if hp.lr <= FLOAT32_MAX * (1 - hp.betas[0]) and hp.lr * hp.weight_decay <= FLOAT32_MAX:
                continue  # fine at every step (1 - beta1^t >= 1 - beta1): the usual case, decided without t
            t = int(self.tensor_steps.min(initial=0)) + 1
            step_size = hp.lr / (1 - hp.betas[0] ** t)
            if step_size > FLOAT32_MAX or hp.lr * hp.weight_decay > FLOAT32_MAX:
                raise InvalidInput(
                    f"lr {hp.lr!r} gives a step size ({step_size:.3g}) or a decay (lr * weight_decay = "
                    f"{hp.lr * hp.weight_decay:.3g}) beyond float32 at step {t}: the parameters would become "
                    "infinite"
                )

    def _runs(
        self, present: np.ndarray | None, hyperparams: list[Hyperparams], fresh: np.ndarray | None
    ) -> list[finite_math.Run]:
        """The ranges one step updates: runs of present tensors sharing a group and a step number (and, for SGD,
        whether their momentum buffer starts now: such a run is stepped as a first step), each with its step number
        (1 for a tensor's first step) and hyperparameters."""
        slots, steps = self.layout.slots, self.tensor_steps
        runs = []
        i = 0
        while i < len(slots):
            if present is not None and not present[i]:
                i += 1
                continue
            j = i + 1
            while (
                j < len(slots)
                and slots[j].group == slots[i].group
                and steps[j] == steps[i]
                and (present is None or present[j])
                and (fresh is None or fresh[j] == fresh[i])
            ):
                j += 1
            t = 1 if fresh is not None and fresh[i] else int(steps[i]) + 1
            runs.append((slots[i].offset, slots[j - 1].stop, t, hyperparams[slots[i].group]))
            i = j
        return runs

    def _stays_finite(self, grads: np.ndarray, runs: list[finite_math.Run], grad_scale: float, norm: float) -> bool:
        """Whether stepping ``runs`` keeps every parameter and state value finite (see
        :mod:`optserve.service.finite`): proven from the bounds the session keeps, else from the exact magnitudes,
        else by a dry run. Sets the bounds the step leads to in ``_next_bounds`` (None when only a dry run could
        tell)."""
        grad_bound = max(norm, finite_math.UNDERFLOW) * grad_scale * finite_math.GRAD_MARGIN
        for _ in range(2):
            if self.bounds is None:
                self.bounds = finite_math.exact(self.params, self.state)
                self._bounds_exact = True
            after = self.bounds.copy()
            try:
                for _, _, t, hp in runs:
                    finite_math.step_bounds(self.optimizer, hp, t, grad_bound, self.bounds, after)
            except finite_math.Unprovable:
                break
            except OverflowError:
                if self._bounds_exact:
                    break
                self.bounds = None  # loose bounds: read the exact magnitudes and try again
                continue
            self._next_bounds = after
            return True
        self._next_bounds = None
        return finite_math.dry_run(
            self.optimizer, self.params, grads, self.state, runs, grad_scale, self.layout, self.state_layouts
        )

    def _apply(
        self,
        grads: np.ndarray,
        present: np.ndarray | None,
        grad_scale: float,
        runs: list[finite_math.Run],
        fresh: np.ndarray | None,
    ) -> None:
        """Step every run of present tensors sharing a group and step number: one fused call each."""
        self._own_params()
        for start, stop, t, hp in runs:
            fused.step_run(
                self.optimizer, self.params, grads, self.state, self.layout, self.state_layouts, start, stop, t, hp,
                grad_scale,
            )  # fmt: skip
        if present is None:
            self.tensor_steps += 1
        else:
            self.tensor_steps[present] += 1
        if fresh is not None:
            self.momentum_started |= fresh if present is None else fresh & present
        self.bounds, self._bounds_exact = self._next_bounds, False

    def _momentum_starting(self, hyperparams: list[Hyperparams]) -> np.ndarray | None:
        """SGD: the tensors whose momentum buffer this step starts (momentum on, buffer not started); None otherwise.

        SGD's kernels start the buffer from the gradient at step number 1, the only use they make of the number."""
        if self.optimizer != "sgd" or self.momentum_started.all():
            return None
        on = np.array([isinstance(hp, SGDHyperparams) and hp.momentum != 0 for hp in hyperparams])
        if not on.any():
            return None
        fresh = on[[s.group for s in self.layout.slots]] & ~self.momentum_started
        return fresh if fresh.any() else None

    def _remember(self, key: str, record: KeyRecord) -> None:
        self.keys[key] = record
        self.keys.move_to_end(key)
        while len(self.keys) > MAX_IDEMPOTENCY_KEYS:
            self.keys.popitem(last=False)

    def _answer_params(self, wanted: bool, out: np.ndarray | None = None) -> np.ndarray | None:
        """The parameters an answer carries: copied into ``out`` when it is given and of their size (shared memory
        of a Ray front or of a Unix socket client), else lent (:meth:`_lend`)."""
        if not wanted:
            return None
        if out is not None and out.nbytes == self.params.nbytes:
            out[:] = self.params
            return out
        return self._lend()

    def _lend(self) -> np.ndarray:
        """A read-only view of the parameters as they are now, without a copy: an answer is sent from the session's
        own buffer. While anything still references it (a transport still sending it, a caller keeping a step's
        result), the next step writes into a copy of its own instead (:meth:`_own_params`), so the view keeps
        showing the step it was lent at."""
        view = self.params.view()
        view.flags.writeable = False
        return view

    def _own_params(self) -> None:
        """Copy on write, before the parameters are changed in place: when a lent view of them is still referenced
        (every numpy view and memoryview of ``self.params`` holds a reference to it), the session moves to a copy
        and leaves the old buffer to the view's holders. The usual step finds nothing lent (its answer has left
        before the next request arrives) and steps in place."""
        if sys.getrefcount(self.params) > self._owned_refs:
            self.params = self.params.copy()
            self.lent_copies += 1

    # --- reading and configuring ----------------------------------------------------------------------------------

    def snapshot_params(self) -> tuple[int, np.ndarray]:
        """(step, copy of the flat parameters), consistent with each other."""
        with self.lock:
            self._check_open()
            return self.step_count, self.params.copy()

    def _plan_changes(
        self, changes: HyperparamChanges
    ) -> tuple[list[tuple[ParamGroup, Hyperparams]], Hyperparams | None]:
        """Validate hyperparameter changes: one mapping for every group (which also becomes the session's), or a
        list with one entry (or None) per group. Nothing is changed here; :meth:`_assign` does that.

        A change may need a state buffer the session does not hold yet (momentum switched on for SGD or RMSprop,
        RMSprop's centered, amsgrad), as torch creates it when first needed: the memory budget must have room."""
        new_base = None
        if isinstance(changes, Mapping):
            per_group: list[Mapping[str, Any] | None] = [changes] * len(self.groups)
            try:
                new_base = make_hyperparams(self.optimizer, changes, base=self.base_hp)
            except HyperparamError as e:
                raise InvalidInput(str(e)) from None
        else:
            per_group = list(changes)
            if len(per_group) != len(self.groups):
                raise InvalidInput(f"{len(per_group)} group change(s) given, the session has {len(self.groups)} groups")
        planned = []
        for group, values in zip(self.groups, per_group):
            if not values:
                continue
            if not isinstance(values, Mapping):
                raise InvalidInput(f"changes for group {group.index} must be an object of hyperparameters")
            try:
                hp = make_hyperparams(self.optimizer, values, base=group.hp)
            except HyperparamError as e:
                raise InvalidInput(str(e)) from None
            planned.append((group, hp))
        missing = self._missing_buffers(hp for _, hp in planned)
        if missing and self.budget is not None:
            self.budget(sum(4 * self.state_layouts[name].size for name in missing))
        return planned, new_base

    def _missing_buffers(self, hyperparams: Iterable[Hyperparams]) -> list[str]:
        """State buffers these hyperparameters step with that the session does not hold yet."""
        needed = dict.fromkeys(name for hp in hyperparams for name in hp.state_names())
        return [name for name in needed if name not in self.state]

    def hold_buffers(self, names: Iterable[str]) -> None:
        """Allocate zeroed state buffers for ``names`` not held yet (torch's lazily created state starts at zero;
        SGD's momentum buffer starts from the gradient, see ``momentum_started``). Buffers are never dropped: one
        switched off keeps its values and switching it on again resumes from them, as torch's state does."""
        new = {name: self._fresh(name) for name in names if name not in self.state}
        if new:  # a new dict: readers without the lock (the store's budget sums nbytes) never see one change size
            self.state = {**self.state, **new}

    def _fresh(self, name: str) -> np.ndarray:
        """A new state buffer at its algorithm's initial value (zeros by default: calloc'ed, so its pages become
        resident only when first written, as the moments of a session that has not stepped yet)."""
        size, value = self.state_layouts[name].size, self.algorithm.initial.get(name, 0.0)
        return np.zeros(size, np.float32) if value == 0 else np.full(size, value, np.float32)

    def _assign(self, planned: list[tuple[ParamGroup, Hyperparams]], new_base: Hyperparams | None) -> None:
        self.hold_buffers(self._missing_buffers(hp for _, hp in planned))
        for group, hp in planned:
            group.hp = hp
        if new_base is not None:
            self.base_hp = new_base

    def update_hyperparams(
        self, values: Mapping[str, Any], group: int | None = None, commit: Callable[[], object] | None = None
    ) -> None:
        """Change hyperparameters of every group, or of one; all groups are validated before any changes.

        ``commit`` is called with the change made and the lock still held (to snapshot it); if it raises, the change
        is undone before the error propagates, so nobody ever saw it."""
        with self.lock:
            self._check_open()
            if group is not None and not 0 <= group < len(self.groups):
                raise InvalidInput(f"group {group} does not exist; the session has {len(self.groups)} group(s)")
            before = ([g.hp for g in self.groups], self.base_hp, self.updated_at, self.version)
            if group is None:
                self._assign(*self._plan_changes(values))
            else:
                self._assign(*self._plan_changes([values if g.index == group else None for g in self.groups]))
            self.updated_at = time.time()
            self.version += 1
            if commit is None:
                return
            try:
                commit()
            except BaseException:
                hps, self.base_hp, self.updated_at, self.version = before
                for g, hp in zip(self.groups, hps):
                    g.hp = hp
                raise

    def close(self, why: Literal["deleted", "evicted", "replaced"] = "deleted") -> None:
        """Mark the session gone; a request waiting for the lock then answers 404 (deleted) or looks again."""
        with self.lock:
            self.gone = why

    def info(self) -> dict[str, Any]:
        """What the info endpoint reports: config, groups, step, tensors and counters."""
        factor = self.config.schedule.factor(self.step_count + 1)
        norm = self.last_grad_norm if self.last_grad_norm is not None and math.isfinite(self.last_grad_norm) else None
        return {
            "id": self.id,
            "optimizer": self.optimizer,
            "hyperparams": to_json(self.base_hp),
            "param_groups": [
                {
                    "index": g.index,
                    "params": g.names,
                    "hyperparams": to_json(g.hp),
                    "scheduled_lr": _finite_or_none(g.hp.lr * factor),
                }
                for g in self.groups
            ],
            "nonfinite": self.config.nonfinite,
            "max_grad_norm": self.config.max_grad_norm,
            "schedule": self.config.schedule.model_dump(),
            "accumulate": self.config.accumulate,
            "pending_contributions": self.pending.count if self.pending else 0,
            "step": self.step_count,
            "last_grad_norm": norm,
            "tensors": {
                s.name: {"shape": list(s.shape), "dtype": "float32", "group": s.group} for s in self.layout.slots
            },
            "num_params": self.layout.size,
            "state": sorted(self.state),
            "state_bytes": sum(b.nbytes for b in self.state.values()),
            "elementwise": self.algorithm.elementwise,
            "counters": self.counters.as_dict(),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    def current_config(self) -> SessionConfig:
        """The config with every change made since creation folded in (what a checkpoint stores)."""
        groups = [ParamGroupSpec(params=g.spec_names or g.names, **to_json(g.hp)) for g in self.groups]
        return self.config.model_copy(
            update={"optimizer": self.optimizer, "hyperparams": to_json(self.base_hp), "param_groups": groups}
        )
