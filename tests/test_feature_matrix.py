"""Features meet (issue 19, STYLE 17): step style x validation schedule x checkpoint mode x stop cause, every
pair of values at least once (a greedy pairwise cover, checked below), each combination checked against the
invariants:

- validation is recomputed when due: every ``val_loss`` a validation reports equals the loss of the weights at
  that moment, computed by hand; an epoch's ``val_*`` is there exactly when ``validation_freq`` asks for it;
- ``last.pt`` is the newest state: no checkpoint in the folder is newer, and one written at every epoch's end
  holds the final state;
- the resume is exact: the same run, sent SIGTERM halfway and resumed from what it saved, ends with the same
  weights, optimizer state, history and global_step, bit for bit;
- no file outside the run's folder is touched (the working directory included);
- a combination that cannot work (a step fitkit cannot count with ``max_steps``/``validate_every_n_steps``) is
  refused with a clear error at the first batch, before anything is written.

Two combinations run in the quick loop; the rest are marked slow. Four more run on two ranks (gloo, forked; slow),
rank 0 alone sent SIGTERM.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_utils import assert_same_state, final_state, make_data, make_model
from test_combinations import StepsItsOwnOptimizer  # the "raw" step: optimizer.step() called directly
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import BackupAndRestore, EarlyStopping, ModelCheckpoint

STEPS = ("default", "custom", "raw", "accumulate")
VALIDATIONS = ("epoch", "every2", "steps4", "none")
CHECKPOINTS = ("top1_last", "best_last", "epochs_last", "batches_last", "backup")
STOPS = ("epochs", "max_steps", "early_stopping", "stop_mid_epoch")
AXES = (STEPS, VALIDATIONS, CHECKPOINTS, STOPS)
EPOCHS, BATCH = 4, 16  # 6 batches an epoch


def _pairwise_cover(minimum: int) -> list[tuple[str, ...]]:
    """Greedy: the combination covering most uncovered pairs, until every pair is covered; then more, in
    product order, up to ``minimum``."""
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(AXES)), 2) for a in AXES[i] for b in AXES[j]}
    candidates = list(itertools.product(*AXES))
    chosen: list[tuple[str, ...]] = []

    def pairs(combo: tuple[str, ...]) -> set[tuple[int, str, int, str]]:
        return {(i, combo[i], j, combo[j]) for i, j in itertools.combinations(range(len(AXES)), 2)}

    while uncovered:
        best = max(candidates, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        candidates.remove(best)
        uncovered -= pairs(best)
    random.Random(0).shuffle(candidates)  # more, spread over every axis
    for combo in candidates:
        if len(chosen) >= minimum:
            break
        chosen.append(combo)
    return chosen


def _quick(combos: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """A few combinations that hold every value of every axis: the quick loop runs those."""
    missing = {(i, v) for i, axis in enumerate(AXES) for v in axis}
    quick = []
    while missing:
        best = max(combos, key=lambda c: len({(i, v) for i, v in enumerate(c)} & missing))
        quick.append(best)
        missing -= set(enumerate(best))
    return quick


COMBINATIONS = _pairwise_cover(44)
QUICK = _quick(COMBINATIONS)[:2]  # ~2 s each: the quick loop runs two, the rest are slow


def _params() -> list[Any]:
    return [
        pytest.param(*combo, id="-".join(combo), marks=() if combo in QUICK else pytest.mark.slow)
        for combo in COMBINATIONS
    ]


def test_the_combinations_cover_every_pair_and_the_quick_ones_every_value() -> None:
    assert len(COMBINATIONS) >= 40
    for i, j in itertools.combinations(range(len(AXES)), 2):
        seen = {(c[i], c[j]) for c in COMBINATIONS}
        assert seen == set(itertools.product(AXES[i], AXES[j]))
    assert len(set(COMBINATIONS)) == len(COMBINATIONS)
    assert {c[i] for c in _quick(COMBINATIONS) for i in range(len(AXES))} == {v for axis in AXES for v in axis}


class CustomStep(fitkit.Trainer):
    """A custom step through the step API: forward, compute_loss, backward, optimizer_step."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        with self.autocast():
            outputs = self.forward(x)
            loss = self.compute_loss(x, y, outputs)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach()}


class Invariants(fitkit.Callback):
    """Checks every validation against the weights of its moment, and which epochs have val_* logs."""

    def __init__(self, val: TensorDataset, due: Any) -> None:
        self.val, self.due = val, due
        self.checked = self.batches = 0

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batches += 1

    def expected_val_loss(self) -> float:
        model = self.trainer.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            x, y = self.val.tensors
            value = float(torch.nn.functional.cross_entropy(model(x), y))
        model.train(was_training)
        return value

    def on_validation_end(self, logs: Any = None) -> None:
        assert logs["val_loss"] == pytest.approx(self.expected_val_loss(), abs=1e-5)
        self.checked += 1

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        assert ("val_loss" in logs) == self.due(epoch), (epoch, sorted(logs))
        if "val_loss" in logs:  # the epoch's value is this epoch's weights' (not a reused, stale one)
            assert logs["val_loss"] == pytest.approx(self.expected_val_loss(), abs=1e-5)


class Interrupt(fitkit.Callback):
    """Sends this process SIGTERM after a given batch of the run (counted over epochs)."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


class StopMidEpoch(fitkit.Callback):
    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.trainer.state.epoch == 2 and batch == 1:
            self.trainer.stop("stopped by a callback")


def _run(folder: Path, combo: tuple[str, ...], interrupt: int = 0, resume: Any = None) -> fitkit.Trainer:
    step, validation, mode, stop = combo
    fitkit.seed_everything(0)
    data = make_data()
    train = DataLoader(data, batch_size=BATCH, shuffle=True)
    val = TensorDataset(*data[:40])
    monitor = "loss" if validation == "none" else "val_loss"
    fit_kwargs: dict[str, Any] = {"epochs": EPOCHS}
    due: Any = lambda epoch: validation in ("epoch", "steps4")  # noqa: E731
    if validation == "every2":
        fit_kwargs["validation_freq"] = 2
        due = lambda epoch: (epoch + 1) % 2 == 0  # noqa: E731
    elif validation == "steps4":
        fit_kwargs["validate_every_n_steps"] = 4
    elif validation == "none":
        due = lambda epoch: False  # noqa: E731
    callbacks: list[Any] = [Invariants(val, due)]
    if stop == "max_steps":
        fit_kwargs["max_steps"] = 10
    elif stop == "early_stopping":
        callbacks.append(EarlyStopping(monitor=monitor, min_delta=10.0, patience=1))
    elif stop == "stop_mid_epoch":
        callbacks.append(StopMidEpoch())
    template = str(folder / "e{epoch}-s{step}.pt")
    if mode == "top1_last":
        callbacks.append(ModelCheckpoint(template, monitor=monitor, save_top_k=1, save_last=True))
    elif mode == "best_last":
        callbacks.append(ModelCheckpoint(template, monitor=monitor, save_best_only=True, save_last=True))
    elif mode == "epochs_last":
        callbacks.append(ModelCheckpoint(template, monitor=None, save_last=True))
    elif mode == "batches_last":
        callbacks.append(ModelCheckpoint(template, monitor=None, save_freq=4, save_top_k=2, save_last=True))
    else:
        callbacks.append(BackupAndRestore(folder / "backup", save_freq=3))
    if interrupt:
        callbacks.append(Interrupt(interrupt))
    model = make_model()
    cls = {"custom": CustomStep, "raw": StepsItsOwnOptimizer}.get(step, fitkit.Trainer)
    trainer = cls(
        model, torch.optim.Adam(model.parameters(), lr=1e-2), "cross_entropy", callbacks=callbacks, verbose=0,
        device="cpu", accumulate_grad_batches=2 if step == "accumulate" else 1,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the raw step's warning, a resumed run's notes
        trainer.fit(
            train, DataLoader(val, batch_size=BATCH) if validation != "none" else None, resume=resume, **fit_kwargs
        )
    assert sum(cb.checked for cb in callbacks if isinstance(cb, Invariants)) >= (validation != "none")
    return trainer


def _newest_is_last(folder: Path, mode: str, trainer: fitkit.Trainer) -> None:
    if mode == "backup":
        assert not (folder / "backup").exists() or not any((folder / "backup").glob("*.pt"))  # deleted at the end
        return
    last = checkpoint.load(folder / "last.pt")["trainer"]
    others = [checkpoint.load(p)["trainer"] for p in folder.glob("e*.pt")]
    assert all(o["global_step"] <= last["global_step"] for o in others)
    if mode != "batches_last":  # a save point at every epoch's end: last.pt is the final state
        assert (last["epoch"], last["global_step"]) == (trainer.state.epoch, trainer.global_step)


@pytest.mark.parametrize(("step", "validation", "mode", "stop"), _params())
def test_feature_combination_keeps_the_invariants(
    step: str, validation: str, mode: str, stop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    combo = (step, validation, mode, stop)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    if step == "raw" and (validation == "steps4" or stop == "max_steps"):  # refused, before any file is written
        with pytest.raises(ValueError, match=r"counts optimizer steps.*self.optimizer_step\(\)"):
            _run(tmp_path / "a", combo)
        assert not any(p.name.startswith("e") for p in (tmp_path / "a").rglob("*.pt"))
        return
    reference = _run(tmp_path / "a", combo)
    _newest_is_last(tmp_path / "a", combo[2], reference)
    batches = next(cb.batches for cb in reference.callbacks if isinstance(cb, Invariants))
    with pytest.raises((fitkit.TrainingInterrupted, SystemExit)):  # SIGTERM mid-run: a clean exit, with last.pt
        _run(tmp_path / "b", combo, interrupt=(batches + 1) // 2)
    resumed = _run(tmp_path / "b", combo, resume=None if combo[2] == "backup" else "auto")
    if combo[2] != "backup":
        assert resumed.resumed_from == tmp_path / "b" / "last.pt"  # the newest state, which SIGTERM wrote
    assert_same_state(final_state(resumed), final_state(reference))
    _newest_is_last(tmp_path / "b", combo[2], resumed)
    assert list(work.iterdir()) == [] and outside.read_text() == "untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "cwd", "outside.txt"]


# -- world size 2 (gloo, two forked ranks): the same invariants, rank 0 writing, SIGTERM on rank 0 only ------
DISTRIBUTED = [
    ("default", "epoch", "top1_last", "early_stopping"),
    ("custom", "steps4", "epochs_last", "max_steps"),
    ("accumulate", "every2", "batches_last", "stop_mid_epoch"),
    ("raw", "none", "backup", "epochs"),
]


def _ranked(rank: int, out: Path, combo: tuple[str, ...], interrupt: int, resume: Any) -> dict[str, Any]:
    try:
        trainer = _run(out / "run", combo, interrupt=interrupt if rank == 0 else 0, resume=resume)
    except (fitkit.TrainingInterrupted, SystemExit):
        return {"interrupted": True}
    batches = next(cb.batches for cb in trainer.callbacks if isinstance(cb, Invariants))
    return {"interrupted": False, "state": final_state(trainer), "batches": batches}


@pytest.mark.slow  # two forked ranks, three fits each
@pytest.mark.parametrize(("step", "validation", "mode", "stop"), DISTRIBUTED, ids=["-".join(c) for c in DISTRIBUTED])
def test_feature_combination_keeps_the_invariants_on_two_ranks(
    step: str, validation: str, mode: str, stop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dist_utils import run_ranks

    combo = (step, validation, mode, stop)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    reference = run_ranks(_ranked, tmp_path / "a", combo, 0, None).check()
    assert not reference[0]["interrupted"]
    assert_same_state(reference[1]["state"], reference[0]["state"])  # the ranks agree
    at = (reference[0]["batches"] + 1) // 2
    interrupted = run_ranks(_ranked, tmp_path / "b", combo, at, None).check()
    assert all(r["interrupted"] for r in interrupted)  # rank 0's signal stops both, at the same batch
    resume = None if mode == "backup" else "auto"
    resumed = run_ranks(_ranked, tmp_path / "b", combo, 0, resume).check()
    for rank in (0, 1):
        assert_same_state(resumed[rank]["state"], reference[rank]["state"])
    if mode != "backup":
        last = checkpoint.load(tmp_path / "b" / "run" / "last.pt")["trainer"]
        others = [checkpoint.load(p)["trainer"] for p in (tmp_path / "b" / "run").glob("e*.pt")]
        assert all(o["global_step"] <= last["global_step"] for o in others)
    assert list(work.iterdir()) == []
