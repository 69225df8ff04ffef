"""The client library against a real server: typed errors, safe retries, RemoteOptimizer."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from optserve.client import (
    Client,
    InvalidInput,
    NonFiniteGradient,
    NotFound,
    PreconditionFailed,
    RemoteOptimizer,
    Retry,
    ServerError,
    StepConflict,
    TransportError,
)

NO_WAIT = Retry(attempts=4, backoff=0.0)


def small_params() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def grads_for(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((2, 3)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
    }


class FaultyTransport(httpx.BaseTransport):
    """Forwards to the real server, but injects faults on chosen step requests.

    ``faults`` is consumed in order, one per step request: ``"refuse"`` fails before sending (the server never sees
    it), ``"lose"`` sends it and then drops the answer (the server applied it), ``"503"`` answers 503 without
    sending, ``None`` passes through.
    """

    def __init__(self, faults: list[str | None]) -> None:
        self.inner = httpx.HTTPTransport()
        self.faults = list(faults)
        self.step_requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        fault = None
        if request.url.path.endswith("/step"):
            self.step_requests += 1
            fault = self.faults.pop(0) if self.faults else None
        if fault == "refuse":
            raise httpx.ConnectError("injected: connection refused", request=request)
        if fault == "503":
            return httpx.Response(503, json={"title": "Service Unavailable", "detail": "injected"}, request=request)
        response = self.inner.handle_request(request)
        if fault == "lose":
            response.read()
            response.close()
            raise httpx.ReadError("injected: connection reset before the answer arrived", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def test_errors_are_typed_and_carry_the_problem(server) -> None:
    with Client(server.url) as client:
        with pytest.raises(NotFound) as info:
            client.session("no-such-session")
        assert info.value.status == 404 and "no-such-session" in info.value.detail
        with pytest.raises(InvalidInput, match="lr"):
            client.create_session(small_params(), "adam", hyperparams={"lr": -1})
        sid = client.create_session(small_params(), "sgd", hyperparams={"lr": 0.1})["id"]
        client.step(sid, grads_for(0), idempotency_key="first")
        client.step(sid, grads_for(1))
        with pytest.raises(PreconditionFailed) as pre:
            client.step(sid, grads_for(2), if_match=0)
        assert pre.value.current_step == 2
        with pytest.raises(StepConflict) as conflict:
            client.step(sid, grads_for(0), idempotency_key="first")
        assert conflict.value.applied_at_step == 1
        bad = grads_for(3)
        bad["w"][0, 0] = np.nan
        with pytest.raises(NonFiniteGradient):
            client.step(sid, bad)
        assert client.session(sid)["step"] == 2


@pytest.mark.parametrize("faults", [["refuse", "refuse"], ["lose"], ["503", "lose", "refuse"], ["lose", "lose"]])
def test_retried_steps_are_applied_exactly_once(server, faults: list[str | None]) -> None:
    transport = FaultyTransport([None, *faults, None, "lose"])
    faulty = Client(server.url, transport=transport, retry=NO_WAIT)
    params, clean = small_params(), small_params()
    with (
        faulty,
        RemoteOptimizer(params, client=faulty, optimizer="adam", lr=0.01) as opt,
        RemoteOptimizer(clean, url=server.url, optimizer="adam", lr=0.01) as reference,
    ):
        for step in range(5):
            opt.step(grads_for(step))
            reference.step(grads_for(step))
        assert opt.step_count == 5
        assert faulty.session(opt.session_id)["step"] == 5
        assert transport.step_requests == 5 + len(faults) + 1
    for name in params:
        np.testing.assert_array_equal(params[name], clean[name])


def test_retries_give_up_after_the_policy_and_refusals_are_not_retried(server) -> None:
    transport = FaultyTransport(["refuse"] * 10)
    with Client(server.url, transport=transport, retry=Retry(attempts=3, backoff=0.0)) as client:
        sid = client.create_session(small_params(), "sgd")["id"]
        with pytest.raises(TransportError):
            client.step(sid, grads_for(0))
        assert transport.step_requests == 3
    transport = FaultyTransport(["503", "503"])
    with Client(server.url, transport=transport, retry=Retry(attempts=2, backoff=0.0)) as client:
        with pytest.raises(ServerError):
            client.step(sid, grads_for(0))
        assert transport.step_requests == 2
        with pytest.raises(InvalidInput):  # a 4xx is final: one request, no retry
            client.step(sid, {"w": np.zeros((2, 3), np.float32)}, retry=Retry(attempts=5, backoff=0.0))
        assert transport.step_requests == 3
        assert client.session(sid)["step"] == 0


def test_remote_optimizer_attaches_to_an_existing_session_and_changes_hyperparams(server) -> None:
    first = small_params()
    with RemoteOptimizer(first, url=server.url, optimizer="sgd", lr=0.5, keep=True) as opt:
        opt.step(grads_for(0))
        opt.set_hyperparams(lr=0.25)
        assert opt.info["hyperparams"]["lr"] == 0.25
        sid = opt.session_id
    second = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    with RemoteOptimizer(second, url=server.url, session_id=sid) as attached:
        assert attached.step_count == 1
        for name in first:
            np.testing.assert_array_equal(second[name], first[name])
        before = second["w"].copy()
        attached.step({"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)})
        np.testing.assert_allclose(second["w"], before - 0.25, rtol=1e-6)


def test_caller_arrays_keep_their_dtype_and_identity(server) -> None:
    params = {"w": np.ones((2, 3), np.float64), "b": np.zeros(3, np.float32)}
    w = params["w"]
    with RemoteOptimizer(params, url=server.url, optimizer="sgd", lr=0.5) as opt:
        opt.step({"w": np.ones((2, 3)), "b": np.ones(3)})
    assert params["w"] is w and w.dtype == np.float64
    np.testing.assert_allclose(w, 0.5)


def test_reads_are_retried_like_steps(server) -> None:
    transport = FaultyTransport([])
    with Client(server.url, transport=transport, retry=NO_WAIT) as client:
        sid = client.create_session(small_params(), "sgd")["id"]
    calls = {"n": 0}

    class FlakyReads(FaultyTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET":
                calls["n"] += 1
                if calls["n"] <= 2:
                    raise httpx.ConnectError("injected", request=request)
            return super().handle_request(request)

    with Client(server.url, transport=FlakyReads([]), retry=NO_WAIT) as client:
        assert client.session(sid)["id"] == sid
        assert calls["n"] == 3
        with pytest.raises(NotFound):  # a 4xx is an answer, not retried
            client.session("missing")
        assert calls["n"] == 4
