"""Snapshot writing in-process: atomic file replacement (the nogil path and the Python one), the saver's writer
thread, and the rule that an older copy never replaces a newer snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from optserve.client import checkpoint as client_checkpoint
from optserve.service import checkpoint, diskio
from optserve.service.auth import ADMIN
from optserve.service.checkpoint import dump_versioned
from optserve.service.errors import SessionNotFound
from optserve.service.persistence import DUMP_ON_LOOP_BYTES, Saver, Snapshots
from optserve.service.session import Session, SessionConfig
from optserve.service.store import Limits, MemoryStore

PATHS = ["nogil", "python"] if diskio._write_replace is not None else ["python"]


@pytest.fixture(params=PATHS)
def write_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test once through the compiled nogil path (when numba is there) and once through the Python path."""
    if request.param == "python":
        monkeypatch.setattr(diskio, "_write_replace", None)
    return str(request.param)


def test_replace_file_writes_the_parts_in_order_and_leaves_no_temporary(tmp_path: Path, write_path: str) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"previous content, longer than the new one")
    floats = np.arange(1000, dtype=np.float32)
    parts = [b"head", memoryview(floats), memoryview(b""), b"tail"]
    diskio.replace_file(tmp_path / ".x.1.tmp", target, parts)
    assert target.read_bytes() == b"head" + floats.tobytes() + b"tail"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_replace_file_creates_the_target(tmp_path: Path, write_path: str) -> None:
    diskio.replace_file(tmp_path / ".new.tmp", tmp_path / "new.bin", [])
    assert (tmp_path / "new.bin").read_bytes() == b""
    assert [p.name for p in tmp_path.iterdir()] == ["new.bin"]


def test_replace_file_into_a_missing_folder_raises_and_writes_nothing(tmp_path: Path, write_path: str) -> None:
    missing = tmp_path / "gone"
    with pytest.raises(FileNotFoundError):
        diskio.replace_file(missing / ".x.tmp", missing / "x.bin", [b"data"])
    assert list(tmp_path.iterdir()) == []


def test_replace_file_never_overwrites_an_existing_temporary(tmp_path: Path, write_path: str) -> None:
    """The temporary name is the caller's promise of a fresh file: one that exists is not clobbered, nor removed."""
    tmp, target = tmp_path / ".x.tmp", tmp_path / "x.bin"
    tmp.write_bytes(b"somebody else's")
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        diskio.replace_file(tmp, target, [b"new"])
    assert tmp.read_bytes() == b"somebody else's"
    assert target.read_bytes() == b"old"


def test_replace_file_above_the_nogil_size_takes_the_python_path(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(diskio, "NOGIL_MAX_BYTES", 8)
    diskio.replace_file(tmp_path / ".x.tmp", tmp_path / "x.bin", [b"0123456789", b"abc"])
    assert (tmp_path / "x.bin").read_bytes() == b"0123456789abc"


# --- the saver -----------------------------------------------------------------------------------------------------


def session(n: int, name: str = "s1") -> Session:
    return Session(name, SessionConfig(optimizer="adamw"), {"w": np.zeros(n, np.float32)})


def step(s: Session, seed: int) -> None:
    s.step({"w": np.random.default_rng(seed).standard_normal(s.layout.size).astype(np.float32)})


def saved_step(snapshots: Snapshots, session_id: str) -> int:
    return client_checkpoint.decode(snapshots.path(session_id).read_bytes()).step


def saver(tmp_path: Path) -> Saver:
    return Saver(Snapshots(tmp_path), every_steps=100, every_seconds=0, fsync_every_step=False)


def test_an_older_copy_never_replaces_a_newer_snapshot(tmp_path: Path, write_path: str) -> None:
    sv = saver(tmp_path)
    s = session(10)
    step(s, 0)
    older = dump_versioned(s)
    step(s, 1)
    assert sv.save(s) is True
    assert saved_step(sv.snapshots, s.id) == 2
    assert sv.save(s, dumped=older) is True  # nothing to do: what is on disk is newer
    assert saved_step(sv.snapshots, s.id) == 2
    assert (s.saved_step, s.saved_version) == (2, s.version)


@pytest.mark.parametrize("n", [10, DUMP_ON_LOOP_BYTES // 4 + 1], ids=["copied-by-the-caller", "copied-by-the-writer"])
def test_requested_snapshots_are_written_by_the_writer_thread(tmp_path: Path, n: int) -> None:
    sv = saver(tmp_path)
    s = session(n)
    try:
        step(s, 0)
        sv.request(s)
        step(s, 1)  # taken after the request: a small session was copied at request time, a large one maybe not
        deadline = time.monotonic() + 30
        while s.saved_version < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sv._writer is not None and sv._writer.name == "optserve-snapshots"
        assert s.saved_step >= 1
        if n <= DUMP_ON_LOOP_BYTES // 4:
            assert saved_step(sv.snapshots, s.id) == 1
    finally:
        sv.close()
    assert sv._writer is None


def test_a_session_waiting_for_the_writer_is_queued_once(tmp_path: Path) -> None:
    sv = saver(tmp_path)
    sessions = [session(10, f"s{i}") for i in range(3)]
    for s in sessions:
        step(s, 0)
    with sv.snapshots.lock(sessions[0].id):  # the writer waits for this one: the others queue behind it
        sv.request(sessions[0])
        for _ in range(5):
            for s in sessions:
                sv.request(s)
        assert sv._queued == set(sessions)
    sv.close()  # drains the queue
    assert sum(sv.durations.buckets) == 3
    assert all(s.saved_version == s.version for s in sessions)
    assert sv._queued == set()


@contextlib.contextmanager
def held_writer(tmp_path: Path, name: str) -> Iterator[tuple[Saver, MemoryStore, Session]]:
    """A store, its saver and a stepped session ``name`` in it, the writer thread held on another session's snapshot
    (its id's lock held here): what is requested inside the block is written once the block ends."""
    sv = saver(tmp_path)
    store = MemoryStore(Limits(), sv.snapshots, sv)
    for sid in ("blocker", name):
        asyncio.run(store.create(sid, SessionConfig(optimizer="adamw"), {"w": np.zeros(10, np.float32)}, None))
        step(store.get(sid), 0)
    blocker, target = store.get("blocker"), store.get(name)
    lock = sv.snapshots.lock(blocker.id)
    lock.acquire()
    sv.request(blocker)
    try:
        yield sv, store, target
    finally:
        lock.release()
        sv.close()


def test_a_snapshot_queued_before_a_delete_does_not_bring_the_session_back(tmp_path: Path) -> None:
    with held_writer(tmp_path, "doomed") as (sv, store, doomed):
        sv.request(doomed)  # copied now, written after the blocker
        asyncio.run(store.delete(ADMIN, "doomed"))
    assert not sv.snapshots.path("doomed").exists()
    with pytest.raises(SessionNotFound):
        asyncio.run(store.info(ADMIN, "doomed"))


def test_a_snapshot_queued_before_a_replace_does_not_overwrite_the_new_session(tmp_path: Path) -> None:
    with held_writer(tmp_path, "s") as (sv, store, old):
        sv.request(old)  # old's copy at step 1, written after the blocker
        fresh = checkpoint.dump(session(10, "s"))  # the same id, at step 0: a restored checkpoint
        asyncio.run(store.restore(ADMIN, "s", fresh))
        new = store.get("s")
        sv.request(new)  # not mistaken for old's queued snapshot: queued too
        assert old in sv._queued and new in sv._queued
    assert saved_step(sv.snapshots, "s") == 0  # new's, never old's (at step 1)
    assert store.get("s") is new and old.gone == "replaced"


def test_warm_up_never_stops_the_server(tmp_path: Path) -> None:
    diskio.warm_up(tmp_path / "missing")  # logged, not raised
    diskio.warm_up(tmp_path)
    assert list(tmp_path.iterdir()) == []
