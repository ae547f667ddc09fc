"""``async_save=True`` on ModelCheckpoint and BackupAndRestore: the same files and the same exact resume as a
synchronous save, a background failure raised at the next batch, and a kill during a background write that
leaves the previous good checkpoint."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import BackupAndRestore, ModelCheckpoint
from fitkit.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def build(callbacks: list[Any]) -> fitkit.Trainer:
    fitkit.seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    return fitkit.Trainer(
        model, torch.optim.Adam(model.parameters(), lr=0.01), "cross_entropy",
        callbacks=callbacks, device="cpu", verbose=0,
    )  # fmt: skip


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    return x, (x[:, 0] > 0).long()


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):  # the runs differ in their ids, clocks and folders only
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a if k not in ("time", "train_time", "run_id"))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, str):
        return a.replace("/sync/", "/") == b.replace("/async/", "/")
    return bool(a == b)


def callbacks(folder: Path, async_save: bool) -> list[Any]:
    return [
        ModelCheckpoint(folder / "{epoch:02d}.pt", monitor=None, save_top_k=2, save_last=True, async_save=async_save),
        BackupAndRestore(folder / "backup", save_freq=3, delete_checkpoint=False, async_save=async_save),
    ]


def test_async_saves_write_what_sync_saves_write_and_resume_exactly(tmp_path: Path) -> None:
    sync = build(callbacks(tmp_path / "sync", False))
    sync.fit(data(), epochs=4, batch_size=16)
    background = build(callbacks(tmp_path / "async", True))
    background.fit(data(), epochs=4, batch_size=16)
    names = sorted(p.name for p in (tmp_path / "sync").rglob("*.pt"))
    assert names == sorted(p.name for p in (tmp_path / "async").rglob("*.pt")) == [
        "03.pt", "04.pt", "backup.pt", "last.pt",
    ]  # fmt: skip
    for name in ("03.pt", "04.pt", "last.pt", "backup/backup.pt"):
        # Each file holds the state at its own save point, not a later one (the host copy is taken in the loop).
        assert same(checkpoint.load(tmp_path / "sync" / name), checkpoint.load(tmp_path / "async" / name)), name
    resumed = build(callbacks(tmp_path / "async", True))
    resumed.fit(data(), epochs=6, batch_size=16, resume=tmp_path / "async" / "03.pt")
    whole = build([])
    whole.fit(data(), epochs=6, batch_size=16)
    assert same(resumed.model.state_dict(), whole.model.state_dict())


def test_a_background_failure_is_raised_in_the_loop_at_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch.save

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    trainer = build([BackupAndRestore(tmp_path / "backup", save_freq=2, async_save=True)])
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="BackupAndRestore: a background save failed") as failure:
        trainer.fit(data(), epochs=2, batch_size=16)
    monkeypatch.setattr(torch, "save", real)
    assert "No space left on device" in str(failure.value)
    assert trainer.global_step in (3, 4)  # the save after step 2 failed; the loop learned of it at most 2 steps on
    assert not (tmp_path / "backup" / "backup.pt").exists()


@pytest.mark.slow  # a subprocess
def test_a_kill_during_a_background_write_leaves_the_previous_good_checkpoint(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys, threading
        import torch
        from torch import nn
        import fitkit
        from fitkit.callbacks import BackupAndRestore

        real = torch.save
        saves = []

        def killed_midway(obj, f, *args, **kwargs):
            saves.append(1)
            if len(saves) == 3:  # the third backup: half its bytes, then the process is killed
                assert threading.current_thread() is not threading.main_thread()
                f.write(b"x" * 1000)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real(obj, f, *args, **kwargs)

        torch.save = killed_midway
        fitkit.seed_everything(0)
        model = nn.Linear(4, 2)
        trainer = fitkit.Trainer(model, "sgd", "cross_entropy", device="cpu", verbose=0,
                                 callbacks=[BackupAndRestore(sys.argv[1], save_freq=1, async_save=True)])
        x = torch.randn(64, 4)
        trainer.fit((x, (x[:, 0] > 0).long()), epochs=2, batch_size=16)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "backup")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -9, done.stderr[-2000:]
    record = checkpoint.verify(tmp_path / "backup" / "backup.pt")  # intact, and vouched for
    assert record["global_step"] == 2  # the second backup, the last one that completed
    assert checkpoint.load(tmp_path / "backup" / "backup.pt")["trainer"]["global_step"] == 2


def test_async_save_is_a_flag() -> None:
    with pytest.raises(TypeError, match="async_save"):
        BackupAndRestore("backup", async_save="yes")  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="async_save"):
        ModelCheckpoint("ckpt/{epoch}.pt", async_save="yes")  # type: ignore[arg-type]


# -- FSDP: DCP's async_save, every rank's shard snapshotted at the save point -------------------------------
def _fsdp_job(rank: int, out: Path, folder: Path, epochs: int, async_save: bool, resume: Any = None) -> Any:
    from test_distributed import make_data
    from test_fsdp import Blocky
    from torch.utils.data import DataLoader

    if async_save:  # slow background writes: training goes on meanwhile, so a write that read live tensors differs
        from torch.distributed.checkpoint import FileSystemWriter

        real = FileSystemWriter.write_data

        def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
            time.sleep(0.3)
            return real(self, *args, **kwargs)

        FileSystemWriter.write_data = slow  # type: ignore[method-assign]
    fitkit.seed_everything(0)
    model = Blocky()
    trainer = fitkit.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "cross_entropy",
        callbacks=[
            ModelCheckpoint(folder / "e{epoch:02d}", monitor=None, save_top_k=2, async_save=async_save),
            BackupAndRestore(folder / "backup", save_freq=2, delete_checkpoint=False, async_save=async_save),
        ],
        device="cpu", verbose=0, strategy="fsdp",
    )  # fmt: skip
    trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=epochs, resume=resume)
    return trainer.model_state_dict()


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_async_saves_snapshot_every_rank_s_shard_at_the_save_point_and_resume_exactly(tmp_path: Path) -> None:
    from dist_utils import run_ranks

    run_ranks(_fsdp_job, tmp_path / "r1", tmp_path / "sync", 3, False).check()
    run_ranks(_fsdp_job, tmp_path / "r2", tmp_path / "async", 3, True).check()
    for name in ("e02", "e03", "backup/backup.pt"):
        written = checkpoint.verify(tmp_path / "async" / name)  # committed, every shard vouched for
        assert sorted(written["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "fitkit-state.pt"]
        for shard in ("__0_0.distcp", "__1_0.distcp"):  # the bytes of the save point, not of a later step
            sync, background = (tmp_path / kind / name / shard for kind in ("sync", "async"))
            assert sync.read_bytes() == background.read_bytes(), (name, shard)
    assert not (tmp_path / "async" / "e01").exists()  # the top 2: removed after its replacement's commit
    whole = run_ranks(_fsdp_job, tmp_path / "r3", tmp_path / "whole", 5, False).check()[0]
    resumed = run_ranks(_fsdp_job, tmp_path / "r4", tmp_path / "async", 5, True, tmp_path / "async" / "e02")
    weights = resumed.check()[0]
    assert all(torch.equal(weights[k], whole[k]) for k in whole)


def _fsdp_killed_job(rank: int, out: Path, folder: Path, kill: bool) -> Any:
    import os
    import signal
    import threading

    from test_distributed import make_data
    from test_fsdp import Blocky
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.utils.data import DataLoader

    if kill and rank == 1:  # the third backup: rank 1 is killed in the background, half its shard written
        real, writes = FileSystemWriter.write_data, []

        def killed_midway(self: Any, plan: Any, planner: Any) -> Any:
            writes.append(1)
            if len(writes) == 3:
                assert threading.current_thread() is not threading.main_thread()
                (Path(self.path) / "__1_0.distcp").write_bytes(b"x" * 1000)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, plan, planner)

        FileSystemWriter.write_data = killed_midway  # type: ignore[method-assign]
    fitkit.seed_everything(0)
    model = Blocky()
    trainer = fitkit.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "cross_entropy",
        callbacks=[BackupAndRestore(folder, save_freq=1, async_save=True)], device="cpu", verbose=0, strategy="fsdp",
    )  # fmt: skip
    trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=2)
    return {"weights": trainer.model_state_dict(), "resumed": trainer.resumed_from is not None}


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_a_rank_killed_during_a_background_write_leaves_the_previous_backup_and_the_job_resumes_exactly(
    tmp_path: Path,
) -> None:
    from dist_utils import run_ranks

    whole = run_ranks(_fsdp_killed_job, tmp_path / "r1", tmp_path / "whole", False).check()[0]["weights"]
    killed = run_ranks(_fsdp_killed_job, tmp_path / "r2", tmp_path / "backup", True)
    assert killed.exitcodes[1] == -9 and killed.exitcodes[0] != 0, killed.exitcodes
    record = checkpoint.verify(tmp_path / "backup" / "backup.pt")  # intact, every shard vouched for
    assert record["global_step"] == 2  # the second backup, the last one that completed
    again = run_ranks(_fsdp_killed_job, tmp_path / "r3", tmp_path / "backup", False).check()
    assert again[0]["resumed"]
    assert all(torch.equal(again[0]["weights"][k], whole[k]) for k in whole)
