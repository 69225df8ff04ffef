"""Hostile bodies through the server: the safetensors and JSON decoders, session creation and checkpoint import
fuzzed over real HTTP against a uvicorn server in a thread of this process.

Valid bodies are mutated (bit flips, inserted and deleted bytes, truncation, rewritten length prefixes, header
values replaced by hostile JSON: unknown dtypes, huge, negative and fractional numbers, NaN and infinities,
duplicated keys, unicode and lone-surrogate names, random ``__metadata__`` including ``"hyperparams"`` changes; NaN
and infinities in the data; JSON bodies of random structure) and sent. Every answer must be:

- a 2xx or a 4xx, never a 5xx, and within ``TIMEOUT`` seconds (no hang);
- for a 4xx, an ``application/problem+json`` document whose ``status`` is the answer's;
- for a refused step, a session left exactly as it was (parameters and step, read back as bytes);
- for a refused create or import, no session and no snapshot left behind; an accepted one must then answer info,
  step, params and checkpoint requests without a 5xx.

Hypothesis properties shrink a failure to a small case; the seeded loops try a few thousand mutations by class and
report every violation at once (``MUTATIONS`` counts what was tried).
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optserve.client import wire
from optserve.service.app import create_app
from optserve.service.bodies import HTTP_PROTOCOL
from optserve.service.embedded import free_port, wait_healthy
from optserve.service.settings import Settings

ST = wire.SAFETENSORS
JSON = wire.JSON
PROBLEM = "application/problem+json"
TIMEOUT = 5.0
SHAPES = {"w": (3, 4), "b": (4,), "c": (2,)}
CONFIG: dict[str, Any] = {
    "optimizer": "adam",
    "hyperparams": {"lr": 0.01},
    "param_groups": [{"params": ["w"], "lr": 0.02}],
    "nonfinite": "error",
}
PROPERTY = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MUTATIONS: Counter[str] = Counter()  # what the seeded loops tried, by class (printed with -s)


# --- the server ----------------------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    data_dir: Path


@contextmanager
def running(data_dir: Path, **settings_: Any) -> Iterator[Server]:
    app = create_app(Settings(data_dir=data_dir, snapshot_every_seconds=0, **settings_))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, http=HTTP_PROTOCOL, log_level="critical", access_log=False)
    )
    thread = threading.Thread(target=server.run, name=f"optserve-hostile-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, alive=thread.is_alive)
        yield Server(url, data_dir)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive(), "the server thread did not stop"


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("hostile")) as server:
        yield server
    if MUTATIONS:
        print("\nmutations tried by class:", dict(sorted(MUTATIONS.items())), "total", sum(MUTATIONS.values()))


class Harness:
    """One keep-alive connection to the server (renewed after a transport error) and the checks on answers."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=TIMEOUT)

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response | str:
        """The answer, or a description of why there is none (timeout: a hang; transport error: a dropped
        connection)."""
        try:
            r = self.http.request(method, path, **kwargs)
            if r.status_code >= 500:  # uvicorn closes the connection after an unhandled error
                self._renew()
            return r
        except httpx.TimeoutException:
            self._renew()
            return f"no answer within {TIMEOUT} s"
        except httpx.TransportError as e:
            self._renew()
            return f"connection error {e!r}"

    def _renew(self) -> None:
        self.http.close()
        self.http = httpx.Client(base_url=self.server.url, timeout=TIMEOUT)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        r = self.send("GET", path, **kwargs)
        if isinstance(r, str):  # one retry: a 5xx before may have closed the connection
            r = self.send("GET", path, **kwargs)
        assert not isinstance(r, str), f"GET {path}: {r}"
        return r

    def params_state(self, sid: str) -> bytes:
        """A session's parameters and step as bytes (safetensors, whose metadata holds the step)."""
        r = self.get(f"/v1/sessions/{sid}/params", headers={"accept": ST})
        if r.status_code != 200:  # (a fault the caller reports: the state no longer reads back)
            return f"<params answered {r.status_code}>".encode()
        return r.headers["etag"].encode() + b"|" + r.content

    def full_state(self, sid: str) -> bytes | None:
        """Everything a session holds (its checkpoint), or None when there is no such session."""
        r = self.get(f"/v1/sessions/{sid}/checkpoint")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            return f"<checkpoint answered {r.status_code}>".encode()
        return r.content

    def listing(self) -> list[str]:
        r = self.get("/v1/sessions")
        assert r.status_code == 200, r.text
        return sorted(s["id"] for s in r.json()["sessions"])

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.server.data_dir)) for p in self.server.data_dir.rglob("*") if p.is_file())


def answer_faults(r: httpx.Response | str) -> list[str]:
    """What is wrong with an answer to a hostile request (empty: nothing)."""
    if isinstance(r, str):
        return [r]
    status = r.status_code
    if not (200 <= status < 300 or 400 <= status < 500):
        return [f"status {status}: {r.text[:300]}"]
    if status >= 400:
        ctype = r.headers.get("content-type", "").split(";")[0]
        if ctype != PROBLEM:
            return [f"{status} answered as {ctype!r}, not problem+json: {r.text[:200]}"]
        try:
            problem = r.json()
        except ValueError:
            return [f"{status}: the problem document is not JSON: {r.text[:200]}"]
        if not isinstance(problem, dict) or problem.get("status") != status or not problem.get("type"):
            return [f"{status}: malformed problem document {problem!r:.300}"]
    return []


# --- valid bodies and their parts ----------------------------------------------------------------------------------


def grads(seed: int = 1, shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def json_tensors(ts: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {n: {"dtype": "float32", "shape": list(a.shape), "data": a.reshape(-1).tolist()} for n, a in ts.items()}


VALID_STEP = wire.encode(grads())


def split(body: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + n]), body[8 + n :]


class Raw(str):
    """JSON text spliced into a header as it is (NaN, 1e999, integers of thousands of digits, ...)."""


class Pairs(list):  # type: ignore[type-arg]
    """A JSON object written from (key, value) pairs: keys may repeat."""


def dump(value: Any, ascii_only: bool = True) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{dump(v, ascii_only)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return dump(Pairs(value.items()), ascii_only)
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def join(header: Any, data: bytes, ascii_only: bool = True) -> bytes:
    text = (
        header if isinstance(header, (bytes, bytearray)) else dump(header, ascii_only).encode("utf-8", "surrogatepass")
    )
    return struct.pack("<Q", len(text)) + bytes(text) + data


# --- hostile values ------------------------------------------------------------------------------------------------

HOSTILE_LITERALS = [
    "null", "true", "false", "0", "-0", "-1", "1.5", "-2.5", "1e999", "-1e999", "NaN", "Infinity", "-Infinity",
    "2147483648", "4294967296", "9007199254740993", "9223372036854775807", "9223372036854775808",
    "18446744073709551615", "18446744073709551616", "-9223372036854775809", "281474976710656", "1" + "0" * 400,
    "1" + "0" * 5000, "1e-400", "0.0", '""', '"x"', '"F32"', '"f32"', '"F16"', '"BF16"', '"F64"', '"I64"', '"U8"',
    '"BOOL"', '"F8_E5M2"', '"F8_E4M3"', '"\\ud800"', '"\\u0000"', '"\u00e9\u6f22\U0001f600"', "[]", "[[]]", "[1]",
    "[-1]", "[0,0]", "[1,2,3]", "[2,1]", "[3,4]", "[4,3]", "[12]", "[0]", "[0,48]", "[0,18446744073709551616]",
    "[0,1e999]", '[0,"48"]', "[0,48.0]", "[[0],[48]]", "[true,false]", "[null]", "{}", '{"a":1}',
    "[0,9223372036854775807]", "[281474976710656]", "[281474976710657]", "[65536,65536,65536]",
    "[4294967296,4294967296]", "[" + ",".join(["1"] * 33) + "]", "[" + ",".join(["0"] * 40) + "]", "[NaN]",
    "[Infinity, 1]",
]  # fmt: skip
UNICODE_NAMES = [
    "", " ", "w ", "W", "\u00e9", "\u6f22\u5b57", "\U0001f600", "\u200b", "\u202eevil", "\ud800", "\udfff",
    "a\u0000b", "__metadata__", "params/w", "../../etc/passwd", "w" * 2000, "\n", "\\", '"', "\ufeffw",
]  # fmt: skip
HYPERPARAM_NAMES = ["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "eps_root", "momentum", "nesterov",
                    "alpha", "centered", "dampening", "group", "", "__class__"]  # fmt: skip


def hostile(rng: random.Random) -> Raw:
    return Raw(rng.choice(HOSTILE_LITERALS))


def hostile_hyperparams(rng: random.Random) -> str:
    """The text of a step's ``__metadata__["hyperparams"]``: an object, a list per group, or anything else."""

    def one() -> Any:
        return Pairs(
            (rng.choice(HYPERPARAM_NAMES), rng.choice([hostile(rng), Raw(str(rng.uniform(0, 1))), Raw("[0.5, 0.9]")]))
            for _ in range(rng.randint(0, 3))
        )

    kind = rng.randrange(6)
    if kind == 0:
        return dump(one())
    if kind == 1:
        return dump([rng.choice([one(), None, hostile(rng)]) for _ in range(rng.randint(0, 4))])
    if kind == 2:
        return dump({"lr": rng.choice([0.5, 1e-3, 0.0, 1e30])})  # valid: the step must apply it
    if kind == 3:
        return rng.choice(HOSTILE_LITERALS)
    if kind == 4:
        return rng.choice(["", "{", "not json", "{'lr': 1}", "[", '{"lr": 1,}'])
    return dump([{"lr": 0.5}, {"amsgrad": True}])


def hostile_metadata(rng: random.Random) -> Any:
    kind = rng.randrange(5)
    if kind == 0:
        return hostile(rng)
    pairs = Pairs()
    for _ in range(rng.randint(0, 3)):
        key = rng.choice(["hyperparams", "hyperparams", "step", "format", rng.choice(UNICODE_NAMES)])
        value: Any = hostile_hyperparams(rng) if key == "hyperparams" else rng.choice(UNICODE_NAMES)
        pairs.append((key, value if kind != 1 else hostile(rng)))
    return pairs


# --- mutators: (rng, valid safetensors body) -> body ---------------------------------------------------------------


def m_bitflip(rng: random.Random, body: bytes) -> bytes:
    out = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def m_insert(rng: random.Random, body: bytes) -> bytes:
    i = rng.randrange(len(body) + 1)
    return body[:i] + rng.randbytes(rng.randint(1, 16)) + body[i:]


def m_delete(rng: random.Random, body: bytes) -> bytes:
    i = rng.randrange(len(body))
    return body[:i] + body[i + rng.randint(1, 16) :]


def m_truncate(rng: random.Random, body: bytes) -> bytes:
    return body[: rng.randrange(len(body))]


def m_length_prefix(rng: random.Random, body: bytes) -> bytes:
    n = int.from_bytes(body[:8], "little")
    new = rng.choice(
        [0, 1, 2, n - 1, n + 1, n + 8, len(body), len(body) - 8, 2**32, 2**63, 2**64 - 1, rng.randrange(2**64)]
    )
    return struct.pack("<Q", max(0, new) % 2**64) + body[8:]


def m_header_value(rng: random.Random, body: bytes) -> bytes:
    header, data = split(body)
    names = [n for n in header if n != "__metadata__"]
    target = rng.choice([*names, rng.choice(UNICODE_NAMES)])
    entry = dict(header.get(target, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}))
    for _ in range(rng.randint(1, 2)):
        entry[rng.choice(["dtype", "shape", "data_offsets", "dtype", "shape", "data_offsets", "extra"])] = hostile(rng)
    if rng.random() < 0.1:
        del entry[rng.choice(list(entry))]
    header[target] = rng.choice([entry, entry, entry, hostile(rng)])
    return join(header, data)


def m_huge_numbers(rng: random.Random, body: bytes) -> bytes:
    header, data = split(body)
    name = rng.choice([n for n in header if n != "__metadata__"])
    huge = rng.choice(
        [
            "18446744073709551616",
            "9223372036854775808",
            "1e308",
            "-1",
            "-9223372036854775808",
            "1" + "0" * 400,
            "1" + "0" * 5000,
            "4611686018427387904",
            "-0",
            "1e999",
        ]
    )
    key = rng.choice(["shape", "data_offsets"])
    values = [Raw(str(v)) for v in header[name][key]]
    values[rng.randrange(len(values))] = Raw(huge)
    header[name][key] = values
    return join(header, data)


def m_nan_data(rng: random.Random, body: bytes) -> bytes:
    header, data = split(body)
    floats = np.frombuffer(data, dtype="<f4").copy()
    for _ in range(rng.randint(1, 3)):
        floats[rng.randrange(len(floats))] = rng.choice([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, -0.0])
    return join(header, floats.tobytes())


def m_duplicate_keys(rng: random.Random, body: bytes) -> bytes:
    header, data = split(body)
    pairs = Pairs(header.items())
    kind = rng.randrange(4)
    if kind == 0:
        pairs.append(rng.choice(list(pairs)))  # the same tensor twice
    elif kind == 1:
        pairs.extend([("__metadata__", {"a": "1"}), ("__metadata__", {"a": "2"})])
    elif kind == 2:
        name, entry = rng.choice([p for p in pairs if p[0] != "__metadata__"])
        pairs.append((name, Pairs([*entry.items(), ("dtype", "F16")])))
    else:
        pairs.insert(0, (pairs[-1][0], {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}))
    return join(pairs, data)


def m_unicode_names(rng: random.Random, body: bytes) -> bytes:
    header, data = split(body)
    names = [n for n in header if n != "__metadata__"]
    renamed = {rng.choice(names): rng.choice(UNICODE_NAMES)}
    new = Pairs((renamed.get(k, k), v) for k, v in header.items())
    return join(new, data, ascii_only=rng.random() < 0.5)


def m_metadata(rng: random.Random, body: bytes) -> bytes:
    header, data = split(body)
    header["__metadata__"] = hostile_metadata(rng)
    return join(header, data)


def m_reencode(rng: random.Random, body: bytes) -> bytes:
    """A well-formed body that may not fit the session: other dtypes, shapes, names, subsets, order."""
    ts: dict[str, Any] = dict(grads(rng.randrange(1000)))
    kind = rng.randrange(5)
    if kind == 0:
        del ts[rng.choice(list(ts))]
    elif kind == 1:
        ts[rng.choice(["x", "w2", "W"])] = np.ones(3, np.float32)
    elif kind == 2:
        name = rng.choice(list(ts))
        ts[name] = ts[name].reshape(-1) if ts[name].ndim > 1 else ts[name].reshape(1, -1)
    elif kind == 3:
        ts = dict(reversed(list(ts.items())))
    dtype = rng.choice([None, "F16", "BF16", "F64", "I32", "U8", "BOOL", "I64", {"w": "F16"}, {"b": "BF16"}])
    metadata = {"hyperparams": hostile_hyperparams(rng)} if rng.random() < 0.3 else None
    return wire.encode(ts, metadata, dtype=dtype)


def m_garbage(rng: random.Random, body: bytes) -> bytes:
    return rng.choice(
        [
            b"",
            b"\x00" * 8,
            b"{}",
            rng.randbytes(rng.randint(1, 64)),
            b"\xff" * 8 + body[8:],
            struct.pack("<Q", 2) + b"{}",
            struct.pack("<Q", 2) + b"[]",
            struct.pack("<Q", 4) + b"null",
        ]
    )


SAFETENSORS_MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "bitflip": m_bitflip, "insert": m_insert, "delete": m_delete, "truncate": m_truncate,
    "length-prefix": m_length_prefix, "header-value": m_header_value, "huge-number": m_huge_numbers,
    "nan-data": m_nan_data, "duplicate-key": m_duplicate_keys, "unicode-name": m_unicode_names,
    "metadata": m_metadata, "reencode": m_reencode, "garbage": m_garbage,
}  # fmt: skip


def mutate_json(rng: random.Random, obj: Any, depth: int = 0) -> Any:
    """A copy of a JSON structure with one part replaced, removed or added (values as Raw literals)."""
    if isinstance(obj, dict) and obj and depth < 4 and rng.random() < 0.7:
        obj = dict(obj)
        key = rng.choice(list(obj))
        action = rng.randrange(6)
        if action == 0:
            del obj[key]
        elif action == 1:
            obj[rng.choice(UNICODE_NAMES + ["extra", "__metadata__"])] = hostile(rng)
        elif action == 2:
            return Pairs([*obj.items(), (key, hostile(rng))])
        else:
            obj[key] = mutate_json(rng, obj[key], depth + 1)
        return obj
    if isinstance(obj, list) and obj and depth < 4 and rng.random() < 0.7:
        obj = list(obj)
        i = rng.randrange(len(obj))
        action = rng.randrange(4)
        if action == 0:
            del obj[i]
        elif action == 1:
            obj.insert(i, hostile(rng))
        else:
            obj[i] = mutate_json(rng, obj[i], depth + 1)
        return obj
    return hostile(rng)


def json_step_body(rng: random.Random) -> bytes:
    obj: Any = json_tensors(grads(rng.randrange(100)))
    if rng.random() < 0.3:
        obj["__metadata__"] = {"hyperparams": hostile_hyperparams(rng)}
    for _ in range(rng.randint(1, 3)):
        obj = mutate_json(rng, obj)
    return dump(obj, ascii_only=rng.random() < 0.5).encode("utf-8", "surrogatepass")


# --- steps ---------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """The session under fire and what it held after the last accepted request."""

    harness: Harness
    sid: str
    state: bytes = b""

    def refresh(self) -> None:
        self.state = self.harness.params_state(self.sid)


@pytest.fixture(scope="module")
def target(hostile_server: Server) -> Iterator[Target]:
    h = Harness(hostile_server)
    r = h.send("POST", "/v1/sessions", json={**CONFIG, "params": json_tensors(grads(0))})
    assert not isinstance(r, str) and r.status_code == 201, r
    t = Target(h, r.json()["id"])
    t.refresh()
    yield t
    h.close()


def step_faults(
    t: Target, body: bytes, ctype: str = ST, query: str = "", headers: Mapping[str, str] | None = None
) -> list[str]:
    """Send a step; what went wrong (empty: nothing). The session must be unchanged after anything but a 2xx."""
    r = t.harness.send(
        "POST", f"/v1/sessions/{t.sid}/step{query}", content=body, headers={"content-type": ctype, **(headers or {})}
    )
    faults = answer_faults(r)
    now = t.harness.params_state(t.sid)
    if (isinstance(r, str) or r.status_code >= 300) and now != t.state:
        faults.append(f"the session changed after {r if isinstance(r, str) else r.status_code}")
    t.state = now
    return faults


@PROPERTY
@given(data=st.data())
def test_byte_mutations_of_a_step(target: Target, data: st.DataObject) -> None:
    body = bytearray(VALID_STEP)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]), label="kind")
        i = data.draw(st.integers(0, max(0, len(body) - 1)), label="at")
        if kind == "flip" and body:
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "insert":
            body[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del body[i : i + data.draw(st.integers(1, 16))]
        elif kind == "truncate":
            del body[i:]
        else:
            chunk = data.draw(st.binary(min_size=1, max_size=8))
            body[i : i + len(chunk)] = chunk
    assert not step_faults(target, bytes(body))


PY_HOSTILE = st.sampled_from(
    [
        10**400,
        2**63,
        2**64,
        -1,
        -(2**63) - 1,
        math.nan,
        math.inf,
        -math.inf,
        1e308,
        1.5,
        True,
        None,
        "x",
        "\ud800",
        [],
        {},
    ]
)
HUGE_INTS = st.sampled_from(
    [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -(2**63) - 1, 10**400, 2**48, 2**48 + 1]
)
JSON_SCALARS = (
    PY_HOSTILE
    | st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | HUGE_INTS
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E5M2", "f32", ""]) | JSON_VALUES
SHAPES_ST = st.lists(st.integers(0, 16) | HUGE_INTS, max_size=5) | JSON_VALUES
OFFSETS = st.tuples(st.integers(0, 200) | HUGE_INTS, st.integers(0, 200) | HUGE_INTS).map(list) | JSON_VALUES
NAMES = st.sampled_from(["w", "b", "c", "\ud800", "\udfff", "", "w" * 1100]) | st.text(max_size=10)
ENTRY = st.fixed_dictionaries({}, optional={"dtype": DTYPES, "shape": SHAPES_ST, "data_offsets": OFFSETS}) | JSON_VALUES
OVERFLOWING = st.sampled_from([10**400, -(10**400), 2**1024, math.nan, math.inf])  # beyond any float64
HYPERPARAM_VALUES = (
    OVERFLOWING
    | PY_HOSTILE
    | st.floats(0, 1)
    | st.lists(OVERFLOWING | PY_HOSTILE | st.floats(0, 1), max_size=3)
    | JSON_SCALARS
)
ADAM_NAMES = st.sampled_from(["lr", "betas", "eps", "weight_decay", "eps_root", "amsgrad", "maximize"])
HYPERPARAM_TEXT = (
    st.dictionaries(ADAM_NAMES, HYPERPARAM_VALUES, max_size=3).map(json.dumps)
    | st.lists(
        st.none() | st.dictionaries(st.sampled_from(HYPERPARAM_NAMES), HYPERPARAM_VALUES, max_size=2), max_size=3
    ).map(json.dumps)
    | JSON_VALUES.map(json.dumps)
    | st.text(max_size=20)
)
METADATA = (
    st.dictionaries(st.sampled_from(["hyperparams", "step", "x"]) | st.text(max_size=8), HYPERPARAM_TEXT, max_size=3)
    | JSON_VALUES
)


@PROPERTY
@given(
    entries=st.lists(st.tuples(NAMES, ENTRY), max_size=4),
    metadata=st.none() | METADATA,
    data=st.binary(max_size=96) | st.just(VALID_STEP[8 + int.from_bytes(VALID_STEP[:8], "little") :]),
)
def test_rewritten_step_headers(target: Target, entries: list[tuple[str, Any]], metadata: Any, data: bytes) -> None:
    pairs = Pairs(entries)
    if metadata is not None:
        pairs.insert(0, ("__metadata__", metadata))
    assert not step_faults(target, join(pairs, data))


@PROPERTY
@given(
    metadata=st.fixed_dictionaries({"hyperparams": HYPERPARAM_TEXT}, optional={"step": st.text(max_size=4)}) | METADATA,
    seed=st.integers(0, 100),
    partial=st.booleans(),
)
def test_step_metadata_and_hyperparams(target: Target, metadata: Any, seed: int, partial: bool) -> None:
    ts = grads(seed)
    if partial:
        del ts["c"]
    header, data = split(wire.encode(ts))
    header["__metadata__"] = metadata
    assert not step_faults(target, join(header, data), query="?missing=skip" if partial else "")


TENSOR_JSON = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8"]) | JSON_VALUES,
        "shape": SHAPES_ST,
        "data": st.lists(JSON_SCALARS, max_size=14) | JSON_VALUES,
    },
)


@PROPERTY
@given(
    body=st.dictionaries(NAMES | st.just("__metadata__"), TENSOR_JSON | JSON_VALUES, max_size=4) | JSON_VALUES,
    content_type=st.sampled_from([JSON, JSON, "application/json; charset=latin-1", ST, "text/plain", ""]),
)
def test_json_step_bodies(target: Target, body: Any, content_type: str) -> None:
    assert not step_faults(target, json.dumps(body).encode(), ctype=content_type)


@PROPERTY
@given(
    headers=st.dictionaries(
        st.sampled_from(["if-match", "idempotency-key", "accept", "prefer", "content-type", "x-request-id"]),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
        max_size=4,
    ),
    query=st.sampled_from(
        ["", "?missing=skip", "?missing=error", "?missing=", "?missing=SKIP", "?missing=skip&missing=x"]
    ),
    seed=st.integers(0, 100),
)
def test_step_headers_and_query(target: Target, headers: dict[str, str], query: str, seed: int) -> None:
    headers = {k: v.strip() for k, v in headers.items()}
    headers.setdefault("content-type", ST)
    assert not step_faults(
        target, wire.encode(grads(seed)), ctype=headers.pop("content-type"), query=query, headers=headers
    )


def test_seeded_step_mutations(target: Target) -> None:
    """A few thousand mutations of valid step bodies, safetensors and JSON; every violation reported at once."""
    rng = random.Random(20240531)
    faults: Counter[str] = Counter()
    examples: dict[str, str] = {}
    classes = [*SAFETENSORS_MUTATORS, "json"]
    for i in range(3000):
        kind = classes[i % len(classes)]
        if kind == "json":
            body, ctype = json_step_body(rng), JSON
        else:
            body, ctype = SAFETENSORS_MUTATORS[kind](rng, VALID_STEP), ST
        if rng.random() < 0.05:
            ctype = rng.choice([JSON, ST, "application/octet-stream"])
        query = "?missing=skip" if rng.random() < 0.2 else ""
        MUTATIONS[f"step:{kind}"] += 1
        for fault in step_faults(target, body, ctype, query):
            key = f"{kind}: {fault.split(':')[0][:80]}"
            faults[key] += 1
            examples.setdefault(key, f"{fault[:300]} <- {ctype} {query} {body[:300]!r}")
    assert not faults, "\n".join(f"{n} x {k}\n    e.g. {examples[k]}" for k, n in faults.most_common())


# --- creates -------------------------------------------------------------------------------------------------------


def follow_up_faults(h: Harness, sid: str) -> list[str]:
    """An accepted session must then serve every operation without a 5xx (three steps: schedules move)."""
    faults = []
    info = h.send("GET", f"/v1/sessions/{sid}")
    faults += [f"info after accept: {f}" for f in answer_faults(info)]
    names = info.json().get("tensors", {}) if isinstance(info, httpx.Response) and info.status_code == 200 else {}
    body = json.dumps(json_tensors({n: np.full(t["shape"], 0.5, np.float32) for n, t in names.items()})).encode()
    for k in range(3):
        r = h.send("POST", f"/v1/sessions/{sid}/step", content=body, headers={"content-type": JSON})
        faults += [f"step {k + 1} after accept: {f}" for f in answer_faults(r)]
        faults += [f"info after step {k + 1}: {f}" for f in answer_faults(h.send("GET", f"/v1/sessions/{sid}"))]
    for path in ("/params", "/checkpoint"):
        faults += [f"GET {path} after accept: {f}" for f in answer_faults(h.send("GET", f"/v1/sessions/{sid}{path}"))]
    return faults


VALID_CREATE_JSON: dict[str, Any] = {**CONFIG, "params": json_tensors(grads(0))}
VALID_CREATE_ST = wire.encode(grads(0), {"config": json.dumps(CONFIG)})


def create_faults(h: Harness, body: bytes, ctype: str) -> list[str]:
    """POST a create; 4xx: nothing left behind; 2xx: the session works, then it is deleted."""
    listing, files = h.listing(), h.files()
    r = h.send("POST", "/v1/sessions", content=body, headers={"content-type": ctype})
    faults = answer_faults(r)
    if isinstance(r, httpx.Response) and r.status_code == 201:
        sid = r.json()["id"]
        faults += follow_up_faults(h, sid)
        deleted = h.send("DELETE", f"/v1/sessions/{sid}")
        faults += [f"delete: {f}" for f in answer_faults(deleted)]
    elif h.listing() != listing or h.files() != files:
        faults.append(
            f"half-created: a refused create ({r if isinstance(r, str) else r.status_code}) left "
            f"{sorted(set(h.listing()) - set(listing))} {sorted(set(h.files()) - set(files))}"
        )
        for sid in set(h.listing()) - set(listing):
            h.send("DELETE", f"/v1/sessions/{sid}")
    return faults


@pytest.fixture(scope="module")
def harness(hostile_server: Server) -> Iterator[Harness]:
    h = Harness(hostile_server)
    yield h
    h.close()


CONFIG_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "optimizer": st.sampled_from(["adam", "adamw", "sgd", "rmsprop", "ADAM", "lion"]) | JSON_VALUES,
        "hyperparams": st.dictionaries(st.sampled_from(HYPERPARAM_NAMES), JSON_VALUES, max_size=3) | JSON_VALUES,
        "param_groups": st.lists(
            st.dictionaries(
                st.sampled_from(["params", "lr", "momentum", "x"]),
                st.lists(NAMES, max_size=3) | JSON_VALUES,
                max_size=3,
            ),
            max_size=3,
        )
        | JSON_VALUES,
        "nonfinite": st.sampled_from(["error", "skip"]) | JSON_VALUES,
        "max_grad_norm": JSON_SCALARS,
        "schedule": st.fixed_dictionaries(
            {"name": st.sampled_from(["constant", "linear_warmup", "cosine", "step", "x"])},
            optional={k: JSON_SCALARS for k in ("warmup_steps", "total_steps", "min_lr_ratio", "step_size", "gamma")},
        )
        | JSON_VALUES,
        "accumulate": JSON_SCALARS,
        "id": st.text(max_size=20) | JSON_SCALARS,
        "params": st.dictionaries(NAMES, TENSOR_JSON, max_size=3) | st.just(VALID_CREATE_JSON["params"]) | JSON_VALUES,
    },
)


@PROPERTY
@given(config=CONFIG_VALUES, as_safetensors=st.booleans())
def test_hostile_create_bodies(harness: Harness, config: dict[str, Any], as_safetensors: bool) -> None:
    if as_safetensors:
        config.pop("params", None)
        body, ctype = wire.encode(grads(0), {"config": json.dumps(config)}), ST
    else:
        body, ctype = json.dumps(config).encode(), JSON
    assert not create_faults(harness, body, ctype)


def test_seeded_create_mutations(harness: Harness) -> None:
    rng = random.Random(7)
    faults: Counter[str] = Counter()
    examples: dict[str, str] = {}
    classes = ["json", "json-config", *SAFETENSORS_MUTATORS, "st-config"]
    for i in range(500):
        kind = classes[i % len(classes)]
        if kind == "json":
            body, ctype = dump(mutate_json(rng, VALID_CREATE_JSON)).encode("utf-8", "surrogatepass"), JSON
        elif kind == "json-config":
            obj = copy.deepcopy(VALID_CREATE_JSON)
            obj[
                rng.choice(
                    [
                        "optimizer",
                        "hyperparams",
                        "param_groups",
                        "nonfinite",
                        "max_grad_norm",
                        "schedule",
                        "accumulate",
                        "id",
                    ]
                )
            ] = rng.choice([hostile(rng), mutate_json(rng, CONFIG)])
            if rng.random() < 0.3:
                obj["schedule"] = {"name": "step", "step_size": 1, "gamma": hostile(rng)}
            body, ctype = dump(obj).encode("utf-8", "surrogatepass"), JSON
        elif kind == "st-config":
            config = mutate_json(rng, CONFIG)
            body, ctype = wire.encode(grads(0), {"config": dump(config)}), ST
        else:
            body, ctype = SAFETENSORS_MUTATORS[kind](rng, VALID_CREATE_ST), ST
        MUTATIONS[f"create:{kind}"] += 1
        for fault in create_faults(harness, body, ctype):
            key = f"{kind}: {fault.split(':')[0][:80]}"
            faults[key] += 1
            examples.setdefault(key, f"{fault[:300]} <- {body[:400]!r}")
    assert not faults, "\n".join(f"{n} x {k}\n    e.g. {examples[k]}" for k, n in faults.most_common())


# --- checkpoint imports --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(harness: Harness) -> tuple[str, bytes]:
    """(id of a session with some history, its checkpoint): accumulating, with idempotency keys and a step."""
    config = {**CONFIG, "accumulate": 2}
    r = harness.send("POST", "/v1/sessions", json={**config, "params": json_tensors(grads(0))})
    assert isinstance(r, httpx.Response) and r.status_code == 201
    sid = r.json()["id"]
    for k in range(3):
        r = harness.send(
            "POST",
            f"/v1/sessions/{sid}/step",
            content=VALID_STEP,
            headers={"content-type": ST, "idempotency-key": f"key-{k}"},
        )
        assert isinstance(r, httpx.Response) and r.status_code in (200, 202), r
    body = harness.full_state(sid)
    assert body is not None and "pending" in wire.parse(body).metadata
    return sid, body


def checkpoint_metadata_rewrite(rng: random.Random, body: bytes) -> bytes:
    """One or two metadata entries of a checkpoint replaced by hostile JSON text (or removed)."""
    header, data = split(body)
    meta = dict(header["__metadata__"])
    for _ in range(rng.randint(1, 2)):
        key = rng.choice(
            [
                "config",
                "step",
                "tensor_steps",
                "counters",
                "idempotency_keys",
                "pending",
                "token_sha256",
                "format",
                "id",
            ]
        )
        current = meta.get(key)
        if rng.random() < 0.1:
            meta.pop(key, None)
            continue
        try:
            value = json.loads(current) if current is not None and key not in ("format", "id", "token_sha256") else None
        except ValueError:
            value = None
        new = dump(mutate_json(rng, value)) if value is not None and rng.random() < 0.8 else dump(hostile(rng))
        meta[key] = (
            new
            if key not in ("format", "token_sha256", "id") or rng.random() < 0.5
            else rng.choice(["optserve.checkpoint/1", "a" * 64, "A" * 64, "0" * 63, "", "\ud800", "x" * 64])
        )
    header["__metadata__"] = meta
    return join(header, data)


def checkpoint_tensor_rewrite(rng: random.Random, body: bytes) -> bytes:
    st_ = wire.parse(body)
    ts = {e.name: np.array(st_.array(e)) for e in st_.entries}
    name = rng.choice(list(ts))
    kind = rng.randrange(5)
    if kind == 0:
        del ts[name]
    elif kind == 1:
        ts[rng.choice(["params/x", "exp_avg/w", "bogus/w", "noslash", "params/", "/w", "accumulated/w"])] = ts.pop(name)
    elif kind == 2:
        ts[name] = np.ones(rng.choice([(1,), (12,), (4, 3), (0,)]), np.float32)
    elif kind == 3:
        ts[name] = ts[name].copy()
        ts[name].reshape(-1)[0] = rng.choice([np.nan, np.inf, -np.inf])
    dtype = rng.choice([None, None, "F16", "F64", "BF16", "I32"])
    return wire.encode(ts, st_.metadata, dtype=dtype)


CHECKPOINT_MUTATORS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "cp-metadata": checkpoint_metadata_rewrite,
    "cp-metadata2": checkpoint_metadata_rewrite,
    "cp-tensors": checkpoint_tensor_rewrite,
    **SAFETENSORS_MUTATORS,
}


def put_faults(h: Harness, sid: str, body: bytes, original: bytes) -> list[str]:
    """PUT a checkpoint under ``sid`` (an existing session holding ``original``, or a new id); refused: nothing
    changed or created; accepted: the session works, then is put back (or deleted)."""
    before, listing, files = h.full_state(sid), h.listing(), h.files()
    r = h.send("PUT", f"/v1/sessions/{sid}/checkpoint", content=body, headers={"content-type": ST})
    faults = answer_faults(r)
    if isinstance(r, httpx.Response) and r.status_code in (200, 201):
        faults += follow_up_faults(h, sid)
    else:
        if h.full_state(sid) != before:
            faults.append(f"refused import ({r if isinstance(r, str) else r.status_code}) changed or created {sid}")
        if h.listing() != listing:
            faults.append("half-created: the listing changed after a refused import")
    if before is None:
        if h.full_state(sid) is not None:
            h.send("DELETE", f"/v1/sessions/{sid}")
        elif h.files() != files:
            faults.append("half-created: a snapshot was left by a refused import")
    elif h.full_state(sid) != original:
        restored = h.send("PUT", f"/v1/sessions/{sid}/checkpoint", content=original, headers={"content-type": ST})
        assert isinstance(restored, httpx.Response) and restored.status_code == 200, restored
    return faults


COUNTER_NAMES = ["steps_applied", "steps_skipped", "steps_rejected", "replays", "contributions"]
CHECKPOINT_METADATA = {
    "step": JSON_SCALARS.map(json.dumps),
    "tensor_steps": st.lists(JSON_SCALARS | st.integers(0, 3), max_size=4).map(json.dumps),
    "counters": st.dictionaries(
        st.sampled_from([*COUNTER_NAMES, "x"]), JSON_SCALARS | st.integers(0, 9), max_size=3
    ).map(lambda d: json.dumps({**dict.fromkeys(COUNTER_NAMES, 0), **d})),
    "idempotency_keys": st.lists(
        st.tuples(
            st.text(max_size=4) | JSON_SCALARS,
            JSON_SCALARS | st.integers(0, 3),
            st.sampled_from(["applied", "skipped", "accepted", "x"]),
            JSON_SCALARS,
        ).map(list)
        | st.lists(JSON_SCALARS, max_size=5),
        max_size=3,
    ).map(json.dumps),
    "pending": st.fixed_dictionaries(
        {
            "count": JSON_SCALARS | st.just(1),
            "nonfinite": JSON_SCALARS | st.booleans(),
            "present": st.lists(JSON_SCALARS | st.booleans(), max_size=4),
        }
    ).map(json.dumps)
    | JSON_VALUES.map(json.dumps),
    "token_sha256": st.text(alphabet="0123456789abcdefABCDEF", min_size=62, max_size=66) | st.text(max_size=5),
    "format": st.sampled_from(["optserve.checkpoint/1", "optserve.checkpoint/2", ""]),
    "id": st.text(max_size=10),
}
CONFIG_CHANGES = st.fixed_dictionaries(
    {},
    optional={
        "optimizer": st.sampled_from(["adam", "adamw", "sgd", "rmsprop", "lion"]) | JSON_SCALARS,
        "hyperparams": st.dictionaries(st.sampled_from(HYPERPARAM_NAMES), HYPERPARAM_VALUES, max_size=3),
        "param_groups": st.lists(
            st.fixed_dictionaries({"params": st.lists(NAMES, max_size=3) | JSON_VALUES}, optional={"lr": JSON_SCALARS}),
            max_size=3,
        ),
        "nonfinite": st.sampled_from(["error", "skip"]) | JSON_SCALARS,
        "max_grad_norm": JSON_SCALARS,
        "schedule": st.fixed_dictionaries(
            {"name": st.sampled_from(["constant", "linear_warmup", "cosine", "step"])},
            optional={
                k: JSON_SCALARS | st.integers(1, 5)
                for k in ("warmup_steps", "total_steps", "min_lr_ratio", "step_size", "gamma")
            },
        ),
        "accumulate": JSON_SCALARS | st.integers(1, 3),
    },
)


@PROPERTY
@given(data=st.data(), existing=st.booleans())
def test_hostile_checkpoint_metadata(
    harness: Harness, checkpoint: tuple[str, bytes], data: st.DataObject, existing: bool
) -> None:
    sid, original = checkpoint
    header, tensor_data = split(original)
    meta = header["__metadata__"]
    keys = data.draw(st.sets(st.sampled_from([*CHECKPOINT_METADATA, "config"]), min_size=1, max_size=3), label="keys")
    for key in sorted(keys):
        if key == "config":
            meta[key] = json.dumps({**json.loads(meta[key]), **data.draw(CONFIG_CHANGES, label="config")})
        else:
            meta[key] = data.draw(CHECKPOINT_METADATA[key], label=key)
    assert not put_faults(harness, sid if existing else "imported", join(header, tensor_data), original)


def test_seeded_checkpoint_mutations(harness: Harness, checkpoint: tuple[str, bytes]) -> None:
    sid, original = checkpoint
    rng = random.Random(99)
    faults: Counter[str] = Counter()
    examples: dict[str, str] = {}
    classes = list(CHECKPOINT_MUTATORS)
    for i in range(400):
        kind = classes[i % len(classes)]
        body = CHECKPOINT_MUTATORS[kind](rng, original)
        target = sid if i % 2 else f"imported-{i % 3}"
        MUTATIONS[f"checkpoint:{kind}"] += 1
        for fault in put_faults(harness, target, body, original):
            key = f"{kind}: {fault.split(':')[0][:80]}"
            faults[key] += 1
            header = body[8 : 8 + min(int.from_bytes(body[:8], "little"), 900)] if len(body) >= 8 else body
            examples.setdefault(key, f"{fault[:300]} <- {header!r}")
    assert not faults, "\n".join(f"{n} x {k}\n    e.g. {examples[k]}" for k, n in faults.most_common())


# --- known hostile inputs, one by one ------------------------------------------------------------------------------

BIG_INT = "1" + "0" * 400


def _with_metadata(body: bytes, **changes: str) -> bytes:
    header, data = split(body)
    header["__metadata__"] = {**header["__metadata__"], **changes}
    return join(header, data)


def _config_with(body: bytes, **changes: Any) -> str:
    return json.dumps({**json.loads(split(body)[0]["__metadata__"]["config"]), **changes})


KNOWN_STEPS = {
    "hyperparams-lr-huge-int": wire.encode(grads(), {"hyperparams": '{"lr": ' + BIG_INT + "}"}),
    "hyperparams-betas-huge-int": wire.encode(grads(), {"hyperparams": '{"betas": [0.9, ' + BIG_INT + "]}"}),
    "hyperparams-per-group-huge-int": wire.encode(grads(), {"hyperparams": '[null, {"eps": ' + BIG_INT + "}]"}),
    "lone-surrogate-tensor-name": join(
        Pairs([("\ud800", {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})]), b"\x00" * 8
    ),
}


@pytest.mark.parametrize("case", list(KNOWN_STEPS))
def test_known_hostile_steps(target: Target, case: str) -> None:
    assert not step_faults(target, KNOWN_STEPS[case])


@pytest.mark.parametrize(
    "body",
    [b'{"hyperparams": {"lr": ' + BIG_INT.encode() + b"}}", b'{"hyperparams": {"lr": 1' + b"0" * 5000 + b"}}"],
    ids=["lr-huge-int", "int-over-4300-digits"],
)
def test_known_hostile_patches(harness: Harness, target: Target, body: bytes) -> None:
    before = harness.full_state(target.sid)
    r = harness.send("PATCH", f"/v1/sessions/{target.sid}", content=body, headers={"content-type": JSON})
    assert not answer_faults(r)
    assert harness.full_state(target.sid) == before


KNOWN_CREATES = {
    "lr-huge-int": (
        b'{"optimizer": "sgd", "hyperparams": {"lr": '
        + BIG_INT.encode()
        + b'}, "params": '
        + json.dumps(json_tensors(grads(0))).encode()
        + b"}",
        JSON,
    ),
    "group-momentum-huge-int": (
        wire.encode(
            grads(0),
            {"config": '{"optimizer": "sgd", "param_groups": [{"params": ["w"], "momentum": ' + BIG_INT + "}]}"},
        ),
        ST,
    ),
    "step-schedule-gamma-overflows": (
        json.dumps(
            {
                "optimizer": "sgd",
                "schedule": {"name": "step", "step_size": 1, "gamma": 1e200},
                "params": json_tensors(grads(0)),
            }
        ).encode(),
        JSON,
    ),
    "json-int-over-4300-digits": (
        b'{"optimizer": "sgd", "max_grad_norm": 1'
        + b"0" * 5000
        + b', "params": '
        + json.dumps(json_tensors(grads(0))).encode()
        + b"}",
        JSON,
    ),
    "lone-surrogate-tensor-name": (
        join(
            Pairs(
                [("__metadata__", {"config": "{}"}), ("\udc00", {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})]
            ),
            b"\x00" * 4,
        ),
        ST,
    ),
}


@pytest.mark.parametrize("case", list(KNOWN_CREATES))
def test_known_hostile_creates(harness: Harness, case: str) -> None:
    body, ctype = KNOWN_CREATES[case]
    assert not create_faults(harness, body, ctype)


def _with_tensor(body: bytes, name: str, value: float) -> bytes:
    parsed = wire.parse(body)
    ts = {e.name: np.array(parsed.array(e)) for e in parsed.entries}
    ts[name].reshape(-1)[0] = value
    return wire.encode(ts, parsed.metadata)


def known_checkpoints(original: bytes) -> dict[str, bytes]:
    return {
        "accumulated-nan": _with_tensor(original, "accumulated/w", math.nan),
        "counters-string": _with_metadata(original, counters='{"steps_applied": "x"}'),
        "counters-null": _with_metadata(original, counters='{"replays": null}'),
        "counters-nan": _with_metadata(original, counters='{"steps_applied": NaN}'),
        "idempotency-key-step-infinity": _with_metadata(
            original, idempotency_keys='[["k", Infinity, "applied", null]]'
        ),
        "step-beyond-int64": _with_metadata(original, step=str(2**70), tensor_steps=json.dumps([2**70] * 3)),
        "param-group-names-unhashable": _with_metadata(
            original, config=_config_with(original, param_groups=[{"params": [["w"]]}, {"params": ["b", "c"]}])
        ),
        "pending-count-infinity": _with_metadata(
            original, pending='{"count": Infinity, "nonfinite": false, "present": [true, true, true]}'
        ),
        "schedule-gamma-overflows": _with_metadata(
            original,
            config=_config_with(original, schedule={"name": "step", "step_size": 1, "gamma": 1e300}),
            step="5",
            tensor_steps="[5, 5, 5]",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "accumulated-nan",
        "counters-string",
        "counters-null",
        "counters-nan",
        "idempotency-key-step-infinity",
        "step-beyond-int64",
        "param-group-names-unhashable",
        "pending-count-infinity",
        "schedule-gamma-overflows",
    ],
)
@pytest.mark.parametrize("existing", [False, True], ids=["new-id", "replace"])
def test_known_hostile_checkpoints(harness: Harness, checkpoint: tuple[str, bytes], case: str, existing: bool) -> None:
    sid, original = checkpoint
    assert not put_faults(harness, sid if existing else f"known-{case}", known_checkpoints(original)[case], original)


def test_the_fuzzed_sessions_are_still_sound(harness: Harness, target: Target) -> None:
    """After all of it, the session under fire still steps (or refuses a step the hyperparameters the fuzzing left
    would make non-finite), and every value it holds is finite: its checkpoint loads back."""
    r = harness.send("POST", f"/v1/sessions/{target.sid}/step", content=VALID_STEP, headers={"content-type": ST})
    assert isinstance(r, httpx.Response), r
    if r.status_code == 422:
        assert r.json()["type"].endswith("non-finite-result"), r.text
    else:
        assert r.status_code == 200, r.text
        assert math.isfinite(float(r.headers.get("optserve-grad-norm", "nan")))
    cp = harness.send("GET", f"/v1/sessions/{target.sid}/checkpoint")
    assert isinstance(cp, httpx.Response) and cp.status_code == 200
    back = harness.send("PUT", f"/v1/sessions/{target.sid}-sound/checkpoint", content=cp.content,
                        headers={"content-type": ST})  # fmt: skip
    assert isinstance(back, httpx.Response) and back.status_code == 201, back
