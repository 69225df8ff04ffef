"""A bounded concurrency soak against a real ``optserve serve`` process.

Six stepping threads over four sessions: two sessions shared by two threads each (no ``If-Match``: the steps land in
whatever order), two private to one ``RemoteOptimizer`` each; small (1e3) and medium (2e5 parameter) sessions. One
more thread reads (info, parameters, checkpoint export) all the while, and one changes the learning rate of the shared
sessions with PATCH. Nothing may fail; every session ends at exactly the number of steps sent to it, and each
private session holds bit for bit what a replay of its gradients on a fresh session gives.

``OPTSERVE_SOAK_SECONDS`` sets the load phase (20 s by default).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from optserve.client import Client, RemoteOptimizer
from optserve.client import checkpoint as checkpoints

pytestmark = pytest.mark.server

SECONDS = float(os.environ.get("OPTSERVE_SOAK_SECONDS", "20"))
SMALL, MEDIUM = 1_000, 200_000
MAX_STEPS = 1_000_000  # per thread: a bound, never reached
BANK = 8  # gradients per thread, cycled
HYPER = {"lr": 1e-3, "weight_decay": 0.01}
LRS = (1e-3, 5e-4, 2e-3)
TIMEOUT = 60.0


def initial(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(n).astype(np.float32), "b": np.zeros(16, np.float32)}


def bank(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"w": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal(16).astype(np.float32)}
        for _ in range(BANK)
    ]


class Soak:
    """Shared bookkeeping of the threads: steps acknowledged per session, other operations, errors."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.steps: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.errors

    def count(self, what: Counter[str], key: str) -> None:
        with self.lock:
            what[key] += 1

    def spawn(self, name: str, body: Callable[[], None]) -> None:
        def run() -> None:
            try:
                body()
            except BaseException:  # collected, asserted empty at the end
                with self.lock:
                    self.errors.append(f"{name}: {traceback.format_exc()}")

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self, timeout: float) -> list[str]:
        end = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]


def shared_stepper(soak: Soak, url: str, sid: str, n: int, seed: int, minimal: bool) -> Callable[[], None]:
    def body() -> None:
        grads = bank(n, seed)
        with Client(url, timeout=TIMEOUT) as client:
            for i in range(MAX_STEPS):
                if not soak.running():
                    break
                result = client.step(sid, grads[i % BANK], minimal=minimal)
                soak.count(soak.steps, sid)
                assert not result.replayed and not result.skipped
                if minimal:
                    assert result.params is None
                else:
                    assert result.params is not None and result.params["w"].shape == (n,)
                    result.release()

    return body


def private_stepper(soak: Soak, opt: RemoteOptimizer, n: int, seed: int, done: list[int]) -> Callable[[], None]:
    def body() -> None:
        grads = bank(n, seed)
        for i in range(MAX_STEPS):
            if not soak.running():
                break
            opt.step(grads[i % BANK])
            soak.count(soak.steps, opt.session_id)
            done[0] = i + 1
            assert opt.step_count == i + 1

    return body


def reader(soak: Soak, url: str, sids: list[str]) -> Callable[[], None]:
    def body() -> None:
        last: dict[tuple[str, str], int] = {}

        def monotonic(sid: str, what: str, step: int) -> None:
            assert step >= last.get((sid, what), 0), (sid, what, step, last)
            last[sid, what] = step

        with Client(url, timeout=TIMEOUT) as client:
            for i in range(MAX_STEPS):
                if not soak.running():
                    break
                sid = sids[i % len(sids)]
                monotonic(sid, "info", client.session(sid)["step"])
                step, tensors = client.params(sid)
                monotonic(sid, "params", step)
                assert set(tensors) == {"w", "b"}
                cp = checkpoints.decode(client.checkpoint(sid))
                monotonic(sid, "checkpoint", cp.step)
                assert cp.params["w"].shape == tensors["w"].shape
                soak.count(soak.ops, "reads")

    return body


def patcher(soak: Soak, url: str, sids: list[str]) -> Callable[[], None]:
    def body() -> None:
        with Client(url, timeout=TIMEOUT) as client:
            for i in range(MAX_STEPS):
                if not soak.running():
                    break
                lr = LRS[i % len(LRS)]
                info = client.update_hyperparams(sids[i % len(sids)], lr=lr)
                assert info["hyperparams"]["lr"] == lr
                soak.count(soak.ops, "patches")
                time.sleep(0.02)

    return body


def test_concurrent_soak(server_process) -> None:
    url = server_process.url
    with Client(url, timeout=TIMEOUT) as admin:
        shared = {
            "shared-small": (admin.create_session(initial(SMALL, 1), "adamw", hyperparams=HYPER)["id"], SMALL),
            "shared-medium": (admin.create_session(initial(MEDIUM, 2), "adamw", hyperparams=HYPER)["id"], MEDIUM),
        }
    private_specs = {"private-small": (SMALL, 3), "private-medium": (MEDIUM, 4)}
    private = {
        name: RemoteOptimizer(initial(n, seed), url=url, optimizer="adamw", timeout=TIMEOUT, keep=True, **HYPER)
        for name, (n, seed) in private_specs.items()
    }
    done = {name: [0] for name in private}
    all_sids = [sid for sid, _ in shared.values()] + [opt.session_id for opt in private.values()]

    soak = Soak(SECONDS)
    started = time.monotonic()
    try:
        for k, (name, (sid, n)) in enumerate(shared.items()):
            soak.spawn(f"{name}-a", shared_stepper(soak, url, sid, n, seed=10 + k, minimal=False))
            soak.spawn(f"{name}-b", shared_stepper(soak, url, sid, n, seed=20 + k, minimal=True))
        for name, opt in private.items():
            n, seed = private_specs[name]
            soak.spawn(name, private_stepper(soak, opt, n, 100 + seed, done[name]))
        soak.spawn("reader", reader(soak, url, all_sids))
        soak.spawn("patcher", patcher(soak, url, [sid for sid, _ in shared.values()]))
        hung = soak.join(SECONDS + 120)
    finally:
        soak.deadline = 0.0  # whatever happened, every thread stops at its next iteration
        hung = soak.join(30)
        for opt in private.values():
            opt.close()
    elapsed = time.monotonic() - started
    total = sum(soak.steps.values())
    names = {sid: name for name, (sid, _) in shared.items()} | {opt.session_id: name for name, opt in private.items()}
    print(
        f"\n[soak] {elapsed:.1f} s, {total} steps ({total / elapsed:.0f} steps/s), "
        f"per session { {names[sid]: n for sid, n in soak.steps.items()} }, "
        f"reads={soak.ops['reads']} patches={soak.ops['patches']}, errors={len(soak.errors)}"
    )
    assert not hung, f"threads still running: {hung}"
    assert not soak.errors, "\n".join(soak.errors[:5])
    assert soak.ops["reads"] > 0 and soak.ops["patches"] > 0

    with Client(url, timeout=TIMEOUT) as client:
        for sid in all_sids:
            info = client.session(sid)
            assert soak.steps[sid] > 0, names[sid]
            assert info["step"] == soak.steps[sid], (names[sid], info["step"], soak.steps[sid])
            counters = info["counters"]
            assert counters["steps_applied"] == soak.steps[sid], (names[sid], counters)
            assert counters["replays"] == counters["steps_rejected"] == counters["steps_skipped"] == 0, counters

    # the private sessions: a replay of the same gradients on a fresh session ends at the same parameters
    replay_started = time.monotonic()
    for name, opt in private.items():
        n, seed = private_specs[name]
        grads = bank(n, 100 + seed)
        params = initial(n, seed)
        with RemoteOptimizer(params, url=url, optimizer="adamw", timeout=TIMEOUT, **HYPER) as again:
            for i in range(done[name][0]):
                again.step(grads[i % BANK])
            again.close(delete=True)
        for tensor in params:
            assert np.array_equal(opt.params[tensor], params[tensor]), (name, tensor)
    print(f"[soak] replay of the private sessions: {time.monotonic() - replay_started:.1f} s")
