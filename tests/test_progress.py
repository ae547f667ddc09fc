"""ProgressBar: lines off a terminal, a tqdm bar on one."""

from __future__ import annotations

import io
import os

import pytest
from helpers import FakeTrainer, make_classification, make_trainer

from fitkit.callbacks import ProgressBar
from fitkit.callbacks.progress import format_logs


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fit(bar, epochs=2, **fit):
    x, y = make_classification(n=16)
    trainer = make_trainer(callbacks=[bar])  # verbose=0: the trainer adds no bar of its own
    trainer.fit((x, y), (x, y), epochs=epochs, batch_size=4, **fit)
    return trainer


@pytest.mark.parametrize("mode", ["bar", "epoch"])
def test_off_a_terminal_one_line_per_epoch(mode):
    stream = io.StringIO()
    _fit(ProgressBar(mode=mode, file=stream))
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2
    for epoch, line in enumerate(lines, start=1):
        assert line.startswith(f"Epoch {epoch}/2 - ")
        assert "s - loss: " in line and " - val_loss: " in line and " - lr: 0.1" in line


def test_off_a_terminal_progress_lines_when_asked():
    stream = io.StringIO()
    _fit(ProgressBar(file=stream, log_every_seconds=1e-9), epochs=1)
    lines = stream.getvalue().splitlines()
    assert [line.split(" - ")[1] for line in lines[:4]] == ["batch 1/4", "batch 2/4", "batch 3/4", "batch 4/4"]
    assert lines[-1].startswith("Epoch 1/1 - ") and "val_loss" in lines[-1]


def test_a_terminal_gets_a_tqdm_bar_with_the_validation_results():
    stream = FakeTTY()
    _fit(ProgressBar(file=stream, refresh_interval=1e-9))
    text = stream.getvalue()
    assert "\r" in text  # tqdm redraws in place
    assert "Epoch 1/2" in text and "Epoch 2/2" in text
    final = text.split("\r")[-1]
    assert "4/4" in final and "val_loss: " in final and "loss: " in final


class SizedTTY(FakeTTY):
    """Text kept in memory, with the file number of a real pseudo-terminal of ``columns`` columns: tqdm asks
    the terminal its width (os.get_terminal_size on fileno())."""

    def __init__(self, columns: int) -> None:
        import fcntl
        import pty
        import struct
        import termios

        super().__init__()
        self._fds = pty.openpty()
        fcntl.ioctl(self._fds[1], termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))

    def fileno(self) -> int:
        return self._fds[1]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        super().close()


@pytest.mark.parametrize("columns", [60, 400])
def test_a_narrow_terminal_still_shows_every_value_of_the_epoch(columns):
    # tqdm cuts its line at the terminal's width: the val_* values at the end of the epoch's line were lost.
    stream = SizedTTY(columns)
    assert os.get_terminal_size(stream.fileno()).columns == columns
    _fit(ProgressBar(file=stream, refresh_interval=1e-9), epochs=1)
    text = stream.getvalue()
    shown = [segment.rstrip("\n") for segment in text.replace("\n", "\r").split("\r")]
    stream.close()
    assert all(len(segment) < columns for segment in shown if segment.startswith("Epoch 1/1: "))  # the bar fits
    final = [segment for segment in shown if "val_loss: " in segment]
    assert final, text
    assert "loss: " in final[-1] and "val_loss: " in final[-1] and "lr: 0.1" in final[-1]
    # On the bar's line when it fits; else the bar keeps the counts and the values get a line of their own.
    own_line = [segment for segment in shown if segment.startswith("Epoch 1/1 - ")]
    assert len(own_line) == (1 if columns == 60 else 0)


def test_a_callback_failing_in_on_train_begin_is_the_error_fit_raises():
    # ProgressBar.on_train_end (run to release resources) read a bar that on_train_begin had not made yet: the
    # AttributeError replaced the first callback's error.
    from fitkit.callbacks import LambdaCallback

    def refuse(logs):
        raise ValueError("refused before training")

    x, y = make_classification(n=16)
    trainer = make_trainer(callbacks=[LambdaCallback(on_train_begin=refuse), ProgressBar(file=FakeTTY())])
    with pytest.raises(ValueError, match="refused before training"):
        trainer.fit((x, y), epochs=1, batch_size=4)


def test_mode_epoch_never_draws_a_bar_even_on_a_terminal():
    stream = FakeTTY()
    _fit(ProgressBar(mode="epoch", file=stream))
    assert "\r" not in stream.getvalue()
    assert len(stream.getvalue().splitlines()) == 2


def test_a_run_resumed_mid_epoch_gets_its_display():
    # The trainer does not call on_epoch_begin again for an epoch resumed in its middle.
    stream = io.StringIO()
    bar = ProgressBar(file=stream)
    bar.set_trainer(FakeTrainer(epochs_planned=3))
    bar.on_train_begin()
    bar.on_batch_end(2, {})
    bar.on_epoch_end(0, {"loss": 0.5})
    resumed_at_epoch_end = ProgressBar(file=stream)
    resumed_at_epoch_end.set_trainer(FakeTrainer(epochs_planned=3))
    resumed_at_epoch_end.on_train_begin()
    resumed_at_epoch_end.on_epoch_end(1, {"loss": 0.25})
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("Epoch 1/3 - ") and lines[0].endswith("s - loss: 0.5")
    assert lines[1] == "Epoch 2/3 - loss: 0.25"  # no elapsed time: the epoch began before the restart


def test_format_logs():
    assert format_logs({"loss": 0.123456, "val_loss": 2.0, "note": "x"}) == "loss: 0.1235 - val_loss: 2 - note: x"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="tqdm"), r"mode must be 'bar' or 'epoch', got 'tqdm'"),
        (dict(refresh_interval=0), r"refresh_interval must be > 0 seconds, got 0"),
        (dict(log_every_seconds=-1), r"log_every_seconds must be None or > 0 seconds, got -1"),
    ],
)
def test_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressBar(**kwargs)


def test_ipykernel_imported_outside_a_kernel_is_no_notebook(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # imported, but no kernel runs
    x, y = make_classification(n=16)
    out = io.StringIO()
    make_trainer(callbacks=[ProgressBar(file=out)]).fit((x, y), epochs=2, batch_size=8)
    assert [line.split(" - ")[0] for line in out.getvalue().splitlines()] == ["Epoch 1/2", "Epoch 2/2"]
