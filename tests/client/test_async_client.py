"""``AsyncClient``, the asyncio twin of ``Client``, against a real server: every operation, the same typed errors,
safe retries through a fault-injecting transport, concurrent steps, and the same results as the sync client.

Each test is a plain sync test that runs its coroutine with ``asyncio.run`` (no pytest plugin needed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
import numpy as np
import pytest

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
    StepConflict,
)

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


def run(coro_fn: Callable[[AsyncClient], Awaitable[Any]], url: str, **kwargs: Any) -> Any:
    """Run ``coro_fn(client)`` on a fresh event loop with an AsyncClient opened (and closed) inside it."""

    async def main() -> Any:
        async with AsyncClient(url, **kwargs) as client:
            return await coro_fn(client)

    return asyncio.run(main())


class LosingTransport(httpx.AsyncBaseTransport):
    """Forwards every request to the server, but drops the answers of the first ``lose`` step requests (the server
    applied them; the client sees a reset connection)."""

    def __init__(self, lose: int) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lose = lose
        self.step_requests = 0
        self.keys: list[str | None] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        is_step = request.url.path.endswith("/step")
        if is_step:
            self.step_requests += 1
            self.keys.append(request.headers.get("idempotency-key"))
        response = await self.inner.handle_async_request(request)
        if is_step and self.lose > 0:
            self.lose -= 1
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("injected: connection reset before the answer arrived", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- sessions ------------------------------------------------------------------------------------------------------


def test_session_lifecycle(server) -> None:
    async def scenario(client: AsyncClient) -> None:
        info = await client.create_session(
            small_params(), "adam", hyperparams={"lr": 0.01}, param_groups=[{"params": ["b"], "lr": 0.1}]
        )
        sid = info["id"]
        assert info["optimizer"] == "adam" and info["step"] == 0
        assert [g["params"] for g in info["param_groups"]] == [["b"], ["w"]]
        got = await client.session(sid)
        assert got["id"] == sid and got["tensors"]["w"]["shape"] == [2, 3]
        listed = {s["id"]: s for s in await client.list_sessions()}
        assert listed[sid]["optimizer"] == "adam" and listed[sid]["num_params"] == 9
        patched = await client.update_hyperparams(sid, lr=0.5)
        assert [g["hyperparams"]["lr"] for g in patched["param_groups"]] == [0.5, 0.5]
        patched = await client.update_hyperparams(sid, group=0, lr=0.25, weight_decay=0.1)
        assert [g["hyperparams"]["lr"] for g in patched["param_groups"]] == [0.25, 0.5]
        assert (await client.session(sid))["param_groups"][0]["hyperparams"]["weight_decay"] == 0.1
        named = await client.create_session(small_params(), "sgd", session_id=f"{sid}-named", nonfinite="skip")
        assert named["id"] == f"{sid}-named" and named["nonfinite"] == "skip"
        await client.delete_session(sid)
        with pytest.raises(NotFound):
            await client.session(sid)
        with pytest.raises(NotFound):
            await client.delete_session(sid)
        assert sid not in {s["id"] for s in await client.list_sessions()}
        await client.delete_session(named["id"])

    run(scenario, server.url)


def test_create_with_training_options(server) -> None:
    async def scenario(client: AsyncClient) -> None:
        info = await client.create_session(
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
        first = await client.step(info["id"], grads_for(0))
        assert first.params is None and first.awaiting == 1 and first.step == 0
        second = await client.step(info["id"], grads_for(1))
        assert second.params is not None and second.step == 1 and second.awaiting == 0
        assert second.grad_norm is not None and second.grad_norm > 0

    run(scenario, server.url)


# --- steps ---------------------------------------------------------------------------------------------------------


def test_step_options(server) -> None:
    p0 = small_params()
    ones = {n: np.ones_like(p) for n, p in p0.items()}

    async def scenario(client: AsyncClient) -> None:
        sid = (await client.create_session(p0, "sgd", hyperparams={"lr": 0.5}))["id"]
        first = await client.step(sid, ones, if_match=0, idempotency_key="k1")
        assert first.step == 1 and not first.replayed and not first.skipped
        assert_equal(first.params, {n: p - np.float32(0.5) for n, p in p0.items()})
        assert first.grad_norm == pytest.approx(3.0)  # sqrt(9 ones)
        again = await client.step(sid, grads_for(7), idempotency_key="k1")  # same key: replayed, not applied
        assert again.replayed and again.step == 1
        assert_equal(again.params, first.params)
        with pytest.raises(PreconditionFailed) as pre:
            await client.step(sid, ones, if_match=0)
        assert pre.value.current_step == 1 and pre.value.status == 412
        minimal = await client.step(sid, ones, if_match=1, minimal=True)
        assert minimal.params is None and minimal.step == 2
        with pytest.raises(StepConflict) as conflict:
            await client.step(sid, ones, idempotency_key="k1")
        assert conflict.value.applied_at_step == 1
        partial = await client.step(sid, {"b": np.ones(3, np.float32)}, partial=True)
        assert partial.step == 3
        changed = await client.step(sid, ones, changes={"lr": 0.25}, dtype="float16")
        assert changed.step == 4
        want = {"w": p0["w"] - np.float32(1.25), "b": p0["b"] - np.float32(1.75)}
        assert_equal(changed.params, want)
        assert [g["hyperparams"]["lr"] for g in (await client.session(sid))["param_groups"]] == [0.25]
        step, params = await client.params(sid)
        assert step == 4
        assert_equal(params, want)

    run(scenario, server.url)


def test_params_with_min_step_waits(server) -> None:
    async def scenario(client: AsyncClient) -> None:
        sid = (await client.create_session(small_params(), "sgd", hyperparams={"lr": 0.1}))["id"]

        async def later() -> Any:
            await asyncio.sleep(0.3)
            return await client.step(sid, grads_for(0))

        loop = asyncio.get_running_loop()
        start = loop.time()
        (step, params), result = await asyncio.gather(client.params(sid, min_step=1, timeout=5), later())
        assert loop.time() - start >= 0.25
        assert step == 1 and result.step == 1
        assert_equal(params, result.params)
        start = loop.time()
        step, _ = await client.params(sid, min_step=2, timeout=0.2)  # nobody steps: the answer comes anyway
        assert step == 1 and 0.15 <= loop.time() - start < 2.0

    run(scenario, server.url)


def test_checkpoint_and_restore(server) -> None:
    async def scenario(client: AsyncClient) -> None:
        sid = (await client.create_session(small_params(), "adamw", hyperparams={"lr": 0.05}))["id"]
        for k in range(3):
            await client.step(sid, grads_for(k), idempotency_key=f"ck{k}")
        blob = await client.checkpoint(sid)
        assert isinstance(blob, bytes) and blob
        info = await client.restore(f"{sid}-copy", blob)
        assert info["id"] == f"{sid}-copy" and info["step"] == 3
        # The copy resumes bit for bit, and knows the original's idempotency keys.
        replay = await client.step(f"{sid}-copy", grads_for(2), idempotency_key="ck2")
        assert replay.replayed and replay.step == 3
        a = await client.step(sid, grads_for(3))
        b = await client.step(f"{sid}-copy", grads_for(3))
        assert a.step == b.step == 4
        assert_equal(b.params, a.params)  # type: ignore[arg-type]
        # Restoring over an existing session replaces it.
        replaced = await client.restore(sid, blob)
        assert replaced["step"] == 3
        with pytest.raises(NotFound):
            await client.checkpoint("no-such-session")

    run(scenario, server.url)


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
    """(method name, args, kwargs) of an operation that fails; the same for both clients."""
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


def test_typed_errors_are_identical_to_the_sync_client(server) -> None:
    with Client(server.url) as sync:
        sid = sync.create_session(small_params(), "sgd", hyperparams={"lr": 0.1})["id"]
        sync.step(sid, grads_for(0), idempotency_key="first")
        sync.step(sid, grads_for(1))
        sync_errors = {}
        for case, cls in ERROR_CASES:
            method, args, kwargs = error_call(case, sid)
            with pytest.raises(cls) as info:
                getattr(sync, method)(*args, **kwargs)
            sync_errors[case] = info.value

    async def scenario(client: AsyncClient) -> dict[str, APIError]:
        errors = {}
        for case, cls in ERROR_CASES:
            method, args, kwargs = error_call(case, sid)
            with pytest.raises(cls) as info:
                await getattr(client, method)(*args, **kwargs)
            errors[case] = info.value
        return errors

    async_errors = run(scenario, server.url)
    for case, _ in ERROR_CASES:
        s, a = sync_errors[case], async_errors[case]
        assert type(a) is type(s), case
        assert (a.status, a.type, a.detail, a.problem) == (s.status, s.type, s.detail, s.problem), case
    assert async_errors["stale-if-match"].current_step == 2  # type: ignore[attr-defined]
    assert async_errors["old-key"].applied_at_step == 1  # type: ignore[attr-defined]
    with Client(server.url) as sync:
        assert sync.session(sid)["step"] == 2  # none of the failures changed anything


# --- retries and concurrency ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lose", [1, 2])
def test_a_lost_answer_is_retried_as_a_replay(server, lose: int) -> None:
    transport = LosingTransport(lose)
    p0 = small_params()

    async def scenario(client: AsyncClient) -> Any:
        sid = (await client.create_session(p0, "adam", hyperparams={"lr": 0.01}))["id"]
        result = await client.step(sid, grads_for(0))
        return sid, result, await client.session(sid)

    sid, result, info = run(scenario, server.url, transport=transport, retry=NO_WAIT)
    assert result.replayed and result.step == 1
    assert info["step"] == 1
    assert info["counters"]["steps_applied"] == 1 and info["counters"]["replays"] == lose
    assert transport.step_requests == lose + 1
    assert len(set(transport.keys)) == 1 and transport.keys[0]  # every attempt carried the same key
    with Client(server.url) as sync:
        ref = sync.create_session(p0, "adam", hyperparams={"lr": 0.01})["id"]
        assert_equal(result.params, sync.step(ref, grads_for(0)).params)  # type: ignore[arg-type]


def test_concurrent_steps_are_all_applied_once(server) -> None:
    async def scenario(client: AsyncClient) -> Any:
        p0 = {"x": np.full(16, 1000.0, np.float32)}
        sid = (await client.create_session(p0, "sgd", hyperparams={"lr": 1.0}))["id"]
        ones = {"x": np.ones(16, np.float32)}
        results = await asyncio.gather(*(client.step(sid, ones) for _ in range(8)))
        return results, await client.params(sid), await client.session(sid)

    results, (step, params), info = run(scenario, server.url)
    assert sorted(r.step for r in results) == list(range(1, 9))
    for r in results:  # each answer holds the parameters of its own step
        np.testing.assert_array_equal(r.params["x"], np.full(16, 1000.0 - r.step, np.float32))
    assert step == 8 and info["step"] == 8 and info["counters"]["steps_applied"] == 8
    np.testing.assert_array_equal(params["x"], np.full(16, 992.0, np.float32))


# --- the twins agree -----------------------------------------------------------------------------------------------


def test_sync_and_async_clients_give_identical_results(server) -> None:
    p0 = small_params()

    def sync_sequence() -> tuple[int, dict[str, np.ndarray], bytes]:
        with Client(server.url) as c:
            sid = c.create_session(p0, "adam", hyperparams={"lr": 0.05}, param_groups=[{"params": ["b"], "lr": 0.1}])[
                "id"
            ]
            c.step(sid, grads_for(0), if_match=0)
            c.update_hyperparams(sid, group=1, lr=0.02)
            c.step(sid, grads_for(1), changes=[{"lr": 0.03}, None])
            c.step(sid, {"w": grads_for(2)["w"]}, partial=True)
            c.step(sid, grads_for(3), dtype="bfloat16", minimal=True)
            restored = f"{sid}-r"
            c.restore(restored, c.checkpoint(sid))
            c.step(restored, grads_for(4))
            step, params = c.params(restored, min_step=5, timeout=1)
            return step, params, c.checkpoint(restored)

    async def async_sequence(c: AsyncClient) -> tuple[int, dict[str, np.ndarray], bytes]:
        sid = (
            await c.create_session(p0, "adam", hyperparams={"lr": 0.05}, param_groups=[{"params": ["b"], "lr": 0.1}])
        )["id"]
        await c.step(sid, grads_for(0), if_match=0)
        await c.update_hyperparams(sid, group=1, lr=0.02)
        await c.step(sid, grads_for(1), changes=[{"lr": 0.03}, None])
        await c.step(sid, {"w": grads_for(2)["w"]}, partial=True)
        await c.step(sid, grads_for(3), dtype="bfloat16", minimal=True)
        restored = f"{sid}-r"
        await c.restore(restored, await c.checkpoint(sid))
        await c.step(restored, grads_for(4))
        step, params = await c.params(restored, min_step=5, timeout=1)
        return step, params, await c.checkpoint(restored)

    s_step, s_params, _ = sync_sequence()
    a_step, a_params, _ = run(async_sequence, server.url)
    assert s_step == a_step == 5
    assert_equal(a_params, s_params)
    # The sequence moved every tensor (so the comparison is not vacuous).
    for n, p in p0.items():
        assert not np.array_equal(a_params[n], p)
