"""History.plot with matplotlib (a real figure, saved as a PNG)."""

from __future__ import annotations

import sys

import pytest
from helpers import make_classification, make_trainer

from fitkit import History

pytest.importorskip("matplotlib")


def _lines(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_one_axis_per_metric_with_its_val_twin_and_a_png(tmp_path):
    x, y = make_classification(n=24)
    history = make_trainer(metrics=["accuracy"]).fit((x, y), (x, y), epochs=4, batch_size=8, validation_freq=2)
    figure = history.plot(path=tmp_path / "plots" / "history.png")
    assert (tmp_path / "plots" / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy", "lr"]
    loss = _lines(axes[0])
    assert loss["train"] == ([1, 2, 3, 4], history.history["loss"])
    assert loss["validation"] == ([2, 4], history.history["val_loss"])  # validated epochs only
    assert axes[2].get_yscale() == "log"


def test_chosen_keys_and_errors(monkeypatch):
    history = History()
    for epoch, (loss, val_loss) in enumerate([(1.0, 1.2), (0.5, 0.9)]):
        history.on_epoch_end(epoch, {"loss": loss, "val_loss": val_loss, "lr": 0.1})
    figure = history.plot(["loss"])
    assert [ax.get_title() for ax in figure.axes] == ["loss"]
    with pytest.raises(
        KeyError, match=r"History.plot: no such key\(s\) \['accuracy'\] in the history; available: \['loss', 'lr'\]"
    ):
        history.plot(["accuracy"])
    with pytest.raises(
        TypeError, match=r"keys must be a list of metric names such as \['loss', 'accuracy'\], got 'loss'"
    ):
        history.plot("loss")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'matplotlib, which is not installed: pip install "fitkit\[plot\]"'):
        history.plot()


def test_epochs_of_survive_a_checkpoint_and_old_checkpoints_load():
    history = History()
    history.on_epoch_end(0, {"loss": 1.0})
    history.on_epoch_end(1, {"loss": 0.5, "val_loss": 0.7})
    restored = History()
    restored.load_state_dict(history.state_dict())
    assert restored.epochs_of == {"loss": [0, 1], "val_loss": [1]}
    old = {k: v for k, v in history.state_dict().items() if k != "epochs_of"}
    restored.load_state_dict(old)
    assert restored.epochs_of == {"loss": [0, 1]}
