"""The ``optserve`` command against a real server: sessions, checkpoints, loadtest; and the Locust file."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stn

from optserve.client import Client

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
OPTSERVE = str(Path(sys.executable).with_name("optserve"))


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")} | (env or {})
    return subprocess.run([OPTSERVE, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env=environment)  # fmt: skip


def test_one_setting_points_every_tool_at_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``OPTSERVE_PORT=9000 make serve`` and then the CLI, Client() and the optimizers without url=: the same
    address (OPTSERVE_URL when set, else OPTSERVE_HOST/OPTSERVE_PORT)."""
    from procs import start_server_process, stop_server_process

    from optserve.client import RemoteOptimizer

    sp = start_server_process(tmp_path / "data")
    port = sp.url.rsplit(":", 1)[1]
    try:
        for env in ({"OPTSERVE_PORT": port}, {"OPTSERVE_HOST": "0.0.0.0", "OPTSERVE_PORT": port},
                    {"OPTSERVE_URL": sp.url, "OPTSERVE_PORT": "9"}):  # fmt: skip
            listing = cli("sessions", "list", env=env)
            assert listing.returncode == 0, (env, listing.stderr)
            for name in ("OPTSERVE_URL", "OPTSERVE_HOST", "OPTSERVE_PORT"):
                monkeypatch.delenv(name, raising=False)
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            with Client() as client:
                assert client.url == sp.url
                assert client.list_sessions() is not None
            with RemoteOptimizer({"w": np.zeros(2, np.float32)}, lr=0.1) as opt:
                opt.step({"w": np.ones(2, np.float32)})
        assert cli("sessions", "list", env={"OPTSERVE_PORT": "9"}).returncode == 1  # the setting is really used
    finally:
        stop_server_process(sp.proc)


def test_sessions_and_checkpoint_commands(server_process, tmp_path: Path) -> None:
    url = server_process.url
    with Client(url) as client:
        sid = client.create_session({"w": np.arange(4, dtype=np.float32)}, "sgd", hyperparams={"lr": 0.5})["id"]
        client.step(sid, {"w": np.ones(4, np.float32)})
    listing = cli("sessions", "list", "--url", url)
    assert listing.returncode == 0 and sid in listing.stdout
    info = cli("sessions", "info", sid, "--url", url)
    assert info.returncode == 0 and '"step": 1' in info.stdout
    path = tmp_path / "s.safetensors"
    assert cli("checkpoint", "export", sid, str(path), "--url", url).returncode == 0
    np.testing.assert_array_equal(stn.load_file(str(path))["params/w"], np.arange(4, dtype=np.float32) - 0.5)
    assert cli("checkpoint", "import", "copy", str(path), "--url", url).returncode == 0
    with Client(url) as client:
        assert client.session("copy")["step"] == 1
    assert cli("sessions", "delete", "copy", "--url", url).returncode == 0
    missing = cli("sessions", "info", "copy", "--url", url)
    assert missing.returncode == 1 and "404" in missing.stderr


def test_cli_uses_the_token_when_auth_is_on(tmp_path: Path) -> None:
    from procs import start_server_process, stop_server_process

    sp = start_server_process(tmp_path / "data", env={"OPTSERVE_API_KEY": "admin-key"})
    try:
        assert cli("sessions", "list", "--url", sp.url).returncode == 1
        ok = cli("sessions", "list", "--url", sp.url, "--token", "admin-key")
        assert ok.returncode == 0
    finally:
        stop_server_process(sp.proc)


def test_loadtest_reports_and_writes_csv_and_plot(server_process, tmp_path: Path) -> None:
    csv_path, png = tmp_path / "steps.csv", tmp_path / "plot.png"
    args = ["loadtest", "--url", server_process.url, "--clients", "3", "--params", "2000", "--steps", "20"]
    done = cli(*args, "--csv", str(csv_path), "--plot", str(png), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "steps/s" in done.stdout and "latency p99" in done.stdout
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 60 and all(r["ok"] == "1" for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Client(server_process.url) as client:
        assert client.list_sessions() == []  # each simulated client deleted its session


def test_locustfile_runs_headless(server_process, tmp_path: Path) -> None:
    if importlib.util.find_spec("locust") is None:  # never imported here: it monkey-patches the process (gevent)
        pytest.skip("locust is not installed")
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), "--headless", "-u", "4", "-r", "4",
         "-t", "4s", "--host", server_process.url, "--csv", str(tmp_path / "locust"), "--only-summary"],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        env={**os.environ, "OPTSERVE_LOCUST_PARAMS": "1000"},
    )  # fmt: skip
    stats = list(csv.DictReader((tmp_path / "locust_stats.csv").open()))
    step = next(r for r in stats if r["Name"] == "step")
    assert int(step["Request Count"]) > 10, done.stdout + done.stderr
    assert int(step["Failure Count"]) == 0
