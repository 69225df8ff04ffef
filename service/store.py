"""Where sessions live: one small interface, so a second backend (Ray actors, shards) can slot in later.

:class:`MemoryStore` keeps sessions in this process, admits new ones within the limits (session count, parameters
and tensors per session, a memory budget for all sessions) and, given :class:`~optserve.service.persistence.Snapshots`,
brings back a session evicted for idleness from its snapshot on first use. Replacing or deleting a session closes the
old object under its lock, so a step that was waiting for it fails cleanly (404) instead of landing in a session
nobody sees.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Protocol

from .errors import Conflict, InvalidInput, LimitExceeded, PayloadTooLarge, SessionNotFound, TooManySessions
from .persistence import Snapshots
from .session import SESSION_ID, Session

log = logging.getLogger("optserve.store")


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


class SessionStore(Protocol):
    def get(self, session_id: str) -> Session: ...
    def admit(self, n_tensors: int, n_params: int, state_buffers: int, replacing: str | None = None) -> None: ...
    def add(self, session: Session) -> None: ...
    def replace(self, session: Session) -> bool: ...
    def remove(self, session_id: str) -> Session: ...
    def list(self) -> list[Session]: ...


class MemoryStore:
    """Sessions in a dict of this process, guarded by one lock for membership changes."""

    def __init__(self, limits: Limits | None = None, snapshots: Snapshots | None = None) -> None:
        self.limits = limits or Limits()
        self.snapshots = snapshots
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        if self.snapshots is not None and SESSION_ID.match(session_id) and self.snapshots.exists(session_id):
            return self._reload(session_id)
        raise SessionNotFound(f"no session {session_id!r}")

    def _reload(self, session_id: str) -> Session:
        """Bring back a session evicted for idleness (its snapshot is complete: it was written before eviction)."""
        assert self.snapshots is not None
        with self._lock:
            if session_id in self._sessions:
                return self._sessions[session_id]
            try:
                session = self.snapshots.load(session_id)
            except FileNotFoundError:
                raise SessionNotFound(f"no session {session_id!r}") from None
            self._check_budget(session.nbytes, None)
            session.budget = self._check_growth
            self._sessions[session_id] = session
            log.info("session %s reloaded from its snapshot at step %d", session_id, session.step_count)
            return session

    # --- admission ---------------------------------------------------------------------------------------------

    def admit(self, n_tensors: int, n_params: int, state_buffers: int, replacing: str | None = None) -> None:
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
            self._check_budget(4 * n_params * (1 + state_buffers), replacing)

    def _check_count(self, replacing: str | None) -> None:
        count = len(self._sessions) - (replacing in self._sessions)
        if count >= self.limits.max_sessions:
            raise TooManySessions(
                f"the server holds {count} sessions, its limit (max_sessions); delete some first",
                limit=self.limits.max_sessions,
            )

    def _check_budget(self, nbytes: int, replacing: str | None) -> None:
        used = sum(s.nbytes for sid, s in self._sessions.items() if sid != replacing)
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
        budget. Called under that session's lock, so without the store's (``replace`` takes them the other way
        round); the sum reads a copy of the membership."""
        used = sum(s.nbytes for s in list(self._sessions.values()))
        if used + nbytes > self.limits.memory_budget_bytes:
            raise LimitExceeded(
                f"this change needs {nbytes} more bytes of state; {used} of the memory budget of "
                f"{self.limits.memory_budget_bytes} bytes are in use",
                needed_bytes=nbytes,
                used_bytes=used,
                budget_bytes=self.limits.memory_budget_bytes,
            )

    # --- membership --------------------------------------------------------------------------------------------

    def add(self, session: Session) -> None:
        """Add a new session; 409 if the id is taken (in memory or as a snapshot), limits checked again."""
        with self._lock:
            if session.id in self._sessions or (self.snapshots is not None and self.snapshots.exists(session.id)):
                raise Conflict(f"session {session.id!r} already exists", session_id=session.id)
            self._check_count(None)
            self._check_budget(session.nbytes, None)
            session.budget = self._check_growth
            self._sessions[session.id] = session

    def replace(self, session: Session) -> bool:
        """Put a session under its id, closing any previous one; True if one was replaced."""
        with self._lock:
            old = self._sessions.get(session.id)
            self._check_count(session.id)
            self._check_budget(session.nbytes, session.id)
            if old is not None:
                old.close()
            session.budget = self._check_growth
            self._sessions[session.id] = session
            existed = old is not None or (self.snapshots is not None and self.snapshots.exists(session.id))
        return existed

    def remove(self, session_id: str) -> Session:
        """Delete a session, and its snapshot."""
        session = self.get(session_id)
        with self._lock:
            self._sessions.pop(session_id, None)
        session.close()
        if self.snapshots is not None:
            self.snapshots.delete(session_id)
        return session

    def evict(self, session_id: str) -> None:
        """Drop an idle session from memory (its snapshot stays; the next request loads it back)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close()

    def list(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())
