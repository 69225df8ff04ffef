"""Durable sessions: atomic snapshots in the data folder, and loading them back when the server starts.

A snapshot is the session's checkpoint file (:mod:`optserve.client.checkpoint`) at
``<data_dir>/sessions/<id>.safetensors``. It is written to a temporary file in the same folder, flushed and
fsynced, renamed over the previous snapshot and the folder fsynced: a crash at any moment leaves either the previous
snapshot or the new one, never a mix. At start every snapshot is loaded; a file that does not load is reported and
moved to ``<data_dir>/corrupt/`` so that it never stops the others.

When snapshots are taken (settings): at creation and restore, every N applied steps, every T seconds while
changed, on graceful shutdown, before an idle session is evicted from memory and, with ``fsync_every_step``,
before every step's answer.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import dump_versioned, load
from .diskio import fsync_dir, replace_file
from .session import SESSION_ID, Session

log = logging.getLogger("optserve.persistence")

SUFFIX = ".safetensors"
DUMP_ON_LOOP_BYTES = 256 * 1024  # sessions up to this many bytes of parameters are copied for a snapshot on the loop
_tmp_numbers = itertools.count()  # temporary file names: <id>.<pid>.<n>.tmp, never reused within a process
Dumped = tuple[list[bytes | memoryview], int, int]  # what dump_versioned returns


@dataclass
class LoadReport:
    loaded: list[Session]
    corrupt: list[tuple[Path, str]]


class Snapshots:
    """Snapshot files of sessions in one folder."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "sessions"
        self.corrupt_dir = Path(data_dir) / "corrupt"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def path(self, session_id: str) -> Path:
        return self.dir / f"{session_id}{SUFFIX}"

    def lock(self, session_id: str) -> threading.Lock:
        """The lock serializing the writes and the deletion of one id's snapshot file. Per id, not per session: a
        session replaced under the same id (a restored checkpoint) must not have its snapshot overwritten by a
        write of the session it replaced that was still under way."""
        with self._locks_lock:
            return self._locks.setdefault(session_id, threading.Lock())

    def write(self, session: Session, dumped: Dumped | None = None) -> float:
        """Snapshot ``session`` atomically (or the copy of it ``dumped`` earlier); returns the seconds it took.
        Skips the work when a snapshot as new is on disk already, or when the session was deleted or replaced
        meanwhile (its snapshot is no longer its own). Callers hold :meth:`lock` for the session's id."""
        started = time.perf_counter()
        if session.closed or (dumped is None and session.saved_version == session.version):
            return 0.0
        parts, version, step = dumped or dump_versioned(session)
        if version <= session.saved_version:  # an older copy must never replace a newer snapshot
            return 0.0
        replace_file(self.dir / f".{session.id}.{os.getpid()}.{next(_tmp_numbers)}.tmp", self.path(session.id), parts)
        if version > session.saved_version:
            session.saved_version, session.saved_step, session.saved_at = version, step, time.time()
        return time.perf_counter() - started

    def delete(self, session_id: str) -> None:
        """Remove a snapshot, after any write of it under way (close the session first: later writes skip it)."""
        with self.lock(session_id):
            self.path(session_id).unlink(missing_ok=True)
            fsync_dir(self.dir)

    def exists(self, session_id: str) -> bool:
        return self.path(session_id).exists()

    def load(self, session_id: str) -> Session:
        """Load one snapshot (FileNotFoundError when there is none)."""
        session = load(self.path(session_id).read_bytes(), session_id)
        session.saved_version, session.saved_step, session.saved_at = session.version, session.step_count, time.time()
        return session

    def load_all(self) -> LoadReport:
        """Every snapshot in the folder; the ones that fail to load are moved aside and reported."""
        report = LoadReport([], [])
        for tmp in self.dir.glob(".*.tmp"):  # a write cut short by a crash: the previous snapshot is intact
            tmp.unlink(missing_ok=True)
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            session_id = path.name[: -len(SUFFIX)]
            try:
                if not SESSION_ID.match(session_id):
                    raise ValueError(f"not a session id: {session_id!r}")
                report.loaded.append(self.load(session_id))
            except Exception as e:  # noqa: BLE001 - any failure sets this one file aside, never the others
                report.corrupt.append((self._set_aside(path), f"{type(e).__name__}: {e}"))
        for path, reason in report.corrupt:
            log.error("snapshot could not be loaded and was moved to %s: %s", path, reason)
        return report

    def _set_aside(self, path: Path) -> Path:
        self.corrupt_dir.mkdir(parents=True, exist_ok=True)
        target = self.corrupt_dir / f"{path.name}.{int(time.time())}"
        os.replace(path, target)
        return target


class Saver:
    """When to snapshot: the policy of the settings, applied by the app.

    ``due`` says whether a session needs a snapshot; ``request`` has the writer thread take it in the background,
    ``save`` takes it now (callers off the event loop); ``flush`` snapshots everything changed (graceful shutdown).
    """

    def __init__(
        self,
        snapshots: Snapshots,
        every_steps: int,
        every_seconds: float,
        fsync_every_step: bool,
        ttl_seconds: float,
    ) -> None:
        self.snapshots = snapshots
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.fsync_every_step = fsync_every_step
        self.ttl_seconds = ttl_seconds
        self.failures = 0
        self.on_saved: Callable[[float], object] = lambda seconds: None  # metrics hooks
        self.on_failed: Callable[[], object] = lambda: None
        self._queue: queue.SimpleQueue[tuple[Session, Dumped | None] | None] = queue.SimpleQueue()
        self._queued: set[Session] = set()  # the sessions in the queue (by identity: a replaced one is another)
        self._writer: threading.Thread | None = None

    def due(self, session: Session, now: float) -> bool:
        if session.saved_version == session.version:
            return False
        if self.every_steps and session.step_count - session.saved_step >= self.every_steps:
            return True
        return bool(self.every_seconds) and now - session.saved_at >= self.every_seconds

    def save(self, session: Session, wait: bool = True, dumped: Dumped | None = None) -> bool | None:
        """Snapshot one session (thread-safe; callers run it off the event loop). False if it failed.

        Writes of one session never overlap (an older copy renamed last would undo a newer snapshot): with
        ``wait=False`` a session being saved already is left to that save (None); with ``wait=True`` this waits for
        it and then saves whatever changed since.
        """
        lock = self.snapshots.lock(session.id)
        if not lock.acquire(blocking=wait):
            return None
        try:
            seconds = self.snapshots.write(session, dumped)
        except Exception:  # noqa: BLE001 - a failed snapshot is reported; the previous one stays valid
            self.failures += 1
            self.on_failed()
            log.exception("snapshot of session %s failed", session.id)
            return False
        finally:
            lock.release()
        if seconds:
            self.on_saved(seconds)
        return True

    def request(self, session: Session) -> None:
        """Snapshot ``session`` in the background, on the saver's own writer thread (started on first use).

        Cheap enough to call from the event loop after every step: a session already waiting for the writer is not
        queued again, and the writer hands nothing back to the loop (no thread pool, no future to resolve)."""
        if session in self._queued:
            return
        # A small session is copied right here: the writer then never holds its lock, and a step never finds it
        # busy (waiting for the GIL, a writer holding the lock sent every step of that session to the thread pool).
        try:
            dumped = dump_versioned(session) if session.params.nbytes <= DUMP_ON_LOOP_BYTES else None
        except Exception:  # noqa: BLE001 - the step was applied; its snapshot is left to the next one
            self.failures += 1
            self.on_failed()
            log.exception("snapshot copy of session %s failed", session.id)
            return
        self._queued.add(session)
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_queued, name="optserve-snapshots", daemon=True)
            self._writer.start()
        self._queue.put((session, dumped))

    def _write_queued(self) -> None:
        while (item := self._queue.get()) is not None:
            session, dumped = item
            self.save(session, dumped=dumped)
            self._queued.discard(session)  # changes made meanwhile: the next step finds the session due again

    def close(self) -> None:
        """Let the writer finish what is queued, and stop it."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None

    def flush(self, sessions: list[Session]) -> int:
        """Snapshot every changed session; the number that failed."""
        return sum(not self.save(s) for s in sessions if s.saved_version != s.version)
