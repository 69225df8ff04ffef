"""``RemoteOptimizer``: a numpy training loop's optimizer, with the state on an optserve server.

params = {"W": np.zeros((784, 10), np.float32), "b": np.zeros(10, np.float32)}
opt = RemoteOptimizer(params, url="http://127.0.0.1:8000", optimizer="adamw", lr=1e-3)
for batch in data:
    opt.step(grads(params, batch))      # params is updated in place

With ``overlap=True`` the step runs in the background while the loop computes the next gradients (see
:mod:`optserve.client.inflight`); ``step_async(grads)`` returns a future for callers who schedule it themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, MutableMapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from . import wire
from .http import Client
from .lease import Lease, settle
from .protocol import Retry, StepResult
from .stepping import Answer, Sequencer, exchange


class RemoteOptimizer:
    """Steps ``params`` (a dict of numpy arrays) on a server-side optimizer session.

    A new session is created from ``params`` unless ``session_id`` names an existing one, in which case the
    server's parameters are copied into ``params``. Each :meth:`step` sends the gradients in the session's tensor
    order with ``If-Match`` (the step this optimizer last saw) and a fresh ``Idempotency-Key``; transport errors
    and 5xx answers are retried with the same key, so a step is applied exactly once or raises.

    ``nonfinite``, ``max_grad_norm``, ``schedule`` and ``accumulate`` configure a new session (see the README);
    ``token`` is the admin key (to create) or the session's token (to attach) on a server with auth on.
    A session created here is deleted when the optimizer is closed, garbage collected or the interpreter exits
    normally (see :mod:`optserve.client.lease`), unless it is named (``name=``, its id) or ``keep=True``; an attached
    one is never deleted by closing, unless ``close(delete=True)``.
    ``wire_dtype`` float16 or bfloat16 halves the bytes of a step each way: the gradients are sent in it and the
    updated parameters come back rounded to it, while the session keeps float32 master weights (so rounding never
    accumulates: ``params`` holds the rounded master weights after each step).

    If the server answers that it is at an older step than this optimizer (it restarted from a snapshot taken
    before the latest steps), the optimizer copies the server's parameters into ``params``, adopts its step counter
    and applies the current gradients there, by itself (``resyncs`` counts it).
    In a session that accumulates k contributions per step, :meth:`step` waits (up to ``timeout``)
    for the other contributors and returns the parameters of the step they completed together.

    ``overlap=True`` is the delayed parameter update: :meth:`step` copies the gradients, sends them and returns at
    once (``params`` not yet updated); the answer is written into ``params`` when the next :meth:`step` starts, or
    by :meth:`synchronize`, :meth:`pull`, :meth:`set_hyperparams` and :meth:`close`, which wait for it. So the
    round trip runs while the caller computes the next gradients, which are one step stale. The first
    ``overlap_warmup`` steps are taken exactly. An error of the step in flight is raised by the call that waits
    for it. Exactly once as ever: one step in flight, with If-Match and its own Idempotency-Key.
    """

    def __init__(
        self,
        params: MutableMapping[str, np.ndarray],
        url: str | None = None,
        optimizer: str = "adamw",
        *,
        client: Client | None = None,
        session_id: str | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        timeout: float = 60.0,
        retry: Retry | None = None,
        nonfinite: str | None = None,
        max_grad_norm: float | None = None,
        schedule: Mapping[str, Any] | None = None,
        accumulate: int | None = None,
        token: str | None = None,
        wire_dtype: str | None = None,
        name: str | None = None,
        keep: bool = False,
        overlap: bool = False,
        overlap_warmup: int = 0,
        **hyperparams: Any,
    ) -> None:
        self._inflight: Sequencer[Any] = Sequencer(overlap, overlap_warmup)
        self.params = params
        self.timeout = timeout
        self.wire_dtype = wire.check_wire_dtype(wire_dtype)
        self._owns_client = client is None
        self.client = client if client is not None else Client(url, timeout=timeout, retry=retry, token=token)
        if session_id is not None and token is not None:
            self.client.use_token(session_id, token)
        self.retry = retry
        if session_id is None:
            info = self.client.create_session(
                params,
                optimizer,
                hyperparams=hyperparams,
                param_groups=param_groups,
                nonfinite=nonfinite,
                max_grad_norm=max_grad_norm,
                schedule=dict(schedule) if schedule else None,
                accumulate=accumulate,
                session_id=name,
            )
        else:
            info = self.client.session(session_id)
        self.session_id: str = info["id"]
        anonymous = session_id is None and name is None and not keep
        self._lease = Lease(self, self.client.url, self.client.credentials, self.session_id) if anonymous else None
        self.info = info
        self.names: list[str] = list(info["tensors"])
        self.step_count: int = info["step"]
        self.last: StepResult | None = None
        self.resyncs = 0  # times the server was found behind (restarted from an older snapshot) and caught up with
        if session_id is not None:
            self.pull()

    @property
    def overlap(self) -> bool:
        return self._inflight.overlap

    @property
    def overlap_warmup(self) -> int:
        return self._inflight.warmup

    @property
    def steps_taken(self) -> int:
        """Steps this optimizer took (the warm-up counts them)."""
        return self._inflight.taken

    def pull(self, min_step: int | None = None) -> MutableMapping[str, np.ndarray]:
        """Copy the server's parameters into ``params`` and adopt its step counter (waiting for ``min_step``)."""
        self._inflight.settle()
        self.step_count, tensors = self.client.params(self.session_id, min_step=min_step, timeout=self.timeout)
        self._assign(tensors)
        return self.params

    def _assign(self, tensors: Mapping[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            target = self.params.get(name)
            if isinstance(target, np.ndarray) and target.shape == value.shape and target.flags.writeable:
                target[...] = value
            else:
                self.params[name] = np.array(value)

    def step(self, grads: Mapping[str, np.ndarray]) -> MutableMapping[str, np.ndarray]:
        """Apply one step with ``grads`` (same names and shapes as the params); returns the updated ``params``.

        With ``overlap=True`` (after the warm-up), it writes the step in flight into ``params``, sends this one in
        the background and returns ``params`` as they are: updated by the previous step, not by this one."""
        self._inflight.settle()
        pipelined = self._inflight.pipelined()
        ordered = self._ordered(grads, copy=pipelined)
        self._inflight.take(functools.partial(self._exchange, ordered, self.step_count), self._apply, pipelined)
        return self.params

    def step_async(self, grads: Mapping[str, np.ndarray]) -> Future[MutableMapping[str, np.ndarray]]:
        """Send one step in the background; the future's result is ``params`` once the answer is written into them
        (by the background thread: leave ``params`` alone until the future is done). The gradients are copied, so
        the caller may reuse their arrays at once. The next call that needs the session (``step``,
        ``step_async``, ``pull``, ``synchronize``, ``close`` ...) waits for it first, and raises its error if it
        failed."""
        self._inflight.settle()
        ordered = self._ordered(grads, copy=True)

        def job() -> MutableMapping[str, np.ndarray]:
            self._apply(self._exchange(ordered, self.step_count))
            return self.params

        return self._inflight.take_async(job)

    def synchronize(self) -> MutableMapping[str, np.ndarray]:
        """Wait for the step in flight and write its answer into ``params`` (its error raised here); returns
        ``params``."""
        self._inflight.settle()
        return self.params

    def _ordered(self, grads: Mapping[str, np.ndarray], copy: bool) -> dict[str, np.ndarray]:
        """The gradients in the session's order as float32 (copies when the step goes in flight); names the
        session lacks last, for the server to name in its refusal."""
        convert = np.array if copy else np.asarray
        ordered = {name: convert(grads[name], dtype=np.float32) for name in self.names if name in grads}
        ordered.update({name: convert(grads[name]) for name in grads if name not in ordered})
        return ordered

    def _exchange(self, ordered: dict[str, np.ndarray], if_match: int) -> Answer:
        """One step's round trip (:func:`optserve.client.stepping.exchange`): it touches no parameter."""
        return exchange(
            self.client,
            self.session_id,
            ordered,
            if_match,
            timeout=self.timeout,
            retry=self.retry,
            on_resync=self._resynced,
            dtype=self.wire_dtype,
            answer_dtype=self.wire_dtype,
        )

    def _resynced(self) -> None:
        self.resyncs += 1

    def _apply(self, answer: Answer) -> None:
        self.step_count = answer.step
        self.last = answer.result
        self._assign(answer.tensors)
        answer.result.release()  # copied into params: the receive buffer can serve the next step

    def set_hyperparams(self, group: int | None = None, **hyperparams: Any) -> None:
        """Change hyperparameters on the server (e.g. ``lr=1e-4``), for every group or for ``group``; after the step
        in flight, if any."""
        self._inflight.settle()
        self.info = self.client.update_hyperparams(self.session_id, group, **hyperparams)

    def close(self, delete: bool | None = None) -> None:
        """Release the connection. The session is deleted on the server if this optimizer created it without a
        name and without ``keep=True`` (``delete=None``), or whenever ``delete`` is True; ``False`` keeps it.
        A step in flight is written in first; its error, if it failed, is raised after the release."""
        try:
            self._inflight.settle()
        finally:
            self._inflight.close()
            settle(self._lease, self.client, self.session_id, delete)
            if self._owns_client:
                self.client.close()

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
