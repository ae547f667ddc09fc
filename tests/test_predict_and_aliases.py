"""Keras 3 hook names as aliases, the predict hooks, streaming predict and PredictionWriter."""

from __future__ import annotations

import pytest
import torch
from helpers import make_classification, make_trainer
from torch.utils.data import DataLoader, TensorDataset

from fitkit.callbacks import Callback, LambdaCallback, PredictionWriter


class KerasStyle(Callback):
    """A callback written for Keras 3's names, as it would be there."""

    def __init__(self):
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append(("train_batch_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(("train_batch_end", batch, sorted(logs)))

    def on_test_begin(self, logs=None):
        self.seen.append(("test_begin",))

    def on_test_batch_begin(self, batch, logs=None):
        self.seen.append(("test_batch_begin", batch))

    def on_test_batch_end(self, batch, logs=None):
        self.seen.append(("test_batch_end", batch))

    def on_test_end(self, logs=None):
        self.seen.append(("test_end", sorted(logs)))

    def on_predict_begin(self, logs=None):
        self.seen.append(("predict_begin",))

    def on_predict_batch_end(self, batch, logs=None):
        self.seen.append(("predict_batch_end", batch, tuple(logs["outputs"].shape)))

    def on_predict_end(self, logs=None):
        self.seen.append(("predict_end",))


class FitkitStyle(Callback):
    def __init__(self):
        self.seen = []

    def on_batch_begin(self, batch, logs=None):
        self.seen.append(("train_batch_begin", batch))

    def on_batch_end(self, batch, logs=None):
        self.seen.append(("train_batch_end", batch, sorted(logs)))

    def on_validation_begin(self, logs=None):
        self.seen.append(("test_begin",))

    def on_validation_batch_begin(self, batch, logs=None):
        self.seen.append(("test_batch_begin", batch))

    def on_validation_batch_end(self, batch, logs=None):
        self.seen.append(("test_batch_end", batch))

    def on_validation_end(self, logs=None):
        self.seen.append(("test_end", sorted(logs)))

    def on_predict_begin(self, logs=None):
        self.seen.append(("predict_begin",))

    def on_predict_batch_end(self, batch, logs=None):
        self.seen.append(("predict_batch_end", batch, tuple(logs["outputs"].shape)))

    def on_predict_end(self, logs=None):
        self.seen.append(("predict_end",))


def _drive(callback):
    x, y = make_classification(n=8)
    trainer = make_trainer(callbacks=[callback])
    trainer.fit((x, y), (x, y), batch_size=4, epochs=1)
    trainer.evaluate((x, y), batch_size=4, callbacks=[callback])
    trainer.predict(x, batch_size=4, callbacks=[callback])
    return callback.seen


def test_a_callback_written_for_keras_3_names_runs_exactly_like_one_with_fitkit_names():
    keras, fitkit_style = _drive(KerasStyle()), _drive(FitkitStyle())
    assert keras == fitkit_style
    assert ("test_end", ["epoch", "step", "val_loss"]) in keras  # fit's validation
    assert keras[-4:] == [("predict_begin",), ("predict_batch_end", 0, (4, 3)), ("predict_batch_end", 1, (4, 3)),
                          ("predict_end",)]  # fmt: skip


def test_both_names_of_one_event_are_an_error():
    class Both(Callback):
        def on_test_end(self, logs=None):
            pass

        def on_validation_end(self, logs=None):
            pass

    with pytest.raises(TypeError, match=r"Both defines both on_validation_end and on_test_end, Keras 3's name"):
        make_trainer(callbacks=[Both()])
    with pytest.raises(TypeError, match=r"LambdaCallback defines both on_batch_end and on_train_batch_end"):
        make_trainer(callbacks=[LambdaCallback(on_batch_end=print, on_train_batch_end=print)])


def test_lambda_callback_takes_keras_3_names():
    seen = []
    x, y = make_classification(n=8)
    make_trainer(callbacks=[LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(batch))]).fit(
        (x, y), batch_size=4
    )
    assert seen == [0, 1]


def _predict_data():
    x, y = make_classification(n=10)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_prediction_writer_output_equals_predict_and_keeps_nothing_in_memory(tmp_path):
    trainer = make_trainer()
    data = _predict_data()
    expected = trainer.predict(data)
    assert trainer.predict(data, callbacks=[PredictionWriter(tmp_path / "p")], return_outputs=False) is None
    files = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert files == [f"predictions-rank00000-batch{i:09d}.pt" for i in range(3)] + ["predictions-rank00000-done.pt"]
    record = torch.load(tmp_path / "p" / files[2], weights_only=True)
    assert record["batch"] == 2 and record["rank"] == 0 and record["world_size"] == 1
    assert record["indices"].tolist() == [8, 9]
    assert torch.equal(PredictionWriter.read(tmp_path / "p"), expected)


def test_prediction_writer_refuses_an_earlier_runs_files_unless_told(tmp_path):
    trainer = make_trainer()
    trainer.predict(_predict_data(), callbacks=[PredictionWriter(tmp_path)], return_outputs=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"already holds 3 prediction file\(s\) of an earlier run; pass another"):
        trainer.predict(_predict_data(), callbacks=[PredictionWriter(tmp_path)], return_outputs=False)
    x, _ = make_classification(n=4)
    trainer.predict(x, batch_size=4, callbacks=[PredictionWriter(tmp_path, overwrite=True)], return_outputs=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "predictions-rank00000-batch000000000.pt",
        "predictions-rank00000-done.pt",
    ]


def test_predict_arguments_are_checked():
    with pytest.raises(TypeError, match=r"return_outputs must be True or False, got 0"):
        make_trainer().predict(_predict_data(), return_outputs=0)
    with pytest.raises(TypeError, match=r"directory must be a path \(str or os.PathLike\), got int"):
        PredictionWriter(3)


def test_prediction_writer_output_of_a_predict_that_failed_is_refused_on_read_and_leaves_no_temporary(
    tmp_path, monkeypatch
):
    import errno

    import fitkit.callbacks.prediction_writer as module

    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(module.torch, "save", save_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left"):
        make_trainer().predict(_predict_data(), callbacks=[PredictionWriter(tmp_path)], return_outputs=False)
    monkeypatch.setattr(module.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions-rank00000-batch000000000.pt"]
    with pytest.raises(ValueError, match=r"incomplete: the predict that wrote them did not finish .*rank 0"):
        PredictionWriter.read(tmp_path)


def test_prediction_writer_read_refuses_a_folder_missing_one_batch_file(tmp_path):
    make_trainer().predict(_predict_data(), callbacks=[PredictionWriter(tmp_path)], return_outputs=False)
    (tmp_path / "predictions-rank00000-batch000000001.pt").unlink()
    with pytest.raises(ValueError, match=r"incomplete: rank 0 wrote 3 batch file\(s\) but 2 are here \(missing: 1\)"):
        PredictionWriter.read(tmp_path)
