"""Reduced-precision answers (``?dtype=float16|bfloat16``): half the bytes back, float32 master weights kept.

Oracles: torch's own float32 -> bfloat16/float16 rounding (``Tensor.to``), the real ``safetensors.torch`` reader,
and the reference optimizer applied to the gradients as rounded on the wire.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch

from optserve.client import Client, RemoteOptimizer, wire
from optserve.client.torch import RemoteAdamW
from optserve.service import reference
from optserve.service.embedded import EmbeddedServer
from optserve.service.hyperparams import make_hyperparams

pytestmark = pytest.mark.server

ST = wire.SAFETENSORS
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def new_session(http: httpx.Client, params: dict[str, np.ndarray]) -> str:
    sid = f"d-{uuid.uuid4().hex[:12]}"
    config = json.dumps({"id": sid, "optimizer": "adamw", "hyperparams": {"lr": 0.05}})
    r = http.post("/v1/sessions", content=wire.encode(params, {"config": config}), headers={"Content-Type": ST})
    assert r.status_code == 201, r.text
    return sid


def master(http: httpx.Client, sid: str) -> dict[str, torch.Tensor]:
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST})
    assert r.status_code == 200
    return safetensors.torch.load(r.content)


def problem(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # a wide range of magnitudes, and values float16 cannot hold
    return {"w": (rng.standard_normal((n, 3)) * 10.0 ** rng.integers(-6, 6, (n, 3))).astype(np.float32),
            "b": np.array([1e5, -7e4, 3.0, 1e-9], np.float32)}  # fmt: skip


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("n", [10, 30_000], ids=["small", "large"])  # large: converted off the event loop
def test_step_answer_is_the_float32_master_rounded(http: httpx.Client, dtype: str, n: int) -> None:
    params = problem(n)
    sid = new_session(http, params)
    grads = {k: np.ones_like(v) for k, v in params.items()}
    r = http.post(f"/v1/sessions/{sid}/step?dtype={dtype}", content=wire.encode(grads), headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    answer = safetensors.torch.load(r.content)
    kept = master(http, sid)
    for name in params:
        assert kept[name].dtype == torch.float32
        assert answer[name].dtype == TORCH_DTYPES[dtype]
        assert torch.equal(answer[name], kept[name].to(TORCH_DTYPES[dtype]))  # torch's rounding, inf on overflow
    header_length = int.from_bytes(r.content[:8], "little")
    assert len(r.content) - 8 - header_length == 2 * sum(v.size for v in params.values())  # 2 bytes a parameter


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_params_answer_in_a_reduced_dtype_and_as_json(http: httpx.Client, dtype: str) -> None:
    params = problem(5)
    sid = new_session(http, params)
    kept = master(http, sid)
    r = http.get(f"/v1/sessions/{sid}/params?dtype={dtype}", headers={"Accept": ST})
    assert r.status_code == 200
    assert all(torch.equal(t, kept[k].to(TORCH_DTYPES[dtype])) for k, t in safetensors.torch.load(r.content).items())
    r = http.get(f"/v1/sessions/{sid}/params?dtype={dtype}")  # JSON: values of that precision, dtype named
    body = r.json()
    assert body["w"]["dtype"] == dtype
    decoded, _ = wire.decode_json(r.content)
    expected = kept["w"].to(TORCH_DTYPES[dtype]).float().numpy()
    assert np.array_equal(decoded["w"].astype(np.float32), expected, equal_nan=True)


@pytest.mark.parametrize("query", ["dtype=int8", "dtype=float64", "dtype=", "dtype=BF16"])
def test_unknown_answer_dtype_is_422_and_changes_nothing(http: httpx.Client, query: str) -> None:
    params = problem(4)
    sid = new_session(http, params)
    grads = {k: np.ones_like(v) for k, v in params.items()}
    r = http.post(f"/v1/sessions/{sid}/step?{query}", content=wire.encode(grads), headers={"Content-Type": ST})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert http.get(f"/v1/sessions/{sid}").json()["step"] == 0
    assert http.get(f"/v1/sessions/{sid}/params?{query}").status_code == 422


def reference_run(params: dict[str, np.ndarray], grads_seq: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    hp = make_hyperparams("adamw", {"lr": 0.05})
    p = {k: v.copy() for k, v in params.items()}
    state: dict[str, dict[str, Any]] = {k: {s: np.zeros_like(v) for s in hp.state_names()} for k, v in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for name in p:
            new_p, new_state = reference.step("adamw", p[name], grads[name], state[name], t, hp)
            p[name] = np.asarray(new_p, dtype=np.float32)
            state[name] = {k: np.asarray(v, dtype=np.float32) for k, v in new_state.items()}
    return p


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_remote_optimizer_with_a_reduced_wire_dtype(server: EmbeddedServer, dtype: str) -> None:
    """Gradients go rounded, parameters come back rounded; the master weights are exactly the reference optimizer
    applied to the rounded gradients (no rounding accumulates in them)."""
    rng = np.random.default_rng(3)
    start = {"w": rng.standard_normal((40, 7)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    params = {k: v.copy() for k, v in start.items()}
    grads_seq = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in start.items()} for _ in range(20)]
    to_torch = TORCH_DTYPES[dtype]
    with RemoteOptimizer(params, server.url, "adamw", lr=0.05, wire_dtype=dtype) as opt:
        for grads in grads_seq:
            opt.step(grads)
        with Client(server.url) as client:
            step, kept = client.params(opt.session_id)
    assert step == 20
    rounded_grads = [{k: torch.from_numpy(g).to(to_torch).float().numpy() for k, g in gs.items()} for gs in grads_seq]
    expected = reference_run(start, rounded_grads)
    for name in start:
        assert np.array_equal(kept[name], expected[name])
        assert np.array_equal(params[name], torch.from_numpy(kept[name]).to(to_torch).float().numpy())


def test_torch_drop_in_with_bfloat16_on_the_wire(server: EmbeddedServer) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = RemoteAdamW(model.parameters(), lr=1e-2, url=server.url, wire_dtype="bfloat16")
    try:
        x, y = torch.randn(64, 16), torch.randn(64, 4)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        _, kept = opt.client.params(opt.session_id)
        for name, p in zip(("0", "1"), model.parameters()):
            assert torch.equal(p.detach(), torch.from_numpy(kept[name]).to(torch.bfloat16).float())
    finally:
        opt.close(delete=True)


@pytest.mark.parametrize("bad", ["F16", "float64", "int8"])
def test_unknown_wire_dtype_is_refused_before_a_session_is_made(server: EmbeddedServer, bad: str) -> None:
    with Client(server.url) as client:
        before = len(client.list_sessions())
        with pytest.raises(ValueError, match="wire_dtype"):
            RemoteOptimizer({"w": np.zeros(3, np.float32)}, server.url, wire_dtype=bad)
        with pytest.raises(ValueError, match="wire_dtype"):
            RemoteAdamW(torch.nn.Linear(2, 2).parameters(), url=server.url, wire_dtype=bad)
        assert len(client.list_sessions()) == before


def test_the_answer_dtypes_of_the_routes_are_the_wire_dtypes() -> None:
    from typing import get_args

    from optserve.service.routes import ANSWER_DTYPES, AnswerDtype

    assert get_args(AnswerDtype) == ANSWER_DTYPES == wire.WIRE_DTYPES
