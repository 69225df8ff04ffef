"""Sessions on a Ray cluster (``OPTSERVE_STORE=ray``): session-host actors behind stateless HTTP fronts.

- :class:`SessionHost`, one Ray actor per node (named ``optserve-host-<node id>``, detached, pinned to its node,
  restarted by Ray when its process dies, every call run at most once): a :class:`MemoryStore` of the sessions
  placed on that node, with its own limits, snapshots in the shared data folder, eviction and expiry. Steps of
  different sessions run at once (an async actor whose kernels release the GIL).
- The directory, which host holds which session, is Ray's GCS key-value store (``session/<id>`` -> host name): it
  survives the loss of any front or host (the head node is Ray's single point of failure unless its GCS fault
  tolerance is set up). A restarted host reads back the sessions the directory gives it, from their snapshots.
- :class:`Coordinator`, one detached actor on the head node (restarted there by Ray): it places new sessions on
  the host with the most free memory budget, starts a host on every node that joins (but a front's own node,
  :func:`host_nodes`), and, when a node dies, gives the sessions of its host to the surviving hosts, which load
  them from their last snapshots.
- Sharded sessions (``"shards": k``, :mod:`optserve.service.shards`): k shard sessions ``<id>#<j>`` on k hosts
  where there are k; the host of shard 0 leads the session (``session/<id>`` names it): every operation goes to it,
  and it runs each step on all shards under its lock, checked everywhere before it is applied anywhere. Shards
  snapshot together at one step (the leader applies the snapshot policy; each keeps its previous snapshot too), so
  when a failure leaves them at different steps, the leader brings all of them back to the newest step they all
  have a snapshot of before the next step.
- :class:`RayStore`, the fronts' :class:`~optserve.service.store.SessionStore`: every operation goes to the
  session's host (found in the directory, cached); a host that is gone is waited for (a restart, or the
  coordinator's recovery) for ``OPTSERVE_RAY_RECOVERY_SECONDS``, then the request answers 503. A front holds
  nothing that its restart would lose.

A call to a host runs at most once (``max_task_retries=0``); a call that failed may or may not have run, which is
what a step's If-Match and Idempotency-Key resolve (the client retries with the same key).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from anyio import to_thread

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # else Ray binds the machine's address, not 127.0.0.1
import ray  # noqa: E402
from ray.exceptions import RayActorError, RayTaskError  # noqa: E402
from ray.experimental import internal_kv  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from optserve.client import wire  # noqa: E402
from optserve.client.shm import SHM_MIN, Segments  # noqa: E402
from optserve.client.wire import Safetensors, WireError  # noqa: E402

from . import (  # noqa: E402
    checkpoint,
    direct,
    fused,  # noqa: E402
    shards,
)
from .algorithms import get as algorithm  # noqa: E402
from .auth import ADMIN, Access  # noqa: E402
from .bodies import POOL  # noqa: E402
from .direct import DirectPool, DirectServer, Mappings, NotSent, ProtocolError  # noqa: E402
from .errors import BadRequest, Conflict, ServiceError, SessionNotFound, StorageUnavailable  # noqa: E402
from .layout import FlatLayout  # noqa: E402
from .persistence import Saver, Snapshots  # noqa: E402
from .session import MAX_SHARDS, SessionConfig, StepResult, sum_of_squares  # noqa: E402
from .settings import Settings  # noqa: E402
from .store import (  # noqa: E402
    Health,
    Lifetimes,
    Limits,
    MemoryStore,
    StepRequest,
    StoreStats,
    Tensors,
    state_floats,
)

log = logging.getLogger("optserve.cluster")

HOST_PREFIX = "optserve-host-"
COORDINATOR = "optserve-coordinator"
FRONT_RESOURCE = "optserve_front"
KEY_PREFIX = b"session/"
SUPERVISE_SECONDS = 0.5
# What a call to a host may fail with when the host is gone or going (its process died, its node died, Ray is
# restarting it): the caller waits and looks again.
GONE = (RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.ActorUnschedulableError)


@dataclass(frozen=True)
class HostConfig:
    """What a session host needs of the settings (the front that starts it passes them)."""

    data_dir: str
    limits: Limits
    snapshot_every_steps: int
    snapshot_every_seconds: float
    fsync_every_step: bool
    lifetimes: Lifetimes
    namespace: str = "optserve"  # of the actors and the directory: one cluster may serve several deployments
    direct_port: int = 0  # of the hosts' direct data path (0: any free port)

    @classmethod
    def of(cls, settings: Settings) -> HostConfig:
        limits = Limits(settings.max_sessions, settings.max_tensors_per_session, settings.max_params_per_session,
                        settings.memory_budget_bytes)  # fmt: skip
        lifetimes = Lifetimes(settings.session_ttl_seconds, settings.session_expire_seconds)
        return cls(str(Path(settings.data_dir).resolve()), limits, settings.snapshot_every_steps,
                   settings.snapshot_every_seconds, settings.fsync_every_step, lifetimes,
                   settings.ray_namespace, settings.ray_direct_port)  # fmt: skip


# --- the directory -------------------------------------------------------------------------------------------------


def _key(session_id: str) -> bytes:
    return KEY_PREFIX + session_id.encode()


def directory_get(namespace: str, session_id: str) -> str | None:
    value = internal_kv._internal_kv_get(_key(session_id), namespace=namespace)
    return value.decode() if value is not None else None


def directory_reserve(namespace: str, session_id: str, host: str) -> bool:
    """Point ``session_id`` at ``host`` if no session has that id; False if one has."""
    existed = internal_kv._internal_kv_put(_key(session_id), host.encode(), overwrite=False, namespace=namespace)
    return not existed


def directory_put(namespace: str, session_id: str, host: str) -> None:
    internal_kv._internal_kv_put(_key(session_id), host.encode(), overwrite=True, namespace=namespace)


def directory_delete(namespace: str, session_id: str) -> None:
    internal_kv._internal_kv_del(_key(session_id), namespace=namespace)


def directory(namespace: str) -> dict[str, str]:
    """Every session and its host."""
    out = {}
    for key in internal_kv._internal_kv_list(KEY_PREFIX, namespace=namespace):
        value = internal_kv._internal_kv_get(key, namespace=namespace)
        if value is not None:
            out[key[len(KEY_PREFIX) :].decode()] = value.decode()
    return out


def direct_secret(namespace: str) -> str:
    """The deployment's secret for the direct data path (made by whichever front or host asks first)."""
    key = b"direct/secret"
    internal_kv._internal_kv_put(key, secrets.token_hex(32).encode(), overwrite=False, namespace=namespace)
    value = internal_kv._internal_kv_get(key, namespace=namespace)
    assert value is not None
    return value.decode()


def host_name(node_id: str) -> str:
    return HOST_PREFIX + node_id


def alive_nodes() -> dict[str, dict[str, Any]]:
    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}


def host_nodes() -> dict[str, dict[str, Any]]:
    """The live nodes that get a session host: all but those started with the resource ``optserve_front`` (a front's
    own raylet on a machine of its own, which a Ray driver needs; its sessions would go down with the front)."""
    return {node_id: n for node_id, n in alive_nodes().items() if FRONT_RESOURCE not in n.get("Resources", {})}


def _cause(error: RayTaskError) -> BaseException:
    """The exception a host raised (a ServiceError crosses whole: its type, detail and members)."""
    cause = error.cause
    return cause if isinstance(cause, BaseException) else error


# --- gradients across processes ------------------------------------------------------------------------------------


def portable(grads: Safetensors | Mapping[str, np.ndarray]) -> Any:
    """A step's gradients as Ray can pass them: a parsed safetensors body's data section as a numpy array (read by
    the host straight from the object store, no copy), its entries and metadata alongside."""
    if isinstance(grads, Safetensors):
        return ("safetensors", grads.entries, grads.metadata, np.frombuffer(grads.data, dtype=np.uint8))
    return ("arrays", dict(grads))


def unportable(payload: Any) -> Safetensors | Mapping[str, np.ndarray]:
    if payload[0] == "safetensors":
        _, entries, metadata, data = payload
        return Safetensors(entries, metadata, memoryview(data))
    return payload[1]


# --- the session host ------------------------------------------------------------------------------------------------


class SessionHost:
    """The sessions of one node (see the module docstring). Every method takes plain values and answers plain
    values; domain errors cross to the front as they are."""

    def __init__(self, config: HostConfig, name: str) -> None:
        self.config = config
        self.name = name
        snapshots = Snapshots(Path(config.data_dir))
        saver = Saver(snapshots, config.snapshot_every_steps, config.snapshot_every_seconds, config.fsync_every_step)
        self.store = MemoryStore(config.limits, snapshots, saver, config.lifetimes, scan=False)
        self.store.on_deleted = lambda session_id: directory_delete(config.namespace, session_id)
        self._started: asyncio.Future[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._led: dict[str, _Led] = {}  # sharded sessions whose shard 0 is here: this host leads them
        self._leading: dict[str, asyncio.Lock] = {}
        self._peers: dict[str, Any] = {}  # the other hosts, by name
        self._direct: DirectServer | None = None  # the direct data path (see optserve.service.direct)
        self._address: tuple[str, int] | None = None  # of the direct path
        self._maps = Mappings()
        self.direct_steps = self.shared_steps = 0  # steps that came over the direct path; in shared memory
        self._layouts: weakref.WeakKeyDictionary[FlatLayout, bytes] = weakref.WeakKeyDictionary()

    async def _ready(self) -> MemoryStore:
        """Start once, on the first call (also after Ray restarted this actor with empty memory)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)
        return self.store

    async def _start(self) -> None:
        np.seterr(over="ignore", invalid="ignore")
        await to_thread.run_sync(fused.warm_up)
        await self.store.start()
        secret = await to_thread.run_sync(direct_secret, self.config.namespace)
        self._direct = DirectServer(secret, self._direct_step, POOL.take)
        try:
            self._address = await self._direct.start(ray.util.get_node_ip_address(), self.config.direct_port)
        except OSError as e:  # the port taken, say: steps come as actor calls, the host serves on
            log.error("%s: no direct path for steps (%s); they come as Ray actor calls", self.name, e)
        owned = [sid for sid, host in (await to_thread.run_sync(directory, self.config.namespace)).items()
                 if host == self.name]  # fmt: skip
        for session_id in owned:
            try:
                await to_thread.run_sync(self.store.adopt, session_id)
            except (OSError, ValueError) as e:
                log.error("session %s of %s has no readable snapshot: %s", session_id, self.name, e)
        if owned:
            log.info("%s holds %d session(s) from the directory", self.name, len(owned))
        self._maintenance = asyncio.ensure_future(self._maintain())

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_SECONDS)
            try:
                await self.store.maintain(time.time())
            except Exception:  # noqa: BLE001 - one bad round must not end the maintenance for good
                log.exception("session maintenance failed on %s", self.name)

    async def ping(self) -> str:
        await self._ready()
        return self.name

    async def endpoint(self) -> tuple[str, int] | None:
        """The address of this host's direct data path (None: it has none)."""
        await self._ready()
        return self._address

    async def _direct_step(
        self, header: dict[str, Any], data: memoryview
    ) -> tuple[dict[str, Any], bytes, tuple[Any, ...]]:
        """A step that came over the direct data path: the request's frame in, the answer's frame out."""
        try:
            store = await self._ready()
            if header.get("op") != "step":
                raise ProtocolError(f"no operation {header.get('op')!r} on the direct path")
            admin, digest = header["access"]
            access = Access(bool(admin), str(digest))
            session_id = str(header["session"])
            body = self._maps.view(header["body"]) if "body" in header else data
            try:
                grads = wire.parse(body, 1 << 30)  # the front checked its limit
            except WireError as e:
                raise BadRequest(str(e)) from None
            r = header["request"]
            out = self._maps.view(header["out"]).view(np.float32) if "out" in header else None
            if_match = frozenset(int(i) for i in r["if_match"]) if r["if_match"] is not None else None
            request = StepRequest(if_match, r["key"], bool(r["want_params"]), bool(r["partial"]), r["changes"],
                                  out=out)  # fmt: skip
            self.direct_steps += 1
            self.shared_steps += "body" in header or "out" in header
            if self._sharded(session_id):
                result = await self._sharded_step(access, session_id, grads, request)
            else:
                result = await store.step(access, session_id, grads, request)
        except ServiceError as e:
            return direct.error_header(e), b"", ()
        except (ProtocolError, KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"a step frame that is not one: {e!r}") from None
        except Exception as e:  # noqa: BLE001 - answered as the Ray path would (a 500 on the front), and logged
            log.exception("direct step of %s failed", header.get("session"))
            return direct.error_header(e), b"", ()
        answer: dict[str, Any] = {"status": result.status, "step": result.step, "skipped": result.skipped,
                                  "grad_norm": result.grad_norm, "awaiting": result.awaiting}  # fmt: skip
        if result.params is None or result.layout is None:
            return answer, b"", ()
        layout = self._layouts.get(result.layout)
        if layout is None:
            layout = json.dumps([[s.name, list(s.shape), s.group] for s in result.layout.slots]).encode()
            self._layouts[result.layout] = layout
        if out is not None and result.params is out:
            answer["params"] = "out"
            return answer, layout, ()
        answer["params"] = "data"
        return answer, layout, (result.params,)

    async def stats(self) -> dict[str, Any]:
        store = await self._ready()
        s = store.stats()
        return {"name": self.name, "sessions": store.session_ids(), "in_memory": s.sessions, "evicted": s.evicted,
                "parameters": s.parameters, "memory_bytes": s.state_bytes,
                "free_bytes": store.limits.memory_budget_bytes - s.state_bytes, "evictions": s.evictions,
                "reloads": s.reloads, "expired": s.expired, "snapshot_failures": store.saver.failures if store.saver
                else 0, "snapshots_failing": bool(store.saver and store.saver.failing),
                "direct": {"address": ":".join(map(str, self._address or ())) or None,
                           "steps": self.direct_steps, "shared_memory": self.shared_steps}}  # fmt: skip

    async def create(
        self, session_id: str, config: SessionConfig, params: Mapping[str, np.ndarray], token_digest: str | None
    ) -> dict[str, Any]:
        return await (await self._ready()).create(session_id, config, params, token_digest)

    async def list_sessions(self) -> list[dict[str, Any]]:
        return await (await self._ready()).list_sessions()

    async def check(self, access: Access, session_id: str) -> None:
        store = await self._ready()
        await store.check(access, f"{session_id}#0" if self._sharded(session_id) else session_id)

    async def info(self, access: Access, session_id: str) -> dict[str, Any]:
        store = await self._ready()
        if self._sharded(session_id):
            return await self._sharded_info(access, session_id)
        return await store.info(access, session_id)

    async def patch(self, access: Access, session_id: str, values: Mapping[str, Any], group: int | None) -> Any:
        store = await self._ready()
        if self._sharded(session_id):
            led = await self._lead(access, session_id)
            async with self._lock(session_id):
                await self._on(led, session_id, 0, "patch", access, values, group)  # refused here: nothing changed
                await self._each(led, session_id, "patch", lambda j: (access, values, group), first=1)
            return await self._sharded_info(access, session_id)
        return await store.patch(access, session_id, values, group)

    async def delete(self, access: Access, session_id: str) -> None:
        store = await self._ready()
        if not self._sharded(session_id):
            await store.delete(access, session_id)
            return
        led = await self._lead(access, session_id)
        async with self._lock(session_id):
            await store.check(access, f"{session_id}#0")
            await self._each(led, session_id, "delete", lambda j: (access,), first=1, missing_ok=True)
            await store.delete(access, f"{session_id}#0")
            await to_thread.run_sync(directory_delete, self.config.namespace, session_id)
            self._led.pop(session_id, None)

    async def step(self, access: Access, session_id: str, grads: Any, request: StepRequest) -> StepResult:
        store = await self._ready()
        if self._sharded(session_id):
            return await self._sharded_step(access, session_id, unportable(grads), request)
        return await store.step(access, session_id, unportable(grads), request)

    async def params(self, access: Access, session_id: str, min_step: int | None, timeout: float) -> Tensors:
        store = await self._ready()
        if not self._sharded(session_id):
            return await store.params(access, session_id, min_step, timeout)
        led = await self._lead(access, session_id)
        await store.params(access, f"{session_id}#0", min_step, timeout)  # waits for min_step
        async with self._lock(session_id):
            parts = await self._each(led, session_id, "params", lambda j: (access, None, 0.0))
        flat = np.empty(led.layout.size, np.float32)
        for (lo, hi), part in zip(led.ranges, parts):
            shards.place(led.layout, lo, hi, flat, part.layout, part.flat)
        return Tensors(parts[0].step, led.layout, flat)

    async def export(self, access: Access, session_id: str) -> tuple[bytes, int]:
        store = await self._ready()
        if not self._sharded(session_id):
            parts, step = await store.export(access, session_id)
            return b"".join(parts), step
        led = await self._lead(access, session_id)
        async with self._lock(session_id):
            bodies = await self._each(led, session_id, "export", lambda j: (access,))
        loaded = [await to_thread.run_sync(checkpoint.load, b, f"{session_id}#{j}") for j, (b, _) in enumerate(bodies)]
        whole = await to_thread.run_sync(shards.merge, session_id, loaded)
        return checkpoint.dump(whole), whole.step_count

    async def restore(self, access: Access, session_id: str, body: bytes) -> tuple[dict[str, Any], bool]:
        store = await self._ready()
        if not self._sharded(session_id):
            return await store.restore(access, session_id, body)
        led = await self._lead(access, session_id)
        await store.check(access, f"{session_id}#0")  # replacing: the session's token or the admin key
        whole = await to_thread.run_sync(checkpoint.load, body, session_id)
        parts = await to_thread.run_sync(lambda: [checkpoint.dump(p) for p in shards.split(whole, led.count)])
        async with self._lock(session_id):
            await self._each(led, session_id, "restore", lambda j: (access, parts[j]))
            self._led.pop(session_id, None)
        return await self._sharded_info(access, session_id), True

    # --- sharded sessions: this host leads those whose shard 0 it holds (see optserve.service.shards) ----------

    def _sharded(self, session_id: str) -> bool:
        return "#" not in session_id and self.store.holds(f"{session_id}#0")

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._leading.setdefault(session_id, asyncio.Lock())

    async def _lead(self, access: Access, session_id: str) -> _Led:
        led = self._led.get(session_id)
        if led is not None:
            return led
        first = await self.store.session(access, f"{session_id}#0")
        shard = first.config.shard
        assert shard is not None
        layout = shards.layout_of(shard, first.config)
        keys = [f"{session_id}#{j}" for j in range(shard.count)]
        hosts = [await to_thread.run_sync(directory_get, self.config.namespace, k) for k in keys]
        if any(h is None for h in hosts):
            raise StorageUnavailable(f"a shard of session {session_id!r} is not in the directory; try again")
        led = _Led(shard.count, layout, shards.ranges(layout.size, shard.count), [str(h) for h in hosts],
                   first.step_count, time.time())  # fmt: skip
        self._led[session_id] = led
        return led

    async def _each(
        self,
        led: _Led,
        session_id: str,
        method: str,
        args: Callable[[int], tuple[Any, ...]],
        first: int = 0,
        missing_ok: bool = False,
    ) -> list[Any]:
        """``method`` on every shard from ``first`` on, at once; the first error in shard order is raised (after
        every call ended)."""
        calls = [self._on(led, session_id, j, method, *args(j)) for j in range(first, led.count)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException) and not (missing_ok and isinstance(answer, SessionNotFound)):
                raise answer
        return answers

    async def _on(self, led: _Led, session_id: str, j: int, method: str, *args: Any) -> Any:
        """``method`` of shard ``j``'s host for shard ``j`` (this host's own store when it is here); ``args`` start
        with the access."""
        name = led.hosts[j]
        shard_id = f"{session_id}#{j}"
        if name == self.name:
            return await getattr(self, method)(args[0], shard_id, *args[1:])
        try:
            handle = self._peers.get(name)
            if handle is None:
                handle = self._peers[name] = ray.get_actor(name, namespace=self.config.namespace)
            return await getattr(handle, method).remote(args[0], shard_id, *args[1:])
        except RayTaskError as e:
            raise _cause(e) from None
        except (*GONE, ValueError):  # ValueError: no actor of that name (any more)
            self._led.pop(session_id, None)
            self._peers.pop(name, None)
            raise StorageUnavailable(
                f"the host of shard {j} of session {session_id!r} is unavailable; try again"
            ) from None

    async def _sharded_step(
        self, access: Access, session_id: str, grads: Safetensors | Mapping[str, np.ndarray], request: StepRequest
    ) -> StepResult:
        """One step of a sharded session: checked on every shard (nothing written), then applied on every shard,
        with the whole gradient's norm; one step at a time (this host's lock for the session)."""
        led = await self._lead(access, session_id)
        async with self._lock(session_id):
            flat, present = led.layout.gather(grads, request.partial)
            sumsq = sum_of_squares(flat)

            def part(j: int, req: StepRequest) -> tuple[Any, ...]:
                lo, hi = led.ranges[j]
                return access, ("arrays", shards.pieces(led.layout, j, lo, hi, flat, present)), req

            dry = dataclasses.replace(request, sumsq=sumsq, dry=True, want_params=False, out=None)
            checks: list[StepResult] = await self._each(led, session_id, "step", lambda j: part(j, dry))
            if len({c.step for c in checks}) > 1:  # a failure left the shards apart: all back to one snapshot
                step = await self._realign(led, session_id)
                raise StorageUnavailable(
                    f"the shards of session {session_id!r} were brought back to their common snapshot at step {step} "
                    "after a failure; retry (with the same Idempotency-Key, or resynchronise after a 412)"
                )
            if len({c.hyperparams for c in checks}) > 1:  # a change that reached only some shards (a host failed)
                raise Conflict(
                    f"the shards of session {session_id!r} hold different hyperparameters: a change (PATCH) reached "
                    "only some of them when a host failed; send that change again, then the step (nothing was "
                    "applied)",
                    session_id=session_id,
                )
            real = dataclasses.replace(request, sumsq=sumsq, skip=any(c.skipped for c in checks), out=None)
            results: list[StepResult] = await self._each(led, session_id, "step", lambda j: part(j, real))
            first = results[0]
            if first.status in ("applied", "skipped"):
                await self._aligned_snapshot(led, session_id, first.step)
        params = None
        if request.want_params and all(r.params is not None for r in results):
            out = request.out
            params = (
                out
                if out is not None and out.size == led.layout.size
                else POOL.take(4 * led.layout.size).view(np.float32)
            )
            for (lo, hi), r in zip(led.ranges, results):
                assert r.layout is not None and r.params is not None
                shards.place(led.layout, lo, hi, params, r.layout, r.params)
        return StepResult(first.status, first.step, params, first.skipped, first.grad_norm, layout=led.layout)

    async def _aligned_snapshot(self, led: _Led, session_id: str, step: int) -> None:
        """Every shard snapshotted at this one step by the snapshot policy (each shard's own policy is off: shards
        snapshotting at different steps could not be recovered together). With fsync every step each shard
        writes before it answers."""
        config, now = self.config, time.time()
        if config.fsync_every_step:
            return
        by_steps = config.snapshot_every_steps and step - led.saved_step >= config.snapshot_every_steps
        by_time = config.snapshot_every_seconds and now - led.saved_at >= config.snapshot_every_seconds
        if by_steps or by_time:
            await self._each(led, session_id, "save", lambda j: (ADMIN,))
            led.saved_step, led.saved_at = step, now

    async def _realign(self, led: _Led, session_id: str) -> int:
        """Bring every shard back to the newest step all of them have a snapshot of (each keeps its previous
        snapshot too); the step."""
        steps: list[list[int]] = await self._each(led, session_id, "snapshot_steps", lambda j: (ADMIN,))
        common = set.intersection(*(set(s) for s in steps))
        if not common:
            raise StorageUnavailable(f"the shards of session {session_id!r} have no snapshot of one step in common")
        step = max(common)
        await self._each(led, session_id, "align", lambda j: (ADMIN, step))
        log.warning("sharded session %s brought back to its snapshots of step %d", session_id, step)
        return step

    async def _sharded_info(self, access: Access, session_id: str) -> dict[str, Any]:
        led = await self._lead(access, session_id)
        info = await self.store.info(access, f"{session_id}#0")
        info["id"] = session_id
        for group in info["param_groups"]:
            group["params"] = [s.name for s in led.layout.slots if s.group == group["index"]]
        info["tensors"] = {s.name: {"shape": list(s.shape), "dtype": "float32", "group": s.group}
                           for s in led.layout.slots}  # fmt: skip
        info["num_params"] = led.layout.size
        info["state_bytes"] = 4 * len(info["state"]) * led.layout.size  # sharded: elementwise state only
        info["shards"] = [{"index": j, "host": h, "range": [lo, hi]} for j, (h, (lo, hi))
                          in enumerate(zip(led.hosts, led.ranges))]  # fmt: skip
        return info

    # shard-level operations the leader asks of the hosts of its shards

    async def save(self, access: Access, session_id: str) -> None:
        store = await self._ready()
        await to_thread.run_sync(store.save_now, session_id)

    async def snapshot_steps(self, access: Access, session_id: str) -> list[int]:
        """The steps of a shard's latest and previous snapshots (those that can be read)."""
        store = await self._ready()
        assert store.snapshots is not None
        steps = []
        for path in (store.snapshots.path(session_id), store.snapshots.previous(session_id)):
            try:
                steps.append(await to_thread.run_sync(store.snapshots.step_of, path))
            except (OSError, ValueError):
                continue
        return steps

    async def align(self, access: Access, session_id: str, step: int) -> None:
        """Forget the shard in memory and hold it from its snapshot at ``step`` (its latest or its previous)."""
        store = await self._ready()
        snapshots = store.snapshots
        assert snapshots is not None

        def back() -> None:
            store.drop(session_id)
            with snapshots.lock(session_id):
                if snapshots.step_of(snapshots.path(session_id)) != step:
                    os.replace(snapshots.previous(session_id), snapshots.path(session_id))
            store.adopt(session_id)

        await to_thread.run_sync(back)

    async def adopt(self, session_id: str) -> None:
        """Take on a session of a host that is gone, from its snapshot (the coordinator then points the directory
        here)."""
        store = await self._ready()
        await to_thread.run_sync(store.adopt, session_id)

    async def flush(self) -> None:
        """Write every changed session now (the cluster is going down)."""
        store = await self._ready()
        if store.saver is not None:
            await to_thread.run_sync(store.saver.flush, list(store._sessions.values()))


@dataclass
class _Led:
    """What the leader of a sharded session knows of it: its shards' ranges of the whole layout and their hosts."""

    count: int
    layout: FlatLayout
    ranges: list[tuple[int, int]]
    hosts: list[str]
    saved_step: int  # of the last aligned snapshot (see SessionHost._aligned_snapshot)
    saved_at: float


# --- the coordinator -------------------------------------------------------------------------------------------------


class Coordinator:
    """Placement, a host on every node, and recovery when a node dies (see the module docstring)."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.hosts: dict[str, Any] = {}  # host name -> actor handle
        self.node_of: dict[str, str] = {}  # host name -> node id
        self.stats: dict[str, dict[str, Any]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self.recovered = 0

    def _host(self, node_id: str) -> Any:
        name = host_name(node_id)
        if name not in self.hosts:
            self.hosts[name] = (
                ray.remote(SessionHost)
                .options(
                    name=name,
                    namespace=self.config.namespace,
                    lifetime="detached",
                    get_if_exists=True,
                    max_restarts=-1,
                    max_task_retries=0,
                    max_concurrency=256,
                    num_cpus=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                )  # fmt: skip
                .remote(self.config, name)
            )
            self.node_of[name] = node_id
        return self.hosts[name]

    async def start(self) -> list[str]:
        """A host on every live node (started and answering); the names."""
        if self._supervisor is None:
            self._supervisor = asyncio.ensure_future(self._supervise())
        nodes = await to_thread.run_sync(host_nodes)
        answers = await asyncio.gather(*(self._host(node_id).ping.remote() for node_id in nodes),
                                       return_exceptions=True)  # fmt: skip
        names = []
        for node_id, answer in zip(nodes, answers):
            name = host_name(node_id)
            if isinstance(answer, BaseException):  # a node dying as we looked (Ray had not noticed yet)
                log.warning("no session host on node %s: %s", node_id, answer)
                self.hosts.pop(name, None)
                self.node_of.pop(name, None)
            else:
                names.append(name)
        if not names:
            raise StorageUnavailable("no session host could be started on any node")
        await self._refresh()
        return names

    async def _refresh(self) -> None:
        nodes = await to_thread.run_sync(alive_nodes)
        alive = {name: h for name, h in self.hosts.items() if self.node_of[name] in nodes}
        answers = await asyncio.gather(*(h.stats.remote() for h in alive.values()), return_exceptions=True)
        self.stats = {name: a for name, a in zip(alive, answers) if isinstance(a, dict)}

    async def place(self, nbytes: int, avoid: tuple[str, ...] = ()) -> str:
        """The live host with the most free memory budget (of those not in ``avoid``, if any is not)."""
        if not self.stats:
            await self._refresh()
        if not self.stats:
            raise StorageUnavailable("no session host is up")
        candidates = [n for n in self.stats if n not in avoid] or list(self.stats)
        name = max(candidates, key=lambda n: self.stats[n]["free_bytes"])
        self.stats[name]["free_bytes"] -= nbytes  # until the next refresh
        return name

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_SECONDS)
            try:
                await self._round()
            except Exception:  # noqa: BLE001 - keep supervising
                log.exception("cluster supervision round failed")

    async def _round(self) -> None:
        nodes = await to_thread.run_sync(host_nodes)
        for node_id in nodes:
            self._host(node_id)  # a node that joined gets its host
        await self._refresh()
        dead = {name for name, node_id in self.node_of.items() if node_id not in nodes}
        if not dead or not self.stats:
            return
        namespace = self.config.namespace
        entries = await to_thread.run_sync(directory, namespace)
        # a sharded session's own entry names its leader, the host of its shard 0: it moves with that shard
        orphans = [(sid, host) for sid, host in entries.items() if host in dead and f"{sid}#0" not in entries]
        for session_id, old in orphans:
            target = await self.place(0)
            try:
                await self.hosts[target].adopt.remote(session_id)
            except RayTaskError as e:
                log.error("session %s of %s (node gone) could not be recovered: %s", session_id, old, _cause(e))
                continue
            await to_thread.run_sync(directory_put, namespace, session_id, target)
            if session_id.endswith("#0"):
                await to_thread.run_sync(directory_put, namespace, session_id[:-2], target)
            self.recovered += 1
            log.warning("session %s moved from %s (node gone) to %s", session_id, old, target)

    async def cluster(self) -> dict[str, Any]:
        """The nodes, whether alive, their hosts' sessions and memory."""
        await self._refresh()
        everything = await to_thread.run_sync(lambda: {n["NodeID"]: n["Alive"] for n in ray.nodes()})
        nodes = []
        for node_id, alive in everything.items():
            stats = self.stats.get(host_name(node_id), {})
            nodes.append({"node_id": node_id, "alive": alive, "sessions": stats.get("sessions", []),
                          "memory_bytes": stats.get("memory_bytes", 0), "direct": stats.get("direct")})  # fmt: skip
        return {"nodes": nodes, "recovered": self.recovered}

    async def totals(self) -> dict[str, Any]:
        await self._refresh()
        keys = ("in_memory", "evicted", "parameters", "memory_bytes", "evictions", "reloads", "expired",
                "snapshot_failures")  # fmt: skip
        out = {k: sum(s.get(k, 0) for s in self.stats.values()) for k in keys}
        out["hosts"] = len(self.stats)
        out["snapshots_failing"] = any(s.get("snapshots_failing") for s in self.stats.values())
        return out

    async def flush(self) -> None:
        await asyncio.gather(*(h.flush.remote() for h in self.hosts.values()), return_exceptions=True)

    async def hosts_and_self(self) -> list[Any]:
        return list(self.hosts.values())


# --- the front -------------------------------------------------------------------------------------------------------


@dataclass
class _Snapshot:
    """The cluster-wide counters, refreshed by ``maintain`` (the metrics collector reads them without waiting)."""

    totals: dict[str, Any] = field(default_factory=dict)


class RayStore:
    """A front's store: every session operation goes to the host that holds the session."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = HostConfig.of(settings)
        self.limits = self.config.limits  # per host
        self.namespace = self.config.namespace
        self.ready = False
        self._started_ray = False
        self._where: dict[str, str] = {}  # session id -> host name (a cache of the directory)
        self._handles: dict[str, Any] = {}
        self._suspect: set[str] = set()  # hosts a call to which failed: asked whether they are up before the next
        self._coordinator: Any = None
        self._totals: dict[str, Any] = {}
        self._last_totals = 0.0
        # the direct data path of steps (see optserve.service.direct)
        self._direct: DirectPool | None = None
        self._endpoints: dict[str, tuple[str, int] | None] = {}  # host name -> its direct address (None: none)
        self._segments: Segments | None = None  # shared memory with the host of this front's node, if it has one
        self._local_host = ""
        self._no_shm: set[str] = set()  # hosts that cannot open this front's shared memory
        self._sizes: dict[str, int] = {}  # session id -> parameters in its last answer (the next answer's buffer)
        self._layouts: dict[bytes, FlatLayout] = {}
        self._pool_make: Any = None
        # the shared buffers of exchanges given up while their host may still use them: kept from reuse a while
        self._quarantine: collections.deque[tuple[Any, Any]] = collections.deque(maxlen=16)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await to_thread.run_sync(self._connect)
        await self._coordinator.start.remote()
        if self.settings.ray_direct:
            self._direct = DirectPool(await to_thread.run_sync(direct_secret, self.namespace), POOL.take)
            node_id = ray.get_runtime_context().get_node_id()
            if node_id in await to_thread.run_sync(host_nodes) and Segments.available():
                # this node has a host: large bodies and answers in shared memory it can read and write
                await to_thread.run_sync(Segments.sweep)
                self._segments = Segments()
                self._local_host = host_name(node_id)
                self._pool_make, POOL.make = POOL.make, self._segments.make
        await self._refresh_totals()
        self.ready = True

    def _connect(self) -> None:
        if not ray.is_initialized():
            address = self.settings.ray_address
            options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
            if address:
                ray.init(address=address, **options)
            else:  # a local single-node Ray of this front's own, on loopback only: Ray's ports take no credentials
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **options)
                self._started_ray = True
        self._coordinator = (
            ray.remote(Coordinator)
            .options(
                name=COORDINATOR,
                namespace=self.namespace,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=64,
                num_cpus=0,
                # on the head node, which holds the cluster's control plane anyway: it goes only with the cluster
                resources={"node:__internal_head__": 0.001},
            )  # fmt: skip
            .remote(self.config)
        )

    async def stop(self) -> None:
        self.ready = False
        if self._direct is not None:
            self._direct.close()
        if self._segments is not None:
            POOL.make = self._pool_make
            self._segments.close()
            self._segments = None
        if self._started_ray:  # the cluster goes with this front: its sessions are written first
            with _suppress_gone():
                await self._coordinator.flush.remote()
            await to_thread.run_sync(ray.shutdown)

    async def maintain(self, now: float) -> None:
        if now - self._last_totals >= 2.0:
            await self._refresh_totals()

    async def _refresh_totals(self) -> None:
        with _suppress_gone():
            self._totals = await asyncio.wait_for(asyncio.wrap_future(self._coordinator.totals.remote().future()), 10)
        self._last_totals = time.time()

    def health(self) -> Health:
        if not self.ready:
            return Health(False, {"status": "starting"})
        if self._totals.get("snapshots_failing"):
            return Health(False, {"status": "degraded", "snapshots": "failing on a session host"})
        return Health(True, {"status": "ready", "sessions": self._totals.get("in_memory", 0)
                             + self._totals.get("evicted", 0), "hosts": self._totals.get("hosts", 0)})  # fmt: skip

    def stats(self) -> StoreStats:
        t = self._totals
        return StoreStats(t.get("in_memory", 0), t.get("evicted", 0), t.get("parameters", 0), t.get("memory_bytes", 0),
                          t.get("evictions", 0), t.get("reloads", 0), t.get("expired", 0))  # fmt: skip

    async def cluster(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._coordinator.cluster.remote()
        result["front"] = {"node_id": ray.get_runtime_context().get_node_id()}  # the node this front's driver is on
        return result

    def destroy(self) -> None:
        """Kill this deployment's actors and forget its directory (tests; a deployment being removed for good)."""
        hosts = ray.get(self._coordinator.hosts_and_self.remote())
        for actor in (*hosts, self._coordinator):
            ray.kill(actor, no_restart=True)
        internal_kv._internal_kv_del(KEY_PREFIX, del_by_prefix=True, namespace=self.namespace)

    # --- finding a session's host --------------------------------------------------------------------------------

    def _handle(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = ray.get_actor(name, namespace=self.namespace)
        return handle

    async def _host(self, session_id: str, fresh: bool) -> Any | None:
        name = None if fresh else self._where.get(session_id)
        if name is None:
            name = await to_thread.run_sync(directory_get, self.namespace, session_id)
            if name is None:
                self._where.pop(session_id, None)
                return None
            self._where[session_id] = name
        try:
            return self._handle(name)
        except ValueError:  # no such actor (yet, or any more)
            self._handles.pop(name, None)
            return None

    async def _call(
        self, access: Access, session_id: str, method: str, *args: Any, via: Callable[[str], Any] | None = None
    ) -> Any:
        """``method`` on the session's host, waiting for a host that is gone to come back (or its sessions to be
        recovered elsewhere) for ``ray_recovery_seconds``; then 503.

        A change (``MUTATING``) whose host dies while it runs is not sent again: it may have been applied (and
        snapshotted) before the host died, so it answers 503 and the client's retry, with its Idempotency-Key or
        If-Match, decides. Reads are simply asked again of the recovered host. ``via(host name)``, when given, does
        the call another way than an actor call (a step on the direct path)."""
        deadline = time.monotonic() + self.settings.ray_recovery_seconds
        fresh = False
        while True:
            host = await self._host(session_id, fresh)
            if host is None and fresh:
                raise access.missing(session_id)
            name = self._where.get(session_id)
            if host is not None and name in self._suspect:  # a call to it failed: is it (or a new one) up now?
                if name[len(HOST_PREFIX) :] in await to_thread.run_sync(alive_nodes):
                    self._suspect.discard(name)
                else:
                    host = None
            if host is not None:
                try:
                    if via is not None and name is not None:
                        work = asyncio.ensure_future(via(name))
                    else:
                        work = asyncio.wrap_future(getattr(host, method).remote(access, session_id, *args).future())
                    return await self._await(work, session_id)
                except RayTaskError as e:
                    cause = _cause(e)
                    if isinstance(cause, SessionNotFound) and not fresh:  # moved since we looked: look again
                        fresh = True
                        continue
                    raise cause from None
                except SessionNotFound:  # (the direct path)
                    if fresh:
                        raise
                    fresh = True
                    continue
                except NotSent:  # the direct path found nobody listening: nothing was sent, wait and look again
                    if name is not None:
                        self._suspect.add(name)
                        self._endpoints.pop(name, None)
                except (*GONE, _HostGone, OSError, ProtocolError):  # OSError, ProtocolError: the direct path's
                    if name is not None:
                        self._suspect.add(name)
                        self._endpoints.pop(name, None)
                    if method in MUTATING:
                        raise StorageUnavailable(
                            f"the host of session {session_id!r} went down during the request, which may or may not "
                            "have been applied; retry it with the same Idempotency-Key (or If-Match)"
                        ) from None
            if time.monotonic() >= deadline:
                raise StorageUnavailable(f"the host of session {session_id!r} is unavailable; try again")
            await asyncio.sleep(0.2)
            fresh = True

    async def _await(self, future: asyncio.Future[Any], session_id: str) -> Any:
        """The answer of a call to a host; a call whose host's node died never answers, so every second the wait
        checks that the session's host is still alive and still its host (else :class:`_HostGone`)."""
        name = self._where.get(session_id)
        while True:
            done, _ = await asyncio.wait({future}, timeout=1.0)
            if done:
                return future.result()
            if name is None:
                continue
            now = await to_thread.run_sync(directory_get, self.namespace, session_id)
            nodes = await to_thread.run_sync(alive_nodes)
            if now != name or name[len(HOST_PREFIX) :] not in nodes:
                future.cancel()
                raise _HostGone(name)

    # --- operations ------------------------------------------------------------------------------------------------

    async def create(
        self, session_id: str, config: SessionConfig, params: Mapping[str, np.ndarray], token_digest: str | None
    ) -> dict[str, Any]:
        n = sum(int(np.asarray(a).size) for a in params.values())
        nbytes = 4 * (n + state_floats(config, [tuple(np.shape(a)) for a in params.values()]))  # the algorithm's
        count = config.shards
        elementwise = algorithm(config.optimizer).elementwise  # only elementwise state may be cut inside tensors
        if count == 1 and elementwise and self.settings.shard_bytes and nbytes > self.settings.shard_bytes:
            count = min(MAX_SHARDS, -(-nbytes // self.settings.shard_bytes))
            config = config.model_copy(update={"shards": count})
        if count > 1:
            parts = await to_thread.run_sync(shards.split_params, session_id, config, dict(params), count)
            return await self._create_sharded(session_id, [(sid, cfg, p, token_digest) for sid, cfg, p in parts])
        name = await self._coordinator.place.remote(nbytes)
        if not await to_thread.run_sync(directory_reserve, self.namespace, session_id, name):
            raise Conflict(f"session {session_id!r} already exists", session_id=session_id)
        try:
            info: dict[str, Any] = await self._handle(name).create.remote(session_id, config, params, token_digest)
        except BaseException as e:
            await to_thread.run_sync(directory_delete, self.namespace, session_id)
            if isinstance(e, RayTaskError):
                raise _cause(e) from None
            raise
        self._where[session_id] = name
        return info

    async def _create_sharded(
        self, session_id: str, parts: list[tuple[str, SessionConfig, Any, Any]]
    ) -> dict[str, Any]:
        """Place the shards (``(id, config, params or checkpoint body, token digest)`` each) on as many hosts as
        there are, create them there (``create`` with params, ``restore`` with a body) and point the directory at
        them; undone if any fails."""
        placed: list[str] = []
        for _, _, tensors, _ in parts:
            size = len(tensors) if isinstance(tensors, bytes) else sum(int(a.size) for a in tensors.values()) * 12
            placed.append(await self._coordinator.place.remote(size, tuple(placed)))
        if not await to_thread.run_sync(directory_reserve, self.namespace, session_id, placed[0]):
            raise Conflict(f"session {session_id!r} already exists", session_id=session_id)
        try:
            for (shard_id, _, _, _), name in zip(parts, placed):
                await to_thread.run_sync(directory_put, self.namespace, shard_id, name)

            async def make(shard_id: str, config: SessionConfig, tensors: Any, digest: Any, name: str) -> Any:
                host = self._handle(name)
                if isinstance(tensors, bytes):
                    return await host.restore.remote(ADMIN, shard_id, tensors)
                return await host.create.remote(shard_id, config, tensors, digest)

            made = await asyncio.gather(*(make(*part, name) for part, name in zip(parts, placed)),
                                        return_exceptions=True)  # fmt: skip
            failed = next((m for m in made if isinstance(m, BaseException)), None)
            if failed is not None:
                for (shard_id, _, _, _), name, m in zip(parts, placed, made):
                    if not isinstance(m, BaseException):
                        with _suppress_gone(), contextlib.suppress(RayTaskError):
                            await self._handle(name).delete.remote(ADMIN, shard_id)
                raise _cause(failed) if isinstance(failed, RayTaskError) else failed
        except BaseException:
            for shard_id, _, _, _ in parts:
                await to_thread.run_sync(directory_delete, self.namespace, shard_id)
            await to_thread.run_sync(directory_delete, self.namespace, session_id)
            raise
        self._where[session_id] = placed[0]
        info: dict[str, Any] = await self._call(ADMIN, session_id, "info")
        return info

    async def list_sessions(self) -> list[dict[str, Any]]:
        names = list((await self._coordinator.cluster.remote())["nodes"])
        hosts = [host_name(n["node_id"]) for n in names if n["alive"]]
        answers = await asyncio.gather(*(self._handle(h).list_sessions.remote() for h in hosts), return_exceptions=True)
        listed = [s for a in answers if isinstance(a, list) for s in a]
        whole = [s for s in listed if "#" not in s["id"]]
        sizes: dict[str, int] = {}
        for s in listed:  # a sharded session once, under its id, with the parameters of all its shards
            if "#" in s["id"]:
                base = s["id"].rsplit("#", 1)[0]
                sizes[base] = sizes.get(base, 0) + int(s["num_params"])
        for s in listed:
            if s["id"].endswith("#0"):
                whole.append({**s, "id": s["id"][:-2], "num_params": sizes[s["id"][:-2]]})
        return whole

    async def check(self, access: Access, session_id: str) -> None:
        if await self._host(session_id, False) is None and await self._host(session_id, True) is None:
            raise access.missing(session_id)

    async def info(self, access: Access, session_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(access, session_id, "info")
        return result

    async def patch(
        self, access: Access, session_id: str, values: Mapping[str, Any], group: int | None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(access, session_id, "patch", dict(values), group)
        return result

    async def delete(self, access: Access, session_id: str) -> None:
        await self._call(access, session_id, "delete")
        self._where.pop(session_id, None)
        self._sizes.pop(session_id, None)

    async def step(
        self, access: Access, session_id: str, grads: Safetensors | Mapping[str, np.ndarray], request: StepRequest
    ) -> StepResult:
        if self._direct is not None and isinstance(grads, Safetensors) and grads.body is not None:
            safetensors = grads

            def via(name: str) -> Any:
                return self._direct_step(name, access, session_id, safetensors, request)

            result: StepResult = await self._call(access, session_id, "step", via=via)
        else:
            result = await self._call(access, session_id, "step", portable(grads), request)
        return result

    async def _endpoint(self, name: str) -> tuple[str, int] | None:
        if name in self._endpoints:
            return self._endpoints[name]
        try:
            where = await self._handle(name).endpoint.remote()
        except (*GONE, ValueError, RayTaskError) as e:
            raise NotSent(f"{name}: {e}") from None
        address = self._endpoints[name] = (str(where[0]), int(where[1])) if where is not None else None
        return address

    async def _direct_step(
        self, name: str, access: Access, session_id: str, grads: Safetensors, request: StepRequest
    ) -> StepResult:
        """A step over the direct data path to host ``name`` (see :mod:`optserve.service.direct`); as an actor
        call to a host that has none."""
        assert self._direct is not None and grads.body is not None
        address = await self._endpoint(name)
        if address is None:
            try:
                result: StepResult = await self._handle(name).step.remote(access, session_id, portable(grads), request)
            except RayTaskError as e:
                raise _cause(e) from None
            return result
        body = grads.body
        changes = request.changes
        header: dict[str, Any] = {"op": "step", "session": session_id, "access": [access.admin, access.digest],
                                  "request": {"if_match": sorted(request.if_match) if request.if_match is not None
                                              else None, "key": request.key, "want_params": request.want_params,
                                              "partial": request.partial, "changes": changes}}  # fmt: skip
        data: list[Any] = [body]
        out = None
        if self._segments is not None and name == self._local_host and name not in self._no_shm:
            ref = self._segments.find(body)
            if ref is not None:  # the host reads the body where it lies
                header["body"], data = ref, []
            size = self._sizes.get(session_id, 0)
            if request.want_params and 4 * size >= SHM_MIN:  # and writes the parameters into our buffer
                out = POOL.take(4 * size)
                ref = self._segments.find(out)
                if ref is not None:
                    header["out"] = ref
                else:
                    out = None
        try:
            answer, layout_bytes, params = await self._direct.exchange(address, header, data)
        except BaseException:
            if "body" in header or "out" in header:  # the host may still be reading or writing them
                self._quarantine.append((body, out))
            raise
        if (answer.get("error") or {}).get("class") == "NoSharedMemory":  # nothing was done: send the bytes
            log.warning("session host %s cannot open this front's shared memory: sending bytes to it", name)
            self._no_shm.add(name)
            return await self._direct_step(name, access, session_id, grads, request)
        direct.raise_error(answer)
        layout = None
        if layout_bytes:
            layout = self._layouts.get(layout_bytes)
            if layout is None:
                if len(self._layouts) > 1024:
                    self._layouts.clear()
                layout = FlatLayout([(n, tuple(shape), g) for n, shape, g in json.loads(layout_bytes)])
                self._layouts[layout_bytes] = layout
            self._sizes[session_id] = layout.size
        flat = None
        if answer.get("params") == "out" and out is not None:
            flat = out.view(np.float32)
        elif answer.get("params") == "data":
            flat = np.frombuffer(params, dtype=np.float32)
        return StepResult(answer["status"], int(answer["step"]), flat, bool(answer["skipped"]), answer["grad_norm"],
                          int(answer["awaiting"]), layout=layout)  # fmt: skip

    async def params(
        self, access: Access, session_id: str, min_step: int | None = None, timeout: float = 0.0
    ) -> Tensors:
        result: Tensors = await self._call(access, session_id, "params", min_step, timeout)
        return result

    async def export(self, access: Access, session_id: str) -> tuple[list[bytes | memoryview], int]:
        body, step = await self._call(access, session_id, "export")
        return [body], step

    async def restore(
        self, access: Access, session_id: str, body: bytes | bytearray | memoryview
    ) -> tuple[dict[str, Any], bool]:
        data = bytes(body)
        if await self._host(session_id, True) is not None:
            result: tuple[dict[str, Any], bool] = await self._call(access, session_id, "restore", data)
            return result
        if not access.admin:
            raise access.missing(session_id)
        if _shards_of(data) > 1:  # exported from a sharded session: sharded again (else the host loads it, once)
            whole = await to_thread.run_sync(checkpoint.load, data, session_id)
            split = await to_thread.run_sync(shards.split, whole, whole.config.shards)
            parts = [(p.id, p.config, checkpoint.dump(p), None) for p in split]
            return await self._create_sharded(session_id, parts), False
        name = await self._coordinator.place.remote(len(data))
        if not await to_thread.run_sync(directory_reserve, self.namespace, session_id, name):
            return await self.restore(access, session_id, body)  # created meanwhile: replace it
        try:
            info, replaced = await self._handle(name).restore.remote(ADMIN, session_id, data)
        except BaseException as e:
            await to_thread.run_sync(directory_delete, self.namespace, session_id)
            if isinstance(e, RayTaskError):
                raise _cause(e) from None
            raise
        self._where[session_id] = name
        return info, replaced


def _shards_of(body: bytes) -> int:
    """The ``shards`` a checkpoint's config asks for, read from its header alone (1 when it cannot be read: the
    host's full load then answers what is wrong with it)."""
    try:
        config = wire.loads(wire.parse(body).metadata.get("config", "{}"), "checkpoint config")
        return int(config.get("shards", 1)) if isinstance(config, dict) else 1
    except (WireError, TypeError, ValueError):
        return 1


class _HostGone(Exception):
    """The host a call went to is dead or no longer the session's (the call never ran, or ran on a dead node)."""


# The operations that change a session: after their host died while they ran, they are not sent again (503).
MUTATING = frozenset({"step", "patch", "delete", "restore"})


class _suppress_gone:
    """Ignore a coordinator or host that is gone (best-effort calls)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> bool:
        return kind is not None and issubclass(kind, (*GONE, ServiceError, TimeoutError))
