"""Fault injection: SIGKILL and SIGTERM at random moments of training *and* validation (epoch-level and
step-level), then restart the same script until it finishes; the result must equal the uninterrupted run
bit for bit (weights, optimizer, epoch logs, every validation's logs, global step).

The job validates on a DataLoader, whose ``iter()`` draws a seed from the global generator, and its model
has dropout: a checkpoint that recorded the random state after validation drew from it would make the
resumed run's later dropout masks differ (the negative control shows the comparison catches that).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_utils import assert_same_state, build, final_state, run_child

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import BackupAndRestore, ModelCheckpoint

EPOCHS = 8  # 6 training batches an epoch, 3 validation batches
EVERY = 4  # validate_every_n_steps in the "steps" mode: steps 4, 8, 12 (= the epoch end), ...


def _job(folder: str, mode: str, progress: str | None = None, sabotage: bool = False, val_delay: float = 0.004) -> None:
    """The restartable job: a backup after every batch; ``final.pt`` with the results when done.

    Writes ``<pid> t <step>`` after each training batch and ``<pid> v <step> <batch>`` at the start of
    each validation batch to ``progress``, so the parent can aim its signals. ``sabotage`` forgets the
    random state captured before an epoch's validation (a checkpoint written during it then records the
    state after the validation loader drew from the generator).
    """
    pid = os.getpid()

    class Progress(fitkit.Callback):
        def _mark(self, text: str) -> None:
            if progress is not None:
                Path(progress).write_text(f"{pid} {text}")

        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            self._mark(f"t {self.trainer.global_step}")
            time.sleep(0.001)

        def on_validation_batch_begin(self, batch: int, logs: Any = None) -> None:
            self._mark(f"v {self.trainer.global_step} {batch}")
            time.sleep(val_delay)

    if sabotage:  # the run's record of the generators before an epoch's validation, always None
        fitkit._run.Run.rng_before_validation = property(  # type: ignore[assignment]
            lambda self: None, lambda self, value: None
        )
    backup = BackupAndRestore(Path(folder) / "backup", save_freq=1, delete_checkpoint=False)
    # Checkpoint files in other folders: a restart rewrites what the killed process wrote after its backup.
    best = ModelCheckpoint(Path(folder) / "ckpt" / "best.pt", monitor="val_loss", save_best_only=True, save_last=True)
    top = ModelCheckpoint(Path(folder) / "top" / "e{epoch}.pt", monitor="val_loss", save_top_k=2)
    trainer, train, val = build(callbacks=[Progress(), backup, best, top])
    options = {"validate_every_n_steps": EVERY} if mode == "steps" else {}
    trainer.fit(train, val, epochs=EPOCHS, **options)
    kept = sorted(p.relative_to(folder).as_posix() for p in Path(folder).glob("top/e*.pt"))
    best_weights = checkpoint.load(Path(folder) / "ckpt" / "best.pt")["model"]
    result = {**final_state(trainer), "validations": trainer.history.validations, "kept": kept, "best": best_weights}
    checkpoint.atomic_save(result, Path(folder) / "final.pt")


def _finish(folder: Path, mode: str) -> dict[str, Any]:
    process = run_child(_job, str(folder), mode)
    process.join(120)
    assert process.exitcode == 0, process.exitcode
    return checkpoint.load(folder / "final.pt")


def _read(progress: Path, pid: int | None) -> list[str]:
    """The child's last mark, split (``["t", step]`` or ``["v", step, batch]``); [] before its first."""
    try:
        words = progress.read_text().split()
    except FileNotFoundError:
        return []
    if len(words) < 3 or int(words[0]) != pid:
        return []
    return words[1:]


def _assert_same(result: dict[str, Any], reference: dict[str, Any]) -> None:
    assert_same_state(result, reference)
    assert result["validations"] == reference["validations"]
    assert result["kept"] == reference["kept"]  # save_top_k=2 kept the same files
    assert all(torch.equal(result["best"][k], v) for k, v in reference["best"].items())


def _kill_and_restart(tmp_path: Path, mode: str, seed: int, kills_wanted: int) -> dict[str, int]:
    """Restarts the job in ``tmp_path/run`` after signalling it at random moments until it completes;
    returns how many signals landed where."""
    folder, progress = tmp_path / "run", tmp_path / "progress"
    chooser = random.Random(seed)
    landed = {"validation": 0, "step_validation": 0, "training": 0, "startup": 0, "sigterm_in_validation": 0}
    attempts = 0
    while sum(landed.values()) - landed["sigterm_in_validation"] < kills_wanted and attempts < 4 * kills_wanted:
        attempts += 1
        process = run_child(_job, str(folder), mode, progress=str(progress))
        aim = chooser.choice(["validation", "validation", "training", "startup"])
        sig = signal.SIGTERM if chooser.random() < 0.3 else signal.SIGKILL
        deadline = time.monotonic() + 30
        if aim != "startup":  # wait until this child is in the phase aimed at, then strike within a batch
            kind = "v" if aim == "validation" else "t"
            while process.is_alive() and time.monotonic() < deadline:
                mark = _read(progress, process.pid)
                if mark and mark[0] == kind:
                    break
                time.sleep(0.0003)
            time.sleep(chooser.uniform(0.0, 0.004))
        else:
            time.sleep(chooser.uniform(0.0, 0.05))
        if not process.is_alive():
            break  # it finished first
        mark = _read(progress, process.pid)
        os.kill(process.pid, sig)
        process.join(30)
        if process.exitcode == 0:
            break  # it finished between the check and the signal (a SIGTERM after the last batch is moot)
        assert process.exitcode in (-signal.SIGKILL, -signal.SIGTERM, 143), process.exitcode
        if not mark:
            landed["startup"] += 1
        elif mark[0] == "v":
            step_level = mode == "steps" and int(mark[1]) % EVERY == 0
            landed["step_validation" if step_level else "validation"] += 1
            landed["sigterm_in_validation"] += sig == signal.SIGTERM and process.exitcode == 143
        else:
            landed["training"] += 1
    return landed


@pytest.mark.slow  # dozens of killed child processes
@pytest.mark.parametrize("mode", ["epoch", "steps"])
def test_kills_and_signals_inside_validation_and_training_resume_bit_for_bit(tmp_path: Path, mode: str) -> None:
    reference = _finish(tmp_path / "reference", mode)
    # "steps": 12 step-level validations (steps 4, 8, ..., 48) and the epoch-level ones at steps 6, 18, 30, 42
    # (at 12, 24, ... the epoch reuses the step-level validation that just ran).
    assert len(reference["validations"]) == {"epoch": EPOCHS, "steps": 16}[mode]

    landed = _kill_and_restart(tmp_path, mode, seed=0 if mode == "epoch" else 1, kills_wanted=24)
    print(f"{mode}: signals landed {landed}")
    result = _finish(tmp_path / "run", mode)
    _assert_same(result, reference)
    inside = landed["validation"] + landed["step_validation"]
    assert inside >= 8, landed
    assert landed["training"] >= 2, landed
    assert landed["sigterm_in_validation"] >= 1, landed
    if mode == "steps":
        assert landed["step_validation"] >= 3, landed


@pytest.mark.slow  # signals child processes
def test_negative_control_forgetting_the_random_state_before_validation_is_caught(tmp_path: Path) -> None:
    reference = _finish(tmp_path / "reference", "epoch")
    for sabotage, should_match in ((False, True), (True, False)):
        folder, progress = tmp_path / f"run-{sabotage}", tmp_path / f"progress-{sabotage}"
        process = run_child(_job, str(folder), "epoch", progress=str(progress), sabotage=sabotage)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.is_alive():
            mark = _read(progress, process.pid)
            if mark and mark[0] == "v" and int(mark[1]) == 12:  # epoch 2's validation, its first batch
                break
            time.sleep(0.0003)
        process.terminate()  # SIGTERM inside validation: the backup is written now
        process.join(30)
        assert process.exitcode == 143
        state = checkpoint.load(folder / "backup" / "backup.pt")
        assert state["trainer"]["global_step"] == 12 and state["trainer"]["batch_in_epoch"] == 6
        result = _finish(folder, "epoch")  # the restart itself is not sabotaged
        if should_match:
            _assert_same(result, reference)
        else:
            with pytest.raises(AssertionError):
                _assert_same(result, reference)
