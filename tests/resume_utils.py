"""A small, seeded training job for resume tests, runnable in a forked child that can be killed.

Forking from the test process (which has torch imported) makes a restart cost milliseconds instead of
the seconds a fresh interpreter needs, so many kill points fit in a fast test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit.callbacks import BackupAndRestore

CTX = mp.get_context("fork")


def make_data(n: int = 96, features: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)  # the data do not depend on the process's seed
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def make_model(features: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def build(
    seed: int = 0, workers: int = 0, accumulate: int = 1, callbacks: list[Any] | None = None, batch_size: int = 16
) -> tuple[fitkit.Trainer, DataLoader, DataLoader]:
    fitkit.seed_everything(seed)
    data = make_data()
    train = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers)
    val = DataLoader(TensorDataset(*data[:40]), batch_size=16)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = fitkit.Trainer(
        model,
        optimizer,
        "cross_entropy",
        metrics=["accuracy"],
        callbacks=callbacks or [],
        verbose=0,
        accumulate_grad_batches=accumulate,
    )
    return trainer, train, val


def final_state(trainer: fitkit.Trainer) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "history": trainer.history.history,
        "global_step": trainer.global_step,
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["history"] == b["history"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert_nested_equal(a["optimizer"], b["optimizer"], "optimizer")


def assert_nested_equal(actual: Any, expected: Any, where: str = "state") -> None:
    """Nested dicts/lists of tensors and plain values (an optimizer's state_dict, a hidden state), equal exactly."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_nested_equal(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_nested_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def crash_during_save(phase: str, save_index: int) -> None:
    """Makes this process SIGKILL itself during its ``save_index``-th checkpoint write, at ``phase``:
    ``"torch.save"`` (half the bytes written), ``"before-manifest"`` (file written, nothing vouched),
    ``"before-rename"`` (manifest vouches for old and new, rename not done), ``"after-rename"``.
    """
    import fitkit.checkpoint as checkpoint

    counts = {"save": 0}
    original_save, original_manifest, original_replace = checkpoint.torch.save, checkpoint._write_manifest, os.replace

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        counts["save"] += 1
        counts["manifest"] = 0
        if counts["save"] == save_index and phase == "torch.save":
            original_save(obj, f, *args, **kwargs)
            f.raw.truncate(f.size // 2)
            f.raw.flush()
            die()
        original_save(obj, f, *args, **kwargs)

    def write_manifest(folder: Any, manifest: Any) -> None:
        counts["manifest"] = counts.get("manifest", 0) + 1
        if counts["save"] == save_index:
            if phase == "before-manifest" and counts["manifest"] == 1:
                die()
            if phase == "after-rename" and counts["manifest"] == 2:
                die()
        original_manifest(folder, manifest)

    def replace(src: Any, dst: Any) -> None:
        if counts["save"] == save_index and phase == "before-rename" and not str(dst).endswith(".json"):
            die()
        original_replace(src, dst)

    checkpoint.torch.save = save  # type: ignore[assignment]
    checkpoint._write_manifest = write_manifest  # type: ignore[assignment]
    checkpoint.os.replace = replace  # type: ignore[assignment]


def job(
    folder: str,
    epochs: int = 3,
    seed: int = 0,
    step_delay: float = 0.0,
    sabotage: str | None = None,
    crash: tuple[str, int] | None = None,
    workers: int = 0,
    progress: str | None = None,
) -> None:
    """The crash-restart job: BackupAndRestore after every batch; writes ``final.pt`` when done.

    ``sabotage="rng"`` disables restoring the random generators, for the negative control; ``crash``
    kills the process during a checkpoint write (see :func:`crash_during_save`).
    """
    folder_path = Path(folder)
    if crash is not None:
        crash_during_save(*crash)

    class Slow(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if progress is not None:
                Path(progress).write_text(str(self.trainer.global_step))
            if step_delay:
                time.sleep(step_delay)

    if sabotage == "rng":
        from fitkit import rng

        rng.restore = lambda state, loader=None: None  # type: ignore[assignment]
    backup = BackupAndRestore(folder_path / "backup", save_freq=1, delete_checkpoint=False)
    trainer, train, val = build(seed=seed, callbacks=[Slow(), backup], workers=workers)
    trainer.fit(train, val, epochs=epochs)
    fitkit.checkpoint.atomic_save(final_state(trainer), folder_path / "final.pt")


def _child_entry(target: Callable[..., None], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    # A forked child must not enter the OpenMP pool the parent already started (it can deadlock there);
    # DataLoader workers do the same.
    torch.set_num_threads(1)
    target(*args, **kwargs)


def run_child(target: Callable[..., None], *args: Any, **kwargs: Any) -> mp.Process:
    process = CTX.Process(target=_child_entry, args=(target, args, kwargs))
    process.start()
    return process


def kill_after(process: mp.Process, seconds: float) -> bool:
    """SIGKILLs ``process`` after ``seconds`` unless it ended first; True when it was killed."""
    process.join(seconds)
    if process.exitcode is None:
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        return True
    return False
