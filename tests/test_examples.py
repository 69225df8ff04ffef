"""Each example runs with one command (a few steps here), against a server it starts itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_train_numpy() -> None:
    out = run("train_numpy.py", "--steps", "60")
    first, last = (float(line.split("loss")[1].split()[0]) for line in (out.splitlines()[2], out.splitlines()[-2]))
    assert "after 60 server steps" in out
    assert last < first


def test_train_torch_remote_and_local_give_the_same_curve() -> None:
    remote = run("train_torch.py", "--epochs", "2", "--max-steps", "30")
    local = run("train_torch.py", "--epochs", "2", "--max-steps", "30", "--local")
    assert "RemoteAdamW" in remote and "torch.optim.AdamW" in local
    curve = [line for line in remote.splitlines() if line.startswith("epoch")]
    assert len(curve) == 2
    assert curve == [line for line in local.splitlines() if line.startswith("epoch")]


def test_train_torch_compare_overlap_against_the_exact_runs(tmp_path: Path) -> None:
    plot = tmp_path / "curves.png"
    out = run("train_torch.py", "--compare", "--epochs", "3", "--max-steps", "60", "--plot", str(plot))
    assert "RemoteAdamW(overlap=True)" in out
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "epoch" not in line]
    assert len(rows) == 3
    table = [[float(c) for c in row[1:]] for row in rows]  # local, remote, overlap loss; then the accuracies
    for local, remote, overlap, *_ in table:
        assert local == remote  # the exact remote run is torch's
        assert overlap != local and abs(overlap - local) < 0.25 * local  # stale gradients: close, not equal
    assert table[-1][2] < table[0][2]  # and it learns
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_two_workers() -> None:
    out = run("two_workers.py", "--steps", "20")
    assert "server step 20" in out and "identical params: True" in out


def test_wire_dtype_accuracy_cost() -> None:
    out = run("wire_dtype.py", "--steps", "60")
    rows = {
        cells[0]: [float(c) for c in cells[1:]]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| wire")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == {"float32", "bfloat16", "float16"}
    assert rows["bfloat16"][0] == rows["float16"][0] == rows["float32"][0] / 2  # half the bytes each way
    assert rows["float32"][3] == 0.0
    for dtype in ("bfloat16", "float16"):
        assert abs(rows[dtype][1] - rows["float32"][1]) < 0.02  # final loss: the cost of rounding is small
