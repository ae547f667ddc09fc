"""CSVLogger: Keras's file layout, append mode, and a resume that drops the crashed run's extra rows."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from helpers import FakeTrainer, make_classification, make_trainer

from fitkit.callbacks import CSVLogger


def _read(path, delimiter=","):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=delimiter))


def test_fit_writes_one_row_per_epoch_equal_to_the_history(tmp_path):
    path = tmp_path / "logs" / "run.csv"  # the folder is created
    trainer = make_trainer(metrics=["accuracy"], callbacks=[CSVLogger(path)])
    x, y = make_classification(n=16)
    history = trainer.fit((x, y), (x, y), epochs=3, batch_size=8)
    header, *rows = _read(path)
    # epoch, step (the x axis of every logger), then the sorted keys
    assert header == ["epoch", "step", "accuracy", "loss", "lr", "val_accuracy", "val_loss"]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(0, 2), (1, 4), (2, 6)]  # 2 optimizer steps per epoch
    for i, row in enumerate(rows):
        for key, text in zip(header[2:], row[2:]):
            assert float(text) == history.history[key][i]  # written with repr: exact
    assert path.read_bytes().count(b"\r\n") == 4  # csv's excel dialect, as Keras writes it


def test_validation_columns_exist_when_the_first_epoch_skips_validation(tmp_path):
    path = tmp_path / "run.csv"
    trainer = make_trainer(callbacks=[CSVLogger(path, separator="\t")])
    x, y = make_classification(n=16)
    trainer.fit((x, y), (x, y), epochs=2, batch_size=8, validation_freq=2)
    header, first, second = _read(path, delimiter="\t")
    assert header == ["epoch", "step", "loss", "lr", "val_loss"]
    assert first[4] == "NA" and second[4] != "NA"


def test_append_keeps_rows_and_writes_the_header_once(tmp_path):
    path = tmp_path / "run.csv"
    x, y = make_classification(n=8)
    logger = CSVLogger(path, append=True)
    trainer = make_trainer(callbacks=[logger])
    trainer.fit((x, y), epochs=2, batch_size=4)
    trainer.fit((x, y), epochs=2, batch_size=4)  # one instance, two fits
    rows = _read(path)
    assert [r[0] for r in rows] == ["epoch", "0", "1", "0", "1"]

    overwrite = make_trainer(callbacks=[CSVLogger(path)])
    overwrite.fit((x, y), epochs=1, batch_size=4)
    assert [r[0] for r in _read(path)] == ["epoch", "0"]


def _write_epochs(logger, trainer, epochs, value):
    for epoch in epochs:
        logger.on_epoch_end(epoch, {"loss": value + epoch, "val_loss": value - epoch})


def test_resume_drops_the_rows_written_after_the_checkpoint(tmp_path):
    path = tmp_path / "run.csv"
    crashed, trainer = CSVLogger(path), FakeTrainer()
    crashed.set_trainer(trainer)
    crashed.on_train_begin()
    _write_epochs(crashed, trainer, [0, 1], 10.0)
    buffer = io.BytesIO()
    torch.save(crashed.state_dict(), buffer)  # the checkpoint
    size_at_checkpoint = path.stat().st_size
    _write_epochs(crashed, trainer, [2, 3], 10.0)  # rows of a future that the crash threw away
    assert [r[0] for r in _read(path)] == ["epoch", "0", "1", "2", "3"]

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state == {"rows": 2, "bytes": size_at_checkpoint, "keys": ["loss", "val_loss"]}
    resumed = CSVLogger(path)  # append=False: a resumed run must still append
    resumed.set_trainer(trainer)
    resumed.on_train_begin()
    resumed.load_state_dict(state)  # what the trainer does right after on_train_begin
    _write_epochs(resumed, trainer, [2, 3], 20.0)
    resumed.on_train_end()
    crashed.on_train_end()
    header, *rows = _read(path)
    assert header == ["epoch", "step", "loss", "val_loss"]
    assert [(r[0], r[2]) for r in rows] == [("0", "10.0"), ("1", "11.0"), ("2", "22.0"), ("3", "23.0")]
    assert resumed.rows == 4


def test_resume_through_fit(tmp_path):
    path, checkpoint = tmp_path / "run.csv", tmp_path / "ckpt.pt"
    x, y = make_classification(n=16)
    make_trainer(callbacks=[CSVLogger(path)]).fit((x, y), (x, y), epochs=2, batch_size=8)
    first = make_trainer(callbacks=[CSVLogger(path)])
    first.fit((x, y), (x, y), epochs=1, batch_size=8)
    first.save_checkpoint(checkpoint)
    with open(path, "a", newline="") as f:
        f.write("1,4,9.9,0.1,9.9\r\n")  # a row the crashed run wrote after its checkpoint
    resumed = make_trainer(callbacks=[CSVLogger(path)])
    history = resumed.fit((x, y), (x, y), epochs=2, batch_size=8, resume=checkpoint)
    header, *rows = _read(path)
    assert [r[0] for r in rows] == ["0", "1"]
    assert float(rows[1][header.index("val_loss")]) == history.history["val_loss"][-1]


def test_state_before_any_row_and_a_missing_file(tmp_path):
    path = tmp_path / "run.csv"
    logger, trainer = CSVLogger(path), FakeTrainer()
    logger.set_trainer(trainer)
    logger.on_train_begin()
    state = logger.state_dict()
    assert state == {"rows": 0, "bytes": 0, "keys": None}
    resumed = CSVLogger(path)
    resumed.set_trainer(trainer)
    resumed.on_train_begin()
    resumed.load_state_dict({"rows": 3, "bytes": 120, "keys": ["loss"]})
    with pytest.warns(UserWarning, match=r"run.csv holds 0 bytes but this run had written 120; rows are missing"):
        resumed.on_epoch_end(3, {"loss": 1.0})
    resumed.on_train_end()
    assert _read(path) == [["epoch", "step", "loss"], ["3", "0", "1.0"]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(separator=", "), ValueError, r"separator must be a single character such as ',' or '\\t', got ', '"),
        (dict(append="yes"), TypeError, r"append must be True or False, got 'yes'"),
    ],
)
def test_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        CSVLogger(tmp_path / "x.csv", **kwargs)


def test_writes_on_rank_zero_only():
    assert CSVLogger.rank_zero_only is True


def test_step_level_validations_go_to_a_second_file_that_resumes(tmp_path):
    path, checkpoint = tmp_path / "run.csv", tmp_path / "ckpt.pt"
    x, y = make_classification(n=24)  # 3 optimizer steps per epoch, a validation every 2
    first = make_trainer(callbacks=[CSVLogger(path)])
    first.fit((x, y), (x, y), epochs=1, batch_size=8, validate_every_n_steps=2)
    first.save_checkpoint(checkpoint)
    with open(tmp_path / "run_validations.csv", "a", newline="") as f:
        f.write("1,4,9.9\r\n")  # a row the crashed run wrote after its checkpoint
    resumed = make_trainer(callbacks=[CSVLogger(path)])
    history = resumed.fit((x, y), (x, y), epochs=2, batch_size=8, validate_every_n_steps=2, resume=checkpoint)
    header, *rows = _read(tmp_path / "run_validations.csv")
    assert header == ["epoch", "step", "val_loss"]
    expected = [(v["epoch"], v["step"], v["val_loss"]) for v in history.validations]
    assert [(int(r[0]), int(r[1]), float(r[2])) for r in rows] == expected
    assert [step for _, step, _ in expected] == [2, 3, 4, 6]  # by steps, and after each epoch
    assert [r[0] for r in _read(path)[1:]] == ["0", "1"]  # the epoch rows as before
