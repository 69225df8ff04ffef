"""Sessions on a Ray cluster (``OPTSERVE_STORE=ray``): session-host actors behind stateless HTTP fronts.

- :class:`SessionHost`, one Ray actor per node (named ``optserve-host-<node id>``, detached, pinned to its node,
  restarted by Ray when its process dies, every call run at most once): a :class:`MemoryStore` of the sessions
  placed on that node, with its own limits, snapshots in the shared data folder, eviction and expiry. Steps of
  different sessions run at once (an async actor whose kernels release the GIL).
- The directory, which host holds which session, is Ray's GCS key-value store (``session/<id>`` -> host name): it
  survives the loss of any front or host (the head node is Ray's single point of failure unless its GCS fault
  tolerance is set up). A restarted host reads back the sessions the directory gives it, from their snapshots.
- :class:`Coordinator`, one detached actor on the head node (restarted there by Ray): it places new sessions on the host with the
  most free memory budget, starts a host on every node that joins, and, when a node dies, gives the sessions of
  its host to the surviving hosts, which load them from their last snapshots.
- :class:`RayStore`, the fronts' :class:`~optserve.service.store.SessionStore`: every operation goes to the
  session's host (found in the directory, cached); a host that is gone is waited for (a restart, or the
  coordinator's recovery) for ``OPTSERVE_RAY_RECOVERY_SECONDS``, then the request answers 503. A front holds
  nothing that its restart would lose.

A call to a host runs at most once (``max_task_retries=0``); a call that failed may or may not have run, which is
what a step's If-Match and Idempotency-Key resolve (the client retries with the same key).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
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

from optserve.client.wire import Safetensors  # noqa: E402

from . import fused  # noqa: E402
from .auth import ADMIN, Access  # noqa: E402
from .errors import Conflict, ServiceError, SessionNotFound, StorageUnavailable  # noqa: E402
from .persistence import Saver, Snapshots  # noqa: E402
from .session import SessionConfig, StepResult  # noqa: E402
from .settings import Settings  # noqa: E402
from .store import Health, Lifetimes, Limits, MemoryStore, StepRequest, StoreStats, Tensors  # noqa: E402

log = logging.getLogger("optserve.cluster")

HOST_PREFIX = "optserve-host-"
COORDINATOR = "optserve-coordinator"
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

    @classmethod
    def of(cls, settings: Settings) -> HostConfig:
        limits = Limits(settings.max_sessions, settings.max_tensors_per_session, settings.max_params_per_session,
                        settings.memory_budget_bytes)  # fmt: skip
        lifetimes = Lifetimes(settings.session_ttl_seconds, settings.session_expire_seconds)
        return cls(str(Path(settings.data_dir).resolve()), limits, settings.snapshot_every_steps,
                   settings.snapshot_every_seconds, settings.fsync_every_step, lifetimes,
                   settings.ray_namespace)  # fmt: skip


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


def host_name(node_id: str) -> str:
    return HOST_PREFIX + node_id


def alive_nodes() -> dict[str, dict[str, Any]]:
    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}


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

    async def stats(self) -> dict[str, Any]:
        store = await self._ready()
        s = store.stats()
        return {"name": self.name, "sessions": store.session_ids(), "in_memory": s.sessions, "evicted": s.evicted,
                "parameters": s.parameters, "memory_bytes": s.state_bytes,
                "free_bytes": store.limits.memory_budget_bytes - s.state_bytes, "evictions": s.evictions,
                "reloads": s.reloads, "expired": s.expired, "snapshot_failures": store.saver.failures if store.saver
                else 0, "snapshots_failing": bool(store.saver and store.saver.failing)}  # fmt: skip

    async def create(
        self, session_id: str, config: SessionConfig, params: Mapping[str, np.ndarray], token_digest: str | None
    ) -> dict[str, Any]:
        return await (await self._ready()).create(session_id, config, params, token_digest)

    async def list_sessions(self) -> list[dict[str, Any]]:
        return await (await self._ready()).list_sessions()

    async def check(self, access: Access, session_id: str) -> None:
        await (await self._ready()).check(access, session_id)

    async def info(self, access: Access, session_id: str) -> dict[str, Any]:
        return await (await self._ready()).info(access, session_id)

    async def patch(self, access: Access, session_id: str, values: Mapping[str, Any], group: int | None) -> Any:
        return await (await self._ready()).patch(access, session_id, values, group)

    async def delete(self, access: Access, session_id: str) -> None:
        await (await self._ready()).delete(access, session_id)

    async def step(self, access: Access, session_id: str, grads: Any, request: StepRequest) -> StepResult:
        return await (await self._ready()).step(access, session_id, unportable(grads), request)

    async def params(self, access: Access, session_id: str, min_step: int | None, timeout: float) -> Tensors:
        return await (await self._ready()).params(access, session_id, min_step, timeout)

    async def export(self, access: Access, session_id: str) -> tuple[bytes, int]:
        parts, step = await (await self._ready()).export(access, session_id)
        return b"".join(parts), step

    async def restore(self, access: Access, session_id: str, body: bytes) -> tuple[dict[str, Any], bool]:
        return await (await self._ready()).restore(access, session_id, body)

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
        nodes = await to_thread.run_sync(alive_nodes)
        names = [host_name(node_id) for node_id in nodes]
        await asyncio.gather(*(self._host(node_id).ping.remote() for node_id in nodes))
        await self._refresh()
        return names

    async def _refresh(self) -> None:
        nodes = await to_thread.run_sync(alive_nodes)
        alive = {name: h for name, h in self.hosts.items() if self.node_of[name] in nodes}
        answers = await asyncio.gather(*(h.stats.remote() for h in alive.values()), return_exceptions=True)
        self.stats = {name: a for name, a in zip(alive, answers) if isinstance(a, dict)}

    async def place(self, nbytes: int) -> str:
        """The live host with the most free memory budget."""
        if not self.stats:
            await self._refresh()
        if not self.stats:
            raise StorageUnavailable("no session host is up")
        name = max(self.stats, key=lambda n: self.stats[n]["free_bytes"])
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
        nodes = await to_thread.run_sync(alive_nodes)
        for node_id in nodes:
            self._host(node_id)  # a node that joined gets its host
        await self._refresh()
        dead = {name for name, node_id in self.node_of.items() if node_id not in nodes}
        if not dead or not self.stats:
            return
        namespace = self.config.namespace
        orphans = [
            (sid, host) for sid, host in (await to_thread.run_sync(directory, namespace)).items() if host in dead
        ]
        for session_id, old in orphans:
            target = await self.place(0)
            try:
                await self.hosts[target].adopt.remote(session_id)
            except RayTaskError as e:
                log.error("session %s of %s (node gone) could not be recovered: %s", session_id, old, _cause(e))
                continue
            await to_thread.run_sync(directory_put, namespace, session_id, target)
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
                          "memory_bytes": stats.get("memory_bytes", 0)})  # fmt: skip
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

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await to_thread.run_sync(self._connect)
        await self._coordinator.start.remote()
        await self._refresh_totals()
        self.ready = True

    def _connect(self) -> None:
        if not ray.is_initialized():
            address = self.settings.ray_address
            options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
            if address:
                ray.init(address=address, **options)
            else:  # a local single-node Ray of this front's own
                ray.init(include_dashboard=False, **options)
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

    async def _call(self, access: Access, session_id: str, method: str, *args: Any) -> Any:
        """``method`` on the session's host, waiting for a host that is gone to come back (or its sessions to be
        recovered elsewhere) for ``ray_recovery_seconds``; then 503.

        A change (``MUTATING``) whose host dies while it runs is not sent again: it may have been applied (and
        snapshotted) before the host died, so it answers 503 and the client's retry, with its Idempotency-Key or
        If-Match, decides. Reads are simply asked again of the recovered host."""
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
                    return await self._await(getattr(host, method).remote(access, session_id, *args), session_id)
                except RayTaskError as e:
                    cause = _cause(e)
                    if isinstance(cause, SessionNotFound) and not fresh:  # moved since we looked: look again
                        fresh = True
                        continue
                    raise cause from None
                except (*GONE, _HostGone):
                    if name is not None:
                        self._suspect.add(name)
                    if method in MUTATING:
                        raise StorageUnavailable(
                            f"the host of session {session_id!r} went down during the request, which may or may not "
                            "have been applied; retry it with the same Idempotency-Key (or If-Match)"
                        ) from None
            if time.monotonic() >= deadline:
                raise StorageUnavailable(f"the host of session {session_id!r} is unavailable; try again")
            await asyncio.sleep(0.2)
            fresh = True

    async def _await(self, ref: Any, session_id: str) -> Any:
        """The answer of a call to a host; a call whose host's node died never answers, so every second the wait
        checks that the session's host is still alive and still its host (else :class:`_HostGone`)."""
        future = asyncio.wrap_future(ref.future())
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
        nbytes = sum(int(np.asarray(a).size) for a in params.values()) * 12
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

    async def list_sessions(self) -> list[dict[str, Any]]:
        names = list((await self._coordinator.cluster.remote())["nodes"])
        hosts = [host_name(n["node_id"]) for n in names if n["alive"]]
        answers = await asyncio.gather(*(self._handle(h).list_sessions.remote() for h in hosts), return_exceptions=True)
        return [s for a in answers if isinstance(a, list) for s in a]

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

    async def step(
        self, access: Access, session_id: str, grads: Safetensors | Mapping[str, np.ndarray], request: StepRequest
    ) -> StepResult:
        result: StepResult = await self._call(access, session_id, "step", portable(grads), request)
        return result

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
