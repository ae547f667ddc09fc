"""``debug_sync="error"`` with every built-in callback in its per-batch mode: no host read of a tensor value in
the batch loops except inside ``Trainer.allow_sync()``.

Runs on the CPU: CUDA's sync debug mode is faked (``helpers.FakeSyncMode``) and every ``torch.Tensor`` method
that reads a value back to the host is recorded while the faked mode is on. On a GPU each recorded read would
be a host-device synchronisation that ``debug_sync="error"`` turns into an error in the user's run.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FakeSyncMode, FakeTrainer, make_classification, make_trainer, pretend_cuda
from torch.utils.data import DataLoader, TensorDataset

from fitkit import callbacks
from fitkit.callbacks import (
    EMA,
    SWA,
    BackupAndRestore,
    Callback,
    CSVLogger,
    EarlyStopping,
    LambdaCallback,
    LearningRateScheduler,
    LRScheduler,
    MLflowLogger,
    ModelCheckpoint,
    OptunaPruning,
    PredictionWriter,
    Profiler,
    ProgressBar,
    ReduceLROnPlateau,
    SpikeDetection,
    TensorBoard,
    TerminateOnNaN,
    ThroughputMonitor,
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:  # ProgressBar then draws a tqdm bar
        return True


def _every_builtin_callback(tmp_path: Path, optimizer: torch.optim.Optimizer) -> list[Callback]:
    """Every built-in callback, with its per-batch options on (a write or a read on every batch)."""
    return [
        TerminateOnNaN(),
        ModelCheckpoint(tmp_path / "ckpt" / "{epoch}-{step}.pt", monitor="loss", save_freq=1, save_top_k=2),
        BackupAndRestore(tmp_path / "backup", save_freq=1, delete_checkpoint=False),
        TensorBoard(tmp_path / "tb", update_freq=1, histogram_freq=1, write_graph=True),
        LRScheduler(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9), interval="step"),
        LearningRateScheduler(lambda epoch, lr: lr),
        ReduceLROnPlateau(monitor="val_loss", patience=1),
        EarlyStopping(monitor="val_loss", patience=5),
        CSVLogger(tmp_path / "log.csv"),
        MLflowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", log_every_n_steps=1),
        EMA(decay=0.9),  # an update on every step
        SWA(swa_start_epoch=0, swa_lr=0.05),
        OptunaPruning(_optuna_trial()),
        ProgressBar(refresh_interval=1e-9, file=_Terminal()),  # a refresh (a read) on every batch
        ProgressBar(mode="epoch", log_every_seconds=1e-9, file=io.StringIO()),  # a line on every batch
        LambdaCallback(on_batch_end=lambda batch, logs: None),
        PredictionWriter(tmp_path / "predictions"),  # predict's callback: in fit it must cost nothing
        ThroughputMonitor(
            log_every_n_steps=1, tokens_per_sample=lambda batch: (batch[0] > 0).sum()
        ),  # a point per step
        SpikeDetection(
            window=2, warmup=2, threshold=1e3, check_every_n_steps=1
        ),  # a read of the kept losses on every step
        Profiler(tmp_path / "profile", wait=0, warmup=1, active=2),  # traced batches inside the loop
    ]


def _optuna_trial() -> Any:
    import optuna

    return optuna.create_study(pruner=optuna.pruners.NopPruner()).ask()


def _fit_under_recorder(tmp_path: Path, monkeypatch: Any, extra: tuple[Callback, ...] = ()) -> FakeSyncMode:
    sync = FakeSyncMode().install(monkeypatch, record_reads=True)
    x, y = make_classification(16, seed=1)
    train = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    val = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = make_trainer(metrics=["accuracy"], grad_clip_norm=1.0, debug_sync="error")
    trainer.callbacks.extend([*_every_builtin_callback(tmp_path, trainer.optimizer), *extra])
    pretend_cuda(trainer, monkeypatch)
    trainer.fit(train, val, epochs=2)
    assert trainer.state.global_step == 8
    assert sync.mode == 0  # restored after the loop
    return sync


def test_the_callbacks_here_are_every_builtin_one(tmp_path: Path):
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    used = _every_builtin_callback(tmp_path, optimizer)
    bases = {Callback, callbacks.MonitorCallback, callbacks.ExperimentLogger}
    builtin = {getattr(callbacks, name) for name in callbacks.__all__} - bases
    builtin.discard(callbacks.History)  # every fit has one: the Trainer adds it
    missing = {cls.__name__ for cls in builtin if not any(isinstance(cb, cls) for cb in used)}
    assert not missing, f"add these to _every_builtin_callback, with their per-batch options on: {sorted(missing)}"


@pytest.mark.filterwarnings("ignore:train_data. a CUDA run fed by a DataLoader")  # the CUDA device is pretended
def test_every_builtin_callback_marks_its_host_reads_with_allow_sync(tmp_path: Path, monkeypatch):
    sync = _fit_under_recorder(tmp_path, monkeypatch)
    assert sync.reads == [], "host reads inside the batch loop outside Trainer.allow_sync():\n" + "\n".join(sync.reads)


@pytest.mark.filterwarnings("ignore:train_data. a CUDA run fed by a DataLoader")
def test_the_recorder_catches_an_unmarked_read(tmp_path: Path, monkeypatch):
    class Careless(Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            float(logs["loss"])  # a host sync on every batch, not marked

    sync = _fit_under_recorder(tmp_path, monkeypatch, extra=(Careless(),))
    assert len(sync.reads) == 8 and all("test_sync_debug.py" in read for read in sync.reads), sync.reads


class _Fp16FakeTrainer(FakeTrainer):
    """fp16's GradScaler check, faked: ``last_step_skipped`` reads a device flag back to the host."""

    def __init__(self, sync: FakeSyncMode, **kwargs: Any) -> None:
        super().__init__(precision="fp16", **kwargs)
        self.sync = sync

    @property  # type: ignore[override]
    def last_step_skipped(self) -> bool:
        return bool(torch.tensor(False))

    @last_step_skipped.setter
    def last_step_skipped(self, value: bool) -> None:
        pass

    def allow_sync(self) -> Any:
        import contextlib

        @contextlib.contextmanager
        def allowed() -> Any:
            previous, self.sync.mode = self.sync.mode, 0
            try:
                yield
            finally:
                self.sync.mode = previous

        return allowed()


def test_a_per_step_schedule_under_fp16_marks_the_grad_scaler_read(monkeypatch):
    # fp16 needs a GPU, so the Trainer cannot run it here: drive the hook by hand in a faked debug window.
    sync = FakeSyncMode().install(monkeypatch, record_reads=True)
    trainer = _Fp16FakeTrainer(sync)
    scheduler = LRScheduler(torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1), interval="step")
    scheduler.set_trainer(trainer)  # type: ignore[arg-type]
    scheduler.on_train_begin()
    trainer.optimizer.step()  # as the Trainer steps before the hook (torch warns otherwise)
    sync.mode = "error"
    trainer.state.global_step = 1
    scheduler.on_batch_end(0, {})
    sync.mode = 0
    assert sync.reads == []
    assert scheduler.scheduler.last_epoch == 1
