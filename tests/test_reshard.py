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
import torch.distributed as dist
from dist_utils import run_ranks
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

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


SHARDS, SHARD_SIZE = 4, 24


def write_shards(folder: Path) -> Path:
    """``SHARDS`` files of ``SHARD_SIZE`` samples each: `Indexed`'s samples, in order, the index as last feature."""
    folder.mkdir(parents=True, exist_ok=True)
    data = Indexed()
    for shard in range(SHARDS):
        rows = range(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE)
        torch.save({"x": torch.stack([data[i][0] for i in rows]), "y": data.y[list(rows)]}, folder / f"{shard}.pt")
    return folder


class ShardStream(IterableDataset):
    """A stream of shards on disk that reshards itself: an example of the ``reshard_state_dict`` protocol.

    Each epoch the shards are shuffled from ``(seed, epoch)`` and dealt out to the ranks (``order[rank::world]``);
    a rank's state is the epoch and its work list, the ``[shard, start, stop]`` ranges it has still to read.
    ``reshard_state_dict`` takes the N ranks' states, lists their unread samples (rank by rank, in order) and
    gives rank ``r`` of M the ``r``-th of M contiguous equal pieces, as ranges: every unread sample goes to one
    rank. (Equal pieces give every rank the same number of batches, which DDP needs, when the remainder divides
    into M whole batches, as in these tests: a stream for any split would pad or drop, as DistributedSampler
    does.) ``reads`` counts the samples read from the files in this process."""

    def __init__(self, folder: Path, seed: int = 0) -> None:
        self.folder, self.seed = folder, seed
        self.epoch, self.ranges, self.loaded, self.reads = 0, [], False, 0

    def set_epoch(self, epoch: int) -> None:  # fitkit calls it before each epoch
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "ranges": [list(r) for r in self.ranges]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.ranges, self.loaded = state["epoch"], [list(r) for r in state["ranges"]], True

    def reshard_state_dict(self, states: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
        assert len({state["epoch"] for state in states}) == 1
        left = [(shard, i) for state in states for shard, start, stop in state["ranges"] for i in range(start, stop)]
        piece = left[rank * len(left) // world_size : (rank + 1) * len(left) // world_size]
        ranges: list[list[int]] = []
        for shard, i in piece:  # contiguous samples of one shard: one range
            if ranges and ranges[-1][0] == shard and ranges[-1][2] == i:
                ranges[-1][2] = i + 1
            else:
                ranges.append([shard, i, i + 1])
        return {"epoch": states[0]["epoch"], "ranges": ranges}

    def __iter__(self):  # type: ignore[no-untyped-def]
        if not self.loaded:  # a fresh epoch: this rank's shards of the epoch's order
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            order = torch.randperm(SHARDS, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            self.ranges = [[shard, 0, SHARD_SIZE] for shard in order[rank::world].tolist()]
        self.loaded = False
        while self.ranges:
            shard, start, stop = self.ranges[0]
            data = torch.load(self.folder / f"{shard}.pt")
            for i in range(start, stop):
                self.ranges[0] = [shard, i + 1, stop]  # consumed once yielded (read in the main process)
                self.reads += 1
                yield data["x"][i], data["y"][i]
            self.ranges.pop(0)


def _job(
    rank: int, out: Path, global_batch: int = 32, kill_at: int | None = None, in_memory: bool = False,
    strategy: str = "auto", backup: str = "backup", resume: Path | None = None, shards: Path | None = None,
    steps_per_epoch: int | None = None,
) -> Any:  # fmt: skip
    """3 epochs, a backup after every step; each rank appends ``epoch index...`` lines to its log of seen
    samples; every rank SIGKILLs itself after the backup of step ``kill_at``. ``shards``: a `ShardStream`
    over that folder instead of the map-style dataset."""
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
    data: Any = Indexed() if shards is None else ShardStream(shards)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if in_memory:
            x = torch.stack([data[i][0] for i in range(N)])
            trainer.fit((x, data.y), epochs=3, batch_size=batch, resume=resume, steps_per_epoch=steps_per_epoch)
        else:
            loader = DataLoader(data, batch_size=batch, shuffle=True if shards is None else None)
            trainer.fit(loader, epochs=3, resume=resume, steps_per_epoch=steps_per_epoch)
    warned = [str(w.message) for w in caught]
    return {"steps": trainer.global_step, "warnings": warned, "reads": getattr(data, "reads", None)}


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


@pytest.mark.slow
@pytest.mark.distributed
def test_an_fsdp_checkpoint_of_one_process_resumes_on_two_fsdp_ranks_with_every_sample_once(tmp_path: Path) -> None:
    _kill(tmp_path, 1, kill_at=4, strategy="fsdp")  # one process trains as a single device: a checkpoint file
    assert (tmp_path / "backup" / "backup.pt").is_file()
    # Two FSDP ranks write sharded (DCP) backups: another folder.
    resumed = run_ranks(
        _job, tmp_path / "out", world_size=2, strategy="fsdp", backup="two", resume=tmp_path / "backup" / "backup.pt"
    ).check()
    assert {r["steps"] for r in resumed} == {9}
    assert (tmp_path / "two" / "backup.pt" / ".metadata").exists()
    _assert_every_sample_once(tmp_path)
    assert any("written by 1 process(es) on 2" in w for w in resumed[0]["warnings"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_resharded_epoch_under_steps_per_epoch_reads_the_samples_the_interrupted_epoch_had_left_each_once(
    tmp_path: Path, before: int, after: int
) -> None:
    """steps_per_epoch=2, 16 samples per rank and batch (the global batch changes with the ranks): the resumed
    epoch on another number of ranks reads exactly the samples the interrupted one had still to read within
    its 2 steps (16 x the old ranks), each once, however many steps of the new ranks that takes."""
    reference_run = run_ranks(
        _job, tmp_path / "reference" / "out", world_size=before, global_batch=16 * before, steps_per_epoch=2
    )
    reference_run.check()
    _kill(tmp_path / "resumed", before, kill_at=3, global_batch=16 * before, steps_per_epoch=2)  # epoch 1, step 1 of 2
    run_ranks(_job, tmp_path / "resumed" / "out", world_size=after, global_batch=16 * after, steps_per_epoch=2).check()
    reference, seen = _seen(tmp_path / "reference"), _seen(tmp_path / "resumed")
    assert sum(reference[1].values()) == 2 * 16 * before
    assert seen[0] == reference[0] and seen[1] == reference[1]  # the same samples of the interrupted epoch
    for counts in seen.values():
        assert set(counts.values()) == {1}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_stream_of_shards_reshards_itself_onto_another_number_of_ranks_with_every_sample_once(
    tmp_path: Path, before: int, after: int
) -> None:
    shards = write_shards(tmp_path / "shards")
    _kill(tmp_path, before, kill_at=4, shards=shards)  # epoch 1, 32 of its 96 samples read
    resumed = run_ranks(_job, tmp_path / "out", world_size=after, shards=shards).check()
    assert {r["steps"] for r in resumed} == {9}
    _assert_every_sample_once(tmp_path)
    assert sum(r["reads"] for r in resumed) == 64 + N  # the rest of epoch 1, then epoch 2: nothing re-read
    notes = [w for w in resumed[0]["warnings"] if "not be bit-identical" in w]
    assert len(notes) == 1 and f"written by {before} process(es) on {after}" in notes[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stream_of_shards_under_steps_per_epoch_is_refused_on_another_number_of_ranks(tmp_path: Path) -> None:
    """It deals out all that the ranks had not read, not what each would still have read within
    steps_per_epoch: that resume cannot be exact, and strict refuses it."""
    shards = write_shards(tmp_path / "shards")
    _kill(tmp_path, 2, kill_at=3, shards=shards, steps_per_epoch=2)
    run = run_ranks(_job, tmp_path / "out", world_size=1, shards=shards, steps_per_epoch=2)
    assert run.exitcodes == [3]
    assert "CheckpointError" in str(run.errors[0]) and "steps_per_epoch" in str(run.errors[0])
    assert "ShardStream.reshard_state_dict" in str(run.errors[0])


def test_share_deals_every_sample_once_with_the_same_number_of_batches_on_every_rank() -> None:
    samples = list(range(100, 171))  # 71 samples, 3 ranks of 8: 2 full steps and a last one of 23
    shares = [_reshard.share(samples, rank, 3, 8) for rank in range(3)]
    assert {len(batches) for batches, _ in shares} == {3}
    assert sorted(i for batches, _ in shares for batch in batches for i in batch) == samples
    batches, repeated = _reshard.share([1, 2], 0, 3, 8)  # fewer samples than ranks: one is read twice
    assert repeated == 1 and batches == [[1]]
