"""The container, without a Docker engine: the Dockerfile lints clean, docker-compose.yml agrees with it, and the
image's exact install steps and start command work in a fresh virtual environment."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from optserve.service.embedded import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (instruction, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(op, rest) for op, _, rest in (line.partition(" ") for line in lines)]


def dockerfile() -> dict[str, Any]:
    """The instructions we rely on, by name (ENV merged)."""
    parsed: dict[str, Any] = {"ENV": {}}
    for op, rest in instructions():
        if op == "ENV":
            parsed["ENV"].update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
        elif op in ("CMD", "VOLUME"):
            parsed[op] = json.loads(rest)
        elif op == "HEALTHCHECK":
            parsed[op] = json.loads(rest[rest.index("CMD") + 3 :].strip())
        else:
            parsed[op] = rest
    return parsed


def test_dockerfile_lints_clean_with_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_one_process_as_non_root_with_a_volume_and_a_healthcheck() -> None:
    d = dockerfile()
    assert d["FROM"].startswith("python:") and "slim" in d["FROM"]
    assert d["USER"] not in ("root", "0")
    assert d["CMD"] == ["optserve", "serve"]  # one uvicorn process, no --workers
    assert d["VOLUME"] == [d["ENV"]["OPTSERVE_DATA_DIR"]]
    assert d["EXPOSE"] == d["ENV"]["OPTSERVE_PORT"]
    assert d["STOPSIGNAL"] == "SIGTERM"
    assert float(d["ENV"]["OPTSERVE_GRACEFUL_SHUTDOWN_SECONDS"]) < 10
    assert "curl" not in json.dumps(d["HEALTHCHECK"])


def test_compose_agrees_with_the_dockerfile() -> None:
    d = dockerfile()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    (service,) = compose["services"].values()
    assert service["command"] == d["CMD"]
    env = service["environment"]
    assert service["ports"] == [f"{env['OPTSERVE_PORT']}:{d['EXPOSE']}"]
    (volume,) = service["volumes"]
    name, target = volume.split(":")
    assert target == env["OPTSERVE_DATA_DIR"] == d["ENV"]["OPTSERVE_DATA_DIR"]
    assert name in compose["volumes"]  # a named volume
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service["healthcheck"]["test"][1:] == d["HEALTHCHECK"] or "healthz" in json.dumps(service["healthcheck"])
    assert service["env_file"] == [".env"]
    assert "OPTSERVE_API_KEY=" in (ROOT / ".env.example").read_text()  # auth on: the key comes from .env


@pytest.mark.server
def test_image_start_command_in_a_fresh_venv_built_by_the_dockerfile_steps(tmp_path: Path) -> None:
    d = dockerfile()
    app = tmp_path / "app"
    app.mkdir()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    for op, rest in instructions():  # the image's COPY and install steps, in order, into a fresh venv
        if op == "COPY":
            *sources, target = rest.split()
            for source in sources:
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, app / target, dirs_exist_ok=True)
                else:
                    shutil.copy(ROOT / source, app / target)
        elif op == "RUN":  # the Python steps; useradd/chown are about the image's users, not the environment
            for step in (s.strip() for s in rest.split("&&")):
                if step.startswith(("pip ", "mkdir -p service", "touch ")):
                    subprocess.run(step, shell=True, cwd=app, env=env, check=True, timeout=600)  # noqa: S602
    port = free_port()
    server_env = {**env, **d["ENV"], "OPTSERVE_PORT": str(port), "OPTSERVE_DATA_DIR": str(tmp_path / "data")}
    server_env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    proc = subprocess.Popen(d["CMD"], cwd=tmp_path, env=server_env)
    try:
        # OPTSERVE_HOST=0.0.0.0 in the image; loopback reaches it
        wait_healthy(f"http://127.0.0.1:{port}", timeout=60, alive=lambda: proc.poll() is None)
        check = subprocess.run(d["HEALTHCHECK"], env=server_env, timeout=10, check=False)
        assert check.returncode == 0
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
