"""Training through a network that drops, cuts and delays: every step is applied exactly once.

A :class:`~faultproxy.FaultProxy` sits between the client and a real ``optserve serve`` process and breaks about a
fifth of the step exchanges (dropped answers, answers cut in their body, requests cut in their body, delayed
packets). The client retries with the same ``Idempotency-Key``; the run must end at the same step and with the same
parameters, bit for bit, as a run on a clean network.
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import numpy as np
import pytest
import torch
from faultproxy import FAULTS, FaultProxy

from optserve.client import Client, RemoteOptimizer, Retry, StepConflict
from optserve.client.torch import RemoteAdamW

pytestmark = pytest.mark.server

RETRY = Retry(attempts=20, backoff=0.005, max_backoff=0.05)
TIMEOUT = 5.0
RATES = {"drop_response": 0.05, "cut_response": 0.05, "cut_request": 0.05, "delay": 0.05}
HYPER = {"lr": 1e-2, "weight_decay": 0.05}


def is_step(request_line: bytes) -> bool:
    """Faults go to steps only: the client retries steps (idempotency keys), not creates or reads."""
    return request_line.startswith(b"POST ") and b"/step" in request_line


def initial_params(n: int = 2000) -> dict[str, np.ndarray]:
    """Two tensors of ``n`` parameters (2000: answers of 16 KB)."""
    rng = np.random.default_rng(0)
    return {
        "W": rng.standard_normal((2, n // 2)).astype(np.float32),
        "b": rng.standard_normal(n).astype(np.float32),
    }


def grads_for(params: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Depends on the current parameters and the step number: any step lost or applied twice shows."""
    rng = np.random.default_rng(1000 + i)
    return {
        name: (np.sin(p) + 0.1 * rng.standard_normal(p.shape)).astype(np.float32) for name, p in sorted(params.items())
    }


def train(url: str, steps: int, n: int = 2000) -> tuple[str, dict[str, np.ndarray]]:
    params = initial_params(n)
    with RemoteOptimizer(params, url=url, optimizer="adamw", timeout=TIMEOUT, retry=RETRY, keep=True, **HYPER) as opt:
        for i in range(steps):
            opt.step(grads_for(params, i))
        assert opt.step_count == steps
        return opt.session_id, params


def session_info(url: str, session_id: str) -> dict:
    response = httpx.get(f"{url}/v1/sessions/{session_id}", timeout=10)
    response.raise_for_status()
    return response.json()


def report(name: str, proxy: FaultProxy, info: dict) -> None:
    print(
        f"\n[{name}] exchanges={proxy.counts['exchanges']} connections={proxy.counts['connections']} "
        f"faults={proxy.faults()} bytes withheld={dict(proxy.lost_bytes)} "
        f"other={ {k: v for k, v in proxy.counts.items() if k not in (*FAULTS, 'exchanges', 'connections')} } "
        f"server counters={info['counters']}"
    )


def check_faults(proxy: FaultProxy, info: dict, steps: int, at_least: int) -> None:
    faults = proxy.faults()
    assert all(n >= at_least for n in faults.values()), faults
    assert proxy.counts["refused"] == 0
    statuses = {k: v for k, v in proxy.counts.items() if k.startswith("status_")}
    assert set(statuses) == {"status_200", "status_201"}, statuses  # the create, then steps: never a 4xx or 5xx
    counters = info["counters"]
    assert info["step"] == steps
    assert counters["steps_applied"] == steps
    # every attempt that reached the server whole, after the first, is a replay: exactly the dropped and cut answers
    assert counters["replays"] == faults["drop_response"] + faults["cut_response"], (counters, faults)


def test_numpy_training_through_faults_equals_a_clean_run(server_process) -> None:
    steps = 300
    with FaultProxy(server_process.url, seed=11, match=is_step, **RATES) as proxy:
        session_id, params = train(proxy.url, steps)
    info = session_info(server_process.url, session_id)
    report("numpy", proxy, info)

    clean_id, clean = train(server_process.url, steps)
    assert session_info(server_process.url, clean_id)["counters"]["replays"] == 0
    check_faults(proxy, info, steps, at_least=5)
    for name in clean:
        assert np.array_equal(params[name], clean[name]), name
    # and what the server holds is what the client holds
    response = httpx.get(
        f"{server_process.url}/v1/sessions/{session_id}/params", headers={"accept": "application/json"}, timeout=10
    )
    assert response.headers["etag"].strip('"') == str(steps)


@pytest.mark.parametrize(
    "n",
    [20_000, 150_000],
    ids=["160KB-bodies-streamed", "1.2MB-bodies-direct"],  # the server's two ways of receiving a large body
)
def test_large_bodies_through_faults_equal_a_clean_run(server_process, n) -> None:
    steps = 60
    with FaultProxy(server_process.url, seed=5, match=is_step, **RATES) as proxy:
        session_id, params = train(proxy.url, steps, n)
    info = session_info(server_process.url, session_id)
    report(f"numpy n={n}", proxy, info)
    _, clean = train(server_process.url, steps, n)
    check_faults(proxy, info, steps, at_least=3)
    for name in clean:
        assert np.array_equal(params[name], clean[name]), name


def test_shared_session_through_faults_applies_every_step_once(server_process) -> None:
    """Two clients step one session without If-Match through the faults: each step is applied exactly once. A retry
    that comes after the other client's step is answered 409 with the step it was applied at (documented), which is
    an acknowledgement too."""
    per_thread, outcomes, errors = 150, Counter[str](), list[str]()
    lock = threading.Lock()
    with Client(server_process.url, timeout=TIMEOUT) as direct:
        sid = direct.create_session(initial_params(), "adamw", hyperparams=HYPER)["id"]

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        grads = {name: rng.standard_normal(p.shape).astype(np.float32) for name, p in initial_params().items()}
        try:
            with Client(proxy.url, timeout=TIMEOUT, retry=RETRY) as client:
                for _ in range(per_thread):
                    try:
                        result = client.step(sid, grads)
                        outcome = "replayed" if result.replayed else "applied"
                    except StepConflict as e:
                        assert e.applied_at_step is not None and e.applied_at_step >= 1
                        outcome = "conflict"
                    with lock:
                        outcomes[outcome] += 1
        except Exception as e:  # collected: asserted empty below
            with lock:
                errors.append(repr(e))

    with FaultProxy(server_process.url, seed=31, match=is_step, **RATES) as proxy:
        threads = [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
    info = session_info(server_process.url, sid)
    report("shared", proxy, info)
    print(f"[shared] client outcomes={dict(outcomes)}")
    assert not errors, errors
    assert sum(outcomes.values()) == 2 * per_thread
    assert info["step"] == info["counters"]["steps_applied"] == 2 * per_thread
    faults = proxy.faults()
    assert faults["drop_response"] + faults["cut_response"] + faults["cut_request"] > 0, faults
    # each answer lost on its way back leads to exactly one more request that arrives whole and is not applied
    answered_again = info["counters"]["replays"] + proxy.counts["status_409"]
    assert answered_again == faults["drop_response"] + faults["cut_response"], (info["counters"], dict(proxy.counts))
    statuses = {k for k in proxy.counts if k.startswith("status_")}
    assert statuses <= {"status_200", "status_409"}, dict(proxy.counts)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def train_torch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 4, generator=g)
    for _ in range(steps):
        x = torch.randn(64, 8, generator=g)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), (x @ w).argmax(dim=1)).backward()
        optimizer.step()


def test_torch_adapter_through_faults_matches_torch_optim(server_process) -> None:
    steps, hp = 100, {"lr": 0.01, "weight_decay": 0.1}
    local_model, remote_model = make_model(), make_model()
    train_torch(local_model, torch.optim.AdamW(local_model.parameters(), **hp), steps)
    with FaultProxy(server_process.url, seed=4, match=is_step, **RATES) as proxy:
        remote = RemoteAdamW(remote_model.parameters(), url=proxy.url, timeout=TIMEOUT, retry=RETRY, **hp)
        try:
            train_torch(remote_model, remote, steps)
        finally:
            remote.client.close()
    info = session_info(server_process.url, remote.session_id)
    report("torch", proxy, info)
    check_faults(proxy, info, steps, at_least=3)
    for (name, a), (_, b) in zip(local_model.named_parameters(), remote_model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
