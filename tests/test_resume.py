"""Exact resume: SIGKILL at many moments, checkpoint-write crashes, a grid of resume points, SIGTERM."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_utils import assert_same_state, build, final_state, job, kill_after, run_child

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import BackupAndRestore, ModelCheckpoint


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted 3-epoch job (in a child, like the others)."""
    folder = tmp_path_factory.mktemp("reference")
    process = run_child(job, str(folder))
    process.join(60)
    assert process.exitcode == 0
    return checkpoint.load(folder / "final.pt")


def _finish(folder: Path, **kwargs: Any) -> dict[str, Any]:
    """Runs the job in ``folder`` to completion (resuming from its backup) and returns its final state."""
    process = run_child(job, str(folder), **kwargs)
    process.join(60)
    assert process.exitcode == 0, process.exitcode
    return checkpoint.load(folder / "final.pt")


def _read_step(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow  # kills a child process
def test_sigkill_at_random_moments_resumes_bit_for_bit(tmp_path: Path) -> None:
    epochs, batches = 10, 60  # 6 batches an epoch, a backup after every batch
    reference_folder, reference_progress = tmp_path / "reference", tmp_path / "reference-progress"
    process = run_child(job, str(reference_folder), epochs=epochs, progress=str(reference_progress))
    # A batch's time (with its backup), timed from step 10 on: the process's start-up (imports, a loaded
    # machine) must not count, or each kill lands several batches late and the run ends before 20 of them.
    first = last = None
    deadline = time.monotonic() + 60
    while process.is_alive() and time.monotonic() < deadline and last is None:
        step = _read_step(reference_progress)
        if step >= 10 and first is None:
            first = (step, time.perf_counter())
        if step >= batches - 10:
            last = (step, time.perf_counter())
        time.sleep(0.0005)
    process.join(60)
    reference = checkpoint.load(reference_folder / "final.pt")
    timed = first is not None and last is not None and last[0] > first[0]
    batch_time = (last[1] - first[1]) / (last[0] - first[0]) if timed else 0.01  # type: ignore[index]

    folder, progress = tmp_path / "killed", tmp_path / "progress"
    rng = random.Random(0)
    kills = 0
    while kills < 25:
        process = run_child(job, str(folder), epochs=epochs, progress=str(progress))
        # Let the restarted run take 0-1 more batches, then kill it at a random moment inside the next
        # one: during startup and restore, a forward/backward, or the checkpoint write after the batch.
        target = _read_step(progress) + rng.randint(0, 1)
        deadline = time.monotonic() + 30
        while _read_step(progress) < target and process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0005)
        if not kill_after(process, rng.uniform(0.0, batch_time)):
            break  # it finished first
        kills += 1
    else:
        process = run_child(job, str(folder), epochs=epochs)  # let the last restart finish
        process.join(60)
    assert process.exitcode == 0
    assert kills >= 20, f"only {kills} kill points landed"
    print(f"{kills} SIGKILLs before the run completed")
    assert_same_state(checkpoint.load(folder / "final.pt"), reference)


@pytest.mark.slow  # crashes a child process mid-write
@pytest.mark.parametrize("phase", ["torch.save", "before-manifest", "before-rename", "after-rename"])
def test_crash_during_checkpoint_write_keeps_a_good_checkpoint(tmp_path: Path, phase: str, reference_run: Any) -> None:
    reference = reference_run
    folder = tmp_path / "run"
    process = run_child(job, str(folder), crash=(phase, 7))
    process.join(60)
    assert process.exitcode == -signal.SIGKILL
    backup = folder / "backup" / "backup.pt"
    record = checkpoint.verify(backup)  # the name always holds vouched-for bytes, old or new
    state = checkpoint.load(backup)
    expected_step = 6 if phase in ("torch.save", "before-manifest", "before-rename") else 7
    assert state["trainer"]["global_step"] == expected_step == record["global_step"]
    assert_same_state(_finish(folder), reference)
    assert not list((folder / "backup").glob("*.tmp")) and not list((folder / "backup").glob(".*.tmp"))


@pytest.mark.slow  # runs the job in child processes
def test_negative_control_without_rng_state_the_comparison_fails(tmp_path: Path, reference_run: Any) -> None:
    reference = reference_run
    folder = tmp_path / "run"
    process = run_child(job, str(folder), crash=("after-rename", 8))
    process.join(60)
    assert process.exitcode == -signal.SIGKILL
    sabotaged = _finish(folder, sabotage="rng")
    with pytest.raises(AssertionError):
        assert_same_state(sabotaged, reference)


class _SaveAndCrash(fitkit.Callback):
    """Checkpoints at a chosen boundary (after every callback ran) and then 'crashes'."""

    def __init__(self, path: Path, step: int | None = None, epoch_end: int | None = None) -> None:
        self.path, self.step, self.epoch_end = path, step, epoch_end

    def _save_then_crash(self) -> None:
        self.trainer.save_checkpoint(self.path)
        raise RuntimeError("simulated crash")

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.step is not None and self.trainer.global_step == self.step:
            self.trainer.after_callbacks(self._save_then_crash)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.epoch_end is not None and epoch == self.epoch_end:
            self.trainer.after_callbacks(self._save_then_crash)


# 96 samples / batch 16 = 6 batches per epoch.
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("point", [{"step": 1}, {"step": 3}, {"step": 6}, {"epoch_end": 0}, {"step": 7}])
def test_resume_grid_is_exact(tmp_path: Path, workers: int, point: dict[str, int]) -> None:
    trainer, train, val = build(workers=workers)
    trainer.fit(train, val, epochs=2)
    reference = final_state(trainer)

    path = tmp_path / "ckpt.pt"
    trainer, train, val = build(workers=workers, callbacks=[_SaveAndCrash(path, **point)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(train, val, epochs=2)

    trainer, train, val = build(seed=99, workers=workers)  # another process's random state
    trainer.fit(train, val, epochs=2, resume=path)
    assert_same_state(final_state(trainer), reference)


def test_resume_mid_accumulation_group_is_exact(tmp_path: Path) -> None:
    trainer, train, val = build(accumulate=4)
    trainer.fit(train, val, epochs=2)
    reference = final_state(trainer)
    path = tmp_path / "ckpt.pt"

    class MidGroup(_SaveAndCrash):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.epoch == 0 and batch == 1:  # 2 of 4 batches accumulated
                self.trainer.after_callbacks(self._save_then_crash)

    trainer, train, val = build(accumulate=4, callbacks=[MidGroup(path)])
    with pytest.raises(RuntimeError):
        trainer.fit(train, val, epochs=2)
    assert checkpoint.load(path)["accumulation"]["grads"] is not None
    trainer, train, val = build(seed=5, accumulate=4)
    trainer.fit(train, val, epochs=2, resume=path)
    assert_same_state(final_state(trainer), reference)


def test_in_memory_path_resumes_exactly(tmp_path: Path) -> None:
    def run(callbacks: list[Any], seed: int = 0, resume: Any = None) -> fitkit.Trainer:
        trainer, train, _ = build(seed=seed, callbacks=callbacks)
        x, y = train.dataset.tensors
        trainer.fit((x, y), validation_split=0.25, batch_size=8, epochs=2, resume=resume)
        return trainer

    reference = final_state(run([]))
    path = tmp_path / "ckpt.pt"
    with pytest.raises(RuntimeError):
        run([_SaveAndCrash(path, step=5)])
    assert_same_state(final_state(run([], seed=3, resume=path)), reference)


def _sigterm_job(folder: str) -> None:
    marks = Path(folder) / "marks.txt"

    class Mark(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == 8:
                (Path(folder) / "running").touch()  # mid-epoch 1: the parent may send SIGTERM now
            time.sleep(0.02)

        def on_exception(self, exception: BaseException) -> None:
            marks.write_text(
                marks.read_text() + f"exception:{type(exception).__name__}\n"
                if marks.exists()
                else f"exception:{type(exception).__name__}\n"
            )

        def on_train_end(self, logs: Any = None) -> None:
            marks.write_text((marks.read_text() if marks.exists() else "") + "train_end\n")

    trainer, train, val = build(
        callbacks=[Mark(), ModelCheckpoint(Path(folder) / "ckpt" / "e{epoch}.pt", monitor=None)]
    )
    trainer.fit(train, val, epochs=3)


@pytest.mark.slow  # terminates a child process
def test_sigterm_stops_at_a_batch_boundary_saves_and_exits_143(tmp_path: Path) -> None:
    trainer, train, val = build()
    trainer.fit(train, val, epochs=3)
    reference = final_state(trainer)

    process = run_child(_sigterm_job, str(tmp_path))
    deadline = time.monotonic() + 30
    while not (tmp_path / "running").exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    process.terminate()  # SIGTERM, some time within a 20 ms batch
    started = time.perf_counter()
    process.join(10)
    assert process.exitcode == 143  # 128 + SIGTERM, as a shell reports it
    assert time.perf_counter() - started < 2.0
    marks = (tmp_path / "marks.txt").read_text().split()
    assert marks == ["exception:TrainingInterrupted", "train_end"]
    last = tmp_path / "ckpt" / "last.pt"
    state = checkpoint.load(last)
    assert 8 <= state["trainer"]["global_step"] < 18  # stopped at a batch boundary, well before the end

    trainer, train, val = build(seed=42)
    trainer.fit(train, val, epochs=3, resume=last)
    assert_same_state(final_state(trainer), reference)


def test_sigint_raises_keyboard_interrupt_after_saving(tmp_path: Path) -> None:
    class Interrupt(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == 4:
                signal.raise_signal(signal.SIGINT)

    backup = BackupAndRestore(tmp_path / "backup")
    trainer, train, val = build(callbacks=[Interrupt(), backup])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(train, val, epochs=2)
    state = checkpoint.load(backup.path)
    assert state["trainer"]["global_step"] == 4 and state["trainer"]["batch_in_epoch"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_backup_and_restore_resumes_the_same_script_and_cleans_up(tmp_path: Path) -> None:
    trainer, train, val = build()
    trainer.fit(train, val, epochs=2)
    reference = final_state(trainer)

    path_holder = BackupAndRestore(tmp_path / "b", save_freq=2)

    class Crash(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == 9:
                raise RuntimeError("power cut")

    trainer, train, val = build(callbacks=[path_holder, Crash()])
    with pytest.raises(RuntimeError):
        trainer.fit(train, val, epochs=2)
    assert path_holder.path.exists()
    restarted = BackupAndRestore(tmp_path / "b", save_freq=2)
    trainer, train, val = build(seed=1, callbacks=[restarted])
    trainer.fit(train, val, epochs=2)  # no resume= : the callback finds its backup
    assert_same_state(final_state(trainer), reference)
    assert not restarted.path.exists()  # deleted after a successful run, as Keras does


def test_seed_everything_gives_identical_histories() -> None:
    histories = []
    for _ in range(2):
        trainer, train, val = build(seed=7)
        histories.append(trainer.fit(train, val, epochs=2).history)
    assert histories[0] == histories[1]
    trainer, train, val = build(seed=8)
    assert trainer.fit(train, val, epochs=2).history != histories[0]


def test_seed_everything_deterministic_flag_and_validation() -> None:
    try:
        fitkit.seed_everything(3, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(ValueError, match="seed must be an int"):
        fitkit.seed_everything(-1)


def test_resuming_a_finished_run_warns_and_trains_nothing(tmp_path: Path) -> None:
    trainer, train, val = build()
    trainer.fit(train, val, epochs=1)
    trainer.save_checkpoint(tmp_path / "done.pt")
    trainer, train, val = build()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.warns(UserWarning, match="nothing to train"):
        trainer.fit(train, val, epochs=1, resume=tmp_path / "done.pt")
    assert trainer.global_step == 6
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # loaded
