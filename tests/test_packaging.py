"""The distribution maps the top-level folders service/ and client/ onto optserve.service and optserve.client."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_the_folders_as_optserve_packages(tmp_path: Path) -> None:
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
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("service/app.py", "service/fused.py", "service/reference.py", "client/wire.py", "client/http.py"):
        assert f"optserve/{module}" in names
    assert not any(n.startswith(("service/", "client/", "tests/")) for n in names), "bare top-level packages leaked"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "optserve = optserve.service.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
