"""Sharded sessions: one session's flat buffers cut into contiguous ranges, each range an ordinary session.

A session created with ``"shards": k`` on the Ray store is held as k shard sessions ``<id>#0`` ... ``<id>#<k-1>``
on (where there are k) k hosts. Shard ``j`` holds the range ``lo:hi`` of the whole session's flat buffers, whose
order is the whole session's layout (tensors by parameter group, as :class:`~optserve.service.layout.FlatLayout`
orders them); a range may cut a tensor, as PS-Lite and BytePS split key ranges. A shard's tensors are the pieces of
the whole session's tensors its range covers, 1-D, under the same names, so a shard is a :class:`Session` like any
other: its groups are the whole session's (see ``build_groups``), its checkpoint and snapshot are ordinary files, and
its state per tensor (step numbers, SGD's momentum flags) is that of the tensors it holds pieces of.

Only an elementwise algorithm (its registry entry says so: not NAdam, whose ``mu_product`` is per tensor, nor
Adafactor, whose state is factored and whose step reads whole tensors) can be sharded; the others are refused (and
``OPTSERVE_SHARD_BYTES`` leaves their sessions whole). An elementwise update rule stepping each range with the whole
gradient's norm (clipping) and the same step numbers and hyperparameters gives bit for bit the parameters the
unsharded session would have. This module is the arithmetic of it: the ranges, each shard's pieces of a flat buffer,
and a whole session to and from its shards (checkpoints are always of the whole session)."""

from __future__ import annotations

import numpy as np

from optserve.client.checkpoint import covers

from .algorithms import get
from .errors import InvalidInput
from .layout import FlatLayout
from .session import Counters, Session, SessionConfig, ShardOf, build_groups


def ranges(total: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ranges of ``0:total``, sizes differing by one at most."""
    if not 1 <= count <= max(total, 1):
        raise InvalidInput(f"a session of {total} parameters cannot be split into {count} shards")
    base, extra = divmod(total, count)
    out, lo = [], 0
    for j in range(count):
        hi = lo + base + (1 if j < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def whole_layout(config: SessionConfig, names: list[str], shapes: list[tuple[int, ...]]) -> FlatLayout:
    """The unsharded session's layout for these tensors (ordered by group as the session would order them)."""
    unsharded = config.model_copy(update={"shard": None})
    _, groups = build_groups(unsharded, names)
    group_of = {n: g.index for g in groups for n in g.names}
    return FlatLayout([(n, tuple(shape), group_of[n]) for n, shape in zip(names, shapes)])


def layout_of(shard: ShardOf, config: SessionConfig) -> FlatLayout:
    return whole_layout(config, shard.names, [tuple(s) for s in shard.shapes])


def pieces(layout: FlatLayout, index: int, lo: int, hi: int, flat: np.ndarray, present: np.ndarray | None = None
           ) -> dict[str, np.ndarray]:  # fmt: skip
    """Shard ``index``'s pieces (1-D views, no copies) of a flat buffer of the whole ``layout``; with ``present``,
    of the present tensors only."""
    out = {}
    for i, slot in enumerate(layout.slots):
        if covers(slot.offset, slot.size, lo, hi, index) and (present is None or present[i]):
            out[slot.name] = flat[max(slot.offset, lo) : min(slot.stop, hi)]
    return out


def place(layout: FlatLayout, lo: int, hi: int, into: np.ndarray, shard_layout: FlatLayout, flat: np.ndarray) -> None:
    """Write a shard's flat buffer (of ``shard_layout``, its pieces in whatever order) into the whole one."""
    for piece in shard_layout.slots:
        slot = layout.slots[layout.index[piece.name]]
        start = max(slot.offset, lo)
        into[start : start + piece.size] = flat[piece.offset : piece.stop]


def shard_config(config: SessionConfig, layout: FlatLayout, index: int, count: int, lo: int, hi: int) -> SessionConfig:
    shard = ShardOf(index=index, count=count, lo=lo, hi=hi, names=layout.names,
                    shapes=[list(s.shape) for s in layout.slots])  # fmt: skip
    return config.model_copy(update={"shards": count, "shard": shard})


def check_shardable(config: SessionConfig) -> None:
    """Refuse to shard what cannot be: accumulation, and an algorithm that is not elementwise."""
    if not get(config.optimizer).elementwise:
        raise InvalidInput(
            f"{config.optimizer} cannot be sharded (shards > 1): its state is not one float per parameter or its step "
            "reads whole tensors; create the session with shards 1"
        )
    if config.accumulate > 1:
        raise InvalidInput("accumulate > 1 is not supported for a sharded session (shards > 1)")


def split_params(
    session_id: str, config: SessionConfig, params: dict[str, np.ndarray], count: int
) -> list[tuple[str, SessionConfig, dict[str, np.ndarray]]]:
    """A new session's shards: (id, config, pieces) each. Validates what the unsharded session would."""
    check_shardable(config)
    whole = Session(session_id, config.model_copy(update={"shards": count, "shard": None}), params)
    layout = whole.layout
    out = []
    for j, (lo, hi) in enumerate(ranges(layout.size, count)):
        cfg = shard_config(whole.current_config(), layout, j, count, lo, hi)
        out.append((f"{session_id}#{j}", cfg, pieces(layout, j, lo, hi, whole.params)))
    return out


def split(whole: Session, count: int) -> list[Session]:
    """A whole session (a restored checkpoint) as ``count`` shard sessions with its state."""
    check_shardable(whole.config)
    layout = whole.layout
    config = whole.current_config()
    out = []
    for j, (lo, hi) in enumerate(ranges(layout.size, count)):
        shard = Session(f"{whole.id}#{j}", shard_config(config, layout, j, count, lo, hi),
                        pieces(layout, j, lo, hi, whole.params))  # fmt: skip
        shard.hold_buffers(whole.state)
        for name, buffer in whole.state.items():
            shard.state[name][:] = shard.layout.flatten(pieces(layout, j, lo, hi, buffer))
        own = [layout.index[s.name] for s in shard.layout.slots]
        shard.tensor_steps[:] = whole.tensor_steps[own]
        shard.momentum_started[:] = whole.momentum_started[own]
        _copy_meta(whole, shard)
        shard.bounds = None
        out.append(shard)
    return out


def merge(session_id: str, shards: list[Session]) -> Session:
    """The whole session of its shards (all at one step): what its checkpoint holds."""
    first = shards[0]
    assert first.config.shard is not None
    config = first.current_config().model_copy(update={"shard": None})
    layout = layout_of(first.config.shard, first.config)
    flat = np.empty(layout.size, np.float32)
    buffers = {name: np.zeros(layout.size, np.float32) for name in first.state}
    steps = np.zeros(len(layout.slots), np.int64)
    started = np.zeros(len(layout.slots), bool)
    for shard in shards:
        info = shard.config.shard
        assert info is not None
        place(layout, info.lo, info.hi, flat, shard.layout, shard.params)
        for name, buffer in buffers.items():
            if name in shard.state:
                place(layout, info.lo, info.hi, buffer, shard.layout, shard.state[name])
        for i, piece in enumerate(shard.layout.slots):
            steps[layout.index[piece.name]] = shard.tensor_steps[i]
            started[layout.index[piece.name]] = shard.momentum_started[i]
    whole = Session(session_id, config, layout.views(flat))
    whole.hold_buffers(buffers)
    for name, buffer in buffers.items():
        whole.state[name][:] = buffer
    order = [layout.index[s.name] for s in whole.layout.slots]
    whole.tensor_steps[:] = steps[order]
    whole.momentum_started[:] = started[order]
    _copy_meta(first, whole)
    whole.bounds = None
    return whole


def _copy_meta(source: Session, target: Session) -> None:
    target.step_count = source.step_count
    target.counters = Counters(**source.counters.as_dict())
    target.keys = source.keys.copy()
    target.token_digest = source.token_digest
    target.last_grad_norm = source.last_grad_norm
    target.created_at, target.updated_at = source.created_at, source.updated_at
