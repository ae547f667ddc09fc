"""Features that meet (issue 19, "Silently wrong numbers"): each test pins one place where two features
used together gave a silently wrong number, against an invariant (validation is recomputed when due,
``last.pt`` is the newest state, a resume is exact)."""

from __future__ import annotations

from typing import Any

import torch
from helpers import make_classification

import fitkit
from fitkit import Callback


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
