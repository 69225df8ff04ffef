"""Where sessions live, and the operations the HTTP layer calls on them.

The routes talk to sessions only through :class:`SessionStore`: operations on session ids (create, list, info,
patch, delete, step, params, checkpoint export and import) taking decoded tensors and the meaning of a request, and
returning plain results. No route holds a :class:`~optserve.service.session.Session`, so a store may keep its
sessions anywhere.

:class:`MemoryStore` keeps them in this process, with snapshots in the data folder when it has one:

- Admission: the session count (sessions in memory, evicted to disk, and being created), tensors and parameters per
  session, and a memory budget for the state of the sessions in memory.
- Idle sessions are snapshotted and evicted to disk; the next request loads one back. Eviction happens under the
  session's lock and only when its snapshot holds every change, so no answered step is ever dropped with it; a
  request that waited for an evicted (or replaced) session looks its id up again instead of failing.
- Deleting marks the id first (a tombstone), so nothing loads the session back from its snapshot while the file is
  being removed.
- Creating and importing write the snapshot before the session becomes visible: a server that cannot write its data
  folder answers 503 and holds nothing it would lose at the next start. With ``fsync_every_step`` a step is answered
  only once a snapshot holds it: if the write fails, the step stays unanswered (503) until a retry finds it on disk.
- At start every snapshot is read back, as many into memory as the budget holds and the rest left on disk: a server
  always starts on its own data folder, whatever its limits are now.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from anyio import to_thread

from optserve.client.wire import Safetensors, WireError

from . import checkpoint
from .auth import ADMIN, Access
from .errors import (
    Conflict,
    InvalidInput,
    LimitExceeded,
    PayloadTooLarge,
    PreconditionFailed,
    ServiceError,
    SessionNotFound,
    StepConflict,
    StorageUnavailable,
    TooManySessions,
)
from .hyperparams import HyperparamError, make_hyperparams, optimizer_kind
from .layout import FlatLayout
from .persistence import Saver, Snapshots, Summary, checkpoint_summary
from .session import (
    SESSION_ID,
    HyperparamChanges,
    Session,
    SessionBusy,
    SessionConfig,
    SessionMoved,
    StepResult,
)

log = logging.getLogger("optserve.store")

INLINE_STATE_BYTES = 256 * 1024  # sessions up to ~64K float32 parameters step on the event loop (no thread hop)
# A step that no other step overlaps runs on the event loop up to this size too (4M float32 parameters, a few ms):
# with nothing else to serve, the hop to a worker thread and back (0.2-0.3 ms here) is pure delay, a fifth of a
# 1M-parameter step. Steps that overlap others go to threads, where the kernels run side by side (they release the
# GIL) and the loop keeps receiving.
INLINE_ALONE_BYTES = 16 << 20
LOOKUPS = 20  # times a request looks an id up again after finding the session evicted or replaced


def new_session_id() -> str:
    return uuid.uuid4().hex


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.match(session_id):
        raise InvalidInput(
            f"invalid session id {session_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return session_id


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 1000
    max_tensors_per_session: int = 100_000
    max_params_per_session: int = 4 << 30
    memory_budget_bytes: int = 64 << 30


@dataclass(frozen=True)
class Lifetimes:
    """How long idle sessions (no step or change) stay: ``ttl_seconds`` in memory, then evicted to disk;
    ``expire_seconds`` at all, then deleted with their snapshot (a crashed client's session). 0 means forever."""

    ttl_seconds: float = 0.0
    expire_seconds: float = 0.0


@dataclass(frozen=True)
class StepRequest:
    """What a step request means beyond its gradients (see :meth:`Session.step`)."""

    if_match: frozenset[int] | None = None
    key: str | None = None
    want_params: bool = True
    partial: bool = False
    changes: HyperparamChanges | None = None
    # a shard's step (the Ray store's sharded sessions, see Session.step): the whole gradient's sum of squares, a
    # dry run first, then the step itself, skipped when any shard would skip it
    sumsq: float | None = None
    dry: bool = False
    skip: bool = False
    # where the answer's parameters go when it fits them (shared memory: a Ray front's, a Unix socket client's)
    out: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Tensors:
    """Parameters to answer with: the step they are at, their layout and a flat copy of them."""

    step: int
    layout: FlatLayout
    flat: np.ndarray


@dataclass(frozen=True)
class StoreStats:
    sessions: int  # in memory
    evicted: int  # on disk only
    parameters: int  # held in memory
    state_bytes: int  # held in memory
    evictions: int = 0  # sessions evicted to disk so far
    reloads: int = 0  # sessions loaded back from disk on use so far
    expired: int = 0  # sessions deleted for idleness (OPTSERVE_SESSION_EXPIRE_SECONDS) so far
    snapshots: Saver | None = None  # its durations, failures and failing


@dataclass
class Health:
    ready: bool
    detail: dict[str, Any] = field(default_factory=dict)


class SessionStore(Protocol):
    """The operations the HTTP layer needs; every one takes the request's :class:`Access` where a session is
    concerned (create, list and import of a new id need the admin key, which the routes check)."""

    limits: Limits

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def maintain(self, now: float) -> None: ...
    def health(self) -> Health: ...
    def stats(self) -> StoreStats: ...
    async def cluster(self) -> dict[str, Any]: ...
    async def create(
        self, session_id: str, config: SessionConfig, params: Mapping[str, np.ndarray], token_digest: str | None
    ) -> dict[str, Any]: ...
    async def list_sessions(self) -> list[dict[str, Any]]: ...
    async def check(self, access: Access, session_id: str) -> None: ...
    async def info(self, access: Access, session_id: str) -> dict[str, Any]: ...
    async def patch(
        self, access: Access, session_id: str, values: Mapping[str, Any], group: int | None
    ) -> dict[str, Any]: ...
    async def delete(self, access: Access, session_id: str) -> None: ...
    async def step(
        self, access: Access, session_id: str, grads: Safetensors | Mapping[str, np.ndarray], request: StepRequest
    ) -> StepResult: ...
    async def params(
        self, access: Access, session_id: str, min_step: int | None = None, timeout: float = 0.0
    ) -> Tensors: ...
    async def export(self, access: Access, session_id: str) -> tuple[list[bytes | memoryview], int]: ...
    async def restore(
        self, access: Access, session_id: str, body: bytes | bytearray | memoryview
    ) -> tuple[dict[str, Any], bool]: ...


def state_floats(config: SessionConfig, shapes: list[tuple[int, ...]]) -> int:
    """How many floats a config keeps beyond the parameters of ``shapes`` (for the memory budget, before anything
    is allocated): each state buffer in its algorithm's shapes (one float per parameter for elementwise state,
    rows plus columns for Adafactor's factors), and the sum of contributions when accumulating."""
    try:
        base = make_hyperparams(config.optimizer, config.hyperparams)
        names = set(base.state_names())
        for group in config.param_groups:
            names |= set(make_hyperparams(config.optimizer, dict(group.model_extra or {}), base=base).state_names())
    except HyperparamError as e:
        raise InvalidInput(str(e)) from None
    sizes = optimizer_kind(config.optimizer).state_sizes(sorted(names), shapes)
    return sum(sizes.values()) + (sum(math.prod(s) for s in shapes) if config.accumulate > 1 else 0)


class MemoryStore:
    """Sessions in this process (see the module docstring); ``snapshots`` and ``saver`` make them durable."""

    def __init__(
        self,
        limits: Limits | None = None,
        snapshots: Snapshots | None = None,
        saver: Saver | None = None,
        lifetimes: Lifetimes | None = None,
        scan: bool = True,
    ) -> None:
        """``scan``: at start, read every snapshot in the folder back (the folder is this store's alone); False
        when the folder is shared (a cluster): the store then holds the sessions given to :meth:`adopt`."""
        self.limits = limits or Limits()
        self.scan = scan
        self.on_deleted: Callable[[str], object] = lambda session_id: None  # a hook: the session is gone for good
        self.snapshots = snapshots
        self.saver = saver if saver is not None else (Saver(snapshots) if snapshots is not None else None)
        self.lifetimes = lifetimes or Lifetimes()
        self._sessions: dict[str, Session] = {}
        self._on_disk: dict[str, Summary] = {}  # evicted for idleness (or left on disk at start): loaded on use
        self._reserved: dict[str, int] = {}  # ids being created or restored -> bytes they will hold
        self._deleting: set[str] = set()  # tombstones: ids whose snapshot is being removed
        self._lock = threading.Lock()  # membership changes; never held while waiting for a session's lock
        self._steps_running = 0  # step requests inside step() (on the event loop's thread)
        self.ready = False
        self.evictions = self.reloads = self.expired = 0

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.snapshots is not None and self.scan:
            await to_thread.run_sync(self._load_all)
        self.ready = True

    def adopt(self, session_id: str) -> None:
        """Take on a session from its snapshot in the (shared) folder: held on disk, loaded on first use. Raises
        FileNotFoundError when there is no snapshot, ValueError when it is not one."""
        assert self.snapshots is not None
        with self._lock:
            if session_id in self._sessions or session_id in self._on_disk:
                return
        self.snapshots.clean(session_id)
        summary = self.snapshots.summary(session_id)
        with self._lock:
            if session_id not in self._sessions:
                self._on_disk.setdefault(session_id, summary)

    def drop(self, session_id: str) -> None:
        """Forget a session without touching its snapshot (it is another store's now, or it goes back to the
        snapshot's step); requests waiting for it look the id up again."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            self._on_disk.pop(session_id, None)
        if session is not None:
            session.close("replaced")

    def session_ids(self) -> list[str]:
        """Every session this store holds, in memory or on disk."""
        return [*list(self._sessions), *list(self._on_disk)]

    def _load_all(self) -> None:
        """Read every snapshot back: the most recently written first into memory while the budget holds them, the
        others stay on disk until used. Limits never refuse a server its own sessions."""
        assert self.snapshots is not None
        self.snapshots.clean()
        loaded = left = 0
        for session_id in self.snapshots.ids():
            try:
                summary = self.snapshots.summary(session_id)
                if self._used() + summary.nbytes > self.limits.memory_budget_bytes:
                    self._on_disk[session_id] = summary
                    left += 1
                    continue
                session = self.snapshots.load(session_id)
            except Exception as e:  # noqa: BLE001 - any failure sets this one file aside, never the others
                self.snapshots.set_aside(session_id, None, f"{type(e).__name__}: {e}")
                continue
            session.budget = self._check_growth
            self._sessions[session_id] = session
            loaded += 1
        log.info("loaded %d session(s) from %s, %d left on disk (memory budget)", loaded, self.snapshots.dir, left)
        if self._count() > self.limits.max_sessions:
            log.warning("the data folder holds %d sessions, above max_sessions (%d): new ones are refused until "
                        "some are deleted", self._count(), self.limits.max_sessions)  # fmt: skip

    async def stop(self) -> None:
        """Graceful shutdown: the background writer finishes, then every changed session is written."""
        self.ready = False
        if self.saver is not None:
            saver = self.saver
            await to_thread.run_sync(saver.close)
            failed = await to_thread.run_sync(saver.flush, list(self._sessions.values()))
            log.info("shutdown: snapshots flushed (%d failed)", failed)

    async def maintain(self, now: float) -> None:
        """Expiry, time-based snapshots and idle eviction (the app calls this every half second)."""
        await self._expire(now)
        saver = self.saver
        if saver is None:
            return
        ttl = self.lifetimes.ttl_seconds
        for session in list(self._sessions.values()):
            if ttl and now - session.updated_at > ttl:
                if session.saved_version != session.version and not await to_thread.run_sync(
                    saver.save, session, False
                ):
                    continue  # being saved, or the write failed: try again next round
                if self._evict(session):
                    log.info("session %s evicted after %.0f s idle", session.id, now - session.updated_at)
            elif saver.due(session, now):
                saver.request(session)

    async def _expire(self, now: float) -> None:
        """Delete the sessions idle for ``expire_seconds`` (in memory or on disk), as a DELETE would."""
        expire = self.lifetimes.expire_seconds
        if not expire:
            return
        idle = [s.id for s in list(self._sessions.values()) if now - s.updated_at > expire]
        idle += [sid for sid, summary in list(self._on_disk.items()) if now - summary.updated_at > expire]
        for session_id in idle:
            try:
                await self.delete(ADMIN, session_id)
            except SessionNotFound:
                continue  # deleted meanwhile
            except ServiceError as e:
                log.warning("session %s expired but could not be deleted: %s", session_id, e.detail)
                continue
            self.expired += 1
            log.info("session %s deleted after %.0f s without a step or change", session_id, expire)

    def _evict(self, session: Session) -> bool:
        """Drop a session from memory if every change is in its snapshot; atomic with steps (its lock)."""
        if not session.lock.acquire(blocking=False):
            return False  # busy: it is not idle
        try:
            if session.gone is not None or session.saved_version != session.version:
                return False
            with self._lock:
                if self._sessions.get(session.id) is not session:
                    return False
                self._to_disk(session)
            return True
        finally:
            session.lock.release()

    def _to_disk(self, session: Session) -> None:
        """Evict (the membership lock and the session's lock held, its snapshot current)."""
        session.gone = "evicted"
        del self._sessions[session.id]
        self._on_disk[session.id] = checkpoint_summary(session)
        self.evictions += 1

    def health(self) -> Health:
        if not self.ready:
            return Health(False, {"status": "starting"})
        failing = self.saver.failing if self.saver is not None else None
        if failing is not None:
            return Health(False, {"status": "degraded", "snapshots": "failing", "error": failing})
        return Health(True, {"status": "ready", "sessions": len(self._sessions) + len(self._on_disk)})

    async def cluster(self) -> dict[str, Any]:
        """This process as the one node of ``GET /v1/cluster``."""
        stats = self.stats()
        node = {"node_id": "local", "alive": True, "sessions": self.session_ids(), "memory_bytes": stats.state_bytes}
        return {"nodes": [node]}

    def stats(self) -> StoreStats:
        sessions = list(self._sessions.values())
        return StoreStats(
            len(sessions), len(self._on_disk), sum(s.layout.size for s in sessions), sum(s.nbytes for s in sessions),
            self.evictions, self.reloads, self.expired, self.saver,
        )  # fmt: skip

    # --- admission ---------------------------------------------------------------------------------------------

    def _count(self, replacing: str | None = None) -> int:
        ids = len(self._sessions) + len(self._on_disk) + len(self._reserved)
        return ids - (replacing is not None and (replacing in self._sessions or replacing in self._on_disk))

    def _used(self, replacing: str | None = None) -> int:
        held = sum(s.nbytes for sid, s in list(self._sessions.items()) if sid != replacing)
        return held + sum(n for sid, n in list(self._reserved.items()) if sid != replacing)

    def admit(self, n_tensors: int, n_params: int, state_floats: int, replacing: str | None = None) -> None:
        """Refuse a session that would break a limit, before any of its memory is allocated."""
        limits = self.limits
        if n_tensors > limits.max_tensors_per_session:
            raise PayloadTooLarge(
                f"{n_tensors} tensors exceed the limit of {limits.max_tensors_per_session} per session",
                limit=limits.max_tensors_per_session,
            )
        if n_params > limits.max_params_per_session:
            raise PayloadTooLarge(
                f"{n_params} parameters exceed the limit of {limits.max_params_per_session} per session",
                limit=limits.max_params_per_session,
            )
        with self._lock:
            self._check_count(replacing)
            self._check_budget(4 * (n_params + state_floats), replacing)

    def _check_count(self, replacing: str | None) -> None:
        count = self._count(replacing)
        if count >= self.limits.max_sessions:
            raise TooManySessions(
                f"the server holds {count} sessions, its limit (max_sessions); delete some first",
                limit=self.limits.max_sessions,
            )

    def _check_budget(self, nbytes: int, replacing: str | None) -> None:
        used = self._used(replacing)
        if used + nbytes > self.limits.memory_budget_bytes:
            raise LimitExceeded(
                f"this session needs {nbytes} bytes of state; {used} of the memory budget of "
                f"{self.limits.memory_budget_bytes} bytes are in use",
                needed_bytes=nbytes,
                used_bytes=used,
                budget_bytes=self.limits.memory_budget_bytes,
            )

    def _check_growth(self, nbytes: int) -> None:
        """Refuse a session's growth by ``nbytes`` (a state buffer created by a hyperparameter change) beyond the
        budget. Called under that session's lock, so without the membership lock (taken before sessions' locks);
        the sum reads a copy of the membership, so two sessions growing at once may pass it together."""
        used = self._used()
        if used + nbytes > self.limits.memory_budget_bytes:
            raise LimitExceeded(
                f"this change needs {nbytes} more bytes of state; {used} of the memory budget of "
                f"{self.limits.memory_budget_bytes} bytes are in use",
                needed_bytes=nbytes,
                used_bytes=used,
                budget_bytes=self.limits.memory_budget_bytes,
            )

    def _save_for_room(self, nbytes: int) -> None:
        """Before :meth:`_make_room`, off the event loop: snapshot the least recently used sessions that would have
        to leave memory for ``nbytes`` more to fit, so that they can (a session being saved meanwhile is skipped)."""
        if self.saver is None:
            return
        excess = self._used() + nbytes - self.limits.memory_budget_bytes
        for victim in sorted(list(self._sessions.values()), key=lambda s: s.updated_at):
            if excess <= 0:
                break
            if victim.saved_version != victim.version:
                self.saver.save(victim, wait=False)
            excess -= victim.nbytes

    def _make_room(self, nbytes: int) -> None:
        """Under the membership lock: evict idle sessions whose snapshot is current (least recently used first)
        until ``nbytes`` more fit the budget, or raise 507."""
        budget = self.limits.memory_budget_bytes
        for victim in sorted(self._sessions.values(), key=lambda s: s.updated_at):
            if self._used() + nbytes <= budget:
                break
            if victim.saved_version != victim.version or not victim.lock.acquire(blocking=False):
                continue
            try:
                if victim.gone is None and victim.saved_version == victim.version:
                    self._to_disk(victim)
            finally:
                victim.lock.release()
        self._check_budget(nbytes, None)

    def get(self, session_id: str) -> Session:
        """The session object held in memory under ``session_id`` (in-process introspection for tests and
        embedding; the HTTP layer never uses it)."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r} in memory")
        return session

    # --- finding a session -------------------------------------------------------------------------------------

    def _find(self, access: Access, session_id: str) -> Session | None:
        """The session in memory after checking ``access`` (None when it is on disk, to be loaded); 404/403 when
        there is no such session."""
        session = self._sessions.get(session_id)
        if session is not None:
            access.open(session_id, session.token_digest)
            return session
        summary = self._on_disk.get(session_id)
        if summary is None or session_id in self._deleting:
            raise access.missing(session_id)
        access.open(session_id, summary.token_digest)
        return None

    def holds(self, session_id: str) -> bool:
        """Whether this store holds the session (in memory or on disk), without loading it."""
        return session_id in self._sessions or session_id in self._on_disk

    async def session(self, access: Access, session_id: str) -> Session:
        """The session itself, loaded if it was on disk (a shard's leader reads its shard's config)."""
        return await self._open(access, session_id)

    def save_now(self, session_id: str) -> None:
        """Snapshot a session in memory now (off the event loop; a sharded session's aligned snapshot)."""
        session = self._sessions.get(session_id)
        if session is not None and self.saver is not None and not self.saver.save(session):
            raise StorageUnavailable(f"the snapshot of session {session_id!r} could not be written")

    async def _open(self, access: Access, session_id: str) -> Session:
        session = self._find(access, session_id)
        if session is None:
            session = await to_thread.run_sync(self._reload, session_id)
        return session

    def _reload(self, session_id: str) -> Session:
        """Bring a session back from its snapshot (off the event loop; one load per id at a time)."""
        assert self.snapshots is not None
        with self.snapshots.lock(session_id):
            session = self._sessions.get(session_id)
            if session is not None:
                return session
            if session_id not in self._on_disk or session_id in self._deleting:
                raise SessionNotFound(f"no session {session_id!r}")
            try:
                session = self.snapshots.load(session_id)
            except FileNotFoundError:
                with self._lock:
                    self._on_disk.pop(session_id, None)
                raise SessionNotFound(f"no session {session_id!r}") from None
            except OSError as e:
                raise StorageUnavailable(f"the snapshot of session {session_id!r} cannot be read now: {e}") from None
            except (ServiceError, WireError, ValueError) as e:
                self.snapshots.set_aside(session_id, None, f"{type(e).__name__}: {e}")
                with self._lock:
                    self._on_disk.pop(session_id, None)
                raise SessionNotFound(
                    f"the snapshot of session {session_id!r} does not load; it was set aside"
                ) from None
            self._save_for_room(session.nbytes)
            with self._lock:
                if session_id not in self._on_disk or session_id in self._deleting:
                    raise SessionNotFound(f"no session {session_id!r}")
                self._make_room(session.nbytes)
                del self._on_disk[session_id]
                session.budget = self._check_growth
                self._sessions[session_id] = session
                self.reloads += 1
        log.info("session %s reloaded from its snapshot at step %d", session_id, session.step_count)
        return session

    # --- operations --------------------------------------------------------------------------------------------

    async def create(
        self, session_id: str, config: SessionConfig, params: Mapping[str, np.ndarray], token_digest: str | None
    ) -> dict[str, Any]:
        shapes = [tuple(a.shape) for a in params.values()]
        self.admit(len(params), sum(int(a.size) for a in params.values()), state_floats(config, shapes))
        session = await to_thread.run_sync(Session, session_id, config, params)
        session.token_digest = token_digest
        info = session.info()  # before the store changes: an answer that cannot be built leaves nothing behind
        with self._lock:
            taken = (session_id in self._sessions or session_id in self._on_disk or session_id in self._reserved
                     or session_id in self._deleting)  # fmt: skip
            if taken or (self.snapshots is not None and self.snapshots.exists(session_id)):
                raise Conflict(f"session {session_id!r} already exists", session_id=session_id)
            self._check_count(None)
            self._check_budget(session.nbytes, None)
            self._reserved[session_id] = session.nbytes
        try:
            await to_thread.run_sync(self._commit, session)
        finally:
            with self._lock:
                self._reserved.pop(session_id, None)
        return info

    def _commit(self, session: Session) -> bool:
        """Make a new session visible under its id once its snapshot is on disk (503 if it cannot be written);
        the session it replaces, if any, is closed. True if one was replaced."""
        if self.snapshots is None or self.saver is None:
            return self._swap(session)
        with self.snapshots.lock(session.id):
            try:
                self.saver.write(session)
            except Exception as e:
                raise StorageUnavailable(
                    f"the session's snapshot could not be written, so it was not kept: {e}"
                ) from None
            return self._swap(session)

    def _swap(self, session: Session) -> bool:
        with self._lock:
            old = self._sessions.get(session.id)
            existed = old is not None or self._on_disk.pop(session.id, None) is not None
            session.budget = self._check_growth
            self._sessions[session.id] = session
        if old is not None:
            old.close("replaced")  # requests still holding it look the id up again
        return existed

    async def list_sessions(self) -> list[dict[str, Any]]:
        live = [
            {"id": s.id, "optimizer": s.optimizer, "step": s.step_count, "num_params": s.layout.size,
             "created_at": s.created_at, "updated_at": s.updated_at}
            for s in list(self._sessions.values())
        ]  # fmt: skip
        return live + [s.listing() for s in list(self._on_disk.values())]

    async def check(self, access: Access, session_id: str) -> None:
        self._find(access, session_id)

    async def info(self, access: Access, session_id: str) -> dict[str, Any]:
        session = await self._open(access, session_id)
        return session.info()

    async def patch(
        self, access: Access, session_id: str, values: Mapping[str, Any], group: int | None
    ) -> dict[str, Any]:
        for _ in range(LOOKUPS):
            session = await self._open(access, session_id)
            try:
                await to_thread.run_sync(self._patch, session, values, group)
            except SessionMoved:
                continue
            return session.info()
        raise StorageUnavailable(f"session {session_id!r} keeps moving; try again")

    def _patch(self, session: Session, values: Mapping[str, Any], group: int | None) -> None:
        """The change and its snapshot, under the session's lock: undone if the snapshot cannot be written."""
        if self.saver is None or self.snapshots is None:
            session.update_hyperparams(values, group)
            return
        saver = self.saver

        def commit() -> None:
            try:
                saver.write(session, held=True)
            except Exception as e:
                raise StorageUnavailable(f"the change could not be written to the session's snapshot: {e}") from None

        with self.snapshots.lock(session.id):
            session.update_hyperparams(values, group, commit=commit)

    async def delete(self, access: Access, session_id: str) -> None:
        with self._lock:
            session = self._find(access, session_id)
            self._deleting.add(session_id)
            self._sessions.pop(session_id, None)
            summary = self._on_disk.pop(session_id, None)
        try:
            await to_thread.run_sync(self._remove, session_id, session)
        except BaseException:
            with self._lock:  # the snapshot is still there: so is the session
                if session is not None:
                    session.gone = None
                    self._sessions[session_id] = session
                elif summary is not None:
                    self._on_disk[session_id] = summary
            raise
        finally:
            with self._lock:
                self._deleting.discard(session_id)
        self.on_deleted(session_id)

    def _remove(self, session_id: str, session: Session | None) -> None:
        if session is not None:
            session.close("deleted")  # waits for a step under way; later ones answer 404
        if self.snapshots is not None:
            with self.snapshots.lock(session_id):
                try:
                    self.snapshots.delete(session_id)
                except OSError as e:
                    raise StorageUnavailable(f"the session's snapshot could not be removed: {e}") from None

    async def step(
        self, access: Access, session_id: str, grads: Safetensors | Mapping[str, np.ndarray], request: StepRequest
    ) -> StepResult:
        self._steps_running += 1
        try:
            for _ in range(LOOKUPS):
                session = await self._open(access, session_id)
                try:
                    result = await self._step(session, grads, request)
                except SessionMoved:
                    await asyncio.sleep(0)
                    continue
                except (PreconditionFailed, StepConflict):
                    await self._durable(session)  # the refusal tells the session's step: only a step on disk
                    raise
                if result.status == "checked":
                    return result
                await self._after_step(session, result)
                result.layout = session.layout
                return result
            raise StorageUnavailable(f"session {session_id!r} keeps moving; try again")
        finally:
            self._steps_running -= 1

    async def _step(
        self, session: Session, grads: Safetensors | Mapping[str, np.ndarray], request: StepRequest
    ) -> StepResult:
        await self._durable(session)  # an earlier answer was refused for want of a snapshot: write it first

        def run(blocking: bool = True) -> StepResult:
            return session.step(
                grads,
                if_match=request.if_match,
                key=request.key,
                want_params=request.want_params,
                partial=request.partial,
                changes=request.changes,
                blocking=blocking,
                sumsq=request.sumsq,
                dry=request.dry,
                skip=request.skip,
                out=request.out,
            )

        size = session.params.nbytes
        # small: a thread hop costs more than the step; alone: nothing to serve meanwhile
        if size <= INLINE_STATE_BYTES or (size <= INLINE_ALONE_BYTES and self._steps_running == 1):
            try:
                return run(blocking=False)
            except SessionBusy:
                pass
        return await to_thread.run_sync(run)

    async def _after_step(self, session: Session, result: StepResult) -> None:
        """The snapshot policy: with fsync_every_step nothing is answered before it is on disk (503 otherwise, the
        step unrevealed until a retry finds it written), else a background snapshot when the session is due."""
        saver = self.saver
        if saver is None:
            return
        if saver.fsync_every_step:
            await self._durable(session)
        elif result.status != "replayed" and saver.due(session, time.time()):
            saver.request(session)

    async def _durable(self, session: Session) -> None:
        """With fsync_every_step, make sure everything the session holds is on disk (503 if it cannot be)."""
        saver = self.saver
        if saver is None or not saver.fsync_every_step or session.saved_version == session.version:
            return
        if not await to_thread.run_sync(saver.save, session):
            raise StorageUnavailable(
                "the step could not be written to the session's snapshot, so it is not answered as applied; retry "
                "with the same Idempotency-Key"
            )

    async def params(
        self, access: Access, session_id: str, min_step: int | None = None, timeout: float = 0.0
    ) -> Tensors:
        deadline = time.monotonic() + timeout
        for _ in range(LOOKUPS):
            session = await self._open(access, session_id)
            delay = 0.0005
            while min_step is not None and session.step_count < min_step and session.gone is None:
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.02)
            await self._durable(session)
            try:
                if session.params.nbytes <= INLINE_STATE_BYTES:
                    step, flat = session.snapshot_params()
                else:
                    step, flat = await to_thread.run_sync(session.snapshot_params)
            except SessionMoved:
                continue
            return Tensors(step, session.layout, flat)
        raise StorageUnavailable(f"session {session_id!r} keeps moving; try again")

    async def export(self, access: Access, session_id: str) -> tuple[list[bytes | memoryview], int]:
        for _ in range(LOOKUPS):
            session = await self._open(access, session_id)
            await self._durable(session)
            parts, _, step = await to_thread.run_sync(checkpoint.dump_versioned, session)
            if session.gone is None:
                return parts, step
        raise StorageUnavailable(f"session {session_id!r} keeps moving; try again")

    async def restore(
        self, access: Access, session_id: str, body: bytes | bytearray | memoryview
    ) -> tuple[dict[str, Any], bool]:
        if session_id in self._sessions or session_id in self._on_disk:
            self._find(access, session_id)  # replacing: the session's token or the admin key
        elif not access.admin:
            raise access.missing(session_id)  # creating: the admin key
        session = await to_thread.run_sync(checkpoint.load, body, session_id)
        if session.config.shard is not None and "#" not in session_id:  # ids with '#' are the Ray store's own
            raise InvalidInput("this checkpoint is of one shard of a session, not of a whole session")
        self.admit(
            len(session.layout.slots), session.layout.size, session.nbytes // 4 - session.layout.size, session_id
        )
        info = session.info()  # before the store changes
        with self._lock:
            if session_id in self._reserved or session_id in self._deleting:
                raise Conflict(f"session {session_id!r} is being created or deleted", session_id=session_id)
            self._check_count(session_id)
            self._check_budget(session.nbytes, session_id)
            self._reserved[session_id] = session.nbytes
        try:
            replaced = await to_thread.run_sync(self._commit, session)
        finally:
            with self._lock:
                self._reserved.pop(session_id, None)
        return info, replaced
