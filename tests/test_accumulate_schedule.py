"""accumulate_grad_batches as a schedule by epoch (issue 21): the group size follows the epoch, a checkpoint
records the schedule, and a run resumed mid-epoch ends bit-identical to the uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import make_classification, make_trainer
from resume_utils import assert_same_state, build, final_state
from torch.utils.data import DataLoader, TensorDataset

from fitkit import Callback, seed_everything


class _Steps(Callback):
    def __init__(self) -> None:
        self.per_epoch: list[tuple[int, int]] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.per_epoch.append((self.trainer.accumulate_grad_batches, self.trainer.global_step))


def test_the_group_size_follows_the_epoch():
    steps = _Steps()
    trainer = make_trainer(callbacks=[steps], accumulate_grad_batches={1: 4, 3: 2})
    x, y = make_classification(32)
    trainer.fit(DataLoader(TensorDataset(x, y), batch_size=4), epochs=4)  # 8 batches an epoch
    assert steps.per_epoch == [(1, 8), (4, 10), (4, 12), (2, 16)]
    assert trainer._accumulation.state_dict()["schedule"] == {1: 4, 3: 2}


def test_a_schedule_equals_changing_the_size_by_hand_between_fits():
    x, y = make_classification(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    seed_everything(0)
    scheduled = make_trainer(accumulate_grad_batches={0: 4, 2: 2})
    scheduled.fit(loader, epochs=4)
    seed_everything(0)
    by_hand = make_trainer(accumulate_grad_batches=4)
    by_hand.fit(loader, epochs=2)
    by_hand.accumulate_grad_batches = 2
    by_hand.fit(loader, initial_epoch=2, epochs=4)
    assert scheduled.history.history["loss"][2:] == by_hand.history.history["loss"]
    assert scheduled.model.state_dict().keys() == by_hand.model.state_dict().keys()
    for a, b in zip(scheduled.model.state_dict().values(), by_hand.model.state_dict().values()):
        assert a.equal(b)


class _SaveAt(Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.trainer.global_step == self.step and not self.path.exists():
            self.trainer.after_callbacks(lambda: self.trainer.save_checkpoint(self.path))


def test_a_run_resumed_mid_epoch_under_the_schedule_is_bit_identical(tmp_path: Path):
    path = tmp_path / "step6.pt"
    schedule = {0: 4, 2: 2}  # 6 batches an epoch: steps 2 per epoch, then 3 per epoch
    trainer, train, val = build(accumulate=schedule, callbacks=[_SaveAt(6, path)])  # type: ignore[arg-type]
    trainer.fit(train, val, epochs=4)
    assert trainer.global_step == 10
    resumed, train2, val2 = build(accumulate=schedule, callbacks=[_SaveAt(6, path)])  # type: ignore[arg-type]
    resumed.fit(train2, val2, epochs=4, resume=path)
    assert resumed.global_step == 10
    assert_same_state(final_state(resumed), final_state(trainer))


@pytest.mark.parametrize("bad", [{}, {0: 0}, {-1: 2}, {0: 2.5}, {"0": 2}])
def test_a_bad_schedule_is_refused(bad: Any):
    with pytest.raises(ValueError, match="schedule"):
        make_trainer(accumulate_grad_batches=bad)
