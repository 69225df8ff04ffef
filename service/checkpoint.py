"""A session to and from its checkpoint file (the format is defined in :mod:`optserve.client.checkpoint`).

A checkpoint carries everything needed to resume bit for bit: parameters, every state buffer, the config with every
hyperparameter change folded in, step numbers, counters, the recent idempotency keys (so a retried step stays
exactly-once across an export and import) and contributions already answered ``202``.
"""

from __future__ import annotations

import contextlib

import numpy as np
from pydantic import ValidationError

from optserve.client.checkpoint import Checkpoint, CheckpointError, decode, encode_parts

from .errors import InvalidInput
from .hyperparams import SGDHyperparams, optimizer_kind
from .session import Counters, KeyRecord, Pending, Session, SessionConfig

OUTCOMES = ("applied", "skipped", "accepted")
# averages of squares (Adafactor's factors too): never negative
SQUARES = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "row_var", "col_var", "variance"}


def dump_parts(session: Session) -> list[bytes | memoryview]:
    """The checkpoint body as buffers (header first), from a consistent copy taken under the session's lock."""
    return dump_versioned(session)[0]


def dump_versioned(session: Session, held: bool = False) -> tuple[list[bytes | memoryview], int, int]:
    """(checkpoint buffers, the session's version and step they hold), copied under the session's lock (which the
    caller holds already with ``held``)."""
    with contextlib.nullcontext() if held else session.lock:
        version, step = session.version, session.step_count
        buffers = {"params": session.params.copy(), **{k: v.copy() for k, v in session.state.items()}}
        pending = session.pending
        if pending is not None:
            buffers["accumulated"] = pending.total.copy()
        cp = Checkpoint(
            config=session.current_config().model_dump(mode="json"),
            step=session.step_count,
            tensor_steps=session.tensor_steps.tolist(),
            params={},
            counters=session.counters.as_dict(),
            idempotency_keys=[[k, r.step, r.outcome, r.grad_norm] for k, r in session.keys.items()],
            pending=None
            if pending is None
            else {"count": pending.count, "nonfinite": pending.nonfinite, "present": pending.present.tolist()},
            session_id=session.id,
            token_sha256=session.token_digest,
            momentum_started=session.momentum_started.tolist() if session.optimizer == "sgd" else None,
        )
    layouts = {**session.state_layouts, "params": session.layout, "accumulated": session.layout}
    views = {prefix: layouts[prefix].views(flat) for prefix, flat in buffers.items()}
    cp.params = views.pop("params")
    cp.state = views
    return encode_parts(cp), version, step


def dump(session: Session) -> bytes:
    return b"".join(dump_parts(session))


def load(body: bytes | bytearray | memoryview, session_id: str) -> Session:
    """Rebuild a session from a checkpoint body under ``session_id``. Raises WireError (400) or InvalidInput (422)."""
    try:
        cp = decode(body)
        config = SessionConfig.model_validate(cp.config)
    except (CheckpointError, ValidationError) as e:
        raise InvalidInput(f"invalid checkpoint: {e}") from None
    session = Session(session_id, config, {n: cp.params[n] for n in cp.names})
    # Buffers the config steps with must be there; others the optimizer keeps may be too (switched off since).
    buffers, known = set(cp.state) - {"accumulated"}, set(optimizer_kind(session.optimizer).buffers)
    if not set(session.state) <= buffers <= known or ("accumulated" in cp.state) != (cp.pending is not None):
        expected = sorted(session.state) + (["accumulated"] if cp.pending is not None else [])
        raise InvalidInput(f"checkpoint state buffers {sorted(cp.state)} do not match its config ({expected})")
    session.hold_buffers(sorted(buffers))
    try:
        if cp.pending is not None:
            present = np.array(cp.pending["present"], dtype=bool)
            session.pending = Pending(
                np.zeros(session.layout.size, np.float32),
                present,
                int(cp.pending["count"]),
                bool(cp.pending["nonfinite"]),
            )
            if present.shape != (len(session.layout.slots),) or not 0 < session.pending.count < config.accumulate:
                raise ValueError("'pending' does not fit the session")
        session.counters = Counters(**cp.counters)
        for key, at, outcome, norm in cp.idempotency_keys:
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}")
            session.keys[str(key)] = KeyRecord(int(at), outcome, None if norm is None else float(norm))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise InvalidInput(
            f"checkpoint counters, idempotency keys or pending contributions are malformed ({e})"
        ) from None
    if session.pending is not None:
        session.pending.keys = [k for k, r in session.keys.items() if r.outcome == "accepted"]
    targets = {**session.state, **({"accumulated": session.pending.total} if session.pending else {})}
    for buffer_name, flat in targets.items():
        arrays = cp.state[buffer_name]
        layout = session.layout if buffer_name == "accumulated" else session.state_layouts[buffer_name]
        for slot in layout.slots:  # each buffer in its algorithm's shape (the parameter's, for elementwise state)
            if arrays[slot.name].shape != slot.shape:
                raise InvalidInput(
                    f"checkpoint {buffer_name}/{slot.name} has shape {list(arrays[slot.name].shape)}, "
                    f"{session.optimizer} keeps {list(slot.shape)} for params/{slot.name} of shape "
                    f"{list(session.layout.slots[session.layout.index[slot.name]].shape)}"
                )
            flat[slot.offset : slot.stop] = arrays[slot.name].reshape(-1)
    for name in SQUARES & set(session.state):
        if (session.state[name] < 0).any():
            raise InvalidInput(f"checkpoint {name} holds negative values: no optimizer state has them")
    session.step_count = cp.step
    session.tensor_steps[:] = cp.tensor_steps
    if session.optimizer == "sgd":
        if cp.momentum_started is not None:
            started = np.array(cp.momentum_started, dtype=bool)
        else:  # written before momentum could change: every stepped tensor of a group with momentum has its buffer
            on = [isinstance(g.hp, SGDHyperparams) and g.hp.momentum != 0 for g in session.groups]
            started = np.array([on[s.group] for s in session.layout.slots], dtype=bool)
        session.momentum_started[:] = started & (session.tensor_steps > 0) & ("momentum_buffer" in session.state)
    session.token_digest = cp.token_sha256
    session.bounds = None  # the state is not the zeros they were computed for: read the magnitudes at the first step
    return session
