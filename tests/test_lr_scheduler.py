"""ReduceLROnPlateau (Keras 3's decisions), LearningRateScheduler (Keras) and LRScheduler (torch schedulers).

Keras's ReduceLROnPlateau.on_epoch_end (keras/src/callbacks/reduce_lr_on_plateau.py), as the comments cite it:
  R1  if in_cooldown(): cooldown_counter -= 1; wait = 0
  R2  if current < best - min_delta (min mode; best starts at +inf): best = current; wait = 0
  R3  elif not in_cooldown(): wait += 1
  R4      if wait >= patience and old_lr > np.float32(min_lr):
              lr = max(old_lr * factor, min_lr); cooldown_counter = cooldown; wait = 0
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from helpers import FakeTrainer, TinyNet, UnsizedBatches, make_classification, make_trainer
from torch import nn
from torch.optim import lr_scheduler as torch_sched

from fitkit.callbacks import LambdaCallback, LearningRateScheduler, LRScheduler, ReduceLROnPlateau

NAN = math.nan


def _lrs_per_epoch(callback, values, key="val_loss", trainer=None):
    """The learning rate(s) after each epoch's on_epoch_end."""
    trainer = trainer if trainer is not None else FakeTrainer(lr=1.0)
    callback.set_trainer(trainer)
    callback.on_train_begin()
    out = []
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {"loss": 1.0} if value is None else {"loss": 1.0, key: value})
        lrs = trainer.lrs()
        out.append(lrs[0] if len(lrs) == 1 else lrs)
    return out


# -- ReduceLROnPlateau ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, kwargs, expected",
    [
        # e0 improves on +inf (R2); e1, e2 do not: wait 2 >= 2 reduces at e2 (R4). torch's own
        # ReduceLROnPlateau(patience=2) waits for 3 bad epochs and would reduce at e3 instead.
        ([1, 1, 1, 1, 1], dict(patience=2), [1, 1, 0.5, 0.5, 0.25]),
        # patience=0: every epoch that does not improve reduces.
        ([1, 1, 1], dict(patience=0), [1, 0.5, 0.25]),
        # cooldown=2: after a reduction R1 zeroes wait for two epochs, and R3 does not count during them.
        ([1] * 7, dict(patience=1, cooldown=2), [1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]),
        # min_lr: max(0.25, 0.3) = 0.3, then 0.3 > float32(0.3) is False: no more reductions (R4).
        ([1] * 5, dict(patience=1, min_lr=0.3), [1, 0.5, 0.3, 0.3, 0.3]),
        # min_delta is strict: 0.75 < 1.0 - 0.25 is False (R2), so e1 reduces; e2 improves on 1.0 by 0.5.
        ([1.0, 0.75, 0.5, 0.5], dict(patience=1, min_delta=0.25), [1, 0.5, 0.5, 0.25]),
        # the default min_delta=1e-4: a smaller drop is no improvement.
        ([1.0, 0.99995], dict(patience=0), [1, 0.5]),
        # epochs that validation_freq skipped count for nothing.
        ([1, None, 1], dict(patience=1), [1, 1, 0.5]),
        # NaN never beats +inf (R2 compares False), so the first NaN epoch already counts.
        ([NAN, NAN], dict(patience=1), [0.5, 0.25]),
    ],
)
def test_reduce_lr_on_plateau_matches_keras(values, kwargs, expected):
    callback = ReduceLROnPlateau(monitor="val_loss", factor=0.5, **kwargs)
    assert _lrs_per_epoch(callback, values) == pytest.approx(expected, rel=1e-12)


def test_reduce_lr_on_plateau_max_mode_from_the_metric():
    callback = ReduceLROnPlateau(monitor="val_accuracy", factor=0.5, patience=1)
    trainer = FakeTrainer(lr=1.0, metrics=["accuracy"])
    lrs = _lrs_per_epoch(callback, [0.5, 0.5, 0.6, 0.6], key="val_accuracy", trainer=trainer)
    assert callback.resolved_mode == "max"
    assert lrs == [1, 0.5, 0.5, 0.25]  # R2 in max mode: 0.5 > 0.5 + 1e-4 is False


def test_min_lr_is_compared_in_float32_as_keras_stores_the_rate():
    # min_lr = 0.5 - 1e-12 is 0.5 in float32, the precision Keras keeps the rate in: once the rate is 0.5, R4's
    # "old_lr > float32(min_lr)" is False, nothing changes and no cooldown starts. A float64 test would
    # "reduce" 0.5 to 0.5 - 1e-12 at e6 and restart the cooldown there (cooldown 4, wait 0 after e7).
    trainer = FakeTrainer(lr=1.0)
    callback = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=5, min_lr=0.5 - 1e-12)
    _lrs_per_epoch(callback, [1.0] * 8, trainer=trainer)
    assert trainer.lrs() == [0.5]  # e1 reduced 1.0 to 0.5; e2-e6 count the cooldown down; e6, e7 add to wait
    assert (callback.cooldown_counter, callback.wait) == (0, 2)


def test_every_param_group_is_reduced_with_its_own_min_lr():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.1}])
    trainer = FakeTrainer(model, optimizer=optimizer)
    callback = ReduceLROnPlateau(factor=0.5, patience=0, min_lr=[0.5, 0.0])
    assert _lrs_per_epoch(callback, [1, 1, 1], trainer=trainer) == [[1.0, 0.1], [0.5, 0.05], [0.5, 0.025]]


def test_a_tensor_learning_rate_is_updated_in_place():
    model = nn.Linear(2, 2)
    lr = torch.tensor(1.0)
    trainer = FakeTrainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=lr))
    _lrs_per_epoch(ReduceLROnPlateau(factor=0.5, patience=0), [1, 1], trainer=trainer)
    assert trainer.optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == 0.5


def test_reduce_lr_on_plateau_state_round_trip_and_reuse():
    values = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95]
    uninterrupted = _lrs_per_epoch(ReduceLROnPlateau(factor=0.5, patience=1, cooldown=1), values)

    first = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=1)
    trainer = FakeTrainer(lr=1.0)
    lrs = _lrs_per_epoch(first, values[:3], trainer=trainer)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=1)
    second.set_trainer(trainer)  # the trainer (and its optimizer's lr) carries on
    second.on_train_begin()
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for epoch, value in enumerate(values[3:], start=3):
        second.on_epoch_end(epoch, {"val_loss": value})
        lrs.append(trainer.lrs()[0])
    assert lrs == uninterrupted

    reused = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=1)
    assert _lrs_per_epoch(reused, values) == uninterrupted
    assert _lrs_per_epoch(reused, values) == uninterrupted  # counters and best reset by on_train_begin


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(factor=1.0), r"factor must be a number with 0 < factor < 1 .*got 1.0"),
        (dict(factor=0), r"factor must be a number with 0 < factor < 1 .*got 0"),
        (dict(factor=-0.5), r"factor must be a number with 0 < factor < 1 .*got -0.5"),
        (dict(patience=-1), r"patience must be an int >= 0 .*got -1"),
        (dict(cooldown=-1), r"cooldown must be an int >= 0 .*got -1"),
        (dict(min_lr=-1e-3), r"min_lr must be a finite number >= 0, or a sequence of them .*got -0.001"),
        (dict(min_lr=[0.0, -1.0]), r"min_lr must be a finite number >= 0, or a sequence .*got \[0.0, -1.0\]"),
        (dict(mode="down"), r"mode='down'\): mode must be one of"),
        (dict(verbose=3), r"verbose must be 0 \(silent\) or 1"),
    ],
)
def test_reduce_lr_on_plateau_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReduceLROnPlateau(**kwargs)


def test_min_lr_list_must_fit_the_param_groups():
    callback = ReduceLROnPlateau(min_lr=[0.0, 0.1])
    callback.set_trainer(FakeTrainer())
    with pytest.raises(ValueError, match=r"min_lr holds 2 values but the optimizer has 1 param groups"):
        callback.on_train_begin()


def test_reduce_lr_on_plateau_verbose(capsys):
    _lrs_per_epoch(ReduceLROnPlateau(factor=0.5, patience=0, verbose=1), [1, 1])
    assert "Epoch 2: ReduceLROnPlateau reducing learning rate to 0.5." in capsys.readouterr().out


def test_reduce_lr_on_plateau_in_fit():
    x, y = make_classification(n=16)
    # min_delta larger than any change: only epoch 0 improves, every later epoch reduces (patience 0).
    trainer = make_trainer(lr=0.1, callbacks=[ReduceLROnPlateau(factor=0.5, patience=0, min_delta=100.0)])
    history = trainer.fit((x, y), (x, y), epochs=4, batch_size=8)
    assert history.history["lr"] == pytest.approx([0.1, 0.1, 0.05, 0.025])  # the rate each epoch trained with
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)


# -- LearningRateScheduler ------------------------------------------------------------------------
def test_learning_rate_scheduler_in_fit():
    x, y = make_classification(n=16)
    seen = []

    def schedule(epoch, lr):
        seen.append((epoch, lr))
        return 0.1 * 0.5**epoch

    trainer = make_trainer(lr=1.0, callbacks=[LearningRateScheduler(schedule)])
    history = trainer.fit((x, y), epochs=3, batch_size=8)
    assert history.history["lr"] == pytest.approx([0.1, 0.05, 0.025])
    assert seen == [(0, 1.0), (1, 0.1), (2, 0.05)]  # set at epoch begin, from the current rate


def test_learning_rate_scheduler_old_api_and_groups():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.1}])
    trainer = FakeTrainer(model, optimizer=optimizer)
    halve = LearningRateScheduler(lambda epoch, lr: lr * 0.5)
    halve.set_trainer(trainer)
    halve.on_epoch_begin(0)
    assert trainer.lrs() == [0.5, 0.05]  # each group from its own rate
    one_arg = LearningRateScheduler(lambda epoch: 0.01 * (epoch + 1))  # Keras's old API
    one_arg.set_trainer(trainer)
    one_arg.on_epoch_begin(2)
    assert trainer.lrs() == [pytest.approx(0.03)] * 2


@pytest.mark.parametrize(
    "returned, match",
    [
        (
            "0.1",
            r"schedule\(epoch=0, lr=0.1\) returned '0.1'; it must return the new learning rate as a finite "
            r"number >= 0$",
        ),
        (-0.1, r"returned -0.1; it must return the new learning rate as a finite number >= 0"),
        (math.inf, r"returned inf"),
        (True, r"returned True"),
        (torch.tensor(0.1), r"returned tensor\(0.1000\).*\(e.g. with .item\(\)\)"),
    ],
)
def test_learning_rate_scheduler_checks_what_the_schedule_returns(returned, match):
    callback = LearningRateScheduler(lambda epoch, lr: returned)
    callback.set_trainer(FakeTrainer(lr=0.1))
    with pytest.raises(ValueError, match=match):
        callback.on_epoch_begin(0)


def test_learning_rate_scheduler_arguments(capsys):
    with pytest.raises(TypeError, match=r"schedule must be a function \(epoch, lr\) -> new_lr, got float"):
        LearningRateScheduler(0.1)
    with pytest.raises(TypeError, match=r"schedule must be a function .* has the signature \(a, b, c\)"):
        LearningRateScheduler(lambda a, b, c: 0.1)
    with pytest.raises(ValueError, match=r"verbose must be 0 \(silent\) or 1"):
        LearningRateScheduler(lambda e, lr: lr, verbose=2)
    verbose = LearningRateScheduler(lambda e, lr: 0.5, verbose=1)
    verbose.set_trainer(FakeTrainer())
    verbose.on_epoch_begin(4)
    assert "Epoch 5: LearningRateScheduler setting learning rate to 0.5." in capsys.readouterr().out


# -- LRScheduler ----------------------------------------------------------------------------------
def _one_cycle(step, total, max_lr, pct_start=0.3, div_factor=25.0, final_div_factor=1e4):
    """OneCycleLR's two-phase cosine schedule in closed form (torch's documented formula)."""
    initial = max_lr / div_factor
    low = initial / final_div_factor
    peak = pct_start * total - 1

    def cos(start, end, pct):
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    if step <= peak:
        return cos(initial, max_lr, step / peak)
    return cos(max_lr, low, (step - peak) / (total - 1 - peak))


def _fit_recording_step_lrs(make_scheduler, accumulate, epochs=2, n=20, batch_size=4, sized=True):
    """Fits with a per-step LRScheduler; returns the lr each optimizer step used, the trainer, the scheduler."""
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = make_scheduler(optimizer)
    used = []
    recorder = LambdaCallback(on_before_optimizer_step=lambda: used.append(optimizer.param_groups[0]["lr"]))
    trainer = make_trainer(
        model,
        optimizer=optimizer,
        accumulate_grad_batches=accumulate,
        callbacks=[LRScheduler(scheduler, interval="step"), recorder],
    )
    x, y = make_classification(n=n)
    if sized:
        trainer.fit((x, y), epochs=epochs, batch_size=batch_size)
    else:
        trainer.fit(UnsizedBatches(x, y, batch_size), epochs=epochs)
    return used, trainer, scheduler


# 5 batches: accumulation groups (0, 1), (2, 3), (4). Without a length, the trainer learns that batch 4 was
# the last only after it, so group (4) steps after the epoch's last on_batch_end and is caught at its end.
@pytest.mark.parametrize("accumulate, steps, sized", [(1, 10, True), (2, 6, True), (2, 6, False)])
def test_per_step_one_cycle_matches_the_formula(accumulate, steps, sized):
    used, trainer, scheduler = _fit_recording_step_lrs(
        lambda opt: torch_sched.OneCycleLR(opt, max_lr=1.0, total_steps=steps, cycle_momentum=False),
        accumulate,
        sized=sized,
    )
    assert trainer.global_step == steps
    assert scheduler.last_epoch == steps  # one scheduler step per optimizer step, the short groups' included
    assert used == pytest.approx([_one_cycle(i, steps, 1.0) for i in range(steps)], rel=1e-12)


def test_per_step_lambda_warmup_with_accumulation():
    used, trainer, _ = _fit_recording_step_lrs(
        lambda opt: torch_sched.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4)), accumulate=2
    )
    assert used == pytest.approx([0.5 * min(1.0, (i + 1) / 4) for i in range(6)])


def test_per_epoch_scheduler_in_fit_and_reuse():
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    callback = LRScheduler(torch_sched.StepLR(optimizer, step_size=1, gamma=0.5))
    trainer = make_trainer(model, optimizer=optimizer, callbacks=[callback])
    x, y = make_classification(n=16)
    assert trainer.fit((x, y), epochs=2, batch_size=8).history["lr"] == pytest.approx([0.1, 0.05])
    # A second fit carries on with the schedule, as the torch scheduler would.
    assert trainer.fit((x, y), epochs=2, batch_size=8).history["lr"] == pytest.approx([0.025, 0.0125])


def test_per_step_scheduler_reused_across_fits_steps_once_per_step():
    used, trainer, scheduler = _fit_recording_step_lrs(lambda opt: torch_sched.LambdaLR(opt, lambda s: 1.0), 2)
    x, y = make_classification(n=20)
    trainer.fit((x, y), epochs=2, batch_size=4)
    assert (trainer.global_step, scheduler.last_epoch) == (12, 12)


def test_per_step_schedule_resumes_exactly(tmp_path):
    def build():
        torch.manual_seed(0)
        model = TinyNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = torch_sched.OneCycleLR(optimizer, max_lr=1.0, total_steps=6, cycle_momentum=False)
        used = []
        recorder = LambdaCallback(on_before_optimizer_step=lambda: used.append(optimizer.param_groups[0]["lr"]))
        trainer = make_trainer(
            model,
            optimizer=optimizer,
            accumulate_grad_batches=2,
            callbacks=[LRScheduler(scheduler, interval="step"), recorder],
        )
        return trainer, used

    x, y = make_classification(n=20)
    uninterrupted, used_all = build()
    uninterrupted.fit((x, y), epochs=2, batch_size=4, shuffle=False)

    first, used_first = build()
    first.fit((x, y), epochs=1, batch_size=4, shuffle=False)
    first.save_checkpoint(tmp_path / "epoch1.pt")
    resumed, used_resumed = build()
    resumed.fit((x, y), epochs=2, batch_size=4, shuffle=False, resume=tmp_path / "epoch1.pt")
    assert used_first + used_resumed == pytest.approx(used_all, rel=1e-12)
    assert len(used_all) == 6


def test_fp16_skipped_step_does_not_advance_the_schedule():
    trainer = FakeTrainer(precision="fp16")
    scheduler = torch_sched.LambdaLR(trainer.optimizer, lambda s: 1.0)
    trainer.optimizer.step()  # torch warns when a scheduler steps before its optimizer ever did
    callback = LRScheduler(scheduler, interval="step")
    callback.set_trainer(trainer)
    callback.on_train_begin()
    for step, skipped, expected in [(1, False, 1), (2, True, 1), (3, False, 2)]:
        trainer.state.global_step, trainer.last_step_skipped = step, skipped
        callback.on_batch_end(step - 1, {})
        assert scheduler.last_epoch == expected
    callback.on_batch_end(3, {})  # no optimizer step since the last batch: nothing to do
    assert scheduler.last_epoch == 2
    trainer.precision = "32"  # last_step_skipped is only consulted under fp16
    trainer.state.global_step = 4
    callback.on_batch_end(4, {})
    assert scheduler.last_epoch == 3


def test_torch_reduce_lr_on_plateau_through_monitor():
    trainer = FakeTrainer(lr=1.0)
    scheduler = torch_sched.ReduceLROnPlateau(trainer.optimizer, factor=0.5, patience=0)
    callback = LRScheduler(scheduler, monitor="val_loss")
    # torch counts bad epochs: with patience=0 each non-improving epoch reduces; a skipped epoch does not count.
    assert _lrs_per_epoch(callback, [1.0, 1.0, None, 1.0], trainer=trainer) == [1.0, 0.5, 0.5, 0.25]
    callback.set_trainer(FakeTrainer(has_validation=False, optimizer=trainer.optimizer))
    with pytest.raises(KeyError, match=r"LRScheduler\(monitor='val_loss'\): no such key in the epoch logs"):
        callback.on_epoch_end(0, {"loss": 1.0})


def test_lr_scheduler_state_dict_is_weights_only_loadable():
    trainer = FakeTrainer()
    scheduler = torch_sched.OneCycleLR(trainer.optimizer, max_lr=1.0, total_steps=10, cycle_momentum=False)
    trainer.optimizer.step()  # torch warns when a scheduler steps before its optimizer ever did
    callback = LRScheduler(scheduler, interval="step")
    callback.set_trainer(trainer)
    callback.on_train_begin()
    trainer.state.global_step = 3
    callback.on_batch_end(0, {})
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = LRScheduler(
        torch_sched.OneCycleLR(trainer.optimizer, max_lr=1.0, total_steps=10, cycle_momentum=False), interval="step"
    )
    other.load_state_dict(state)
    assert other.scheduler.last_epoch == 3 and other._seen_step == 3


def test_lr_scheduler_arguments():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    plateau = torch_sched.ReduceLROnPlateau(optimizer)
    step = torch_sched.StepLR(optimizer, 1)
    with pytest.raises(TypeError, match=r"scheduler must be a torch.optim.lr_scheduler object .*got function"):
        LRScheduler(lambda epoch: 0.1)
    with pytest.raises(ValueError, match=r"interval must be 'epoch' .* or 'step' .*got 'batch'"):
        LRScheduler(step, interval="batch")
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau steps on a monitored value: pass monitor="):
        LRScheduler(plateau)
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau steps on an epoch-log value: use interval='epoch'"):
        LRScheduler(plateau, interval="step", monitor="val_loss")
    with pytest.raises(ValueError, match=r"monitor='val_loss' is only for torch's ReduceLROnPlateau; StepLR.step"):
        LRScheduler(step, monitor="val_loss")
    callback = LRScheduler(step)
    callback.set_trainer(FakeTrainer())
    with pytest.raises(
        ValueError,
        match=r"the scheduler was built for an optimizer that is not one of the trainer's \(optimizer\); build it "
        r"on the optimizer you passed to Trainer",
    ):
        callback.on_train_begin()
