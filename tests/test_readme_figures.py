"""The figures and commands the README states for a newcomer are the ones this repository gives.

The main example's accuracy is a fact of the code and the default seed (the time is the machine's: measured, not
tested); the CPU-only install installs every CUDA-built wheel the extras need from torch's CPU index.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.markdown_blocks import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _main_example():
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples" / "train_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the main example's 30 epochs (~10 s of CPU)
def test_the_readme_states_the_accuracy_the_main_example_prints(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    stated = re.search(
        r"prints the final validation accuracy: (\d+\.\d)% after (\d+) epochs with the default seed", README
    )
    assert stated is not None, "the README no longer states the main example's accuracy in the words this test reads"
    example = _main_example()
    argv = [
        "--verbose",
        "0",
        "--device",
        "cpu",
        "--checkpoint-dir",
        str(tmp_path / "c"),
        "--log-dir",
        str(tmp_path / "r"),
    ]
    assert example.main(argv) * 100 == pytest.approx(float(stated[1]), abs=0.05), (
        "the README's accuracy for `python examples/train_digits.py` is not the one it prints"
    )
    assert int(stated[2]) == 30  # the example's default --epochs


def test_the_cpu_only_install_takes_torch_and_torchvision_from_the_cpu_index():
    """PyPI's Linux torchvision is a CUDA build (it bundles libcudart and libnvjpeg), so the examples and dev extras
    need torchvision from the CPU index too, installed before the extras (which a CPU torch then satisfies)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    cpu = [b for b in blocks if "download.pytorch.org/whl/cpu" in b]
    assert len(cpu) == 1, "one README block installs torch's CPU build"
    lines = cpu[0].splitlines()
    index = next(i for i, line in enumerate(lines) if "whl/cpu" in line)
    assert re.search(r"pip install torch torchvision --index-url https://download\.pytorch\.org/whl/cpu", lines[index])
    assert any('pip install -e ".[dev,docs]"' in line for line in lines[index + 1 :]), "the extras come after"
    assert "torchvision" in (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # what makes torchvision needed
