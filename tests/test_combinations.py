"""Features that meet (issue 19, "Silently wrong numbers"): each test pins one place where two features
used together gave a silently wrong number, against an invariant (validation is recomputed when due,
``last.pt`` is the newest state, a resume is exact)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_classification
from resume_utils import build

import fitkit
from fitkit import Callback, checkpoint
from fitkit.callbacks import ModelCheckpoint


class StepsItsOwnOptimizer(fitkit.Trainer):
    """The docs' early custom-step pattern: ``self.optimizer.step()`` directly, never ``optimizer_step``."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = self.loss(self.forward(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}


class CountValidations(Callback):
    def __init__(self) -> None:
        self.begins = 0
        self.ends: list[float] = []

    def on_validation_begin(self, logs: Any = None) -> None:
        self.begins += 1

    def on_validation_end(self, logs: Any = None) -> None:
        self.ends.append(logs["val_loss"])


def test_custom_step_that_steps_its_optimizer_itself_gets_every_epoch_validated() -> None:
    x, y = make_classification(48)
    model = torch.nn.Linear(4, 3)
    counter = CountValidations()
    trainer = StepsItsOwnOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.5), "cross_entropy", callbacks=[counter], verbose=0,
        device="cpu",
    )  # fmt: skip
    history = trainer.fit((x, y), (x, y), epochs=4, batch_size=16)
    assert counter.begins == 4 and len(counter.ends) == 4  # every epoch's validation ran
    assert history.history["val_loss"] == counter.ends  # the logs are each epoch's own
    assert len(set(history.history["val_loss"])) == 4  # training changed the weights: no stale number
    expected = trainer.evaluate((x, y), batch_size=16)["loss"]
    assert abs(history.history["val_loss"][-1] - expected) < 1e-6


class Scores(Callback):
    """Puts scripted values into the epoch logs (before ModelCheckpoint in the list)."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs["score"] = self.values[epoch]


@pytest.mark.parametrize(
    ("option", "kept"), [({"save_top_k": 1}, ["e4.pt"]), ({"save_best_only": True}, ["e1.pt", "e4.pt"])]
)
def test_save_last_is_the_newest_state_also_when_the_epoch_is_not_kept(
    tmp_path: Path, option: Any, kept: list[str]
) -> None:
    """Lightning's save_last: last.pt at every save point, whether or not the epoch enters the top k."""
    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor="score", mode="min", save_last=True, **option)
    trainer, train, val = build(callbacks=[Scores([1.0, 2.0, 3.0, 0.5, 4.0]), ckpt])
    trainer.fit(train, val, epochs=5)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [*kept, "last.pt"]
    last = checkpoint.load(tmp_path / "last.pt")
    assert last["trainer"]["epoch"] == 5 and last["trainer"]["global_step"] == trainer.global_step
    assert torch.equal(last["model"]["0.weight"], trainer.model.state_dict()["0.weight"])
