"""The distribution: the top-level folders service/ and client/ become optserve.service and optserve.client; the
plain install is the client alone (what a training environment needs), the server and torch are extras."""

from __future__ import annotations

import email.parser
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(tmp_path: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("optserve-*.whl")
    return wheel


def test_wheel_installs_the_folders_as_optserve_packages(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "service/app.py",
        "service/fused.py",
        "service/reference.py",
        "client/wire.py",
        "client/http.py",
        "service/algorithms/__init__.py",
        "service/algorithms/adam.py",
        "service/algorithms/adafactor.py",
    ):
        assert f"optserve/{module}" in names
    assert not any(n.startswith(("service/", "client/", "tests/")) for n in names), "bare top-level packages leaked"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "optserve = optserve.service.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_plain_install_is_the_client_and_the_server_and_torch_are_extras(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = email.parser.Parser().parsestr(metadata).get_all("Requires-Dist")
    plain = sorted(r.split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r)
    assert plain == ["httpx", "numpy"]
    server = [r for r in requires if 'extra == "server"' in r]
    assert {r.split(">")[0].split("[")[0] for r in server} >= {"fastapi", "uvicorn", "numba", "pydantic-settings"}
    (torch,) = [r.split(";")[0].strip() for r in requires if 'extra == "torch"' in r]
    assert ">=" in torch and "==" not in torch, f"optserve[torch] must accept a range of versions, not {torch}"


# Runs in a fresh interpreter in which the server's packages cannot be imported, as after `pip install optserve`.
WITHOUT_SERVER = textwrap.dedent(
    """
    import sys
    for name in ("fastapi", "starlette", "uvicorn", "numba", "pydantic_settings", "prometheus_client", "matplotlib"):
        sys.modules[name] = None  # import raises ModuleNotFoundError, find_spec says None: as if not installed
    """
)


def test_the_client_and_its_cli_work_without_the_servers_packages() -> None:
    code = WITHOUT_SERVER + textwrap.dedent(
        """
        import optserve.client, optserve.client.torch, optserve.client.wire
        from optserve.client import Client, RemoteOptimizer, AsyncClient
        from optserve.service import cli
        try:
            cli.main(["serve"])
        except SystemExit as e:
            print("SERVE:", e)
        try:
            cli.main(["loadtest", "--plot", "x.png", "--url", "http://127.0.0.1:9"])
        except SystemExit as e:
            print("LOADTEST:", e.code)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "SERVE: optserve serve needs the server's dependencies" in out.stdout
    assert "pip install 'optserve[server]'" in out.stdout
    assert "LOADTEST: 1" in out.stdout and "--plot needs matplotlib" in out.stderr  # refused before any step
