"""Exact resume of the wider pipelines (issue 22): stateful iterable data, torchdata's StatefulDataLoader with
workers, random augmentation in workers through ``fitkit.data.seeded``, and the warnings of the inexact cases.

Each kill-and-resume test runs the job in a forked child that SIGKILLs itself mid-epoch right after its backup
of a chosen step is on disk (a real process death at a known batch), then runs the same job again, which
resumes from that backup, and compares its final state with an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from resume_utils import assert_same_state, final_state, make_data, make_model, run_child
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, get_worker_info

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import BackupAndRestore

N = 96  # samples; batches of 16: 6 per epoch
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Stream(IterableDataset):
    """A stream with a saved position: each epoch, a seeded order of the samples (split over the workers).
    ``reads`` counts the samples it produced in this process."""

    def __init__(self, noisy: bool = False) -> None:
        self.data = make_data(N)
        self.noisy = noisy
        self.epoch, self.position, self.loaded, self.reads = 0, 0, False, 0

    def set_epoch(self, epoch: int) -> None:  # fitkit calls it before each epoch
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.loaded = state["epoch"], state["position"], True

    def __iter__(self):  # type: ignore[no-untyped-def]
        start, self.loaded = (self.position if self.loaded else 0), False
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + self.epoch)).tolist()
        for i in range(start, N):
            if i % workers != worker:
                continue
            self.position, self.reads = i + 1, self.reads + 1
            x, y = self.data[order[i]]
            if self.noisy:  # the stream's own augmentation, a function of its position
                x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 * self.epoch + i))
            yield x, y


class Augmented(Dataset):
    """Random augmentation from the three global generators (torch, random, NumPy), as transforms draw."""

    def __init__(self) -> None:
        self.data = make_data(N)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[i]
        return x + 0.1 * torch.randn(x.shape) + 0.01 * random.random() + 0.01 * float(np.random.rand()), y


def _loader(kind: str, workers: int) -> Any:
    if kind == "stream":
        return DataLoader(Stream(), batch_size=16)
    if kind == "stateful-loader":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(Stream(noisy=True), batch_size=16, num_workers=workers)
    if kind == "seeded":
        return DataLoader(fitkit.data.seeded(Augmented()), batch_size=16, shuffle=True, num_workers=workers)
    if kind == "unseeded":
        return DataLoader(Augmented(), batch_size=16, shuffle=True, num_workers=workers)
    raise ValueError(kind)


def _job(folder: str, kind: str, workers: int = 0, kill_at: int | None = None, sabotage: bool = False) -> None:
    """Trains 3 epochs with a backup after every batch; SIGKILLs itself after the backup of step ``kill_at``.
    ``sabotage`` makes fitkit ignore the data's saved position (the negative control)."""
    if sabotage:
        from fitkit import _pipeline

        _pipeline.stateful_source = lambda loader: None  # type: ignore[assignment]

    class Die(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == kill_at:
                self.trainer.after_callbacks(lambda: os.kill(os.getpid(), signal.SIGKILL))

    fitkit.seed_everything(0)
    train = _loader(kind, workers)
    model = make_model()
    backup = BackupAndRestore(Path(folder) / "backup", save_freq=1, delete_checkpoint=False)
    trainer = fitkit.Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), "cross_entropy",
                             callbacks=[backup, Die()], verbose=0)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(train, epochs=3)
    reads = getattr(train.dataset, "reads", None)
    result = {**final_state(trainer), "reads": reads, "warnings": [str(w.message) for w in caught]}
    checkpoint.atomic_save(result, Path(folder) / "final.pt")


def _run(folder: Path, kind: str, **kwargs: Any) -> dict[str, Any]:
    process = run_child(_job, str(folder), kind, **kwargs)
    process.join(120)
    assert process.exitcode == 0, process.exitcode
    return checkpoint.load(folder / "final.pt")


def _killed_and_resumed(folder: Path, kind: str, kill_at: int, **kwargs: Any) -> dict[str, Any]:
    process = run_child(_job, str(folder), kind, kill_at=kill_at, **kwargs)
    process.join(120)
    assert process.exitcode == -signal.SIGKILL, process.exitcode  # died mid-epoch, after that step's backup
    assert checkpoint.load(folder / "backup" / "backup.pt")["trainer"]["batch_in_epoch"] == kill_at % 6
    return _run(folder, kind, **kwargs)


# -- stateful iterable data -------------------------------------------------------------------------------
@pytest.mark.slow  # kills a child process
def test_a_stateful_iterable_dataset_resumes_mid_epoch_bit_for_bit_without_re_reading(tmp_path: Path) -> None:
    reference = _run(tmp_path / "whole", "stream")
    resumed = _killed_and_resumed(tmp_path / "killed", "stream", kill_at=8)  # epoch 1, 2 of 6 batches done
    assert_same_state(resumed, reference)
    assert resumed["reads"] == 3 * N - 8 * 16  # the resumed process read only what was left: nothing skipped
    assert not [w for w in resumed["warnings"] if "re-reading" in w]


@pytest.mark.slow  # kills a child process
def test_negative_control_without_its_saved_position_the_stream_re_reads(tmp_path: Path) -> None:
    resumed = _killed_and_resumed(tmp_path / "killed", "stream", kill_at=8, sabotage=True)
    assert resumed["reads"] == 3 * N - 6 * 16  # the 2 done batches of epoch 1 were read again
    assert any("re-reading 2 batches" in w and "StatefulDataLoader" in w for w in resumed["warnings"])


@pytest.mark.slow  # kills a child process; DataLoader workers
def test_a_stateful_dataloader_with_two_workers_resumes_mid_epoch_bit_for_bit(tmp_path: Path) -> None:
    pytest.importorskip("torchdata.stateful_dataloader")
    reference = _run(tmp_path / "whole", "stateful-loader", workers=2)
    resumed = _killed_and_resumed(tmp_path / "killed", "stateful-loader", kill_at=9, workers=2)
    assert_same_state(resumed, reference)
    assert not [w for w in resumed["warnings"] if "re-reading" in w]  # restored from its state, not re-read
    # The negative control: without the loader's state, fitkit re-reads the 3 done batches (and says so).
    sabotaged = _killed_and_resumed(tmp_path / "sabotaged", "stateful-loader", kill_at=9, workers=2, sabotage=True)
    assert any("re-reading 3 batches" in w for w in sabotaged["warnings"])


def test_a_stream_without_state_warns_how_to_make_its_resume_exact(tmp_path: Path) -> None:
    class Plain(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(make_data(N))

    def fit(callbacks: list[Any], resume: Any = None) -> fitkit.Trainer:
        fitkit.seed_everything(0)
        model = make_model()
        trainer = fitkit.Trainer(model, "adam", "cross_entropy", callbacks=callbacks, verbose=0)
        trainer.fit(DataLoader(Plain(), batch_size=16), epochs=1, resume=resume)
        return trainer

    class SaveAt3(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == 3:
                self.trainer.after_callbacks(lambda: self.trainer.save_checkpoint(tmp_path / "c.pt"))

    fit([SaveAt3()])
    with pytest.warns(
        UserWarning, match=r"re-reading 3 batches .* state_dict\(\)/load_state_dict\(\) .*StatefulDataLoader"
    ):
        fit([], resume=tmp_path / "c.pt")


# -- random augmentation in workers ---------------------------------------------------------------------
@pytest.mark.slow  # DataLoader workers in child processes
def test_seeded_augmentation_gives_the_same_run_for_0_1_and_2_workers_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    runs = [_run(tmp_path / f"w{workers}", "seeded", workers=workers) for workers in (0, 1, 2)]
    assert_same_state(runs[1], runs[0])
    assert_same_state(runs[2], runs[0])
    resumed = _killed_and_resumed(tmp_path / "killed", "seeded", kill_at=9, workers=2)
    assert_same_state(resumed, runs[0])
    assert not [w for w in resumed["warnings"] if "seeded" in w]


@pytest.mark.slow  # DataLoader workers in child processes
def test_negative_control_unseeded_augmentation_in_workers_resumes_inexactly_and_says_so(tmp_path: Path) -> None:
    reference = _run(tmp_path / "whole", "unseeded", workers=2)
    assert any("fitkit.data.seeded(dataset)" in w for w in reference["warnings"])  # warned at its checkpoints
    assert sum("fitkit.data.seeded(dataset)" in w for w in reference["warnings"]) == 1  # once
    resumed = _killed_and_resumed(tmp_path / "killed", "unseeded", kill_at=9, workers=2)
    with pytest.raises(AssertionError):
        assert_same_state(resumed, reference)


@pytest.mark.slow  # DataLoader workers
@pytest.mark.parametrize("dataset", ["plain", "seeded"])
def test_workers_without_randomness_or_seeded_ones_do_not_warn(tmp_path: Path, dataset: str) -> None:
    data: Any = make_data(N) if dataset == "plain" else fitkit.data.seeded(Augmented())
    fitkit.seed_everything(0)
    trainer = fitkit.Trainer(make_model(), "adam", "cross_entropy", verbose=0,
                             callbacks=[BackupAndRestore(tmp_path / "b", save_freq=1)])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DataLoader(data, batch_size=8, shuffle=True, num_workers=2), epochs=1)
    assert not [w for w in caught if "seeded" in str(w.message)]


def test_seeded_draws_depend_on_seed_epoch_and_index_only_and_leave_the_main_streams_alone() -> None:
    data = fitkit.data.seeded(Augmented(), seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = data[5][0]
    assert torch.equal(torch.get_rng_state(), before)  # the main process's stream did not move
    assert torch.equal(data[5][0], first) and not torch.equal(data[6][0], first)
    data.set_epoch(1)
    assert not torch.equal(data[5][0], first)
    data.set_epoch(0)
    assert torch.equal(data[5][0], first)
    assert not torch.equal(fitkit.data.seeded(Augmented(), seed=4)[5][0], first)
    with pytest.raises(TypeError, match="map-style dataset"):
        fitkit.data.seeded(Stream())
    with pytest.raises(ValueError, match="seed must be an int"):
        fitkit.data.seeded(TensorDataset(torch.zeros(2)), seed=-1)


@pytest.mark.slow  # three training processes, one of them killed
def test_the_streaming_shards_example_is_killed_mid_epoch_and_resumes_bit_for_bit() -> None:
    pytest.importorskip("torchdata.stateful_dataloader")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "streaming_shards.py")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "killed the run (SIGKILL) after step" in done.stdout and "epoch 1, batch" in done.stdout
    assert "identical to the uninterrupted one, bit for bit: True" in done.stdout


@pytest.mark.slow  # DataLoader workers
@pytest.mark.parametrize("workers", [0, 2])
def test_a_stateful_dataloader_over_map_style_data_resumes_from_its_own_state(tmp_path: Path, workers: int) -> None:
    # Its workers are fed otherwise than a DataLoader's: a replay of the indices through a DataLoader was not exact.
    stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
    from resume_utils import build

    def run(callbacks: list[Any], seed: int = 0, resume: Any = None) -> dict[str, Any]:
        trainer, train, val = build(seed=seed, callbacks=callbacks)
        loader = stateful_dataloader.StatefulDataLoader(train.dataset, batch_size=16, shuffle=True, num_workers=workers)
        trainer.fit(loader, val, epochs=2, resume=resume)
        return final_state(trainer)

    class SaveAndCrash(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == 8:
                self.trainer.after_callbacks(self.save_and_crash)

        def save_and_crash(self) -> None:
            self.trainer.save_checkpoint(tmp_path / "c.pt")
            raise RuntimeError("simulated crash")

    reference = run([])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run([SaveAndCrash()])
    assert_same_state(run([], seed=5, resume=tmp_path / "c.pt"), reference)


@pytest.mark.slow  # DataLoader workers
def test_seeded_persistent_workers_follow_the_epoch_fitkit_sets() -> None:
    # The epoch lives in shared memory: workers that persist across epochs see set_epoch too.
    data = fitkit.data.seeded(Augmented(), seed=0)

    def epochs(**options: Any) -> list[torch.Tensor]:
        loader = DataLoader(data, batch_size=16, **options)
        out = []
        for epoch in range(2):
            data.set_epoch(epoch)
            out.append(torch.cat([x for x, _ in loader]))
        return out

    main, persistent = epochs(), epochs(num_workers=2, persistent_workers=True)
    assert torch.equal(main[0], persistent[0]) and torch.equal(main[1], persistent[1])
    assert not torch.equal(main[0], main[1])
