"""The server-side training features over real HTTP: global-norm clipping, learning-rate schedules, gradient
accumulation, partial gradients, in-band hyperparameter changes and waiting parameter reads.

The oracles are ``torch.optim`` (with ``clip_grad_norm_`` and ``LambdaLR`` whose factors are written here from the
formulas in the docs, independently of :mod:`optserve.service.schedules`) and, for accumulation, a plain session
stepping the averaged gradient. Every test creates its own sessions.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from optserve.client import Client, RemoteOptimizer, wire

ST = wire.SAFETENSORS
SHAPES = {"w": (4, 5), "b": (5,), "c": (3,)}  # deliberately not in alphabetical order


# --- helpers -------------------------------------------------------------------------------------------------------


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def make_grads(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SHAPES.items()}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def json_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {n: {"dtype": "float32", "shape": list(a.shape), "data": a.reshape(-1).tolist()} for n, a in tensors.items()}


def global_norm(grads: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))


def post_step(
    http: httpx.Client,
    sid: str,
    grads: Mapping[str, np.ndarray],
    headers: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    query: str = "",
) -> httpx.Response:
    return http.post(
        f"/v1/sessions/{sid}/step{query}",
        content=wire.encode(grads, metadata),
        headers={"Content-Type": ST, "Accept": ST, **(headers or {})},
    )


def raw_params(http: httpx.Client, sid: str) -> tuple[dict[str, bytes], str]:
    """Each tensor's bytes (for byte-exact comparisons) and the ETag."""
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST})
    assert r.status_code == 200, r.text
    tensors, _ = wire.decode(r.content)
    return {n: np.ascontiguousarray(a).tobytes() for n, a in tensors.items()}, r.headers["etag"]


def session_info(http: httpx.Client, sid: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def assert_close(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rtol: float, atol: float) -> None:
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=rtol, atol=atol, err_msg=n)


def assert_equal(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


TORCH_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


class TorchTwin:
    """The same training run in ``torch.optim``; groups as the server orders them (named groups, then the rest)."""

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        optimizer: str,
        hyperparams: Mapping[str, Any],
        param_groups: list[dict[str, Any]] | None = None,
    ) -> None:
        self.tensors = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in params.items()}
        groups, named = [], set()
        for spec in param_groups or []:
            groups.append(
                {
                    **{k: v for k, v in spec.items() if k != "params"},
                    "params": [self.tensors[n] for n in spec["params"]],
                }
            )
            named.update(spec["params"])
        rest = [t for n, t in self.tensors.items() if n not in named]
        if rest:
            groups.append({"params": rest})
        self.opt = TORCH_OPTIMIZERS[optimizer](groups, **hyperparams)

    def set_grads(self, grads: Mapping[str, np.ndarray | None]) -> None:
        for n, t in self.tensors.items():
            g = grads.get(n)
            t.grad = None if g is None else torch.tensor(np.array(g, dtype=np.float32))

    def params(self) -> dict[str, np.ndarray]:
        return {n: t.detach().numpy().copy() for n, t in self.tensors.items()}


@pytest.fixture
def client(server: Any) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


# --- 1. gradient clipping ------------------------------------------------------------------------------------------

CLIP_CASES = [
    ("adam", {"lr": 0.01}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.5}),
]


def clip_run_grads(steps: int) -> list[dict[str, np.ndarray]]:
    """Large gradients (norm ~5, clipped to 0.5) except every 4th step (norm ~0.05, left alone)."""
    return [make_grads(k, scale=0.01 if k % 4 == 3 else 1.0) for k in range(steps)]


@pytest.mark.parametrize(("optimizer", "hyperparams"), CLIP_CASES, ids=[c[0] for c in CLIP_CASES])
def test_clipping_matches_torch_clip_grad_norm(http, client, optimizer, hyperparams):
    max_norm, steps = 0.5, 20
    params = make_params(1)
    sid = client.create_session(params, optimizer, hyperparams=hyperparams, max_grad_norm=max_norm)["id"]
    twin = TorchTwin(params, optimizer, hyperparams)
    norms = []
    for k, grads in enumerate(clip_run_grads(steps)):
        twin.set_grads(grads)
        torch_norm = float(torch.nn.utils.clip_grad_norm_(list(twin.tensors.values()), max_norm))
        twin.opt.step()
        expected = global_norm(grads)
        assert torch_norm == pytest.approx(expected, rel=1e-5)
        if k % 2 == 0:  # through the client
            result = client.step(sid, grads)
            assert result.step == k + 1 and not result.skipped
            norm, got = result.grad_norm, result.params
        else:  # raw: the header and the safetensors metadata both carry the norm
            r = post_step(http, sid, grads)
            assert r.status_code == 200, r.text
            assert r.headers["etag"] == f'"{k + 1}"'
            got, metadata = wire.decode(r.content)
            norm = float(r.headers["optserve-grad-norm"])
            assert float(metadata["grad_norm"]) == norm
        assert norm is not None
        assert norm == pytest.approx(expected, rel=1e-5)
        norms.append(norm)
        assert got is not None
        assert_close(got, twin.params(), rtol=1e-5, atol=1e-6)
    # Both branches ran: most steps were clipped, some were not.
    assert sum(n > max_norm for n in norms) >= 10
    assert sum(n < max_norm for n in norms) >= 4
    _, final = client.params(sid)
    assert_close(final, twin.params(), rtol=1e-5, atol=1e-6)
    info = client.session(sid)
    assert info["max_grad_norm"] == max_norm
    assert info["last_grad_norm"] == norms[-1]
    assert info["step"] == steps


def test_clipping_changes_the_result_and_is_off_by_default(client):
    """Without ``max_grad_norm`` nothing is clipped (the norm is still reported); with it the result differs."""
    params, grads = make_params(2), make_grads(0, scale=3.0)
    plain = client.create_session(params, "sgd", hyperparams={"lr": 0.1})
    assert plain["max_grad_norm"] is None and plain["last_grad_norm"] is None
    clipped = client.create_session(params, "sgd", hyperparams={"lr": 0.1}, max_grad_norm=0.5)["id"]
    r_plain, r_clipped = client.step(plain["id"], grads), client.step(clipped, grads)
    assert r_plain.grad_norm == pytest.approx(global_norm(grads), rel=1e-5)
    assert r_clipped.grad_norm == pytest.approx(global_norm(grads), rel=1e-5)  # before clipping
    assert r_plain.params is not None and r_clipped.params is not None
    for n, p in params.items():
        np.testing.assert_allclose(r_plain.params[n], p - 0.1 * grads[n], rtol=1e-6, atol=1e-7)
        scale = 0.5 / (global_norm(grads) + 1e-6)
        np.testing.assert_allclose(r_clipped.params[n], p - 0.1 * scale * grads[n], rtol=1e-5, atol=1e-6)
    assert client.session(plain["id"])["last_grad_norm"] == r_plain.grad_norm


@pytest.mark.parametrize("max_grad_norm", [0, -1.0, math.inf, math.nan, "big"])
def test_invalid_max_grad_norm_is_refused(http, max_grad_norm):
    sid = new_id("clip")
    body = {"id": sid, "optimizer": "sgd", "max_grad_norm": max_grad_norm, "params": json_tensors(make_params())}
    r = http.post("/v1/sessions", content=json.dumps(body).encode(), headers={"Content-Type": wire.JSON})
    assert r.status_code == 422, r.text
    assert http.get(f"/v1/sessions/{sid}").status_code == 404


# --- 2. learning-rate schedules ------------------------------------------------------------------------------------


def factor_linear_warmup(s: int, warmup_steps: int) -> float:
    return min(1.0, s / warmup_steps)


def factor_cosine(s: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if s <= warmup_steps:
        return s / warmup_steps
    progress = min(1.0, (s - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def factor_step(s: int, step_size: int, gamma: float) -> float:
    return gamma ** ((s - 1) // step_size)


SCHEDULES: list[tuple[dict[str, Any], Callable[[int], float]]] = [
    ({"name": "linear_warmup", "warmup_steps": 5}, lambda s: factor_linear_warmup(s, 5)),
    (
        {"name": "cosine", "warmup_steps": 3, "total_steps": 20, "min_lr_ratio": 0.1},
        lambda s: factor_cosine(s, 3, 20, 0.1),
    ),
    ({"name": "step", "step_size": 4, "gamma": 0.5}, lambda s: factor_step(s, 4, 0.5)),
    ({"name": "constant"}, lambda s: 1.0),
]


@pytest.mark.parametrize(("schedule", "f"), SCHEDULES, ids=[s["name"] for s, _ in SCHEDULES])
def test_schedule_matches_torch_lambda_lr(client, schedule, f):
    hyperparams = {"lr": 0.05}
    groups = [{"params": ["b"], "lr": 0.02}]  # group 0: b at lr 0.02; group 1: w and c at lr 0.05
    params = make_params(3)
    info = client.create_session(params, "adam", hyperparams=hyperparams, param_groups=groups, schedule=schedule)
    sid = info["id"]
    assert info["schedule"]["name"] == schedule["name"]
    twin = TorchTwin(params, "adam", hyperparams, groups)
    sched = torch.optim.lr_scheduler.LambdaLR(twin.opt, lambda i: f(i + 1))
    constant = TorchTwin(params, "adam", hyperparams, groups)
    base_lrs = [0.02, 0.05]
    for k in range(20):
        # Before step k + 1 the server reports the lr it is about to use, as torch's scheduler holds it.
        got_lrs = [g["scheduled_lr"] for g in client.session(sid)["param_groups"]]
        assert got_lrs == pytest.approx([lr * f(k + 1) for lr in base_lrs], rel=1e-12)
        assert got_lrs == pytest.approx([g["lr"] for g in twin.opt.param_groups], rel=1e-12)
        grads = make_grads(k)
        twin.set_grads(grads)
        twin.opt.step()
        sched.step()
        constant.set_grads(grads)
        constant.opt.step()
        result = client.step(sid, grads)
        assert result.params is not None
        assert_close(result.params, twin.params(), rtol=1e-5, atol=1e-6)
    info = client.session(sid)
    assert info["step"] == 20
    assert [g["hyperparams"]["lr"] for g in info["param_groups"]] == base_lrs  # the base lr is not overwritten
    assert [g["scheduled_lr"] for g in info["param_groups"]] == pytest.approx([lr * f(21) for lr in base_lrs])
    if schedule["name"] != "constant":  # the schedule really changed the result
        differs = any(not np.allclose(result.params[n], p, rtol=1e-4) for n, p in constant.params().items())
        assert differs


@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "exponential", "gamma": 0.9},
        {"name": "cosine", "warmup_steps": 20, "total_steps": 20},
        {"name": "cosine", "warmup_steps": 30, "total_steps": 20},
        {"name": "cosine"},
        {"name": "step", "step_size": -1},
        {"name": "step", "step_size": 0},
        {"name": "linear_warmup", "warmup_steps": 0},
        {"name": "constant", "warmup_steps": 5},
        {"name": "linear_warmup", "warmup_steps": 5, "gamma": 0.5},
        {"name": "step", "step_size": 2, "gamma": -0.5},
        {"name": "step", "step_size": 2, "gamma": math.inf},  # lr would become infinite after two steps
        {"name": "step", "step_size": 2, "gamma": math.nan},
        {"name": "cosine", "total_steps": 10, "min_lr_ratio": 1.5},
        {"name": "cosine", "total_steps": 10, "min_lr_ratio": math.nan},
        {"warmup_steps": 5},
        "cosine",
    ],
    ids=repr,
)
def test_invalid_schedule_is_refused(http, schedule):
    sid = new_id("sched")
    body = {"id": sid, "optimizer": "adam", "schedule": schedule, "params": json_tensors(make_params())}
    # json.dumps writes non-finite numbers as Infinity / NaN, which Python's JSON parser (the server's) reads.
    r = http.post("/v1/sessions", content=json.dumps(body).encode(), headers={"Content-Type": wire.JSON})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert http.get(f"/v1/sessions/{sid}").status_code == 404


def test_skipped_steps_do_not_advance_the_schedule(client):
    schedule = {"name": "step", "step_size": 2, "gamma": 0.5}
    params, grads = make_params(4), [make_grads(k) for k in range(8)]
    with_skip = client.create_session(params, "adam", hyperparams={"lr": 0.1}, schedule=schedule, nonfinite="skip")
    without = client.create_session(params, "adam", hyperparams={"lr": 0.1}, schedule=schedule, nonfinite="skip")
    bad = make_grads(99)
    bad["w"][1, 2] = np.nan
    for k, g in enumerate(grads):
        if k == 3:
            before = client.session(with_skip["id"])
            skipped = client.step(with_skip["id"], bad)
            assert skipped.skipped and skipped.step == 3
            after = client.session(with_skip["id"])
            assert after["step"] == 3
            assert [g["scheduled_lr"] for g in after["param_groups"]] == [
                g["scheduled_lr"] for g in before["param_groups"]
            ]
            assert after["counters"]["steps_skipped"] == 1
        client.step(with_skip["id"], g)
        client.step(without["id"], g)
    a, b = client.params(with_skip["id"]), client.params(without["id"])
    assert a[0] == b[0] == 8
    assert_equal(a[1], b[1])
    twin = TorchTwin(params, "adam", {"lr": 0.1})
    sched = torch.optim.lr_scheduler.LambdaLR(twin.opt, lambda i: factor_step(i + 1, 2, 0.5))
    for g in grads:
        twin.set_grads(g)
        twin.opt.step()
        sched.step()
    assert_close(a[1], twin.params(), rtol=1e-5, atol=1e-6)


# --- 3. gradient accumulation --------------------------------------------------------------------------------------


def mean_grads(*contributions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The average as float32, summed in order then divided, as the documented (g1 + ... + gk) / k."""
    out = {}
    for n in contributions[0]:
        total = np.zeros_like(contributions[0][n])
        for c in contributions:
            total = total + c[n]
        out[n] = total / np.float32(len(contributions))
    return out


def assert_accepted(r: httpx.Response, step: int, awaiting: int) -> None:
    assert r.status_code == 202, r.text
    assert r.headers["optserve-awaiting"] == str(awaiting)
    assert r.headers["etag"] == f'"{step}"'
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"step": step, "status": "accepted", "awaiting": awaiting}


def test_accumulation_contributions_idempotency_and_average(http, client):
    params = make_params(5)
    g1, g2, g3 = make_grads(1), make_grads(2), make_grads(3)
    hp = {"lr": 0.1, "momentum": 0.9}  # SGD is sensitive to the gradient's scale (Adam hardly is)
    sid = client.create_session(params, "sgd", hyperparams=hp, accumulate=3)["id"]
    ref = client.create_session(params, "sgd", hyperparams=hp)["id"]
    initial, _ = raw_params(http, sid)

    assert_accepted(post_step(http, sid, g1, {"Idempotency-Key": "k1"}), 0, 2)
    assert raw_params(http, sid) == (initial, '"0"')
    # A retried contribution is answered again and not counted twice.
    assert_accepted(post_step(http, sid, g1, {"Idempotency-Key": "k1"}), 0, 2)
    assert session_info(http, sid)["pending_contributions"] == 1
    assert_accepted(post_step(http, sid, g2, {"Idempotency-Key": "k2", "If-Match": '"0"'}), 0, 1)
    assert_accepted(post_step(http, sid, g2, {"Idempotency-Key": "k2"}), 0, 1)
    assert raw_params(http, sid) == (initial, '"0"')
    info = session_info(http, sid)
    assert info["step"] == 0 and info["pending_contributions"] == 2 and info["accumulate"] == 3

    # A stale precondition is refused and counts for nothing.
    r = post_step(http, sid, g3, {"Idempotency-Key": "stale", "If-Match": '"5"'})
    assert r.status_code == 412, r.text
    assert r.json()["current_step"] == 0
    assert session_info(http, sid)["pending_contributions"] == 2

    r3 = post_step(http, sid, g3, {"Idempotency-Key": "k3", "If-Match": '"0"'})
    assert r3.status_code == 200, r3.text
    assert r3.headers["etag"] == '"1"'
    assert "optserve-awaiting" not in r3.headers
    got, _ = wire.decode(r3.content)
    mean = mean_grads(g1, g2, g3)
    expected = client.step(ref, mean)
    assert expected.params is not None
    assert_close(got, expected.params, rtol=1e-6, atol=0)
    assert float(r3.headers["optserve-grad-norm"]) == pytest.approx(global_norm(mean), rel=1e-5)
    info = session_info(http, sid)
    assert info["step"] == 1 and info["pending_contributions"] == 0
    assert info["counters"]["steps_applied"] == 1 and info["counters"]["contributions"] == 2

    # After the step: the completing key and the contributions' keys replay it.
    for key in ("k3", "k1", "k2"):
        r = post_step(http, sid, g3, {"Idempotency-Key": key})
        assert r.status_code == 200, (key, r.text)
        assert r.headers["idempotent-replayed"] == "true"
        assert r.headers["etag"] == '"1"'
        assert_equal(wire.decode(r.content)[0], got)
    assert session_info(http, sid)["step"] == 1

    # One more full step: the first step's keys now conflict, naming the step they were applied at.
    for k in range(3):
        post_step(http, sid, make_grads(10 + k), {"Idempotency-Key": f"next-{k}"})
    assert session_info(http, sid)["step"] == 2
    for key in ("k1", "k3"):
        r = post_step(http, sid, g1, {"Idempotency-Key": key})
        assert r.status_code == 409, (key, r.text)
        assert r.json()["applied_at_step"] == 1
    assert session_info(http, sid)["step"] == 2


def test_accumulation_contribution_retry_while_pending_does_not_complete_the_step(http, client):
    """After a retried first contribution the step still needs exactly the remaining contributions."""
    params = make_params(6)
    sid = client.create_session(params, "sgd", hyperparams={"lr": 0.1}, accumulate=2)["id"]
    assert_accepted(post_step(http, sid, make_grads(1), {"Idempotency-Key": "a"}), 0, 1)
    for _ in range(3):
        assert_accepted(post_step(http, sid, make_grads(1), {"Idempotency-Key": "a"}), 0, 1)
    assert session_info(http, sid)["step"] == 0
    r = post_step(http, sid, make_grads(2), {"Idempotency-Key": "b"})
    assert r.status_code == 200, r.text
    got, _ = wire.decode(r.content)
    mean = mean_grads(make_grads(1), make_grads(2))
    for n, p in params.items():
        np.testing.assert_allclose(got[n], p - np.float32(0.1) * mean[n], rtol=1e-6, atol=1e-7)


def test_accumulation_survives_a_checkpoint(http, client):
    params = make_params(7)
    g1, g2, g3 = make_grads(1), make_grads(2), make_grads(3)
    hp = {"lr": 0.1, "momentum": 0.9}
    sid = client.create_session(params, "sgd", hyperparams=hp, accumulate=3)["id"]
    ref = client.create_session(params, "sgd", hyperparams=hp)["id"]
    assert_accepted(post_step(http, sid, g1, {"Idempotency-Key": "c1"}), 0, 2)
    assert_accepted(post_step(http, sid, g2, {"Idempotency-Key": "c2"}), 0, 1)
    cp = http.get(f"/v1/sessions/{sid}/checkpoint")
    assert cp.status_code == 200, cp.text
    restored = new_id("restored")
    r = http.put(f"/v1/sessions/{restored}/checkpoint", content=cp.content, headers={"Content-Type": ST})
    assert r.status_code == 201, r.text
    assert r.json()["pending_contributions"] == 2 and r.json()["step"] == 0
    # The restored session knows the pending contributions' keys too.
    assert_accepted(post_step(http, restored, g1, {"Idempotency-Key": "c1"}), 0, 1)
    done_restored = post_step(http, restored, g3, {"Idempotency-Key": "c3"})
    done_original = post_step(http, sid, g3, {"Idempotency-Key": "c3"})
    assert done_restored.status_code == done_original.status_code == 200
    assert done_restored.headers["etag"] == done_original.headers["etag"] == '"1"'
    a, b = wire.decode(done_restored.content)[0], wire.decode(done_original.content)[0]
    assert_equal(a, b)
    expected = client.step(ref, mean_grads(g1, g2, g3)).params
    assert expected is not None
    assert_close(a, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("next_pending", [False, True], ids=["idle", "next-step-pending"])
def test_nonfinite_contribution_skips_the_accumulated_step(http, client, next_pending):
    """With ``nonfinite: skip`` a NaN contribution makes the whole accumulated step skipped; the contributions'
    keys then answer as the step did (skipped, at the current step), never as applied at a step that does not exist
    nor as part of the next, pending step."""
    params = make_params(18)
    sid = client.create_session(params, "sgd", hyperparams={"lr": 0.1}, accumulate=2, nonfinite="skip")["id"]
    initial = raw_params(http, sid)
    bad = make_grads(1)
    bad["b"][0] = np.nan
    assert_accepted(post_step(http, sid, bad, {"Idempotency-Key": "n1"}), 0, 1)
    r = post_step(http, sid, make_grads(2), {"Idempotency-Key": "n2"})
    assert r.status_code == 200, r.text
    assert r.headers["optserve-step-skipped"] == "non-finite-gradient"
    assert r.headers["etag"] == '"0"' and "optserve-grad-norm" not in r.headers
    assert raw_params(http, sid) == initial
    info = session_info(http, sid)
    assert info["step"] == 0 and info["pending_contributions"] == 0 and info["counters"]["steps_skipped"] == 1
    if next_pending:  # the next step starts from scratch: one contribution is not enough
        assert_accepted(post_step(http, sid, make_grads(3), {"Idempotency-Key": "n3"}), 0, 1)
    for key in ("n2", "n1"):
        r = post_step(http, sid, bad, {"Idempotency-Key": key})
        assert r.status_code == 200, (key, r.status_code, r.text)
        assert r.headers["idempotent-replayed"] == "true"
        assert r.headers["optserve-step-skipped"] == "non-finite-gradient"
        assert r.headers["etag"] == '"0"'
    assert session_info(http, sid)["pending_contributions"] == (1 if next_pending else 0)
    if not next_pending:
        assert_accepted(post_step(http, sid, make_grads(3), {"Idempotency-Key": "n3"}), 0, 1)
    done = post_step(http, sid, make_grads(4), {"Idempotency-Key": "n4"})
    assert done.status_code == 200 and done.headers["etag"] == '"1"'
    mean = mean_grads(make_grads(3), make_grads(4))
    got = wire.decode(done.content)[0]
    for n, p in params.items():
        np.testing.assert_allclose(got[n], p - np.float32(0.1) * mean[n], rtol=1e-6, atol=1e-7)


def test_remote_optimizers_accumulate_across_two_workers(server, client):
    steps = 5
    initial = make_params(8)
    grads = {w: [make_grads(100 * w + k) for k in range(steps)] for w in (1, 2)}
    p1 = {n: p.copy() for n, p in initial.items()}
    p2 = {n: np.zeros_like(p) for n, p in initial.items()}
    opt1 = RemoteOptimizer(p1, url=server.url, optimizer="sgd", lr=0.05, momentum=0.9, accumulate=2, timeout=20)
    opt2 = RemoteOptimizer(p2, url=server.url, session_id=opt1.session_id, timeout=20)
    assert_equal(p2, initial)
    errors: list[BaseException] = []

    def work(opt: RemoteOptimizer, mine: list[dict[str, np.ndarray]]) -> None:
        try:
            for g in mine:
                opt.step(g)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [
        threading.Thread(target=work, args=(opt1, grads[1])),
        threading.Thread(target=work, args=(opt2, grads[2])),
    ]
    with opt1, opt2:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "workers did not finish"
        assert not errors, errors
        assert opt1.step_count == opt2.step_count == steps
        assert client.session(opt1.session_id)["step"] == steps
    assert_equal(p1, p2)
    single = {n: p.copy() for n, p in initial.items()}
    with RemoteOptimizer(single, url=server.url, optimizer="sgd", lr=0.05, momentum=0.9) as ref:
        for k in range(steps):
            ref.step(mean_grads(grads[1][k], grads[2][k]))
    assert_close(p1, single, rtol=1e-6, atol=0)


# --- 4. partial gradients ------------------------------------------------------------------------------------------


def test_partial_gradients_step_only_the_given_tensors(http, client):
    params = make_params(9)
    sid = client.create_session(params, "adam", hyperparams={"lr": 0.1})["id"]
    initial, _ = raw_params(http, sid)
    g1, g2 = make_grads(1), make_grads(2)
    r = post_step(http, sid, {"w": g1["w"], "c": g1["c"]}, query="?missing=skip")
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"1"'
    assert float(r.headers["optserve-grad-norm"]) == pytest.approx(global_norm({"w": g1["w"], "c": g1["c"]}), rel=1e-5)
    after, _ = raw_params(http, sid)
    assert after["b"] == initial["b"]  # byte-exact: not stepped
    assert after["w"] != initial["w"] and after["c"] != initial["c"]
    full = client.step(sid, g2)
    assert full.step == 2 and full.params is not None

    twin = TorchTwin(params, "adam", {"lr": 0.1})
    twin.set_grads({"w": g1["w"], "c": g1["c"]})  # b.grad is None: torch leaves it (and its step count) alone
    twin.opt.step()
    twin.set_grads(g2)
    twin.opt.step()
    assert_close(full.params, twin.params(), rtol=1e-5, atol=1e-6)
    # b took its first step (t = 1) while w and c took their second; a zero gradient instead of no gradient in the
    # first step (b at t = 2) would give another b.
    zero = TorchTwin(params, "adam", {"lr": 0.1})
    zero.set_grads({**g1, "b": np.zeros_like(g1["b"])})
    zero.opt.step()
    zero.set_grads(g2)
    zero.opt.step()
    assert not np.allclose(full.params["b"], zero.params()["b"], rtol=1e-3, atol=1e-4)


def test_partial_gradients_through_the_client(client):
    params = make_params(10)
    sid = client.create_session(params, "sgd", hyperparams={"lr": 0.5})["id"]
    result = client.step(sid, {"b": np.ones(5, np.float32)}, partial=True)
    assert result.params is not None and result.step == 1
    np.testing.assert_array_equal(result.params["b"], params["b"] - np.float32(0.5))
    np.testing.assert_array_equal(result.params["w"], params["w"])
    np.testing.assert_array_equal(result.params["c"], params["c"])


@pytest.mark.parametrize(
    ("names", "query"),
    [
        (["w", "c"], ""),  # a subset without missing=skip
        (["w", "c"], "?missing=error"),
        (["w", "zzz"], "?missing=skip"),  # an unknown name
        (["zzz"], "?missing=skip"),
        (["w", "b", "c", "zzz"], "?missing=skip"),
    ],
)
def test_partial_gradients_refused(http, client, names, query):
    params = make_params(11)
    sid = client.create_session(params, "adam", hyperparams={"lr": 0.1})["id"]
    initial = raw_params(http, sid)
    grads = {n: np.ones(SHAPES.get(n, (2,)), np.float32) for n in names}
    r = post_step(http, sid, grads, {"Idempotency-Key": "refused"}, query=query)
    assert r.status_code == 422, r.text
    assert raw_params(http, sid) == initial
    # The refused request's key was not consumed.
    ok = post_step(http, sid, make_grads(0), {"Idempotency-Key": "refused"})
    assert ok.status_code == 200 and "idempotent-replayed" not in ok.headers


def test_partial_gradients_invalid_missing_value_is_422(http, client):
    sid = client.create_session(make_params(), "adam")["id"]
    r = post_step(http, sid, make_grads(0), query="?missing=maybe")
    assert r.status_code == 422, r.text
    assert session_info(http, sid)["step"] == 0


# --- 5. in-band hyperparameter changes -----------------------------------------------------------------------------


def lrs(info: Mapping[str, Any]) -> list[float]:
    return [g["hyperparams"]["lr"] for g in info["param_groups"]]


def test_inband_change_for_every_group(client):
    params = make_params(12)
    ones = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}
    sid = client.create_session(params, "sgd", hyperparams={"lr": 0.1}, param_groups=[{"params": ["b"], "lr": 0.2}])[
        "id"
    ]
    r1 = client.step(sid, ones, changes={"lr": 0.5})
    assert r1.params is not None
    for n, p in params.items():
        np.testing.assert_allclose(r1.params[n], p - np.float32(0.5), rtol=1e-6)
    assert lrs(client.session(sid)) == [0.5, 0.5]
    r2 = client.step(sid, ones)  # and after
    assert r2.params is not None
    for n, p in params.items():
        np.testing.assert_allclose(r2.params[n], p - np.float32(1.0), rtol=1e-6)


def test_inband_change_per_group_with_nulls(http, client):
    params = make_params(13)
    ones = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}
    sid = client.create_session(params, "sgd", hyperparams={"lr": 0.1}, param_groups=[{"params": ["b"], "lr": 0.2}])[
        "id"
    ]
    # Raw: the change travels in __metadata__["hyperparams"].
    r = post_step(http, sid, ones, metadata={"hyperparams": json.dumps([None, {"lr": 0.05}])})
    assert r.status_code == 200, r.text
    got, _ = wire.decode(r.content)
    np.testing.assert_allclose(got["b"], params["b"] - np.float32(0.2), rtol=1e-6)
    np.testing.assert_allclose(got["w"], params["w"] - np.float32(0.05), rtol=1e-6)
    np.testing.assert_allclose(got["c"], params["c"] - np.float32(0.05), rtol=1e-6)
    assert lrs(session_info(http, sid)) == [0.2, 0.05]
    result = client.step(sid, ones, changes=[{"lr": 1.0}, {}])
    assert result.params is not None
    np.testing.assert_allclose(result.params["b"], params["b"] - np.float32(1.2), rtol=1e-6)
    np.testing.assert_allclose(result.params["w"], params["w"] - np.float32(0.1), rtol=1e-6)
    assert lrs(client.session(sid)) == [1.0, 0.05]


@pytest.mark.parametrize(
    ("metadata", "status"),
    [
        (json.dumps({"lrr": 0.1}), 422),  # unknown hyperparameter
        (json.dumps({"lr": -0.5}), 422),  # negative lr
        (json.dumps({"lr": "fast"}), 422),
        (json.dumps({"lr": math.inf}), 422),
        (json.dumps([{"lr": 0.5}]), 422),  # one entry, the session has two groups
        (json.dumps([None, None, {"lr": 0.5}]), 422),
        (json.dumps([None, {"amsgrad": True, "lr": -1}]), 422),  # a valid change beside it is not applied either
        (json.dumps([None, 5]), 422),
        ("3", 422),
        ('"lr"', 422),
        ("{lr: 0.5", 400),  # not JSON
    ],
)
def test_invalid_inband_change_applies_nothing(http, client, metadata, status):
    params = make_params(14)
    sid = client.create_session(params, "adam", hyperparams={"lr": 0.1}, param_groups=[{"params": ["b"], "lr": 0.2}])[
        "id"
    ]
    initial = raw_params(http, sid)
    r = post_step(http, sid, make_grads(0), {"Idempotency-Key": "bad"}, metadata={"hyperparams": metadata})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert raw_params(http, sid) == initial
    info = session_info(http, sid)
    assert info["step"] == 0 and lrs(info) == [0.2, 0.1]
    assert all(not g["hyperparams"]["amsgrad"] for g in info["param_groups"])


@pytest.mark.parametrize("problem", ["missing-tensor", "nan", "stale-if-match"])
def test_valid_inband_change_with_a_refused_step_is_not_applied(http, client, problem):
    params = make_params(15)
    sid = client.create_session(params, "adam", hyperparams={"lr": 0.1})["id"]
    initial = raw_params(http, sid)
    grads, headers = make_grads(0), {}
    if problem == "missing-tensor":
        del grads["c"]
    elif problem == "nan":
        grads["w"][0, 0] = np.nan
    else:
        headers["If-Match"] = '"3"'
    r = post_step(http, sid, grads, headers, metadata={"hyperparams": json.dumps({"lr": 0.9})})
    assert r.status_code == (412 if problem == "stale-if-match" else 422), r.text
    assert raw_params(http, sid) == initial
    info = session_info(http, sid)
    assert info["step"] == 0 and lrs(info) == [0.1]


# --- 6. waiting parameter reads ------------------------------------------------------------------------------------


def test_params_min_step_waits_for_the_step(http, client):
    sid = client.create_session(make_params(16), "sgd", hyperparams={"lr": 0.1})["id"]
    answers: list[Any] = []

    def later() -> None:
        time.sleep(0.3)
        answers.append(client.step(sid, make_grads(0)))

    t = threading.Thread(target=later)
    start = time.monotonic()
    t.start()
    try:
        r = http.get(f"/v1/sessions/{sid}/params?min_step=1&timeout=5", headers={"Accept": ST})
        elapsed = time.monotonic() - start
    finally:
        t.join(timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"1"'
    assert 0.25 <= elapsed < 4.0, elapsed
    got, metadata = wire.decode(r.content)
    assert metadata["step"] == "1"
    assert answers and answers[0].params is not None
    assert_equal(got, answers[0].params)


def test_params_min_step_times_out_with_what_it_has(http, client):
    params = make_params(17)
    sid = client.create_session(params, "sgd", hyperparams={"lr": 0.1})["id"]
    start = time.monotonic()
    r = http.get(f"/v1/sessions/{sid}/params?min_step=1&timeout=0.2", headers={"Accept": ST})
    elapsed = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"0"'
    assert 0.18 <= elapsed < 2.0, elapsed
    assert_equal(wire.decode(r.content)[0], params)
    # Already there: no wait at all.
    start = time.monotonic()
    r = http.get(f"/v1/sessions/{sid}/params?min_step=0&timeout=5")
    assert r.status_code == 200 and r.headers["etag"] == '"0"'
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("query", ["?min_step=-1", "?min_step=1&timeout=-1", "?min_step=1&timeout=301", "?min_step=x"])
def test_params_invalid_wait_is_422(http, client, query):
    sid = client.create_session(make_params(), "sgd")["id"]
    r = http.get(f"/v1/sessions/{sid}/params{query}")
    assert r.status_code == 422, r.text
