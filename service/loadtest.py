"""``optserve loadtest``: N concurrent simulated training clients, each stepping its own session.

Bounded by a duration or a number of steps per client, it talks only to the given URL, shows a live progress line
and ends with a table (steps/s, MB/s, latency percentiles, errors), optionally a CSV of every step and a PNG of
throughput and latency over time (needs matplotlib).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optserve.client import AsyncClient, OptserveError, Retry, wire

MAX_SECONDS = 3600.0


@dataclass
class Record:
    client: int
    started: float  # seconds since the start of the run
    latency: float
    ok: bool
    error: str = ""


@dataclass
class Report:
    records: list[Record] = field(default_factory=list)
    seconds: float = 0.0
    bytes_per_step: int = 0

    def summary(self) -> dict[str, float]:
        ok = [r.latency for r in self.records if r.ok]
        lat = np.array(ok) * 1e3 if ok else np.array([math.nan])
        steps = len(ok)
        return {
            "steps": steps,
            "errors": len(self.records) - steps,
            "steps_per_s": steps / self.seconds if self.seconds else 0.0,
            "mb_per_s": 2 * steps * self.bytes_per_step / self.seconds / 1e6 if self.seconds else 0.0,
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
        }


async def _client(
    index: int, url: str, token: str | None, params: int, optimizer: str, deadline: float, steps: int | None,
    report: Report, t0: float,
) -> None:  # fmt: skip
    rng = np.random.default_rng(index)
    async with AsyncClient(url, token=token, retry=Retry(attempts=3, backoff=0.05), timeout=60.0) as client:
        info = await client.create_session({"w": np.zeros(params, np.float32)}, optimizer)
        sid, step = info["id"], info["step"]
        grads = {"w": rng.standard_normal(params, dtype=np.float32) * 1e-3}
        report.bytes_per_step = sum(len(memoryview(p).cast("B")) for p in wire.encode_parts(grads))
        done = 0
        try:
            while time.monotonic() < deadline and (steps is None or done < steps):
                started = time.monotonic()
                try:
                    result = await client.step(sid, grads, if_match=step, minimal=False)
                    step = result.step
                    report.records.append(Record(index, started - t0, time.monotonic() - started, True))
                except OptserveError as e:
                    report.records.append(
                        Record(index, started - t0, time.monotonic() - started, False, type(e).__name__)
                    )
                    await asyncio.sleep(0.05)
                    info = await client.session(sid)
                    step = info["step"]
                done += 1
        finally:
            await client.delete_session(sid)


async def _progress(report: Report, t0: float, total_seconds: float | None, stop: asyncio.Event) -> None:
    while not stop.is_set():
        elapsed = time.monotonic() - t0
        ok = sum(r.ok for r in report.records)
        errors = len(report.records) - ok
        width = 30
        frac = min(1.0, elapsed / total_seconds) if total_seconds else 0.0
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        recent = [r.latency for r in report.records[-200:] if r.ok]
        p50 = np.percentile(recent, 50) * 1e3 if recent else float("nan")
        sys.stderr.write(
            f"\r[{bar}] {elapsed:6.1f}s  steps {ok:7d}  {ok / max(elapsed, 1e-9):8.1f}/s  p50 {p50:7.2f} ms  "
            f"errors {errors}"
        )
        sys.stderr.flush()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
    sys.stderr.write("\n")


async def run(
    url: str, clients: int, params: int, seconds: float | None, steps: int | None, optimizer: str = "adamw",
    token: str | None = None, progress: bool = True,
) -> Report:  # fmt: skip
    """Run the load; stops after ``seconds`` (at most an hour) or ``steps`` per client, whichever comes first."""
    if seconds is None and steps is None:
        raise ValueError("give a duration or a number of steps")
    seconds = min(seconds if seconds is not None else MAX_SECONDS, MAX_SECONDS)
    report = Report()
    t0 = time.monotonic()
    stop = asyncio.Event()
    bar = asyncio.create_task(_progress(report, t0, seconds if steps is None else None, stop)) if progress else None
    try:
        await asyncio.gather(
            *(_client(i, url, token, params, optimizer, t0 + seconds, steps, report, t0) for i in range(clients))
        )
    finally:
        stop.set()
        if bar is not None:
            await bar
    report.seconds = time.monotonic() - t0
    return report


def table(report: Report, clients: int, params: int) -> str:
    s = report.summary()
    rows = [
        ("clients x params", f"{clients} x {params}"),
        ("duration", f"{report.seconds:.1f} s"),
        ("steps", f"{s['steps']:.0f}"),
        ("steps/s", f"{s['steps_per_s']:.1f}"),
        ("MB/s (up+down)", f"{s['mb_per_s']:.1f}"),
        ("latency p50", f"{s['p50_ms']:.2f} ms"),
        ("latency p95", f"{s['p95_ms']:.2f} ms"),
        ("latency p99", f"{s['p99_ms']:.2f} ms"),
        ("errors", f"{s['errors']:.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def write_csv(report: Report, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["client", "started_s", "latency_ms", "ok", "error"])
        for r in sorted(report.records, key=lambda r: r.started):
            writer.writerow([r.client, f"{r.started:.6f}", f"{r.latency * 1e3:.3f}", int(r.ok), r.error])


def plot(report: Report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from e
    ok = sorted((r for r in report.records if r.ok), key=lambda r: r.started)
    if not ok:
        raise SystemExit("nothing to plot: no successful step")
    t = np.array([r.started for r in ok])
    lat = np.array([r.latency for r in ok]) * 1e3
    edges = np.arange(0.0, max(t.max(), 1.0) + 1.0, 1.0)
    counts, _ = np.histogram(t, edges)
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.plot(edges[:-1], counts)
    a.set_ylabel("steps/s")
    a.set_title("optserve loadtest")
    b.plot(t, lat, ".", markersize=2, alpha=0.4, label="step")
    p99 = [
        np.percentile(lat[(t >= lo) & (t < lo + 1)], 99) if ((t >= lo) & (t < lo + 1)).any() else np.nan
        for lo in edges[:-1]
    ]
    b.plot(edges[:-1], p99, label="p99 per second")
    b.set_ylabel("latency ms")
    b.set_xlabel("seconds")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
