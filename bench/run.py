"""optserve benchmark: every figure measured in this one run and printed side by side, as ratios.

    .venv/bin/python bench/run.py            # every table (a few minutes on 2 cores)
    .venv/bin/python bench/run.py --only training --only small   # tables 6 and 3
    .venv/bin/python bench/run.py --quick    # smaller sizes, shorter runs
    .venv/bin/python bench/run.py --only ray # one table (core, remote, small, memory, ray, training, shm)

1. Core step throughput of the fused kernels (AdamW, Adam+amsgrad, SGD momentum, RMSprop) against a same-traffic
   floor kernel (reads p, g, m, v and writes p, m, v with trivial arithmetic), torch 2.13's AdamW (fused and
   foreach, CPU) and the naive numpy formula.
2. Remote step latency over loopback (client encode, HTTP both ways, server decode and step, client decode) against
   a raw TCP echo of the same byte counts plus the core step, with the breakdown of where the time goes.
3. Small-step request rate and latency (1K-parameter sessions, 16 connections, wrk) against a bare FastAPI endpoint
   served by the same uvicorn setup.
4. Server memory per parameter after creating sessions, and RSS over 1000 steps.
5. The Ray store (OPTSERVE_STORE=ray) on a 2-node Ray cluster simulated on this machine: the remote step and the
   small-step rate with the session on the front's node and on the other node, against the single-process server;
   then what N nodes would serve, computed from those figures (a model, not a measurement).
6. A torch training loop (a 5-layer Linear/Tanh MLP at about 1e4 to 1e7 parameters, batch 256; client torch on one
   thread, the server in its own process on one kernel thread): seconds per iteration with local
   ``torch.optim.AdamW(fused=True)``, ``RemoteAdamW`` and ``RemoteAdamW(overlap=True)``, over loopback TCP and over
   the server's Unix socket, and the torch adapter's own time per step over the bare ``Client.step`` of the same
   gradients.
7. One step over the server's Unix socket through shared memory against the same step with its bytes over the
   socket.

Servers run as their own processes on free loopback ports and are stopped by process id.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from optserve.client import Client, wire
from optserve.service import kernels
from optserve.service.embedded import free_port, wait_healthy
from optserve.service.fused import step_range_numpy
from optserve.service.hyperparams import make_hyperparams

HERE = Path(__file__).resolve().parent
OPTSERVE = Path(sys.executable).with_name("optserve")


def timed(fn: Callable[[], object], budget: float = 0.4, min_reps: int = 3, max_reps: int = 200) -> float:
    """Median seconds of ``fn`` after one warm-up call, repeated within about ``budget`` seconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:  # type: ignore[assignment]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
    for note in notes:
        print(f"\n{note}")
    sys.stdout.flush()


def start(cmd: list[str], url: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    if url:
        wait_healthy(url, alive=lambda: proc.poll() is None)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def optserve_server(
    data_dir: str, env: dict[str, str] | None = None, uds: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """``optserve serve`` on a free port (and the Unix socket ``uds``, if given), healthy; its process and URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(OPTSERVE), "serve", "--port", str(port), "--data-dir", data_dir, "--log-level", "warning"]
    return start(cmd + (["--uds", uds] if uds else []), url, env=env), url


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- 1. core step ------------------------------------------------------------------------------------------------


if kernels.AVAILABLE:
    import numba

    @numba.njit(error_model="numpy", nogil=True, cache=True)
    def floor_one(p, g, m, v):  # type: ignore[no-untyped-def]
        """Same memory traffic as AdamW (read p, g, m, v; write p, m, v), trivial arithmetic."""
        for i in range(p.size):
            gi = g[i]
            m[i] = m[i] + gi
            v[i] = v[i] + gi
            p[i] = p[i] + gi


def floor_kernel(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, threads: int) -> None:
    """The floor, split over threads exactly as optserve's kernels split a range."""
    n = p.size
    if threads <= 1 or n < kernels.PARALLEL_MIN:
        floor_one(p, g, m, v)
        return
    bounds = [(n * i // threads) // 64 * 64 for i in range(threads)] + [n]
    futures = [
        kernels._executor().submit(floor_one, p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi])
        for lo, hi in zip(bounds[1:-1], bounds[2:])
    ]
    lo, hi = bounds[0], bounds[1]
    floor_one(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi])
    for f in futures:
        f.result()


def naive_adamw(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, t: int) -> None:
    """The textbook formula written with whole-array numpy expressions."""
    lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 1e-2
    p *= 1 - lr * wd
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    p -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


def core_table(sizes: list[int]) -> dict[int, float]:
    import torch

    rows, adamw_seconds = [], {}
    configs = {
        "adamw": ("adamw", {}),
        "adam+amsgrad": ("adam", {"amsgrad": True}),
        "sgd momentum": ("sgd", {"momentum": 0.9}),
        "rmsprop": ("rmsprop", {}),
    }
    for n in sizes:
        rng = np.random.default_rng(0)
        p = rng.standard_normal(n, dtype=np.float32)
        g = rng.standard_normal(n, dtype=np.float32)
        m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
        seconds: dict[str, float] = {
            "floor 1 thread": timed(lambda: floor_kernel(p, g, m, v, 1)),
            "floor": timed(lambda: floor_kernel(p, g, m, v, kernels.THREADS)),
        }
        m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
        for label, (name, values) in configs.items():
            hp = make_hyperparams(name, values)
            state = {s: np.zeros(n, np.float32) for s in hp.state_names()}
            seconds[label] = timed(
                lambda hp=hp, state=state, name=name: kernels.step_range(name, p, g, state, 0, n, 3, hp)
            )
        hp = make_hyperparams("adamw")
        state = {s: np.zeros(n, np.float32) for s in hp.state_names()}
        seconds["numpy path"] = timed(lambda: step_range_numpy("adamw", p, g, state, 0, n, 3, hp), budget=0.2)
        seconds["naive numpy"] = timed(lambda: naive_adamw(p, g, m, v, 3), budget=0.2)  # fresh m, v: v >= 0
        for mode in ("fused", "foreach"):
            tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
            tp.grad = torch.from_numpy(g.copy())
            opt = torch.optim.AdamW([tp], **{mode: True})
            seconds[f"torch {mode}"] = timed(opt.step, budget=0.3)
            del opt, tp
        adamw_seconds[n] = seconds["adamw"]
        floor = seconds["floor"]
        rows.append(
            [f"{n:.0e}"]
            + [f"{n / seconds[k] / 1e9:.2f}" for k in ("floor 1 thread", "floor", *configs, "numpy path", "torch fused", "torch foreach", "naive numpy")]
            + [f"{seconds['adamw'] / floor:.2f}x", f"{seconds['torch fused'] / seconds['adamw']:.2f}x",
               f"{seconds['adamw'] * 1e3:.2f}"]
        )  # fmt: skip
    table(
        "1. Core step throughput (G params/s, higher is better)",
        ["N", "floor 1 thr", f"floor {kernels.THREADS} thr", "AdamW", "Adam+amsgrad", "SGD mom.", "RMSprop",
         "numpy path", "torch fused", "torch foreach", "naive numpy", "AdamW/floor", "torch fused/AdamW", "AdamW ms"],
        rows,
        [f"optserve's kernels and the floor split ranges of >= {kernels.PARALLEL_MIN} params over {kernels.THREADS} "
         f"threads (OPTSERVE_KERNEL_THREADS); torch uses its default {torch.get_num_threads()} threads. AdamW/floor: "
         "optserve's AdamW time over the same-traffic floor at the same thread count (goal <= 1.10x). torch "
         "fused/AdamW: how many times faster optserve's AdamW is than torch's fused AdamW (goal >= 1.3x)."],
    )  # fmt: skip
    return adamw_seconds


# --- 2. remote step ----------------------------------------------------------------------------------------------


def echo_seconds(port: int, up: int, down: int) -> float:
    payload = memoryview(bytearray(up))
    back = bytearray(down)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def exchange() -> None:
            sock.sendall(struct.pack("<QQ", up, down))
            sock.sendall(payload)
            view, got = memoryview(back), 0
            while got < down:
                got += sock.recv_into(view[got:])

        return timed(exchange, budget=1.0, min_reps=5)


def remote_table(sizes: list[int], core: dict[int, float], data_dir: str) -> None:
    echo_port = free_port()
    echo = start([sys.executable, str(HERE / "echo_server.py"), str(echo_port)])
    time.sleep(0.3)
    server, url = optserve_server(data_dir)
    rows = []
    try:
        with Client(url, timeout=300) as client:
            for n in sizes:
                sid = client.create_session({"w": np.zeros(n, np.float32)}, "adamw")["id"]
                grads = {"w": np.random.default_rng(1).standard_normal(n, dtype=np.float32)}
                up = sum(len(memoryview(p).cast("B")) for p in wire.encode_parts(grads))
                down = up + 16  # the answer carries a step number in its metadata

                def one_step() -> None:
                    client.step(sid, grads).release()

                def one_bf16_step() -> None:  # half the bytes each way; the session keeps float32
                    client.step(sid, grads, dtype="bfloat16", answer_dtype="bfloat16").release()

                timing = {}
                orig = client._send_once  # each request as sent (the core's retries above it)

                def spy(call):  # type: ignore[no-untyped-def]
                    reply = orig(call)
                    timing["st"] = reply.headers.get("server-timing", "")
                    return reply

                client._send_once = spy  # type: ignore[method-assign]
                server_steps = []

                def measured() -> None:
                    one_step()
                    server_steps.append(float(re.search(r"step;dur=([\d.]+)", timing["st"]).group(1)) / 1e3)

                total = timed(measured, budget=1.5, min_reps=5)
                client._send_once = orig  # type: ignore[method-assign]
                bf16 = timed(one_bf16_step, budget=1.5, min_reps=5)
                echo_s = echo_seconds(echo_port, up, down)
                server_s = statistics.median(server_steps)
                rows.append([
                    f"{n:.0e}", f"{up / 1e6:.2f}", f"{echo_s * 1e3:.2f}", f"{core[n] * 1e3:.2f}", f"{total * 1e3:.2f}",
                    f"{total / (echo_s + core[n]):.2f}x", f"{1 / total:.1f}", f"{2 * up / total / 1e6:.0f}",
                    f"{server_s * 1e3:.2f}", f"{(total - server_s) * 1e3:.2f}", f"{bf16 * 1e3:.2f}",
                    f"{bf16 / total:.2f}",
                ])  # fmt: skip
                client.delete_session(sid)
    finally:
        stop(server)
        stop(echo)
    table(
        "2. Remote step over loopback (AdamW, float32 both ways; last two columns: bfloat16 both ways)",
        ["N", "MB each way", "socket echo ms", "core step ms", "remote step ms", "remote/(echo+core)", "steps/s",
         "MB/s (up+down)", "server step ms", "transfer+client ms", "bf16 wire: remote step ms", "bf16/fp32"],
        rows,
        ["remote step: Client.step wall time (encode, send, server decode+check+step+copy, answer, receive, decode), "
         "median. server step: the server's own Server-Timing for the step (gradient checks, fused step, copy of "
         "the answer). transfer+client: the rest. Goal at 1e7: remote/(echo+core) <= 1.5x. bf16 wire: the same "
         "step with the gradients sent and the parameters answered in bfloat16 (half the bytes each way, float32 "
         "master weights on the server), conversions included: a gain where the network, not the CPU, is the "
         "bottleneck (examples/wire_dtype.py shows the accuracy cost)."],
    )  # fmt: skip


# --- 3. small steps ----------------------------------------------------------------------------------------------

WRK_SCRIPT = """
local paths = {}
for line in io.lines("%(paths)s") do paths[#paths + 1] = line end
local f = io.open("%(body)s", "rb"); local body = f:read("*all"); f:close()
wrk.method = "POST"; wrk.body = body
wrk.headers["Content-Type"] = "application/x-safetensors"
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, paths[(i %% #paths) + 1])
end
"""


def wrk(url: str, paths: list[str], body: bytes, seconds: int) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, non-2xx) from wrk with 16 connections on 2 threads."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "paths").write_text("\n".join(paths))
        Path(tmp, "body").write_bytes(body)
        Path(tmp, "post.lua").write_text(WRK_SCRIPT % {"paths": f"{tmp}/paths", "body": f"{tmp}/body"})
        out = subprocess.run(
            ["wrk", "-t2", "-c16", f"-d{seconds}s", "--latency", "-s", f"{tmp}/post.lua", url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        ).stdout  # fmt: skip

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, ms("50%"), ms("99%"), int(errors.group(1)) if errors else 0


class WrkRun(NamedTuple):
    """One wrk run of table 3: its rate, latencies and errors, and the server's CPU time per request."""

    rate: float
    p50: float
    p99: float
    errors: int
    cpu_us: float


def small_table(data_dir: str, seconds: int, rounds: int) -> None:
    """Small steps under wrk against the bare endpoint, in interleaved rounds (bare, 16 sessions, one session):
    each rate is compared with the bare endpoint's in the same round, so that a change in the machine's load
    between runs (here the bare endpoint alone ranged 4100-6400 requests/s from one 8 s run to the next) hits both
    sides of a ratio alike; medians over the rounds."""
    if shutil.which("wrk") is None:
        print("\n## 3. Small steps\n\nskipped: wrk is not installed (Debian: apt-get install wrk)")
        return
    n = 1000
    grads = {"w": np.random.default_rng(2).standard_normal(n, dtype=np.float32)}
    body = wire.encode(grads)
    port = free_port()
    bare = start([sys.executable, str(HERE / "bare_app.py"), str(port), str(len(body) + 16)])
    bare_url = f"http://127.0.0.1:{port}"
    runs: dict[str, list[WrkRun]] = {"bare": [], "16": [], "one": [], "one-nosnap": []}
    # the same one busy session on a server that snapshots by time only: what the snapshot every 100 steps costs
    quiet_dir = os.path.join(data_dir, "no-step-snapshots")
    try:
        wait_healthy_bare(f"{bare_url}/bare")
        server, url = optserve_server(data_dir)
        quiet, quiet_url = optserve_server(quiet_dir, env={"OPTSERVE_SNAPSHOT_EVERY_STEPS": "0"})
        try:
            with Client(url) as client, Client(quiet_url) as quiet_client:
                ids = [client.create_session({"w": np.zeros(n, np.float32)}, "adamw")["id"] for _ in range(16)]
                # one busy session: all 16 connections step the same session (its lock serializes them)
                busy = client.create_session({"w": np.zeros(n, np.float32)}, "adamw")["id"]
                quiet_busy = quiet_client.create_session({"w": np.zeros(n, np.float32)}, "adamw")["id"]
                targets = {"bare": (bare.pid, bare_url, ["/bare"]),
                           "16": (server.pid, url, [f"/v1/sessions/{i}/step" for i in ids]),
                           "one": (server.pid, url, [f"/v1/sessions/{busy}/step"]),
                           "one-nosnap": (quiet.pid, quiet_url, [f"/v1/sessions/{quiet_busy}/step"])}  # fmt: skip
                for _ in range(rounds):
                    for kind, (pid, base, paths) in targets.items():
                        before = cpu_seconds(pid)
                        rate, p50, p99, errors = wrk(base, paths, body, seconds)
                        cpu_us = (cpu_seconds(pid) - before) / (rate * seconds) * 1e6  # per request answered
                        runs[kind].append(WrkRun(rate, p50, p99, errors, cpu_us))
                steps = sum(client.session(i)["step"] for i in ids)
                busy_steps = client.session(busy)["step"]
        finally:
            stop(server)
            stop(quiet)
    finally:
        stop(bare)

    rows, spread = [], []
    labels = {"bare": ("bare FastAPI endpoint", ""), "16": ("optserve step (AdamW), 16 sessions", "16 sessions"),
              "one": ("optserve step (AdamW), ONE session", "ONE session"),
              "one-nosnap": ("ONE session, no snapshot by step count", "")}  # fmt: skip
    for kind, (label, short) in labels.items():
        ratios = [run.rate / bare_run.rate for run, bare_run in zip(runs[kind], runs["bare"])]
        rate, p50, p99, cpu_us = (statistics.median(getattr(run, field) for run in runs[kind])
                                  for field in ("rate", "p50", "p99", "cpu_us"))  # fmt: skip
        errors = sum(run.errors for run in runs[kind])
        rows.append([label, f"{rate:.0f}", f"{p50:.2f}", f"{p99:.2f}", str(errors), f"{cpu_us:.0f}",
                     f"{statistics.median(ratios):.2f}"])  # fmt: skip
        if short:
            spread.append(f"{short} {min(ratios):.2f}-{max(ratios):.2f}")
    bare_rates = [run.rate for run in runs["bare"]]
    table(
        f"3. Small steps: {n} params, 16 connections (wrk -t2 -c16), {rounds} interleaved rounds of {seconds} s each",
        ["endpoint", "requests/s", "p50 ms", "p99 ms", "errors", "server CPU us/request", "rate vs bare"],
        rows,
        [f"The bare endpoint reads the same {len(body)}-byte body and answers as many bytes; both run under the same "
         f"uvicorn setup (httptools protocol, log level warning). Each round runs the bare endpoint, then 16 "
         f"sessions, then one session; rate vs bare is the median over the rounds of each run's rate over the bare "
         f"endpoint's in its round (the other columns: medians of the runs; server CPU: the server process's user and "
         f"system time over the requests it answered, all its threads). Per-round ratios: "
         f"{', '.join(spread)}; the bare endpoint's rate ranged {min(bare_rates):.0f}-{max(bare_rates):.0f}. Steps "
         f"applied by the server: {steps} over the 16 sessions, {busy_steps} in the one session (each equals the "
         "2xx answers wrk counted). Goal: >= 0.70, also when all 16 connections step one session. The last row: "
         "the same busy session on a second server with OPTSERVE_SNAPSHOT_EVERY_STEPS=0 (snapshots every 30 s "
         "only), stepped in the same rounds: what the default snapshot every 100 steps costs (about 50 snapshots a "
         "second here, each written and fsynced by the writer thread)."],
    )  # fmt: skip


def wait_healthy_bare(url: str) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.post(url, content=b"", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(url)


# --- 5. the Ray store ----------------------------------------------------------------------------------------------


def ray_cluster(nodes: int) -> tuple[subprocess.Popen[str], dict[str, object]]:
    """The simulated multi-node cluster the tests use (tests/raycluster.py, every process on 127.0.0.1)."""
    runner = HERE.parent / "tests" / "raycluster.py"
    proc = subprocess.Popen([sys.executable, str(runner), str(nodes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError("the Ray cluster did not start")
    import json

    return proc, json.loads(line)


def ray_front(data_dir: str, address: str, **settings: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(OPTSERVE), "serve", "--port", str(port), "--data-dir", data_dir, "--log-level", "warning"]
    env = {"OPTSERVE_STORE": "ray", "OPTSERVE_RAY_ADDRESS": address, "OPTSERVE_RAY_NAMESPACE": f"bench-{port}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **settings}  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    wait_healthy(url, timeout=300, alive=lambda: proc.poll() is None)
    return proc, url


def placed(client: Client, url: str, n: int, node: str, taken: list[str]) -> str:
    """A new n-param AdamW session on ``node`` ("front": the front's own, "other": the other one); placement goes
    by free memory budget, so sessions created one after another alternate between the nodes."""
    import httpx

    for _ in range(6):
        sid = client.create_session({"w": np.zeros(n, np.float32)}, "adamw")["id"]
        answer = httpx.get(f"{url}/v1/cluster", timeout=60).json()
        home = next(x["node_id"] for x in answer["nodes"] if sid in x["sessions"])
        if (home == answer["front"]["node_id"]) == (node == "front"):
            return sid
        taken.append(sid)  # left on the other node (deleted at the end)
    raise RuntimeError(f"no session landed on the {node} node")


def step_seconds(client: Client, sid: str, n: int) -> float:
    grads = {"w": np.random.default_rng(5).standard_normal(n, dtype=np.float32)}
    return timed(lambda: client.step(sid, grads).release(), budget=1.5, min_reps=5)


def ray_table(data_dir: str, sizes: list[int], seconds: int) -> None:
    if shutil.which("wrk") is None:
        print("\n## 5. The Ray store\n\nskipped: wrk is not installed (Debian: apt-get install wrk)")
        return
    n_small = 1000
    body = wire.encode({"w": np.random.default_rng(2).standard_normal(n_small, dtype=np.float32)})
    step_s: dict[str, dict[int, float]] = {"single": {}, "front": {}, "other": {}, "actor": {}}
    rate: dict[str, float] = {}
    server, url = optserve_server(data_dir)
    try:
        with Client(url, timeout=300) as client:
            for n in sizes:
                sid = client.create_session({"w": np.zeros(n, np.float32)}, "adamw")["id"]
                step_s["single"][n] = step_seconds(client, sid, n)
                client.delete_session(sid)
            ids = [client.create_session({"w": np.zeros(n_small, np.float32)}, "adamw")["id"] for _ in range(16)]
            rate["single"] = wrk(url, [f"/v1/sessions/{i}/step" for i in ids], body, seconds)[0]
    finally:
        stop(server)
    cluster, started = ray_cluster(2)
    try:
        # "front"/"other": the direct data path (the default); "actor": the same node with every step a Ray actor
        # call (OPTSERVE_RAY_DIRECT=false), what the direct path replaced
        for runs, settings in ((("front", "other"), {}), (("actor",), {"OPTSERVE_RAY_DIRECT": "false"})):
            front, url = ray_front(tempfile.mkdtemp(dir=data_dir), str(started["address"]), **settings)
            try:
                with Client(url, timeout=300) as client:
                    taken: list[str] = []
                    for run in runs:
                        where = "other" if run == "other" else "front"
                        for n in sizes:
                            sid = placed(client, url, n, where, taken)
                            step_s[run][n] = step_seconds(client, sid, n)
                            client.delete_session(sid)
                        ids = [placed(client, url, n_small, where, taken) for _ in range(16)]
                        rate[run] = wrk(url, [f"/v1/sessions/{i}/step" for i in ids], body, seconds)[0]
                        for sid in ids + taken:
                            client.delete_session(sid)
                        taken.clear()
            finally:
                stop(front)
    finally:
        cluster.communicate("stop\n", timeout=60)
    rows = []
    for n in sizes:
        single = step_s["single"][n]
        row = [f"remote step, {n:.0e} params (ms)", f"{single * 1e3:.2f}"]
        for run in ("front", "other", "actor"):
            row += [f"{step_s[run][n] * 1e3:.2f}", f"{step_s[run][n] / single:.2f}x"]
        rows.append(row)
    row = [f"small steps, {n_small} params, 16 connections (req/s)", f"{rate['single']:.0f}"]
    for run in ("front", "other", "actor"):
        row += [f"{rate[run]:.0f}", f"{rate[run] / rate['single']:.2f}x"]
    rows.append(row)
    table(
        "5. The Ray store: one front, the session on the front's node or on the other node (2-node cluster on this "
        "machine)",
        ["measure", "single process", "Ray, same node", "ratio", "Ray, other node", "ratio",
         "same node, actor calls", "ratio"],  # fmt: skip
        rows,
        ["Goals: same-node step at 1e7 <= 1.25x the single-process step; small-step rate >= 0.5x. Steps take the "
         "direct path (the host's own socket; shared memory for large ones on the front's node); 'actor calls' is "
         "the same node with OPTSERVE_RAY_DIRECT=false, every step a Ray actor call. Both nodes share this "
         "machine's 2 cores and memory bus, so 'other node' sends the bytes over loopback TCP, but no network.",
         _cluster_model(step_s["front"][sizes[-1]], sizes[-1], rate["front"])],
    )  # fmt: skip


def _cluster_model(step: float, n: int, small_rate: float) -> str:
    """What N nodes would serve: each node's hosts step independently, so capacity grows with the nodes while the
    fronts (one per node, behind a load balancer) keep up; a model from this run's per-host figures."""
    lines = ["Model, not a measurement (computed from the same-node figures above, one front and one host per node, "
             "sessions spread evenly, the network not the limit):"]  # fmt: skip
    for nodes in (1, 4, 16):
        lines.append(f"  {nodes:>2} nodes: {nodes / step:,.0f} steps/s of {n:.0e}-param sessions, "
                     f"{nodes * small_rate:,.0f} small steps/s")  # fmt: skip
    return "\n".join(lines)


# --- 4. memory ---------------------------------------------------------------------------------------------------


def memory_table(data_dir: str, total_params: int, steps: int) -> None:
    rows = []
    for pool in ("0", str(512 << 20)):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(OPTSERVE), "serve", "--port", str(port), "--data-dir", data_dir, "--log-level", "warning"]
        server = start(cmd, url, env={"OPTSERVE_IO_POOL_BYTES": pool})
        label = "I/O pool off" if pool == "0" else "I/O pool 512 MiB (default)"
        try:
            with Client(url, timeout=300) as client:
                idle = rss_bytes(server.pid)
                n = total_params // 4
                grads = {"w": np.random.default_rng(3).standard_normal(n, dtype=np.float32)}
                ids = [client.create_session({"w": np.zeros(n, np.float32)}, "adamw")["id"] for _ in range(4)]
                created = rss_bytes(server.pid)
                for sid in ids:  # a step touches every page of the state (zeroed moments are not resident before)
                    client.step(sid, grads).release()
                stepped = rss_bytes(server.pid)
                rows.append([label, f"4 x {n:.1e} created", f"{(created - idle) / 2**20:.0f}",
                             f"{(created - idle) / (4 * n):.2f}"])  # fmt: skip
                rows.append([label, "after one step each", f"{(stepped - idle) / 2**20:.0f}",
                             f"{(stepped - idle) / (4 * n):.2f}"])  # fmt: skip
                samples = []
                for i in range(steps):
                    client.step(ids[i % 4], grads).release()
                    if i % (steps // 10) == 0 or i == steps - 1:
                        samples.append(rss_bytes(server.pid))
                trace = " ".join(f"{s / 2**20:.0f}" for s in samples)
                rows.append([label, f"{steps} more steps: RSS MiB {trace}", f"{(samples[-1] - idle) / 2**20:.0f}",
                             f"{(samples[-1] - idle) / (4 * n):.2f} (drift {(samples[-1] - samples[0]) / 2**20:+.0f} MiB)"])  # fmt: skip
        finally:
            stop(server)
    rows += factored_rows(data_dir, total_params)
    table(
        "4. Server memory (RSS of the server process above the idle server)",
        ["server", "sessions (fp32)", "RSS MiB", "bytes/param"],
        rows,
        ["The AdamW state itself is 12 bytes/param (params, exp_avg, exp_avg_sq in float32); goal <= 12.5 and a flat "
         "RSS over the steps. With the I/O pool on, the server also keeps for reuse one request-body buffer per "
         "session size in use (4 bytes/param, at most OPTSERVE_IO_POOL_BYTES in all): the "
         "price of not paying fresh-memory page faults on every large step. The last rows hold one 2-D tensor per "
         "session, AdamW next to Adafactor, whose second moment is factored: its state is the tensor's rows plus "
         "its columns (the session's state_bytes), so its session is the parameters and little more."],
    )  # fmt: skip


# --- 6. a training loop --------------------------------------------------------------------------------------------


def mlp(n: int, layers: int = 5) -> tuple[object, int]:
    """A Linear/Tanh stack of ``layers`` square layers holding about ``n`` parameters (2 tensors a layer)."""
    import torch

    width = max(2, round((n / layers) ** 0.5))
    mods: list[torch.nn.Module] = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            mods.append(torch.nn.Tanh())
    return torch.nn.Sequential(*mods), width


def training_table(sizes: list[int], data_dir: str, rounds: int) -> None:
    """Seconds per iteration of one torch loop (zero_grad, forward, backward, step) per optimizer, interleaved in
    rounds so that a change in the machine's load hits all of them alike; medians over the rounds."""
    import torch

    from optserve.client.torch import RemoteAdamW

    torch.set_num_threads(1)
    uds = os.path.join(data_dir, "optserve.sock")
    server, url = optserve_server(data_dir, {"OPTSERVE_KERNEL_THREADS": "1"}, uds)
    urls = {"tcp": url, "unix": f"unix://{uds}"}
    rows = []
    try:
        for n in sizes:
            torch.manual_seed(0)
            model, width = mlp(n)
            params = sum(p.numel() for p in model.parameters())
            x = torch.randn(256, width)
            y = torch.randn(256, width)

            def make(kind: str) -> Any:
                if kind == "local":
                    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                how, transport = kind.split("/")
                extra = {"overlap": True} if how == "overlap" else {}
                try:
                    return RemoteAdamW(model.parameters(), lr=1e-4, url=urls[transport], **extra)  # type: ignore[arg-type]
                except (TypeError, ValueError):  # a client without overlap or without Unix sockets
                    return None

            def iteration(opt: Any) -> None:
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()

            kinds = ("local", "remote/tcp", "overlap/tcp", "remote/unix", "overlap/unix")
            opts = {kind: make(kind) for kind in kinds}
            per_round = max(5, min(200, int(0.25 / max(1e-4, 6 * 256 * params / 3e10))))  # ~0.25 s of compute
            seconds: dict[str, list[float]] = {k: [] for k, o in opts.items() if o is not None}
            for opt in opts.values():
                if opt is not None:
                    for _ in range(3):
                        iteration(opt)
            for _ in range(rounds):
                for kind in seconds:
                    opt = opts[kind]
                    # Overlap is timed in its steady state, as in the middle of a run: a step is in flight when the
                    # timing starts (sent by an untimed iteration) and one when it ends. The wait for the last one
                    # is paid once per run, not per iteration: counted in each round, it added a whole round trip
                    # over the 3-5 iterations of a round at 1e6-1e7 (5-7 % of an iteration).
                    overlapped = kind.startswith("overlap")
                    if overlapped:
                        iteration(opt)
                    t = time.perf_counter()
                    for _ in range(per_round):
                        iteration(opt)
                    seconds[kind].append((time.perf_counter() - t) / per_round)
                    if overlapped:
                        opt.synchronize()
            med = {k: statistics.median(v) for k, v in seconds.items()}
            remote = opts["remote/tcp"]
            # The adapter's own time: optimizer.step()'s wall time less the time spent inside the Client.step it
            # calls (timed around that call). Subtracting the median of a separate bare Client.step instead added
            # a term as large as what it measures: here a Client.step sent at once after another answered 0.1 ms
            # sooner than one sent after a pause, in either order, so the adapter's inner call (after its own
            # gathering) took 0.14-0.2 ms longer than the bare one (sent as soon as the adapter returned). The
            # bare Client.step of the same gradients (as numpy) on a twin session, called in turn, is shown for
            # scale.
            grads = {str(i): p.grad.numpy() for i, p in enumerate(model.parameters())}
            client = remote.client
            sid = client.create_session({str(i): p.detach().numpy() for i, p in enumerate(model.parameters())},
                                        "adamw", hyperparams={"lr": 1e-4})["id"]  # fmt: skip
            inside = [0.0]

            def timed_step(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return Client.step(client, *args, **kwargs)
                finally:
                    inside[0] += time.perf_counter() - t

            adapter, bare = [], []
            reps = max(10, min(1000, int(0.5 / max(1e-4, params * 4e-8))))
            client.step = timed_step  # type: ignore[method-assign]
            try:
                for _ in range(reps):
                    inside[0] = 0.0
                    t = time.perf_counter()
                    remote.step()
                    adapter.append(time.perf_counter() - t - inside[0])
                    t = time.perf_counter()
                    Client.step(client, sid, grads).release()
                    bare.append(time.perf_counter() - t)
            finally:
                del client.step
            client.delete_session(sid)
            over = statistics.median(adapter)
            row = [f"{params:.1e}", f"{len(list(model.parameters()))}", f"{med['local'] * 1e3:.2f}"]
            for kind in kinds[1:]:
                got = med.get(kind)
                row += ["n/a", "n/a"] if got is None else [f"{got * 1e3:.2f}", f"{got / med['local']:.3f}x"]
            rows.append(row + [f"{statistics.median(bare) * 1e3:.3f}", f"{over * 1e3:.3f}"])
            for kind in kinds[1:]:
                if opts[kind] is not None:
                    opts[kind].close(delete=True)
    finally:
        stop(server)
    table(
        f"6. A torch training loop: seconds per iteration ({rounds} interleaved rounds, medians)",
        ["params", "tensors", "local fused AdamW ms", "RemoteAdamW ms", "remote/local", "overlap ms",
         "overlap/local", "unix: RemoteAdamW ms", "remote/local", "unix: overlap ms", "overlap/local",
         "Client.step ms", "adapter over Client.step ms"],
        rows,
        ["A 5-layer Linear/Tanh MLP, batch 256, MSE loss; one iteration is zero_grad, forward, backward, step. The "
         "client's torch runs on 1 thread, the server in its own process with OPTSERVE_KERNEL_THREADS=1, so the "
         "two cores are one for each (other load on the machine shows in every column alike). The first columns "
         "reach the server over loopback TCP (http://127.0.0.1:port), the 'unix:' ones over the Unix socket the "
         "same server listens on (optserve serve --uds, url=unix:///path). Overlap is timed in its steady "
         "state: a step in flight when a round's timing starts and one when it ends (the last one's wait is paid "
         "once per run). Goals: overlap/local "
         "<= 1.05x and remote/local <= 1.15x at 1e6 and 1e7; adapter over Client.step <= 0.15 ms at 1e4 in 10 "
         "tensors (RemoteAdamW.step()'s wall time less the time inside the Client.step it calls, median; Client.step "
         "ms: a bare Client.step of the same gradients as numpy arrays on a twin session, called in turn)."],
    )  # fmt: skip


def shared_memory_table(sizes: list[int], data_dir: str, rounds: int) -> None:
    """One step over the server's Unix socket through shared memory, against the same step with its bytes over the
    socket: two clients of one server, a session each, stepped in turn (medians)."""
    uds = os.path.join(data_dir, "shm.sock")
    server, _ = optserve_server(data_dir, {"OPTSERVE_KERNEL_THREADS": "1"}, uds)
    rows = []
    try:
        with Client(f"unix://{uds}") as shared, Client(f"unix://{uds}", shared_memory=False) as plain:
            for n in sizes:
                rng = np.random.default_rng(0)
                params = {str(i): np.zeros(n // 10, np.float32) for i in range(10)}
                grads = {k: rng.standard_normal(n // 10).astype(np.float32) for k in params}
                ids = {c: c.create_session(params, "adamw")["id"] for c in (shared, plain)}
                times: dict[Client, list[float]] = {shared: [], plain: []}
                reps = max(rounds, min(400, int(2.0 / max(1e-4, n * 3e-9))))
                for r in range(reps + 2):
                    for c in (shared, plain) if r % 2 else (plain, shared):
                        t = time.perf_counter()
                        c.step(ids[c], grads).release()
                        if r >= 2:  # the first step teaches the client the server's offer and the answer's size
                            times[c].append(time.perf_counter() - t)
                for c, sid in ids.items():
                    c.delete_session(sid)
                way = shared._direct.shared if shared._direct is not None else None
                if n * 4 >= 1 << 20 and (way is None or not way.offered):  # the comparison would be of bytes to bytes
                    raise RuntimeError("the shared-memory client did not send its steps through shared memory")
                a, b = statistics.median(times[shared]), statistics.median(times[plain])
                rows.append([f"{n:.0e}", f"{4 * n / 1e6:.0f}" if n >= 10**6 else f"{4 * n / 1e6:.2f}",
                             f"{a * 1e3:.3f}", f"{b * 1e3:.3f}", f"{b / a:.2f}x"])  # fmt: skip
    finally:
        stop(server)
    table(
        "7. One step over the Unix socket: shared memory against bytes (Client.step, AdamW, 10 tensors)",
        ["params", "body MB", "shared memory ms", "bytes over the socket ms", "bytes / shared"],
        rows,
        ["Two clients of one server (OPTSERVE_KERNEL_THREADS=1) over its Unix socket, a session each, stepped "
         "alternately with the same gradients; medians. Through shared memory the client copies the body into a "
         "buffer of its own in /dev/shm and the server writes the parameters into another (the socket carries the "
         "heads); with shared_memory=False the bytes cross the socket both ways. Below 1 MiB both send bytes."],
    )  # fmt: skip


def factored_rows(data_dir: str, total_params: int) -> list[list[str]]:
    """AdamW and Adafactor sessions of one 2-D tensor each, after one step each (I/O pool off): RSS per parameter,
    and the state the session reports."""
    rows = []
    n = total_params // 4
    shape = (1000, n // 1000)
    n = shape[0] * shape[1]
    grads = {"w": np.random.default_rng(3).standard_normal(shape, dtype=np.float32)}
    for optimizer in ("adamw", "adafactor"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(OPTSERVE), "serve", "--port", str(port), "--data-dir", data_dir, "--log-level", "warning"]
        server = start(cmd, url, env={"OPTSERVE_IO_POOL_BYTES": "0"})
        try:
            with Client(url, timeout=300) as client:
                idle = rss_bytes(server.pid)
                ids = [client.create_session({"w": np.zeros(shape, np.float32)}, optimizer)["id"] for _ in range(4)]
                for sid in ids:
                    client.step(sid, grads).release()
                stepped = rss_bytes(server.pid)
                state = client.session(ids[0])["state_bytes"]
                rows.append([f"I/O pool off, {optimizer}", f"4 x {shape[0]}x{shape[1]}, after one step each",
                             f"{(stepped - idle) / 2**20:.0f}",
                             f"{(stepped - idle) / (4 * n):.2f} (params 4 + state {state / n:.4f})"])  # fmt: skip
                for sid in ids:
                    client.delete_session(sid)
        finally:
            stop(server)
    return rows


TABLES = ["core", "remote", "small", "memory", "ray", "training", "shm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs")
    parser.add_argument("--only", choices=TABLES, action="append")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of table 6")
    args = parser.parse_args()
    sizes = [10**4, 10**5, 10**6, 10**7] if args.quick else [10**4, 10**5, 10**6, 10**7, 5 * 10**7]
    only = set(args.only or TABLES)
    print(f"optserve benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"kernel backend: {'numba' if kernels.AVAILABLE else 'numpy'}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="optserve-bench-") as data_dir:
        core = core_table(sizes) if {"core", "remote"} & only else {}
        if "remote" in only:
            remote_table(sizes, core, data_dir)
        if "small" in only:
            small_table(data_dir, 2 if args.quick else 3, 3 if args.quick else 7)
        if "memory" in only:
            memory_table(data_dir, 4 * 10**6 if args.quick else 4 * 10**7, 1000)
        if "ray" in only:
            ray_table(data_dir, [10**4, 10**6, 10**7], 5 if args.quick else 10)
        if "training" in only:
            training_table([10**4, 10**5, 10**6, 10**7], data_dir, 3 if args.quick else args.rounds)
        if "shm" in only:
            shared_memory_table([10**5, 10**6, 10**7], data_dir, 20)


if __name__ == "__main__":
    main()
