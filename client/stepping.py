"""How an optimizer takes its steps, written once for :class:`~optserve.client.optimizer.RemoteOptimizer` (numpy)
and the torch drop-ins of :mod:`optserve.client.torch`.

- :func:`exchange` is one step's round trip: sent with ``If-Match`` (the step the optimizer last saw) and a fresh
  ``Idempotency-Key`` (kept over the client's retries); when the server answers that it is *behind* (restarted from
  an older snapshot), the step is applied at the server's step instead; a contribution to an accumulating session
  waits for the step the contributors complete together. It touches no parameter, so it may run in the background.
- :class:`Sequencer` decides when a step runs: now, or in flight (``overlap=True`` after ``overlap_warmup`` exact
  steps, see :mod:`optserve.client.inflight`), one at a time, its answer handed to the optimizer's ``finish``.

The optimizers keep only what differs: how gradients are gathered and copied, and how an answer is written into
their parameters.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from .errors import PreconditionFailed
from .http import Client
from .inflight import InFlight, Worker
from .protocol import Retry, StepResult

T = TypeVar("T")

__all__ = ["Answer", "exchange", "Sequencer"]


@dataclass
class Answer:
    """A step's answer: the server's result, and the session's step and parameters to write into the model."""

    result: StepResult
    step: int
    tensors: Mapping[str, np.ndarray]


def exchange(
    client: Client,
    session_id: str,
    grads: Mapping[str, Any],
    if_match: int,
    *,
    timeout: float,
    retry: Retry | None = None,
    on_resync: Callable[[], None] | None = None,
    **options: Any,
) -> Answer:
    """One step of ``session_id`` with ``grads``, taken at ``if_match`` (see the module's docstring); ``options``
    are :meth:`Client.step`'s (``partial``, ``changes``, ``dtype``, ``answer_dtype``). ``on_resync`` is called when
    the server was found behind and the step is sent again at its step."""

    def send(at: int) -> StepResult:
        return client.step(
            session_id, grads, if_match=at, idempotency_key=secrets.token_hex(16), retry=retry, **options
        )

    try:
        result = send(if_match)
    except PreconditionFailed as e:
        if not e.server_behind(if_match):
            raise  # someone else stepped this session: not ours to paper over
        # The server restarted from a snapshot older than our last step: apply this step at its step (the answer
        # carries every parameter of the session).
        if on_resync is not None:
            on_resync()
        if_match = client.params(session_id)[0]
        result = send(if_match)
    if result.params is None:  # a contribution: the step completes when the other contributors have sent theirs
        step, tensors = client.params(session_id, min_step=if_match + 1, timeout=timeout)
        return Answer(result, step, tensors)
    return Answer(result, result.step, result.params)


class Sequencer(Generic[T]):
    """When an optimizer's steps run: at once, or (``overlap=True``, after ``warmup`` steps taken exactly) one in
    flight on a background thread while the caller computes the next one.

    Every call that needs the session's state calls :meth:`settle` first (the step in flight written in, its error
    raised there); :attr:`taken` counts the steps taken (the warm-up counts them).
    """

    def __init__(self, overlap: bool = False, warmup: int = 0) -> None:
        if warmup < 0:
            raise ValueError(f"overlap_warmup must be >= 0, got {warmup}")
        self.overlap = overlap
        self.warmup = warmup
        self.taken = 0
        self._inflight: InFlight[T] = InFlight()
        self._worker = Worker()

    @property
    def pending(self) -> bool:
        """A step is in flight."""
        return self._inflight.pending

    def settle(self) -> None:
        """Wait for the step in flight, if any, and hand its answer to its ``finish`` (its error raised here)."""
        self._inflight.settle()

    def pipelined(self) -> bool:
        """The next step goes in flight (so its gradients must be copied: the caller may change them meanwhile)."""
        return self.overlap and self.taken >= self.warmup

    def take(self, exchange: Callable[[], T], finish: Callable[[T], None], pipelined: bool) -> None:
        """Take one step: ``finish(exchange())`` now, or ``exchange`` in flight and ``finish`` by the next
        :meth:`settle`. Call :meth:`settle` before (the owners do, before they gather the gradients)."""
        self.taken += 1
        if pipelined:
            self._inflight.start(self._worker.submit(exchange), finish)
        else:
            finish(exchange())

    def take_async(self, job: Callable[[], T]) -> Future[T]:
        """Take one step in flight whatever ``overlap`` says: ``job`` does the whole step (the answer written in on
        the background thread); the future is the caller's, and the next :meth:`settle` waits for it too."""
        self.taken += 1
        future = self._worker.submit(job)
        self._inflight.start(future, None)
        return future

    def close(self) -> None:
        """Let the background thread end (after :meth:`settle`)."""
        self._worker.close()
