"""The performance tools under torchrun (issue 21), two gloo ranks forked on the CPU: ThroughputMonitor's rates are
the whole job's (every rank's samples summed, MFU over every device), and SpikeDetection's reads and decisions
happen at the same steps on every rank (no hang)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_ranks
from torch import nn

import fitkit
from fitkit.callbacks import SpikeDetection, ThroughputMonitor

PARTS = ("time_data", "time_step", "time_callbacks")


def _fit(rank: int, out: Path) -> dict[str, Any]:
    fitkit.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    monitor = ThroughputMonitor(log_every_n_steps=2, peak_flops=1e9)
    spikes = SpikeDetection(window=2, warmup=2, threshold=1e6, check_every_n_steps=2)
    trainer = fitkit.Trainer(model, "sgd", "cross_entropy", callbacks=[monitor, spikes], verbose=0)
    history = trainer.fit((x, y), (x[:64], y[:64]), batch_size=16, epochs=2).history  # 8 steps an epoch per rank
    return {"history": history, "step_logs": monitor.step_logs, "flops": monitor.flops_per_sample}


@pytest.mark.slow
def test_the_monitor_reports_whole_job_figures_on_every_rank(tmp_path: Path) -> None:
    ranks = run_ranks(_fit, tmp_path, timeout=120).check()
    first, second = (rank["history"] for rank in ranks)
    for key in ("samples_per_sec", "batches_per_sec", "flops_per_sec", "mfu"):
        assert first[key] == second[key], key  # agreed over the ranks
    for epoch in range(2):
        # Each rank trained 128 samples an epoch; the job 256, over the ranks' mean training time.
        seconds = [sum(h[part][epoch] for part in PARTS) for h in (first, second)]
        assert first["samples_per_sec"][epoch] == pytest.approx(256 / (sum(seconds) / 2), rel=0.05)
        assert first["mfu"][epoch] == pytest.approx(first["flops_per_sec"][epoch] / (2 * 1e9))
    assert ranks[0]["step_logs"]["samples_per_sec"] == ranks[1]["step_logs"]["samples_per_sec"]
    assert ranks[0]["flops"] == ranks[1]["flops"] == 2 * (8 * 32 + 32 * 3) * 3 - 2 * 8 * 32
