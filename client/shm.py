"""Shared memory between two processes of one machine: buffers that are files in ``/dev/shm``.

Two paths use it, the same way: the sender puts a large body into a buffer of its own and names it (file name,
offset, size) instead of sending its bytes, and the receiver maps that file and reads the body where it lies; the
answer's parameters are written straight into a second buffer the sender named.

- A client on the server's machine, over the server's Unix socket (``unix://``): a step's body and its answer
  (``Optserve-Shm-Body`` and ``Optserve-Shm-Answer``, see ``optserve.client.http._Shared``). The server takes only
  buffers of the process at the other end of the socket (their names carry its pid; the kernel tells the server
  the peer's pid and user), of the server's own user.
- A Ray front and the session host of its node (:mod:`optserve.service.direct`).

A buffer is a file ``optserve-<pid>-<token>-<count>`` (the token is 16 random hex digits, so names never repeat;
they are not secret: anyone may list ``/dev/shm``), created with mode 0600 and removed when the buffer is freed; the
files of a process that died are removed by :meth:`Segments.sweep`. A receiver opens only names of that form,
without following links, and only regular files of its own user (:func:`open_segment`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import stat
import threading
import weakref
from typing import Any

import numpy as np

SHM_DIR = "/dev/shm"
SHM_MIN = 1 << 20  # shared memory for buffers of at least this size (the buffer pool's own threshold)
NAME = re.compile(r"optserve-(\d{1,10})-([0-9a-f]{16})-(\d{1,19})", re.ASCII)  # pid, a token of the maker's, a count
# the headers of a step through shared memory (both ends): the body's buffer, the answer's, the server's offer
SHARED_BODY, SHARED_ANSWER, SHARED_OFFER = "optserve-shm-body", "optserve-shm-answer", "optserve-shm"


def maker_pid(name: str) -> int | None:
    """The process id a buffer's name carries (None for a name not of optserve's form)."""
    m = NAME.fullmatch(name)
    return int(m.group(1)) if m else None


class SegmentError(Exception):
    """A buffer named by another process that is not one to map: no such file, not a regular file of this user."""


def open_segment(name: str) -> np.ndarray:
    """The whole buffer ``name`` (of :data:`NAME`'s form, else ValueError) mapped read-write, as uint8; raises
    :class:`SegmentError` when it cannot be opened here or is not a regular file owned by this process's user."""
    if not NAME.fullmatch(name):
        raise ValueError(f"not a shared-memory buffer of optserve: {name!r}")
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    except OSError as e:
        raise SegmentError(f"shared memory {name} cannot be opened here: {e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_size == 0:
            raise SegmentError(f"shared memory {name} is not a non-empty regular file of this user")
        return np.frombuffer(mmap.mmap(fd, info.st_size), dtype=np.uint8)
    finally:
        os.close(fd)


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


class Segments:
    """Buffers in shared memory (a Ray front's pool, a client's step bodies): each one a file
    ``optserve-<pid>-<token>-<k>`` in ``/dev/shm``, removed when the buffer is freed (and, for a process that died,
    by the next :meth:`sweep` on the machine)."""

    def __init__(self) -> None:
        self._by_address: dict[int, tuple[str, int]] = {}
        self._token = secrets.token_hex(8)  # names never repeat, even for a restarted front with the same pid
        self.pid = os.getpid()  # a forked child inherits these buffers but never removes its parent's files
        self._count = 0
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)

    def make(self, nbytes: int) -> np.ndarray:
        """A buffer of ``nbytes``: in shared memory when it is large and there is room, else ordinary memory."""
        if nbytes < SHM_MIN:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            self._count += 1
            name = f"optserve-{os.getpid()}-{self._token}-{self._count}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return np.empty(nbytes, dtype=np.uint8)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # the room taken now: a full /dev/shm refuses here, not with SIGBUS
            array = np.frombuffer(mmap.mmap(fd, nbytes), dtype=np.uint8)
        except OSError:
            os.unlink(path)
            return np.empty(nbytes, dtype=np.uint8)
        finally:
            os.close(fd)
        address = array.ctypes.data
        with self._lock:
            self._by_address[address] = (name, nbytes)
        weakref.finalize(array, self._free, address, path)
        return array

    def _free(self, address: int, path: str) -> None:
        if os.getpid() != self.pid:
            return
        with self._lock:
            self._by_address.pop(address, None)
        with contextlib.suppress(OSError):
            os.unlink(path)

    def find(self, buffer: Any) -> dict[str, Any] | None:
        """The shared-memory reference of ``buffer`` when it lies in one of these buffers, else None."""
        view = memoryview(buffer).cast("B")
        if view.nbytes < SHM_MIN:
            return None
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        with self._lock:
            for start, (name, size) in self._by_address.items():
                if start <= address and address + view.nbytes <= start + size:
                    return {"name": name, "offset": address - start, "size": view.nbytes}
        return None

    def close(self) -> None:
        if os.getpid() != self.pid:
            return
        with self._lock:
            names = [name for name, _ in self._by_address.values()]
            self._by_address.clear()
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))

    @staticmethod
    def sweep() -> int:
        """Remove the buffers of processes (fronts, clients) no longer running on this machine; how many."""
        removed = 0
        with contextlib.suppress(OSError):
            for name in os.listdir(SHM_DIR):
                m = NAME.fullmatch(name)
                if m is None or _alive(int(m.group(1))):
                    continue
                with contextlib.suppress(OSError):
                    path = os.path.join(SHM_DIR, name)
                    if os.lstat(path).st_uid == os.geteuid():  # only this user's (root could remove anyone's)
                        os.unlink(path)
                        removed += 1
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
