"""The callback contract (issue 18): ``TrainerLike`` lists what a callback may use on its trainer; the real
Trainer and the tests' FakeTrainer both provide all of it; and the documented order of a resumed fit's first
events (``on_train_begin``, then the checkpoint's callback states, then ``on_epoch_begin``) is the real one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import FakeTrainer, make_classification, make_trainer

from fitkit.callbacks import Callback, ModelCheckpoint
from fitkit.callbacks.base import TrainerLike


def contract_members() -> dict[str, Any]:
    """The Protocol's members by name: a property (settable when it has a setter) or a method."""
    return {
        name: value
        for name, value in vars(TrainerLike).items()
        if not name.startswith("_") and (isinstance(value, property) or callable(value))
    }


def test_the_member_list_is_read_from_the_protocol():
    members = contract_members()
    assert {"state", "model", "optimizers", "stop", "allow_sync", "after_callbacks", "resumed_from"} <= set(members)
    assert {name for name, value in members.items() if isinstance(value, property) and value.fset} == {
        "stop_training",
        "optimizer",
    }


@pytest.mark.parametrize("kind", ["fake", "real"])
def test_the_fake_and_the_real_trainer_provide_every_member_of_the_contract(kind):
    trainer = FakeTrainer() if kind == "fake" else make_trainer()
    for name, member in contract_members().items():
        assert hasattr(trainer, name), f"{type(trainer).__name__} lacks TrainerLike.{name}"
        if not isinstance(member, property):
            assert callable(getattr(trainer, name)), f"{type(trainer).__name__}.{name} is not a method"
    trainer.stop_training = True  # the two members a callback may assign
    trainer.optimizer = trainer.optimizer
    assert trainer.stop_training and trainer.optimizers["optimizer"] is trainer.optimizer


class _RecordsResume(Callback):
    """Records its hooks and ``load_state_dict``, each with the trainer's epoch and resumed_from then."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, Path | None]] = []
        self.seen = 0

    def _record(self, name: str) -> None:
        self.events.append((name, self.trainer.state.epoch, self.trainer.resumed_from))

    def on_train_begin(self, logs=None):
        self.seen = 0  # reset per fit; a resumed fit's load_state_dict comes after and restores the count
        self._record("on_train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self._record(f"on_epoch_begin({epoch})")

    def on_batch_end(self, batch, logs=None):
        self.seen += 1

    def on_train_end(self, logs=None):
        self._record("on_train_end")

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]
        self._record("load_state_dict")


def test_a_resumed_fit_loads_callback_states_after_on_train_begin_and_before_on_epoch_begin(tmp_path):
    x, y = make_classification(n=8)

    def fit(epochs: int, **kwargs: Any) -> _RecordsResume:
        recorder = _RecordsResume()
        checkpoints = ModelCheckpoint(tmp_path / "{epoch}.pt", monitor=None, save_last=True)
        make_trainer(callbacks=[recorder, checkpoints]).fit((x, y), epochs=epochs, batch_size=4, **kwargs)
        return recorder

    first = fit(2)
    assert [name for name, _, _ in first.events] == [
        "on_train_begin",
        "on_epoch_begin(0)",
        "on_epoch_begin(1)",
        "on_train_end",
    ]
    resumed = fit(3, resume=tmp_path / "last.pt")
    # Keras's order: on_train_begin sees the fresh state (epoch 0, nothing resumed yet); the checkpoint, its
    # callback states included, is loaded next; the first epoch hook sees the resumed run.
    assert resumed.events == [
        ("on_train_begin", 0, None),
        ("load_state_dict", 2, None),
        ("on_epoch_begin(2)", 2, tmp_path / "last.pt"),
        ("on_train_end", 3, tmp_path / "last.pt"),
    ]
    assert resumed.seen == 6  # the reset in on_train_begin did not lose the restored count: 4 + 2 batches
