"""The Trainer and its loop: ``fit -> _run_epoch -> train_step``, top to bottom in this file.

The data path: batch -> ``_to_device`` -> ``train_step`` (forward, loss, backward, maybe an optimizer
step) -> `EpochTracker` (sums stay on the device) -> per-batch hooks -> epoch
logs (one host sync) -> ``on_epoch_end`` hooks -> deferred checkpoint writes.

What lives elsewhere: argument checks (``arguments.py``), turning data into loaders (``loaders.py``),
the callbacks of one fit and the slow-hook timer (``callback_list.py``), the epoch's running sums
(``tracker.py``), the state objects (``state.py``), signals (``signals.py``), files (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import math
import signal
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fitkit import (
    _compat,
    arguments,
    arrays,
    checkpoint,
    checks,
    distributed,
    rng,
    schedule,
    sharded_checkpoint,
    tensor_batches,
)
from fitkit.callback_list import CallbackList, HookTimer
from fitkit.callbacks.base import MID_EPOCH_HOOKS, Callback, may_stop_mid_epoch
from fitkit.callbacks.history import History
from fitkit.callbacks.progress import ProgressBar
from fitkit.data import batch_size_of, is_map_style, move_to_device, resume_loader_iterator, split_batch
from fitkit.devices import channels_last as to_channels_last
from fitkit.devices import pinned, resolve_device
from fitkit.loaders import (
    SkippableLoader,
    as_loader,
    concat_outputs,
    data_signature,
    num_batches,
    split_in_memory,
    take_rows,
)
from fitkit.lr_finder import LRFinder, LRFindResult
from fitkit.metrics import Metric, get_metric
from fitkit.signals import SignalGuard, TrainingInterrupted
from fitkit.state import GradientAccumulation, TrainerState
from fitkit.strategies import DDPStrategy, FSDPStrategy
from fitkit.summary import summarize
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
    val_loaders: dict[str | None, Any]  # {set name: loader}; a single set is named None; empty: no validation
    epochs: int | None  # None: until a max_steps/max_time budget ends the run
    steps_per_epoch: int | None
    validate_at: Callable[[int], bool]
    step_validation: schedule.StepValidation | None = None
    validation_steps: int | None = None
    max_steps: int | None = None
    max_time: float | None = None


class Trainer:
    """Trains a ``torch.nn.Module`` with Keras's ``fit`` / ``evaluate`` / ``predict``.

    Args:
        model: any ``torch.nn.Module``; moved to ``device`` when the Trainer is built.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters, a name (``"adam"``,
            ``"adamw"``, ``"sgd"``, ``"rmsprop"``, ``"adagrad"``) built with Keras's default learning rate, or
            a dict of named optimizers (``{"generator": opt_g, "discriminator": opt_d}``) for a custom
            [train_step][fitkit.Trainer.train_step] that steps each with [optimizer_step][fitkit.Trainer.optimizer_step]. An optimizer whose ``step``
            needs a closure (``LBFGS``) is driven with one by the default step.
        loss: a callable ``(outputs, targets) -> 0-dim tensor`` (an ``nn.Module`` loss included, also one
            with learnable parameters held by an optimizer), a name (``"cross_entropy"``, ``"mse"``,
            ``"mae"``, ``"huber"``, ``"bce_with_logits"``, ``"nll"``, ...), or None when the model's output
            holds the loss (a mapping with a ``"loss"`` key or an object with a ``.loss`` attribute) or a
            subclass's [compute_loss][fitkit.Trainer.compute_loss] computes it.
        metrics: metric names, ``fitkit.metrics.Metric`` objects, ``torchmetrics`` metrics or functions
            ``(outputs, targets) -> 0-dim tensor``; logged as ``<name>`` and ``val_<name>``. Unweighted, as
            Keras's ``metrics``.
        weighted_metrics: metrics weighted by each batch's sample weights (its third element,
            ``fit(sample_weight=...)`` or ``fit(class_weight=...)``): ``sum(w * value) / sum(w)``, as Keras's
            ``weighted_metrics``; names must differ from ``metrics``'.
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
        channels_last: use the channels-last memory format for the model and 4-D inputs (under FSDP, for
            the inputs only: FSDP2 shards contiguous parameters, and convolutions follow the input's format).
        strategy: ``"auto"`` (DDP when launched by torchrun with several processes), ``"ddp"``, ``"fsdp"``
            or ``"none"``; a [DDPStrategy][fitkit.DDPStrategy] or [FSDPStrategy][fitkit.FSDPStrategy] sets their options
            (``find_unused_parameters``, the blocks FSDP shards one by one, ...).
        debug_sync: on CUDA, make torch warn at every host-device synchronisation in the batch loops
            (training and validation), to find the ones your own code adds; ``"error"`` raises instead.
            fitkit's deliberate syncs (epoch logs, progress refreshes, checkpoint writes, fp16's GradScaler
            check) are not flagged; mark your own with [allow_sync][fitkit.Trainer.allow_sync]. No effect on other devices.
        handle_signals: on SIGINT/SIGTERM, stop at the next batch boundary, let checkpoint callbacks save,
            then exit with the conventional status (KeyboardInterrupt / exit code 143).
        process_group_timeout: seconds a collective waits before failing, when fitkit starts the process group.
        fast_tensor_batches: cut the batches of a training or validation ``DataLoader(TensorDataset(...))``
            (default collate, no workers) by indexing its tensors with the loader's own sampler indices, instead of
            collating samples one by one: the same batches and random draws, bit for bit, at in-memory
            speed. False: always iterate the DataLoader itself.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | str | Mapping[str, torch.optim.Optimizer],
        loss: Callable[[Any, Any], torch.Tensor] | str | None,
        metrics: Sequence[Any] | None = None,
        callbacks: Sequence[Callback] | None = None,
        *,
        weighted_metrics: Sequence[Any] | None = None,
        device: str | torch.device = "auto",
        precision: str | int = "32",
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        accumulate_grad_batches: int = 1,
        verbose: int = 1,
        compile: bool = False,
        channels_last: bool = False,
        strategy: str | DDPStrategy | FSDPStrategy = "auto",
        debug_sync: bool | str = False,
        handle_signals: bool = True,
        process_group_timeout: float = 1800.0,
        fast_tensor_batches: bool = True,
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
        arguments.check_flags(compile=compile, channels_last=channels_last, handle_signals=handle_signals)
        self.handle_signals = handle_signals
        self.callbacks: list[Callback] = arguments.check_callbacks(callbacks)

        self.strategy = distributed.resolve_strategy(strategy)
        self._dist = distributed.setup(strategy, self.device, process_group_timeout)  # with its options
        if self._dist.device is not None:
            self.device = self._dist.device
        if self.device.type == "cuda":  # the current device: its generator is the one checkpoints save (rng)
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device)
        if channels_last and not distributed.is_fsdp(self._dist):  # FSDP shards contiguous parameters only:
            self.model = self.model.to(memory_format=torch.channels_last)  # there the inputs alone are converted
        self.channels_last = channels_last
        self.optimizers = arguments.resolve_optimizers(optimizer, self.model)
        self.loss = arguments.resolve_loss(loss)
        if isinstance(self.loss, nn.Module):  # a learnable loss (its parameters may be in an optimizer)
            self.loss.to(self.device)
        arguments.check_optimizers_hold_model(self.optimizers, self.model, self.loss)
        self._closure_optimizers = [name for name, opt in self.optimizers.items() if arguments.needs_closure(opt)]
        arguments.check_step_setup(
            self.optimizers, self._closure_optimizers, self.precision, self.accumulate_grad_batches
        )
        self.metrics: list[Metric] = [get_metric(m) for m in arguments.metric_list(metrics)]
        self.weighted_metrics: list[Metric] = [
            get_metric(m) for m in arguments.metric_list(weighted_metrics, "weighted_metrics")
        ]
        arguments.check_metric_names(self.metrics + self.weighted_metrics)
        self._val_metrics = [copy.deepcopy(m) for m in self.metrics]
        self._val_weighted_metrics = [copy.deepcopy(m) for m in self.weighted_metrics]

        # The module that runs forward passes in training: compiled and/or wrapped for DDP.
        self._train_module: nn.Module = distributed.wrap_model(
            self.model, self.strategy, self._dist, list(self.optimizers.values()), precision=self.precision
        )
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
        self._train_tracker = EpochTracker(self.metrics + self.weighted_metrics)
        self._eval_tracker = EpochTracker(self._val_metrics + self._val_weighted_metrics)
        self._accumulation = GradientAccumulation()
        self._epoch_rng: dict[str, Any] | None = None  # the generators before this epoch's iter(loader)
        # The generators before an epoch's validation, while it runs: a checkpoint written then (SIGTERM)
        # records them, so the resumed run validates again from the same random state (exact resume).
        self._rng_before_validation: dict[str, Any] | None = None
        self.resumed_from: Path | None = None  # the checkpoint the current fit continues, if any
        self._check_batch = self._check_inputs = True  # fitkit's first-batch checks (checks.py) still to run
        self._non_finite_reported = self._unvoted_stop_warned = self._stop_vote = False
        if not isinstance(fast_tensor_batches, bool):
            raise TypeError(f"fast_tensor_batches must be True or False, got {fast_tensor_batches!r}")
        self.fast_tensor_batches = fast_tensor_batches
        # Per fit: what runs and how.
        self.epochs_planned: int | None = 0  # None: until max_steps/max_time ends the run
        self.validate_every_n_steps: int | None = None
        self.num_val_batches: dict[str | None, int | None] = {}  # per validation set (None: the single set)
        self.validation_set: str | None = None  # the named set being validated now (None: the single set)
        self.predicting_sharded = False  # predict: each rank predicts its own share (see predict)
        self._fast_batches = False  # this fit iterates a TensorDataset loader with tensor_batches
        self._plan = _FitPlan(None, {}, 0, None, lambda epoch: False)
        self._budget = schedule.Budget(None, None, self.state, decides=True)
        self.has_validation = False
        self.num_train_batches: int | None = None
        self._train_loader: Any = None
        self._callbacks = CallbackList([], self)
        self._metrics_in_use: list[Metric] = self.metrics  # the running phase's (training or validation)
        self._weighted_in_use: list[Metric] = self.weighted_metrics
        self._current_n = 0  # samples in the batch being processed
        self._non_blocking = False
        self._deferred: list[Callable[[], None]] = []
        self._signals = SignalGuard(self._on_signal, enabled=handle_signals)
        self._hooks_timed = False  # set once a HookTimer has measured this trainer's per-batch hooks
        self._sync_debug_on = False  # inside a debug_sync window (see _sync_window)
        self._last_scale: torch.Tensor | None = None
        self._stepped = False  # an optimizer stepped in this iteration (GradScaler.update and global_step)
        self._trainable_params: dict[str, list[torch.Tensor]] = {}  # backward(optimizer=name)'s inputs
        self._per_sample_loss: Callable[..., torch.Tensor] | None = None  # the loss with reduction="none"
        self._class_weight: torch.Tensor | None = None  # fit(class_weight=...) as a tensor by class index
        # What the per-batch hooks see: the batch on the device and the model's outputs of this step.
        self.batch: Any = None
        self.outputs: Any = None

    # -- public handles -------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The current epoch, 0-based (``state.epoch``; after ``fit``, the number of epochs done)."""
        return self.state.epoch

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far, over all epochs and resumes (``state.global_step``)."""
        return self.state.global_step

    @property
    def stop_training(self) -> bool:
        """Keras's flag: set it to True in a callback to end training after the current batch (the epoch's
        end hooks still run); [stop][fitkit.Trainer.stop] also records why."""
        return self.state.should_stop

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self.state.should_stop = bool(value)

    def stop(self, reason: str) -> None:
        """Ends training after the current batch (and the epoch's end hooks), recording why.

        Args:
            reason: why, in words (e.g. ``"EarlyStopping: val_loss did not improve for 3 epochs"``); kept in
                ``trainer.state.stop_reason`` and in checkpoints, and shown when ``fit`` ends.
        """
        self.state.should_stop = True
        self.state.stop_reason = reason

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer, when the trainer has one (see [optimizers][fitkit.Trainer.optimizers] for several)."""
        if len(self.optimizers) != 1:
            raise AttributeError(
                f"this trainer has {len(self.optimizers)} optimizers ({', '.join(self.optimizers)}): use "
                f"trainer.optimizers[name], e.g. trainer.optimizers[{next(iter(self.optimizers))!r}]"
            )
        return next(iter(self.optimizers.values()))

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        name = next(iter(self.optimizers)) if len(self.optimizers) == 1 else None
        if name is None:
            raise AttributeError("this trainer has several optimizers: replace one in trainer.optimizers[name]")
        if not isinstance(optimizer, torch.optim.Optimizer):  # a name is resolved only by the Trainer itself
            raise TypeError(
                f"trainer.optimizer must be set to a torch.optim.Optimizer over the model's parameters, got "
                f"{type(optimizer).__name__} {optimizer!r}; e.g. trainer.optimizer = torch.optim.Adam(model.parameters())"
            )
        self.optimizers = {name: optimizer}
        self._trainable_params.clear()

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
        """The number of processes training together (1 without torchrun)."""
        return self._dist.world_size

    @property
    def dist(self) -> distributed.DistInfo:
        """The distributed run as this trainer sees it (rank, world size, strategy); read-only."""
        return self._dist

    @property
    def active_callbacks(self) -> list[Callback]:
        """The callbacks of the current (or last) ``fit`` in the order they run: this rank's share of
        [callbacks][fitkit.Trainer.callbacks], then History and the progress bar."""
        return self._callbacks.callbacks

    def after_callbacks(self, action: Callable[[], None]) -> None:
        """Runs ``action`` once every callback has handled the current batch or epoch boundary.

        Checkpoint callbacks use it so that a checkpoint holds the state after all callbacks ran,
        whatever their order in the list.

        Args:
            action: a function of no arguments, run once, in the order the actions were registered.
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
        epochs: int | None = None,
        initial_epoch: int = 0,
        steps_per_epoch: int | None = None,
        validation_freq: int | Sequence[int] | None = 1,
        batch_size: int | None = None,
        shuffle: bool = True,
        validation_split: float = 0.0,
        resume: str | Path | None = None,
        sample_weight: Any = None,
        class_weight: Mapping[int, float] | None = None,
        drop_last: bool = False,
        validate_every_n_steps: int | None = None,
        validation_steps: int | None = None,
        max_steps: int | None = None,
        max_time: float | datetime.timedelta | None = None,
    ) -> History:
        """Trains for ``epochs`` epochs (counted from 0, so ``epochs`` is the index to stop before).

        Args:
            train_data: a DataLoader (or any re-iterable of batches), or in-memory tensors/NumPy arrays
                with ``batch_size``. Batches are read as Keras reads them: ``x`` (a tensor or a dict),
                ``(x,)`` (no targets: see [compute_loss][fitkit.Trainer.compute_loss]), ``(x, y)`` or ``(x, y, sample_weight)``.
            val_data: the same kinds, evaluated after each ``validation_freq``-th epoch; or a dict of named
                sets, ``{"clean": dl1, "noisy": dl2}``, logged as ``val_clean_loss``, ``val_noisy_loss``, ...
            epochs: the epoch to stop before, as in Keras (``initial_epoch=5, epochs=10`` trains 5 epochs).
                Default: 1; with ``max_steps``, as many epochs as those steps need; with ``max_time`` alone,
                no limit.
            initial_epoch: the epoch to start at (ignored when ``resume`` restores a position).
            steps_per_epoch: use at most this many batches per epoch (a new iterator every epoch).
            validation_freq: validate every N epochs (int), or after the listed 1-based epochs (Keras);
                0 or None: no epoch-level validation (with ``validate_every_n_steps``).
            batch_size: batch size for in-memory data (default 32, as in Keras).
            shuffle: shuffle in-memory training data every epoch (DataLoaders keep their own sampler).
            validation_split: fraction of in-memory training data held out for validation, taken from
                the end before shuffling (as in Keras).
            resume: a checkpoint path to continue from exactly, or ``"auto"`` for the newest good
                checkpoint of this trainer's checkpoint callbacks (none found: start from scratch).
            sample_weight: per-sample weights ``(N,)`` for in-memory training data (Keras): the loss of a
                batch is the batch mean of ``weight * per-sample loss``.
            class_weight: ``{class_index: weight}`` (Keras): each training sample's loss is weighted by its
                class's weight (classes not listed weigh 1.0); validation is not weighted.
            drop_last: leave out a last, shorter batch of in-memory training data.
            validate_every_n_steps: also validate after every N-th optimizer step of the run (counted
                across resumes); monitoring callbacks then decide after every validation. Step-level
                validations leave the random generators as they found them.
            validation_steps: at most this many batches of each validation set per validation.
            max_steps: stop once ``trainer.global_step`` reaches this many optimizer steps.
            max_time: stop at the first batch boundary after this much training time (seconds or a
                ``datetime.timedelta``; wall time in ``fit``'s loop, summed across resumes).

        Returns:
            the [History][fitkit.History] of this call.
        """
        resume = arguments.check_resume(resume)
        plan = self._prepare_fit(
            train_data, val_data, epochs, initial_epoch, steps_per_epoch, validation_freq, batch_size, shuffle,
            validation_split, sample_weight=sample_weight, class_weight=class_weight, drop_last=drop_last,
            validate_every_n_steps=validate_every_n_steps, validation_steps=validation_steps, max_steps=max_steps,
            max_time=max_time,
        )  # fmt: skip
        if self.verbose and self.is_global_zero:
            print(self.summary(), flush=True)  # from the modules' parameters: no forward pass
        with self._signals:
            try:
                self._callbacks.fire("on_train_begin", {})
                self._resume(resume)
                if plan.epochs is not None and self.state.epoch >= plan.epochs:
                    warnings.warn(
                        f"nothing to train: the run is at epoch {self.state.epoch} and epochs={plan.epochs}; "
                        "pass a larger epochs= to train further",
                        stacklevel=2,
                    )
                elif plan.max_steps is not None and self.state.global_step >= plan.max_steps:
                    warnings.warn(
                        f"nothing to train: the run is at step {self.state.global_step} and "
                        f"max_steps={plan.max_steps}; pass a larger max_steps= to train further",
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
        epochs: int | None,
        initial_epoch: int,
        steps_per_epoch: int | None,
        validation_freq: int | Sequence[int] | None,
        batch_size: int | None,
        shuffle: bool,
        validation_split: float,
        *,
        sample_weight: Any = None,
        class_weight: Mapping[int, float] | None = None,
        drop_last: bool = False,
        validate_every_n_steps: int | None = None,
        validation_steps: int | None = None,
        max_steps: int | None = None,
        max_time: Any = None,
    ) -> _FitPlan:
        """Checks fit's arguments, builds the loaders and binds this fit's callbacks; runs no hook."""
        if epochs is not None:
            arguments.check_int(epochs, "epochs", 0)
        arguments.check_int(initial_epoch, "initial_epoch", 0)
        arguments.check_flags(shuffle=shuffle, drop_last=drop_last)
        if steps_per_epoch is not None:
            arguments.check_int(steps_per_epoch, "steps_per_epoch", 1)
        every = schedule.check_optional_int(validate_every_n_steps, "validate_every_n_steps", "optimizer steps")
        validation_steps = schedule.check_optional_int(validation_steps, "validation_steps", "batches per set")
        max_steps = schedule.check_optional_int(max_steps, "max_steps", "optimizer steps of the whole run")
        max_time = schedule.resolve_max_time(max_time)
        validate_at = arguments.validation_schedule(schedule.check_validation_freq(validation_freq, every))
        if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
            raise TypeError(f"validation_split must be a fraction in [0, 1) such as 0.2, got {validation_split!r}")
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
        if validation_split and val_data is not None:
            raise ValueError("pass either val_data or validation_split, not both")
        if validation_split:
            train_data, val_data = split_in_memory(train_data, validation_split)
        train_loader = self._as_loader(
            train_data, batch_size, shuffle, "train_data", training=True, sample_weight=sample_weight,
            drop_last=drop_last,
        )  # fmt: skip
        self._class_weight = arguments.class_weight_tensor(class_weight, self.device)
        val_loaders = {} if val_data is None else self._as_val_loaders(val_data, batch_size, "val_data")
        if every is not None and not val_loaders:
            raise ValueError(
                f"validate_every_n_steps={every} needs validation data; pass val_data (or validation_split)"
            )
        self._train_loader = train_loader
        self._fast_batches = self.fast_tensor_batches and tensor_batches.eligible(train_loader)
        self.has_validation = bool(val_loaders)
        self.num_train_batches = num_batches(train_loader, steps_per_epoch)
        if self.num_train_batches == 0:
            raise ValueError(
                "train_data yields no batches (an empty dataset, or drop_last=True with fewer "
                "samples than batch_size); fit has nothing to train on"
            )
        steps_in_epoch = (
            None if self.num_train_batches is None else -(-self.num_train_batches // self.accumulate_grad_batches)
        )
        epochs = schedule.epochs_for(epochs, max_steps, max_time, steps_in_epoch)
        self.epochs_planned = epochs
        arguments.warn_unreachable_validation_epochs(validation_freq, epochs)
        self.validate_every_n_steps = every
        self.num_val_batches = {name: num_batches(loader, validation_steps) for name, loader in val_loaders.items()}

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
        checks.check_last_batch(self.model, train_loader, steps_per_epoch)
        if (
            steps_per_epoch is not None
            and self.num_train_batches is not None
            and self.num_train_batches < steps_per_epoch
        ):
            warnings.warn(
                f"steps_per_epoch={steps_per_epoch} but train_data holds {self.num_train_batches} batches: each "
                f"epoch ends after {self.num_train_batches} (the data runs out). Lower steps_per_epoch, or repeat "
                "the data",
                stacklevel=3,
            )
        self.resumed_from, self._rng_before_validation = None, None
        if self.state.run_id is None:  # rank 0's for every rank; a resume replaces it with the run's own
            self.state.run_id = distributed.broadcast_object(uuid.uuid4().hex, self._dist)
        self._check_batch = self._check_inputs = True
        self._non_finite_reported = self._unvoted_stop_warned = False
        return _FitPlan(
            train_loader, val_loaders, epochs, steps_per_epoch, validate_at,
            step_validation=None if every is None else schedule.StepValidation(every),
            validation_steps=validation_steps, max_steps=max_steps, max_time=max_time,
        )  # fmt: skip

    def _fit_loop(self, plan: _FitPlan) -> None:
        """The epochs: train, validate when scheduled, ``on_epoch_end``, deferred writes, stop check."""
        callbacks = self._callbacks
        self._plan = plan
        # Started after a resume loaded the time already spent; only rank 0's clock decides (see Budget).
        self._budget = schedule.Budget(plan.max_steps, plan.max_time, self.state, decides=self.is_global_zero)
        # Agreed by every rank (their callbacks differ: rank-0-only ones exist on rank 0 alone).
        self._stop_vote = self._dist.world_size > 1 and distributed.any_rank(self._may_stop_mid_epoch(), self._dist)
        epochs = itertools.count(self.state.epoch) if plan.epochs is None else range(self.state.epoch, plan.epochs)
        if plan.max_steps is not None and self.state.global_step >= plan.max_steps:
            return  # resumed at the step budget: nothing to train (fit warned)
        for epoch in epochs:
            self.state.epoch = epoch
            if self.state.batch_in_epoch == 0:  # a resumed epoch already ran on_epoch_begin
                self._train_tracker.reset()
                callbacks.fire("on_epoch_begin", epoch, {})
            logs = self._run_epoch(plan.train_loader, epoch, plan.steps_per_epoch)
            if not self._non_finite_reported and not math.isfinite(logs.get("loss", 0.0)):
                self._report_non_finite(epoch)
            if plan.val_loaders and plan.validate_at(epoch) and not self._interrupted():
                # Kept until validation completes (not in a finally: on_exception's checkpoint needs it).
                self._rng_before_validation = rng.capture(plan.train_loader)
                logs.update(self._epoch_validation(plan))
                self._rng_before_validation = None
            self._check_interrupt()
            logs.update(self._lr_logs())
            self._budget.elapsed()  # state.train_time, for the checkpoints written at the epoch's end
            callbacks.fire("on_epoch_end", epoch, logs)
            self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
            self._run_deferred()
            self.state.should_stop = distributed.any_rank(self.state.should_stop, self._dist)
            if self.state.should_stop:
                break

    def _may_stop_mid_epoch(self) -> bool:
        """Whether anything on this rank may stop training inside an epoch, so that the ranks must vote after
        every batch: a step or time budget (rank 0's clock decides), validation every N steps, a Trainer
        subclass (its step may), or a batch-level hook not declared ``stops_mid_epoch = False``."""
        plan = self._plan
        if plan.max_steps is not None or plan.max_time is not None or plan.step_validation is not None:
            return True
        if type(self) is not Trainer:
            return True
        return any(may_stop_mid_epoch(fn) for name in MID_EPOCH_HOOKS for fn in self._callbacks.hooks[name])

    def _unvoted_stop(self) -> None:
        if not self._unvoted_stop_warned:
            self._unvoted_stop_warned = True
            warnings.warn(
                f"training was stopped mid-epoch ({self.state.stop_reason or 'stop_training = True'}) by code that "
                "fitkit did not expect to stop there, in a distributed run whose ranks skip the per-batch stop "
                "vote: every rank stops at this epoch's end instead. A callback that stops in a batch-level hook "
                "must not declare stops_mid_epoch = False",
                stacklevel=2,
            )

    def _report_non_finite(self, epoch: int) -> None:
        """Warns once per fit, naming the epoch and the first bad batch (read back now, not per batch)."""
        self._non_finite_reported = True
        found = self._train_tracker.first_non_finite()
        batch = None if found is None else self.state.batch_in_epoch - found[1] + found[0]
        checks.warn_non_finite_loss(epoch, batch)

    def _fit_failed(self, exc: BaseException) -> BaseException:
        """Runs ``on_exception`` and returns what ``fit`` raises: a signal's conventional exit, the
        first failing rank's error in a distributed run, or ``exc`` itself."""
        self._deferred.clear()
        # Another rank's failure reaches this one as a failed collective: report the first failure. An error
        # that every rank raised together (a signal, a decision they agreed on) is no one rank's failure.
        together = isinstance(exc, TrainingInterrupted) or distributed.raised_on_every_rank(exc)
        peer_failure = None if together else distributed.on_failure(exc, self._dist)
        self._callbacks.fire("on_exception", exc)
        if isinstance(exc, TrainingInterrupted):
            return exc.exit_exception()
        return peer_failure if peer_failure is not None else exc

    def _run_epoch(self, loader: Any, epoch: int, steps: int | None) -> dict[str, float]:
        """One pass over the training data; returns the epoch's training logs (floats)."""
        self._train_module.train()
        self._metrics_in_use, self._weighted_in_use = self.metrics, self.weighted_metrics
        self._non_blocking = pinned(loader, self.device)
        hooks = self._callbacks.hooks
        batch_begin, batch_end = hooks["on_batch_begin"], hooks["on_batch_end"]
        tracker, total, state = self._train_tracker, self.num_train_batches, self.state
        accumulation, k = self._accumulation, self.accumulate_grad_batches
        distributed_run = self._dist.world_size > 1  # every rank must leave the loop at the same step
        vote = distributed.StopVote(self._dist) if self._stop_vote else None  # started after a batch, read at the next
        voted_stop = False
        train_step = self.train_step
        step_validation, budget = self._plan.step_validation, self._budget
        check_budget = budget.max_steps is not None or budget.max_time is not None
        batches = self._epoch_batches(loader, epoch, steps)
        if step_validation is not None and state.batch_in_epoch > 0 and step_validation.due(state):
            self._step_validation()  # resumed from a checkpoint written before this step's validation finished
            if state.should_stop:
                batches = iter(())
        try:
            with self._sync_window():
                for batch in batches:
                    if vote is not None and vote.stop_now():  # a rank stopped after the last batch: all stop there
                        voted_stop = True
                        break
                    batch_idx = state.batch_in_epoch
                    for fn in batch_begin:
                        fn(batch_idx, {})
                    self.batch = batch = self._to_device(batch)
                    self.outputs = None
                    accumulation.step_now = k == 1 or (batch_idx + 1) % k == 0 or batch_idx + 1 == total
                    if distributed_run and k > 1 and total is not None:  # no all-reduce while accumulating
                        distributed.set_grad_sync(self._train_module, accumulation.step_now)
                    step_logs = train_step(batch)
                    if self._stepped:
                        self._finish_iteration()
                    if batch_idx == 0:
                        arguments.check_step_logs(step_logs)
                    tracker.add(step_logs, self._current_n)
                    state.batch_in_epoch = batch_idx + 1
                    for fn in batch_end:
                        fn(batch_idx, step_logs)
                    if check_budget and not state.should_stop and (reason := budget.check()) is not None:
                        self.stop(reason)  # before the writes: a checkpoint of this batch holds its train_time
                    if self._deferred:
                        self._run_deferred()
                    if step_validation is not None and step_validation.due(state):
                        self._step_validation()
                    if vote is not None:  # read before the next batch's step; the epoch's end reads the last one
                        vote.start(state.should_stop)
                    elif state.should_stop:
                        if not distributed_run:
                            break
                        self._unvoted_stop()  # the other ranks cannot know: all stop at the epoch's end
        finally:
            # A failing step keeps this frame in the exception's traceback: drop the epoch's iterator here, so that
            # a DataLoader's workers shut down now. Left to a later garbage collection, multiprocessing's own
            # finalizers close their queues first and each worker is waited for 5 s, then killed.
            del batches
        if vote is not None and (voted_stop or vote.stop_now()) and not state.should_stop:
            self.stop("stopped on another rank")
        self._check_interrupt()
        if state.batch_in_epoch == 0:
            raise ValueError(
                f"train_data yielded no batches in epoch {epoch}; check the dataset and "
                "steps_per_epoch (an iterable dataset may be exhausted)"
            )
        if accumulation.pending:
            if state.should_stop:  # stopped mid-group (TerminateOnNaN, say): drop the partial group
                for optimizer in self.optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                accumulation.reset()
            else:
                for name in self.optimizers:
                    self.optimizer_step(name)
                self._finish_iteration()
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
            iterator: Iterator[Any] = tensor_batches.iterate(loader) if self._fast_batches else iter(loader)
        elif self._epoch_rng is None:
            raise RuntimeError("internal: mid-epoch resume without the epoch's random state")
        else:
            now, replayed = rng.capture(loader), None
            rng.restore(self._epoch_rng, loader)
            if isinstance(loader, SkippableLoader):  # in-memory batches: re-draw the permutation, start at skip
                loader.skip_next(skip)
                iterator = iter(loader)
            elif self._fast_batches or is_map_style(loader):
                resumed = tensor_batches.resume if self._fast_batches else resume_loader_iterator
                iterator = resumed(loader, skip)
                # The replay drew the whole epoch's indices from the loader's own generators, and a
                # RandomSampler draws once more when it is exhausted: keep them where the uninterrupted
                # epoch leaves them (a user's DataLoader(generator=g) then keeps its order in later epochs).
                total = num_batches(loader, None)
                if steps is None or (total is not None and steps > total):
                    replayed = rng.capture_loader(loader)
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
            if replayed is not None:
                rng.restore_loader(replayed, loader)
        if steps is not None:
            iterator = itertools.islice(iterator, max(0, steps - skip))
        return iterator

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward, [compute_loss][fitkit.Trainer.compute_loss], [backward][fitkit.Trainer.backward] and, at the end of an accumulation group, an
        [optimizer_step][fitkit.Trainer.optimizer_step] of every optimizer; returns ``{"loss": ...}``.

        Override it for custom logic (a GAN's two optimizers, several losses): call [forward][fitkit.Trainer.forward] (under
        [autocast][fitkit.Trainer.autocast]), [backward][fitkit.Trainer.backward] (``optimizer=`` routes gradients to one optimizer's
        parameters) and [optimizer_step][fitkit.Trainer.optimizer_step] as needed, set ``self.outputs`` for callbacks that want the
        outputs, and return a dict of 0-dim tensors (any keys); each is averaged over samples into the
        epoch logs. An optimizer whose ``step`` needs a closure (LBFGS) is stepped with one here.

        Args:
            batch: the batch as the data yields it, already on the trainer's device: Keras's layouts ``x``,
                ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` for the default step, any structure for yours.

        Returns:
            The step's values as 0-dim tensors, ``"loss"`` included; keep them on the device (no ``.item()``).
        """
        inputs, targets, sample_weight = split_batch(batch)
        if self._class_weight is not None:
            sample_weight = self._with_class_weight(targets, sample_weight)
        if self._closure_optimizers:
            return self._closure_step(inputs, targets, sample_weight)
        with self.autocast():
            self.outputs = outputs = self.forward(inputs)
            loss = self._loss(inputs, targets, outputs, sample_weight)
        self.backward(loss)
        if self._accumulation.step_now:
            for name in self.optimizers:
                self.optimizer_step(name)
        if self._metrics_in_use or self._weighted_in_use:
            self.update_metrics(outputs, targets, sample_weight)
        return {"loss": loss.detach()}

    def _closure_step(self, inputs: Any, targets: Any, sample_weight: Any) -> dict[str, torch.Tensor]:
        """The default step for an optimizer that re-evaluates the loss (LBFGS), as the hand-written loop
        does: ``optimizer.step(closure)`` with a closure that zeroes the gradients, runs forward and the
        loss, backward and clipping. The logged loss and the metrics are the first evaluation's (the loss
        before the step), which is what ``step`` returns."""
        (name,) = self._closure_optimizers
        optimizer = self.optimizers[name]
        first: list[Any] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                outputs = self.forward(inputs)
                loss = self._loss(inputs, targets, outputs, sample_weight)
            self.backward(loss)
            self._clip(optimizer)
            if not first:
                first.append(outputs)
            return loss

        loss = self.optimizer_step(name, closure=closure)
        self.outputs = first[0]
        if self._metrics_in_use or self._weighted_in_use:
            self.update_metrics(first[0], targets, sample_weight)
        return {"loss": loss.detach()}

    def compute_loss(self, inputs: Any, targets: Any, outputs: Any, sample_weight: Any = None) -> torch.Tensor:
        """The loss of a batch; the default steps call it. Override it for a loss the model's outputs do
        not give directly (a VAE's reconstruction + KL term); the override decides alone.

        Default: ``loss(outputs, targets)``; with ``sample_weight`` (a batch's third element, or
        ``fit(class_weight=...)``) the batch mean of ``weight * per-sample loss`` (Keras's "sum over batch
        size"); with ``loss=None``, the loss the model returned (``outputs["loss"]`` or ``outputs.loss``).

        Args:
            inputs: the batch's inputs (``x``), as the model received them.
            targets: the batch's targets (``y``), or None for a batch without them.
            outputs: the model's outputs for ``inputs``.
            sample_weight: one weight per sample, ``(N,)``, or None (unweighted).

        Returns:
            The batch's loss, a 0-dim tensor on the device.
        """
        if self.loss is None:
            return _loss_from_outputs(outputs)
        if targets is None:
            raise ValueError(
                "the batch has no targets, so the loss cannot be computed: batches are x or (x,) without "
                "targets. Yield (x, y) batches, or compute the loss yourself: override Trainer.compute_loss("
                "inputs, targets, outputs), or pass loss=None if the model returns its loss"
            )
        if self._check_batch:  # the first batch of a fit: checks.py (one deliberate read of its label range)
            self._check_batch = False
            with self.allow_sync():
                checks.check_loss_inputs(self.loss, outputs, targets)
            if self._class_weight is not None:
                checks.check_class_weight(self._class_weight, outputs)
        try:
            if sample_weight is None:
                return self.loss(outputs, targets)
            return self._weighted_loss(outputs, targets, sample_weight)
        except (IndexError, RuntimeError, ValueError, TypeError) as exc:  # a later batch: the same message
            explained = checks.explain_loss_error(exc, self.loss, outputs, targets)
            if explained is None:
                raise
            raise explained from exc

    def _with_class_weight(self, targets: Any, sample_weight: Any) -> Any:
        """The sample weights times ``fit(class_weight=...)``'s weight of each sample's class (training only,
        as in Keras; one-hot targets count as their argmax class)."""
        if targets is None or self._class_weight is None:
            return sample_weight
        classes = targets.argmax(dim=-1) if targets.ndim == 2 and targets.shape[1] > 1 else targets.reshape(-1)
        classes, size = classes.long(), self._class_weight.shape[0]
        known = (classes >= 0) & (classes < size)  # a class the dict does not list weighs 1.0 (no host read)
        weights = torch.where(known, self._class_weight[classes.clamp(0, size - 1)], 1.0)
        return weights if sample_weight is None else sample_weight * weights

    def _loss(self, inputs: Any, targets: Any, outputs: Any, sample_weight: Any) -> torch.Tensor:
        """[compute_loss][fitkit.Trainer.compute_loss], with ``sample_weight`` passed on only when there is one (an override
        written without the argument still works for unweighted data)."""
        if sample_weight is None:
            return self.compute_loss(inputs, targets, outputs)
        return self.compute_loss(inputs, targets, outputs, sample_weight)

    def _weighted_loss(self, outputs: Any, targets: Any, sample_weight: torch.Tensor) -> torch.Tensor:
        per_sample = self._per_sample_loss
        if per_sample is None:
            per_sample = self._per_sample_loss = arguments.per_sample_loss(self.loss)
        values = per_sample(outputs, targets)
        n = values.shape[0] if values.ndim else 1
        values = values.reshape(n, -1).mean(dim=1) if values.ndim > 1 else values.reshape(n)
        return (values * sample_weight.reshape(n).to(values.dtype)).sum() / n

    def eval_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward and [compute_loss][fitkit.Trainer.compute_loss] under ``no_grad`` in eval mode; override
        like [train_step][fitkit.Trainer.train_step].

        Args:
            batch: a validation batch, already on the trainer's device (the layouts ``train_step`` takes).

        Returns:
            ``{"loss": ...}`` and any other values, as 0-dim tensors; averaged over samples into the logs.
        """
        inputs, targets, sample_weight = split_batch(batch)
        with self.autocast():
            self.outputs = outputs = self.forward(inputs, training=False)
            loss = self._loss(inputs, targets, outputs, sample_weight)
        self.update_metrics(outputs, targets, sample_weight)
        return {"loss": loss}

    def predict_step(self, batch: Any) -> Any:
        """The model's outputs for a batch of inputs (targets, if the batch has them, are ignored).

        Args:
            batch: a batch of ``predict``'s data, already on the trainer's device.
        """
        inputs = split_batch(batch)[0]
        with self.autocast():
            return self.forward(inputs, training=False)

    def forward(self, inputs: Any, training: bool = True) -> Any:
        """Calls the model: a tensor as one argument, a tuple/list as positional and a dict as keyword
        arguments.

        Args:
            inputs: the model's input(s): a tensor, a tuple or list, or a dict.
            training: True (the default) calls the module training uses (DDP/FSDP-wrapped, compiled when
                ``compile=True``); False the one evaluation and prediction use. Train/eval mode is the loop's.
        """
        module = self._train_module if training else self._eval_module
        try:
            if isinstance(inputs, torch.Tensor):
                return module(inputs)
            if isinstance(inputs, dict):
                return module(**inputs)
            if isinstance(inputs, (list, tuple)):
                return module(*inputs)
            return module(inputs)
        except RuntimeError as exc:  # torch's shape error of a Linear/Conv: which layer, and what to fix
            explained = checks.explain_forward_error(exc, self.model, inputs)
            if explained is None:
                raise
            raise explained from exc

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The mixed-precision context of this trainer (a no-op at ``precision="32"``)."""
        if self._autocast_dtype is None:
            return _NO_CONTEXT
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def backward(self, loss: torch.Tensor, optimizer: str | None = None) -> None:
        """``loss.backward()`` with loss scaling (fp16) and the accumulation weight applied.

        Args:
            loss: a 0-dim tensor that requires grad.
            optimizer: the name of one of [optimizers][fitkit.Trainer.optimizers]: gradients then flow only into that
                optimizer's parameters (``backward(inputs=...)``), so a generator's loss never adds to the
                discriminator's gradients. None: every parameter, as ``loss.backward()``.
        """
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
        if optimizer is None:
            loss.backward()  # skips DDP's all-reduce on accumulating batches (see set_grad_sync in _run_epoch)
        else:
            loss.backward(inputs=self._trainable(optimizer))
        accumulation.pending = True

    def optimizer_step(self, name: str | None = None, closure: Callable[[], torch.Tensor] | None = None) -> Any:
        """Unscale, accumulate, clip, ``step``, ``zero_grad`` one optimizer; counts the step.

        Args:
            name: which of [optimizers][fitkit.Trainer.optimizers] (may be omitted when there is one).
            closure: for an optimizer that re-evaluates the loss (LBFGS): passed to its ``step``; the
                closure clips its own gradients (see the default [train_step][fitkit.Trainer.train_step]).

        Returns:
            what the optimizer's ``step`` returned (the closure's first loss for LBFGS; usually None).

        ``global_step`` counts training iterations in which an optimizer stepped (a GAN's two steps on one
        batch are one global step); ``state.optimizer_steps[name]`` counts each optimizer's own steps.
        """
        name = self._optimizer_name(name)
        optimizer, scaler, accumulation = self.optimizers[name], self._scaler, self._accumulation
        if self.accumulate_grad_batches > 1 and accumulation.units not in (0.0, 1.0):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            _compat.foreach_div_(grads, accumulation.units)
        if closure is None:
            self._clip(optimizer)
        for fn in self._callbacks.hooks["on_before_optimizer_step"]:
            fn()
        if scaler is not None:
            # Kept on the device: last_step_skipped compares it only when someone asks (fp16 only).
            scale = _compat.grad_scaler_scale(scaler)
            self._last_scale = None if scale is None else scale.detach().clone()
            with self.allow_sync():  # reads the inf flag on the host: fp16's one sync per step
                result = scaler.step(optimizer)
        elif closure is not None:
            # LBFGS reads the loss and gradient norms on the host to decide its line search and stop: the
            # price of a closure optimizer, so debug_sync does not flag it.
            with self.allow_sync():
                result = optimizer.step(closure)  # type: ignore[arg-type]  # torch types it as returning float; LBFGS documents a tensor
        else:
            result = optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accumulation.reset()
        steps = self.state.optimizer_steps
        steps[name] = steps.get(name, 0) + 1
        if not self._stepped:
            self._stepped = True
            self.state.global_step += 1
        return result

    def _clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Clips ``optimizer``'s gradients (after unscaling them, under fp16) when clipping is configured."""
        if self.grad_clip_norm is None and self.grad_clip_value is None:
            return
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)  # clip the real gradients, not the scaled ones
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(_params(optimizer), self.grad_clip_norm)
        if self.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(_params(optimizer), self.grad_clip_value)

    def _finish_iteration(self) -> None:
        """After a batch in which optimizers stepped: fp16's one ``GradScaler.update`` per iteration (as
        torch documents for several optimizers)."""
        self._stepped = False
        if self._scaler is not None:
            self._scaler.update()

    def _optimizer_name(self, name: str | None) -> str:
        if name is None:
            if len(self.optimizers) == 1:
                return next(iter(self.optimizers))
            raise ValueError(
                f"this trainer has {len(self.optimizers)} optimizers ({', '.join(self.optimizers)}): name the one "
                "to use, e.g. self.optimizer_step('generator') or self.backward(loss, optimizer='generator')"
            )
        if name not in self.optimizers:
            raise KeyError(f"no optimizer named {name!r}; this trainer's optimizers are {sorted(self.optimizers)}")
        return name

    def _trainable(self, name: str) -> list[torch.Tensor]:
        """The parameters of optimizer ``name`` that take gradients (cached; FSDP swaps them at build)."""
        params = self._trainable_params.get(name)
        if params is None:
            params = [p for p in _params(self.optimizers[self._optimizer_name(name)]) if p.requires_grad]
            self._trainable_params[name] = params
        return params

    def _lr_logs(self) -> dict[str, float]:
        """``lr`` (the first param group's) with one optimizer, ``lr_<name>`` for each of several."""
        if len(self.optimizers) == 1:
            return {"lr": float(self.optimizer.param_groups[0]["lr"])}
        return {f"lr_{name}": float(opt.param_groups[0]["lr"]) for name, opt in self.optimizers.items()}

    @property
    def last_step_skipped(self) -> bool:
        """True when fp16's GradScaler skipped the last optimizer step (inf/NaN gradients).

        Reads the scale back from the device (a host sync); always False without fp16.
        """
        scale = None if self._scaler is None else _compat.grad_scaler_scale(self._scaler)
        if scale is None or self._last_scale is None:
            return False
        return bool((scale < self._last_scale).item())

    def update_metrics(self, outputs: Any, targets: Any, sample_weight: torch.Tensor | None = None) -> None:
        """Updates the metrics of the running phase (training, or validation/evaluate); the weighted metrics
        get the batch's sample weights (unweighted without them, as in Keras).

        Args:
            outputs: the model's outputs for the batch (each metric selects its part with ``output=``).
            targets: the batch's targets.
            sample_weight: one weight per sample, ``(N,)``, or None.
        """
        for metric in self._metrics_in_use:
            metric.update(outputs, targets)
        for metric in self._weighted_in_use:
            metric.update(outputs, targets, sample_weight)

    def running_logs(self) -> dict[str, float]:
        """The training loss and metrics so far in this epoch (one host sync); in a distributed run, this
        rank's own (no collective: rank-0-only callbacks such as the progress bar call it)."""
        with self.allow_sync(), distributed.local_metric_values(self.metrics + self.weighted_metrics):
            return self._train_tracker.compute()

    def _to_device(self, batch: Any) -> Any:
        self._current_n = batch_size_of(batch)
        if self._check_inputs:  # the first batch of a fit: its dtypes against the model's (checks.py)
            self._check_inputs = False
            if self.precision == "32":
                checks.check_input_dtypes(split_batch(batch)[0], self.model)
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

        Args:
            data: a DataLoader, a re-iterable of batches, a generator (read once), or in-memory ``(x, y)``
                with ``batch_size``.
            batch_size: the batch size for in-memory data (default 32, as in Keras); an error with a DataLoader.
            callbacks: callbacks for this call only.

        Returns:
            ``loss`` and each metric as Python floats (no ``val_`` prefix); under torchrun, over all ranks.
        """
        loaders = self._as_val_loaders(data, batch_size, "data", single_pass=True)  # a generator: one pass
        return self._validate(loaders, "", CallbackList(arguments.check_callbacks(callbacks), self))

    def _as_val_loaders(
        self, data: Any, batch_size: int | None, name: str, single_pass: bool = False
    ) -> dict[str | None, Any]:
        """``{set name: loader}`` for validation data: one set (named None) or a dict of named sets."""
        return schedule.val_loaders(
            data, lambda one, where: self._as_loader(one, batch_size, False, where, single_pass=single_pass), name
        )

    def _epoch_validation(self, plan: _FitPlan) -> dict[str, float]:
        """The validation after an epoch; when a step-level validation just ran at this very step (the
        epoch's last), its logs, without validating the same weights twice."""
        last = self.history.validations[-1] if self.history.validations else None
        if last is not None and last["step"] == self.state.global_step == self.state.last_validation_step:
            return {k: v for k, v in last.items() if k not in ("step", "epoch")}
        # Like the hand-written loop, iter(val_loader) draws from the global generator here.
        return self._validate_in_fit(plan)

    def _step_validation(self) -> None:
        """A validation after an optimizer step (``validate_every_n_steps``), inside the batch loop.

        It leaves every random generator as it found it, so adding or moving step-level validations never
        changes training, and a run resumed from a checkpoint written before it finished runs it again
        with the same result. Its logs are not part of the epoch's logs (see ``history.validations``).
        """
        non_blocking = self._non_blocking
        saved = rng.capture()
        try:
            with self.allow_sync():  # the validation's sums are read back once, on purpose
                self._validate_in_fit(self._plan)
        finally:
            rng.restore(saved)
            self._non_blocking = non_blocking
        self._run_deferred()  # checkpoints decided on this validation hold its results

    def _validate_in_fit(self, plan: _FitPlan) -> dict[str, float]:
        """One validation of every set in ``fit`` (``on_validation_end`` also gets ``step`` and ``epoch``)."""
        return self._validate(plan.val_loaders, "val_", self._callbacks, plan.validation_steps, in_fit=True)

    @torch.no_grad()
    def _validate(
        self,
        loaders: dict[str | None, Any],
        prefix: str,
        callbacks: CallbackList,
        steps: int | None = None,
        in_fit: bool = False,
    ) -> dict[str, float]:
        """One validation: ``on_validation_begin``, every set's batches, ``on_validation_end``, in eval mode;
        the logs (``<prefix><set>_<key>``). A signal during it ends it with TrainingInterrupted before
        ``on_validation_end`` (no partial results). In ``fit``, ``state.last_validation_step`` is set before
        ``on_validation_end``, so that a checkpoint written after it does not validate again on resume."""
        was_training = self._train_module.training
        self._eval_module.eval()
        try:
            callbacks.fire("on_validation_begin", {})
            logs: dict[str, float] = {}
            for name, loader in loaders.items():
                self.validation_set = name
                try:
                    logs.update(
                        self._evaluate(loader, prefix if name is None else f"{prefix}{name}_", callbacks, steps)
                    )
                finally:
                    self.validation_set = None
                self._eval_module.eval()  # _evaluate put the mode back
            self._check_interrupt()
            end_logs: dict[str, Any] = dict(logs)
            if in_fit:
                self.state.last_validation_step = self.state.global_step
                end_logs.update(step=self.state.global_step, epoch=self.state.epoch)
            callbacks.fire("on_validation_end", end_logs)
        finally:
            self._train_module.train(was_training)
            self._eval_module.train(was_training)
        return logs

    @torch.no_grad()
    def _evaluate(
        self, loader: Any, prefix: str, callbacks: CallbackList, steps: int | None = None
    ) -> dict[str, float]:
        """One pass over one validation set (at most ``steps`` batches): its logs, keys prefixed."""
        hooks = callbacks.hooks
        was_training = self._train_module.training
        self._eval_module.eval()
        self._metrics_in_use, self._weighted_in_use = self._val_metrics, self._val_weighted_metrics
        self._non_blocking = pinned(loader, self.device)
        tracker = self._eval_tracker
        tracker.reset()
        try:
            batch_begin, batch_end = hooks["on_validation_batch_begin"], hooks["on_validation_batch_end"]
            loader = distributed.shard_eval(loader, self._dist)
            # The same fast path as training: validation DataLoader(TensorDataset) batches cut by indexing,
            # with the same draws (its iterator's base seed) as iterating the DataLoader.
            fast = self.fast_tensor_batches and tensor_batches.eligible(loader)
            batches = tensor_batches.iterate(loader) if fast else iter(loader)
            if steps is not None:
                batches = itertools.islice(batches, steps)
            try:
                with self._sync_window():
                    for batch_idx, batch in enumerate(batches):
                        for fn in batch_begin:
                            fn(batch_idx, {})
                        self.batch = batch = self._to_device(batch)
                        self.outputs = None
                        step_logs = self.eval_step(batch)
                        if batch_idx == 0:
                            arguments.check_step_logs(step_logs)
                        tracker.add(step_logs, self._current_n)
                        for fn in batch_end:
                            fn(batch_idx, step_logs)
                        if self._interrupted():
                            break
            finally:
                del batches  # as in _run_epoch: a DataLoader's workers shut down now, even on an exception
            if tracker.count == 0 and self._dist.world_size == 1:
                raise ValueError("validation data yielded no batches; pass a non-empty DataLoader or None")
            logs = tracker.compute(self._dist.reduce)
        finally:
            self._metrics_in_use, self._weighted_in_use = self.metrics, self.weighted_metrics
            self._train_module.train(was_training)
            self._eval_module.train(was_training)
        return {prefix + k: v for k, v in logs.items()}

    @torch.no_grad()
    def predict(
        self,
        data: Any,
        *,
        batch_size: int | None = None,
        callbacks: Sequence[Callback] | None = None,
        return_outputs: bool = True,
    ) -> Any:
        """The model's outputs over ``data``, concatenated along dim 0 on the CPU (tuples and dicts of
        outputs are concatenated element-wise).

        Args:
            data: a DataLoader, a re-iterable of batches, or in-memory ``x`` / ``(x, y)`` with ``batch_size``.
            batch_size: the batch size for in-memory data (default 32, as in Keras); an error with a DataLoader.
            callbacks: callbacks for this call only; they get ``on_predict_begin``/``_end`` and, per batch,
                ``on_predict_batch_begin``/``_end`` whose logs hold ``"outputs"`` (on the device) and
                ``"indices"`` (each output row's position in ``predict``'s result, a CPU LongTensor).
            return_outputs: False keeps nothing (returns None): with a
                [PredictionWriter][fitkit.callbacks.PredictionWriter], memory stays flat over any amount of data.

        Under torchrun each rank predicts its own share (samples rank, rank + world_size, ... when the data
        can be split; see ``"indices"``), and the returned outputs are gathered in order on every rank.
        """
        if not isinstance(return_outputs, bool):
            raise TypeError(f"return_outputs must be True or False, got {return_outputs!r}")
        loader = self._as_loader(data, batch_size, False, "data", single_pass=True)  # a generator: one pass
        callback_list = CallbackList(arguments.check_callbacks(callbacks), self)
        hooks = callback_list.hooks
        batch_begin, batch_end = hooks["on_predict_batch_begin"], hooks["on_predict_batch_end"]
        share, strided = distributed.shard_predict(loader, self._dist)
        self.predicting_sharded = strided
        rank, world = (self._dist.rank, self.world_size) if strided else (0, 1)
        non_blocking = pinned(loader, self.device)
        was_training = self._eval_module.training
        self._eval_module.eval()
        outputs: list[Any] = []
        positions: list[torch.Tensor] = []
        seen = 0  # rows predicted so far by this rank
        try:
            callback_list.fire("on_predict_begin", {})
            for batch_idx, batch in enumerate(share):
                for fn in batch_begin:
                    fn(batch_idx, {})
                batch = move_to_device(batch, self.device, non_blocking)
                if batch_idx == 0 and self.precision == "32":  # a DataLoader's float64 batches: say so (checks.py)
                    checks.check_input_dtypes(split_batch(batch)[0], self.model)
                batch_outputs = self.predict_step(batch)
                n = batch_size_of(batch)
                indices = torch.arange(seen, seen + n) * world + rank  # rows of the result (host only)
                seen += n
                if return_outputs:
                    outputs.append(move_to_device(batch_outputs, torch.device("cpu")))
                    positions.append(indices)
                for fn in batch_end:
                    fn(batch_idx, {"outputs": batch_outputs, "indices": indices})
            callback_list.fire("on_predict_end", {})
        finally:
            self._eval_module.train(was_training)
        if seen == 0 and not strided:
            raise ValueError("predict: data yielded no batches")
        if not return_outputs:
            return None
        if strided:  # every rank's share, put back in the data's order
            shares = distributed.gather_object((outputs, positions), self._dist)
            outputs = [o for part, _ in shares for o in part]
            order = torch.argsort(torch.cat([p for _, ranks in shares for p in ranks]))
            return take_rows(concat_outputs(outputs), order)
        return concat_outputs(outputs)

    def _as_loader(
        self, data: Any, batch_size: int | None, shuffle: bool, name: str, training: bool = False, **options: Any
    ) -> Any:
        # In-memory data as Keras reads it: Python lists converted, floats in the model's dtype (arrays.py).
        data = arrays.follow_model(
            arrays.from_python(data, name), arrays.model_float_dtype(self.model),
            isinstance(self.loss, checks.CLASSIFICATION_LOSSES),
        )  # fmt: skip
        return as_loader(
            data, batch_size=batch_size, shuffle=shuffle, name=name, device=self.device, dist=self._dist,
            training=training, **options,
        )  # fmt: skip

    # -- tools ----------------------------------------------------------------------------------
    def lr_find(
        self,
        train_data: Any,
        *,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_steps: int = 100,
        mode: str = "exponential",
        smooth: float = 0.05,
        stop_divergence: float | None = 4.0,
        batch_size: int | None = None,
    ) -> LRFindResult:
        """The learning-rate range test: up to ``num_steps`` optimizer steps with the rate of every param
        group of every optimizer growing from ``start_lr`` to ``end_lr`` (see `fitkit.lr_finder`).

        It runs this trainer's own loop on ``train_data`` (any kind ``fit`` takes; ``batch_size`` for
        in-memory data), with no callback of yours (nothing is logged or checkpointed), stops early when
        the smoothed loss passes ``stop_divergence`` times its best, and then leaves the trainer exactly
        as it found it: weights, every optimizer's and the GradScaler's state, callbacks, counters and
        every random generator, so a ``fit`` after it equals one without it, bit for bit. Under torchrun
        every rank runs it (the losses are averaged over the ranks).

        Args:
            train_data: the training data, any kind ``fit`` takes.
            start_lr: the first step's learning rate.
            end_lr: the last step's learning rate (> ``start_lr``).
            num_steps: optimizer steps to sweep over at most (>= 2); the data is repeated if needed.
            mode: ``"exponential"`` (rates evenly spaced on a log scale) or ``"linear"``.
            smooth: the weight of each new loss in the moving average, in (0, 1] (1: no smoothing).
            stop_divergence: stop when the smoothed loss passes this many times its best (> 1; None: only on
                a non-finite loss).
            batch_size: the batch size of in-memory data.

        Returns:
            an [LRFindResult][fitkit.lr_finder.LRFindResult] with ``lrs``, ``losses``, ``suggestion``, ``plot()``.
        """
        finder = LRFinder(start_lr, end_lr, num_steps, mode, smooth, stop_divergence)  # checks the arguments
        if distributed.is_fsdp(self._dist):
            raise NotImplementedError("lr_find does not support strategy='fsdp'; run it with strategy='ddp' or 'none'")
        with self._left_as_found(train_data):
            self.callbacks, self.verbose, self._hooks_timed = [finder], 0, True  # put back on exit
            self.fit(train_data, epochs=num_steps * self.accumulate_grad_batches, batch_size=batch_size)
        return finder.result

    @contextlib.contextmanager
    def _left_as_found(self, data: Any) -> Iterator[None]:
        """Restores on exit what a side run of the loop (``lr_find``) changes: every attribute binding,
        the weights (buffers, gradients, train/eval modes), every optimizer's and the GradScaler's state,
        the progress counters, the running sums, a pending accumulation group, and every random
        generator, ``data``'s own included."""
        optimizers = list(self.optimizers.values())
        attributes = dict(vars(self))
        saved: dict[str, Any] = copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "grads": [p.grad for p in self.model.parameters()],
                "optimizers": [o.state_dict() for o in optimizers],
                "scaler": None if self._scaler is None else self._scaler.state_dict(),
                "state": self.state.state_dict(),
                "tracker": self._train_tracker.state_dict(),
                "accumulation": self._accumulation.state_dict(),
            }
        )
        step_counts = [o.__dict__.get("_step_count") for o in optimizers]  # an LR scheduler's step counter
        modes = [m.training for m in self.model.modules()]
        generators, data_generators = rng.capture(self._train_loader), rng.capture(data)
        try:
            yield
        finally:
            vars(self).clear()
            vars(self).update(attributes)
            self.model.load_state_dict(saved["model"])
            for param, grad in zip(self.model.parameters(), saved["grads"]):
                param.grad = grad
            for optimizer, state, count in zip(optimizers, saved["optimizers"], step_counts):
                optimizer.load_state_dict(state)
                if count is not None:
                    optimizer.__dict__["_step_count"] = count
            if self._scaler is not None:
                self._scaler.load_state_dict(saved["scaler"])
            self.state.load_state_dict(saved["state"])
            self._train_tracker.load_state_dict(saved["tracker"], self.device)
            self._accumulation.load_state_dict(saved["accumulation"])
            for module, training in zip(self.model.modules(), modes):
                module.training = training
            rng.restore(data_generators, data)
            rng.restore(generators, self._train_loader)

    def summary(self, depth: int = 1) -> str:
        """A Keras-like table of the model: each child module down to ``depth`` levels with its type and
        parameter count, the trainable and non-trainable totals, the parameters' memory, the device and
        precision, and during (or after) a fit the training and validation sizes. Runs no forward pass.
        ``fit`` prints it once at the start when ``verbose >= 1``, on rank 0.

        Args:
            depth: levels of child modules to list (0: totals only).
        """
        return summarize(self, depth)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self, *, weights: bool = True) -> dict[str, Any]:
        """Everything that decides what happens next, as plain values and tensors (``weights_only``-loadable).

        ``weights=False`` leaves out ``model`` and ``optimizers`` (None): a sharded checkpoint
        (`fitkit.sharded_checkpoint`) writes them shard by shard instead of gathering them.

        Keys: ``model``/``optimizers`` (by name)/``scaler`` (unsharded under FSDP: a collective, every rank
        calls it), ``loss`` (a learnable loss module's state), ``trainer`` ([TrainerState][fitkit.TrainerState]), ``callbacks`` (each callback's state by key), and the
        parts that differ between ranks ([PER_RANK][fitkit.Trainer.PER_RANK]): ``rng`` (every generator now), ``epoch_rng``
        (the generators before this epoch's ``iter(loader)``, mid-epoch only), ``train_tracker`` (the
        epoch's running sums) and ``accumulation`` (a partial accumulation group's gradients). Also
        ``data`` (the training data's size), ``world_size`` and ``precision``, checked on load.

        Args:
            weights: False leaves ``model`` and ``optimizers`` out (None); keyword only, default True.
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
            "model": distributed.full_model_state_dict(self.model, self._dist) if weights else None,  # FSDP: gathered
            "model_class": type(self.model).__name__,
            "optimizers": {
                name: distributed.full_optimizer_state_dict(self.model, opt, self._dist)
                for name, opt in self.optimizers.items()
            }
            if weights
            else None,
            "optimizer_classes": {name: type(opt).__name__ for name, opt in self.optimizers.items()},
            "loss": self.loss.state_dict() if isinstance(self.loss, nn.Module) else None,
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "trainer": self.state.state_dict(),
            "callbacks": self._callback_list().state_dict(),
            "rng": self._rng_before_validation or rng.capture(self._train_loader),
            "epoch_rng": self._epoch_rng if mid_epoch else None,
            "train_tracker": self._train_tracker.state_dict(),
            "accumulation": accumulation,
            "data": data_signature(self._train_loader),
            "world_size": self.world_size,
            "precision": self.precision,
        }

    #: The parts of `state_dict` that differ between the ranks of a distributed run: each rank's
    #: generators (dropout, its DataLoader workers' seeds), its share of the epoch's running sums, and
    #: its not yet all-reduced gradients. A checkpoint keeps every rank's under ``per_rank``.
    PER_RANK = ("rng", "epoch_rng", "train_tracker", "accumulation")

    def _callback_list(self) -> CallbackList:
        """This fit's callbacks; before the first fit, the ones given to the Trainer."""
        return self._callbacks if self._callbacks.callbacks else CallbackList(self.callbacks, self)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, *, weights: bool = True) -> None:
        """Restores what [state_dict][fitkit.Trainer.state_dict] returned, naming any mismatch before changing anything.

        With ``strict=False`` another world size, other data sizes and a model that only partly fits
        are accepted (what fits is loaded; the run is then not an exact continuation). ``weights=False``
        restores everything but the model and optimizers, and checks nothing (the caller did).

        Args:
            state: what ``state_dict`` returned (read back from a checkpoint).
            strict: True (the default) refuses a state that would not continue the run exactly.
            weights: False skips the model and optimizers (keyword only, default True).

        Raises:
            CheckpointError: a state that does not fit this trainer, naming each mismatch.
        """
        if not isinstance(state, dict) or state.get("fitkit", {}).get("kind") != "full":
            raise checkpoint.CheckpointError(
                "not a full fitkit checkpoint (a weights-only file?): load weights with "
                "model.load_state_dict(torch.load(path, weights_only=True))"
            )
        if per_rank := state.get("per_rank"):  # this rank's own part (with strict=False, the world size may differ)
            state = {**state, **per_rank[self._dist.rank % len(per_rank)]}
        state = checkpoint.upgrade(state)
        if weights:  # False: a sharded checkpoint checked and loaded them (sharded_checkpoint.load)
            model_state = state["model"]
            current = self.model.state_dict()
            if strict:
                checkpoint.check_fits(
                    state, model=self.model, optimizers=self.optimizers, world_size=self.world_size,
                    data=data_signature(self._train_loader),
                )  # fmt: skip
                distributed.load_full_model_state_dict(self.model, model_state, self._dist, strict=True)
            else:
                fitting = {
                    k: v for k, v in model_state.items() if k in current and tuple(v.shape) == tuple(current[k].shape)
                }
                distributed.load_full_model_state_dict(self.model, fitting, self._dist, strict=False)
            for name, optimizer in self.optimizers.items():
                try:
                    distributed.load_full_optimizer_state_dict(
                        self.model, optimizer, state["optimizers"][name], self._dist
                    )
                except (ValueError, KeyError) as exc:
                    if strict:
                        raise checkpoint.CheckpointError(
                            f"checkpoint state of optimizer {name!r} does not fit this optimizer: {exc}"
                        ) from exc
        if isinstance(self.loss, nn.Module) and state.get("loss") is not None:
            self.loss.load_state_dict(state["loss"], strict=strict)
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
        own part goes in and rank 0 writes (every rank must call it). Under FSDP ``path`` becomes a
        sharded (DCP) checkpoint directory that every rank writes its shard of (`fitkit.sharded_checkpoint`).

        Args:
            path: the file (or, under FSDP, the directory) to write; recorded in its folder's manifest.
            meta: plain values to record with it in the manifest, next to the epoch and step.

        Returns:
            ``path`` as a ``Path``.
        """
        arguments.check_path(path, "save_checkpoint")
        if distributed.is_fsdp(self._dist):
            return sharded_checkpoint.save(self, path, {"run": self.state.run_id, **(meta or {})})
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
                "run": self.state.run_id,  # ModelCheckpoint knows its run's files by it (after a crash, say)
                **(meta or {}),
            }
            checkpoint.atomic_save(state, path, info)
        distributed.barrier(self._dist)
        return path

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        """Loads a checkpoint written by fitkit (verified, ``weights_only``) into this trainer; a sharded
        (DCP) checkpoint directory loads into any trainer, each rank reading its part.

        Args:
            path: a checkpoint file, or a sharded checkpoint directory.
            strict: as in [load_state_dict][fitkit.Trainer.load_state_dict] (default True).
        """
        arguments.check_path(path, "load_checkpoint")
        if Path(path).is_dir():
            sharded_checkpoint.load(self, path, strict=strict)
            return
        self.load_state_dict(checkpoint.load(Path(path), map_location="cpu"), strict=strict)

    def model_state_dict(self) -> dict[str, Any]:
        """The model's weights, unsharded under FSDP (a collective: every rank calls it)."""
        return distributed.full_model_state_dict(self.model, self._dist)

    def _resume(self, resume: str | Path | None) -> None:
        """Loads the checkpoint ``fit(resume=...)`` names, or the one a `ResumeSource` callback
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
            self.resumed_from = path

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
        outer, self._sync_debug_on = self._sync_debug_on, True
        try:
            with _sync_debug_mode("error" if self.debug_sync == "error" else "warn"):
                yield
        finally:
            self._sync_debug_on = outer  # a step-level validation's window sits inside the training one

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


def _loss_from_outputs(outputs: Any) -> torch.Tensor:
    """The loss a model returned itself (``loss=None``): ``outputs["loss"]`` or ``outputs.loss``."""
    if isinstance(outputs, Mapping) and "loss" in outputs:
        loss = outputs["loss"]
    elif not isinstance(outputs, Mapping) and getattr(outputs, "loss", None) is not None:
        loss = outputs.loss
    else:
        keys = f" (keys: {sorted(outputs)})" if isinstance(outputs, Mapping) else ""
        raise ValueError(
            f"loss=None means the model computes its loss, but its output ({type(outputs).__name__}{keys}) holds "
            "none: return a mapping with a 'loss' key or an object with a .loss attribute (as Hugging Face "
            "models do when given labels), pass a loss= to the Trainer, or override Trainer.compute_loss"
        )
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the model's output 'loss' must be a tensor, got {type(loss).__name__}")
    return loss


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


__all__ = ["CheckpointWriter", "ResumeSource", "Trainer", "TrainingInterrupted"]
