"""Ranks that see different things (issue 15): a rank with no validation batch, per-rank seeds, the
asynchronous stop vote. Forked gloo ranks on the CPU (see ``dist_utils``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_ranks, run_single
from test_distributed import build, make_data
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import distributed, rng

pytestmark = pytest.mark.distributed


def _one_validation_sample(rank: int, out: Path) -> dict[str, Any]:
    trainer = build()
    x, y = make_data(1).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # rank 1's share is empty
    history = trainer.fit(DataLoader(make_data(), batch_size=96 // trainer.world_size), loader, epochs=2)
    return {
        "fit": {k: v for k, v in history.history.items() if k.startswith("val_")},
        "loader": trainer.evaluate(loader),
        "in_memory": trainer.evaluate((x, y), batch_size=4),
    }


def test_a_rank_without_validation_batches_reduces_the_same_layout(tmp_path: Path) -> None:
    one = run_single(_one_validation_sample, tmp_path / "one")
    for rank in run_ranks(_one_validation_sample, tmp_path / "two", timeout=30).check():
        for kind in ("fit", "loader", "in_memory"):
            assert rank[kind].keys() == one[kind].keys(), kind
            for key, value in one[kind].items():
                assert rank[kind][key] == pytest.approx(value, abs=1e-6), (kind, key)


def test_the_common_layout_is_the_union_of_the_ranks_keys_in_rank_order(monkeypatch: pytest.MonkeyPatch) -> None:
    reducer = distributed._SumOverRanks(torch.device("cpu"), distributed.DistInfo(world_size=2))
    monkeypatch.setattr(distributed, "gather_object", lambda obj, info: [["loss", "aux"], []])
    assert reducer.common_keys([]) == ["loss", "aux"]


# -- seeds: one per rank, the shared shuffling seed untouched -------------------------------------------
def _seeds(rank: int, out: Path, per_rank: bool) -> dict[str, Any]:
    fitkit.seed_everything(7, per_rank=per_rank)
    draw = torch.rand(3)
    loader = DataLoader(make_data(8), batch_size=4, num_workers=0)
    base_seed = iter(loader)._base_seed  # what each DataLoader worker's seed derives from
    return {"draw": draw, "last_seed": rng.last_seed(), "worker_base_seed": base_seed}


def test_each_rank_draws_its_own_random_numbers_from_one_seed(tmp_path: Path) -> None:
    ranks = run_ranks(_seeds, tmp_path / "per_rank", per_rank=True).check()
    assert not torch.equal(ranks[0]["draw"], ranks[1]["draw"])
    assert ranks[0]["worker_base_seed"] != ranks[1]["worker_base_seed"]
    assert ranks[0]["last_seed"] == ranks[1]["last_seed"] == 7  # the DistributedSampler's shared seed
    single = run_single(_seeds, tmp_path / "one", per_rank=True)
    assert torch.equal(single["draw"], ranks[0]["draw"])  # rank 0 (and one process) use the seed itself
    same = run_ranks(_seeds, tmp_path / "same", per_rank=False).check()
    assert torch.equal(same[0]["draw"], same[1]["draw"])


# -- CUDA generators: the trainer's device only -------------------------------------------------------
def test_rng_state_keeps_the_current_cuda_generator_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device], dtype=torch.uint8))
    monkeypatch.setattr(rng, "_warn_other_devices", lambda device: None)
    state = rng.capture()
    assert torch.equal(state["cuda"], torch.tensor([1], dtype=torch.uint8))
    restored: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s.tolist(), device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # resumed where the GPU has another index
    rng.restore(state)
    assert restored == [([1], 0)]
    restored_all: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored_all.append(len(states)))
    rng.restore({**state, "cuda": [torch.zeros(1), torch.zeros(1)]})  # a checkpoint of fitkit 0.1
    assert restored_all == [2]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dropout_resumes_exactly_from_the_devices_generator(tmp_path: Path) -> None:
    from torch import nn

    def run(resume: Path | None) -> torch.Tensor:
        fitkit.seed_everything(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 2))
        trainer = fitkit.Trainer(model, "sgd", "cross_entropy", device="cuda", verbose=0)
        data = make_data().tensors
        if resume is None:
            trainer.fit(data, batch_size=16, epochs=1)
            trainer.save_checkpoint(tmp_path / "e1.pt")
        else:
            trainer.fit(data, batch_size=16, epochs=1)  # the same first epoch, then the checkpoint's state
            trainer.load_checkpoint(resume)
        trainer.fit(data, batch_size=16, epochs=2)
        return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])

    assert torch.equal(run(None), run(tmp_path / "e1.pt"))


# -- the asynchronous stop vote ---------------------------------------------------------------------------
def _stop_at(rank: int, out: Path, step: int) -> dict[str, Any]:
    class StopOnRankOne(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.dist.rank == 1 and self.trainer.global_step == step:
                self.trainer.stop("rank 1 had enough")

    trainer = build(callbacks=[StopOnRankOne()])
    trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=3)
    return {"steps": trainer.global_step, "reason": trainer.state.stop_reason, "epochs": len(trainer.history.epoch)}


@pytest.mark.parametrize("step, epochs", [(2, 1), (3, 1), (6, 2)])  # mid-epoch, and an epoch's last batch
def test_an_asynchronous_stop_vote_stops_every_rank_after_the_same_step(tmp_path: Path, step: int, epochs: int) -> None:
    ranks = run_ranks(_stop_at, tmp_path, step=step, timeout=30).check()
    assert [r["steps"] for r in ranks] == [step, step]
    assert [r["epochs"] for r in ranks] == [epochs, epochs]
    assert [r["reason"] for r in ranks] == ["stopped on another rank", "rank 1 had enough"]
    assert os.environ.get("RANK") is None  # the parent stays a plain process
