"""Profiler and SpikeDetection (issue 21): a trace of the scheduled batches only; a planted spike caught at its step,
warned about or raised with a checkpoint, and resumed exactly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_classification, make_trainer
from torch.utils.data import DataLoader, TensorDataset

from fitkit import Trainer
from fitkit.callbacks import Profiler, SpikeDetection
from fitkit.callbacks.spike_detection import LossSpikeError


def _loader(n: int = 40, batch_size: int = 4) -> DataLoader:
    x, y = make_classification(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@pytest.mark.slow
def test_the_profiler_writes_one_trace_of_the_scheduled_batches_only(tmp_path: Path):
    profiler = Profiler(tmp_path / "prof", wait=2, warmup=1, active=2)
    trainer = make_trainer(callbacks=[profiler])
    trainer.fit(_loader(), epochs=1)  # 10 batches: 0-1 wait, 2 warm-up, 3-4 recorded, then nothing
    assert len(profiler.traces) == 1 and profiler.traces[0].name.startswith("rank0.")
    events = json.loads(profiler.traces[0].read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#3", "ProfilerStep#4"]
    assert profiler._profiler is None  # stopped after the window: later batches pay nothing


def test_profiler_arguments_are_checked(tmp_path: Path):
    with pytest.raises(ValueError, match="active"):
        Profiler(tmp_path, active=0)
    with pytest.raises(ValueError, match="repeat"):
        Profiler(tmp_path, repeat=0)
    assert Profiler(tmp_path).rank_zero_only and not Profiler(tmp_path, all_ranks=True).rank_zero_only


class _SpikyTrainer(Trainer):
    """Logs batch 27 of the fit (epoch 2, batch index 7: global step 28) with its loss x 1000; trains as usual."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        logs = super().train_step(batch)
        if self.state.epoch * 10 + self.state.batch_in_epoch == 27:
            logs["loss"] = logs["loss"] * 1000
        return logs


def _spiky(**kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    from helpers import TinyNet

    model = TinyNet()
    return _SpikyTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.01), "cross_entropy", device="cpu", verbose=0, **kwargs
    )


def test_a_planted_spike_is_reported_at_its_step():
    spikes = SpikeDetection(window=5, warmup=10, threshold=6.0, check_every_n_steps=4)
    trainer = _spiky(callbacks=[spikes])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_loader(), epochs=4)
    assert [(s["step"], s["epoch"], s["batch"]) for s in spikes.spikes] == [(28, 2, 7)]
    assert any("step 28 (epoch 3, batch index 7)" in str(w.message) for w in caught)


def test_raise_writes_a_checkpoint_and_names_the_step(tmp_path: Path):
    spikes = SpikeDetection(window=5, warmup=10, action="raise", check_every_n_steps=1, dirpath=tmp_path)
    trainer = _spiky(callbacks=[spikes])
    with pytest.raises(LossSpikeError, match="step 28") as raised:
        trainer.fit(_loader(), epochs=4)
    assert raised.value.spike["step"] == 28
    assert (tmp_path / "spike-step28.pt").exists()
    assert trainer.state.global_step == 28  # stopped at the very step (check_every_n_steps=1)


def test_no_spike_in_a_smooth_run_and_the_state_resumes_the_statistics():
    spikes = SpikeDetection(window=5, warmup=5, check_every_n_steps=3)
    trainer = make_trainer(callbacks=[spikes])
    trainer.fit(_loader(), epochs=2)
    assert spikes.spikes == []
    state = spikes.state_dict()
    assert state["seen"] == 20 and len(state["values"]) == 5 and state["pending"] == []
    again = SpikeDetection(window=5, warmup=5)
    again.load_state_dict(state)
    assert again.state_dict() == state
    with pytest.raises(ValueError, match="action"):
        SpikeDetection(action="stop")
    with pytest.raises(ValueError, match="warmup"):
        SpikeDetection(window=10, warmup=5)
