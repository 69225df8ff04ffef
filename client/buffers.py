"""``BufferPool``: large buffers lent out and taken back for reuse once nothing references them any more.

A step's body and its answer are as large as the model, and freshly mapped memory costs a page fault per 4 KiB
page on first write: on these VMs receiving a 40 MB body into new memory took 120-170 ms, against about 30 ms into
memory used before. Sizes repeat (every step of a session has the same body and answer sizes), so buffers are
matched by exact size.

A lent buffer comes back only when its reference count shows that nothing else holds it: every memoryview, slice,
``np.frombuffer`` array or transport write queue derived from it keeps a reference to it, directly or through the
shared buffer they were made from. So a buffer still being sent, or still viewed by a caller, is never reused.
Both the server (request bodies, answer copies) and the client (received answers) use it.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

B = TypeVar("B")

# References to a lent buffer while nobody else holds it, as counted inside _reclaim's loop: the _lent list, the
# loop variable and getrefcount's own argument.
_IDLE_REFS = 3


class BufferPool(Generic[B]):
    """Buffers of at least ``min_bytes`` made by ``make(nbytes)``, at most ``max_bytes`` kept in all."""

    def __init__(self, make: Callable[[int], B], max_bytes: int, min_bytes: int = 1 << 20) -> None:
        self.make = make
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._lent: list[B] = []
        self._free: OrderedDict[int, list[B]] = OrderedDict()
        self._bytes = 0  # lent (tracked) plus free
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> B:
        """A buffer of exactly ``nbytes`` (contents undefined); drop every reference to it when done."""
        if nbytes < self.min_bytes:
            return self.make(nbytes)
        with self._lock:
            self._reclaim()
            free = self._free.get(nbytes)
            if free:
                buffer = free.pop()
                if not free:
                    del self._free[nbytes]
                self._lent.append(buffer)
                return buffer
            self._evict(nbytes)
        buffer = self.make(nbytes)
        with self._lock:
            if self._bytes + nbytes <= self.max_bytes:  # tracked for reuse; beyond the cap, it is just freed later
                self._bytes += nbytes
                self._lent.append(buffer)
        return buffer

    def _reclaim(self) -> None:
        still = []
        for buffer in self._lent:
            if sys.getrefcount(buffer) <= _IDLE_REFS:
                size = len(buffer)  # type: ignore[arg-type]
                self._free.setdefault(size, []).append(buffer)
                self._free.move_to_end(size)
            else:
                still.append(buffer)
        self._lent = still

    def _evict(self, nbytes: int) -> None:
        """Drop free buffers, least recently freed sizes first, until ``nbytes`` more fit; none when even that
        would not make room (the new buffer will not be tracked, so the free ones are better kept)."""
        free_bytes = sum(size * len(buffers) for size, buffers in self._free.items())
        if self._bytes - free_bytes + nbytes > self.max_bytes:
            return
        while self._bytes + nbytes > self.max_bytes and self._free:
            size, buffers = next(iter(self._free.items()))
            buffers.pop()
            self._bytes -= size
            if not buffers:
                del self._free[size]

    def discard(self, buffer: B) -> None:
        """Never lend ``buffer`` again (another process may still write into it: a step abandoned in flight)."""
        with self._lock:
            for i, lent in enumerate(self._lent):
                if lent is buffer:
                    del self._lent[i]
                    self._bytes -= len(buffer)  # type: ignore[arg-type]
                    return

    @property
    def kept_bytes(self) -> int:
        """Bytes of buffers lent out or waiting for reuse."""
        return self._bytes
