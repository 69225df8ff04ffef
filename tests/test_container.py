"""The container files, without a Docker engine: the Dockerfile lints clean, docker-compose.yml agrees with it and the
build context holds only what the image needs. The image itself is built and run on a real engine by
.ci/compose_test.sh (CI runs it after these tests)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

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
    # the host side is configurable, 8000 by default: "${OPTSERVE_HOST_PORT:-8000}:8000"
    assert service["ports"] == [f"${{OPTSERVE_HOST_PORT:-{env['OPTSERVE_PORT']}}}:{d['EXPOSE']}"]
    (volume,) = service["volumes"]
    name, target = volume.split(":")
    assert target == env["OPTSERVE_DATA_DIR"] == d["ENV"]["OPTSERVE_DATA_DIR"]
    assert name in compose["volumes"]  # a named volume
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service["healthcheck"]["test"][1:] == d["HEALTHCHECK"] or "healthz" in json.dumps(service["healthcheck"])
    assert service["env_file"] == [".env"]
    assert "OPTSERVE_API_KEY=" in (ROOT / ".env.example").read_text()  # auth on: the key comes from .env


def test_build_context_is_only_what_the_image_copies() -> None:
    """.dockerignore keeps .venv (GBs with torch), data/, .git and .env (the key) out of the context sent to the
    engine: everything is ignored but what the Dockerfile's COPY lines name."""
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"
    kept = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {src.rstrip("/") for op, rest in instructions() if op == "COPY" for src in rest.split()[:-1]}
    assert kept == copied


def test_ray_compose_file_is_a_ray_cluster_behind_two_fronts_from_the_ray_image() -> None:
    """docker-compose.ray.yml (run for real by .ci/compose_test.sh's suite ray): a Ray head, a Ray worker and two
    fronts, all from the image built with the [ray] extra (the default build stays without Ray), one data volume,
    every answered step on it, Ray on the containers' own addresses, the fronts' own nodes marked to hold no
    sessions."""
    from optserve.service.cluster import FRONT_RESOURCE

    assert dockerfile()["ARG"] == "OPTSERVE_EXTRAS=server"
    compose = yaml.safe_load((ROOT / "docker-compose.ray.yml").read_text())
    services = compose["services"]
    assert set(services) == {"ray-head", "ray-worker", "front-a", "front-b"}
    for service in services.values():
        assert service["image"] == "optserve:ray" and service["build"]["args"] == {"OPTSERVE_EXTRAS": "ray"}
        assert service["volumes"] == ["optserve-data:/data"] and "network_mode" not in service
        assert service["environment"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"  # "0" keeps Ray on 127.0.0.1
        assert "healthcheck" in service  # the image's own checks /healthz, which only the fronts serve
    assert "exec ray start --head " in services["ray-head"]["command"][-1] and "ports" not in services["ray-head"]
    assert "exec ray start --address=ray-head:6379 " in services["ray-worker"]["command"][-1]
    assert "ports" not in services["ray-worker"]
    ports = set()
    for name in ("front-a", "front-b"):
        front = services[name]
        script = front["command"][-1]
        assert f'"{FRONT_RESOURCE}": 1' in script and script.endswith("exec optserve serve")
        env = front["environment"]
        assert env["OPTSERVE_STORE"] == "ray" and env["OPTSERVE_RAY_ADDRESS"] == "ray-head:6379"
        assert env["OPTSERVE_FSYNC_EVERY_STEP"] == "true" and env["OPTSERVE_DATA_DIR"] == "/data"
        assert front["env_file"] == [".env"]
        (port,) = front["ports"]
        ports.add(port.rsplit(":", 1)[0])
    assert len(ports) == 2
    assert "optserve-data" in compose["volumes"]


def test_the_dependency_layer_has_a_folder_for_every_package() -> None:
    """The layer that installs the dependencies builds the project from pyproject.toml before the code is copied:
    setuptools refuses a package whose folder is missing, so the layer must make one for each (a new subpackage
    broke the image build once)."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setup["package-dir"]
    runs = [rest for op, rest in instructions() if op == "RUN"]
    layer = next(r for r in runs if "pip install" in r and "uninstall" in r)
    for package in setup["packages"]:
        top = next(p for p in dirs if package == p or package.startswith(p + "."))
        folder = "/".join([dirs[top], *package[len(top) + 1 :].split(".")]) if package != top else dirs[top]
        assert f"{folder}/__init__.py" in layer, f"the dependency layer makes no {folder}/ for {package}"
