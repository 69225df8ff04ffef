"""A session as one safetensors file: everything needed to resume it bit for bit.

Tensors are named ``params/<name>`` and ``<state>/<name>`` (``exp_avg/<name>``, ...), float32, in the session's
layout order, so ``safetensors.numpy.load_file`` shows a checkpoint as plainly as any model file. The metadata
holds the config (with every hyperparameter change folded in), the step counter, each tensor's step number, the
counters and the recent idempotency keys, so a retried step stays exactly-once across an export and import.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import ValidationError

from optserve.client import wire

from .errors import InvalidInput
from .session import Counters, KeyRecord, Pending, Session, SessionConfig

FORMAT = "optserve.checkpoint/1"


def dump_parts(session: Session) -> list[bytes | memoryview]:
    """The checkpoint body as buffers (header first), from a consistent copy taken under the session's lock."""
    with session.lock:
        params = session.params.copy()
        state = {name: buf.copy() for name, buf in session.state.items()}
        pending = session.pending
        if pending is not None:  # contributions already answered 202 travel with the session
            state["accumulated"] = pending.total.copy()
        metadata = {
            "format": FORMAT,
            "id": session.id,
            "config": session.current_config().model_dump_json(),
            "step": str(session.step_count),
            "tensor_steps": json.dumps(session.tensor_steps.tolist()),
            "counters": json.dumps(session.counters.as_dict()),
            "idempotency_keys": json.dumps([[k, r.step, r.outcome, r.grad_norm] for k, r in session.keys.items()]),
        }
        if pending is not None:
            metadata["pending"] = json.dumps(
                {"count": pending.count, "nonfinite": pending.nonfinite, "present": pending.present.tolist()}
            )
    tensors: dict[str, np.ndarray] = {}
    for prefix, flat in [("params", params), *state.items()]:
        for name, view in session.layout.views(flat).items():
            tensors[f"{prefix}/{name}"] = view
    return wire.encode_parts(tensors, metadata)


def dump(session: Session) -> bytes:
    return b"".join(dump_parts(session))


def _meta_json(metadata: dict[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise InvalidInput(f"checkpoint metadata {key!r} is missing or not JSON ({e})") from None


def load(body: bytes | memoryview, session_id: str) -> Session:
    """Rebuild a session from a checkpoint body under ``session_id``. Raises WireError (400) or InvalidInput (422)."""
    st = wire.parse(body)
    meta = st.metadata
    if meta.get("format") != FORMAT:
        raise InvalidInput(
            f"not an optserve checkpoint: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}"
        )
    try:
        config = SessionConfig.model_validate_json(meta.get("config", ""))
    except ValidationError as e:
        raise InvalidInput(f"checkpoint config is invalid: {e}") from None
    tensors = {entry.name: entry for entry in st.entries}
    for entry in st.entries:
        if entry.dtype != "F32":
            raise InvalidInput(f"checkpoint tensor {entry.name!r} has dtype {entry.dtype}, expected F32")
    # The groups list every tensor in layout order; follow them, whatever order the header has.
    order = [n for g in config.param_groups for n in g.params]
    missing = [n for n in order if f"params/{n}" not in tensors]
    if missing:
        raise InvalidInput(f"checkpoint config names tensors it does not carry: {missing}")
    session = Session(session_id, config, {n: st.array(tensors[f"params/{n}"]) for n in order})
    buffers = dict(session.state)
    if "pending" in meta:
        pending = _meta_json(meta, "pending")
        try:
            present = np.array(pending["present"], dtype=bool)
            session.pending = Pending(
                np.zeros(session.layout.size, np.float32), present, int(pending["count"]), bool(pending["nonfinite"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"checkpoint 'pending' is malformed ({e})") from None
        if present.shape != (len(session.layout.slots),) or not 0 < session.pending.count < config.accumulate:
            raise InvalidInput("checkpoint 'pending' does not fit the session")
        buffers["accumulated"] = session.pending.total
    expected = {f"params/{n}" for n in session.layout.names}
    expected |= {f"{s}/{n}" for s in buffers for n in session.layout.names}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise InvalidInput(f"checkpoint tensors do not match its config: missing {missing}, unexpected {extra}")
    for state_name, flat in buffers.items():
        for slot in session.layout.slots:
            flat[slot.offset : slot.stop] = st.array(tensors[f"{state_name}/{slot.name}"]).reshape(-1)

    step, steps = _meta_json(meta, "step"), _meta_json(meta, "tensor_steps")
    if not isinstance(step, int) or step < 0:
        raise InvalidInput(f"checkpoint step must be a non-negative integer, got {step!r}")
    if not (
        isinstance(steps, list)
        and len(steps) == len(session.layout.slots)
        and all(isinstance(s, int) and 0 <= s <= step for s in steps)
    ):
        raise InvalidInput("checkpoint tensor_steps must list one step number per tensor, none above the step")
    session.step_count = step
    session.tensor_steps[:] = steps
    counters = _meta_json(meta, "counters") if "counters" in meta else {}
    try:
        session.counters = Counters(**counters)
        for key, at, outcome, norm in _meta_json(meta, "idempotency_keys") if "idempotency_keys" in meta else []:
            if outcome not in ("applied", "skipped", "accepted"):
                raise ValueError(f"unknown outcome {outcome!r}")
            session.keys[str(key)] = KeyRecord(int(at), outcome, None if norm is None else float(norm))
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"checkpoint counters or idempotency keys are malformed ({e})") from None
    return session
