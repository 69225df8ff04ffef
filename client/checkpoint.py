"""The checkpoint file format: a session as one safetensors file, readable by any safetensors tool.

Tensors are float32, named ``params/<name>`` and ``<state>/<name>`` (``exp_avg/<name>``, ``momentum_buffer/<name>``,
``accumulated/<name>`` for contributions awaiting the next step), in the session's layout order. The metadata holds:

- ``format``: ``optserve.checkpoint/1``; ``id``: the session id it was taken from;
- ``config``: the session config as JSON, with ``param_groups`` listing every tensor in layout order;
- ``step`` and ``tensor_steps`` (one step number per tensor, layout order);
- ``counters``, ``idempotency_keys`` (``[key, step, outcome, grad_norm]``) and, while contributions are pending,
  ``pending`` (``{"count", "nonfinite", "present"}``);
- ``token_sha256``: the digest of the session's bearer token, when it has one (the token itself is never stored);
- ``momentum_started`` (SGD): per tensor, whether its momentum buffer holds a value (torch creates it at the tensor's
  first step with momentum, which need not be its first step). Without it: every stepped tensor of a group with
  momentum.

The server writes and reads it; the client builds one to load a torch ``state_dict`` into a session. Both use this
module, so the format is defined once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import wire

FORMAT = "optserve.checkpoint/1"


class CheckpointError(ValueError):
    """A well-formed safetensors file whose content is not a valid checkpoint."""


@dataclass
class Checkpoint:
    """The content of a checkpoint file (arrays are float32)."""

    config: dict[str, Any]
    step: int
    tensor_steps: list[int]
    params: dict[str, np.ndarray]
    state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    idempotency_keys: list[list[Any]] = field(default_factory=list)
    pending: dict[str, Any] | None = None
    session_id: str | None = None
    token_sha256: str | None = None  # the digest of the session's bearer token (never the token)
    momentum_started: list[bool] | None = None  # SGD: per tensor, whether its momentum buffer holds a value

    @property
    def names(self) -> list[str]:
        """Tensor names in layout order (the order of the config's parameter groups; a shard's: those it holds)."""
        names = [n for g in self.config.get("param_groups", []) for n in g["params"]]
        return names if self.config.get("shard") is None else shard_names(names, self.config["shard"])


def encode_parts(cp: Checkpoint) -> list[bytes | memoryview]:
    """The checkpoint as safetensors buffers (header first), tensors in layout order."""
    metadata = {
        "format": FORMAT,
        "config": json.dumps(cp.config),
        "step": str(cp.step),
        "tensor_steps": json.dumps(cp.tensor_steps),
        "counters": json.dumps(cp.counters),
        "idempotency_keys": json.dumps(cp.idempotency_keys),
    }
    if cp.session_id is not None:
        metadata["id"] = cp.session_id
    if cp.pending is not None:
        metadata["pending"] = json.dumps(cp.pending)
    if cp.token_sha256 is not None:
        metadata["token_sha256"] = cp.token_sha256
    if cp.momentum_started is not None:
        metadata["momentum_started"] = json.dumps(cp.momentum_started)
    tensors: dict[str, np.ndarray] = {}
    for prefix, arrays in [("params", cp.params), *cp.state.items()]:
        for name in cp.names:
            tensors[f"{prefix}/{name}"] = arrays[name]
    return wire.encode_parts(tensors, metadata, dtype="float32")


def encode(cp: Checkpoint) -> bytes:
    return b"".join(encode_parts(cp))


def _json(metadata: dict[str, str], key: str, default: Any = None) -> Any:
    if key not in metadata:
        if default is not None:
            return default
        raise CheckpointError(f"checkpoint metadata {key!r} is missing")
    try:
        return wire.loads(metadata[key], f"checkpoint metadata {key!r}")
    except wire.WireError as e:
        raise CheckpointError(str(e)) from None


MAX_COUNT = 1 << 62


def _count(value: Any) -> bool:
    """A non-negative integer that fits the int64 counters it will be stored in."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _key_record(record: Any) -> bool:
    if not (isinstance(record, list) and len(record) == 4):
        return False
    key, step, outcome, norm = record
    norm_ok = norm is None or (isinstance(norm, float) and math.isfinite(norm)) or (_count(norm))
    return isinstance(key, str) and _count(step) and outcome in ("applied", "skipped", "accepted") and norm_ok


def covers(offset: int, size: int, lo: int, hi: int, index: int) -> bool:
    """Whether shard ``index``, the range ``lo:hi`` of a session's flat buffers, holds a piece of the tensor at
    ``offset`` with ``size`` elements (an empty tensor belongs to shard 0)."""
    return offset < hi and offset + size > lo if size else index == 0


def shard_names(names: list[str], shard: object) -> list[str]:
    """Of ``names``, those a shard holds pieces of (``shard``: its config's description, see the server's
    ``ShardOf``)."""
    try:
        assert isinstance(shard, dict)
        lo, hi, index = int(shard["lo"]), int(shard["hi"]), int(shard["index"])
        inside, offset = set(), 0
        for name, shape in zip(shard["names"], shard["shapes"], strict=True):
            size = math.prod(int(d) for d in shape)
            if covers(offset, size, lo, hi, index):
                inside.add(name)
            offset += size
    except (AssertionError, KeyError, TypeError, ValueError):
        raise CheckpointError("checkpoint config 'shard' is malformed") from None
    return [n for n in names if n in inside]


def decode(body: bytes | bytearray | memoryview) -> Checkpoint:
    """Read a checkpoint. Raises WireError for a malformed file and CheckpointError for wrong content."""
    st = wire.parse(body)
    meta = st.metadata
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"not an optserve checkpoint: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}"
        )
    config = _json(meta, "config")
    if not isinstance(config, dict) or not isinstance(config.get("param_groups"), list):
        raise CheckpointError("checkpoint config must be an object with param_groups")
    try:
        names = [n for g in config["param_groups"] for n in g["params"]]
    except (TypeError, KeyError):
        raise CheckpointError("checkpoint param_groups must each list their tensors under 'params'") from None
    if not all(isinstance(n, str) for n in names):
        raise CheckpointError("checkpoint param_groups must name their tensors with strings")
    if config.get("shard") is not None:  # a shard of a session on the Ray store: it holds pieces of some tensors
        names = shard_names(names, config["shard"])
    groups: dict[str, dict[str, np.ndarray]] = {}
    for entry in st.entries:
        if entry.dtype != "F32":
            raise CheckpointError(f"checkpoint tensor {entry.name!r} has dtype {entry.dtype}, expected F32")
        prefix, sep, name = entry.name.partition("/")
        if not sep:
            raise CheckpointError(f"checkpoint tensor {entry.name!r} is not named <buffer>/<tensor>")
        array = st.array(entry)
        if not np.isfinite(array).all():
            raise CheckpointError(f"checkpoint tensor {entry.name!r} contains NaN or infinity")
        groups.setdefault(prefix, {})[name] = array
    for prefix, arrays in groups.items():
        if set(arrays) != set(names) or len(names) != len(set(names)):
            missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
            raise CheckpointError(
                f"checkpoint {prefix!r} tensors do not match its config: missing {missing}, unexpected {extra}"
            )
    if "params" not in groups:
        raise CheckpointError("checkpoint has no params/<name> tensors")
    step, steps = _json(meta, "step"), _json(meta, "tensor_steps")
    if not _count(step):
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if not (isinstance(steps, list) and len(steps) == len(names) and all(_count(s) and s <= step for s in steps)):
        raise CheckpointError("checkpoint tensor_steps must list one step number per tensor, none above the step")
    counters = _json(meta, "counters", {})
    keys = _json(meta, "idempotency_keys", [])
    if not isinstance(counters, dict) or not all(isinstance(k, str) and _count(v) for k, v in counters.items()):
        raise CheckpointError("checkpoint counters must be an object of non-negative integers")
    if not isinstance(keys, list) or not all(_key_record(k) for k in keys):
        raise CheckpointError("checkpoint idempotency_keys must be a list of [key, step, outcome, grad_norm]")
    pending = _json(meta, "pending") if "pending" in meta else None
    if pending is not None and not (
        isinstance(pending, dict)
        and _count(pending.get("count"))
        and isinstance(pending.get("nonfinite"), bool)
        and isinstance(pending.get("present"), list)
        and all(isinstance(p, bool) for p in pending["present"])
    ):
        raise CheckpointError("checkpoint pending must be {count, nonfinite, present}")
    started = _json(meta, "momentum_started") if "momentum_started" in meta else None
    if started is not None and not (
        isinstance(started, list) and len(started) == len(names) and all(isinstance(s, bool) for s in started)
    ):
        raise CheckpointError("checkpoint momentum_started must list one true or false per tensor")
    params = groups.pop("params")
    token = meta.get("token_sha256")
    if token is not None and not (len(token) == 64 and all(c in "0123456789abcdef" for c in token)):
        raise CheckpointError("checkpoint token_sha256 must be 64 hex digits")
    return Checkpoint(config, step, steps, params, groups, counters, keys, pending, meta.get("id"), token, started)
