"""ModelCheckpoint: templates, best-only, top-k, missing keys, path escape, non-finite weights, save_freq."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_utils import build

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import ModelCheckpoint


class Script(fitkit.Callback):
    """Puts scripted values into the epoch logs (runs before ModelCheckpoint in the list)."""

    def __init__(self, values: list[float], key: str = "score") -> None:
        self.values, self.key = values, key

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs[self.key] = self.values[epoch]


def _fit(tmp_path: Path, values: list[float], **kwargs: Any) -> ModelCheckpoint:
    kwargs.setdefault("monitor", "score")
    kwargs.setdefault("mode", "min")
    ckpt = ModelCheckpoint(tmp_path / kwargs.pop("template", "e{epoch}.pt"), **kwargs)
    trainer, train, val = build(callbacks=[Script(values), ckpt])
    trainer.fit(train, val, epochs=len(values))
    return ckpt


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.pt"))


def test_template_is_filled_from_the_epoch_logs(tmp_path: Path) -> None:
    _fit(tmp_path, [0.5, 0.25], template="{epoch:02d}-{val_loss:.3f}-{score:.2f}.pt", monitor=None)
    names = _names(tmp_path)
    assert [n.split("-")[0] for n in names] == ["01", "02"]  # {epoch} is 1-based, as in Keras
    assert names[1].endswith("-0.25.pt")
    val_loss = float(names[0].split("-")[1])
    history = checkpoint.load(tmp_path / names[0])["callbacks"]["History"]["history"]
    assert val_loss == pytest.approx(history["val_loss"][0], abs=5e-4)


def test_a_template_key_missing_from_the_logs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match=r"names \['val_acc'\] but the logs hold only .*'val_accuracy'"):
        _fit(tmp_path, [1.0], template="{epoch}-{val_acc:.2f}.pt", monitor=None)
    assert _names(tmp_path) == ["crash.pt"]  # the state at the error, for inspection; no templated file


def test_rendered_names_cannot_leave_the_folder(tmp_path: Path) -> None:
    class Evil(fitkit.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs["tag"] = "../../escaped"

    ckpt = ModelCheckpoint(tmp_path / "ckpt" / "{tag}.pt", monitor=None)
    trainer, train, val = build(callbacks=[Evil(), ckpt])
    with pytest.raises(ValueError, match="leaves the checkpoint folder"):
        trainer.fit(train, val, epochs=1)
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pt")] == ["ckpt/crash.pt"]
    assert not list(tmp_path.parent.parent.glob("escaped*"))


@pytest.mark.parametrize(
    "mode, values, saved",
    [
        ("min", [3.0, 2.0, 2.5, 1.0], ["e1.pt", "e2.pt", "e4.pt"]),
        ("max", [3.0, 2.0, 2.5, 4.0], ["e1.pt", "e4.pt"]),
    ],
)
def test_save_best_only(tmp_path: Path, mode: str, values: list[float], saved: list[str]) -> None:
    ckpt = _fit(tmp_path, values, save_best_only=True, mode=mode)
    assert _names(tmp_path) == saved
    assert ckpt.best == (min(values) if mode == "min" else max(values))


def test_save_top_k_keeps_the_k_best_and_deletes_after_writing(tmp_path: Path) -> None:
    ckpt = _fit(tmp_path, [5.0, 3.0, 4.0, 1.0, 6.0, 2.0], save_top_k=3)
    assert _names(tmp_path) == ["e2.pt", "e4.pt", "e6.pt"]  # scores 3, 1, 2
    assert sorted(score for score, _, _ in ckpt.kept) == [1.0, 2.0, 3.0]
    listed = sorted(checkpoint.read_manifest(tmp_path)["files"])
    assert listed == ["e2.pt", "e4.pt", "e6.pt"]  # the manifest forgot the deleted files


def test_save_top_k_without_monitor_keeps_the_newest(tmp_path: Path) -> None:
    _fit(tmp_path, [1.0, 1.0, 1.0, 1.0], save_top_k=2, monitor=None)
    assert _names(tmp_path) == ["e3.pt", "e4.pt"]


def test_save_last_and_weights_only(tmp_path: Path) -> None:
    _fit(tmp_path, [1.0, 2.0], save_weights_only=True, save_last=True, monitor=None)
    assert _names(tmp_path) == ["e1.pt", "e2.pt", "last.pt"]
    weights = torch.load(tmp_path / "e2.pt", weights_only=True)
    assert set(weights) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert checkpoint.load(tmp_path / "last.pt")["fitkit"]["kind"] == "full"


def test_save_freq_in_batches(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(tmp_path / "s{step}-b{batch}-{loss:.2f}.pt", monitor=None, save_freq=4)
    trainer, train, val = build(callbacks=[ckpt])
    trainer.fit(train, val, epochs=2)  # 12 batches: saves after batches 4, 8 and 12 (global steps)
    steps = sorted(int(n.split("-")[0][1:]) for n in _names(tmp_path))
    assert steps == [4, 8, 12]


def test_validation_freq_skipped_epochs_save_nothing_for_val_monitor(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor="val_loss", save_best_only=True)
    trainer, train, val = build(callbacks=[ckpt])
    trainer.fit(train, val, epochs=4, validation_freq=2)
    assert set(_names(tmp_path)) <= {"e2.pt", "e4.pt"} and "e2.pt" in _names(tmp_path)


def test_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    class Poison(fitkit.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch == 1:
                with torch.no_grad():
                    next(self.model.parameters()).fill_(math.nan)

    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_last=True)
    trainer, train, val = build(callbacks=[Poison(), ckpt])
    with pytest.warns(UserWarning, match="non-finite weights"):
        trainer.fit(train, val, epochs=2)
    assert _names(tmp_path) == ["e1.pt", "last.pt"]
    assert checkpoint.load(tmp_path / "last.pt")["trainer"]["epoch"] == 1  # the good one was kept


def test_an_exception_saves_crash_pt_without_touching_good_checkpoints(tmp_path: Path) -> None:
    class Boom(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == 9:
                raise RuntimeError("bug in a callback")

    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_last=True)
    trainer, train, val = build(callbacks=[ckpt, Boom()])
    with pytest.raises(RuntimeError, match="bug in a callback"):
        trainer.fit(train, val, epochs=3)
    last = checkpoint.load(tmp_path / "last.pt")
    assert last["trainer"]["global_step"] == 6  # the epoch-1 save, untouched
    assert checkpoint.read_manifest(tmp_path)["files"]["crash.pt"]["versions"][0]["kind"] == "crash"
    assert checkpoint.candidates([tmp_path])[0].name == "last.pt"  # resume='auto' never picks crash.pt


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"save_freq": 0}, "save_freq must be 'epoch' or an int >= 1"),
        ({"save_freq": "batch"}, "save_freq must be 'epoch' or an int >= 1"),
        ({"save_top_k": 0}, "save_top_k must be None"),
        ({"save_best_only": True, "monitor": None}, "save_best_only=True needs a monitor"),
        ({"mode": "up"}, "mode must be one of"),
    ],
)
def test_arguments_are_checked(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelCheckpoint(tmp_path / "x.pt", **kwargs)


def test_mode_auto_that_cannot_tell_fails_before_training(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor="score", save_top_k=1)
    trainer, train, val = build(callbacks=[Script([1.0]), ckpt])
    with pytest.raises(ValueError, match="cannot tell whether 'score' should go up or down"):
        trainer.fit(train, val, epochs=1)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "kwargs, best, score",
    [
        ({"save_top_k": 2}, "e3.pt", 1.0),  # the best of the two kept, by monitor (min)
        ({"save_top_k": 2, "mode": "max"}, "e2.pt", 4.0),
        ({"save_best_only": True}, "e3.pt", 1.0),
        ({"monitor": None}, "e4.pt", None),  # no ranking: the newest file
        ({"save_top_k": 3}, "e3.pt", 1.0),  # a NaN never wins
    ],
)
def test_best_model_path_and_score(tmp_path: Path, kwargs: dict[str, Any], best: str, score: float | None) -> None:
    ckpt = _fit(tmp_path, [3.0, 4.0, 1.0, float("nan")], **kwargs)
    assert ckpt.best_model_path == str(tmp_path / best)
    assert ckpt.best_model_score == score


def test_best_model_path_is_none_before_a_write_and_restored_on_resume(tmp_path: Path) -> None:
    assert ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor="score", save_top_k=2).best_model_path is None
    _fit(tmp_path, [3.0, 1.0, 2.0], save_top_k=2, save_last=True)
    again = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor="score", mode="min", save_top_k=2, save_last=True)
    trainer, train, val = build(callbacks=[Script([3.0, 1.0, 2.0, 5.0]), again])
    trainer.fit(train, val, epochs=4, resume=str(tmp_path / "last.pt"))
    assert trainer.resumed_from == tmp_path / "last.pt"
    assert (again.best_model_path, again.best_model_score) == (str(tmp_path / "e2.pt"), 1.0)
