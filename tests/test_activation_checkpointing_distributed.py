"""Activation checkpointing meets DDP and FSDP (issue 21, STYLE 17), on two forked gloo ranks: the checkpointed
run's losses, weights and optimizer state equal the same run without it bit for bit (dropout included: each
rank draws its own masks), the state_dict keys are the plain model's, a run killed mid-epoch resumes from its
backup to the same end, bit for bit, and ThroughputMonitor counts the same FLOPs (the recomputation left out)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_ranks
from test_memory_tools import Stack
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit.callbacks import BackupAndRestore, ThroughputMonitor
from fitkit.memory import is_checkpointed
from fitkit.strategies import DDPStrategy

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())


def _job(rank: int, out: Path, strategy: Any, checkpointing: bool, kill_at: int | None = None) -> dict[str, Any]:
    """Two epochs of 4 steps a rank (64 samples, 8 a batch per rank), a backup after every step."""

    class Die(fitkit.Callback):  # after the backup of step kill_at is on disk, every rank dies at once
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == kill_at:
                self.trainer.after_callbacks(lambda: os._exit(9))

    fitkit.seed_everything(0)  # per rank: seed + rank, so each rank's dropout masks differ
    model = Stack()  # four residual blocks with dropout in a ModuleList: the blocks FSDP shards one by one
    monitor = ThroughputMonitor(log_every_n_steps=None)
    trainer = fitkit.Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        "cross_entropy",
        callbacks=[monitor, BackupAndRestore(out.parent / "backup", save_freq=1, delete_checkpoint=False), Die()],
        device="cpu",
        verbose=0,
        strategy=strategy,
        activation_checkpointing=checkpointing,
    )
    train = DataLoader(_data(), batch_size=8, shuffle=True)
    history = trainer.fit(train, DataLoader(_data(24), batch_size=8), epochs=2)
    return {
        "weights": trainer.model_state_dict(),
        "optimizer": trainer._strategy.optimizer_state_dict(trainer.model, trainer.optimizer),
        "history": history.history,
        "steps": trainer.global_step,
        "checkpointed": [is_checkpointed(block) for block in model.blocks],
        "keys": list(trainer.model_state_dict()),
        "flops_per_sample": monitor.flops_per_sample,
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["steps"] == b["steps"] == 8
    for key in ("loss", "val_loss", "flops_per_sample"):  # the monitor's timings differ from run to run
        assert a["history"][key] == b["history"][key], key
    assert a["flops_per_sample"] == b["flops_per_sample"] is not None  # the recomputation is not counted
    assert list(a["weights"]) == list(b["weights"])
    for key, value in a["weights"].items():
        assert torch.equal(value, b["weights"][key]), key
    for param, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][param][key]), (param, key)


@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        DDPStrategy(static_graph=True),  # DDP's reentrant-checkpointing trouble spots: not with non-reentrant
        DDPStrategy(find_unused_parameters=True),
        "fsdp",
    ],
    ids=["ddp", "ddp-static-graph", "ddp-find-unused", "fsdp"],
)
def test_activation_checkpointing_is_bit_identical_and_resumes_exactly_on_two_ranks(
    tmp_path: Path, strategy: Any
) -> None:
    plain = run_ranks(_job, tmp_path / "plain" / "out", strategy, False).check()
    checkpointed = run_ranks(_job, tmp_path / "checkpointed" / "out", strategy, True).check()
    for a, b in zip(plain, checkpointed):
        assert a["checkpointed"] == [False] * 4 and b["checkpointed"] == [True] * 4
        assert b["keys"] == a["keys"] and not any("checkpoint" in key for key in b["keys"])
    assert plain[0]["history"]["loss"] != plain[0]["history"]["loss"][:1] * 2  # it trained
    _assert_same(plain[0], checkpointed[0])  # rank 0 holds the gathered state (FSDP: the others get {})

    killed = run_ranks(_job, tmp_path / "resumed" / "out", strategy, True, kill_at=2)
    assert killed.exitcodes == [9, 9], killed.errors  # both died mid-epoch 1, after the backup of step 2
    resumed = run_ranks(_job, tmp_path / "resumed" / "out", strategy, True).check()
    _assert_same(checkpointed[0], resumed[0])
