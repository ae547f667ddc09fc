"""Training schedules: validate_every_n_steps, validation_steps, named validation sets, max_steps, max_time."""

from __future__ import annotations

import datetime
import os
import signal

import pytest
import torch
from helpers import RecordingCallback, make_classification, make_trainer, params_of
from resume_utils import build, final_state
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import schedule
from fitkit.callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    LambdaCallback,
    ModelCheckpoint,
    ReduceLROnPlateau,
)


def loader(x, y, batch_size=4, shuffle=False):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def fit_data(n=24):
    x, y = make_classification(n=n)
    return loader(x, y), loader(x[:8], y[:8])


# -- validate_every_n_steps -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "every, validation_freq, steps",
    [
        (4, 0, [4, 8, 12]),  # across the epoch boundary (6 batches an epoch), by steps only
        (4, 1, [4, 6, 8, 12]),  # and at epoch ends; step 12 is both, validated once
        (6, None, [6, 12]),  # N = batches per epoch
    ],
)
def test_validations_happen_after_every_n_steps(every, validation_freq, steps):
    train, val = fit_data()
    recorder = RecordingCallback()
    trainer = make_trainer(callbacks=[recorder])
    history = trainer.fit(train, val, epochs=2, validate_every_n_steps=every, validation_freq=validation_freq)
    assert [v["step"] for v in history.validations] == steps
    assert [v["epoch"] for v in history.validations] == [(s - 1) // 6 for s in steps]
    assert len(recorder.of("on_validation_begin")) == len(steps)
    ends = [c.args[0] for c in recorder.of("on_validation_end")]
    assert [e["step"] for e in ends] == steps
    assert all(set(e) == {"val_loss", "step", "epoch"} for e in ends)
    assert [e["val_loss"] for e in ends] == [v["val_loss"] for v in history.validations]
    # The epoch rows are as before: val_ keys only on validated epochs.
    assert ("val_loss" in history.history) == bool(validation_freq)


def test_a_step_validation_runs_after_the_batch_hooks_in_eval_mode_and_back_to_training():
    train, val = fit_data()
    recorder = RecordingCallback()
    make_trainer(callbacks=[recorder]).fit(train, val, epochs=1, validate_every_n_steps=3, validation_freq=0)
    names = [n for n in recorder.names() if n in ("on_batch_end", "on_validation_begin", "on_validation_end")]
    assert names[:5] == ["on_batch_end"] * 3 + ["on_validation_begin", "on_validation_end"]
    assert all(not c.training and not c.grad_enabled for c in recorder.of("on_validation_batch_end"))
    assert all(c.training for c in recorder.of("on_batch_end"))


def test_step_validations_do_not_change_training():
    x, y = make_classification(n=24)
    torch.manual_seed(0)
    a = make_trainer()
    a.fit(loader(x, y, shuffle=True), epochs=2)
    torch.manual_seed(0)
    b = make_trainer()
    b.fit(loader(x, y, shuffle=True), loader(x, y), epochs=2, validate_every_n_steps=2, validation_freq=0)
    assert all(torch.equal(p, q) for p, q in zip(params_of(a.model), params_of(b.model)))
    assert a.history.history["loss"] == b.history.history["loss"]


def test_validation_steps_caps_the_batches_of_each_validation():
    train, _ = fit_data()
    x, y = make_classification(n=40)
    recorder = RecordingCallback()
    make_trainer(callbacks=[recorder]).fit(train, loader(x, y), epochs=1, validation_steps=3)
    assert len(recorder.of("on_validation_batch_end")) == 3


def test_validate_every_n_steps_counts_the_whole_run_across_fits():
    train, val = fit_data()
    trainer = make_trainer()
    trainer.fit(train, val, epochs=1, validate_every_n_steps=4, validation_freq=0)  # 6 steps: validates at 4
    history = trainer.fit(train, val, epochs=2, validate_every_n_steps=4, validation_freq=0)  # steps 7..18
    assert [v["step"] for v in history.validations] == [8, 12, 16]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"validate_every_n_steps": 0}, ValueError, r"validate_every_n_steps must be None or an int >= 1 \(optimizer"),
        ({"validation_steps": 2.5}, ValueError, r"validation_steps must be None or an int >= 1 \(batches per set\)"),
        ({"max_steps": True}, ValueError, r"max_steps must be None or an int >= 1 \(optimizer steps of the whole"),
        ({"max_time": "1h"}, TypeError, r"max_time must be None, a number of seconds or a datetime.timedelta, got str"),
        ({"max_time": -1}, ValueError, r"max_time must be a finite duration > 0 seconds, got -1"),
        ({"validation_freq": None}, ValueError, r"validation_freq=None turns epoch-level validation off"),
    ],
)
def test_bad_schedule_arguments_are_clear_errors(kwargs, error, message):
    train, val = fit_data()
    with pytest.raises(error, match=message):
        make_trainer().fit(train, val, **kwargs)


def test_validate_every_n_steps_without_validation_data_is_an_error():
    train, _ = fit_data()
    with pytest.raises(ValueError, match=r"validate_every_n_steps=2 needs validation data; pass val_data"):
        make_trainer().fit(train, validate_every_n_steps=2)


# -- monitoring callbacks decide on step-level validations ------------------------------------------
def test_early_stopping_counts_validations_when_validating_by_steps():
    train, val = fit_data()
    values = iter([5.0, 4.0, 4.5, 4.5, 4.5, 4.5])
    scripted = LambdaCallback(on_validation_end=lambda logs: logs.update(val_loss=next(values)))
    stopper = EarlyStopping(patience=2)
    trainer = make_trainer(callbacks=[scripted, stopper])
    history = trainer.fit(train, val, epochs=3, validate_every_n_steps=2, validation_freq=0)
    # Validations at steps 2, 4, 6, 8: best 4.0 at step 4, two without improvement -> stop after step 8.
    assert [v["step"] for v in history.validations] == [2, 4, 6, 8]
    assert trainer.global_step == 8 and stopper.wait == 2
    assert "2 monitored validation(s) (patience=2)" in trainer.state.stop_reason
    assert "stopped after step 8 (epoch 2)" in trainer.state.stop_reason


def _decisions(every, validation_freq, tmp_path):
    x, y = make_classification(n=24, seed=3)
    torch.manual_seed(0)
    stopper = EarlyStopping(patience=1, min_delta=0.2)
    saver = ModelCheckpoint(str(tmp_path / "{step}.pt"), save_top_k=2, save_weights_only=True)
    plateau = ReduceLROnPlateau(patience=1, min_delta=0.05, factor=0.5)
    trainer = make_trainer(callbacks=[stopper, saver, plateau], lr=0.5)
    trainer.fit(
        loader(x, y), loader(x[:12], y[:12]), epochs=8, validate_every_n_steps=every, validation_freq=validation_freq
    )
    return trainer.global_step, stopper.best, sorted(p.name for p in tmp_path.glob("*.pt")), plateau.state_dict()


def test_with_n_equal_to_the_batches_per_epoch_decisions_equal_the_epoch_level_ones(tmp_path):
    by_epoch = _decisions(None, 1, tmp_path / "epoch")
    by_steps = _decisions(6, 0, tmp_path / "steps")
    assert by_epoch == by_steps
    assert by_epoch[0] < 48  # EarlyStopping did stop early: the comparison covers a decision


# -- exact resume --------------------------------------------------------------------------------
class SaveEveryBatch(Callback):
    """Writes a full checkpoint after every batch's hooks: before that step's validation."""

    def __init__(self, folder):
        self.folder = folder

    def on_batch_end(self, batch, logs=None):
        step = self.trainer.global_step
        self.trainer.after_callbacks(lambda: self.trainer.save_checkpoint(self.folder / f"step{step}.pt"))


def _run(callbacks, resume=None, **kwargs):
    trainer, train, val = build(callbacks=callbacks)
    trainer.fit(train, val, epochs=2, validate_every_n_steps=2, validation_freq=1, resume=resume, **kwargs)
    return trainer


def test_resume_from_before_a_step_validation_finished_is_exact(tmp_path):
    reference = _run([SaveEveryBatch(tmp_path)])
    expected = final_state(reference)
    assert [v["step"] for v in reference.history.validations] == [2, 4, 6, 8, 10, 12]
    for step in (4, 6, 7):  # due at 4 and 6 (6 also ends epoch 0: deduplicated), 7 is a plain batch
        resumed = _run([], resume=tmp_path / f"step{step}.pt")
        state = final_state(resumed)
        assert state["global_step"] == expected["global_step"]
        assert state["history"] == expected["history"]
        for key in expected["model"]:
            assert torch.equal(state["model"][key], expected["model"][key]), (step, key)
        assert resumed.history.validations == reference.history.validations


def test_a_signal_inside_a_step_validation_resumes_exactly(tmp_path):
    reference = final_state(_run([]))

    def interrupt(batch, logs):
        if trainer_box[0].global_step == 4 and batch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer, train, val = build(
        callbacks=[ModelCheckpoint(str(tmp_path / "e{epoch}.pt")), LambdaCallback(on_validation_batch_end=interrupt)]
    )
    trainer_box = [trainer]
    with pytest.raises(SystemExit):
        trainer.fit(train, val, epochs=2, validate_every_n_steps=2, validation_freq=1)
    assert trainer.state.last_validation_step == 2  # the interrupted validation did not count
    resumed = final_state(_run([], resume=tmp_path / "last.pt"))
    for key in reference["model"]:
        assert torch.equal(resumed["model"][key], reference["model"][key]), key
    assert resumed["history"] == reference["history"]


# -- max_steps / max_time ------------------------------------------------------------------------
def test_max_steps_stops_exactly_and_ends_the_epoch_and_the_run():
    train, val = fit_data()
    recorder = RecordingCallback()
    trainer = make_trainer(callbacks=[recorder])
    history = trainer.fit(train, val, max_steps=9)  # epochs: as many as 9 steps need (2)
    assert trainer.global_step == 9
    assert trainer.state.stop_reason == "max_steps: 9 optimizer steps reached max_steps=9"
    assert history.epoch == [0, 1] and "val_loss" in history.history  # the partial epoch ended normally
    assert recorder.names()[-1] == "on_train_end"


def test_max_steps_is_exact_across_a_resume(tmp_path):
    reference = _run([], max_steps=9)
    assert reference.global_step == 9
    _run([SaveEveryBatch(tmp_path)], max_steps=5)
    resumed = _run([], resume=tmp_path / "step4.pt", max_steps=9)
    assert resumed.global_step == 9
    for key, value in final_state(reference)["model"].items():
        assert torch.equal(final_state(resumed)["model"][key], value), key


class FakeClock:
    """A clock that a second passes on after each training batch (read it as often as you like)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def tick(self, batch, logs):
        self.now += 1.0


def test_max_time_stops_at_a_batch_boundary_and_adds_up_across_a_resume(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(schedule, "clock", clock)
    train, val = fit_data()
    ticking = LambdaCallback(on_batch_end=clock.tick)
    trainer = make_trainer(callbacks=[ticking, SaveEveryBatch(tmp_path)])
    trainer.fit(train, val, max_time=datetime.timedelta(seconds=4.5))
    assert trainer.global_step == 5  # 1, 2, 3, 4, 5 s after batches 1..5: 5 s >= 4.5
    assert trainer.state.stop_reason == "max_time: 5 s of training reached max_time=4.5 s"
    assert trainer.history.epoch == [0]  # the partial epoch ended normally
    # Resumed from after step 3 (3 s spent): 1.5 s of budget left, whatever the new clock reads.
    clock = FakeClock()
    clock.now = 5000.0
    monkeypatch.setattr(schedule, "clock", clock)
    resumed = make_trainer(callbacks=[LambdaCallback(on_batch_end=clock.tick)])
    resumed.fit(train, val, max_time=4.5, resume=tmp_path / "step3.pt")
    assert resumed.global_step == 5 and resumed.state.train_time == 5.0


# -- named validation sets -----------------------------------------------------------------------
def test_named_validation_sets_give_prefixed_keys_in_logs_history_and_csv(tmp_path):
    train, _ = fit_data()
    x, y = make_classification(n=16, seed=1)
    csv = tmp_path / "log.csv"
    trainer = make_trainer(metrics=["accuracy"], callbacks=[CSVLogger(str(csv)), EarlyStopping("val_noisy_loss")])
    sets = {"clean": loader(x, y), "noisy": loader(x + torch.randn_like(x), y)}
    history = trainer.fit(train, sets, epochs=2)
    keys = {"val_clean_loss", "val_clean_accuracy", "val_noisy_loss", "val_noisy_accuracy"}
    assert keys <= set(history.history)
    header = csv.read_text().splitlines()[0].split(",")
    assert keys <= set(header)
    evaluated = trainer.evaluate({"clean": sets["clean"], "noisy": sets["noisy"]})
    assert set(evaluated) == {"clean_loss", "clean_accuracy", "noisy_loss", "noisy_accuracy"}
    assert evaluated["clean_loss"] == pytest.approx(trainer.evaluate(sets["clean"])["loss"])


def test_named_sets_appear_in_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fitkit.callbacks import TensorBoard

    train, _ = fit_data()
    x, y = make_classification(n=8, seed=1)
    make_trainer(callbacks=[TensorBoard(str(tmp_path))]).fit(train, {"a": loader(x, y), "b": loader(x, y)})
    tags = set()
    for root, _, files in os.walk(tmp_path):
        for name in files:
            if "tfevents" in name:
                events = EventAccumulator(os.path.join(root, name))
                events.Reload()
                tags |= set(events.Tags()["scalars"])
    assert any("val_a_loss" in t or ("a_loss" in t and "val" in t) for t in tags), tags


def test_a_list_of_validation_loaders_is_an_error_that_suggests_a_dict():
    train, val = fit_data()
    with pytest.raises(TypeError, match=r"val_data is a list of 2 loaders; to validate on several sets, name them"):
        make_trainer().fit(train, [val, val])
    with pytest.raises(ValueError, match=r"validation set names must be identifiers .* got 'a b'"):
        make_trainer().fit(train, {"a b": val})


def test_a_missing_named_set_key_is_an_error_naming_the_keys():
    train, val = fit_data()
    with pytest.raises(KeyError, match=r"val_c_loss"):
        make_trainer(callbacks=[EarlyStopping("val_c_loss", mode="min")]).fit(train, {"a": val}, epochs=1)


def test_epochs_default_to_one_and_to_unlimited_with_max_time(monkeypatch):
    train, val = fit_data()
    trainer = make_trainer()
    trainer.fit(train)
    assert trainer.global_step == 6 and trainer.epochs_planned == 1
    clock = FakeClock()
    monkeypatch.setattr(schedule, "clock", clock)
    trainer = make_trainer(callbacks=[LambdaCallback(on_batch_end=clock.tick)])
    trainer.fit(train, max_time=20)
    assert trainer.epochs_planned is None and trainer.global_step == 20


def test_fitkit_import_names():
    assert fitkit.Trainer is not None


def test_validate_every_n_steps_beyond_the_run_warns_that_it_never_runs():
    x, y = make_classification(n=16)
    with pytest.warns(UserWarning, match=r"validate_every_n_steps=100 is beyond this run's last step \(4\)"):
        make_trainer().fit((x, y), (x, y), epochs=2, batch_size=8, validate_every_n_steps=100)


def test_a_rerun_whose_max_time_is_spent_trains_nothing(tmp_path, monkeypatch):
    now = [0.0]

    def tick() -> float:
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(schedule, "clock", tick)
    x, y = make_classification(n=32)
    trainer = make_trainer()
    trainer.fit((x, y), epochs=10, batch_size=4, max_time=5)
    trainer.save_checkpoint(tmp_path / "spent.pt")
    spent = trainer.global_step
    again = make_trainer()
    with pytest.warns(UserWarning, match=r"nothing to train: the run has trained for .* s and max_time=5 s"):
        again.fit((x, y), epochs=10, batch_size=4, max_time=5, resume=tmp_path / "spent.pt")
    assert again.global_step == spent  # was one more step at every re-run
    assert again.state.stop_reason.startswith("max_time")
