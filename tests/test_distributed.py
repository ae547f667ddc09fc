"""Distributed training: two forked ranks on the CPU with gloo, each one as torchrun would start it.

Every test runs its job in forked children (see ``dist_utils``): each child gets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT and builds a plain ``Trainer`` (strategy="auto"), exactly the code a
user's script runs; results come back as files and are compared in the parent. One test runs a real
script under real torchrun.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_ranks, run_single
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset, WeightedRandomSampler

import fitkit
from fitkit import distributed
from fitkit.callbacks import BackupAndRestore, CSVLogger, EarlyStopping, ModelCheckpoint, TensorBoard

pytestmark = pytest.mark.distributed  # every test starts ranks (forked gloo processes or torchrun)

ROOT = Path(__file__).resolve().parents[1]
N = 96  # samples: 2 ranks x 3 batches of 16, or 1 process x 3 batches of 32


def make_data(n: int = N, features: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)  # the data do not depend on the process's seed
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def make_model(dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(16, 2))


def build(seed: int = 0, dropout: float = 0.0, callbacks: list[Any] | None = None, **kwargs: Any) -> fitkit.Trainer:
    fitkit.seed_everything(seed)
    model = make_model(dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwargs.setdefault("verbose", 0)
    return fitkit.Trainer(
        model, optimizer, "cross_entropy", metrics=["accuracy"], callbacks=callbacks or [], device="cpu", **kwargs
    )


def weights(trainer: fitkit.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


class EpochPermutations(Sampler[int]):
    """The order a DistributedSampler(seed) gives one process, drawn without set_epoch: the reference for
    a distributed run, which must call set_epoch itself to get a new order each epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# -- the same updates as one process with the whole batch -------------------------------------------
def _fit_dataloader(rank: int, out: Path, batch_size: int, accumulate: int = 1) -> dict[str, Any]:
    trainer = build(accumulate_grad_batches=accumulate)
    data = make_data()
    if trainer.world_size == 1:
        train = DataLoader(data, batch_size=batch_size, sampler=EpochPermutations(N, seed=0))
    else:
        train = DataLoader(data, batch_size=batch_size, shuffle=True)
    all_reduces = []
    if trainer.world_size > 1:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
            all_reduces.append(trainer.global_step)
            return allreduce_hook(state, bucket)

        trainer._modules.train.register_comm_hook(None, counting_hook)
    history = trainer.fit(train, DataLoader(TensorDataset(*make_data(50)[:]), batch_size=16), epochs=3)
    return {
        "weights": weights(trainer),
        "history": history.history,
        "steps": trainer.global_step,
        "sampler": type(trainer.train_loader.sampler).__name__,
        "batches": trainer.num_train_batches,
        "all_reduces": all_reduces,
    }


def test_two_ranks_of_16_end_with_the_weights_of_one_process_of_32(tmp_path: Path) -> None:
    one = run_single(_fit_dataloader, tmp_path / "one", 32)
    ranks = run_ranks(_fit_dataloader, tmp_path / "two", 16).check()
    for rank in ranks:
        assert rank["sampler"] == "DistributedSampler"
        assert rank["batches"] == 3 and rank["steps"] == one["steps"] == 9
        assert max_difference(rank["weights"], one["weights"]) < 1e-6
        for key, values in one["history"].items():
            assert rank["history"][key] == pytest.approx(values, abs=1e-6), key
    assert max_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0.0
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank sees the same epoch logs


def test_accumulation_skips_the_all_reduce_on_accumulating_batches(tmp_path: Path) -> None:
    one = run_single(_fit_dataloader, tmp_path / "one", 32)
    ranks = run_ranks(_fit_dataloader, tmp_path / "two", 8, accumulate=2).check()
    for rank in ranks:
        assert rank["batches"] == 6 and rank["steps"] == 9  # 2 ranks x 8 samples x 2 batches per step
        assert max_difference(rank["weights"], one["weights"]) < 1e-6
        # One gradient all-reduce per optimizer step (the model fits in one bucket), none while accumulating.
        assert rank["all_reduces"] == list(range(9))


def _fit_in_memory(rank: int, out: Path, batch_size: int, shuffle: bool, loader: bool = False) -> dict[str, Any]:
    trainer = build()
    data = make_data()
    if loader:
        train: Any = DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    else:
        train = data.tensors
    history = trainer.fit(train, epochs=2, batch_size=None if loader else batch_size, shuffle=shuffle)
    return {"weights": weights(trainer), "history": history.history, "batches": trainer.num_train_batches}


def test_in_memory_data_two_ranks_of_16_match_one_process_of_32(tmp_path: Path) -> None:
    one = run_single(_fit_in_memory, tmp_path / "one", 32, shuffle=False)
    for rank in run_ranks(_fit_in_memory, tmp_path / "two", 16, shuffle=False).check():
        assert rank["batches"] == 3
        assert max_difference(rank["weights"], one["weights"]) < 1e-6
        assert rank["history"]["loss"] == pytest.approx(one["history"]["loss"], abs=1e-6)


def test_shuffled_in_memory_data_gives_each_rank_the_batches_a_distributed_sampler_gives(tmp_path: Path) -> None:
    in_memory = run_ranks(_fit_in_memory, tmp_path / "memory", 16, shuffle=True).check()
    loader = run_ranks(_fit_in_memory, tmp_path / "loader", 16, shuffle=True, loader=True).check()
    for a, b in zip(in_memory, loader):
        assert max_difference(a["weights"], b["weights"]) == 0.0
        assert a["history"] == b["history"]
    unshuffled = run_ranks(_fit_in_memory, tmp_path / "plain", 16, shuffle=False).check()
    assert max_difference(unshuffled[0]["weights"], in_memory[0]["weights"]) > 1e-4  # the control: order matters


# -- validation: every sample counted once -------------------------------------------------------
def _evaluate_99(rank: int, out: Path) -> dict[str, Any]:
    def mean_target(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return targets.double().mean()  # y = 0..98: any duplicated or missing sample moves it off 49

    fitkit.seed_everything(0)
    model = nn.Linear(4, 99)
    trainer = fitkit.Trainer(
        model, "sgd", "cross_entropy", metrics=["accuracy", "top5_accuracy", mean_target], device="cpu", verbose=0
    )
    x = torch.randn(99, 4, generator=torch.Generator().manual_seed(7))
    y = torch.arange(99)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return {
        "loader": trainer.evaluate(loader),
        "in_memory": trainer.evaluate((x, y), batch_size=16),
        "again": trainer.evaluate(loader),
    }


def test_validation_on_99_samples_equals_the_single_process_values(tmp_path: Path) -> None:
    one = run_single(_evaluate_99, tmp_path / "one")
    assert one["loader"]["mean_target"] == 49.0
    for rank in run_ranks(_evaluate_99, tmp_path / "two").check():
        for kind in ("loader", "in_memory", "again"):
            assert rank[kind]["mean_target"] == 49.0, kind
            assert {k: v for k, v in rank[kind].items() if k != "loss"} == {
                k: v for k, v in one["loader"].items() if k != "loss"
            }, kind  # counts: exactly equal
            assert rank[kind]["loss"] == pytest.approx(one["loader"]["loss"], rel=1e-6)  # float32 batch means


# -- decisions: the same on every rank ----------------------------------------------------------
class LocalValLoss(fitkit.Callback):
    """Records this rank's own validation loss (its shard only, not all-reduced): what a rank would decide
    on if the logs were not reduced."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.values = x, y, []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        rank, world = self.trainer.dist.rank, self.trainer.world_size
        with torch.no_grad():
            loss = nn.functional.cross_entropy(self.model(self.x[rank::world]), self.y[rank::world])
        self.values.append(loss.item())


def _early_stopping_job(rank: int, out: Path) -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] > 0).long()
    # Validation: the even samples (rank 0's shard) are easy and keep improving; the odd ones (rank 1's)
    # sit on the boundary with flipped labels and get worse. Only the pooled value decides the same for all.
    xv = torch.randn(40, 2, generator=g)
    xv[1::2, 0] = xv[1::2, 0].sign() * 0.05
    yv = (xv[:, 0] > 0).long()
    yv[1::2] = 1 - yv[1::2]
    fitkit.seed_everything(0)
    model = nn.Linear(2, 2)
    local = LocalValLoss(xv, yv)
    stopper = EarlyStopping(monitor="val_loss", min_delta=0.01, patience=0)
    trainer = fitkit.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.5),
        "cross_entropy",
        callbacks=[local, stopper],
        device="cpu",
        verbose=0,
    )
    batch = 16 // trainer.world_size
    history = trainer.fit((x, y), (xv, yv), epochs=8, batch_size=batch, shuffle=False)
    return {"epochs": len(history.epoch), "val_loss": history.history["val_loss"], "local": local.values}


def _epochs_until_stop(values: list[float], min_delta: float = 0.01) -> int:
    """EarlyStopping(patience=0)'s rule on ``values``; one more than their number if it never stops."""
    best = values[0]
    for epoch, value in enumerate(values[1:], start=1):
        if not value < best - min_delta:
            return epoch + 1
        best = value
    return len(values) + 1


def test_early_stopping_stops_every_rank_at_the_same_epoch(tmp_path: Path) -> None:
    one = run_single(_early_stopping_job, tmp_path / "one")
    ranks = run_ranks(_early_stopping_job, tmp_path / "two").check()
    assert one["epochs"] < 8  # it did stop early
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == one["epochs"]
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
    # The control: deciding on its own shard, each rank would have stopped at another epoch.
    assert _epochs_until_stop(ranks[1]["local"]) < one["epochs"] < _epochs_until_stop(ranks[0]["local"])


class StopOnRank(fitkit.Callback):
    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.trainer.dist.rank == self.rank and self.trainer.global_step == self.step:
            self.trainer.stop("rank 1 had enough")


def _stop_on_rank_one(rank: int, out: Path) -> dict[str, Any]:
    trainer = build(callbacks=[StopOnRank(rank=1, step=4)])
    trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=5)
    return {
        "steps": trainer.global_step,
        "epochs": len(trainer.history.epoch),
        "reason": trainer.state.stop_reason,
        "weights": weights(trainer),
    }


def test_stop_training_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    ranks = run_ranks(_stop_on_rank_one, tmp_path, timeout=30).check()
    assert [r["steps"] for r in ranks] == [4, 4]
    assert [r["epochs"] for r in ranks] == [2, 2]  # the second epoch ended after its first batch
    assert ranks[0]["reason"] == "stopped on another rank" and ranks[1]["reason"] == "rank 1 had enough"
    assert max_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0.0


def _batch_checkpoints(rank: int, out: Path) -> dict[str, Any]:
    checkpoint = ModelCheckpoint(
        out.parent / "ckpt" / "step{step}.pt", monitor="loss", save_best_only=True, save_freq=1
    )
    trainer = build(callbacks=[checkpoint])
    trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=3)
    return {"kept": checkpoint.kept, "best": checkpoint.best}


def test_batch_level_checkpoint_decisions_are_the_same_on_every_rank(tmp_path: Path) -> None:
    # Each rank's batch loss differs; deciding on its own, a rank would save (a collective) alone and hang.
    ranks = run_ranks(_batch_checkpoints, tmp_path / "out", timeout=30).check()
    assert ranks[0] == ranks[1] and ranks[0]["kept"]
    manifest = fitkit.checkpoint.read_manifest(tmp_path / "ckpt")
    assert sorted(manifest["files"]) == sorted(Path(path).name for _, _, path in ranks[0]["kept"])


# -- files: rank 0 only -------------------------------------------------------------------------
def _record_writes(root: Path) -> list[str]:
    """Records every file this process opens for writing, renames, removes or creates under ``root``
    (a Python audit hook: it sees torch.save, the CSV and TensorBoard writers, os.replace, mkdir)."""
    writes: list[str] = []
    prefix = str(root)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and str(args[0]).startswith(prefix):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            ):
                writes.append(f"open {args[0]}")
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir") and args and str(args[0]).startswith(prefix):
            writes.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    return writes


def _all_writers(rank: int, out: Path) -> dict[str, Any]:
    shared = out.parent / "files"  # every rank is given the same paths
    writes = _record_writes(shared)
    callbacks = [
        ModelCheckpoint(shared / "ckpt" / "epoch{epoch}.pt", monitor="val_loss", save_top_k=2, save_last=True),
        ModelCheckpoint(shared / "weights" / "w{epoch}.pt", monitor=None, save_weights_only=True),
        BackupAndRestore(shared / "backup", save_freq=2, delete_checkpoint=False),
        TensorBoard(shared / "tb", update_freq=1),
        CSVLogger(shared / "log.csv"),
    ]
    trainer = build(callbacks=callbacks)
    data = make_data()
    trainer.fit(
        DataLoader(data, batch_size=96 // 2 // trainer.world_size, shuffle=True),
        DataLoader(TensorDataset(*data[:40]), batch_size=16),
        epochs=3,
    )
    return {"writes": writes}


def _listing(folder: Path) -> dict[str, int]:
    """Relative path -> count, with the process-specific part of TensorBoard's file names cut off."""
    names: dict[str, int] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            name = str(path.relative_to(folder))
            name = name.split("tfevents")[0] + "tfevents" if "tfevents" in name else name
            names[name] = names.get(name, 0) + 1
    return names


def test_only_rank_zero_writes_files(tmp_path: Path) -> None:
    ranks = run_ranks(_all_writers, tmp_path / "two" / "out").check()
    assert ranks[0]["writes"] and ranks[1]["writes"] == []
    two = _listing(tmp_path / "two" / "files")
    run_single(_all_writers, tmp_path / "one" / "out")
    assert two == _listing(tmp_path / "one" / "files")  # the same files as one process: nothing twice
    assert two["tb/events.out.tfevents"] == 1 and "ckpt/last.pt" in two and "backup/backup.pt" in two
    rows = (tmp_path / "two" / "files" / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


def _late_rank_one(rank: int, out: Path, existing: bool) -> dict[str, Any]:
    folder = out.parent / "weights"

    class Late(fitkit.Callback):  # rank 1 reaches the epoch's writes long after rank 0 could have written
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if rank == 1:
                time.sleep(0.3)
            elif existing and epoch == 1:  # another job's file appears after the fit's start-up checks
                (folder / "w2.pt").write_bytes(b"someone else's")

    trainer = build(callbacks=[ModelCheckpoint(folder / "w{epoch}.pt", monitor=None, save_weights_only=True), Late()])
    try:
        trainer.fit(DataLoader(make_data(), batch_size=24), epochs=2)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None, "files": sorted(p.name for p in folder.glob("*.pt"))}


@pytest.mark.parametrize("existing", [False, True])
def test_every_rank_takes_rank_zeros_overwrite_decision(tmp_path: Path, existing: bool) -> None:
    """Rank 0 alone writes, and may have written w1.pt before rank 1 looks: rank 1 must not refuse it as a
    stranger's file; a real stranger's file (``existing``) is refused on every rank with the same error."""
    ranks = run_ranks(_late_rank_one, tmp_path / "out", existing=existing, timeout=60).check()
    if not existing:
        assert [r["error"] for r in ranks] == [None, None]
        assert ranks[0]["files"] == ["w1.pt", "w2.pt"]
    else:
        errors = [r["error"] for r in ranks]  # the same error on both ranks, not rank 1's PeerFailure
        assert errors[0] == errors[1] and errors[0].startswith("ValueError: ModelCheckpoint: "), errors
        assert "w2.pt exists and was not written by this run; refusing to overwrite it" in errors[0]


def _foreign_folder(rank: int, out: Path) -> dict[str, Any]:
    folder = out.parent / "weights"
    if rank == 0:
        folder.mkdir(exist_ok=True)
        (folder / "w2.pt").write_bytes(b"someone else's")
    trainer = build(callbacks=[ModelCheckpoint(folder / "w{epoch}.pt", monitor=None, save_weights_only=True)])
    try:
        trainer.fit(DataLoader(make_data(), batch_size=24), epochs=2)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "steps": trainer.global_step}
    return {"error": None}


def test_a_folder_check_on_rank_zero_fails_every_rank_alike_before_training(tmp_path: Path) -> None:
    ranks = run_ranks(_foreign_folder, tmp_path / "out", timeout=60).check()
    assert ranks[0]["error"] == ranks[1]["error"], ranks  # not a raw gloo error, nor a PeerFailure, on rank 1
    assert (
        ranks[0]["error"].startswith("ValueError: ModelCheckpoint(")
        and "already holds 1 checkpoint" in ranks[0]["error"]
    )
    assert [r["steps"] for r in ranks] == [0, 0]


def _progress_bars(rank: int, out: Path) -> dict[str, Any]:
    import io

    from fitkit.callbacks import ProgressBar

    stream = io.StringIO()
    trainer = build(callbacks=[ProgressBar(mode="epoch", file=stream)])
    trainer.fit(DataLoader(make_data(), batch_size=16), epochs=2)
    return {"printed": stream.getvalue()}


def test_a_progress_bar_passed_as_a_callback_draws_on_rank_zero_only(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks(_progress_bars, tmp_path).check()
    assert rank0["printed"].count("Epoch ") == 2 and rank1["printed"] == ""


def _torchmetrics_job(rank: int, out: Path) -> dict[str, Any]:
    import io

    import torchmetrics

    from fitkit.callbacks import ProgressBar

    stream = io.StringIO()
    fitkit.seed_everything(0)
    model = make_model()
    # The progress bar runs on rank 0 only and reads the running metrics after every batch.
    trainer = fitkit.Trainer(
        model,
        "sgd",
        "cross_entropy",
        device="cpu",
        verbose=0,
        metrics=[torchmetrics.classification.MulticlassAccuracy(num_classes=2)],
        callbacks=[ProgressBar(log_every_seconds=1e-9, file=stream)],
    )
    batch_size = 32 // trainer.world_size
    history = trainer.fit(
        DataLoader(make_data(), batch_size=batch_size),
        DataLoader(TensorDataset(*make_data(99)[:]), batch_size=16),
        epochs=2,
    )
    return {"history": history.history, "lines": stream.getvalue().count("batch")}


def test_torchmetrics_metrics_sync_at_epoch_end_and_never_from_rank_zero_alone(tmp_path: Path) -> None:
    pytest.importorskip("torchmetrics")
    one = run_single(_torchmetrics_job, tmp_path / "one")
    rank0, rank1 = run_ranks(_torchmetrics_job, tmp_path / "two", timeout=30).check()
    assert rank0["lines"] > 0 and rank1["lines"] == 0
    for rank in (rank0, rank1):
        assert rank["history"]["multiclass_accuracy"] == one["history"]["multiclass_accuracy"]
        assert rank["history"]["val_multiclass_accuracy"] == one["history"]["val_multiclass_accuracy"]


# -- resume -------------------------------------------------------------------------------------
def _resume_job(rank: int, out: Path, kill_at: int | None = None) -> dict[str, Any]:
    folder = out.parent / "backup"
    backup = BackupAndRestore(folder, save_freq=1, delete_checkpoint=False)

    class Die(fitkit.Callback):  # after the backup of step kill_at is on disk, every rank dies at once
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == kill_at:
                self.trainer.after_callbacks(lambda: os._exit(9))

    # Each rank its own seed: its dropout masks differ, so restoring each rank's own RNG state matters.
    trainer = build(seed=rank, dropout=0.3, callbacks=[backup, Die()])
    train = DataLoader(AugmentedData(make_data()), batch_size=16, shuffle=True)
    history = trainer.fit(train, DataLoader(TensorDataset(*make_data(40)[:]), batch_size=16), epochs=3)
    return {
        "weights": weights(trainer),
        "history": history.history,
        "steps": trainer.global_step,
        "optimizer": trainer.optimizer.state_dict(),
    }


class AugmentedData(torch.utils.data.Dataset):
    """Adds noise drawn from torch's global generator in __getitem__: each rank's stream must resume."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[i]
        return x + 0.1 * torch.randn(x.shape), y


def test_two_rank_resume_is_exact(tmp_path: Path) -> None:
    whole = run_ranks(_resume_job, tmp_path / "whole" / "out").check()
    killed = run_ranks(_resume_job, tmp_path / "resumed" / "out", kill_at=4)
    assert killed.exitcodes == [9, 9], killed.errors  # both died mid-epoch 1, after the backup of step 4
    resumed = run_ranks(_resume_job, tmp_path / "resumed" / "out").check()
    for a, b in zip(whole, resumed):
        assert a["steps"] == b["steps"] == 9
        assert max_difference(a["weights"], b["weights"]) == 0.0
        assert a["history"] == b["history"]
        assert torch.equal(a["optimizer"]["state"][0]["momentum_buffer"], b["optimizer"]["state"][0]["momentum_buffer"])


def _resume_with_one_rank(rank: int, out: Path, strict: bool, sampler: bool = True) -> dict[str, Any]:
    trainer = build(seed=rank, dropout=0.3)
    path = out.parent / "backup" / "backup.pt"
    # A sampler of the user's: fitkit cannot tell which of its samples the 2 ranks had read.
    order = {"sampler": EpochPermutations(N, seed=0)} if sampler else {"shuffle": True}
    try:
        if strict:
            trainer.fit(DataLoader(make_data(), batch_size=16, **order), epochs=3, resume=path)
        else:
            trainer.load_checkpoint(path, strict=False)
    except fitkit.CheckpointError as exc:
        return {"error": str(exc)}
    return {"step": trainer.global_step}


def test_a_two_rank_checkpoint_on_one_process_is_refused_unless_its_data_can_be_dealt_out(tmp_path: Path) -> None:
    killed = run_ranks(_resume_job, tmp_path / "out", kill_at=4)
    assert killed.exitcodes == [9, 9], killed.errors
    refused = run_single(_resume_with_one_rank, tmp_path / "one", strict=True)
    assert refused["error"] == (
        "checkpoint world size mismatch: the checkpoint has 2, this trainer has 1. Resume with the same number "
        "of processes, or pass strict=False to continue with another (the data order then differs from an "
        "uninterrupted run). A map-style DataLoader (RandomSampler, SequentialSampler or DistributedSampler) or "
        "in-memory data resumes on any number of processes; an iterable dataset's saved position belongs to the "
        "rank that wrote it, unless the dataset (or loader) deals its unread data out itself with "
        "reshard_state_dict(states, rank, world_size) (docs/checkpoints.md)."
    )
    assert run_single(_resume_with_one_rank, tmp_path / "one", strict=False) == {"step": 4}
    # A shuffled DataLoader goes on (tests/test_reshard.py): the 64 samples left of epoch 1, then epoch 2.
    assert run_single(_resume_with_one_rank, tmp_path / "one", strict=True, sampler=False) == {"step": 4 + 4 + 6}


def _resume_auto_with_a_missing_folder(rank: int, out: Path) -> dict[str, Any]:
    # Rank 1's callback looks in an empty folder (as on a node without the shared disk): it must not start
    # afresh while rank 0 resumes; it loads the file rank 0 chose.
    folder = out.parent / ("ckpt" if rank == 0 else "elsewhere")
    trainer = build(callbacks=[ModelCheckpoint(folder / "e{epoch}.pt", monitor=None)])
    train = DataLoader(make_data(), batch_size=16, shuffle=True)
    try:
        trainer.fit(train, epochs=3, resume="auto")
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"steps": trainer.global_step}


def _one_epoch(rank: int, out: Path) -> dict[str, Any]:
    trainer = build(callbacks=[ModelCheckpoint(out.parent / "ckpt" / "e{epoch}.pt", monitor=None)])
    trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=1)
    return {"steps": trainer.global_step}


def test_every_rank_resumes_from_the_checkpoint_rank_zero_chose(tmp_path: Path) -> None:
    assert run_ranks(_one_epoch, tmp_path / "out").check() == [{"steps": 3}, {"steps": 3}]
    ranks = run_ranks(_resume_auto_with_a_missing_folder, tmp_path / "out", timeout=30).check()
    assert ranks == [{"steps": 9}, {"steps": 9}]  # both went on from epoch 1's checkpoint


def _stalled_rank(rank: int, out: Path) -> dict[str, Any]:
    class Stall(fitkit.Callback):  # rank 1 stops answering for longer than the timeout, without failing
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.dist.rank == 1 and self.trainer.global_step == 2:
                time.sleep(4)

    trainer = build(callbacks=[Stall()], process_group_timeout=1.5)
    start = time.monotonic()
    try:
        trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=2)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - start}
    return {"error": None}


@pytest.mark.slow
def test_the_process_group_timeout_is_configurable(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks(_stalled_rank, tmp_path, timeout=30).check()
    assert 1.5 <= rank0["seconds"] < 5  # waited for the 1.5 s timeout, not the 30 minutes of the default
    assert "RuntimeError" in rank0["error"] and "1500ms" in rank0["error"], rank0["error"]
    assert rank1["error"] is not None  # the stalled rank fails too when it wakes: its peer is gone


# -- failures: one rank's failure ends every rank in seconds ---------------------------------------
def _failing_job(rank: int, out: Path, where: str, stay_alive: bool = False) -> dict[str, Any]:
    class Boom(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if where == "callback" and self.trainer.dist.rank == 1 and self.trainer.global_step == 3:
                raise ValueError("boom in callback")

    class QuietBoom(fitkit.Callback):  # declared never to stop: the ranks do not vote after each batch
        stops_mid_epoch = False

        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if where == "quiet callback" and self.trainer.dist.rank == 1 and self.trainer.global_step == 3:
                raise ValueError("boom in quiet callback")

    class BoomNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if where.startswith("forward") and int(os.environ["RANK"]) == 1 and self.calls == 3:
                raise ValueError(f"boom in {where}")
            return self.net(x)

    class Slow(fitkit.Callback):  # so that training outlasts the kill in the SIGKILL test
        stops_mid_epoch = False

        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            time.sleep(0.005)

    fitkit.seed_everything(0)
    model = BoomNet()
    callbacks = [QuietBoom(), Slow()] if where in ("quiet callback", "forward unvoted") else [Boom(), Slow()]
    trainer = fitkit.Trainer(
        model, "sgd", "cross_entropy", callbacks=callbacks, device="cpu", verbose=0, process_group_timeout=120
    )
    start = time.monotonic()
    try:
        trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=50)
    except Exception as exc:
        result = {
            "error": f"{type(exc).__name__}: {exc}",
            "seconds": time.monotonic() - start,
            "step": trainer.global_step,
        }
        if stay_alive:  # a process that catches the error and carries on: its sockets stay open
            torch.save(result, out / f"rank{rank}.pt")
            deadline = time.monotonic() + 30
            while not (out / "rank0.pt").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return result
    return {"error": None}


@pytest.mark.parametrize(
    "where, stay_alive",
    [
        ("callback", True),
        ("callback", False),
        ("forward", False),
        ("quiet callback", False),
        ("forward unvoted", False),
    ],
)
def test_an_exception_on_one_rank_ends_every_rank_within_seconds(tmp_path: Path, where: str, stay_alive: bool) -> None:
    run = run_ranks(_failing_job, tmp_path, where=where, stay_alive=stay_alive, timeout=60)
    rank0, rank1 = run.check()
    assert rank1["error"] == f"ValueError: boom in {where}"
    assert rank0["seconds"] < 10  # the process-group timeout is 120 s
    assert rank0["error"].startswith("PeerFailure: rank 1 on ")
    assert (
        f"raised ValueError: boom in {where}; rank 0 stopped too (the distributed run cannot go on without "
        "it). Fix that error and restart the job, resuming from the last checkpoint" in rank0["error"]
    )


@pytest.mark.slow
def test_a_killed_rank_ends_the_others_within_seconds(tmp_path: Path) -> None:
    def kill_rank_one(processes: list[Any]) -> None:
        time.sleep(1.0)  # mid-training: 50 epochs take 1.5 s or more
        os.kill(processes[1].pid, signal.SIGKILL)

    run = run_ranks(_failing_job, tmp_path, where="nowhere", timeout=60, on_start=kill_rank_one)
    assert run.exitcodes[1] == -signal.SIGKILL
    assert run.exitcodes[0] == 0, run.errors
    assert run.results[0]["error"] is not None and run.results[0]["step"] > 0
    assert run.seconds[0] < 8
    # Issue 19: gloo's raw "Connection reset/closed by peer" came out of fit; now a PeerFailure that says what
    # happened to the other rank (it could not report anything itself).
    assert run.results[0]["error"].startswith("PeerFailure: a rank ended without reporting an error, so rank 0 on "), (
        run.results[0]["error"]
    )
    assert "it was probably killed (SIGKILL, the out-of-memory killer, a preemption)" in run.results[0]["error"]
    assert "Find out why it ended and restart the job, resuming from the last checkpoint" in run.results[0]["error"]


def _terminated_job(rank: int, out: Path) -> dict[str, Any]:
    class TermRankOne(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.dist.rank == 1 and self.trainer.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = build(callbacks=[BackupAndRestore(out.parent / "backup", save_freq=100), TermRankOne()])
    try:
        trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=5)
    except SystemExit as exc:
        return {"exit": exc.code, "step": trainer.global_step}
    return {"exit": None}


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_a_backup(tmp_path: Path) -> None:
    ranks = run_ranks(_terminated_job, tmp_path / "out", timeout=30).check()
    assert ranks == [{"exit": 143, "step": 4}, {"exit": 143, "step": 4}]
    manifest = fitkit.checkpoint.read_manifest(tmp_path / "backup")
    assert manifest["files"]["backup.pt"]["versions"][0]["global_step"] == 4


# -- predict ------------------------------------------------------------------------------------
def _predict_job(rank: int, out: Path) -> torch.Tensor:
    trainer = build()
    trainer.fit(DataLoader(make_data(), batch_size=16 if trainer.world_size > 1 else 32), epochs=1)
    return trainer.predict(make_data(99).tensors[0], batch_size=16)


def test_predict_returns_every_sample_on_every_rank(tmp_path: Path) -> None:
    one = run_single(_predict_job, tmp_path / "one")
    for outputs in run_ranks(_predict_job, tmp_path / "two").check():
        assert outputs.shape == (99, 2)
        assert torch.allclose(outputs, one, atol=1e-6)


# -- the same script under torchrun ---------------------------------------------------------------
@pytest.mark.slow
def test_the_example_script_runs_unchanged_under_torchrun(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(ROOT / "examples" / "train_digits.py"),
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--verbose",
        "2",
        "--log-dir",
        str(tmp_path / "runs"),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    output = f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    # Both ranks print the final line into one pipe: two writes may land on one line, so count matches.
    finals = re.findall(r"final validation accuracy: ([0-9.]+)", done.stdout)
    assert len(finals) == 2 and len(set(finals)) == 1, output
    epoch_lines = [line for line in done.stderr.splitlines() + done.stdout.splitlines() if line.startswith("Epoch ")]
    assert len(epoch_lines) == 2, output  # one progress line per epoch: rank 0 only
    assert len(list((tmp_path / "runs").rglob("*tfevents*"))) == 1
    assert (tmp_path / "ckpt" / "last.pt").exists()
    assert (tmp_path / "ckpt" / "history.png").read_bytes()[:4] == b"\x89PNG"  # History.plot, on rank 0


# -- arguments and messages -------------------------------------------------------------------------
def test_unknown_strategy_is_an_error() -> None:
    with pytest.raises(
        ValueError,
        match=r"^unknown strategy 'dp': use 'auto' \(DDP when launched by torchrun "
        r"with several processes\), 'ddp', 'fsdp' or 'none'$",
    ):
        build(strategy="dp")


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), True, "60"])
def test_process_group_timeout_must_be_positive_seconds(timeout: Any) -> None:
    with pytest.raises(ValueError, match=r"^process_group_timeout must be a finite number of seconds > 0, got "):
        build(process_group_timeout=timeout)


def test_forcing_ddp_without_a_launcher_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(
        RuntimeError,
        match=r"^strategy='ddp' needs a launcher: RANK, WORLD_SIZE, MASTER_ADDR, "
        r"MASTER_PORT missing from the environment. Run the script with torchrun",
    ):
        build(strategy="ddp")


def test_auto_strategy_without_a_launcher_trains_in_one_process() -> None:
    trainer = build()
    assert trainer.world_size == 1 and trainer.is_global_zero and trainer._modules.train is trainer.model


def test_fsdp_without_fsdp2_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(fitkit.strategies, "_has_fsdp2", lambda: False)
    with pytest.raises(
        ValueError,
        match=r"^strategy='fsdp' needs FSDP2 \(torch.distributed.fsdp.fully_shard, "
        r"torch >= 2.6\), which torch .* lacks; use strategy='ddp'$",
    ):
        build(strategy="fsdp")


def _shard(loader: DataLoader) -> Any:
    info = distributed.DistInfo(rank=0, world_size=2, control_group=object())
    return distributed.shard_train(loader, info)


def test_samplers_that_cannot_be_split_are_errors() -> None:
    data = make_data()
    weighted = DataLoader(data, batch_size=16, sampler=WeightedRandomSampler(torch.ones(N), N))
    with pytest.raises(
        ValueError,
        match=r"^train_data uses a WeightedRandomSampler, which fitkit cannot split "
        r"across ranks without changing what it draws; pass a per-rank sampler",
    ):
        _shard(weighted)
    replacement = DataLoader(data, batch_size=16, sampler=torch.utils.data.RandomSampler(data, replacement=True))
    with pytest.raises(
        ValueError,
        match=r"^train_data's RandomSampler draws with replacement or a fixed "
        r"num_samples, which a DistributedSampler cannot reproduce",
    ):
        _shard(replacement)
    batches = DataLoader(data, batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(
        ValueError,
        match=r"^train_data uses a custom batch_sampler \(list\), which fitkit cannot "
        r"split across ranks",
    ):
        _shard(batches)


def test_a_per_rank_sampler_of_the_users_is_kept() -> None:
    data = make_data()
    mine = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0)
    loader = DataLoader(data, batch_size=16, sampler=mine)
    assert _shard(loader) is loader


def test_an_iterable_dataset_is_left_to_the_user_with_a_warning() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter([])

    loader = DataLoader(Stream(), batch_size=4)
    with pytest.warns(
        UserWarning,
        match=r"^an IterableDataset cannot be sharded by fitkit: make each rank yield "
        r"its own part",
    ):
        assert _shard(loader) is loader


def test_collectives_after_a_failure_say_the_run_failed() -> None:
    info = distributed.DistInfo(rank=0, world_size=2, control_group=None, closed_by="rank 1 on host raised X: y")
    with pytest.raises(
        RuntimeError,
        match=r"^the distributed run already failed \(rank 1 on host raised X: y\); "
        r"its control group is closed",
    ):
        distributed.any_rank(True, info)


# -- FSDP2 (fully_shard) ------------------------------------------------------------------------------
def _fsdp_job(rank: int, out: Path, dropout: float = 0.0, kill_at: int | None = None) -> dict[str, Any]:
    folder = out.parent
    callbacks = [
        BackupAndRestore(folder / "backup", save_freq=1, delete_checkpoint=False),
        ModelCheckpoint(folder / "ckpt" / "best.pt", monitor="val_loss", save_best_only=True),
        ModelCheckpoint(folder / "weights" / "w{epoch}.pt", monitor=None, save_weights_only=True),
    ]

    class Die(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == kill_at:
                self.trainer.after_callbacks(lambda: os._exit(9))

    strategy = "fsdp" if os.environ.get("WORLD_SIZE", "1") != "1" else "auto"
    trainer = build(seed=rank, dropout=dropout, callbacks=[*callbacks, Die()], strategy=strategy)
    data = make_data()
    if trainer.world_size == 1:
        train = DataLoader(data, batch_size=32, sampler=EpochPermutations(N, seed=0))
    else:
        train = DataLoader(data, batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(*make_data(99)[:]), batch_size=16)
    history = trainer.fit(train, val, epochs=3)
    return {
        "weights": trainer.model_state_dict(),
        "steps": trainer.global_step,
        "history": history.history,
        "sharded": type(next(trainer.model.parameters())).__name__,
        "predict": trainer.predict(make_data(99).tensors[0], batch_size=16),
    }


@pytest.mark.slow
def test_fsdp_two_ranks_of_16_match_one_process_of_32(tmp_path: Path) -> None:
    one = run_single(_fsdp_job, tmp_path / "one" / "out")
    ranks = run_ranks(_fsdp_job, tmp_path / "two" / "out").check()
    assert [r["sharded"] for r in ranks] == ["DTensor", "DTensor"]
    assert ranks[1]["weights"] == {}  # the unsharded state is gathered on rank 0 only
    assert max_difference(ranks[0]["weights"], one["weights"]) < 1e-6
    for rank in ranks:
        for key, values in one["history"].items():
            assert rank["history"][key] == pytest.approx(values, abs=1e-6), key
        assert torch.allclose(rank["predict"], one["predict"], atol=1e-6)


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_resume_exactly(tmp_path: Path) -> None:
    whole = run_ranks(_fsdp_job, tmp_path / "whole" / "out", dropout=0.3).check()
    # Plain, unsharded tensors: a plain model loads the weights file, and the full checkpoint loads safely.
    plain = make_model(dropout=0.3)
    plain.load_state_dict(torch.load(tmp_path / "whole" / "weights" / "w3.pt", weights_only=True))
    assert max_difference(plain.state_dict(), whole[0]["weights"]) == 0.0
    # The full state is a sharded (DCP) directory: each rank wrote its shard, vouched for as one entry.
    best = tmp_path / "whole" / "ckpt" / "best.pt"
    assert {p.name for p in best.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "fitkit-state.pt"}
    assert fitkit.checkpoint.verify(best)["world_size"] == 2
    killed = run_ranks(_fsdp_job, tmp_path / "resumed" / "out", dropout=0.3, kill_at=4)
    assert killed.exitcodes == [9, 9], killed.errors
    resumed = run_ranks(_fsdp_job, tmp_path / "resumed" / "out", dropout=0.3).check()
    assert resumed[0]["steps"] == 9
    assert max_difference(resumed[0]["weights"], whole[0]["weights"]) == 0.0
    assert resumed[0]["history"] == whole[0]["history"]


def _fsdp_misuse(rank: int, out: Path, case: str) -> dict[str, Any]:
    fitkit.seed_everything(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    try:
        if case == "optimizer with state":
            nn.functional.cross_entropy(model(make_data().tensors[0]), make_data().tensors[1]).backward()
            optimizer.step()
            fitkit.Trainer(model, optimizer, "cross_entropy", device="cpu", strategy="fsdp", verbose=0)
        else:
            trainer = fitkit.Trainer(
                model,
                optimizer,
                "cross_entropy",
                device="cpu",
                strategy="fsdp",
                verbose=0,
                accumulate_grad_batches=2,
                callbacks=[BackupAndRestore(out.parent / "backup", save_freq=1)],
            )
            trainer.fit(DataLoader(make_data(), batch_size=16), epochs=1)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None}


def test_fsdp_refuses_an_optimizer_that_already_holds_state(tmp_path: Path) -> None:
    for rank in run_ranks(_fsdp_misuse, tmp_path, case="optimizer with state").check():
        assert rank["error"] == (
            "ValueError: strategy='fsdp' shards the model after the optimizer was built, so the optimizer must not "
            "hold state yet (momentum buffers); build it fresh, or load its state after building the Trainer"
        )


def test_fsdp_checkpoint_in_the_middle_of_an_accumulation_group_is_not_supported(tmp_path: Path) -> None:
    message = (
        "NotImplementedError: saving a checkpoint in the middle of an accumulation group is not supported "
        "with strategy='fsdp' (the partial gradients are sharded); save at group ends: "
        "ModelCheckpoint/BackupAndRestore(save_freq=a multiple of accumulate_grad_batches) or 'epoch'"
    )
    errors = [rank["error"] for rank in run_ranks(_fsdp_misuse, tmp_path / "out", case="mid-group").check()]
    # Every rank raises it before any collective. The rank whose failure the store recorded first raises
    # it; another reports it as the peer's failure, or raises its own when rank 0 (the store's host)
    # already exited: the order is a race.
    assert message in errors
    assert all(error == message or (error.startswith("PeerFailure: rank ") and message.split(": ", 1)[1] in error)
               for error in errors)  # fmt: skip


def test_without_torch_distributed_a_forced_strategy_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed.dist, "is_available", lambda: False)
    with pytest.raises(
        RuntimeError,
        match=r"^strategy='ddp' needs torch.distributed, which this torch build lacks; "
        r"use strategy='none'$",
    ):
        build(strategy="ddp")


def test_validation_data_that_cannot_be_split_is_read_whole_on_every_rank() -> None:
    info = distributed.DistInfo(rank=1, world_size=2, control_group=object())
    batches = [(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))]
    with pytest.warns(
        UserWarning,
        match=r"^validation data of type list cannot be sharded: every rank evaluates "
        r"all of it and the means stay right",
    ):
        assert list(distributed.shard_eval(batches, info)) == batches
    custom = DataLoader(make_data(), batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(
        ValueError,
        match=r"^validation data uses a custom batch_sampler \(list\) that fitkit cannot "
        r"split across ranks; use batch_size= on the DataLoader$",
    ):
        distributed.shard_eval(custom, info)


def _own_group(rank: int, out: Path, user_group: bool) -> dict[str, Any]:
    import datetime

    if user_group:  # the user's own process group is used as it is, and left to the user to destroy
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    trainer = build()
    trainer.fit(DataLoader(make_data(), batch_size=16), epochs=1)
    created = trainer.dist.created_group
    distributed._teardown()  # what runs at exit when fitkit created the group
    return {"created": created, "initialized_after": torch.distributed.is_initialized(), "steps": trainer.global_step}


@pytest.mark.parametrize("user_group", [False, True])
def test_the_process_group_is_created_only_when_the_user_has_not(tmp_path: Path, user_group: bool) -> None:
    for rank in run_ranks(_own_group, tmp_path, user_group=user_group).check():
        assert rank == {"created": not user_group, "initialized_after": False, "steps": 3}
