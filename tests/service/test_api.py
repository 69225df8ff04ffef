"""The HTTP contract of API v1, over real HTTP against the in-process uvicorn server.

Every test creates its own session(s), so the tests are independent of each other and of their order. Expected
parameters come from :mod:`optserve.service.reference` (the oracle), applied one tensor at a time; the server's
fused path must agree with it bit for bit. Safetensors bodies are built with :mod:`optserve.client.wire`, with the
real ``safetensors.numpy`` package (interop) or, for malformed bodies, by hand.
"""

from __future__ import annotations

import json
import struct
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy

from optserve.client import wire
from optserve.service import reference
from optserve.service.hyperparams import make_hyperparams
from optserve.service.store import MemoryStore

ST = wire.SAFETENSORS
JSON = wire.JSON
PROBLEM = "application/problem+json"

ADAM_DEFAULTS = {
    "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False,
    "eps_root": 0.0,
}  # fmt: skip


# --- helpers -------------------------------------------------------------------------------------------------------


def make_params(seed: int = 0, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Deterministic float32 tensors; the default names are deliberately not in alphabetical order."""
    shapes = shapes or {"w": (3, 4), "b": (4,), "a": (2,)}
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def make_grads(params: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()}


def json_tensors(tensors: Mapping[str, np.ndarray], dtype: str = "float32") -> dict[str, Any]:
    return {n: {"dtype": dtype, "shape": list(a.shape), "data": a.reshape(-1).tolist()} for n, a in tensors.items()}


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create(
    http: httpx.Client,
    params: Mapping[str, np.ndarray],
    optimizer: str = "adam",
    hyperparams: Mapping[str, Any] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    nonfinite: str = "error",
    session_id: str | None = None,
) -> str:
    """Create a session with a JSON body; returns its id."""
    body: dict[str, Any] = {
        "optimizer": optimizer, "hyperparams": dict(hyperparams or {}), "param_groups": param_groups or [],
        "nonfinite": nonfinite, "params": json_tensors(params),
    }  # fmt: skip
    if session_id is not None:
        body["id"] = session_id
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def step(
    http: httpx.Client,
    sid: str,
    grads: Mapping[str, np.ndarray],
    headers: Mapping[str, str] | None = None,
    dtype: str | None = None,
) -> httpx.Response:
    """POST a safetensors step (gradients in the mapping's order)."""
    return http.post(
        f"/v1/sessions/{sid}/step",
        content=wire.encode(grads, dtype=dtype),
        headers={"Content-Type": ST, **(headers or {})},
    )


def load_st(r: httpx.Response) -> dict[str, np.ndarray]:
    assert r.headers["content-type"].startswith(ST), r.headers
    return safetensors.numpy.load(r.content)


def load_json(r: httpx.Response) -> dict[str, np.ndarray]:
    assert r.headers["content-type"].startswith(JSON), r.headers
    return wire.decode_json(r.content)[0]


def params_raw(http: httpx.Client, sid: str) -> tuple[bytes, str]:
    """The session's current parameters as a safetensors body (bytes) and the answer's ETag."""
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST})
    assert r.status_code == 200, r.text
    return r.content, r.headers["etag"]


def get_params(http: httpx.Client, sid: str) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(params_raw(http, sid)[0])


def info(http: httpx.Client, sid: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def assert_problem(r: httpx.Response, status: int, type_suffix: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].split(";")[0] == PROBLEM, r.headers
    problem = r.json()
    for member in ("type", "title", "status", "detail"):
        assert member in problem, problem
    assert problem["status"] == status
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    if type_suffix is not None:
        assert problem["type"].endswith(type_suffix), problem
    return problem  # type: ignore[no-any-return]


def assert_tensors_equal(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == np.float32, (n, got[n].dtype)
        assert got[n].shape == want[n].shape, (n, got[n].shape, want[n].shape)
        assert np.array_equal(got[n], want[n]), f"{n}: max abs diff {np.max(np.abs(got[n] - want[n]))}"


class Expected:
    """The oracle: the reference implementation applied tensor by tensor, with the session's grouping."""

    def __init__(
        self,
        params: Mapping[str, np.ndarray],
        optimizer: str = "adam",
        hyperparams: Mapping[str, Any] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
    ) -> None:
        self.optimizer = optimizer
        base = make_hyperparams(optimizer, hyperparams)
        self.hp = {n: base for n in params}
        for spec in param_groups or []:
            hp = make_hyperparams(optimizer, {k: v for k, v in spec.items() if k != "params"}, base=base)
            self.hp.update(dict.fromkeys(spec["params"], hp))
        self.params = {n: np.array(p, dtype=np.float32) for n, p in params.items()}
        self.state = {n: {s: np.zeros_like(p) for s in self.hp[n].state_names()} for n, p in self.params.items()}
        self.t = 0

    def set_hp(self, names: list[str], values: Mapping[str, Any]) -> None:
        for n in names:
            self.hp[n] = make_hyperparams(self.optimizer, values, base=self.hp[n])

    def step(self, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.t += 1
        for n, p in self.params.items():
            g = np.asarray(grads[n], dtype=np.float32)
            new_p, new_state = reference.step(self.optimizer, p, g, self.state[n], self.t, self.hp[n])
            self.params[n] = np.asarray(new_p, dtype=np.float32)
            self.state[n] = {k: np.asarray(v, dtype=np.float32) for k, v in new_state.items()}
        return {n: p.copy() for n, p in self.params.items()}


# --- 1. sessions: create, list, info, patch, delete ----------------------------------------------------------------


def test_create_with_json_echoes_effective_config(http):
    params = make_params()
    sid = new_id("json")
    body = {
        "id": sid, "optimizer": "adam", "hyperparams": {"lr": 0.01},
        "param_groups": [{"params": ["b"], "weight_decay": 0.1}], "params": json_tensors(params),
    }  # fmt: skip
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/sessions/{sid}"
    assert r.headers["etag"] == '"0"'
    got = r.json()
    assert got["id"] == sid and got["optimizer"] == "adam" and got["step"] == 0
    base = {**ADAM_DEFAULTS, "lr": 0.01}
    assert got["hyperparams"] == base
    assert got["nonfinite"] == "error"
    # The named group first, then every tensor no group names (in creation order) with the session's values.
    assert [{k: g[k] for k in ("index", "params", "hyperparams")} for g in got["param_groups"]] == [
        {"index": 0, "params": ["b"], "hyperparams": {**base, "weight_decay": 0.1}},
        {"index": 1, "params": ["w", "a"], "hyperparams": base},
    ]
    assert {n: t["shape"] for n, t in got["tensors"].items()} == {"w": [3, 4], "b": [4], "a": [2]}
    assert {t["dtype"] for t in got["tensors"].values()} == {"float32"}
    assert got["num_params"] == 18
    assert sorted(got["state"]) == ["exp_avg", "exp_avg_sq"]
    # The initial parameters are exactly what was sent.
    assert_tensors_equal(get_params(http, sid), params)


def test_create_fills_pytorch_defaults_per_optimizer(http):
    params = make_params()
    got = info(http, create(http, params, optimizer="adamw"))
    assert got["hyperparams"] == {**ADAM_DEFAULTS, "weight_decay": 0.01}  # torch AdamW's default weight decay
    got = info(http, create(http, params, optimizer="sgd"))
    assert got["hyperparams"] == {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }
    assert got["state"] == []


def test_create_with_safetensors_config_in_metadata(http):
    params = make_params(seed=3)
    sid = new_id("st")
    config = {
        "id": sid,
        "optimizer": "adamw",
        "hyperparams": {"lr": 0.02, "betas": [0.8, 0.99]},
        "param_groups": [{"params": ["w", "a"], "lr": 0.005}],
        "nonfinite": "skip",
    }
    # Written by the safetensors package itself: interop on the way in.
    body = safetensors.numpy.save(params, metadata={"config": json.dumps(config)})
    r = http.post("/v1/sessions", content=body, headers={"Content-Type": ST})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/sessions/{sid}"
    assert r.headers["etag"] == '"0"'
    got = r.json()
    base = {**ADAM_DEFAULTS, "lr": 0.02, "betas": [0.8, 0.99], "weight_decay": 0.01}
    assert got["id"] == sid and got["optimizer"] == "adamw" and got["nonfinite"] == "skip"
    assert got["hyperparams"] == base
    assert [{k: g[k] for k in ("index", "params", "hyperparams")} for g in got["param_groups"]] == [
        {"index": 0, "params": ["w", "a"], "hyperparams": {**base, "lr": 0.005}},
        {"index": 1, "params": ["b"], "hyperparams": base},
    ]
    assert {n: t["shape"] for n, t in got["tensors"].items()} == {"w": [3, 4], "b": [4], "a": [2]}
    assert_tensors_equal(get_params(http, sid), params)


def test_create_with_safetensors_without_id_gets_generated_id(http):
    params = make_params()
    body = wire.encode(params, {"config": json.dumps({"optimizer": "sgd", "hyperparams": {"lr": 0.1}})})
    r = http.post("/v1/sessions", content=body, headers={"Content-Type": ST})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert sid and r.headers["location"] == f"/v1/sessions/{sid}"
    assert info(http, sid)["hyperparams"]["lr"] == 0.1


def test_create_duplicate_id_conflicts_and_keeps_original(http):
    params = make_params()
    sid = create(http, params, session_id=new_id("dup"))
    before, _ = params_raw(http, sid)
    other = make_params(seed=9)
    r = http.post("/v1/sessions", json={"id": sid, "optimizer": "sgd", "params": json_tensors(other)})
    assert_problem(r, 409)
    assert info(http, sid)["optimizer"] == "adam"
    assert params_raw(http, sid)[0] == before


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param({"optimizer": "lion"}, 422, id="unknown-optimizer"),
        pytest.param({"hyperparams": {"lrr": 0.1}}, 422, id="unknown-hyperparam"),
        pytest.param({"hyperparams": {"lr": -1}}, 422, id="negative-lr"),
        pytest.param({"param_groups": [{"params": ["nope"]}]}, 422, id="group-names-unknown-tensor"),
        pytest.param({"param_groups": [{"params": ["w"]}, {"params": ["w"]}]}, 422, id="tensor-in-two-groups"),
        pytest.param({"nonfinite": "ignore"}, 422, id="unknown-policy"),
        pytest.param({"id": "bad id!"}, 422, id="invalid-id"),
        pytest.param({"id": 5}, 422, id="id-not-a-string"),
        pytest.param({"params": {}}, 422, id="no-tensors"),
        pytest.param({"params": [1, 2]}, 400, id="params-not-an-object"),
        pytest.param(
            {"params": {"p": {"dtype": "float32", "shape": [3], "data": [1, 2]}}}, 400, id="params-shape-mismatch"
        ),
        pytest.param(
            {"params": {"p": {"dtype": "float32", "shape": [2], "data": [1, float("nan")]}}},
            422,
            id="params-not-finite",
        ),
        pytest.param({"params": {"p": {"dtype": "int32", "shape": [2], "data": [1, 2]}}}, 400, id="params-int"),
    ],
)
def test_create_invalid_config_is_refused(http, body, status):
    sid = body["id"] if isinstance(body.get("id"), str) else new_id("bad")
    full = {"optimizer": "adam", "id": sid, "params": json_tensors(make_params()), **body}
    r = http.post("/v1/sessions", content=json.dumps(full), headers={"Content-Type": JSON})
    assert_problem(r, status)
    assert http.get(f"/v1/sessions/{sid}").status_code == 404


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(wire.encode(make_params(), {"config": "not json"}), 400, id="config-not-json"),
        pytest.param(
            wire.encode(make_params(), {"config": json.dumps({"optimizer": "lion"})}), 422, id="unknown-optimizer"
        ),
        pytest.param(wire.encode({"p": np.ones(2, np.int32)}), 422, id="int-params"),
        pytest.param(struct.pack("<Q", 2) + b"{}" + b"x", 400, id="malformed"),
    ],
)
def test_create_invalid_safetensors_is_refused(http, body, status):
    count = len(http.get("/v1/sessions").json()["sessions"])
    assert_problem(http.post("/v1/sessions", content=body, headers={"Content-Type": ST}), status)
    assert len(http.get("/v1/sessions").json()["sessions"]) == count


@pytest.mark.parametrize("headers", [{"Content-Type": "text/plain"}, {}], ids=["text-plain", "none"])
def test_create_with_wrong_media_type_is_415(http, headers):
    r = http.post("/v1/sessions", content=json.dumps({"params": json_tensors(make_params())}), headers=headers)
    assert_problem(r, 415)


def test_list_and_info(http):
    a = create(http, make_params(), optimizer="adam")
    b = create(http, make_params(), optimizer="sgd", hyperparams={"lr": 0.5})
    assert step(http, b, make_grads(make_params(), 0)).status_code == 200
    r = http.get("/v1/sessions")
    assert r.status_code == 200
    listed = {s["id"]: s for s in r.json()["sessions"]}
    assert listed[a]["optimizer"] == "adam" and listed[a]["step"] == 0 and listed[a]["num_params"] == 18
    assert listed[b]["optimizer"] == "sgd" and listed[b]["step"] == 1
    r = http.get(f"/v1/sessions/{b}")
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    got = r.json()
    assert got["step"] == 1 and got["counters"]["steps_applied"] == 1


def test_patch_all_groups_then_one_group_changes_the_math(http):
    params = make_params(seed=4)
    groups = [{"params": ["b"], "weight_decay": 0.1}]
    sid = create(http, params, optimizer="adam", hyperparams={"lr": 0.01}, param_groups=groups)
    exp = Expected(params, "adam", {"lr": 0.01}, groups)

    r = http.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.05}})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"0"'
    got = r.json()
    assert got["hyperparams"]["lr"] == 0.05
    assert [g["hyperparams"]["lr"] for g in got["param_groups"]] == [0.05, 0.05]
    assert got["param_groups"][0]["hyperparams"]["weight_decay"] == 0.1  # group overrides not touched
    exp.set_hp(["w", "b", "a"], {"lr": 0.05})
    assert_tensors_equal(load_st(step(http, sid, make_grads(params, 0))), exp.step(make_grads(params, 0)))

    r = http.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.2, "betas": [0.5, 0.9]}, "group": 1})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["param_groups"][0]["hyperparams"]["lr"] == 0.05
    assert got["param_groups"][1]["hyperparams"]["lr"] == 0.2
    assert got["param_groups"][1]["hyperparams"]["betas"] == [0.5, 0.9]
    assert got["param_groups"][0]["hyperparams"]["betas"] == [0.9, 0.999]
    assert info(http, sid)["param_groups"] == got["param_groups"]
    exp.set_hp(["w", "a"], {"lr": 0.2, "betas": [0.5, 0.9]})
    r = step(http, sid, make_grads(params, 1))
    assert r.headers["etag"] == '"2"'
    assert_tensors_equal(load_st(r), exp.step(make_grads(params, 1)))


@pytest.mark.parametrize(
    "patch",
    [
        pytest.param({"hyperparams": {"momentum": 0.9}}, id="unknown-hyperparam"),
        pytest.param({"hyperparams": {"lr": -0.1}}, id="negative-lr"),
        pytest.param({"hyperparams": {"betas": [1.5, 0.9]}}, id="beta-out-of-range"),
        pytest.param({"hyperparams": {"lr": "fast"}}, id="lr-not-a-number"),
        pytest.param({"hyperparams": {"lr": 0.1}, "group": 7}, id="no-such-group"),
        pytest.param({"hyperparams": {"lr": 0.1}, "colour": "red"}, id="unknown-member"),
    ],
)
def test_patch_invalid_is_422_and_changes_nothing(http, patch):
    groups = [{"params": ["b"], "weight_decay": 0.1}]
    sid = create(http, make_params(), optimizer="adam", param_groups=groups)
    before = info(http, sid)
    r = http.patch(f"/v1/sessions/{sid}", json=patch)
    assert_problem(r, 422)
    after = info(http, sid)
    assert after["hyperparams"] == before["hyperparams"]
    assert after["param_groups"] == before["param_groups"]
    assert after["state"] == before["state"]


def test_delete(http):
    sid = create(http, make_params())
    r = http.delete(f"/v1/sessions/{sid}")
    assert r.status_code == 204 and r.content == b""
    assert_problem(http.get(f"/v1/sessions/{sid}"), 404, "session-not-found")
    assert_problem(step(http, sid, make_grads(make_params(), 0)), 404)
    assert_problem(http.delete(f"/v1/sessions/{sid}"), 404)
    assert sid not in {s["id"] for s in http.get("/v1/sessions").json()["sessions"]}


# --- 2. step semantics ---------------------------------------------------------------------------------------------


def test_step_safetensors_matches_reference_and_etag_counts(http):
    params = make_params(seed=1)
    groups = [{"params": ["a", "w"], "lr": 0.003, "weight_decay": 0.05}]
    sid = create(http, params, optimizer="adamw", hyperparams={"lr": 0.01}, param_groups=groups)
    exp = Expected(params, "adamw", {"lr": 0.01}, groups)
    for t in range(1, 4):
        grads = make_grads(params, t)
        r = step(http, sid, grads)
        assert r.status_code == 200, r.text
        assert r.headers["etag"] == f'"{t}"'
        assert_tensors_equal(load_st(r), exp.step(grads))
    assert info(http, sid)["step"] == 3
    body, tag = params_raw(http, sid)
    assert tag == '"3"'
    assert_tensors_equal(safetensors.numpy.load(body), exp.params)


def test_step_json_in_json_out(http):
    params = make_params(seed=2)
    sid = create(http, params, optimizer="adam", hyperparams={"lr": 0.1})
    exp = Expected(params, "adam", {"lr": 0.1})
    for t in range(1, 3):
        grads = make_grads(params, t)
        r = http.post(f"/v1/sessions/{sid}/step", content=wire.encode_json(grads), headers={"Content-Type": JSON})
        assert r.status_code == 200, r.text
        assert r.headers["etag"] == f'"{t}"'
        assert_tensors_equal(load_json(r), exp.step(grads))


def test_accept_chooses_the_answer_encoding(http):
    params = make_params(seed=5)
    sid = create(http, params, optimizer="adam")
    exp = Expected(params, "adam")

    grads = make_grads(params, 0)
    r = step(http, sid, grads, headers={"Accept": JSON})
    assert r.status_code == 200, r.text
    assert_tensors_equal(load_json(r), exp.step(grads))

    grads = make_grads(params, 1)
    r = http.post(
        f"/v1/sessions/{sid}/step",
        content=wire.encode_json(grads),
        headers={"Content-Type": JSON, "Accept": ST},
    )
    assert r.status_code == 200, r.text
    assert_tensors_equal(load_st(r), exp.step(grads))

    # q-values are honoured.
    grads = make_grads(params, 2)
    r = step(http, sid, grads, headers={"Accept": f"{ST};q=0.5, {JSON}"})
    assert_tensors_equal(load_json(r), exp.step(grads))

    before, tag = params_raw(http, sid)
    assert tag == '"3"'
    r = step(http, sid, make_grads(params, 3), headers={"Accept": "text/html"})
    assert_problem(r, 406)
    assert params_raw(http, sid) == (before, '"3"')  # refused before anything was applied


def test_if_match(http):
    params = make_params(seed=6)
    sid = create(http, params, optimizer="adam")
    exp = Expected(params, "adam")

    r = step(http, sid, make_grads(params, 0), headers={"If-Match": '"1"'})
    problem = assert_problem(r, 412)
    assert r.headers["etag"] == '"0"' and problem["current_step"] == 0
    assert info(http, sid)["step"] == 0

    r = step(http, sid, make_grads(params, 0), headers={"If-Match": '"0"'})
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    assert_tensors_equal(load_st(r), exp.step(make_grads(params, 0)))

    before, _ = params_raw(http, sid)
    r = step(http, sid, make_grads(params, 1), headers={"If-Match": '"0"'})  # a stale writer
    problem = assert_problem(r, 412)
    assert r.headers["etag"] == '"1"' and problem["current_step"] == 1
    assert params_raw(http, sid) == (before, '"1"')

    r = step(http, sid, make_grads(params, 1), headers={"If-Match": '"1"'})
    assert r.status_code == 200 and r.headers["etag"] == '"2"'
    assert_tensors_equal(load_st(r), exp.step(make_grads(params, 1)))


def test_idempotency_key_replay_and_conflict(http):
    params = make_params(seed=7)
    sid = create(http, params, optimizer="adam", hyperparams={"lr": 0.1})
    exp = Expected(params, "adam", {"lr": 0.1})
    g1, g2 = make_grads(params, 1), make_grads(params, 2)

    first = step(http, sid, g1, headers={"Idempotency-Key": "key-1"})
    assert first.status_code == 200 and first.headers["etag"] == '"1"'
    assert "idempotent-replayed" not in first.headers
    want = exp.step(g1)
    assert_tensors_equal(load_st(first), want)

    again = step(http, sid, g1, headers={"Idempotency-Key": "key-1"})
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["etag"] == '"1"'
    assert_tensors_equal(load_st(again), want)
    got = info(http, sid)
    assert got["step"] == 1 and got["counters"]["steps_applied"] == 1
    assert_tensors_equal(get_params(http, sid), want)  # not applied twice

    r = step(http, sid, g2, headers={"Idempotency-Key": "key-2"})
    assert r.status_code == 200 and r.headers["etag"] == '"2"'
    want = exp.step(g2)

    before, _ = params_raw(http, sid)
    r = step(http, sid, g1, headers={"Idempotency-Key": "key-1"})
    problem = assert_problem(r, 409)
    assert problem["applied_at_step"] == 1
    assert params_raw(http, sid) == (before, '"2"')
    assert_tensors_equal(safetensors.numpy.load(before), want)


def test_retry_with_if_match_and_key_replays_instead_of_412(http):
    """What the client library does: both headers on every step; a retry after a lost answer is a replay."""
    params = make_params(seed=15)
    sid = create(http, params, optimizer="adam")
    exp = Expected(params, "adam")
    g = make_grads(params, 0)
    headers = {"If-Match": '"0"', "Idempotency-Key": "step-0"}
    first = step(http, sid, g, headers=headers)
    assert first.status_code == 200 and first.headers["etag"] == '"1"'
    retry = step(http, sid, g, headers=headers)
    assert retry.status_code == 200, retry.text
    assert retry.headers["idempotent-replayed"] == "true" and retry.headers["etag"] == '"1"'
    assert_tensors_equal(load_st(retry), exp.step(g))
    assert info(http, sid)["step"] == 1


def test_refused_step_does_not_consume_its_key(http):
    params = make_params(seed=16)
    sid = create(http, params, optimizer="adam")
    exp = Expected(params, "adam")
    g = make_grads(params, 0)
    assert_problem(step(http, sid, {**g, "b": np.zeros(5, np.float32)}, headers={"Idempotency-Key": "k"}), 422)
    assert_problem(step(http, sid, g, headers={"Idempotency-Key": "k", "If-Match": '"3"'}), 412)
    r = step(http, sid, g, headers={"Idempotency-Key": "k"})
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers and r.headers["etag"] == '"1"'
    assert_tensors_equal(load_st(r), exp.step(g))


def test_prefer_return_minimal(http):
    params = make_params(seed=8)
    sid = create(http, params, optimizer="adam")
    exp = Expected(params, "adam")
    grads = make_grads(params, 0)
    r = step(http, sid, grads, headers={"Prefer": "return=minimal"})
    assert r.status_code == 204 and r.content == b""
    assert r.headers["etag"] == '"1"'
    assert_tensors_equal(get_params(http, sid), exp.step(grads))


def test_gradients_written_by_safetensors_package_in_name_order(http):
    params = make_params(seed=10)  # session order w, b, a
    sid = create(http, params, optimizer="adam", hyperparams={"lr": 0.05})
    exp = Expected(params, "adam", {"lr": 0.05})
    grads = make_grads(params, 0)
    body = safetensors.numpy.save(grads)
    on_wire = [e.name for e in sorted(wire.parse(body).entries, key=lambda e: e.start)]
    assert on_wire != list(params)  # the body really is in another order than the session's
    r = http.post(f"/v1/sessions/{sid}/step", content=body, headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    assert_tensors_equal(load_st(r), exp.step(grads))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_gradients(http, dtype):
    params = make_params(seed=11)
    sid = create(http, params, optimizer="adam", hyperparams={"lr": 0.01})
    exp = Expected(params, "adam", {"lr": 0.01})
    for t in range(2):
        grads = make_grads(params, t)
        if dtype == "float16":
            upcast = {n: g.astype(np.float16).astype(np.float32) for n, g in grads.items()}
        else:
            upcast = {n: wire.from_bfloat16(wire.to_bfloat16(g)) for n, g in grads.items()}
        assert any(not np.array_equal(upcast[n], grads[n]) for n in grads)  # the rounding is visible
        r = step(http, sid, grads, dtype=dtype)
        assert r.status_code == 200, r.text
        assert_tensors_equal(load_st(r), exp.step(upcast))
    assert {e.dtype for e in wire.parse(params_raw(http, sid)[0]).entries} == {"F32"}
    assert {t["dtype"] for t in info(http, sid)["tensors"].values()} == {"float32"}


# --- 3. bad requests change nothing --------------------------------------------------------------------------------

# The session of the table: adam, w (2, 3) and b (3,).
BAD_PARAMS = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
    "b": np.array([1.0, -2.0, 0.5], np.float32),
}
GOOD = {"w": np.full((2, 3), 0.25, np.float32), "b": np.full(3, -0.5, np.float32)}


def raw_safetensors(header: dict[str, Any] | bytes, data: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def st_request(tensors: Mapping[str, np.ndarray], **headers: str) -> tuple[bytes, dict[str, str]]:
    return wire.encode(tensors), {"Content-Type": ST, **headers}


def raw_request(body: bytes) -> tuple[bytes, dict[str, str]]:
    return body, {"Content-Type": ST}


W_B_HEADER = {
    "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]},
}
DATA_36 = np.arange(9, dtype=np.float32).tobytes()

BAD_CASES: list[Any] = [
    pytest.param(lambda: st_request({"w": GOOD["w"], "c": GOOD["b"]}), 422, None, id="wrong-tensor-name"),
    pytest.param(lambda: st_request({"w": GOOD["w"]}), 422, None, id="missing-tensor"),
    pytest.param(lambda: st_request({**GOOD, "x": GOOD["b"]}), 422, None, id="extra-tensor"),
    pytest.param(lambda: st_request({"w": GOOD["w"].reshape(3, 2), "b": GOOD["b"]}), 422, None, id="wrong-shape"),
    pytest.param(lambda: st_request({"w": GOOD["w"], "b": GOOD["b"][:2]}), 422, None, id="wrong-shape-1d"),
    pytest.param(lambda: st_request({"w": GOOD["w"].astype(np.int32), "b": GOOD["b"]}), 422, None, id="int32"),
    pytest.param(lambda: st_request({n: g.astype(np.float64) for n, g in GOOD.items()}), 422, None, id="float64"),
    pytest.param(
        lambda: (json.dumps(json_tensors(GOOD, "float64")).encode(), {"Content-Type": JSON}),
        422,
        None,
        id="float64-json",
    ),
    pytest.param(
        lambda: raw_request(raw_safetensors(W_B_HEADER, DATA_36, length=10_000)),
        400,
        None,
        id="header-length-past-body",
    ),
    pytest.param(
        lambda: raw_request(raw_safetensors(W_B_HEADER, DATA_36, length=2**63)),
        400,
        None,
        id="header-length-absurd",
    ),
    pytest.param(lambda: raw_request(struct.pack("<Q", 2**64 - 1)), 400, None, id="header-length-max-only"),
    pytest.param(
        lambda: raw_request(
            raw_safetensors(
                {"w": W_B_HEADER["w"], "b": {"dtype": "F32", "shape": [3], "data_offsets": [36, 48]}}, DATA_36
            )
        ),
        400,
        None,
        id="offsets-out-of-range",
    ),
    pytest.param(
        lambda: raw_request(raw_safetensors(W_B_HEADER, DATA_36[:24])),
        400,
        None,
        id="offsets-past-data",
    ),
    pytest.param(
        lambda: raw_request(
            raw_safetensors(
                {"w": W_B_HEADER["w"], "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}},
                DATA_36[:24],
            )
        ),
        400,
        None,
        id="overlapping-offsets",
    ),
    pytest.param(lambda: raw_request(raw_safetensors(b"this is not json", DATA_36)), 400, None, id="header-not-json"),
    pytest.param(lambda: raw_request(raw_safetensors(b"[1, 2, 3]", b"")), 400, None, id="header-not-object"),
    pytest.param(lambda: raw_request(raw_safetensors(b"\xff\xfe{}", b"")), 400, None, id="header-not-utf8"),
    pytest.param(lambda: raw_request(wire.encode(GOOD)[:-4]), 400, None, id="truncated-body"),
    pytest.param(lambda: raw_request(wire.encode(GOOD)[:5]), 400, None, id="truncated-in-length"),
    pytest.param(lambda: raw_request(b""), 400, None, id="empty-body"),
    pytest.param(lambda: (b'{"w": {"dtype": "float32", ', {"Content-Type": JSON}), 400, None, id="json-not-json"),
    pytest.param(lambda: (b"", {"Content-Type": JSON}), 400, None, id="json-empty"),
    pytest.param(lambda: (b"[1, 2]", {"Content-Type": JSON}), 400, None, id="json-not-object"),
    pytest.param(
        lambda: st_request({"w": GOOD["w"], "b": np.array([0, np.nan, 0], np.float32)}),
        422,
        "non-finite-gradient",
        id="nan",
    ),
    pytest.param(
        lambda: st_request({"w": np.full((2, 3), np.inf, np.float32), "b": GOOD["b"]}),
        422,
        "non-finite-gradient",
        id="inf",
    ),
    pytest.param(
        lambda: st_request({"w": GOOD["w"], "b": np.array([0, 0, -np.inf], np.float32)}),
        422,
        "non-finite-gradient",
        id="minus-inf",
    ),
    pytest.param(
        lambda: (wire.encode(GOOD, dtype="float16")[:-1] + b"\x7c", {"Content-Type": ST}),
        422,
        "non-finite-gradient",
        id="inf-float16",
    ),
    pytest.param(lambda: (wire.encode_json(GOOD), {"Content-Type": "text/plain"}), 415, None, id="text-plain"),
    pytest.param(lambda: (wire.encode(GOOD), {}), 415, None, id="no-content-type"),
    pytest.param(lambda: st_request(GOOD, **{"Idempotency-Key": "k" * 256}), 400, None, id="idempotency-key-long"),
    pytest.param(lambda: st_request(GOOD, **{"Idempotency-Key": ""}), 400, None, id="idempotency-key-empty"),
    pytest.param(lambda: "unknown-session", 404, "session-not-found", id="unknown-session"),
]


@pytest.mark.parametrize(("make_request", "status", "type_suffix"), BAD_CASES)
def test_bad_step_request_is_refused_and_changes_nothing(
    http, make_request: Callable[[], Any], status: int, type_suffix: str | None
):
    sid = create(http, BAD_PARAMS, optimizer="adam", hyperparams={"lr": 0.1})
    assert step(http, sid, GOOD).status_code == 200  # a session with state, at step 1
    before, tag = params_raw(http, sid)
    assert tag == '"1"'
    counters = info(http, sid)["counters"]

    request = make_request()
    if request == "unknown-session":
        r = step(http, f"{sid}-missing", GOOD)
    else:
        body, headers = request
        r = http.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
    assert_problem(r, status, type_suffix)

    assert params_raw(http, sid) == (before, '"1"')
    after = info(http, sid)
    assert after["step"] == 1
    assert after["counters"]["steps_applied"] == counters["steps_applied"] == 1
    assert after["counters"]["steps_skipped"] == 0
    # And the session still works.
    r = step(http, sid, GOOD)
    assert r.status_code == 200 and r.headers["etag"] == '"2"'


# --- 4. non-finite policy "skip" -----------------------------------------------------------------------------------


def test_nonfinite_skip_policy(http):
    params = make_params(seed=12)
    sid = create(http, params, optimizer="adam", hyperparams={"lr": 0.1}, nonfinite="skip")
    exp = Expected(params, "adam", {"lr": 0.1})
    grads = make_grads(params, 0)
    assert_tensors_equal(load_st(step(http, sid, grads)), exp.step(grads))
    before, _ = params_raw(http, sid)

    bad = {**make_grads(params, 1), "b": np.array([1, np.nan, 2, np.inf], np.float32)}
    r = step(http, sid, bad)
    assert r.status_code == 200, r.text
    assert "optserve-step-skipped" in r.headers
    assert r.headers["etag"] == '"1"'
    assert_tensors_equal(load_st(r), exp.params)  # the params as they were
    assert params_raw(http, sid) == (before, '"1"')
    got = info(http, sid)
    assert got["step"] == 1
    assert got["counters"]["steps_skipped"] == 1 and got["counters"]["steps_applied"] == 1

    grads = make_grads(params, 2)
    r = step(http, sid, grads)
    assert r.status_code == 200 and r.headers["etag"] == '"2"'
    assert "optserve-step-skipped" not in r.headers
    assert_tensors_equal(load_st(r), exp.step(grads))  # the moments were not touched by the skipped step
    assert info(http, sid)["counters"]["steps_skipped"] == 1


# --- 5. checkpoints ------------------------------------------------------------------------------------------------

CHECKPOINT_CONFIGS = [
    pytest.param(
        "adam",
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.02},
        [{"params": ["b", "a"], "lr": 0.003, "weight_decay": 0.0}],
        ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        id="adam-amsgrad",
    ),
    pytest.param(
        "adamw",
        {"lr": 0.01, "weight_decay": 0.05},
        [{"params": ["a"], "lr": 0.02, "betas": [0.8, 0.95], "weight_decay": 0.0}],
        ["exp_avg", "exp_avg_sq"],
        id="adamw",
    ),
]


@pytest.mark.parametrize(("optimizer", "hyperparams", "groups", "state_names"), CHECKPOINT_CONFIGS)
def test_checkpoint_roundtrip_resumes_bit_for_bit(http, optimizer, hyperparams, groups, state_names):
    params = make_params(seed=13)
    grads = [make_grads(params, i) for i in range(10)]
    original = create(http, params, optimizer, hyperparams, groups, session_id=new_id("orig"))
    control = create(http, params, optimizer, hyperparams, groups)  # never interrupted
    exp = Expected(params, optimizer, hyperparams, groups)
    for g in grads[:5]:
        for sid in (original, control):
            assert step(http, sid, g, headers={"Prefer": "return=minimal"}).status_code == 204
        exp.step(g)

    r = http.get(f"/v1/sessions/{original}/checkpoint")
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"5"'
    ckpt = r.content
    tensors = load_st(r)
    assert set(tensors) == {f"{prefix}/{n}" for prefix in ["params", *state_names] for n in params}
    assert_tensors_equal({n: tensors[f"params/{n}"] for n in params}, exp.params)
    for s in state_names:
        assert_tensors_equal({n: tensors[f"{s}/{n}"] for n in params}, {n: exp.state[n][s] for n in params})

    restored = new_id("restored")
    r = http.put(f"/v1/sessions/{restored}/checkpoint", content=ckpt, headers={"Content-Type": ST})
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == '"5"' and r.headers["location"] == f"/v1/sessions/{restored}"
    before = info(http, original)
    got = r.json()
    assert got["id"] == restored and got["step"] == 5 and got["optimizer"] == optimizer
    assert got["param_groups"] == before["param_groups"] and got["hyperparams"] == before["hyperparams"]

    r = http.put(f"/v1/sessions/{original}/checkpoint", content=ckpt, headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"5"'
    assert r.json()["param_groups"] == before["param_groups"]

    for g in grads[5:]:
        want = exp.step(g)
        for sid in (original, restored, control):
            r = step(http, sid, g)
            assert r.status_code == 200, r.text
            assert_tensors_equal(load_st(r), want)
    finals = {sid: params_raw(http, sid) for sid in (original, restored, control)}
    assert finals[original][1] == finals[restored][1] == finals[control][1] == '"10"'
    loaded = {sid: safetensors.numpy.load(body) for sid, (body, _) in finals.items()}
    for n in params:
        assert np.array_equal(loaded[original][n], loaded[control][n])
        assert np.array_equal(loaded[restored][n], loaded[control][n])


def test_checkpoint_keeps_patched_hyperparams(http):
    params = make_params(seed=17)
    groups = [{"params": ["w"], "lr": 0.01}]
    sid = create(http, params, optimizer="adamw", hyperparams={"lr": 0.02}, param_groups=groups)
    exp = Expected(params, "adamw", {"lr": 0.02}, groups)
    exp.step(make_grads(params, 0))
    assert step(http, sid, make_grads(params, 0)).status_code == 200
    assert http.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.3}, "group": 1}).status_code == 200
    exp.set_hp(["b", "a"], {"lr": 0.3})
    restored = new_id("patched")
    ckpt = http.get(f"/v1/sessions/{sid}/checkpoint").content
    r = http.put(f"/v1/sessions/{restored}/checkpoint", content=ckpt, headers={"Content-Type": ST})
    assert r.status_code == 201, r.text
    assert r.json()["param_groups"] == info(http, sid)["param_groups"]
    g = make_grads(params, 1)
    assert_tensors_equal(load_st(step(http, restored, g)), exp.step(g))


def test_scalar_and_empty_tensors_keep_their_shapes(http):
    """A 0-d parameter (e.g. CLIP's logit_scale) and an empty one travel with their own shapes, both ways."""
    params = {"scale": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32), "w": np.ones(3, np.float32)}
    config = {"optimizer": "adam", "hyperparams": {"lr": 0.1}}
    r = http.post(
        "/v1/sessions",
        content=safetensors.numpy.save(params, metadata={"config": json.dumps(config)}),
        headers={"Content-Type": ST},
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["tensors"]["scale"]["shape"] == []
    exp = Expected(params, "adam", {"lr": 0.1})
    grads = {n: np.full(p.shape, 0.5, np.float32) for n, p in params.items()}
    r = http.post(f"/v1/sessions/{sid}/step", content=safetensors.numpy.save(grads), headers={"Content-Type": ST})
    assert r.status_code == 200, r.text
    want = exp.step(grads)
    assert_tensors_equal(load_st(r), want)  # checks shapes too: "scale" must come back 0-d
    assert_tensors_equal(get_params(http, sid), want)
    assert_tensors_equal(load_json(http.get(f"/v1/sessions/{sid}/params", headers={"Accept": JSON})), want)
    ckpt = http.get(f"/v1/sessions/{sid}/checkpoint").content
    assert safetensors.numpy.load(ckpt)["params/scale"].shape == ()
    restored = new_id("scalar")
    r = http.put(f"/v1/sessions/{restored}/checkpoint", content=ckpt, headers={"Content-Type": ST})
    assert r.status_code == 201, r.text
    assert r.json()["tensors"]["scale"]["shape"] == []


def test_checkpoint_keeps_idempotency_keys(http):
    params = make_params(seed=14)
    sid = create(http, params, optimizer="adam")
    first = step(http, sid, make_grads(params, 0), headers={"Idempotency-Key": "ck-1"})
    assert first.status_code == 200
    restored = new_id("restored")
    ckpt = http.get(f"/v1/sessions/{sid}/checkpoint").content
    assert (
        http.put(f"/v1/sessions/{restored}/checkpoint", content=ckpt, headers={"Content-Type": ST}).status_code == 201
    )
    r = step(http, restored, make_grads(params, 0), headers={"Idempotency-Key": "ck-1"})
    assert r.status_code == 200 and r.headers["idempotent-replayed"] == "true" and r.headers["etag"] == '"1"'
    assert r.content == first.content


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"garbage, not a safetensors file", 400, id="garbage"),
        pytest.param(b"", 400, id="empty"),
        pytest.param(safetensors.numpy.save(BAD_PARAMS), 422, id="safetensors-not-a-checkpoint"),
        pytest.param(
            safetensors.numpy.save(BAD_PARAMS, metadata={"format": "optserve.checkpoint/1"}),
            422,
            id="checkpoint-without-config",
        ),
    ],
)
def test_put_invalid_checkpoint_creates_nothing(http, body, status):
    sid = new_id("ckbad")
    r = http.put(f"/v1/sessions/{sid}/checkpoint", content=body, headers={"Content-Type": ST})
    assert_problem(r, status)
    assert_problem(http.get(f"/v1/sessions/{sid}"), 404)
    assert sid not in {s["id"] for s in http.get("/v1/sessions").json()["sessions"]}


def test_put_invalid_checkpoint_keeps_existing_session(http):
    sid = create(http, BAD_PARAMS, optimizer="adam")
    assert step(http, sid, GOOD).status_code == 200
    before = params_raw(http, sid)
    r = http.put(f"/v1/sessions/{sid}/checkpoint", content=safetensors.numpy.save(GOOD), headers={"Content-Type": ST})
    assert_problem(r, 422)
    assert params_raw(http, sid) == before


def test_checkpoint_of_unknown_session_is_404(http):
    assert_problem(http.get(f"/v1/sessions/{new_id('none')}/checkpoint"), 404)


# --- 6. concurrency ------------------------------------------------------------------------------------------------


def test_concurrent_steps_on_one_session_are_serialized(http, server):
    p0 = {"p": np.full(16, 1000.0, np.float32)}
    sid = create(http, p0, optimizer="sgd", hyperparams={"lr": 1.0, "momentum": 0.0})
    body = wire.encode({"p": np.ones(16, np.float32)})
    threads, per_thread = 8, 25
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            for _ in range(per_thread):
                r = client.post(
                    f"/v1/sessions/{sid}/step",
                    content=body,
                    headers={"Content-Type": ST, "Prefer": "return=minimal"},
                )
                if r.status_code != 204:
                    errors.append(f"{r.status_code} {r.text}")

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in pool)
    assert errors == []
    total = threads * per_thread
    assert info(http, sid)["step"] == total
    body_now, tag = params_raw(http, sid)
    assert tag == f'"{total}"'
    assert np.array_equal(safetensors.numpy.load(body_now)["p"], np.full(16, 1000.0 - total, np.float32))


def test_a_busy_session_does_not_block_another(http, server):
    params = {"p": np.full(4, 10.0, np.float32)}
    a = create(http, params, optimizer="sgd", hyperparams={"lr": 1.0})
    b = create(http, params, optimizer="sgd", hyperparams={"lr": 1.0})
    grads = {"p": np.ones(4, np.float32)}
    result: dict[str, httpx.Response | BaseException] = {}

    def step_a() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30.0) as client:
                result["a"] = step(client, a, grads)
        except BaseException as e:  # pragma: no cover - reported by the assertions below
            result["a"] = e

    if not isinstance(server.store, MemoryStore):
        pytest.skip("holds a session's lock in this process: the memory store's")
    lock = server.store.get(a).lock
    lock.acquire()
    pending = threading.Thread(target=step_a)
    try:
        with httpx.Client(base_url=server.url, timeout=5.0) as client:
            r = step(client, b, grads)
        assert r.status_code == 200 and r.headers["etag"] == '"1"'
        pending.start()
        pending.join(timeout=0.5)
        assert pending.is_alive(), "the step on A completed while A's lock was held"
        assert "a" not in result
    finally:
        lock.release()
    pending.join(timeout=10)
    assert not pending.is_alive()
    r = result["a"]
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    assert np.array_equal(load_st(r)["p"], np.full(4, 9.0, np.float32))
    assert info(http, a)["step"] == 1  # applied exactly once


# --- 7. routing and health -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/v1/nothing", "/v2/sessions", "/v1/sessions/x/y/z"])
def test_unknown_route_is_problem_404(http, path):
    assert_problem(http.get(path), 404)


def test_wrong_method_is_problem_405(http):
    assert_problem(http.put("/v1/sessions"), 405)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health(http, path):
    r = http.get(path)
    assert r.status_code == 200
    assert r.json()["status"] in ("ok", "ready")


@pytest.mark.parametrize(
    "hyperparams",
    [{"lr": 3e38}, {"lr": 1e37, "weight_decay": 100.0}, {"lr": 1e36, "betas": [0.999, 0.999]}],
    ids=["step-size", "decay", "bias-correction"],
)
def test_a_step_whose_coefficients_overflow_float32_is_refused(http: httpx.Client, hyperparams: dict) -> None:
    """A valid-looking lr near float32's largest value would write infinities (lr / (1 - beta1^t), lr * wd): 422,
    and nothing changes."""
    params = make_params(0)
    sid = create(http, params, "adamw", hyperparams)
    before, etag = params_raw(http, sid)
    r = step(http, sid, make_grads(params, 0))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == PROBLEM
    assert "beyond float32" in r.json()["detail"]
    assert params_raw(http, sid) == (before, etag)
    assert http.get(f"/v1/sessions/{sid}").json()["counters"]["steps_rejected"] == 1
