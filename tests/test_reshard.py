"""A checkpoint of N ranks resumed on M (issue 22): the interrupted epoch goes on with exactly the samples no
rank had read, each once. Real forked gloo ranks (``dist_utils``) are killed mid-epoch right after a backup,
and the run is resumed with another number of ranks; every rank logs the sample indices of every batch it
trains on, and the test counts them.
"""

from __future__ import annotations

import collections
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_ranks
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fitkit
from fitkit import _reshard
from fitkit.callbacks import BackupAndRestore

N = 96


class Indexed(Dataset):
    """Samples whose last input feature is their index (the model ignores it), with noise from torch."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(N, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.x[i], torch.tensor([float(i)])]), self.y[i]


class FirstEight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :8])


def _job(
    rank: int, out: Path, global_batch: int = 32, kill_at: int | None = None, in_memory: bool = False,
    strategy: str = "auto", backup: str = "backup", resume: Path | None = None,
) -> Any:  # fmt: skip
    """3 epochs, a backup after every step; each rank appends ``epoch index...`` lines to its log of seen
    samples; every rank SIGKILLs itself after the backup of step ``kill_at``."""
    folder = out.parent
    log = folder / f"seen-{os.environ.get('WORLD_SIZE', '1')}-{rank}.txt"

    class Record(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            indices = self.trainer.batch[0][:, 8].long().tolist()
            with open(log, "a") as f:
                f.write(f"{self.trainer.epoch} {' '.join(map(str, indices))}\n")
            if self.trainer.global_step == kill_at:
                self.trainer.after_callbacks(lambda: os.kill(os.getpid(), signal.SIGKILL))

    fitkit.seed_everything(0)
    model = FirstEight()
    callbacks = [
        BackupAndRestore(folder / backup, save_freq=1, delete_checkpoint=False),
        Record(),
    ]  # killed after the backup
    trainer = fitkit.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), "cross_entropy",
                             callbacks=callbacks, verbose=0, device="cpu", strategy=strategy)  # fmt: skip
    batch = global_batch // trainer.world_size
    data = Indexed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if in_memory:
            x = torch.stack([data[i][0] for i in range(N)])
            trainer.fit((x, data.y), epochs=3, batch_size=batch, resume=resume)
        else:
            trainer.fit(DataLoader(data, batch_size=batch, shuffle=True), epochs=3, resume=resume)
    return {"steps": trainer.global_step, "warnings": [str(w.message) for w in caught]}


def _seen(folder: Path) -> dict[int, collections.Counter[int]]:
    """Every sample index trained on, counted per epoch, over all the processes that ran in ``folder``."""
    counts: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for log in folder.glob("seen-*.txt"):
        for line in log.read_text().splitlines():
            epoch, *indices = map(int, line.split())
            counts[epoch].update(indices)
    return counts


def _kill(folder: Path, world_size: int, kill_at: int, **kwargs: Any) -> None:
    run = run_ranks(_job, folder / "out", world_size=world_size, kill_at=kill_at, **kwargs)
    assert run.exitcodes == [-signal.SIGKILL] * world_size, run.errors
    assert fitkit.checkpoint.verify(folder / "backup" / "backup.pt")["global_step"] == kill_at


def _assert_every_sample_once(folder: Path) -> None:
    seen = _seen(folder)
    assert sorted(seen) == [0, 1, 2]
    for epoch, counts in seen.items():
        assert sorted(counts) == list(range(N)), f"epoch {epoch}: missing {set(range(N)) - set(counts)}"
        assert set(counts.values()) == {1}, f"epoch {epoch}: read twice: {[i for i, c in counts.items() if c > 1]}"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_killed_mid_epoch_resumes_on_another_number_of_ranks_with_every_sample_once(
    tmp_path: Path, before: int, after: int
) -> None:
    _kill(tmp_path, before, kill_at=4)  # epoch 1 (3 steps an epoch), 1 of its 3 steps done
    resumed = run_ranks(_job, tmp_path / "out", world_size=after).check()
    assert {r["steps"] for r in resumed} == {4 + 2 + 3}  # the 2 steps left of epoch 1, then epoch 2
    _assert_every_sample_once(tmp_path)
    notes = [w for w in resumed[0]["warnings"] if "not be bit-identical" in w]
    assert len(notes) == 1 and f"written by {before} process(es) on {after}" in notes[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_resharded_epoch_killed_again_and_resharded_back_still_sees_every_sample_once(tmp_path: Path) -> None:
    _kill(tmp_path, 2, kill_at=4)  # 2 ranks: epoch 1, 32 of its 96 samples read
    _kill(tmp_path, 1, kill_at=5)  # 1 rank: 32 more, then killed again inside the same epoch
    run_ranks(_job, tmp_path / "out", world_size=2).check()  # back on 2 ranks: the last 32
    _assert_every_sample_once(tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_in_memory_data_resumes_on_another_number_of_ranks_with_every_sample_once(tmp_path: Path) -> None:
    _kill(tmp_path, 2, kill_at=4, in_memory=True)
    run_ranks(_job, tmp_path / "out", world_size=1, in_memory=True).check()
    _assert_every_sample_once(tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_an_fsdp_run_killed_mid_epoch_resumes_its_dcp_checkpoint_on_one_rank_with_every_sample_once(
    tmp_path: Path,
) -> None:
    _kill(tmp_path, 2, kill_at=4, strategy="fsdp")
    assert (tmp_path / "backup" / "backup.pt" / ".metadata").exists()  # a sharded (DCP) checkpoint
    # One plain process: its backups are files, so they go to another folder.
    resumed = run_ranks(_job, tmp_path / "out", world_size=1, backup="one", resume=tmp_path / "backup" / "backup.pt")
    resumed.check()
    assert resumed.results[0]["steps"] == 9
    _assert_every_sample_once(tmp_path)


def test_share_deals_every_sample_once_with_the_same_number_of_batches_on_every_rank() -> None:
    samples = list(range(100, 171))  # 71 samples, 3 ranks of 8: 2 full steps and a last one of 23
    shares = [_reshard.share(samples, rank, 3, 8) for rank in range(3)]
    assert {len(batches) for batches, _ in shares} == {3}
    assert sorted(i for batches, _ in shares for batch in batches for i in batch) == samples
    batches, repeated = _reshard.share([1, 2], 0, 3, 8)  # fewer samples than ranks: one is read twice
    assert repeated == 1 and batches == [[1]]
