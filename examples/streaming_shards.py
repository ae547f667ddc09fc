"""Training on a stream of shards on disk, with random augmentation in 2 DataLoader workers, killed and resumed.

A generator writes the data set as shards (files of 64 samples) into a temporary folder; `ShardStream` streams
them (no random access: each worker opens its own shards in turn) and saves its position, ``state_dict()``,
as (epoch, shard, offset). torchdata's ``StatefulDataLoader`` runs it in 2 workers and checkpoints every worker's
position; fitkit puts that into each checkpoint and restores it on resume, so the resumed run opens the shard it
was in and goes on at the next sample, without reading what was already trained on. The augmentation noise of
each sample is drawn from a generator seeded with ``fitkit.data.sample_seed(seed, epoch, sample id)``: it does not
depend on which worker reads the sample or when.

The script trains once without interruption, then again in a child process that it SIGKILLs in the middle of an
epoch, resumes that run from its ``BackupAndRestore`` backup, and checks that the final weights are identical:

    pip install torchdata
    python examples/streaming_shards.py

Nothing is downloaded. A map-style data set with augmentation in ``__getitem__`` gets the same from
``DataLoader(fitkit.data.seeded(dataset), num_workers=2)`` (see docs/checkpoints.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import IterableDataset, get_worker_info

import fitkit
from fitkit.callbacks import BackupAndRestore

SHARDS, PER_SHARD, FEATURES, EPOCHS, SEED = 8, 64, 16, 3, 0


def write_shards(folder: Path) -> None:
    """A 'generator of shards': each shard is written as it is produced, never the whole set at once."""

    def shards() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(1234)
        for _ in range(SHARDS):
            x = torch.randn(PER_SHARD, FEATURES, generator=g)
            yield x, (x[:, 0] + x[:, 1] > 0).long()

    folder.mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(shards()):
        torch.save({"x": x, "y": y}, folder / f"shard-{i:04d}.pt")


class ShardStream(IterableDataset):
    """Streams the shards of ``folder``, a shuffled shard order per epoch, each worker its own shards.

    Its position is ``(epoch, shard, offset)``: the shard being read (its place in the epoch's order) and the
    samples of it already yielded. fitkit calls ``set_epoch`` before each epoch; the StatefulDataLoader calls
    ``state_dict`` / ``load_state_dict`` in each worker.
    """

    def __init__(self, folder: Path, seed: int = SEED) -> None:
        self.files = sorted(folder.glob("shard-*.pt"))
        self.seed = seed
        self.epoch, self.shard, self.offset, self.loaded = 0, 0, 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.shard, self.offset, self.loaded = state["epoch"], state["shard"], state["offset"], True

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first, skip = (self.shard, self.offset) if self.loaded else (0, 0)
        self.loaded = False
        order = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for place in range(first, len(self.files)):
            if place % workers != worker:
                continue
            shard_id = int(order[place])
            shard = torch.load(self.files[shard_id], weights_only=True)  # one file opened per shard
            for offset in range(skip, len(shard["y"])):
                self.shard, self.offset = place, offset + 1
                yield self.augment(shard["x"][offset], shard_id * PER_SHARD + offset), shard["y"][offset]
            skip = 0
        self.shard, self.offset = 0, 0

    def augment(self, x: torch.Tensor, sample_id: int) -> torch.Tensor:
        """Random noise that is a function of (seed, epoch, sample) only: the same in any worker, after any resume."""
        g = torch.Generator().manual_seed(fitkit.data.sample_seed(self.seed, self.epoch, sample_id))
        return x + 0.1 * torch.randn(x.shape, generator=g)


def train(shards: Path, backup: Path | None, out: Path, delay: float = 0.0) -> None:
    """One training run (resumed from ``backup`` when a backup is there); the final weights go to ``out``."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on a newer torch

    class Slow(fitkit.Callback):  # leaves the parent time to kill the run mid-epoch
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            time.sleep(delay)

    fitkit.seed_everything(SEED)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 2))
    callbacks: list[fitkit.Callback] = [Slow()]
    if backup is not None:
        callbacks.insert(0, BackupAndRestore(backup, save_freq=1))  # a backup after every step
    trainer = fitkit.Trainer(model, "adam", "cross_entropy", metrics=["accuracy"], callbacks=callbacks, verbose=0)
    loader = StatefulDataLoader(ShardStream(shards), batch_size=32, num_workers=2)
    trainer.fit(loader, epochs=EPOCHS)
    torch.save(model.state_dict(), out)


def _child(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--child", *args])


def _backup_step(backup: Path) -> int:
    try:
        return int(fitkit.checkpoint.verify(backup / "backup.pt")["global_step"])
    except (fitkit.CheckpointError, OSError, KeyError):
        return 0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_shards(folder / "shards")
        steps_per_epoch = SHARDS * PER_SHARD // 32

        _child([str(folder / "shards"), "-", str(folder / "whole.pt")]).wait()

        run = ["--delay", "0.05", str(folder / "shards"), str(folder / "backup"), str(folder / "resumed.pt")]
        process = _child(run)
        kill_at = steps_per_epoch + steps_per_epoch // 2  # the middle of the second epoch
        while _backup_step(folder / "backup") < kill_at and process.poll() is None:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        step = _backup_step(folder / "backup")
        print(f"killed the run (SIGKILL) after step {step}: epoch {step // steps_per_epoch}, "
              f"batch {step % steps_per_epoch} of {steps_per_epoch}")  # fmt: skip
        assert _child(run).wait() == 0  # the same command again: BackupAndRestore resumes it

        whole = torch.load(folder / "whole.pt", weights_only=True)
        resumed = torch.load(folder / "resumed.pt", weights_only=True)
        same = all(torch.equal(whole[k], resumed[k]) for k in whole)
        print(f"resumed run identical to the uninterrupted one, bit for bit: {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        shards, backup, out = options.paths
        train(Path(shards), None if backup == "-" else Path(backup), Path(out), options.delay)
    else:
        main()
