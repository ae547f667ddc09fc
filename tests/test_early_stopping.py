"""EarlyStopping against Keras 3's decisions (keras/src/callbacks/early_stopping.py).

Keras's on_epoch_end, the lines the comments below refer to:
  K1  if current is None or epoch < start_from_epoch: return
  K2  if restore_best_weights and best_weights is None: best_weights = weights; best_epoch = epoch
  K3  wait += 1
  K4  if is_improvement(current, best):          # best None -> True; min: current + min_delta < best
  K5      best = current; best_epoch = epoch; (best_weights = weights)
  K6      if baseline is None or is_improvement(current, baseline): wait = 0
          return
  K7  if wait >= patience and epoch > 0: stop
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from helpers import FakeTrainer, drive_epochs, make_classification, make_trainer
from torch import nn

from fitkit.callbacks import EarlyStopping, LambdaCallback

NAN = math.nan


@pytest.mark.parametrize(
    "values, kwargs, stop_epoch",
    [
        # K4 fails for 4 vs 4 (equal is no improvement): wait 1 at e2, 2 at e3 -> K7 with patience 2.
        ([5, 4, 4, 4], dict(patience=2), 3),
        ([3, 2, 1], dict(patience=1), None),
        # patience=0: the first epoch that does not improve stops (K3 makes wait 1 >= 0).
        ([1.0, 1.0], dict(patience=0), 1),
        ([1.0, 0.9, 0.95], dict(patience=0), 2),
        # min_delta is strict (K4): 0.75 + 0.25 < 1.0 is False, so exactly min_delta is no improvement.
        ([1.0, 0.75], dict(min_delta=0.25), 1),
        ([1.0, 0.5, 0.25], dict(min_delta=0.25), 2),
        ([1.0, 0.5, 0.25], dict(min_delta=-0.25), 2),  # the sign is ignored (abs), as in Keras
        ([0.5, 0.75, 1.0], dict(min_delta=0.25, mode="max"), 1),  # max: 0.75 - 0.25 > 0.5 is False
        ([0.5, 0.8, 1.1], dict(min_delta=0.25, mode="max"), None),
        # baseline never beaten, but every epoch improves on the best: K6 keeps wait counting, yet only a
        # non-improving epoch reaches K7 (e3: wait 4 >= 2).
        ([0.6, 0.55, 0.52, 0.53], dict(baseline=0.5, patience=2), 3),
        # baseline beaten at e1 resets wait (K6); e2 does not improve, wait 1 >= 1 (K7).
        ([0.6, 0.4, 0.45, 0.41], dict(baseline=0.5, patience=1), 2),
        ([0.6, 0.7], dict(baseline=0.5), 1),
        # baseline with min_delta: e1 0.25 + 0.25 < 0.5 is False (K4); e2 improves on best and baseline.
        ([0.5, 0.25, 0.2], dict(baseline=0.5, min_delta=0.25, patience=3), None),
        ([0.5, 0.25, 0.25], dict(baseline=0.5, min_delta=0.25, patience=2), 1),
        # start_from_epoch: e0 and e1 are not monitored (K1); e2 is the first value, e3 does not improve.
        ([1, 2, 3, 3], dict(start_from_epoch=2), 3),
        ([1, 2, 3, 3], dict(start_from_epoch=0), 1),
        # epochs that validation_freq skipped count for nothing (K1).
        ([1.0, None, 1.0], dict(patience=0), 2),
        ([1.0, None, None, 0.9, 1.0], dict(patience=1), 4),
        # NaN never improves on a number (K4 compares False).
        ([1.0, NAN, NAN], dict(patience=1), 1),
    ],
)
def test_stop_epoch_matches_keras(values, kwargs, stop_epoch):
    callback = EarlyStopping(monitor="val_loss", **kwargs)
    trainer, stopped = drive_epochs(callback, values)
    assert stopped == stop_epoch
    assert callback.stopped_epoch == (stop_epoch or 0)
    assert (trainer.state.stop_reason is not None) == (stop_epoch is not None)


def test_mode_auto_asks_the_metric():
    callback = EarlyStopping(monitor="val_accuracy", patience=0)
    _, stopped = drive_epochs(callback, [0.5, 0.6, 0.6], key="val_accuracy", trainer=FakeTrainer(metrics=["accuracy"]))
    assert callback.resolved_mode == "max"
    assert stopped == 2


def test_mode_auto_raises_when_the_metric_cannot_tell():
    def f1(outputs, targets):
        return outputs.mean()

    callback = EarlyStopping(monitor="val_f1")
    callback.set_trainer(FakeTrainer(metrics=[f1]))
    with pytest.raises(
        ValueError,
        match=r"cannot tell whether 'val_f1' should go up or down.*"
        r"mode='min' or mode='max'",
    ):
        callback.on_train_begin()


def test_epoch_zero_never_stops():
    # K7's "epoch > 0": a state whose best is already out of reach still does not stop at epoch 0.
    trainer = FakeTrainer()
    callback = EarlyStopping(patience=0)
    callback.set_trainer(trainer)
    callback.on_train_begin()
    callback.load_state_dict({"best": 0.1, "wait": 3, "stopped_epoch": 0, "best_epoch": 0, "best_weights": None})
    callback.on_epoch_end(0, {"val_loss": 1.0})
    assert not trainer.stop_training
    callback.on_epoch_end(1, {"val_loss": 1.0})
    assert trainer.stop_training


def test_stop_reason_names_monitor_best_and_epochs():
    trainer, stopped = drive_epochs(EarlyStopping(patience=1), [3.0, 2.0, 2.5])
    assert stopped == 2
    assert trainer.state.stop_reason == (
        "EarlyStopping: val_loss did not improve by more than 0 for 1 monitored "
        "epoch(s) (patience=1); best 2 at epoch 2; stopped after epoch 3"
    )
    trainer, _ = drive_epochs(EarlyStopping(patience=0, baseline=0.5), [0.6, 0.7])
    assert trainer.state.stop_reason.endswith("the baseline 0.5 was never beaten")


# -- restore_best_weights ---------------------------------------------------------------------------
def _drive_with_weights(callback, values, **fake):
    """Each epoch's weights are filled with the epoch number, so restored weights tell which epoch won."""
    model = nn.Linear(2, 2)
    trainer = FakeTrainer(model, **fake)
    callback.set_trainer(trainer)
    callback.on_train_begin()
    stopped = None
    for epoch, value in enumerate(values):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(epoch))
        callback.on_epoch_end(epoch, {"val_loss": value})
        if trainer.stop_training:
            stopped = epoch
            break
    callback.on_train_end()
    return model.weight[0, 0].item(), stopped


@pytest.mark.parametrize(
    "values, kwargs, restored_epoch, stop_epoch",
    [
        ([3, 1, 2, 2], dict(patience=1), 1, 2),  # early stop: back to the best epoch (K5)
        ([3, 1, 2], dict(patience=5), 1, None),  # no early stop: Keras 3 restores anyway
        ([5, 4, 3], dict(patience=5, start_from_epoch=2), 2, None),  # first monitored epoch (K2)
        ([0.5, 0.4, 0.6, 0.7], dict(patience=2, baseline=0.1), 1, 2),  # best of the set that never beat the baseline
        ([1.0, 1.0, 1.0], dict(patience=5), 0, None),  # nothing improved after e0: e0's weights (K2)
    ],
)
def test_restore_best_weights(values, kwargs, restored_epoch, stop_epoch):
    weight, stopped = _drive_with_weights(EarlyStopping(restore_best_weights=True, **kwargs), values)
    assert stopped == stop_epoch
    assert weight == restored_epoch


def test_without_restore_the_last_weights_stay():
    weight, stopped = _drive_with_weights(EarlyStopping(patience=1), [3, 1, 2, 2])
    assert (weight, stopped) == (2.0, 2)


def test_restore_best_weights_after_an_exception_in_fit():
    x, y = make_classification(n=16)
    snapshots = []

    def on_epoch_end(epoch, logs):
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        if epoch == 2:
            raise RuntimeError("boom")

    early = EarlyStopping(monitor="val_loss", mode="min", patience=10, restore_best_weights=True)
    # A scripted val_loss that rises every epoch: the best epoch is 0, and nothing stops before the error.
    script = LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update(val_loss=float(epoch)))
    trainer = make_trainer(lr=0.5, callbacks=[script, early, LambdaCallback(on_epoch_end=on_epoch_end)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit((x, y), (x, y), epochs=5, batch_size=8)
    assert early.best_epoch == 0
    assert not torch.equal(snapshots[2]["fc1.weight"], snapshots[0]["fc1.weight"])  # training moved them
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, snapshots[0][key])


# -- state, reuse, arguments ------------------------------------------------------------------------
def test_state_dict_round_trip_resumes_the_same_decisions():
    values = [5.0, 4.0, 4.5, 4.2, 4.1, 4.3]
    _, uninterrupted = drive_epochs(EarlyStopping(patience=3), values)
    assert uninterrupted == 4  # e2, e3, e4 do not improve on 4.0: wait 3 >= 3 (K7)

    first = EarlyStopping(patience=3, restore_best_weights=True)
    trainer = FakeTrainer()
    first.set_trainer(trainer)
    first.on_train_begin()
    for epoch, value in enumerate(values[:3]):
        first.on_epoch_end(epoch, {"val_loss": value})
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    second = EarlyStopping(patience=3, restore_best_weights=True)
    trainer = FakeTrainer()
    second.set_trainer(trainer)
    second.on_train_begin()  # the trainer loads a resumed state right after on_train_begin
    second.load_state_dict(state)
    assert (second.best, second.wait, second.best_epoch) == (4.0, 1, 1)
    stopped = None
    for epoch, value in enumerate(values[3:], start=3):
        second.on_epoch_end(epoch, {"val_loss": value})
        if trainer.stop_training:
            stopped = epoch
            break
    assert stopped == uninterrupted


def test_one_instance_serves_two_fits():
    callback = EarlyStopping(patience=1)
    assert drive_epochs(callback, [1.0, 2.0])[1] == 1
    assert drive_epochs(callback, [3.0, 2.0, 1.0])[1] is None  # counters and best were reset
    assert callback.stopped_epoch == 0


def test_missing_key_is_an_error():
    callback = EarlyStopping(monitor="val_loss")
    callback.set_trainer(FakeTrainer(has_validation=False))
    callback.on_train_begin()
    with pytest.raises(KeyError, match=r"monitor='val_loss'\): no such key in the epoch logs; available: \['loss'\]"):
        callback.on_epoch_end(0, {"loss": 1.0})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(patience=-1), ValueError, r"patience must be an int >= 0 .*got -1"),
        (dict(patience=1.5), ValueError, r"patience must be an int >= 0 .*got 1.5"),
        (dict(start_from_epoch=-2), ValueError, r"start_from_epoch must be an int >= 0 .*got -2"),
        (dict(mode="lowest"), ValueError, r"mode='lowest'\): mode must be one of \('auto', 'min', 'max'\)"),
        (dict(verbose=2), ValueError, r"verbose must be 0 \(silent\) or 1"),
        (dict(restore_best_weights="yes"), TypeError, r"restore_best_weights must be True or False"),
        (dict(min_delta="0.1"), TypeError, r"min_delta must be a number"),
    ],
)
def test_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        EarlyStopping(**kwargs)


def test_verbose_prints_keras_messages(capsys):
    _drive_with_weights(EarlyStopping(patience=0, verbose=1, restore_best_weights=True), [2.0, 1.0, 1.5])
    out = capsys.readouterr().out
    assert "Epoch 3: early stopping" in out
    assert "Restoring model weights from the end of the best epoch: 2." in out


def test_fit_stops_early():
    x, y = make_classification(n=16)
    early = EarlyStopping(monitor="val_loss", patience=1)
    trainer = make_trainer(lr=0.0, callbacks=[early])  # lr 0: val_loss never changes
    history = trainer.fit((x, y), (x, y), epochs=10, batch_size=8)
    assert history.epoch == [0, 1]
    assert early.stopped_epoch == 1
    assert trainer.state.stop_reason.startswith("EarlyStopping: val_loss did not improve")


def test_resume_through_a_checkpoint_keeps_the_best_weights(tmp_path):
    script = [3.0, 1.0, 2.0, 2.5, 2.6, 2.7]  # best at e1; e2, e3 do not improve: patience 2 stops at e3
    path = tmp_path / "ckpt.pt"
    at_checkpoint = {}

    def checkpoint_after_epoch_2(epoch, logs):
        if epoch == 2:  # as ModelCheckpoint does: after every callback has handled the epoch
            trainer.after_callbacks(
                lambda: (
                    trainer.save_checkpoint(path),
                    at_checkpoint.update({k: v.clone() for k, v in trainer.model.state_dict().items()}),
                )
            )

    def run(epochs, resume=None, extra=()):
        nonlocal trainer
        torch.manual_seed(0)
        early = EarlyStopping(patience=2, restore_best_weights=True)
        scripted = LambdaCallback(on_epoch_end=lambda epoch, logs: logs.update(val_loss=script[epoch]))
        trainer = make_trainer(lr=0.5, callbacks=[scripted, early, *extra])
        x, y = make_classification(n=16)
        trainer.fit((x, y), (x, y), epochs=epochs, batch_size=8, shuffle=False, resume=resume)
        return trainer, early

    trainer = None
    uninterrupted, early = run(10)
    assert early.stopped_epoch == 3

    run(3, extra=[LambdaCallback(on_epoch_end=checkpoint_after_epoch_2)])  # "crashes" after its checkpoint
    resumed, early = run(10, resume=path)
    assert (early.stopped_epoch, early.best_epoch) == (3, 1)
    assert not torch.equal(resumed.model.fc1.weight, at_checkpoint["fc1.weight"])  # e1's weights, not e2's
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
