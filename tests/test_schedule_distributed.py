"""Training schedules under torchrun (2 forked gloo ranks): step-level validation, max_time, predict shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from helpers import make_classification, make_trainer
from torch.utils.data import DataLoader, TensorDataset

from fitkit import schedule
from fitkit.callbacks import LambdaCallback, PredictionWriter

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _fit(rank: int, out: Path, fake_clock: bool = False) -> dict:
    x, y = make_classification(n=32)
    torch.manual_seed(0)
    ticks = []
    callbacks = []
    if fake_clock:  # rank 0's clock runs 10x faster than rank 1's: rank 0 alone decides
        now = [0.0]
        schedule.clock = lambda: now[0]
        callbacks.append(
            LambdaCallback(on_batch_end=lambda b, logs: now.__setitem__(0, now[0] + (1.0 if rank == 0 else 0.1)))
        )
        ticks = now
    trainer = make_trainer(callbacks=callbacks)
    history = trainer.fit(
        DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True),
        DataLoader(TensorDataset(x[:10], y[:10]), batch_size=4),
        epochs=3,
        validate_every_n_steps=3,
        validation_freq=0,
        max_time=5.5 if fake_clock else None,
    )
    preds = trainer.predict(DataLoader(TensorDataset(x[:10], y[:10]), batch_size=3))
    trainer.predict(
        x[:10], batch_size=3, callbacks=[PredictionWriter(out / "preds", overwrite=True)], return_outputs=False
    )
    trainer.model.eval()
    with torch.no_grad():
        direct = trainer.model(x[:10])
    return {
        "direct": direct,
        "validations": history.validations,
        "step": trainer.global_step,
        "reason": trainer.state.stop_reason,
        "preds": preds,
        "clock": list(ticks),
    }


def test_step_validation_runs_at_the_same_steps_on_every_rank_with_reduced_metrics(tmp_path):
    ranks = run_ranks(_fit, tmp_path / "two", timeout=120).check()
    # 32 samples, 2 ranks, batch 4: 4 steps an epoch, 12 in all -> validations at 3, 6, 9, 12 on both ranks.
    assert [v["step"] for v in ranks[0]["validations"]] == [3, 6, 9, 12]
    assert ranks[0]["validations"] == ranks[1]["validations"]  # all-reduced: the same values
    # predict: each rank its share, gathered in the data's order = the model on all the rows.
    for rank in ranks:
        assert torch.allclose(rank["preds"], rank["direct"])
    files = sorted(p.name for p in (tmp_path / "two" / "preds").iterdir())
    assert {f[:21] for f in files} == {"predictions-rank00000", "predictions-rank00001"}
    assert torch.allclose(PredictionWriter.read(tmp_path / "two" / "preds"), ranks[0]["direct"])


def test_max_time_ends_every_rank_at_the_same_step_on_rank_0s_clock(tmp_path):
    ranks = run_ranks(_fit, tmp_path / "two", fake_clock=True, timeout=120).check()
    assert ranks[0]["step"] == ranks[1]["step"] == 6  # rank 0: 6 s after 6 steps; rank 1's clock said 0.6 s
    assert ranks[0]["reason"].startswith("max_time: 6 s of training reached max_time=5.5 s")
    assert ranks[1]["reason"].startswith("max_time: rank 0's clock reached max_time=5.5 s")  # the budget, every rank
