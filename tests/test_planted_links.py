"""Issue 19, files and security: a link planted where fitkit creates a file (a temporary, a lock, a manifest, a
checkpoint, a prediction, a log) never redirects the write to a file outside the folder. Each attack plants a
real symbolic (or hard) link in the folder fitkit writes to, pointing at a victim file outside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import make_classification, make_trainer
from torch.utils.data import DataLoader, TensorDataset

from fitkit import checkpoint
from fitkit.callbacks import CSVLogger, ModelCheckpoint, PredictionWriter
from fitkit.callbacks._files import RUN_LOCK

SECRET = b"the victim's own bytes\n"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_bytes(SECRET)
    return victim


def _plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _data() -> DataLoader:
    x, y = make_classification(n=8)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_a_link_at_a_checkpoints_temporary_name_does_not_overwrite_its_target(tmp_path: Path) -> None:
    victim, folder = _victim(tmp_path), tmp_path / "ckpt"
    _plant(folder / f".last.pt.{os.getpid()}.tmp", victim)
    checkpoint.atomic_save({"w": torch.ones(3)}, folder / "last.pt")
    assert victim.read_bytes() == SECRET
    assert torch.equal(checkpoint.load(folder / "last.pt")["w"], torch.ones(3))
    assert not (folder / "last.pt").is_symlink()


def test_a_link_at_the_manifests_temporary_name_does_not_overwrite_its_target(tmp_path: Path) -> None:
    victim, folder = _victim(tmp_path), tmp_path / "ckpt"
    _plant(folder / f".{checkpoint.MANIFEST}.{os.getpid()}.tmp", victim)
    checkpoint.atomic_save({"w": torch.ones(3)}, folder / "a.pt")
    assert victim.read_bytes() == SECRET
    assert "a.pt" in checkpoint.read_manifest(folder, strict=True)["files"]


def test_a_link_at_the_manifest_lock_creates_nothing_outside_and_is_refused(tmp_path: Path) -> None:
    folder, outside = tmp_path / "ckpt", tmp_path / "outside"
    outside.mkdir()
    _plant(folder / checkpoint.LOCK, outside / "created-by-fitkit")
    with pytest.raises(checkpoint.CheckpointError, match=r"\.fitkit-manifest\.lock is a link; fitkit creates files"):
        checkpoint.atomic_save({"w": torch.ones(3)}, folder / "a.pt")
    assert list(outside.iterdir()) == []
    assert not (folder / "a.pt").exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_link_at_the_run_lock_is_refused_before_training_and_the_target_is_intact(tmp_path: Path, kind: str) -> None:
    victim, folder = _victim(tmp_path), tmp_path / "ckpt"
    folder.mkdir()
    if kind == "symlink":
        (folder / RUN_LOCK).symlink_to(victim)
    else:
        os.link(victim, folder / RUN_LOCK)
    trainer = make_trainer(callbacks=[ModelCheckpoint(folder / "e{epoch}.pt")])
    with pytest.raises(PermissionError, match=r"\.fitkit-run\.lock is a link; fitkit creates files"):
        trainer.fit(_data(), epochs=1)
    assert victim.read_bytes() == SECRET
    assert trainer.global_step == 0


def test_a_link_at_a_prediction_files_temporary_name_does_not_overwrite_its_target(tmp_path: Path) -> None:
    victim, folder = _victim(tmp_path), tmp_path / "preds"
    _plant(folder / "predictions-rank00000-batch000000001.pt.tmp", victim)
    trainer = make_trainer()
    expected = trainer.predict(_data())
    trainer.predict(_data(), callbacks=[PredictionWriter(folder)], return_outputs=False)
    assert victim.read_bytes() == SECRET
    assert torch.equal(PredictionWriter.read(folder), expected)


def test_a_link_at_the_csv_log_does_not_overwrite_its_target(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    _plant(tmp_path / "logs" / "log.csv", victim)
    trainer = make_trainer(callbacks=[CSVLogger(tmp_path / "logs" / "log.csv")])
    with pytest.raises(PermissionError, match=r"log\.csv is a link; fitkit creates files"):
        trainer.fit(_data(), epochs=1)
    assert victim.read_bytes() == SECRET
