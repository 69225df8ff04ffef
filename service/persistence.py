"""Durable sessions: atomic snapshots in the data folder, and reading them back.

A snapshot is the session's checkpoint file (:mod:`optserve.client.checkpoint`) at
``<data_dir>/sessions/<id>.safetensors``. It is written to a temporary file in the same folder, flushed and
fsynced, renamed over the previous snapshot and the folder fsynced: a crash at any moment leaves either the previous
snapshot or the new one, never a mix. A file that does not load is reported and moved to ``<data_dir>/corrupt/`` so
that it never stops the others.

:class:`Snapshots` is the folder; :class:`Saver` is the policy of the settings (every N steps, every T seconds while
changed, before every answer with ``fsync_every_step``) and the writer thread that takes the periodic snapshots in
the background. The store (:mod:`optserve.service.store`) decides when a snapshot must be on disk before an answer.
A failed write is never silent: it is counted, logged, and the saver stays ``failing`` (``/readyz`` answers 503)
until a snapshot succeeds again.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from optserve.client import wire

from .checkpoint import dump_versioned, load
from .diskio import fsync_dir, replace_file
from .observability import Durations
from .session import SESSION_ID, Session

log = logging.getLogger("optserve.persistence")

SUFFIX = ".safetensors"
DUMP_ON_LOOP_BYTES = 256 * 1024  # sessions up to this many bytes of parameters are copied for a snapshot on the loop
_tmp_numbers = itertools.count()  # temporary file names: .<id>.<pid>.<n>.tmp, never reused within a process
Dumped = tuple[list[bytes | memoryview], int, int]  # what dump_versioned returns


@dataclass(frozen=True)
class Summary:
    """What a snapshot file says of its session without loading its tensors (its header only)."""

    session_id: str
    optimizer: str
    step: int
    num_params: int
    nbytes: int  # of state the session holds once loaded (about the file's size)
    token_digest: str | None
    updated_at: float

    def listing(self) -> dict[str, object]:
        return {"id": self.session_id, "optimizer": self.optimizer, "step": self.step, "num_params": self.num_params,
                "updated_at": self.updated_at}  # fmt: skip


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
        write of the session it replaced that was still under way. Taken before a session's own lock, never
        after."""
        with self._locks_lock:
            return self._locks.setdefault(session_id, threading.Lock())

    def write(self, session: Session, dumped: Dumped | None = None, *, held: bool = False) -> float:
        """Snapshot ``session`` atomically (or the copy of it ``dumped`` earlier); returns the seconds it took.
        Skips the work when a snapshot as new is on disk already, or when the session was deleted or replaced
        meanwhile (its snapshot is no longer its own). Callers hold :meth:`lock` for the session's id, and with
        ``held`` the session's own lock too."""
        started = time.perf_counter()
        if session.closed or (dumped is None and session.saved_version == session.version):
            return 0.0
        parts, version, step = dumped or dump_versioned(session, held=held)
        if version <= session.saved_version:  # an older copy must never replace a newer snapshot
            return 0.0
        if session.config.shard is not None:
            self._keep_previous(session.id)
        replace_file(self.dir / f".{session.id}.{os.getpid()}.{next(_tmp_numbers)}.tmp", self.path(session.id), parts)
        if version > session.saved_version:
            session.saved_version, session.saved_step, session.saved_at = version, step, time.time()
        return time.perf_counter() - started

    def previous(self, session_id: str) -> Path:
        """A shard's snapshot before its latest (recovery may need all shards at the step one of them is behind)."""
        return self.dir / f"{session_id}{SUFFIX}.prev"

    def _keep_previous(self, session_id: str) -> None:
        current = self.path(session_id)
        if current.exists():
            link = self.dir / f".{session_id}.{os.getpid()}.{next(_tmp_numbers)}.tmp"
            os.link(current, link)
            os.replace(link, self.previous(session_id))

    def step_of(self, path: Path) -> int:
        """The step a snapshot file holds (its header only); OSError or ValueError when it is not one."""
        return self.summary("", path).step

    def delete(self, session_id: str) -> None:
        """Remove a snapshot (callers hold :meth:`lock`, and closed the session first: later writes skip it)."""
        self.path(session_id).unlink(missing_ok=True)
        self.previous(session_id).unlink(missing_ok=True)
        fsync_dir(self.dir)

    def exists(self, session_id: str) -> bool:
        return self.path(session_id).exists()

    def load(self, session_id: str) -> Session:
        """Load one snapshot (FileNotFoundError when there is none)."""
        session = load(self.path(session_id).read_bytes(), session_id)
        session.saved_version, session.saved_step, session.saved_at = session.version, session.step_count, time.time()
        return session

    def clean(self, session_id: str | None = None) -> None:
        """Remove temporary files of writes cut short by a crash (the previous snapshot of each is intact): all of
        them, or those of one session (a folder shared by several servers: only one's own)."""
        for tmp in self.dir.glob(f".{session_id}.*.tmp" if session_id is not None else ".*.tmp"):
            tmp.unlink(missing_ok=True)

    def ids(self) -> Iterator[str]:
        """The ids of the snapshots in the folder, most recently written first; a file whose name is not a session
        id is set aside."""
        paths = []
        for path in self.dir.glob(f"*{SUFFIX}"):
            try:
                paths.append((path.stat().st_mtime, path))
            except FileNotFoundError:
                continue
        for _, path in sorted(paths, reverse=True):
            session_id = path.name[: -len(SUFFIX)]
            if SESSION_ID.match(session_id):
                yield session_id
            else:
                self.set_aside(session_id, path, f"not a session id: {session_id!r}")

    def summary(self, session_id: str, path: Path | None = None) -> Summary:
        """Read a snapshot's header (not its tensors): ValueError or OSError when it is not a readable snapshot."""
        path = path or self.path(session_id)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = wire.loads(f.read(n), "snapshot header")
        meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
        config = wire.loads(meta.get("config", "{}"), "snapshot config")
        params = sum(1 for name in header if name.startswith("params/"))
        num_params = sum(
            int(v["data_offsets"][1] - v["data_offsets"][0]) // 4 for k, v in header.items() if k.startswith("params/")
        )
        if not isinstance(config, dict) or not params:
            raise ValueError("not an optserve snapshot")
        return Summary(session_id, str(config.get("optimizer", "?")), int(meta.get("step", 0)), num_params,
                       size - 8 - n, meta.get("token_sha256"), os.stat(path).st_mtime)  # fmt: skip

    def set_aside(self, session_id: str, path: Path | None, reason: str) -> Path | None:
        """Move a file that does not load to ``corrupt/`` (never deleted: someone may want to look at it)."""
        path = path or self.path(session_id)
        try:
            self.corrupt_dir.mkdir(parents=True, exist_ok=True)
            target = self.corrupt_dir / f"{path.name}.{int(time.time())}"
            os.replace(path, target)
        except OSError as e:
            log.error("snapshot %s does not load (%s) and could not be moved aside: %s", path, reason, e)
            return None
        log.error("snapshot could not be loaded and was moved to %s: %s", target, reason)
        return target


class Saver:
    """When to snapshot: the policy of the settings, and the writer thread of the background snapshots.

    ``due`` says whether a session needs a snapshot; ``request`` has the writer thread take it in the background,
    ``save`` takes it now (callers off the event loop); ``flush`` snapshots everything changed (graceful shutdown).
    ``failing`` is True from a failed write until the next write that succeeds.
    """

    def __init__(
        self,
        snapshots: Snapshots,
        every_steps: int = 100,
        every_seconds: float = 30.0,
        fsync_every_step: bool = False,
    ) -> None:
        self.snapshots = snapshots
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.fsync_every_step = fsync_every_step
        self.failures = 0
        self.failing: str | None = None  # what the last write said when it failed; None once one succeeds
        self.durations = Durations()  # of the writes
        self._queue: queue.SimpleQueue[tuple[Session, Dumped | None] | None] = queue.SimpleQueue()
        self._queued: set[Session] = set()  # the sessions in the queue (by identity: a replaced one is another)
        self._writer: threading.Thread | None = None

    def due(self, session: Session, now: float) -> bool:
        if session.saved_version == session.version:
            return False
        if session.config.shard is not None:  # a shard: its leader snapshots all shards at one step (by this policy)
            return False
        if self.every_steps and session.step_count - session.saved_step >= self.every_steps:
            return True
        return bool(self.every_seconds) and now - session.saved_at >= self.every_seconds

    def failed(self, session_id: str, error: BaseException) -> None:
        self.failures += 1
        self.failing = f"{type(error).__name__}: {error}"
        log.error("snapshot of session %s failed: %s", session_id, self.failing)

    def write(self, session: Session, dumped: Dumped | None = None, *, held: bool = False) -> None:
        """Snapshot now, with the id's lock already held by the caller; raises what the write raised (and reports
        it)."""
        try:
            seconds = self.snapshots.write(session, dumped, held=held)
        except Exception as e:
            self.failed(session.id, e)
            raise
        self.failing = None
        if seconds:
            self.durations.observe(seconds)

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
            self.write(session, dumped)
        except Exception:  # noqa: BLE001 - reported by write; the previous snapshot stays valid
            return False
        finally:
            lock.release()
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
        except Exception as e:  # noqa: BLE001 - the step was applied; its snapshot is left to the next one
            self.failed(session.id, e)
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


def checkpoint_summary(session: Session) -> Summary:
    """The summary of a session in memory (what the store keeps of it once it is evicted to disk)."""
    return Summary(session.id, session.optimizer, session.step_count, session.layout.size, session.nbytes,
                   session.token_digest, session.updated_at)  # fmt: skip
