"""Issue 19, Keras habits and the newcomer's path: what a Keras user types into ``fit`` either works as in Keras
or is a clear error that shows the fitkit form."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import make_classification, make_trainer

from fitkit import Callback
from fitkit.callbacks import ProgressBar


class _Epochs(Callback):
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.epochs.append(epoch)


def test_fit_x_y_positionally_is_a_clear_error_that_shows_the_tuple_form() -> None:
    x, y = make_classification(n=16)
    with pytest.raises(TypeError, match=r"fit\(x, y\) .*second argument as validation data.*fit\(\(x, y\), "):
        make_trainer().fit(x, y, epochs=1)


def test_fit_takes_keras_keywords_y_validation_data_callbacks_and_verbose(capsys: Any) -> None:
    x, y = make_classification(n=16)
    torch.manual_seed(0)
    reference = make_trainer()
    expected = reference.fit((x, y), (x[:8], y[:8]), epochs=2, batch_size=8).history

    torch.manual_seed(0)
    trainer = make_trainer()
    epochs = _Epochs()
    history = trainer.fit(
        x, y=y, validation_data=(x[:8], y[:8]), epochs=2, batch_size=8, callbacks=[epochs], verbose=2
    ).history
    assert history.keys() == expected.keys() and history["val_loss"] == pytest.approx(expected["val_loss"])
    assert epochs.epochs == [0, 1]  # the call's callbacks ran ...
    assert epochs not in trainer.callbacks and trainer.verbose == 0  # ... for this call only, as its verbose
    captured = capsys.readouterr()
    assert "Epoch 2/2" in captured.out + captured.err


def test_val_data_and_validation_data_together_are_refused() -> None:
    x, y = make_classification(n=16)
    with pytest.raises(TypeError, match=r"both val_data and validation_data .*the same argument"):
        make_trainer().fit((x, y), (x, y), validation_data=(x, y), epochs=1)


def test_a_progress_bar_passed_explicitly_replaces_the_default_one(capsys: Any) -> None:
    x, y = make_classification(n=16)
    trainer = make_trainer(callbacks=[ProgressBar(mode="epoch")], verbose=2)
    trainer.fit((x, y), epochs=1, batch_size=8)
    assert sum(isinstance(cb, ProgressBar) for cb in trainer.active_callbacks) == 1
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("Epoch 1/1") == 1


def test_a_dict_batch_of_inputs_and_targets_says_what_dict_batches_mean() -> None:
    from torch.utils.data import DataLoader

    x, y = make_classification(n=8)
    data = DataLoader([{"x": x[i], "y": y[i]} for i in range(8)], batch_size=4)
    with pytest.raises(
        TypeError,
        match=r"a dict batch is the model's inputs, passed as keyword arguments .*TinyNet\.forward\(\) takes no "
        r"'y'.*\['x', 'y'\].*return \(inputs, targets\)",
    ):
        make_trainer().fit(data, epochs=1)


def test_a_resumed_fit_says_where_it_resumed(tmp_path: Any, capsys: Any) -> None:
    x, y = make_classification(n=16)
    trainer = make_trainer()
    trainer.fit((x, y), epochs=1, batch_size=8)
    trainer.save_checkpoint(tmp_path / "ckpt.pt")
    make_trainer(verbose=2).fit((x, y), epochs=2, batch_size=8, resume=tmp_path / "ckpt.pt")
    captured = capsys.readouterr()
    assert f"Resumed from {tmp_path / 'ckpt.pt'}: epoch 2 of 2, global step 2" in captured.out + captured.err


def test_ctrl_c_says_what_was_saved_in_one_traceback_and_evaluate_works_afterwards(tmp_path: Any) -> None:
    import os
    import signal

    from fitkit.callbacks import ModelCheckpoint

    class CtrlC(Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    x, y = make_classification(n=32)
    saver = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_last=True)
    trainer = make_trainer(callbacks=[saver, CtrlC()])
    with pytest.raises(
        KeyboardInterrupt, match=r"training interrupted by SIGINT; the state .*was saved to .*last\.pt"
    ) as info:
        trainer.fit((x, y), epochs=3, batch_size=4)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one traceback, not two
    assert "resume='auto'" in str(info.value)
    assert set(trainer.evaluate((x, y), batch_size=8)) == {"loss"}  # raised TrainingInterrupted before
