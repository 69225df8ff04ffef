"""``Client`` and ``AsyncClient`` against a real server, every test run on both drivers of the one core
(:mod:`optserve.client.core`): every operation, the typed errors, safe retries through a fault-injecting transport,
concurrent steps; and the two giving identical results and errors. The core alone is driven with scripted replies
at the end (its retry schedule), which is what makes it I/O-free.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np
import pytest
from drivers import DRIVERS, Driver, FaultyTransport

from optserve.client import (
    APIError,
    AsyncClient,
    BadRequest,
    Client,
    InvalidInput,
    NonFiniteGradient,
    NotFound,
    PreconditionFailed,
    Retry,
    ServerError,
    StepConflict,
    TransportError,
    core,
)
from optserve.client.protocol import Call, Reply

NO_WAIT = Retry(attempts=4, backoff=0.0)


def small_params() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def grads_for(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((2, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}


def assert_equal(got: Mapping[str, np.ndarray] | None, want: Mapping[str, np.ndarray]) -> None:
    assert got is not None
    assert list(got) == list(want)
    for n in want:
        assert got[n].dtype == np.float32
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


# --- one implementation ----------------------------------------------------------------------------------------------

OPERATIONS = [
    "create_session",
    "list_sessions",
    "session",
    "update_hyperparams",
    "delete_session",
    "step",
    "params",
    "checkpoint",
    "restore",
]


def test_both_clients_have_every_operation_with_its_signature_and_doc(driver: Driver) -> None:
    cls = Client if driver.name == "sync" else AsyncClient
    for name in OPERATIONS:
        method, operation = getattr(cls, name), getattr(core, name)
        assert inspect.iscoroutinefunction(method) == (driver.name == "async"), name
        assert method.__doc__ and method.__doc__ == operation.__doc__, name
        want = list(inspect.signature(operation).parameters)[1:]  # the core's first parameter is the client
        assert list(inspect.signature(method).parameters)[1:] == want, name


# --- sessions ------------------------------------------------------------------------------------------------------


def test_session_lifecycle(server, driver: Driver) -> None:
    with driver.open(server.url) as client:
        info = client.create_session(
            small_params(), "adam", hyperparams={"lr": 0.01}, param_groups=[{"params": ["b"], "lr": 0.1}]
        )
        sid = info["id"]
        assert info["optimizer"] == "adam" and info["step"] == 0
        assert [g["params"] for g in info["param_groups"]] == [["b"], ["w"]]
        got = client.session(sid)
        assert got["id"] == sid and got["tensors"]["w"]["shape"] == [2, 3]
        listed = {s["id"]: s for s in client.list_sessions()}
        assert listed[sid]["optimizer"] == "adam" and listed[sid]["num_params"] == 9
        patched = client.update_hyperparams(sid, lr=0.5)
        assert [g["hyperparams"]["lr"] for g in patched["param_groups"]] == [0.5, 0.5]
        patched = client.update_hyperparams(sid, group=0, lr=0.25, weight_decay=0.1)
        assert [g["hyperparams"]["lr"] for g in patched["param_groups"]] == [0.25, 0.5]
        assert client.session(sid)["param_groups"][0]["hyperparams"]["weight_decay"] == 0.1
        named = client.create_session(small_params(), "sgd", session_id=f"{sid}-named", nonfinite="skip")
        assert named["id"] == f"{sid}-named" and named["nonfinite"] == "skip"
        client.delete_session(sid)
        with pytest.raises(NotFound):
            client.session(sid)
        with pytest.raises(NotFound):
            client.delete_session(sid)
        assert sid not in {s["id"] for s in client.list_sessions()}
        client.delete_session(named["id"])


def test_create_with_training_options(server, driver: Driver) -> None:
    with driver.open(server.url) as client:
        info = client.create_session(
            small_params(),
            "sgd",
            hyperparams={"lr": 0.1},
            max_grad_norm=1.0,
            schedule={"name": "linear_warmup", "warmup_steps": 4},
            accumulate=2,
        )
        assert info["max_grad_norm"] == 1.0 and info["accumulate"] == 2
        assert info["schedule"]["name"] == "linear_warmup"
        assert info["param_groups"][0]["scheduled_lr"] == pytest.approx(0.025)
        first = client.step(info["id"], grads_for(0))
        assert first.params is None and first.awaiting == 1 and first.step == 0
        second = client.step(info["id"], grads_for(1))
        assert second.params is not None and second.step == 1 and second.awaiting == 0
        assert second.grad_norm is not None and second.grad_norm > 0


# --- steps ---------------------------------------------------------------------------------------------------------


def test_step_options(server, driver: Driver) -> None:
    p0 = small_params()
    ones = {n: np.ones_like(p) for n, p in p0.items()}
    with driver.open(server.url) as client:
        sid = client.create_session(p0, "sgd", hyperparams={"lr": 0.5})["id"]
        first = client.step(sid, ones, if_match=0, idempotency_key="k1")
        assert first.step == 1 and not first.replayed and not first.skipped
        assert_equal(first.params, {n: p - np.float32(0.5) for n, p in p0.items()})
        assert first.grad_norm == pytest.approx(3.0)  # sqrt(9 ones)
        again = client.step(sid, grads_for(7), idempotency_key="k1")  # same key: replayed, not applied
        assert again.replayed and again.step == 1
        assert_equal(again.params, first.params)
        with pytest.raises(PreconditionFailed) as pre:
            client.step(sid, ones, if_match=0)
        assert pre.value.current_step == 1 and pre.value.status == 412
        minimal = client.step(sid, ones, if_match=1, minimal=True)
        assert minimal.params is None and minimal.step == 2
        with pytest.raises(StepConflict) as conflict:
            client.step(sid, ones, idempotency_key="k1")
        assert conflict.value.applied_at_step == 1
        partial = client.step(sid, {"b": np.ones(3, np.float32)}, partial=True)
        assert partial.step == 3
        changed = client.step(sid, ones, changes={"lr": 0.25}, dtype="float16")
        assert changed.step == 4
        want = {"w": p0["w"] - np.float32(1.25), "b": p0["b"] - np.float32(1.75)}
        assert_equal(changed.params, want)
        assert [g["hyperparams"]["lr"] for g in client.session(sid)["param_groups"]] == [0.25]
        step, params = client.params(sid)
        assert step == 4
        assert_equal(params, want)
        half = client.step(sid, ones, answer_dtype="bfloat16")
        assert half.step == 5 and half.params is not None and half.params["w"].dtype == np.float32
        np.testing.assert_allclose(half.params["w"], want["w"] - np.float32(0.25), rtol=1 / 128)


def test_params_with_min_step_waits(server, driver: Driver) -> None:
    with driver.open(server.url) as client, Client(server.url) as other:
        sid = client.create_session(small_params(), "sgd", hyperparams={"lr": 0.1})["id"]
        stepped: list[Any] = []
        later = threading.Timer(0.3, lambda: stepped.append(other.step(sid, grads_for(0))))
        start = time.monotonic()
        later.start()
        try:
            step, params = client.params(sid, min_step=1, timeout=5)
            assert time.monotonic() - start >= 0.25
        finally:
            later.join(10)
        assert step == 1 and stepped[0].step == 1
        assert_equal(params, stepped[0].params)
        start = time.monotonic()
        step, _ = client.params(sid, min_step=2, timeout=0.2)  # nobody steps: the answer comes anyway
        assert step == 1 and 0.15 <= time.monotonic() - start < 2.0


def test_checkpoint_and_restore(server, driver: Driver) -> None:
    with driver.open(server.url) as client:
        sid = client.create_session(small_params(), "adamw", hyperparams={"lr": 0.05})["id"]
        for k in range(3):
            client.step(sid, grads_for(k), idempotency_key=f"ck{k}")
        blob = client.checkpoint(sid)
        assert isinstance(blob, bytes) and blob
        info = client.restore(f"{sid}-copy", blob)
        assert info["id"] == f"{sid}-copy" and info["step"] == 3
        # The copy resumes bit for bit, and knows the original's idempotency keys.
        replay = client.step(f"{sid}-copy", grads_for(2), idempotency_key="ck2")
        assert replay.replayed and replay.step == 3
        a = client.step(sid, grads_for(3))
        b = client.step(f"{sid}-copy", grads_for(3))
        assert a.step == b.step == 4
        assert_equal(b.params, a.params)  # type: ignore[arg-type]
        # Restoring over an existing session replaces it.
        replaced = client.restore(sid, blob)
        assert replaced["step"] == 3
        with pytest.raises(NotFound):
            client.checkpoint("no-such-session")


def test_concurrent_steps_are_all_applied_once(server, driver: Driver) -> None:
    with driver.open(server.url) as client:
        p0 = {"x": np.full(16, 1000.0, np.float32)}
        sid = client.create_session(p0, "sgd", hyperparams={"lr": 1.0})["id"]
        ones = {"x": np.ones(16, np.float32)}
        results = driver.concurrently(client, [("step", (sid, ones), {})] * 8)
        step, params = client.params(sid)
        info = client.session(sid)
    assert sorted(r.step for r in results) == list(range(1, 9))
    for r in results:  # each answer holds the parameters of its own step
        np.testing.assert_array_equal(r.params["x"], np.full(16, 1000.0 - r.step, np.float32))
    assert step == 8 and info["step"] == 8 and info["counters"]["steps_applied"] == 8
    np.testing.assert_array_equal(params["x"], np.full(16, 992.0, np.float32))


# --- errors --------------------------------------------------------------------------------------------------------

ERROR_CASES: list[tuple[str, type[APIError]]] = [
    ("unknown-session", NotFound),
    ("unknown-session-step", NotFound),
    ("stale-if-match", PreconditionFailed),
    ("old-key", StepConflict),
    ("missing-tensor", InvalidInput),
    ("nan", NonFiniteGradient),
    ("bad-hyperparams", InvalidInput),
    ("bad-patch", InvalidInput),
    ("bad-checkpoint", BadRequest),
]


def error_call(case: str, sid: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """(method name, args, kwargs) of an operation that fails."""
    nan = grads_for(9)
    nan["w"][0, 1] = np.nan
    return {
        "unknown-session": ("session", ("no-such-session",), {}),
        "unknown-session-step": ("step", ("no-such-session", grads_for(0)), {}),
        "stale-if-match": ("step", (sid, grads_for(0)), {"if_match": 0}),
        "old-key": ("step", (sid, grads_for(0)), {"idempotency_key": "first"}),
        "missing-tensor": ("step", (sid, {"w": np.zeros((2, 3), np.float32)}), {}),
        "nan": ("step", (sid, nan), {}),
        "bad-hyperparams": ("create_session", (small_params(), "adam"), {"hyperparams": {"lr": -1}}),
        "bad-patch": ("update_hyperparams", (sid,), {"momentum": -1.0}),
        "bad-checkpoint": ("restore", (f"{sid}-x", b"not a safetensors file"), {}),
    }[case]


def stepped_session(client: Any) -> str:
    """A session at step 2, its first step taken with the key ``first``."""
    sid: str = client.create_session(small_params(), "sgd", hyperparams={"lr": 0.1})["id"]
    client.step(sid, grads_for(0), idempotency_key="first")
    client.step(sid, grads_for(1))
    return sid


def raise_every_error(client: Any, sid: str) -> dict[str, APIError]:
    errors = {}
    for case, cls in ERROR_CASES:
        method, args, kwargs = error_call(case, sid)
        with pytest.raises(cls) as info:
            getattr(client, method)(*args, **kwargs)
        errors[case] = info.value
    assert client.session(sid)["step"] == 2  # none of the failures changed anything
    return errors


def test_errors_are_typed_and_carry_the_problem(server, driver: Driver) -> None:
    with driver.open(server.url) as client:
        errors = raise_every_error(client, stepped_session(client))
    assert errors["unknown-session"].status == 404 and "no-such-session" in errors["unknown-session"].detail
    assert "lr" in str(errors["bad-hyperparams"])
    assert errors["stale-if-match"].current_step == 2  # type: ignore[attr-defined]
    assert errors["old-key"].applied_at_step == 1  # type: ignore[attr-defined]
    for error in errors.values():
        assert error.problem and error.status >= 400


def test_the_two_clients_raise_identical_errors(server) -> None:
    sync_driver, async_driver = DRIVERS
    with sync_driver.open(server.url) as sync:
        sid = stepped_session(sync)
        sync_errors = raise_every_error(sync, sid)
    with async_driver.open(server.url) as asynchronous:
        async_errors = raise_every_error(asynchronous, sid)
    for case, _ in ERROR_CASES:
        s, a = sync_errors[case], async_errors[case]
        assert type(a) is type(s), case
        assert (a.status, a.type, a.detail, a.problem) == (s.status, s.type, s.detail, s.problem), case


# --- retries -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("faults", [["refuse", "refuse"], ["lose"], ["503", "lose", "refuse"], ["lose", "lose"]])
def test_a_failed_step_is_retried_with_its_key_and_applied_once(server, driver: Driver, faults: list[str]) -> None:
    transport = FaultyTransport(faults)
    p0 = small_params()
    with driver.open(server.url, transport=transport, retry=NO_WAIT) as client:
        sid = client.create_session(p0, "adam", hyperparams={"lr": 0.01})["id"]
        result = client.step(sid, grads_for(0))
        info = client.session(sid)
    lost = faults.count("lose")
    assert result.replayed == (lost > 0) and result.step == 1
    assert info["step"] == 1
    assert info["counters"]["steps_applied"] == 1 and info["counters"]["replays"] == lost
    assert transport.requests == len(faults) + 1
    assert len(set(transport.keys)) == 1 and transport.keys[0]  # every attempt carried the same key
    with Client(server.url) as sync:
        ref = sync.create_session(p0, "adam", hyperparams={"lr": 0.01})["id"]
        assert_equal(result.params, sync.step(ref, grads_for(0)).params)  # type: ignore[arg-type]


def test_retries_give_up_after_the_policy_and_refusals_are_not_retried(server, driver: Driver) -> None:
    transport = FaultyTransport(["refuse"] * 10)
    with driver.open(server.url, transport=transport, retry=Retry(attempts=3, backoff=0.0)) as client:
        sid = client.create_session(small_params(), "sgd")["id"]
        with pytest.raises(TransportError):
            client.step(sid, grads_for(0))
        assert transport.requests == 3
    transport = FaultyTransport(["503", "503"])
    with driver.open(server.url, transport=transport, retry=Retry(attempts=2, backoff=0.0)) as client:
        with pytest.raises(ServerError):
            client.step(sid, grads_for(0))
        assert transport.requests == 2
        with pytest.raises(InvalidInput):  # a 4xx is final: one request, no retry
            client.step(sid, {"w": np.zeros((2, 3), np.float32)}, retry=Retry(attempts=5, backoff=0.0))
        assert transport.requests == 3
        assert client.session(sid)["step"] == 0


def test_reads_are_retried_like_steps(server, driver: Driver) -> None:
    with Client(server.url) as setup:
        sid = setup.create_session(small_params(), "sgd")["id"]
    transport = FaultyTransport(["refuse", "refuse"], on=lambda request: request.method == "GET")
    with driver.open(server.url, transport=transport, retry=NO_WAIT) as client:
        assert client.session(sid)["id"] == sid
        assert transport.requests == 3
        with pytest.raises(NotFound):  # a 4xx is an answer, not retried
            client.session("missing")
        assert transport.requests == 4
    transport = FaultyTransport(["refuse"], on=lambda request: request.method == "PATCH")
    with driver.open(server.url, transport=transport, retry=NO_WAIT) as client:
        with pytest.raises(TransportError):  # a change without an idempotency key is never sent twice
            client.update_hyperparams(sid, lr=0.5)
        assert transport.requests == 1


def test_the_session_token_is_sent_on_every_attempt(server, driver: Driver) -> None:
    seen: list[str | None] = []

    def on(request: httpx.Request) -> bool:
        if request.url.path.endswith("/step"):
            seen.append(request.headers.get("authorization"))
            return True
        return False

    transport = FaultyTransport(["refuse", "503"], on=on)
    with driver.open(server.url, transport=transport, retry=NO_WAIT, token="the-admin-key") as client:
        sid = client.create_session(small_params(), "sgd")["id"]
        client.use_token(sid, "the-session-token")
        assert client.step(sid, grads_for(0)).step == 1
    assert seen == ["Bearer the-session-token"] * 3


# --- the twins agree -----------------------------------------------------------------------------------------------


def sequence(client: Any) -> tuple[int, dict[str, np.ndarray]]:
    sid = client.create_session(
        small_params(), "adam", hyperparams={"lr": 0.05}, param_groups=[{"params": ["b"], "lr": 0.1}]
    )["id"]
    client.step(sid, grads_for(0), if_match=0)
    client.update_hyperparams(sid, group=1, lr=0.02)
    client.step(sid, grads_for(1), changes=[{"lr": 0.03}, None])
    client.step(sid, {"w": grads_for(2)["w"]}, partial=True)
    client.step(sid, grads_for(3), dtype="bfloat16", minimal=True)
    restored = f"{sid}-r"
    client.restore(restored, client.checkpoint(sid))
    client.step(restored, grads_for(4))
    return client.params(restored, min_step=5, timeout=1)  # type: ignore[no-any-return]


def test_sync_and_async_clients_give_identical_results(server, driver: Driver) -> None:
    with driver.open(server.url) as client:
        step, params = sequence(client)
    with Client(server.url) as reference:
        want_step, want = sequence(reference)
    assert step == want_step == 5
    assert_equal(params, want)
    for n, p in small_params().items():  # the sequence moved every tensor (so the comparison is not vacuous)
        assert not np.array_equal(params[n], p)


# --- the core alone ------------------------------------------------------------------------------------------------


def scripted(answers: list[Reply | TransportError], retry: Retry) -> tuple[Any, list[Any]]:
    """Drive a step with scripted outcomes instead of a server: what it yielded, and its result or error."""
    log: list[Any] = []

    def send(call: Call) -> Reply:
        log.append(call)
        answer = answers.pop(0)
        if isinstance(answer, TransportError):
            raise answer
        return answer

    operation = core.step(core.Core(retry, "tok"), "s", {"x": np.ones(2, np.float32)})
    try:
        return core.drive(operation, send, log.append), log
    except Exception as e:  # noqa: BLE001 - the outcome under test
        return e, log


def test_the_core_retries_on_its_schedule_without_any_io() -> None:
    policy = Retry(attempts=4, backoff=0.5, max_backoff=1.0)
    unavailable = Reply(503, httpx.Headers({"content-type": "application/problem+json"}), b'{"title": "busy"}')
    outcome, log = scripted([TransportError("reset"), unavailable, unavailable, unavailable], policy)
    assert isinstance(outcome, ServerError)
    calls = [c for c in log if isinstance(c, Call)]
    assert [c for c in log if not isinstance(c, Call)] == policy.delays() == [0.5, 1.0, 1.0]
    assert len(calls) == 4 and len({c.headers["idempotency-key"] for c in calls}) == 1
    assert all(c.headers["authorization"] == "Bearer tok" for c in calls)
    final = Reply(404, httpx.Headers({}), b'{"title": "Not Found", "detail": "no session s"}')
    outcome, log = scripted([final], policy)
    assert isinstance(outcome, NotFound) and outcome.detail == "no session s" and len(log) == 1  # below 500: final
    outcome, log = scripted([TransportError("reset"), Reply(507, httpx.Headers({}), b"{}")], policy)
    assert isinstance(outcome, APIError) and outcome.status == 507 and len(log) == 3  # the memory budget: final
