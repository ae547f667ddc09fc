"""Atomic writes, the manifest, safe loading, fallback to the last good file, mismatch messages."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_utils import assert_same_state, build, final_state
from torch import nn

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import ModelCheckpoint
from fitkit.checkpoint import CheckpointError


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_atomic_save_records_size_and_sha_and_loads_weights_only(tmp_path: Path) -> None:
    record = checkpoint.atomic_save({"w": torch.arange(5)}, tmp_path / "a.pt", {"kind": "weights"})
    manifest = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    assert manifest["files"]["a.pt"]["versions"] == [record]
    assert record["size"] == (tmp_path / "a.pt").stat().st_size
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], torch.arange(5))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [checkpoint.LOCK, "a.pt", checkpoint.MANIFEST]  # no temporary files (the lock stays)


def test_every_file_a_run_writes_loads_with_weights_only(tmp_path: Path) -> None:
    trainer, train, val = build(
        callbacks=[
            ModelCheckpoint(tmp_path / "full-{epoch}.pt", monitor=None, save_last=True),
            ModelCheckpoint(tmp_path / "w" / "weights-{epoch}.pt", monitor=None, save_weights_only=True),
        ]
    )
    trainer.fit(train, val, epochs=2)
    files = sorted(p for p in tmp_path.rglob("*.pt"))
    assert [p.name for p in files] == ["full-1.pt", "full-2.pt", "last.pt", "weights-1.pt", "weights-2.pt"]
    for path in files:
        torch.load(path, weights_only=True)  # raises if anything pickled a Python object
    weights = torch.load(tmp_path / "w" / "weights-2.pt", weights_only=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    model.load_state_dict(weights)  # a weights-only file is a plain state_dict


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_resume_auto_falls_back_to_the_previous_good_checkpoint(tmp_path: Path, damage: str) -> None:
    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_top_k=2)
    trainer, train, val = build(callbacks=[ckpt])
    trainer.fit(train, val, epochs=3)
    newest = tmp_path / "e3.pt"
    if damage == "flip":
        _flip_byte(newest)
    else:
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        checkpoint.verify(newest)
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_top_k=2)])
    with pytest.warns(UserWarning, match="skipping bad checkpoint.*e3.pt"):
        trainer.fit(train, val, epochs=3, resume="auto")
    assert len(trainer.history.epoch) == 3  # history restored from e2 (2 epochs) + one more epoch
    # ...and equals the uninterrupted run, since e2 holds the exact state after epoch 2.
    reference, train, val = build()
    reference.fit(train, val, epochs=3)
    assert_same_state(final_state(trainer), final_state(reference))


def test_explicit_path_to_a_bad_file_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    trainer, train, val = build()
    trainer.fit(train, val, epochs=1)
    path = trainer.save_checkpoint(tmp_path / "c.pt")
    _flip_byte(path)
    trainer, train, val = build()
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        trainer.fit(train, val, epochs=2, resume=path)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        trainer.fit(train, val, epochs=2, resume=tmp_path / "missing.pt")
    (tmp_path / "stray.pt").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="not listed in"):
        trainer.fit(train, val, epochs=2, resume=tmp_path / "stray.pt")


def test_resume_auto_without_checkpoint_callbacks_is_an_error_and_with_none_yet_starts_fresh(tmp_path: Path) -> None:
    trainer, train, val = build()
    with pytest.raises(ValueError, match="resume='auto' looks in the folders"):
        trainer.fit(train, val, epochs=1, resume="auto")
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None)])
    trainer.fit(train, val, epochs=1, resume="auto")
    assert trainer.global_step == 6


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("touch pwned_marker",))


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    # Even a manifest that vouches for it (an attacker controls both files) does not make it load.
    checkpoint._write_manifest(
        tmp_path,
        {
            "version": 1,
            "files": {
                "evil.pt": {
                    "versions": [
                        {
                            "sha256": checkpoint._sha256(path),
                            "size": path.stat().st_size,
                            "kind": "full",
                            "global_step": 99,
                        }
                    ]
                }
            },
        },
    )
    checkpoint.verify(path)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil.pt.*(posix.system|os.system|Unsupported)"):
        checkpoint.load(path)
    trainer, train, val = build()
    with pytest.raises(CheckpointError, match="refused to load"):
        trainer.fit(train, val, epochs=1, resume=path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        checkpoint.load(plain, verify_file=False)
    assert not (tmp_path / "pwned_marker").exists()


def _saved(tmp_path: Path) -> Path:
    trainer, train, val = build()
    trainer.fit(train, val, epochs=1)
    return trainer.save_checkpoint(tmp_path / "c.pt")


def test_architecture_mismatch_names_the_keys(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))  # no Dropout: indices shift
    trainer = fitkit.Trainer(model, torch.optim.Adam(model.parameters()), "cross_entropy", verbose=0)
    with pytest.raises(
        CheckpointError,
        match=r"model architecture mismatch.*unexpected keys \['3.bias', '3.weight'\]"
        r".*missing keys \['2.bias', '2.weight'\].*strict=False",
    ):
        trainer.load_checkpoint(path)


def test_shape_mismatch_and_strict_false_loads_what_fits(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
    trainer = fitkit.Trainer(model, torch.optim.Adam(model.parameters()), "cross_entropy", verbose=0)
    with pytest.raises(CheckpointError, match=r"0.weight: \(16, 8\) vs \(32, 8\)"):
        trainer.load_checkpoint(path)
    wide = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    trainer = fitkit.Trainer(wide, torch.optim.Adam(wide.parameters()), "cross_entropy", verbose=0)
    trainer.load_checkpoint(path, strict=False)
    saved = checkpoint.load(path)["model"]
    assert torch.equal(wide[0].weight, saved["0.weight"])  # the layer that fits was loaded
    assert wide[3].weight.shape == (3, 16)


def test_optimizer_type_mismatch(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    trainer, _, _ = build()
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer type mismatch.*Adam.*SGD"):
        trainer.load_checkpoint(path)


def test_data_size_mismatch_on_resume(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    trainer, train, val = build(batch_size=8)
    with pytest.raises(CheckpointError, match=r"training data size \(num_batches\).*6.*12"):
        trainer.fit(train, val, epochs=2, resume=path)


def test_a_checkpoint_holds_the_state_after_every_callback_whatever_the_order(tmp_path: Path) -> None:
    class Counter(fitkit.Callback):
        def __init__(self) -> None:
            self.epochs_seen = 0

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.epochs_seen += 1

        def state_dict(self) -> dict[str, Any]:
            return {"epochs_seen": self.epochs_seen}

    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None)
    trainer, train, val = build(callbacks=[ckpt, Counter()])  # the checkpoint callback runs first
    trainer.fit(train, val, epochs=2)
    state = checkpoint.load(tmp_path / "e1.pt")
    assert state["callbacks"]["Counter"] == {"epochs_seen": 1}
    assert state["callbacks"]["History"]["epoch"] == [0]
    assert state["trainer"]["epoch"] == 1 and state["trainer"]["batch_in_epoch"] == 0


def test_keep_last_n_deletes_only_after_the_successor_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_top_k=2)
    trainer, train, val = build(callbacks=[ckpt])
    trainer.fit(train, val, epochs=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["e1.pt", "e2.pt"]

    def failing_save(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_top_k=2)])
    # Which file, that nothing was replaced, and what to do (not torch's "unexpected pos").
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"could not write the checkpoint .*e3\.pt: No space left on "
        r"device \(ENOSPC\)\. Nothing was replaced.*free disk space",
    ):
        trainer.fit(train, val, epochs=3, resume=tmp_path / "e2.pt")
    monkeypatch.undo()
    # e3 failed to write: e1 and e2 are still there and still vouched for, no temporary file remains.
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".pt", ".tmp")) == ["e1.pt", "e2.pt"]
    checkpoint.verify(tmp_path / "e1.pt")
    checkpoint.verify(tmp_path / "e2.pt")
    assert not list(tmp_path.glob(".*.tmp"))


def test_manifest_records_kind_step_and_epoch(tmp_path: Path) -> None:
    trainer, train, val = build()
    trainer.fit(train, val, epochs=1)
    trainer.save_checkpoint(tmp_path / "c.pt")
    record = checkpoint.read_manifest(tmp_path)["files"]["c.pt"]["versions"][0]
    assert record["kind"] == "full" and record["global_step"] == 6 and record["epoch"] == 1
