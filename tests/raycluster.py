"""A multi-node Ray cluster simulated on this machine (``ray.cluster_utils.Cluster``, as Ray's own tests use it), run
in a process of its own and driven line by line over stdin/stdout, so that tests can start and kill nodes while the
optserve fronts under test are separate processes (a process is the driver of one Ray cluster at most).

    python tests/raycluster.py NODES        -> prints {"address", "nodes": [{"node_id", "pids"}]} as one JSON line
    then commands, one per line: "kill I" (SIGKILL node I's processes: I=0 is the head), "add", "drop" (kill every
    named actor: the deployments the fronts of a test left behind), "stop"

Every Ray process listens on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before Ray is imported; the test
checks with ``ss -ltnp``); node deaths are detected within ~5 s (health checks every second, 5 misses). The
runner stops every node it started, by process id, when it is told to stop, when its stdin closes, or on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# always a folder of its own: the processes to stop at the end are found by it (an inherited RAY_TMPDIR would be
# the parent's, whose processes, the parent included, are not this runner's to kill)
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rc", dir="/tmp")

from ray.cluster_utils import Cluster  # noqa: E402

# A dead node is noticed in about 5 s; tighter checks (500 ms x 3) marked live nodes dead on a loaded 2-core machine
HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5, "health_check_timeout_ms": 1000,
          "health_check_initial_delay_ms": 1000}  # fmt: skip
NODE = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "object_store_memory": 256 * 1024 * 1024}  # fmt: skip


def describe(node) -> dict[str, object]:  # type: ignore[no-untyped-def]
    pids = [p.process.pid for procs in node.all_processes.values() for p in procs if p.process is not None]
    return {"node_id": node.node_id, "pids": pids}


def ours() -> list[int]:
    """Every process of this cluster: started with this runner's RAY_TMPDIR in its environment (raylets, the GCS,
    their workers and actors, whoever their parent is now)."""
    marker = f"RAY_TMPDIR={os.environ['RAY_TMPDIR']}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (os.getpid(), os.getppid()):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def drop_deployments(address: str) -> int:
    """Kill every named actor of the cluster: the coordinators and session hosts of the deployments a test's fronts
    made. A deployment outlives its fronts (its sessions are the cluster's), and each one left would go on
    supervising the cluster twice a second (about 0.08 of a core for a coordinator and three hosts, measured) for
    the rest of the module. This runner joins the cluster as a driver the first time."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False, include_dashboard=False)
    killed = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        try:
            ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]), no_restart=True)
        except ValueError:  # gone meanwhile
            continue
        killed += 1
    return killed


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "_system_config": HEALTH})
    nodes = [cluster.head_node]

    def stop(*_: object) -> None:
        stopper = threading.Thread(target=cluster.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout=30)
        for pid in ours():  # whatever the shutdown left (it waits on processes that may never exit)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    for _ in range(int(sys.argv[1]) - 1):
        nodes.append(cluster.add_node(**NODE))
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "nodes": [describe(n) for n in nodes]}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "kill":
            node = nodes[int(command[1])]
            cluster.remove_node(node, allow_graceful=False)
            print(json.dumps({"killed": node.node_id}), flush=True)
        elif command[0] == "add":
            try:  # waits for this node only (wait_for_nodes would wait for every node ever added, dead ones too)
                node = cluster.add_node(wait=True, **NODE)
            except Exception as e:  # noqa: BLE001 - the test reads the answer
                print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
                continue
            nodes.append(node)
            print(json.dumps(describe(node)), flush=True)
        elif command[0] == "drop":
            print(json.dumps({"dropped": drop_deployments(cluster.address)}), flush=True)
        elif command[0] == "stop":
            break
    stop()


if __name__ == "__main__":
    main()
