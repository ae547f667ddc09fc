"""The callback contract (issue 18): ``TrainerLike`` lists what a callback may use on its trainer; the real
Trainer and the tests' FakeTrainer both provide all of it."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import FakeTrainer, make_trainer

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
