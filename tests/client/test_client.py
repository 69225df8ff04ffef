"""RemoteOptimizer against a real server: exactly once through faults, attaching, the caller's arrays. (The
clients' own behaviour, on both drivers, is in ``test_clients.py``.)"""

from __future__ import annotations

import numpy as np
import pytest
from drivers import FaultyTransport

from optserve.client import Client, RemoteOptimizer, Retry

NO_WAIT = Retry(attempts=4, backoff=0.0)


def small_params() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def grads_for(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((2, 3)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
    }


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
        assert transport.requests == 5 + len(faults) + 1
    for name in params:
        np.testing.assert_array_equal(params[name], clean[name])


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
