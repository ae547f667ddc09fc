"""TerminateOnNaN: stops at the first non-finite training loss, naming where."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FakeTrainer, make_classification, make_trainer
from torch.nn import functional as F

from fitkit.callbacks import TerminateOnNaN


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_stops_at_the_first_non_finite_loss(bad):
    trainer = FakeTrainer(num_train_batches=4)
    trainer.state.epoch, trainer.state.global_step = 1, 6
    callback = TerminateOnNaN()
    callback.set_trainer(trainer)
    callback.on_batch_end(0, {"loss": torch.tensor(1.5)})
    callback.on_batch_end(1, {})  # a batch without a loss is not judged
    assert not trainer.stop_training
    with pytest.warns(
        RuntimeWarning,
        match=rf"TerminateOnNaN: the training loss is {bad} at epoch 2, batch 3/4 "
        r"\(batch index 2\), after 6 optimizer step\(s\); stopping training",
    ):
        callback.on_batch_end(2, {"loss": torch.tensor(bad)})
    assert trainer.stop_training
    assert trainer.state.stop_reason == (
        f"TerminateOnNaN: the training loss is {bad} at epoch 2, batch 3/4 (batch index 2), after 6 optimizer step(s)"
    )


def test_python_float_losses_and_unknown_batch_count():
    trainer = FakeTrainer(num_train_batches=None)
    callback = TerminateOnNaN()
    callback.set_trainer(trainer)
    callback.on_batch_end(0, {"loss": 0.25})
    assert not trainer.stop_training
    with pytest.warns(RuntimeWarning, match=r"at epoch 1, batch 2 \(batch index 1\)"):
        callback.on_batch_end(1, {"loss": math.nan})
    assert trainer.stop_training


def _loss_going_nan_at(call):
    calls = []

    def loss(outputs, targets):
        calls.append(1)
        value = F.cross_entropy(outputs, targets)
        return value * math.nan if len(calls) >= call else value

    return loss, calls


def test_fit_stops_at_the_nan_batch():
    loss, calls = _loss_going_nan_at(6)  # epoch 2 (1-based), its second batch
    trainer = make_trainer(loss=loss, callbacks=[TerminateOnNaN()])
    x, y = make_classification(n=16)
    with pytest.warns(RuntimeWarning, match=r"the training loss is nan at epoch 2, batch 2/4 \(batch index 1\)"):
        history = trainer.fit((x, y), epochs=5, batch_size=4)
    assert len(calls) == 6  # no batch after the NaN one
    assert history.epoch == [0, 1]  # the epoch's end hooks still ran, then training stopped
    assert math.isnan(history.history["loss"][1])
    assert trainer.state.stop_reason.startswith("TerminateOnNaN: the training loss is nan at epoch 2, batch 2/4")


def test_fit_with_accumulation_drops_the_unfinished_group():
    loss, calls = _loss_going_nan_at(3)  # batch index 2 opens the second accumulation group
    trainer = make_trainer(loss=loss, callbacks=[TerminateOnNaN()], accumulate_grad_batches=2)
    x, y = make_classification(n=16)
    with pytest.warns(RuntimeWarning, match=r"epoch 1, batch 3/4 \(batch index 2\), after 1 optimizer step\(s\)"):
        trainer.fit((x, y), epochs=2, batch_size=4)
    assert len(calls) == 3
    assert trainer.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the NaN gradients never applied


# -- without TerminateOnNaN: NaN inputs end the fit at the epoch's end, with the cause (issue 19) ------------------
def test_nan_inputs_end_the_fit_at_that_epoch_naming_the_sample(tmp_path):
    # They trained on for every epoch with one warning, the weights NaN from batch 6 on.
    from fitkit.callbacks import ModelCheckpoint

    x, y = make_classification(n=64, seed=3)
    x[37, 1] = math.nan  # batch 9 (batch_size 4, no shuffle) of the second fit's first epoch
    batches = []

    class Count(TerminateOnNaN.__mro__[1]):  # a plain Callback
        def on_batch_end(self, batch, logs=None):
            batches.append(batch)

    clean = make_classification(n=64, seed=3)[0]
    trainer = make_trainer(callbacks=[Count(), ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None)])
    trainer.fit((clean, y), epochs=1, batch_size=4, shuffle=False)  # one good epoch, checkpointed
    with pytest.raises(
        FloatingPointError,
        match=r"the weights became non-finite \(NaN or inf\) in epoch 1, batch 9, where the training loss first was: "
        r"training cannot go on from them, so fit stops here. The training data hold NaN at sample 37 of the inputs "
        r"\(position \(1,\)\), and 1 non-finite value\(s\) in all",
    ):
        trainer.fit((x, y), epochs=5, batch_size=4, shuffle=False)
    assert len(batches) == 32  # the good fit's 16 batches, the second fit's first epoch, then the error
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["e1.pt"]  # nothing written with NaN weights
    resumed = make_trainer(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None)])
    resumed.fit((clean, y), epochs=2, batch_size=4, shuffle=False, resume="auto")  # the advice works
    assert resumed.global_step == 32


def test_a_non_finite_loss_that_leaves_the_weights_finite_only_warns():
    # fp16's skipped steps, a loss that is inf for a batch but carries no gradient: training can go on.
    from fitkit import Trainer

    class OneInfLog(Trainer):
        def train_step(self, batch):
            logs = super().train_step(batch)
            return {**logs, "loss": logs["loss"] * (math.inf if self.global_step == 3 else 1.0)}

    x, y = make_classification(n=16)
    trainer = OneInfLog(torch.nn.Linear(4, 3), "sgd", "cross_entropy", verbose=0)
    with pytest.warns(UserWarning, match=r"the training loss became non-finite \(NaN or inf\) in epoch 1, batch 2"):
        history = trainer.fit((x, y), epochs=3, batch_size=4, shuffle=False)
    assert history.epoch == [0, 1, 2]
