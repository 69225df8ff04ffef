"""Atomic file replacement that takes the GIL once instead of around each of its system calls.

A snapshot is written to a temporary file, fsynced, renamed over the previous one and the folder fsynced: about ten
system calls, each of which releases the GIL and must take it back. Done by a background thread while the event
loop serves small steps, every one of those returns waited for the loop to give the GIL up (a forced switch, up to
the 5 ms switch interval, then the loop thread waiting to be scheduled again): the small-step rate of bench/run.py
fell by a quarter with snapshots on. With numba, the whole sequence runs as one compiled ``nogil`` call into libc
instead; without it, or when that call fails (the Python path then raises the precise ``OSError``), the same steps
run through :mod:`os`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a server dependency
    numba = None  # type: ignore[assignment]

log = logging.getLogger("optserve.persistence")

NOGIL_MAX_BYTES = 64 << 20  # larger files: joining the parts into one buffer costs more than the GIL round trips
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC


def replace_file(tmp: Path, target: Path, parts: Sequence[bytes | memoryview]) -> None:
    """Write ``parts`` to ``tmp`` (which must not exist), fsync it, rename it over ``target`` and fsync the folder:
    a crash at any moment leaves either the previous ``target`` or the new one. ``tmp`` is gone afterwards, also
    when this raises."""
    views = [memoryview(p).cast("B") for p in parts]
    if _write_replace is not None and sum(len(v) for v in views) <= NOGIL_MAX_BYTES:
        data = np.concatenate([np.frombuffer(v, np.uint8) for v in views]) if views else np.empty(0, np.uint8)
        if _write_replace(_c_path(tmp), _c_path(target), _c_path(target.parent), data, _FLAGS, _DIR_FLAGS) == 0:
            return
        # It failed at some step (and removed what it wrote): the Python path tries again, and says what went wrong.
    try:
        with open(tmp, "xb") as f:
            for view in views:
                f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except FileExistsError:
        raise  # not ours to remove
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _c_path(path: Path) -> np.ndarray:
    return np.frombuffer(os.fsencode(path) + b"\0", np.uint8)


def _libc(name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(ctypes.CDLL(None), name)
    function.restype, function.argtypes = restype, list(argtypes)
    return function


_write_replace: Any = None
if numba is not None:
    try:
        _open = _libc("open", ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
        _write = _libc("write", ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
        _fsync = _libc("fsync", ctypes.c_int, ctypes.c_int)
        _close = _libc("close", ctypes.c_int, ctypes.c_int)
        _rename = _libc("rename", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        _unlink = _libc("unlink", ctypes.c_int, ctypes.c_void_p)
    except (AttributeError, OSError):  # pragma: no cover - not a POSIX libc: the Python path
        pass
    else:
        # Not cached: the compiled code holds the addresses of libc's functions, which change from process to process.
        @numba.njit(nogil=True, cache=False)
        def _write_replace(tmp, target, folder, data, flags, dir_flags):  # type: ignore[no-untyped-def]
            """0, or the negative number of the step that failed (tmp removed)."""
            fd = _open(tmp.ctypes.data, flags, 0o666)  # as Python's open(): the umask decides
            if fd < 0:
                return -1
            pos = 0
            while pos < data.size:
                n = _write(fd, data[pos:].ctypes.data, data.size - pos)
                if n <= 0:
                    _close(fd)
                    _unlink(tmp.ctypes.data)
                    return -2
                pos += n
            if _fsync(fd) != 0:
                _close(fd)
                _unlink(tmp.ctypes.data)
                return -3
            if _close(fd) != 0:
                _unlink(tmp.ctypes.data)
                return -4
            if _rename(tmp.ctypes.data, target.ctypes.data) != 0:
                _unlink(tmp.ctypes.data)
                return -5
            dfd = _open(folder.ctypes.data, dir_flags, 0)
            if dfd < 0:
                return -6
            synced = _fsync(dfd)
            _close(dfd)
            return 0 if synced == 0 else -7


def warm_up(folder: Path) -> None:
    """Compile the nogil path now (about half a second), so that the first snapshot does not wait for it. Never
    fatal: a folder that cannot be written to is reported by the snapshots themselves."""
    tag = uuid.uuid4().hex
    target = folder / f".optserve-warm-up.{tag}"
    try:
        replace_file(folder / f".optserve-warm-up.{tag}.tmp", target, [b"warm"])
        target.unlink()
    except OSError as e:
        log.warning("could not write in %s at startup: %s", folder, e)
