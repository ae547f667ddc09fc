"""The Trainer and its loop: ``fit -> _run_epoch -> train_step``, top to bottom in this file.

The data path: batch -> ``_to_device`` -> ``train_step`` (forward, loss, backward, maybe an optimizer
step) -> ``_Tracker`` (sums stay on the device) -> per-batch hooks -> epoch logs (one host sync) ->
``on_epoch_end`` hooks -> deferred checkpoint writes.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from fitkit import distributed, rng
from fitkit.callbacks.base import HOOKS, Callback, Logs, check_hook_names, overrides
from fitkit.callbacks.history import History
from fitkit.callbacks.progress import ProgressBar
from fitkit.data import (
    InMemoryLoader,
    batch_size_of,
    check_reiterable,
    is_map_style,
    move_to_device,
    resume_loader_iterator,
    split_batch,
    to_tensor,
)
from fitkit.metrics import Metric, get_metric
from fitkit.state import TrainerState

_PRECISIONS = {
    "32": "32",
    32: "32",
    "fp32": "32",
    "32-true": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "fp16": "fp16",
    "16": "fp16",
    16: "fp16",
    "16-mixed": "fp16",
}

_LOSSES: dict[str, Callable[[], Callable[..., torch.Tensor]]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "categorical_crossentropy": nn.CrossEntropyLoss,
    "sparse_categorical_crossentropy": nn.CrossEntropyLoss,
    "nll": nn.NLLLoss,
    "mse": nn.MSELoss,
    "mean_squared_error": nn.MSELoss,
    "mae": nn.L1Loss,
    "l1": nn.L1Loss,
    "mean_absolute_error": nn.L1Loss,
    "huber": nn.HuberLoss,
    "smooth_l1": nn.SmoothL1Loss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
    "binary_crossentropy_with_logits": nn.BCEWithLogitsLoss,
}

# Keras's default learning rates for the same optimizers.
_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], float]] = {
    "adam": (torch.optim.Adam, 1e-3),
    "adamw": (torch.optim.AdamW, 1e-3),
    "sgd": (torch.optim.SGD, 1e-2),
    "rmsprop": (torch.optim.RMSprop, 1e-3),
    "adagrad": (torch.optim.Adagrad, 1e-3),
}


class TrainingInterrupted(Exception):
    """Raised inside ``fit`` at the batch boundary after SIGINT or SIGTERM arrived.

    Checkpoint callbacks see it in ``on_exception``: the state is consistent (a batch boundary), so it is
    safe to save. ``fit`` turns it into ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(128 + signum)``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"training interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class _Tracker:
    """Sample-weighted sums of step logs and the metrics, kept on the device until ``compute``.

    ``add`` appends each step's tensors to a list rather than adding them to the float64 sums one by
    one: that mixed-precision ``add_`` per step was the largest single cost the loop added to a small
    model's step (~8 us on a CPU; ``benchmarks/README.md``). A run of steps with one batch size goes
    into the sums in one stacked float64 reduction per key, every ``FOLD`` steps, when the batch size
    changes, and before the sums are read; so a logged tensor must not be modified in place after the
    step returned it.
    """

    FOLD = 256

    def __init__(self, metrics: Sequence[Metric]) -> None:
        self.metrics = list(metrics)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self._pending: dict[str, list[torch.Tensor]] = {}  # step values not yet in the sums
        self._pending_n = 0  # the batch size of every pending step
        self._pending_steps = 0

    def reset(self) -> None:
        self.sums, self.count = {}, 0
        self._pending, self._pending_n, self._pending_steps = {}, 0, 0
        for metric in self.metrics:
            metric.reset()

    def add(self, step_logs: dict[str, Any], n: int) -> None:
        if n != self._pending_n or self._pending_steps == self.FOLD:
            self._fold()
            self._pending_n = n
        pending = self._pending
        for key, value in step_logs.items():
            if isinstance(value, torch.Tensor):
                values = pending.get(key)
                if values is None:
                    pending[key] = values = []
                values.append(value.detach() if value.requires_grad else value)
        self._pending_steps += 1
        self.count += n

    def _fold(self) -> None:
        """Adds the pending steps to the sums, in float64 (float32 on MPS)."""
        if not self._pending_steps:
            return
        for key, values in self._pending.items():
            total = self.sums.get(key)
            if total is None:
                dtype = torch.float32 if values[0].device.type == "mps" else torch.float64
                self.sums[key] = total = torch.zeros((), dtype=dtype, device=values[0].device)
            if len(values) == 1:
                total.add_(values[0], alpha=self._pending_n)
            else:
                total.add_(torch.stack(values).sum(dtype=total.dtype), alpha=self._pending_n)
        self._pending, self._pending_steps = {}, 0

    def compute(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """One host sync for everything (and one all-reduce, in a distributed run)."""
        self._fold()
        keys = list(self.sums)
        parts = [self.sums[k].double().cpu().reshape(1) for k in keys]
        sync_metrics = [m for m in self.metrics if m.sync_state()]
        for metric in sync_metrics:
            parts.extend(s.double().cpu().reshape(1) for s in metric.sync_state())
        values = torch.cat(parts + [torch.tensor([float(self.count)], dtype=torch.float64)])
        if reduce is not None:
            values = reduce(values)
        flat = values.tolist()  # the host sync
        count = flat[-1]
        logs = {k: (flat[i] / count if count else float("nan")) for i, k in enumerate(keys)}
        offset = len(keys)
        for metric in sync_metrics:
            n_state = len(metric.sync_state())
            metric.load_sync_state([torch.tensor(v, dtype=torch.float64) for v in flat[offset : offset + n_state]])
            offset += n_state
        for metric in self.metrics:
            logs[metric.name] = float(metric.compute())
        return logs

    def state_dict(self) -> dict[str, Any]:
        self._fold()
        return {
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
            "count": self.count,
            "metrics": [m.state_dict() for m in self.metrics],
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = int(state["count"])
        self._pending, self._pending_n, self._pending_steps = {}, 0, 0
        for metric, metric_state in zip(self.metrics, state["metrics"]):
            metric.load_state_dict(metric_state, device)


class _HookTimer:
    """Finds a callback that slows training down, as Keras 2 did, at next to no cost.

    Wraps the per-batch training hooks (``on_batch_begin``/``on_batch_end``) in timers for the first
    ``STOP`` batches of a fit's first epoch, times each callback's hooks and the whole batch (hooks
    included) on batches ``FIRST`` to ``STOP - 1`` (the first ones warm up caches and allocators), then
    puts the plain hooks back in the same lists and warns, once per Trainer, naming a callback that
    takes ``SHARE`` of the batch time or more. Other batches call the plain hooks; a run with no
    per-batch hooks never builds one.
    """

    FIRST, STOP = 5, 25
    SHARE = 0.25  # of the batch time, hooks included: the callback slows training by 1/(1 - SHARE) or more
    MIN_SECONDS = 50e-6  # per batch: below this a share is timer noise on tiny steps

    def __init__(self, trainer: Trainer, hooks: dict[str, list[Callable[..., Any]]]) -> None:
        self.trainer = trainer
        self.lists = [hooks["on_batch_begin"], hooks["on_batch_end"]]
        self.originals = [list(hook_list) for hook_list in self.lists]
        names = {id(cb): name for name, cb in trainer._callback_keys()}
        self.spent: dict[str, list[float]] = {}  # callback name -> seconds in each timed batch
        self.hook_names: dict[str, list[str]] = {}
        self.marks: list[float] = []  # the clock at the start of batches FIRST..STOP
        clock_set = False
        for hook_name, hook_list in zip(("on_batch_begin", "on_batch_end"), self.lists):
            for i, fn in enumerate(hook_list):
                owner = getattr(fn, "__self__", fn)
                name = names.get(id(owner), type(owner).__name__)
                self.spent.setdefault(name, [0.0] * (self.STOP - self.FIRST))
                self.hook_names.setdefault(name, []).append(hook_name)
                hook_list[i] = self._wrap(fn, name, is_clock=not clock_set)
                clock_set = True

    def _wrap(self, fn: Callable[..., Any], name: str, is_clock: bool) -> Callable[..., Any]:
        spent = self.spent[name]
        first, stop = self.FIRST, self.STOP

        def timed(batch: int, logs: Logs | None = None) -> None:
            if is_clock and first <= batch <= stop:
                self.marks.append(time.perf_counter())
                if batch == stop:
                    self._finish()
            if not first <= batch < stop:
                if batch > stop:  # resumed past the window: nothing to measure
                    self._restore()
                fn(batch, logs)
                return
            start = time.perf_counter()
            fn(batch, logs)
            spent[batch - first] += time.perf_counter() - start

        return timed

    def _restore(self) -> None:
        for hook_list, original in zip(self.lists, self.originals):
            hook_list[:] = original

    def _finish(self) -> None:
        self._restore()
        if len(self.marks) != self.STOP - self.FIRST + 1:  # a resumed epoch started inside the window
            return
        self.trainer._hooks_timed = True
        periods = [b - a for a, b in zip(self.marks, self.marks[1:])]
        batch_time = sorted(periods)[len(periods) // 2]  # medians: a preemption spoils one batch, not all
        name, seconds = max(
            ((name, sorted(times)[len(times) // 2]) for name, times in self.spent.items()), key=lambda item: item[1]
        )
        share = seconds / batch_time if batch_time > 0 else 0.0
        if share >= self.SHARE and seconds >= self.MIN_SECONDS:
            hooks = "/".join(dict.fromkeys(self.hook_names[name]))
            warnings.warn(
                f"callback {name} is slow: its {hooks} takes {seconds * 1e3:.3g} ms per training batch, "
                f"{min(share, 1.0):.0%} of the {batch_time * 1e3:.3g} ms each batch takes (medians over batches "
                f"{self.FIRST}-{self.STOP - 1}). Do its work less often (every N batches, or in on_epoch_end), "
                "and avoid reading tensor values per batch (.item(), float(), .tolist()): that waits for the "
                "device.",
                stacklevel=5,
            )


class Trainer:
    """Trains a ``torch.nn.Module`` with Keras's ``fit`` / ``evaluate`` / ``predict``.

    Args:
        model: any ``torch.nn.Module``; moved to ``device`` when the Trainer is built.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, or a name (``"adam"``,
            ``"adamw"``, ``"sgd"``, ``"rmsprop"``, ``"adagrad"``) built with Keras's default learning rate.
        loss: a callable ``(outputs, targets) -> 0-dim tensor`` (an ``nn.Module`` loss included) or a name
            (``"cross_entropy"``, ``"mse"``, ``"mae"``, ``"huber"``, ``"bce_with_logits"``, ``"nll"``, ...).
        metrics: metric names, ``fitkit.metrics.Metric`` objects, ``torchmetrics`` metrics or functions
            ``(outputs, targets) -> 0-dim tensor``; logged as ``<name>`` and ``val_<name>``.
        callbacks: ``fitkit.Callback`` objects, run in list order; a ``History`` (and, with ``verbose``, a
            ``ProgressBar``) are added after them.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
        precision: ``"32"`` (default), ``"bf16"`` (bfloat16 autocast, CUDA and CPU) or ``"fp16"`` (float16
            autocast with a GradScaler; CUDA and MPS).
        grad_clip_norm: clip the global gradient norm to this value (after unscaling); None: off.
        grad_clip_value: clip each gradient element to ``[-value, value]`` (after unscaling); None: off.
        accumulate_grad_batches: batches whose gradients are summed before each optimizer step; the update
            equals one step on a batch that many times larger (sample-weighted, also for a shorter last group).
        verbose: 0 silent, 1 a progress bar (a line per epoch off a terminal), 2 a line per epoch.
        compile: wrap the model's forward with ``torch.compile`` (checkpoints keep the plain module's keys).
        channels_last: use the channels-last memory format for the model and 4-D inputs.
        strategy: ``"auto"`` (DDP when launched by torchrun with several processes), ``"ddp"``, ``"fsdp"``
            or ``"none"``.
        debug_sync: on CUDA, make torch warn at every host-device synchronisation in the batch loops
            (training and validation), to find the ones your own code adds; ``"error"`` raises instead.
            fitkit's deliberate syncs (epoch logs, progress refreshes, checkpoint writes, fp16's GradScaler
            check) are not flagged; mark your own with :meth:`allow_sync`. No effect on other devices.
        handle_signals: on SIGINT/SIGTERM, stop at the next batch boundary, let checkpoint callbacks save,
            then exit with the conventional status (KeyboardInterrupt / exit code 143).
        process_group_timeout: seconds a collective waits before failing, when fitkit starts the process group.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | str,
        loss: Callable[[Any, Any], torch.Tensor] | str,
        metrics: Sequence[Any] | None = None,
        callbacks: Sequence[Callback] | None = None,
        *,
        device: str | torch.device = "auto",
        precision: str | int = "32",
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        accumulate_grad_batches: int = 1,
        verbose: int = 1,
        compile: bool = False,
        channels_last: bool = False,
        strategy: str = "auto",
        debug_sync: bool | str = False,
        handle_signals: bool = True,
        process_group_timeout: float = 1800.0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.device = _resolve_device(device)
        self.precision = _resolve_precision(precision, self.device)
        self.grad_clip_norm = _positive_or_none(grad_clip_norm, "grad_clip_norm")
        self.grad_clip_value = _positive_or_none(grad_clip_value, "grad_clip_value")
        if (
            not isinstance(accumulate_grad_batches, int)
            or isinstance(accumulate_grad_batches, bool)
            or accumulate_grad_batches < 1
        ):
            raise ValueError(
                f"accumulate_grad_batches must be an int >= 1 (batches per optimizer step), "
                f"got {accumulate_grad_batches!r}"
            )
        self.accumulate_grad_batches = accumulate_grad_batches
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0 (silent), 1 (progress bar) or 2 (one line per epoch), got {verbose!r}")
        self.verbose = verbose
        if debug_sync not in (False, True, "warn", "error"):
            raise ValueError(
                f"debug_sync must be False (off), True or 'warn' (torch warns at every host-device "
                f"synchronisation in the batch loop on CUDA) or 'error' (raises there instead), got "
                f"{debug_sync!r}"
            )
        self.debug_sync = debug_sync
        self.handle_signals = handle_signals

        self.strategy = distributed.resolve_strategy(strategy)
        self._dist = distributed.setup(self.strategy, self.device, process_group_timeout)
        if self._dist.device is not None:
            self.device = self._dist.device

        self.model = model.to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.optimizer = _resolve_optimizer(optimizer, self.model)
        _check_optimizer_holds_model(self.optimizer, self.model)
        self.loss = _resolve_loss(loss)

        metric_list = [get_metric(m) for m in (metrics or [])]
        names = [m.name for m in metric_list]
        if len(set(names)) != len(names) or "loss" in names:
            raise ValueError(f"metric names must be unique and not 'loss', got {names}; pass name= to tell them apart")
        self.metrics = metric_list
        self._val_metrics = [copy.deepcopy(m) for m in metric_list]
        self._train_tracker = _Tracker(self.metrics)
        self._eval_tracker = _Tracker(self._val_metrics)
        self._metrics_in_use: list[Metric] = self.metrics

        self.callbacks: list[Callback] = []
        for callback in callbacks or []:
            if not isinstance(callback, Callback):
                raise TypeError(
                    f"callbacks must be fitkit.Callback instances, got {type(callback).__name__}; "
                    "subclass fitkit.Callback or use fitkit.callbacks.LambdaCallback"
                )
            check_hook_names(callback)
            self.callbacks.append(callback)

        # The module that runs forward passes in training: compiled and/or wrapped for DDP.
        self._train_module: nn.Module = distributed.wrap_model(self.model, self.strategy, self._dist, self.optimizer)
        self._eval_module: nn.Module = self.model
        if compile:
            self._train_module = torch.compile(self._train_module)
            self._eval_module = (
                torch.compile(self.model) if self._train_module is not self.model else self._train_module
            )
        self.compile = compile

        self._autocast_dtype = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self._scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self._non_blocking = False

        self.state = TrainerState()
        self.history = History()
        self.epochs_planned = 0
        self.has_validation = False
        self.num_train_batches: int | None = None
        self._deferred: list[Callable[[], None]] = []
        self._interrupt_signum: int | None = None
        self._grads_pending = False
        self._group_units = 0.0
        self._group_first_n = 0
        self._step_now = True
        self._last_scale: torch.Tensor | None = None
        self._epoch_rng: dict[str, Any] | None = None
        self._train_loader: Any = None
        self._active: list[Callback] = []
        self._hooks_timed = False  # set once _HookTimer has measured this trainer's per-batch hooks
        self._sync_debug_on = False  # inside a debug_sync window (see _sync_checked)
        self._hooks: dict[str, list[Callable[..., Any]]] = {name: [] for name in HOOKS}

    # -- public handles -------------------------------------------------------------------------
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
        """Ends training after the current batch (and the epoch's end hooks), recording why."""
        self.state.should_stop = True
        self.state.stop_reason = reason

    @property
    def train_loader(self) -> Any:
        """The training batches of the current (or last) ``fit``: the DataLoader as fitkit iterates it
        (with a DistributedSampler under DDP), or the in-memory batcher."""
        return self._train_loader

    @property
    def is_global_zero(self) -> bool:
        """True in the process that writes files (rank 0; always True without distribution)."""
        return self._dist.rank == 0

    @property
    def world_size(self) -> int:
        return self._dist.world_size

    def after_callbacks(self, action: Callable[[], None]) -> None:
        """Runs ``action`` once every callback has handled the current batch or epoch boundary.

        Checkpoint callbacks use it so that a checkpoint holds the state after all callbacks ran,
        whatever their order in the list.
        """
        self._deferred.append(action)

    def _run_deferred(self) -> None:
        actions, self._deferred = self._deferred, []
        with self.allow_sync():  # checkpoint writes copy tensors to the host on purpose
            for action in actions:
                action()

    def allow_sync(self) -> contextlib.AbstractContextManager[Any]:
        """A context for deliberate host-device synchronisations inside the batch loop (a progress
        refresh, a checkpoint write, fp16's GradScaler check): ``debug_sync`` does not flag them.

        Use it in a callback that reads tensor values on purpose every N batches::

            with self.trainer.allow_sync():
                value = float(logs["loss"])
        """
        if not self._sync_debug_on:
            return _NO_CONTEXT
        return _sync_debug_mode(0)

    def _sync_checked(self, batches: Iterable[Any]) -> Iterable[Any]:
        """``batches``, with torch's sync debug mode on while the loop body runs (``debug_sync`` on CUDA).

        The window covers the per-batch work only (fetch, copy, step, per-batch hooks): epoch boundaries
        (logs, checkpoints, ``on_epoch_end``) synchronise on purpose, once per epoch. ``iter()`` runs
        before it opens: the in-memory path copies the epoch's permutation to the device there.
        """
        if not self.debug_sync or self.device.type != "cuda":
            return batches
        return self._sync_checked_batches(iter(batches))

    def _sync_checked_batches(self, iterator: Iterator[Any]) -> Iterator[Any]:
        self._sync_debug_on = True
        try:
            # Closed by the loop's break or exception (CPython frees the iterator there), which restores
            # the previous mode before the epoch's logs are read.
            with _sync_debug_mode("error" if self.debug_sync == "error" else "warn"):
                yield from iterator
        finally:
            self._sync_debug_on = False

    # -- fit ------------------------------------------------------------------------------------
    def fit(
        self,
        train_data: Any,
        val_data: Any = None,
        *,
        epochs: int = 1,
        initial_epoch: int = 0,
        steps_per_epoch: int | None = None,
        validation_freq: int | Sequence[int] = 1,
        batch_size: int | None = None,
        shuffle: bool = True,
        validation_split: float = 0.0,
        resume: str | Path | None = None,
    ) -> History:
        """Trains for ``epochs`` epochs (counted from 0, so ``epochs`` is the index to stop before).

        Args:
            train_data: a DataLoader (or any re-iterable of ``(inputs, targets)`` batches), or an ``(x, y)``
                tuple of tensors/NumPy arrays with ``batch_size``.
            val_data: the same kinds, evaluated after each ``validation_freq``-th epoch.
            epochs: the epoch to stop before, as in Keras (``initial_epoch=5, epochs=10`` trains 5 epochs).
            initial_epoch: the epoch to start at (ignored when ``resume`` restores a position).
            steps_per_epoch: use at most this many batches per epoch (a new iterator every epoch).
            validation_freq: validate every N epochs (int), or after the listed 1-based epochs (Keras).
            batch_size: batch size for in-memory data (default 32, as in Keras).
            shuffle: shuffle in-memory training data every epoch (DataLoaders keep their own sampler).
            validation_split: fraction of in-memory training data held out for validation, taken from
                the end before shuffling (as in Keras).
            resume: a checkpoint path to continue from exactly, or ``"auto"`` for the newest good
                checkpoint of this trainer's checkpoint callbacks (none found: start from scratch).

        Returns:
            the :class:`History` of this call.
        """
        _check_int(epochs, "epochs", 0)
        _check_int(initial_epoch, "initial_epoch", 0)
        if steps_per_epoch is not None:
            _check_int(steps_per_epoch, "steps_per_epoch", 1)
        validate_at = _validation_schedule(validation_freq)
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
        if validation_split and val_data is not None:
            raise ValueError("pass either val_data or validation_split, not both")
        if validation_split:
            train_data, val_data = _split_in_memory(train_data, validation_split)
        train_loader = self._as_loader(train_data, batch_size, shuffle, "train_data", training=True)
        val_loader = None if val_data is None else self._as_loader(val_data, batch_size, False, "val_data")
        self._train_loader = train_loader
        self.has_validation = val_loader is not None
        self.epochs_planned = epochs
        self.num_train_batches = _num_batches(train_loader, steps_per_epoch)
        if self.num_train_batches == 0:
            raise ValueError(
                "train_data yields no batches (an empty dataset, or drop_last=True with fewer "
                "samples than batch_size); fit has nothing to train on"
            )

        self.history = History()
        extra: list[Callback] = [self.history]
        if self.verbose and self.is_global_zero:
            extra.append(ProgressBar(mode="bar" if self.verbose == 1 else "epoch"))
        self._active = [cb for cb in self.callbacks if self.is_global_zero or not cb.rank_zero_only] + extra
        for callback in self._active:
            callback.set_trainer(self)
        hooks = {name: [getattr(cb, name) for cb in self._active if overrides(cb, name)] for name in HOOKS}
        self._hooks = hooks
        if not self._hooks_timed and (hooks["on_batch_begin"] or hooks["on_batch_end"]):
            _HookTimer(self, hooks)  # times them on a few early batches, warns about a slow one
        self.state.should_stop, self.state.stop_reason = False, None
        self.state.epoch, self.state.batch_in_epoch = initial_epoch, 0
        self._deferred.clear()

        with self._signal_guard():
            try:
                for fn in hooks["on_train_begin"]:
                    fn({})
                if resume is None:  # a BackupAndRestore callback resumes the same script after a crash
                    resume = next(
                        (
                            p
                            for cb in self._active
                            if hasattr(cb, "resume_path")
                            for p in [cb.resume_path()]
                            if p is not None
                        ),
                        None,
                    )
                resume = distributed.broadcast_object(resume, self._dist)  # every rank resumes as rank 0 does
                if resume is not None:
                    self._resume(resume, train_loader)
                if self.state.epoch >= epochs:
                    warnings.warn(
                        f"nothing to train: the run is at epoch {self.state.epoch} and epochs={epochs}; "
                        "pass a larger epochs= to train further",
                        stacklevel=2,
                    )
                for epoch in range(self.state.epoch, epochs):
                    self.state.epoch = epoch
                    if self.state.batch_in_epoch == 0:  # a resumed epoch already ran on_epoch_begin
                        self._train_tracker.reset()
                        for fn in hooks["on_epoch_begin"]:
                            fn(epoch, {})
                    logs = self._run_epoch(train_loader, epoch, steps_per_epoch)
                    if val_loader is not None and validate_at(epoch) and not self._interrupted():
                        logs.update(self._evaluate(val_loader, prefix="val_"))
                    self._check_interrupt()
                    logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
                    for fn in hooks["on_epoch_end"]:
                        fn(epoch, logs)
                    self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
                    self._run_deferred()
                    self.state.should_stop = distributed.any_rank(self.state.should_stop, self._dist)
                    if self.state.should_stop:
                        break
            except BaseException as exc:
                self._deferred.clear()
                # Another rank's failure reaches this one as a failed collective: report the first failure.
                peer_failure = None if isinstance(exc, TrainingInterrupted) else distributed.on_failure(exc, self._dist)
                for fn in hooks["on_exception"]:
                    fn(exc)
                if isinstance(exc, TrainingInterrupted):
                    raise self._exit_exception(exc) from exc
                if peer_failure is not None:
                    raise peer_failure from exc
                raise
            finally:
                for fn in hooks["on_train_end"]:
                    fn({})
                self._train_module.train()
        return self.history

    def _run_epoch(self, loader: Any, epoch: int, steps: int | None) -> dict[str, float]:
        """One pass over the training data; returns the epoch's training logs (floats)."""
        self._train_module.train()
        self._metrics_in_use = self.metrics
        self._non_blocking = _pinned(loader, self.device)
        hooks = self._hooks
        batch_begin, batch_end = hooks["on_batch_begin"], hooks["on_batch_end"]
        tracker, total = self._train_tracker, self.num_train_batches
        k = self.accumulate_grad_batches
        sync_stop = self._dist.world_size > 1  # every rank must leave the loop at the same step
        train_step = self._plain_train_step if self._plain_steps() else self.train_step
        for batch in self._sync_checked(self._epoch_batches(loader, epoch, steps)):
            batch_idx = self.state.batch_in_epoch
            for fn in batch_begin:
                fn(batch_idx, {})
            batch = self._to_device(batch)
            n = self._current_n
            self._step_now = k == 1 or (batch_idx + 1) % k == 0 or batch_idx + 1 == total
            if sync_stop and k > 1 and total is not None:  # no all-reduce while accumulating (read in forward)
                distributed.set_grad_sync(self._train_module, self._step_now)
            step_logs = train_step(batch)
            if epoch == self.state.epoch and batch_idx == 0:
                _check_step_logs(step_logs)
            tracker.add(step_logs, n)
            self.state.batch_in_epoch = batch_idx + 1
            for fn in batch_end:
                fn(batch_idx, step_logs)
            if self._deferred:
                self._run_deferred()
            stop = self.state.should_stop
            if sync_stop:  # one host-side all-reduce: a stop set on any rank stops every rank at this step
                stop = distributed.any_rank(stop, self._dist)
                if stop and not self.state.should_stop:
                    self.stop("stopped on another rank")
            if stop:
                break
        self._check_interrupt()
        if self.state.batch_in_epoch == 0:
            raise ValueError(
                f"train_data yielded no batches in epoch {epoch}; check the dataset and "
                "steps_per_epoch (an iterable dataset may be exhausted)"
            )
        if self._grads_pending:
            if self.state.should_stop:  # stopped mid-group (TerminateOnNaN, say): drop the partial group
                self.optimizer.zero_grad(set_to_none=True)
                self._grads_pending, self._group_units = False, 0.0
            else:
                self.optimizer_step()
        return tracker.compute(self._dist.reduce)

    def _epoch_batches(self, loader: Any, epoch: int, steps: int | None) -> Iterator[Any]:
        """The epoch's batch iterator, starting at ``state.batch_in_epoch`` after a resume.

        Snapshots the random generators before ``iter(loader)`` draws from them, so that a checkpoint
        taken mid-epoch can rebuild the same order and worker seeds without loading skipped batches.
        """
        distributed.set_epoch(loader, epoch)
        skip = self.state.batch_in_epoch
        if skip == 0:
            self._epoch_rng = rng.capture(loader)
            iterator: Iterator[Any] = iter(loader)
        elif self._epoch_rng is None:
            raise RuntimeError("internal: mid-epoch resume without the epoch's random state")
        else:
            now = rng.capture(loader)
            rng.restore(self._epoch_rng, loader)
            if hasattr(loader, "skip_next"):  # in-memory batches: re-draw the permutation, start at skip
                loader.skip_next(skip)
                iterator = iter(loader)
            elif is_map_style(loader):
                iterator = resume_loader_iterator(loader, skip)
            else:
                warnings.warn(
                    f"resuming mid-epoch on {type(loader).__name__} without random access: "
                    f"re-reading {skip} batches to skip them (they do not reach the model)",
                    stacklevel=3,
                )
                iterator = iter(loader)
                for _ in range(skip):
                    next(iterator)
            rng.restore(now, loader)
        if steps is not None:
            iterator = itertools.islice(iterator, max(0, steps - skip))
        return iterator

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward, loss, backward and (at the end of an accumulation group) the optimizer step.

        Override it for other batch layouts or custom logic (several losses, GANs): call
        :meth:`forward`/:meth:`autocast`, :meth:`backward` and :meth:`optimizer_step` as needed and
        return a dict of 0-dim tensors (it must hold ``"loss"``); each is averaged over samples into the
        epoch logs.
        """
        inputs, targets = split_batch(batch)
        with self.autocast():
            outputs = self.forward(inputs)
            loss = self.loss(outputs, targets)
        self.backward(loss)
        if self._step_now:
            self.optimizer_step()
        self.update_metrics(outputs, targets)
        return {"loss": loss.detach()}

    def _plain_train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """:meth:`train_step` with :meth:`forward`, :meth:`backward` and :meth:`optimizer_step` folded in,
        for the common case in which none of what they handle is in use (see :meth:`_plain_steps`).

        The same calls in the same order, with ~100 fewer Python bytecode instructions per batch: a
        third of what the loop adds to a hand-written one (``benchmarks/overhead.py --opcodes``). Keep
        it in step with those methods; a test compares the two paths.
        """
        inputs, targets = split_batch(batch)
        with self.autocast():
            outputs = self._train_module(inputs) if isinstance(inputs, torch.Tensor) else self.forward(inputs)
            loss = self.loss(outputs, targets)
        _check_loss(loss)
        loss.backward()
        optimizer = self.optimizer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        if self._metrics_in_use:
            self.update_metrics(outputs, targets)
        return {"loss": loss.detach()}

    def _plain_steps(self) -> bool:
        """True when every batch is one optimizer step with nothing around it: no accumulation, loss
        scaling, clipping or backward/optimizer-step hooks, and none of the step methods overridden
        (in a subclass, on the instance, or patched on the class)."""
        return (
            self.accumulate_grad_batches == 1
            and self._scaler is None
            and self.grad_clip_norm is None
            and self.grad_clip_value is None
            and not self._hooks["on_before_backward"]
            and not self._hooks["on_before_optimizer_step"]
            and all(
                getattr(getattr(self, name), "__func__", None) is function
                for name, function in _PLAIN_STEP_METHODS.items()
            )
        )

    def eval_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward and loss under ``no_grad`` in eval mode; override like :meth:`train_step`."""
        inputs, targets = split_batch(batch)
        with self.autocast():
            outputs = self.forward(inputs, training=False)
            loss = self.loss(outputs, targets)
        self.update_metrics(outputs, targets)
        return {"loss": loss}

    def predict_step(self, batch: Any) -> Any:
        """The model's outputs for a batch of inputs (or of ``(inputs, targets)``)."""
        inputs = batch[0] if isinstance(batch, (list, tuple)) and len(batch) == 2 else batch
        with self.autocast():
            return self.forward(inputs, training=False)

    def forward(self, inputs: Any, training: bool = True) -> Any:
        """Calls the model: a tensor as one argument, a tuple/list as positional and a dict as keyword
        arguments."""
        module = self._train_module if training else self._eval_module
        if isinstance(inputs, dict):
            return module(**inputs)
        if isinstance(inputs, (list, tuple)):
            return module(*inputs)
        return module(inputs)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The mixed-precision context of this trainer (a no-op at ``precision="32"``)."""
        if self._autocast_dtype is None:
            return _NO_CONTEXT
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with loss scaling (fp16) and the accumulation weight applied."""
        if not self._grads_pending:
            _check_loss(loss)
        for fn in self._hooks["on_before_backward"]:
            fn(loss)
        if self.accumulate_grad_batches > 1:
            # Weight each batch by its size so that a group equals one big batch, also when the last
            # group or batch is short; optimizer_step divides by the group's total weight.
            n = self._current_n
            if not self._grads_pending:
                self._group_first_n, self._group_units = n, 0.0
            weight = n / self._group_first_n
            self._group_units += weight
            loss = loss * weight
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        loss.backward()  # skips DDP's all-reduce on accumulating batches (see set_grad_sync in _run_epoch)
        self._grads_pending = True

    def optimizer_step(self) -> None:
        """Unscale, accumulate, clip, ``optimizer.step()``, ``zero_grad``; counts a global step."""
        optimizer, scaler = self.optimizer, self._scaler
        if self.accumulate_grad_batches > 1 and self._group_units not in (0.0, 1.0):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch._foreach_div_(grads, self._group_units)
        if scaler is not None and (self.grad_clip_norm is not None or self.grad_clip_value is not None):
            scaler.unscale_(optimizer)  # clip the real gradients, not the scaled ones
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(_params(optimizer), self.grad_clip_norm)
        if self.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(_params(optimizer), self.grad_clip_value)
        for fn in self._hooks["on_before_optimizer_step"]:
            fn()
        if scaler is not None:
            # Kept on the device: last_step_skipped compares it only when someone asks (fp16 only).
            self._last_scale = scaler._scale.detach().clone()  # type: ignore[union-attr]
            with self.allow_sync():  # reads the inf flag on the host: fp16's one sync per step
                scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._grads_pending, self._group_units = False, 0.0
        self.state.global_step += 1

    @property
    def last_step_skipped(self) -> bool:
        """True when fp16's GradScaler skipped the last optimizer step (inf/NaN gradients).

        Reads the scale back from the device (a host sync); always False without fp16.
        """
        if self._scaler is None or self._last_scale is None:
            return False
        return bool((self._scaler._scale < self._last_scale).item())  # type: ignore[operator]

    def update_metrics(self, outputs: Any, targets: Any) -> None:
        """Updates the metrics of the running phase (training, or validation/evaluate)."""
        for metric in self._metrics_in_use:
            metric.update(outputs, targets)

    def running_logs(self) -> dict[str, float]:
        """The training loss and metrics so far in this epoch (one host sync); in a distributed run, this
        rank's own (no collective: rank-0-only callbacks such as the progress bar call it)."""
        with self.allow_sync(), distributed.local_metric_values(self.metrics):
            return self._train_tracker.compute()

    def _to_device(self, batch: Any) -> Any:
        self._current_n = batch_size_of(batch)
        if self.device.type == "cpu" and not self.channels_last:
            return batch
        batch = move_to_device(batch, self.device, self._non_blocking)
        if self.channels_last:
            batch = _channels_last(batch)
        return batch

    # -- evaluate / predict ---------------------------------------------------------------------
    def evaluate(
        self, data: Any, *, batch_size: int | None = None, callbacks: Sequence[Callback] | None = None
    ) -> dict[str, float]:
        """Loss and metrics over ``data`` in eval mode under ``no_grad``, averaged over samples.

        As in Keras, only the ``callbacks`` given here see its ``on_validation_*`` events (the trainer's
        own callbacks belong to ``fit``).
        """
        loader = self._as_loader(data, batch_size, False, "data")
        given = list(callbacks or [])
        for callback in given:
            check_hook_names(callback)
            callback.set_trainer(self)
        hooks = {name: [getattr(cb, name) for cb in given if overrides(cb, name)] for name in HOOKS}
        return self._evaluate(loader, prefix="", hooks=hooks)

    @torch.no_grad()
    def _evaluate(
        self, loader: Any, prefix: str, hooks: dict[str, list[Callable[..., Any]]] | None = None
    ) -> dict[str, float]:
        hooks = self._hooks if hooks is None else hooks
        was_training = self._train_module.training
        self._eval_module.eval()
        self._metrics_in_use = self._val_metrics
        self._non_blocking = _pinned(loader, self.device)
        tracker = self._eval_tracker
        tracker.reset()
        try:
            for fn in hooks["on_validation_begin"]:
                fn({})
            batch_begin, batch_end = hooks["on_validation_batch_begin"], hooks["on_validation_batch_end"]
            batches = self._sync_checked(distributed.shard_eval(loader, self._dist))
            for batch_idx, batch in enumerate(batches):
                for fn in batch_begin:
                    fn(batch_idx, {})
                batch = self._to_device(batch)
                step_logs = self.eval_step(batch)
                if batch_idx == 0:
                    _check_step_logs(step_logs)
                tracker.add(step_logs, self._current_n)
                for fn in batch_end:
                    fn(batch_idx, step_logs)
                if self._interrupted():
                    break
            if tracker.count == 0 and self._dist.world_size == 1:
                raise ValueError("validation data yielded no batches; pass a non-empty DataLoader or None")
            logs = tracker.compute(self._dist.reduce)
            for fn in hooks["on_validation_end"]:
                fn(dict(logs))
        finally:
            self._metrics_in_use = self.metrics
            self._train_module.train(was_training)
            self._eval_module.train(was_training)
        return {prefix + k: v for k, v in logs.items()}

    @torch.no_grad()
    def predict(self, data: Any, *, batch_size: int | None = None) -> Any:
        """The model's outputs over ``data``, concatenated along dim 0 on the CPU (tuples and dicts of
        outputs are concatenated element-wise)."""
        loader = self._as_loader(data, batch_size, False, "data", targets_optional=True)
        was_training = self._eval_module.training
        self._eval_module.eval()
        outputs: list[Any] = []
        try:
            for batch in loader:
                batch = move_to_device(batch, self.device, self._non_blocking)
                outputs.append(move_to_device(self.predict_step(batch), torch.device("cpu")))
        finally:
            self._eval_module.train(was_training)
        if not outputs:
            raise ValueError("predict: data yielded no batches")
        return _concat(outputs)

    # -- data -----------------------------------------------------------------------------------
    def _as_loader(
        self,
        data: Any,
        batch_size: int | None,
        shuffle: bool,
        name: str,
        training: bool = False,
        targets_optional: bool = False,
    ) -> Any:
        if isinstance(data, DataLoader):
            if batch_size is not None:
                raise ValueError(
                    f"batch_size is for in-memory data; {name} is a DataLoader with its own "
                    f"batch_size ({data.batch_size}). Drop batch_size= or pass (x, y) tensors."
                )
            if isinstance(data.dataset, IterableDataset):
                pass
            elif len(data) == 0:
                raise ValueError(
                    f"{name} is an empty DataLoader (dataset of {len(data.dataset)} samples"
                    f"{', drop_last=True' if data.drop_last else ''}); there is nothing to iterate"
                )
            if self.device.type == "cuda":
                self._non_blocking = bool(data.pin_memory)
                if training and not data.pin_memory and data.num_workers == 0:
                    warnings.warn(
                        f"{name}: a CUDA run fed by a DataLoader with num_workers=0 and pin_memory=False "
                        "waits on the host for every batch; pass num_workers>0 and pin_memory=True",
                        stacklevel=3,
                    )
            return distributed.shard_train(data, self._dist) if training else data
        if _is_array(data):  # x alone, as Keras's predict(x) takes it; iterating it would yield single rows
            if not targets_optional:
                raise TypeError(
                    f"{name} is a single {type(data).__name__} (inputs only); a loss needs targets: "
                    "pass an (x, y) tuple with batch_size=, or a DataLoader of (inputs, targets)"
                )
            data = (data,)
        if isinstance(data, tuple) and len(data) in (1, 2) and _is_array(data[0]):
            x = data[0]
            y = data[1] if len(data) == 2 else None
            if y is None:
                if not targets_optional:
                    raise ValueError(f"{name} must be (x, y) to compute a loss; got (x,) only")
                y = torch.zeros(len(x))
            if len(x) == 0:
                raise ValueError(f"{name} holds 0 samples")
            size = 32 if batch_size is None else batch_size
            loader = InMemoryLoader(
                x,
                y,
                size,
                shuffle=shuffle and training,
                device=self.device if _fits_on_device(x, y, self.device) else None,
            )
            if self._dist.world_size > 1:
                return distributed.shard_in_memory(loader, self._dist, training)
            return loader
        if isinstance(data, (torch.utils.data.Dataset,)) and not isinstance(data, IterableDataset):
            raise TypeError(
                f"{name} is a Dataset; wrap it in a DataLoader(dataset, batch_size=..., shuffle=...) "
                "or pass (x, y) tensors with batch_size="
            )
        if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
            check_reiterable(data, name)
            if hasattr(data, "__len__") and len(data) == 0:
                raise ValueError(f"{name} is empty")
            return data
        raise TypeError(
            f"{name} must be a DataLoader, a re-iterable of (inputs, targets) batches, or an (x, y) "
            f"tuple of tensors/arrays; got {type(data).__name__}"
        )

    # -- signals --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signal_guard(self) -> Iterator[None]:
        self._interrupt_signum = None
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            self._interrupt_signum = signum
            self.state.should_stop = True
            self.state.stop_reason = f"interrupted by {signal.Signals(signum).name}"
            for sig, old in previous.items():  # a second signal is not graceful
                signal.signal(sig, old)

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _interrupted(self) -> bool:
        # In a distributed run every rank must do the same work: the collective _check_interrupt decides.
        return self._interrupt_signum is not None and self._dist.world_size == 1

    def _check_interrupt(self) -> None:
        signum = distributed.any_signal(self._interrupt_signum, self._dist)
        if signum is not None:
            raise TrainingInterrupted(signum)

    @staticmethod
    def _exit_exception(exc: TrainingInterrupted) -> BaseException:
        if exc.signum == signal.SIGINT:
            return KeyboardInterrupt()
        return SystemExit(128 + exc.signum)

    # -- state ----------------------------------------------------------------------------------
    def _callback_keys(self) -> list[tuple[str, Callback]]:
        seen: dict[str, int] = {}
        keyed = []
        for callback in self._active or self.callbacks:
            name = type(callback).__name__
            seen[name] = seen.get(name, 0) + 1
            keyed.append((name if seen[name] == 1 else f"{name}_{seen[name]}", callback))
        return keyed

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides what happens next; plain values and tensors only."""
        from fitkit.checkpoint import trainer_state_dict

        return trainer_state_dict(self)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        from fitkit.checkpoint import load_trainer_state_dict

        load_trainer_state_dict(self, state, strict=strict)

    def save_checkpoint(self, path: str | Path) -> Path:
        """Writes the full training state to ``path`` atomically (rank 0 only in a distributed run)."""
        from fitkit.checkpoint import save_trainer_checkpoint

        return save_trainer_checkpoint(self, Path(path))

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        """Loads a checkpoint written by fitkit (verified, ``weights_only``) into this trainer."""
        from fitkit.checkpoint import load_trainer_checkpoint

        load_trainer_checkpoint(self, Path(path), strict=strict)

    def _resume(self, resume: str | Path, loader: Any) -> None:
        from fitkit.checkpoint import resolve_resume

        path = distributed.broadcast_object(resolve_resume(self, resume), self._dist)  # one file for all ranks
        if path is not None:
            self.load_checkpoint(path)


# -- helpers ------------------------------------------------------------------------------------
def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps' or a torch.device"
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device='auto' or 'cpu'")
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device("cuda", index)
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} but MPS is not available here; use device='auto' or 'cpu'")
    return resolved


def _resolve_precision(precision: str | int, device: torch.device) -> str:
    if precision not in _PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}: use '32' (float32), 'bf16' (bfloat16 autocast) or "
            "'fp16' (float16 autocast with a GradScaler)"
        )
    resolved = _PRECISIONS[precision]
    if resolved == "fp16" and device.type == "cpu":
        raise ValueError(
            "precision='fp16' needs a CUDA or MPS device: float16 autocast with a GradScaler is "
            "not supported for training on the CPU. Use precision='bf16' on the CPU."
        )
    if resolved == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bfloat16 support; use precision='fp16'"
        )
    return resolved


def _positive_or_none(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
    return float(value)


def _check_int(value: Any, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _resolve_optimizer(optimizer: torch.optim.Optimizer | str, model: nn.Module) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in _OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; names: {sorted(_OPTIMIZERS)}, or pass a "
                "torch.optim.Optimizer over model.parameters()"
            )
        cls, lr = _OPTIMIZERS[key]
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad=True) to optimize")
        return cls(params, lr=lr)
    raise TypeError(f"optimizer must be a torch.optim.Optimizer or a name, got {type(optimizer).__name__}")


def _check_optimizer_holds_model(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    model_params = {id(p) for p in model.parameters()}
    if not held & model_params:
        raise ValueError(
            "the optimizer holds none of the model's parameters: it was probably built for another "
            "model instance. Build it with the model you pass: torch.optim.Adam(model.parameters())"
        )
    strangers = held - model_params
    if strangers:
        raise ValueError(
            f"the optimizer holds {len(strangers)} parameter(s) that are not in the model; build it "
            "with this model's parameters"
        )
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameter(s) are not in the optimizer and will not be updated "
            f"(first: {missing[:3]}); set requires_grad=False on them if that is intended",
            stacklevel=3,
        )


def _resolve_loss(loss: Callable[[Any, Any], torch.Tensor] | str) -> Callable[[Any, Any], torch.Tensor]:
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(
                f"unknown loss {loss!r}; names: {sorted(_LOSSES)}, or pass a callable "
                "(outputs, targets) -> scalar tensor"
            )
        return _LOSSES[loss]()
    if not callable(loss):
        raise TypeError(
            f"loss must be a callable (outputs, targets) -> scalar tensor or a name, got {type(loss).__name__}"
        )
    return loss


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the loss must return a tensor, got {type(loss).__name__}")
    if loss.ndim != 0:
        raise ValueError(
            f"the loss must be a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; use a mean- "
            "or sum-reduced loss (e.g. reduction='mean'), or reduce it in your loss function"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not require grad: no model parameter took part in computing it (a "
            "detached output, or a model with all parameters frozen?)"
        )


def _check_step_logs(step_logs: Any) -> None:
    if not isinstance(step_logs, dict) or "loss" not in step_logs:
        raise TypeError(
            f"train_step/eval_step must return a dict of 0-dim tensors holding 'loss', got "
            f"{type(step_logs).__name__}{'' if not isinstance(step_logs, dict) else sorted(step_logs)}"
        )


def _validation_schedule(validation_freq: int | Sequence[int]) -> Callable[[int], bool]:
    if isinstance(validation_freq, int) and not isinstance(validation_freq, bool):
        if validation_freq < 1:
            raise ValueError(
                f"validation_freq must be an int >= 1 or a list of 1-based epochs, got {validation_freq!r}"
            )
        return lambda epoch: (epoch + 1) % validation_freq == 0
    if isinstance(validation_freq, (list, tuple, set)) and all(isinstance(e, int) for e in validation_freq):
        epochs = set(validation_freq)
        return lambda epoch: epoch + 1 in epochs
    raise ValueError(f"validation_freq must be an int >= 1 or a list of 1-based epochs, got {validation_freq!r}")


def _num_batches(loader: Any, steps: int | None) -> int | None:
    try:
        total = len(loader)
    except TypeError:
        return steps
    return total if steps is None else min(total, steps)


def _is_array(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor) or type(obj).__module__ == "numpy" and hasattr(obj, "shape")


def _split_in_memory(data: Any, fraction: float) -> tuple[Any, Any]:
    if not (isinstance(data, tuple) and len(data) == 2 and _is_array(data[0])):
        raise ValueError("validation_split works with in-memory (x, y) data only; for a DataLoader pass val_data")
    x, y = to_tensor(data[0], "x"), to_tensor(data[1], "y")
    split = int(len(x) * (1.0 - fraction))
    if split == 0 or split == len(x):
        raise ValueError(f"validation_split={fraction} leaves an empty training or validation set for {len(x)} samples")
    return (x[:split], y[:split]), (x[split:], y[split:])


def _pinned(loader: Any, device: torch.device) -> bool:
    """True when ``loader`` yields pinned batches for a CUDA device: copy them with non_blocking=True.

    Decided per loop: in fit the validation loader is prepared after the training one and may differ.
    """
    return device.type == "cuda" and bool(getattr(loader, "pin_memory", False))


def _fits_on_device(x: Any, y: Any, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    size = sum(t.numel() * t.element_size() for t in (to_tensor(x, "x"), to_tensor(y, "y")))
    free, _ = torch.cuda.mem_get_info(device)
    return size < 0.5 * free


_NO_CONTEXT = contextlib.nullcontext()  # reusable: the fp32 autocast and allow_sync() outside debug_sync


@contextlib.contextmanager
def _sync_debug_mode(mode: int | str) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _channels_last(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_channels_last(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _channels_last(v) for k, v in batch.items()}
    return batch


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _concat(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([o[k] for o in outputs]) for k in first}
    raise TypeError(f"predict: cannot concatenate outputs of type {type(first).__name__}")


# The step methods as defined here: _plain_steps compares against them, so that a subclass, an instance
# attribute or a monkeypatch on the class takes the general path.
_PLAIN_STEP_METHODS = {
    name: Trainer.__dict__[name]
    for name in ("train_step", "forward", "autocast", "backward", "optimizer_step", "update_metrics")
}

__all__ = ["Trainer", "TrainingInterrupted"]
