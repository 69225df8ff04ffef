"""The step in flight: a step sent in the background while the training loop computes the next one.

This is ZeRO-Offload's delayed parameter update (and hivemind's ``delay_optimizer_step``): with ``overlap=True``
an optimizer's ``step()`` sends the gradients and returns at once; the upload, the server's step and the download
run on a background thread while the caller computes the next forward and backward, and the answer is written into
the parameters when the next ``step()`` starts (or when anything that must see the session's state is called:
``state_dict()``, ``close()``, ``synchronize()`` ...). The gradients of a step are therefore computed one step
stale: those of step k+1 at the parameters before step k's update.

What does not change: one step in flight at most, each sent with ``If-Match`` (the step the optimizer last saw) and
its own ``Idempotency-Key``, retried with that key; so a step is applied once or not at all. An error of the step
in flight is kept and raised by the next call that waits for it, never lost.

:class:`Worker` is the background thread (one per optimizer or client, made on first use) and :class:`InFlight`
the one pending step with what is to be done with its answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Worker", "InFlight"]


class Worker:
    """One background thread that runs submitted calls in order; started by the first :meth:`submit`."""

    def __init__(self, name: str = "optserve-step") -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            return self._executor.submit(fn)

    def close(self) -> None:
        """Let the thread end once the calls submitted so far are done (it does not wait for them)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def __deepcopy__(self, memo: dict[int, object]) -> Worker:
        return Worker(self._name)  # a copy gets its own thread, made when it first needs one


class InFlight(Generic[T]):
    """At most one pending step: its future and what the owner does with the answer once it is in.

    :meth:`settle` waits for the step in flight (if any), hands its answer to ``finish`` and forgets it; the step's
    error, if it failed, is raised there, once.
    """

    def __init__(self) -> None:
        self._future: Future[T] | None = None
        self._finish: Callable[[T], None] | None = None

    @property
    def pending(self) -> bool:
        return self._future is not None

    def start(self, future: Future[T], finish: Callable[[T], None] | None) -> None:
        if self._future is not None:
            raise RuntimeError("a step is already in flight")  # the owners settle before they start another
        self._future, self._finish = future, finish

    def settle(self) -> None:
        future, finish = self._future, self._finish
        if future is None:
            return
        try:
            result = future.result()  # raises the step's error
        except BaseException:
            if future.done():  # failed: raised here, once
                self._future = self._finish = None
            raise  # else interrupted while waiting (KeyboardInterrupt): still in flight, settled by the next call
        self._future = self._finish = None
        if finish is not None:
            finish(result)

    def __deepcopy__(self, memo: dict[int, object]) -> InFlight[T]:
        return InFlight()  # the owner settles before it is copied
