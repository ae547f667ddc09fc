"""The Trainer and its loop: ``fit -> _run_epoch -> train_step``, top to bottom in this file.

The data path: batch -> ``_to_device`` -> ``train_step`` (forward, loss, backward, maybe an optimizer
step) -> :class:`~fitkit.tracker.EpochTracker` (sums stay on the device) -> per-batch hooks -> epoch
logs (one host sync) -> ``on_epoch_end`` hooks -> deferred checkpoint writes.

What lives elsewhere: argument checks (``arguments.py``), turning data into loaders (``loaders.py``),
the callbacks of one fit and the slow-hook timer (``callback_list.py``), the epoch's running sums
(``tracker.py``), the state objects (``state.py``), signals (``signals.py``), files (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fitkit import _compat, arguments, checkpoint, distributed, rng
from fitkit.callback_list import CallbackList, HookTimer
from fitkit.callbacks.base import Callback
from fitkit.callbacks.history import History
from fitkit.callbacks.progress import ProgressBar
from fitkit.data import batch_size_of, is_map_style, move_to_device, resume_loader_iterator, split_batch
from fitkit.devices import channels_last as to_channels_last
from fitkit.devices import pinned, resolve_device
from fitkit.loaders import SkippableLoader, as_loader, concat_outputs, data_signature, num_batches, split_in_memory
from fitkit.metrics import Metric, get_metric
from fitkit.signals import SignalGuard, TrainingInterrupted
from fitkit.state import GradientAccumulation, TrainerState
from fitkit.tracker import EpochTracker


@runtime_checkable
class CheckpointWriter(Protocol):
    """A callback that writes full checkpoints into ``checkpoint_dir`` (``resume="auto"`` looks there)."""

    checkpoint_dir: Path


@runtime_checkable
class ResumeSource(Protocol):
    """A callback that names the checkpoint a ``fit(resume=None)`` continues from (BackupAndRestore)."""

    def resume_path(self) -> Path | None: ...


@dataclass
class _FitPlan:
    """What one ``fit`` call iterates, resolved from its arguments before any hook runs."""

    train_loader: Any
    val_loader: Any
    epochs: int
    steps_per_epoch: int | None
    validate_at: Callable[[int], bool]


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
        self.device = resolve_device(device)
        self.precision = arguments.resolve_precision(precision, self.device)
        self.grad_clip_norm = arguments.positive_or_none(grad_clip_norm, "grad_clip_norm")
        self.grad_clip_value = arguments.positive_or_none(grad_clip_value, "grad_clip_value")
        self.accumulate_grad_batches = arguments.check_accumulate_grad_batches(accumulate_grad_batches)
        self.verbose = arguments.check_verbose(verbose)
        self.debug_sync = arguments.check_debug_sync(debug_sync)
        self.handle_signals = handle_signals
        self.callbacks: list[Callback] = arguments.check_callbacks(callbacks)

        self.strategy = distributed.resolve_strategy(strategy)
        self._dist = distributed.setup(self.strategy, self.device, process_group_timeout)
        if self._dist.device is not None:
            self.device = self._dist.device
        self.model = model.to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.optimizer = arguments.resolve_optimizer(optimizer, self.model)
        arguments.check_optimizer_holds_model(self.optimizer, self.model)
        self.loss = arguments.resolve_loss(loss)
        self.metrics: list[Metric] = arguments.check_metric_names([get_metric(m) for m in (metrics or [])])
        self._val_metrics = [copy.deepcopy(m) for m in self.metrics]

        # The module that runs forward passes in training: compiled and/or wrapped for DDP.
        self._train_module: nn.Module = distributed.wrap_model(self.model, self.strategy, self._dist, self.optimizer)
        self._eval_module: nn.Module = self.model
        if compile:
            self._train_module = torch.compile(self._train_module)  # type: ignore[assignment]
            self._eval_module = (
                torch.compile(self.model) if self._train_module is not self.model else self._train_module  # type: ignore[assignment]
            )
        self.compile = compile
        self._autocast_dtype = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self._scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

        # Progress and resumable state (Trainer.state_dict gathers each part).
        self.state = TrainerState()
        self.history = History()
        self._train_tracker = EpochTracker(self.metrics)
        self._eval_tracker = EpochTracker(self._val_metrics)
        self._accumulation = GradientAccumulation()
        self._epoch_rng: dict[str, Any] | None = None  # the generators before this epoch's iter(loader)
        # Per fit: what runs and how.
        self.epochs_planned = 0
        self.has_validation = False
        self.num_train_batches: int | None = None
        self._train_loader: Any = None
        self._callbacks = CallbackList([], self)
        self._metrics_in_use: list[Metric] = self.metrics
        self._current_n = 0  # samples in the batch being processed
        self._non_blocking = False
        self._deferred: list[Callable[[], None]] = []
        self._signals = SignalGuard(self._on_signal, enabled=handle_signals)
        self._hooks_timed = False  # set once a HookTimer has measured this trainer's per-batch hooks
        self._sync_debug_on = False  # inside a debug_sync window (see _sync_window)
        self._last_scale: torch.Tensor | None = None

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

    @property
    def dist(self) -> distributed.DistInfo:
        """The distributed run as this trainer sees it (rank, world size, strategy); read-only."""
        return self._dist

    @property
    def active_callbacks(self) -> list[Callback]:
        """The callbacks of the current (or last) ``fit`` in the order they run: this rank's share of
        :attr:`callbacks`, then History and the progress bar."""
        return self._callbacks.callbacks

    def after_callbacks(self, action: Callable[[], None]) -> None:
        """Runs ``action`` once every callback has handled the current batch or epoch boundary.

        Checkpoint callbacks use it so that a checkpoint holds the state after all callbacks ran,
        whatever their order in the list.
        """
        self._deferred.append(action)

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
        plan = self._prepare_fit(
            train_data, val_data, epochs, initial_epoch, steps_per_epoch, validation_freq, batch_size, shuffle,
            validation_split,
        )  # fmt: skip
        with self._signals:
            try:
                self._callbacks.fire("on_train_begin", {})
                self._resume(resume)
                if self.state.epoch >= epochs:
                    warnings.warn(
                        f"nothing to train: the run is at epoch {self.state.epoch} and epochs={epochs}; "
                        "pass a larger epochs= to train further",
                        stacklevel=2,
                    )
                self._fit_loop(plan)
            except BaseException as exc:
                failure = self._fit_failed(exc)
                if failure is exc:
                    raise
                raise failure from exc
            finally:
                self._callbacks.fire_all("on_train_end", {})
                self._train_module.train()
        return self.history

    def _prepare_fit(
        self,
        train_data: Any,
        val_data: Any,
        epochs: int,
        initial_epoch: int,
        steps_per_epoch: int | None,
        validation_freq: int | Sequence[int],
        batch_size: int | None,
        shuffle: bool,
        validation_split: float,
    ) -> _FitPlan:
        """Checks fit's arguments, builds the loaders and binds this fit's callbacks; runs no hook."""
        arguments.check_int(epochs, "epochs", 0)
        arguments.check_int(initial_epoch, "initial_epoch", 0)
        if steps_per_epoch is not None:
            arguments.check_int(steps_per_epoch, "steps_per_epoch", 1)
        validate_at = arguments.validation_schedule(validation_freq)
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
        if validation_split and val_data is not None:
            raise ValueError("pass either val_data or validation_split, not both")
        if validation_split:
            train_data, val_data = split_in_memory(train_data, validation_split)
        train_loader = self._as_loader(train_data, batch_size, shuffle, "train_data", training=True)
        val_loader = None if val_data is None else self._as_loader(val_data, batch_size, False, "val_data")
        self._train_loader = train_loader
        self.has_validation = val_loader is not None
        self.epochs_planned = epochs
        self.num_train_batches = num_batches(train_loader, steps_per_epoch)
        if self.num_train_batches == 0:
            raise ValueError(
                "train_data yields no batches (an empty dataset, or drop_last=True with fewer "
                "samples than batch_size); fit has nothing to train on"
            )

        self.history = History()
        extra: list[Callback] = [self.history]
        if self.verbose and self.is_global_zero:
            extra.append(ProgressBar(mode="bar" if self.verbose == 1 else "epoch"))
        active = [cb for cb in self.callbacks if self.is_global_zero or not cb.rank_zero_only] + extra
        self._callbacks = CallbackList(active, self)
        hooks = self._callbacks.hooks
        if not self._hooks_timed and (hooks["on_batch_begin"] or hooks["on_batch_end"]):
            HookTimer(self._callbacks, self._hooks_measured)  # times them on a few early batches
        self.state.should_stop, self.state.stop_reason = False, None
        self.state.epoch, self.state.batch_in_epoch = initial_epoch, 0
        self._deferred.clear()
        return _FitPlan(train_loader, val_loader, epochs, steps_per_epoch, validate_at)

    def _fit_loop(self, plan: _FitPlan) -> None:
        """The epochs: train, validate when scheduled, ``on_epoch_end``, deferred writes, stop check."""
        callbacks = self._callbacks
        for epoch in range(self.state.epoch, plan.epochs):
            self.state.epoch = epoch
            if self.state.batch_in_epoch == 0:  # a resumed epoch already ran on_epoch_begin
                self._train_tracker.reset()
                callbacks.fire("on_epoch_begin", epoch, {})
            logs = self._run_epoch(plan.train_loader, epoch, plan.steps_per_epoch)
            if plan.val_loader is not None and plan.validate_at(epoch) and not self._interrupted():
                logs.update(self._evaluate(plan.val_loader, "val_", callbacks))
            self._check_interrupt()
            logs["lr"] = float(self.optimizer.param_groups[0]["lr"])
            callbacks.fire("on_epoch_end", epoch, logs)
            self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
            self._run_deferred()
            self.state.should_stop = distributed.any_rank(self.state.should_stop, self._dist)
            if self.state.should_stop:
                break

    def _fit_failed(self, exc: BaseException) -> BaseException:
        """Runs ``on_exception`` and returns what ``fit`` raises: a signal's conventional exit, the
        first failing rank's error in a distributed run, or ``exc`` itself."""
        self._deferred.clear()
        # Another rank's failure reaches this one as a failed collective: report the first failure.
        peer_failure = None if isinstance(exc, TrainingInterrupted) else distributed.on_failure(exc, self._dist)
        self._callbacks.fire("on_exception", exc)
        if isinstance(exc, TrainingInterrupted):
            return exc.exit_exception()
        return peer_failure if peer_failure is not None else exc

    def _run_epoch(self, loader: Any, epoch: int, steps: int | None) -> dict[str, float]:
        """One pass over the training data; returns the epoch's training logs (floats)."""
        self._train_module.train()
        self._metrics_in_use = self.metrics
        self._non_blocking = pinned(loader, self.device)
        hooks = self._callbacks.hooks
        batch_begin, batch_end = hooks["on_batch_begin"], hooks["on_batch_end"]
        tracker, total, state = self._train_tracker, self.num_train_batches, self.state
        accumulation, k = self._accumulation, self.accumulate_grad_batches
        sync_stop = self._dist.world_size > 1  # every rank must leave the loop at the same step
        train_step = self.train_step
        batches = self._epoch_batches(loader, epoch, steps)
        with self._sync_window():
            for batch in batches:
                batch_idx = state.batch_in_epoch
                for fn in batch_begin:
                    fn(batch_idx, {})
                batch = self._to_device(batch)
                accumulation.step_now = k == 1 or (batch_idx + 1) % k == 0 or batch_idx + 1 == total
                if sync_stop and k > 1 and total is not None:  # no all-reduce while accumulating (read in forward)
                    distributed.set_grad_sync(self._train_module, accumulation.step_now)
                step_logs = train_step(batch)
                if batch_idx == 0:
                    arguments.check_step_logs(step_logs)
                tracker.add(step_logs, self._current_n)
                state.batch_in_epoch = batch_idx + 1
                for fn in batch_end:
                    fn(batch_idx, step_logs)
                if self._deferred:
                    self._run_deferred()
                stop = state.should_stop
                if sync_stop:  # one host-side all-reduce: a stop set on any rank stops every rank at this step
                    stop = distributed.any_rank(stop, self._dist)
                    if stop and not state.should_stop:
                        self.stop("stopped on another rank")
                if stop:
                    break
        self._check_interrupt()
        if state.batch_in_epoch == 0:
            raise ValueError(
                f"train_data yielded no batches in epoch {epoch}; check the dataset and "
                "steps_per_epoch (an iterable dataset may be exhausted)"
            )
        if accumulation.pending:
            if state.should_stop:  # stopped mid-group (TerminateOnNaN, say): drop the partial group
                self.optimizer.zero_grad(set_to_none=True)
                accumulation.reset()
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
            if isinstance(loader, SkippableLoader):  # in-memory batches: re-draw the permutation, start at skip
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
        if self._accumulation.step_now:
            self.optimizer_step()
        if self._metrics_in_use:
            self.update_metrics(outputs, targets)
        return {"loss": loss.detach()}

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
        if isinstance(inputs, torch.Tensor):
            return module(inputs)
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
        accumulation = self._accumulation
        if not accumulation.pending:
            arguments.check_loss(loss)
        for fn in self._callbacks.hooks["on_before_backward"]:
            fn(loss)
        if self.accumulate_grad_batches > 1:
            # Weight each batch by its size so that a group equals one big batch, also when the last
            # group or batch is short; optimizer_step divides by the group's total weight.
            n = self._current_n
            if not accumulation.pending:
                accumulation.first_n, accumulation.units = n, 0.0
            weight = n / accumulation.first_n
            accumulation.units += weight
            loss = loss * weight
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        loss.backward()  # skips DDP's all-reduce on accumulating batches (see set_grad_sync in _run_epoch)
        accumulation.pending = True

    def optimizer_step(self) -> None:
        """Unscale, accumulate, clip, ``optimizer.step()``, ``zero_grad``; counts a global step."""
        optimizer, scaler, accumulation = self.optimizer, self._scaler, self._accumulation
        if self.accumulate_grad_batches > 1 and accumulation.units not in (0.0, 1.0):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            _compat.foreach_div_(grads, accumulation.units)
        clipping = self.grad_clip_norm is not None or self.grad_clip_value is not None
        if scaler is not None and clipping:
            scaler.unscale_(optimizer)  # clip the real gradients, not the scaled ones
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(_params(optimizer), self.grad_clip_norm)
        if self.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(_params(optimizer), self.grad_clip_value)
        for fn in self._callbacks.hooks["on_before_optimizer_step"]:
            fn()
        if scaler is not None:
            # Kept on the device: last_step_skipped compares it only when someone asks (fp16 only).
            scale = _compat.grad_scaler_scale(scaler)
            self._last_scale = None if scale is None else scale.detach().clone()
            with self.allow_sync():  # reads the inf flag on the host: fp16's one sync per step
                scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accumulation.reset()
        self.state.global_step += 1

    @property
    def last_step_skipped(self) -> bool:
        """True when fp16's GradScaler skipped the last optimizer step (inf/NaN gradients).

        Reads the scale back from the device (a host sync); always False without fp16.
        """
        scale = None if self._scaler is None else _compat.grad_scaler_scale(self._scaler)
        if scale is None or self._last_scale is None:
            return False
        return bool((scale < self._last_scale).item())

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
            batch = to_channels_last(batch)
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
        return self._evaluate(loader, "", CallbackList(arguments.check_callbacks(callbacks), self))

    @torch.no_grad()
    def _evaluate(self, loader: Any, prefix: str, callbacks: CallbackList) -> dict[str, float]:
        hooks = callbacks.hooks
        was_training = self._train_module.training
        self._eval_module.eval()
        self._metrics_in_use = self._val_metrics
        self._non_blocking = pinned(loader, self.device)
        tracker = self._eval_tracker
        tracker.reset()
        try:
            callbacks.fire("on_validation_begin", {})
            batch_begin, batch_end = hooks["on_validation_batch_begin"], hooks["on_validation_batch_end"]
            batches = iter(distributed.shard_eval(loader, self._dist))
            with self._sync_window():
                for batch_idx, batch in enumerate(batches):
                    for fn in batch_begin:
                        fn(batch_idx, {})
                    batch = self._to_device(batch)
                    step_logs = self.eval_step(batch)
                    if batch_idx == 0:
                        arguments.check_step_logs(step_logs)
                    tracker.add(step_logs, self._current_n)
                    for fn in batch_end:
                        fn(batch_idx, step_logs)
                    if self._interrupted():
                        break
            if tracker.count == 0 and self._dist.world_size == 1:
                raise ValueError("validation data yielded no batches; pass a non-empty DataLoader or None")
            logs = tracker.compute(self._dist.reduce)
            callbacks.fire("on_validation_end", dict(logs))
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
        non_blocking = pinned(loader, self.device)
        was_training = self._eval_module.training
        self._eval_module.eval()
        outputs: list[Any] = []
        try:
            for batch in loader:
                batch = move_to_device(batch, self.device, non_blocking)
                outputs.append(move_to_device(self.predict_step(batch), torch.device("cpu")))
        finally:
            self._eval_module.train(was_training)
        if not outputs:
            raise ValueError("predict: data yielded no batches")
        return concat_outputs(outputs)

    def _as_loader(
        self,
        data: Any,
        batch_size: int | None,
        shuffle: bool,
        name: str,
        training: bool = False,
        targets_optional: bool = False,
    ) -> Any:
        return as_loader(
            data, batch_size=batch_size, shuffle=shuffle, name=name, device=self.device, dist=self._dist,
            training=training, targets_optional=targets_optional,
        )  # fmt: skip

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides what happens next, as plain values and tensors (``weights_only``-loadable).

        Keys: ``model``/``optimizer``/``scaler`` (unsharded under FSDP: a collective, every rank calls
        it), ``trainer`` (:class:`TrainerState`), ``callbacks`` (each callback's state by key), and the
        parts that differ between ranks (:data:`PER_RANK`): ``rng`` (every generator now), ``epoch_rng``
        (the generators before this epoch's ``iter(loader)``, mid-epoch only), ``train_tracker`` (the
        epoch's running sums) and ``accumulation`` (a partial accumulation group's gradients). Also
        ``data`` (the training data's size), ``world_size`` and ``precision``, checked on load.
        """
        mid_epoch = self.state.batch_in_epoch > 0
        accumulation = self._accumulation.state_dict()
        accumulation["grads"] = None
        if self._accumulation.pending:  # mid accumulation group: the partial sums decide the next step
            if distributed.is_fsdp(self._dist):
                raise NotImplementedError(
                    "saving a checkpoint in the middle of an accumulation group is not supported "
                    "with strategy='fsdp' (the partial gradients are sharded); save at group "
                    "ends: ModelCheckpoint/BackupAndRestore(save_freq=a multiple of "
                    "accumulate_grad_batches) or 'epoch'"
                )
            accumulation["grads"] = [None if p.grad is None else p.grad.detach().cpu() for p in self.model.parameters()]
        return {
            "fitkit": checkpoint.header("full"),
            "model": distributed.full_model_state_dict(self.model, self._dist),  # unsharded under FSDP
            "model_class": type(self.model).__name__,
            "optimizer": distributed.full_optimizer_state_dict(self.model, self.optimizer, self._dist),
            "optimizer_class": type(self.optimizer).__name__,
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "trainer": self.state.state_dict(),
            "callbacks": self._callback_list().state_dict(),
            "rng": rng.capture(self._train_loader),
            "epoch_rng": self._epoch_rng if mid_epoch else None,
            "train_tracker": self._train_tracker.state_dict(),
            "accumulation": accumulation,
            "data": data_signature(self._train_loader),
            "world_size": self.world_size,
            "precision": self.precision,
        }

    #: The parts of :meth:`state_dict` that differ between the ranks of a distributed run: each rank's
    #: generators (dropout, its DataLoader workers' seeds), its share of the epoch's running sums, and
    #: its not yet all-reduced gradients. A checkpoint keeps every rank's under ``per_rank``.
    PER_RANK = ("rng", "epoch_rng", "train_tracker", "accumulation")

    def _callback_list(self) -> CallbackList:
        """This fit's callbacks; before the first fit, the ones given to the Trainer."""
        return self._callbacks if self._callbacks.callbacks else CallbackList(self.callbacks, self)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restores what :meth:`state_dict` returned, naming any mismatch before changing anything.

        With ``strict=False`` another world size, other data sizes and a model that only partly fits
        are accepted (what fits is loaded; the run is then not an exact continuation).
        """
        if not isinstance(state, dict) or state.get("fitkit", {}).get("kind") != "full":
            raise checkpoint.CheckpointError(
                "not a full fitkit checkpoint (a weights-only file?): load weights with "
                "model.load_state_dict(torch.load(path, weights_only=True))"
            )
        if per_rank := state.get("per_rank"):  # this rank's own part (with strict=False, the world size may differ)
            state = {**state, **per_rank[self._dist.rank % len(per_rank)]}
        model_state = state["model"]
        current = self.model.state_dict()
        if strict:
            checkpoint.check_fits(
                state, model=self.model, optimizer=self.optimizer, world_size=self.world_size,
                data=data_signature(self._train_loader),
            )  # fmt: skip
            distributed.load_full_model_state_dict(self.model, model_state, self._dist, strict=True)
        else:
            fitting = {
                k: v for k, v in model_state.items() if k in current and tuple(v.shape) == tuple(current[k].shape)
            }
            distributed.load_full_model_state_dict(self.model, fitting, self._dist, strict=False)
        try:
            distributed.load_full_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], self._dist)
        except (ValueError, KeyError) as exc:
            if strict:
                raise checkpoint.CheckpointError(
                    f"checkpoint optimizer state does not fit this optimizer: {exc}"
                ) from exc
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])
        self.state.load_state_dict(state["trainer"])
        self.state.should_stop, self.state.stop_reason = False, None
        self._callback_list().load_state_dict(state.get("callbacks", {}), strict=strict)
        self._train_tracker.load_state_dict(state["train_tracker"], self.device)
        acc = state.get("accumulation") or {}
        if acc.get("grads") is not None:
            for p, g in zip(self.model.parameters(), acc["grads"]):
                p.grad = None if g is None else g.to(p.device)
            self._accumulation.load_state_dict(acc)
        self._epoch_rng = state.get("epoch_rng")
        rng.restore(state["rng"], self._train_loader)

    def save_checkpoint(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Writes the full training state to ``path`` atomically; in a distributed run every rank's
        own part goes in and rank 0 writes (every rank must call it)."""
        path = Path(path)
        state = self.state_dict()
        everyone = distributed.gather_object({key: state[key] for key in self.PER_RANK}, self._dist)
        if self.world_size > 1:
            state["per_rank"] = everyone
        if self.is_global_zero:
            info = {
                "kind": "full",
                "epoch": self.state.epoch,
                "global_step": self.state.global_step,
                "batch_in_epoch": self.state.batch_in_epoch,
                **(meta or {}),
            }
            checkpoint.atomic_save(state, path, info)
        distributed.barrier(self._dist)
        return path

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        """Loads a checkpoint written by fitkit (verified, ``weights_only``) into this trainer."""
        self.load_state_dict(checkpoint.load(Path(path), map_location="cpu"), strict=strict)

    def model_state_dict(self) -> dict[str, Any]:
        """The model's weights, unsharded under FSDP (a collective: every rank calls it)."""
        return distributed.full_model_state_dict(self.model, self._dist)

    def _resume(self, resume: str | Path | None) -> None:
        """Loads the checkpoint ``fit(resume=...)`` names, or the one a :class:`ResumeSource` callback
        offers; every rank loads the file rank 0 chose."""
        if resume is None:  # a BackupAndRestore callback resumes the same script after a crash
            sources = [cb for cb in self._callbacks.callbacks if isinstance(cb, ResumeSource)]
            resume = next((p for cb in sources for p in [cb.resume_path()] if p is not None), None)
        resume = distributed.broadcast_object(resume, self._dist)  # every rank resumes as rank 0 does
        if resume is None:
            return
        path = distributed.broadcast_object(self._resume_path(resume), self._dist)  # one file for all ranks
        if path is not None:
            self.load_checkpoint(path)

    def _resume_path(self, resume: str | Path) -> Path | None:
        """An explicit (verified) path, or for ``"auto"`` the newest good checkpoint in the folders of
        this fit's checkpoint callbacks (None when there is none yet)."""
        if str(resume) != "auto":
            path = Path(resume)
            checkpoint.verify(path)
            return path
        folders = [Path(cb.checkpoint_dir) for cb in self._callbacks.callbacks if isinstance(cb, CheckpointWriter)]
        if not folders:
            raise ValueError(
                "resume='auto' looks in the folders of the trainer's checkpoint callbacks "
                "(ModelCheckpoint, BackupAndRestore), and this trainer has none; pass a path instead"
            )
        return checkpoint.newest_good(folders, "resume='auto': skipping bad checkpoint")

    # -- loop machinery -------------------------------------------------------------------------
    def _run_deferred(self) -> None:
        actions, self._deferred = self._deferred, []
        with self.allow_sync():  # checkpoint writes copy tensors to the host on purpose
            for action in actions:
                action()

    def _hooks_measured(self) -> None:
        self._hooks_timed = True

    @contextlib.contextmanager
    def _sync_window(self) -> Iterator[None]:
        """torch's sync debug mode on (``debug_sync`` on CUDA) while the batch loop's body runs.

        The window covers the per-batch work only (fetch, copy, step, per-batch hooks): epoch boundaries
        (logs, checkpoints, ``on_epoch_end``) synchronise on purpose, once per epoch. Callers create the
        iterator before they open it: the in-memory path copies the epoch's permutation there.
        """
        if not self.debug_sync or self.device.type != "cuda":
            yield
            return
        self._sync_debug_on = True
        try:
            with _sync_debug_mode("error" if self.debug_sync == "error" else "warn"):
                yield
        finally:
            self._sync_debug_on = False

    def _on_signal(self, signum: int) -> None:
        self.stop(f"interrupted by {signal.Signals(signum).name}")

    def _interrupted(self) -> bool:
        # In a distributed run every rank must do the same work: the collective _check_interrupt decides.
        return self._signals.signum is not None and self._dist.world_size == 1

    def _check_interrupt(self) -> None:
        signum = distributed.any_signal(self._signals.signum, self._dist)
        if signum is not None:
            raise TrainingInterrupted(signum)


# -- helpers ------------------------------------------------------------------------------------
_NO_CONTEXT = contextlib.nullcontext()  # reusable: the fp32 autocast and allow_sync() outside debug_sync


@contextlib.contextmanager
def _sync_debug_mode(mode: int | str) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


__all__ = ["CheckpointWriter", "ResumeSource", "Trainer", "TrainingInterrupted"]
