"""Where sessions live: one small interface, so a second backend (Ray actors, shards) can slot in later.

:class:`MemoryStore` keeps sessions in this process. Replacing or deleting a session closes the old object under
its lock, so a step that was waiting for it fails cleanly (404) instead of landing in a session nobody sees.
"""

from __future__ import annotations

import re
import threading
import uuid
from typing import Protocol

from .errors import Conflict, InvalidInput, SessionNotFound
from .session import Session

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_session_id() -> str:
    return uuid.uuid4().hex


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.match(session_id):
        raise InvalidInput(
            f"invalid session id {session_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return session_id


class SessionStore(Protocol):
    def get(self, session_id: str) -> Session: ...
    def add(self, session: Session) -> None: ...
    def replace(self, session: Session) -> bool: ...
    def remove(self, session_id: str) -> Session: ...
    def list(self) -> list[Session]: ...


class MemoryStore:
    """Sessions in a dict of this process, guarded by one lock for membership changes."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFound(f"no session {session_id!r}") from None

    def add(self, session: Session) -> None:
        """Add a new session; 409 if the id is taken."""
        with self._lock:
            if session.id in self._sessions:
                raise Conflict(f"session {session.id!r} already exists", session_id=session.id)
            self._sessions[session.id] = session

    def replace(self, session: Session) -> bool:
        """Put a session under its id, closing any previous one; True if one was replaced."""
        with self._lock:
            old = self._sessions.get(session.id)
            if old is not None:
                old.close()
            self._sessions[session.id] = session
            return old is not None

    def remove(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        session.close()
        return session

    def list(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())
