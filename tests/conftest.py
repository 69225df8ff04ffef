"""Shared fixtures: a real uvicorn server in a thread (for tests that also look inside it) and a real
``optserve serve`` process (for end-to-end tests), both on free loopback ports."""

from __future__ import annotations

import gc
import itertools
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from procs import Server, ServerProcess, start_server_process, stop_server_process

from optserve.service.embedded import EmbeddedServer, serve_in_thread

# Before any test module imports Ray (one does at collection): else Ray binds the machine's address, not 127.0.0.1
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _xdist_group(item: pytest.Item) -> str:
    """The worker a test runs on, when `make test` spreads the suite over workers (pytest-xdist, ``--dist
    loadgroup``): every test on the test process's Ray together (one Ray per run, not one per worker), the multi-node
    cluster's tests together (its module fixture starts the cluster once, and they run in their order), and any other
    test with the rest of its file (module fixtures once, the file's order kept)."""
    callspec = getattr(item, "callspec", None)
    uses_ray = "ray_cluster" in getattr(item, "fixturenames", ())
    if uses_ray or (callspec is not None and callspec.params.get("store_kind") == "ray"):
        return "ray"
    return item.nodeid.split("::", 1)[0]


def _spread(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "loadgroup", False))  # what xdist's workers read for --dist loadgroup


def pytest_configure(config: pytest.Config) -> None:
    # the controller, before any worker starts: a worker's refusal (below) reaches the terminal only as xdist's
    # internal error, without its message
    if getattr(config.option, "dist", "no") == "loadgroup" and not hasattr(config, "workerinput"):
        import xdist  # noqa: PLC0415 - only where the suite is spread

        if pytest.version_tuple[:2] >= (9, 2) and tuple(int(n) for n in xdist.__version__.split(".")[:2]) <= (3, 8):
            raise pytest.UsageError(_UNGROUPED)


_UNGROUPED = (
    "pytest-xdist does not group the tests under pytest 9.2 (pytest-dev/pytest-xdist#1386), so the tests on Ray"
    " would run on every worker: install pytest<9.2, as the test extra asks, or run with TEST_WORKERS=0"
)


def pytest_itemcollected(item: pytest.Item) -> None:
    # here, before xdist's own pytest_collection_modifyitems reads the marks
    if _spread(item.config):
        item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))


# The two heavy groups first (run with --no-loadscope-reorder), so that they start at once instead of one of them
# ending the run alone. Ordering every group longest first by measured durations (test_cluster 384 s, ray 299,
# test_durability 168, test_reliability 136, then 57 s and less) showed no gain here: 13:42 and 15:57 against 12:41
# and 13:08 for this order, on a machine whose speed varied as much from run to run.
_FIRST = {"tests/test_cluster.py": 0, "ray": 1}


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture parameters
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _spread(config):
        return
    groups = {item: item.get_closest_marker("xdist_group").args[0] for item in items}  # type: ignore[union-attr]
    ungrouped = [item.nodeid for item, group in groups.items() if not item.nodeid.endswith(f"@{group}")]
    if ungrouped:  # xdist's hook (it ran before this one) names the group in the node id the scheduler reads
        raise pytest.UsageError(f"{ungrouped[0]} and {len(ungrouped) - 1} more are in no group. {_UNGROUPED}")
    items.sort(key=lambda item: _FIRST.get(groups[item], len(_FIRST)))  # stable: the order in a group kept


@pytest.fixture(scope="session")
def ray_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local single-node Ray cluster for this test process (the driver): every Ray process on 127.0.0.1, its
    files under a short temporary folder (socket paths are length-limited), stopped at the end."""
    first = getattr(request, "_pyfuncitem", None)  # the test that needs it first
    if _spread(request.config) and first is not None and _xdist_group(first) != "ray":
        pytest.fail(
            f"{first.nodeid} uses the test process's Ray but runs outside the workers' 'ray' group, so a second Ray"
            " would start: request the ray_cluster fixture (e.g. pytestmark = pytest.mark.usefixtures('ray_cluster'))"
            " or parametrize over store_kind",
            pytrace=False,
        )
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="r", dir="/tmp"))
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A real uvicorn server running the app in a background thread of this process."""
    with serve_in_thread(tmp_path_factory.mktemp("data")) as embedded:
        yield embedded


@pytest.fixture
def http(server: EmbeddedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector off: pooled buffers must come back through reference counts alone."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``optserve serve`` on a free port with its output in a log file; every process started is stopped (by
    pid) at the end of the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        data_dir: Path, env: dict[str, str] | None = None, log_level: str = "warning", port: int | None = None
    ) -> Server:
        log = tmp_path / f"server-{next(_log_numbers)}.log"
        sp = start_server_process(data_dir, env, log=log, log_level=log_level, port=port, timeout=180)
        procs.append(sp.proc)
        return Server(sp.url, sp.proc, data_dir, log)

    try:
        yield start
    finally:
        for proc in procs:
            stop_server_process(proc)


_log_numbers = itertools.count()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    sp = start_server_process(tmp_path / "data")
    yield sp
    stop_server_process(sp.proc)
