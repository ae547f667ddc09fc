"""examples/quickstart.ipynb, executed with nbclient on an ipykernel of this environment."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
if importlib.util.find_spec("ipykernel") is None:  # found, not imported: ipykernel in sys.modules would make
    pytest.skip("needs ipykernel", allow_module_level=True)  # this process look like a notebook to the progress bar


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """A kernelspec for this interpreter, installed in a temporary prefix (a fresh CI venv has none)."""
    prefix = tmp_path_factory.mktemp("kernel")
    subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", "fitkit-test"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return str(prefix / "share" / "jupyter")


def _run(tmp_path: Path, kernel: str, monkeypatch, first_cell: str | None = None):
    monkeypatch.setenv("JUPYTER_PATH", kernel)
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    if first_cell is not None:
        notebook.cells.insert(0, nbformat.v4.new_code_cell(first_cell))
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="fitkit-test", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return notebook


def _texts(outputs) -> str:
    parts = []
    for output in outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output:
            parts.append(output.data.get("text/plain", ""))
    return "\n".join(parts)


def _check(notebook, tmp_path: Path) -> list:
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    everything = [output for cell in code for output in cell.outputs]
    assert not [o for o in everything if o.output_type == "error"], _texts(everything)
    assert "Traceback" not in _texts(everything)
    fit_cell = next(cell for cell in code if "trainer.fit(" in cell.source)
    evaluate_cell = next(cell for cell in code if "trainer.evaluate(" in cell.source)
    final = re.search(r"final validation: loss (\d\.\d{4}) - accuracy (\d\.\d{4})", _texts(evaluate_cell.outputs))
    assert final is not None, _texts(evaluate_cell.outputs)
    assert 0.0 < float(final.group(2)) <= 1.0
    assert 'Model: "Sequential"' in _texts(fit_cell.outputs)  # the summary, printed once at fit start
    assert (tmp_path / "checkpoints" / "quickstart_notebook" / "last.pt").exists()
    plot_cell = next(cell for cell in code if "history.plot()" in cell.source)
    assert any("image/png" in o.get("data", {}) for o in plot_cell.outputs)
    return fit_cell.outputs


@pytest.mark.slow  # starts a kernel and trains
def test_quickstart_with_widget_bars(tmp_path, kernel, monkeypatch):
    pytest.importorskip("ipywidgets")
    notebook = _run(tmp_path, kernel, monkeypatch)
    outputs = _check(notebook, tmp_path)
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    epochs = len(re.findall(r"Epoch \d+/20", _texts(outputs)))
    assert widgets and len(outputs) <= 2 * len(widgets) + 2  # bars (a training and a validation one per epoch)
    assert epochs == 0 or epochs <= len(widgets)


@pytest.mark.slow  # starts a kernel and trains
def test_quickstart_without_ipywidgets_keeps_one_output_per_epoch(tmp_path, kernel, monkeypatch):
    notebook = _run(tmp_path, kernel, monkeypatch, "import sys\nsys.modules['ipywidgets'] = None  # not installed")
    outputs = _check(notebook, tmp_path)
    lines = [o for o in outputs if o.output_type == "display_data"]
    epochs = re.findall(r"Epoch (\d+)/20 \[#{20}\] 25/25", _texts(outputs))
    assert [int(e) for e in epochs] == list(range(1, len(lines) + 1))  # one line per epoch, each at its end
    assert len(outputs) == len(lines) + 1  # and the summary: no output per refresh
