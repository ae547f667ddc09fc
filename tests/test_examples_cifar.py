"""examples/cifar10_resnet.py runs end to end on torchvision's FakeData, in a subprocess as a user runs it:
a few steps of a ResNet-18 with DataLoader workers, checkpoints, TensorBoard, and a resumed second run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow  # each test runs the example script in a subprocess

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "cifar10_resnet.py"


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--fake-data",
        "--fake-size",
        "40",
        "--batch-size",
        "8",
        "--steps-per-epoch",
        "2",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--verbose",
        "2",
        "--checkpoint-dir",
        str(tmp_path / "checkpoints"),
        "--log-dir",
        str(tmp_path / "runs"),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)


@pytest.mark.timeout(300)
def test_cifar_example_trains_checkpoints_logs_and_resumes_on_fake_data(tmp_path):
    first = _run(tmp_path, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained 1 epoch(s) on cpu (32)" in first.stdout
    assert "val_accuracy" in first.stdout
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert len(list((tmp_path / "checkpoints").glob("epoch01-*.pt"))) == 1
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))

    # The same command with more epochs resumes from last.pt and trains only the new epoch.
    second = _run(tmp_path, "--epochs", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "trained 1 epoch(s)" in second.stdout
    assert "Epoch 2/2" in second.stderr and "Epoch 1/2" not in second.stderr


def test_cifar_example_says_how_to_get_the_data_when_it_is_missing(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "nothing"), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "CIFAR-10 is not in" in result.stderr
    assert "Pass --download to fetch it (~170 MB), --data-dir to point at a copy, or --fake-data" in result.stderr
