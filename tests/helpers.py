"""Small shared pieces for the tests: tiny seeded data and models, a recording callback.

Additive: add helpers, do not change the behaviour of existing ones (other test files use them).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import fitkit._pipeline
from fitkit import Callback, Trainer
from fitkit.callbacks.base import HOOKS


def make_classification(
    n: int = 12, features: int = 4, classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of a linearly separable-ish toy task; drawn from a private generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w).argmax(dim=1)
    return x, y


class TinyNet(nn.Module):
    """Linear -> ReLU -> (Dropout) -> Linear; records (training, grad enabled) at every forward."""

    def __init__(self, features: int = 4, classes: int = 3, hidden: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc2 = nn.Linear(hidden, classes)
        self.forward_calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_calls.append((self.training, torch.is_grad_enabled()))
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def make_trainer(model: nn.Module | None = None, *, lr: float = 0.1, **kwargs: Any) -> Trainer:
    """A silent CPU Trainer with SGD and cross-entropy unless told otherwise."""
    model = TinyNet() if model is None else model
    kwargs.setdefault("optimizer", torch.optim.SGD(model.parameters(), lr=lr))
    kwargs.setdefault("loss", "cross_entropy")
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("verbose", 0)
    return Trainer(model, **kwargs)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@dataclass
class HookCall:
    name: str
    args: tuple[Any, ...]
    training: bool  # model.training when the hook ran
    grad_enabled: bool  # torch.is_grad_enabled() when the hook ran


def _recording_hook(name: str):  # type: ignore[no-untyped-def]
    def hook(self: RecordingCallback, *args: Any) -> None:
        # Snapshot dicts: the trainer may keep adding keys to the logs after this hook returns.
        copied = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        self.calls.append(HookCall(name, copied, self.trainer.model.training, torch.is_grad_enabled()))

    hook.__name__ = name
    return hook


class RecordingCallback(Callback):
    """Records every hook call (name, arguments, model mode, grad mode) in ``calls``."""

    def __init__(self) -> None:
        self.calls: list[HookCall] = []

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def of(self, name: str) -> list[HookCall]:
        return [c for c in self.calls if c.name == name]


for _name in HOOKS:
    setattr(RecordingCallback, _name, _recording_hook(_name))


class CountingDataset(Dataset):
    """(x[i], y[i]) pairs that count ``__getitem__`` calls."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.calls = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.x[i], self.y[i]


class FakeTrainer:
    """Just enough of a Trainer to drive callback hooks by hand, without a training loop.

    Holds a real tiny model and SGD optimizer (so callbacks can copy weights and set learning rates), a
    real ``TrainerState``, and every member of ``TrainerLike`` (fitkit/callbacks/_contract.py, what a callback
    may use) with the value a single-process CPU fit would give it; test_callback_contract.py checks that
    none is missing. Bind it with ``callback.set_trainer(fake)``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        lr: float = 0.1,
        metrics: list[Any] | None = None,
        weighted_metrics: list[Any] | None = None,
        has_validation: bool = True,
        precision: str = "32",
        num_train_batches: int | None = 4,
        epochs_planned: int = 10,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        from fitkit.callbacks.history import History
        from fitkit.distributed import DistInfo
        from fitkit.metrics import get_metric
        from fitkit.state import TrainerState

        self.model = model if model is not None else nn.Linear(3, 2)
        optimizer = optimizer if optimizer is not None else torch.optim.SGD(self.model.parameters(), lr=lr)
        self.optimizers: dict[str, torch.optim.Optimizer] = {"optimizer": optimizer}
        self.metrics = [get_metric(m) for m in (metrics or [])]
        self.weighted_metrics = [get_metric(m) for m in (weighted_metrics or [])]
        self.state = TrainerState()
        self.history = History()
        # How it trains, the processes.
        self.device = torch.device("cpu")
        self.precision = precision
        self.strategy = "none"
        self.shards_parameters = False
        self.accumulate_grad_batches = 1
        self.grad_clip_norm: float | None = None
        self.grad_clip_value: float | None = None
        self.compile = False
        self.dist = DistInfo()
        self.is_global_zero = True
        self.world_size = 1
        self.last_step_skipped = False
        # The current fit.
        self.train_loader: Any = None
        self.num_train_batches = num_train_batches
        self.epochs_planned = epochs_planned
        self.steps_planned: int | None = None if num_train_batches is None else epochs_planned * num_train_batches
        self.has_validation = has_validation
        self.validate_every_n_steps: int | None = None
        self.num_val_batches: dict[str | None, int | None] = {None: None} if has_validation else {}  # length unknown
        self.validation_set: str | None = None
        self.resumed_from: Path | None = None
        self.predicting_sharded = False
        self.active_callbacks: list[Callback] = []
        self.batch: Any = None
        self.outputs: Any = None
        self.loop_times: Any = None  # a fit's LoopTimes when a callback wants them (fitkit/_loop_times.py)
        # What the fake records: actions queued with after_callbacks, paths given to save_checkpoint.
        self.deferred: list[Any] = []
        self.saved: list[Path] = []

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return next(iter(self.optimizers.values()))

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizers = {"optimizer": optimizer}

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def stop_training(self) -> bool:
        return self.state.should_stop

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self.state.should_stop = bool(value)

    def stop(self, reason: str) -> None:
        self.state.should_stop, self.state.stop_reason = True, reason

    def after_callbacks(self, action: Any) -> None:
        self.deferred.append(action)

    def running_logs(self) -> dict[str, float]:
        return {"loss": 0.5}

    def allow_sync(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def model_state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def save_checkpoint(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Records the path (writes nothing: a callback's file logic is tested with a real Trainer)."""
        self.saved.append(Path(path))
        return Path(path)

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]


def drive_epochs(
    callback: Callback, values: list[float | None], key: str = "val_loss", trainer: FakeTrainer | None = None
) -> tuple[FakeTrainer, int | None]:
    """Binds ``callback`` to a FakeTrainer and calls ``on_epoch_end`` with ``{key: value}`` per epoch (None:
    an epoch without the key, as validation_freq makes), stopping when the callback stops training.

    Returns the trainer and the 0-based epoch at which training stopped (None: it ran all epochs).
    """
    trainer = trainer if trainer is not None else FakeTrainer()
    callback.set_trainer(trainer)
    callback.on_train_begin({})
    stopped = None
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {"loss": 1.0} if value is None else {"loss": 1.0, key: value})
        if trainer.stop_training:
            stopped = epoch
            break
    callback.on_train_end({})
    return trainer, stopped


class UnsizedBatches:
    """Re-iterable ``(x, y)`` batches without ``__len__``: the trainer cannot know where an epoch ends, so
    the last, shorter accumulation group steps after the epoch's last ``on_batch_end``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):  # type: ignore[no-untyped-def]
        for start in range(0, len(self.x), self.batch_size):
            yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]


# -- torch's CUDA sync debug mode, faked on the CPU --------------------------------------------------------
class FakeSyncMode:
    """Stands in for ``torch.cuda``'s sync debug mode on the CPU and records what CUDA would flag.

    ``install(monkeypatch)`` puts ``get``/``set`` in place of ``torch.cuda.get_sync_debug_mode`` /
    ``set_sync_debug_mode``; ``mode`` is then the mode in force (0 outside the Trainer's debug window and
    inside ``allow_sync()``). With ``record_reads=True`` it also wraps the ``torch.Tensor`` methods that read
    a value back to the host (``item``, ``tolist``, ``numpy``, ``cpu``, ``float()``, ``int()``, ``bool()``,
    ``index()``) and appends to ``reads`` each one made while the mode is not 0, naming the first caller
    outside torch: on a GPU, each is a host-device synchronisation ``debug_sync`` would report. Reads made
    by ``torch.utils.data`` are not recorded: the data pipeline works on host tensors.
    """

    _READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self) -> None:
        self.mode: int | str = 0
        self.seen: list[tuple[str, int | str]] = []
        self.reads: list[str] = []

    def get(self) -> int | str:
        return self.mode

    def set(self, mode: int | str) -> None:
        self.mode = mode

    def install(self, monkeypatch: Any, record_reads: bool = False) -> FakeSyncMode:
        monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", self.get)
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", self.set)
        if record_reads:
            for name in self._READS:
                monkeypatch.setattr(torch.Tensor, name, self._recording(name, getattr(torch.Tensor, name)))
        return self

    def _recording(self, name: str, method: Any) -> Any:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            # The data pipeline (samplers, worker seeds, collation) reads host tensors: never a sync on a GPU.
            if self.mode != 0 and not sys._getframe(1).f_code.co_filename.startswith(_TORCH_DATA_DIR):
                self.reads.append(f"Tensor.{name} in {_first_caller_outside_torch()}")
            return method(tensor, *args, **kwargs)

        return read


_TORCH_DIR = os.path.dirname(torch.__file__)
_TORCH_DATA_DIR = os.path.join(_TORCH_DIR, "utils", "data")


def _first_caller_outside_torch() -> str:
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return "torch"
    return f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno} ({frame.f_code.co_name})"


def pretend_cuda(trainer: Trainer, monkeypatch: Any) -> Trainer:
    """Makes ``trainer`` take its CUDA code paths for the debug window while the model and the data stay on
    the CPU: the device says "cuda" and batches are not moved. Pass DataLoaders (the in-memory path would ask
    CUDA how much memory is free)."""
    trainer.device = torch.device("cuda")

    monkeypatch.setattr(fitkit._pipeline, "move_to_device", lambda batch, device, non_blocking=False: batch)
    return trainer
