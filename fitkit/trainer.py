"""The Trainer: what outlives one call (model, optimizers, loss, configuration, state, callbacks), the steps a
subclass overrides, and the entry points ``fit`` / ``evaluate`` / ``predict``.

Elsewhere: one call's state and loop in ``_run.py``, the data path in ``_pipeline.py``, one process vs DDP vs FSDP
in ``strategies.py``, argument checks in ``_arguments.py``, the callbacks of a call in ``_callback_list.py``, files in
``checkpoint.py``. One training batch: ``_pipeline.TrainBatches`` yields it, ``DeviceFeed`` puts it on the device,
``FitRun.run_batch`` calls ``Trainer.train_step`` (forward, ``compute_loss``, ``backward``, ``optimizer_step``),
the sums stay on the device (``_tracker.py``), the hooks run, ``FitRun.after_batch`` does budgets, saves, validation.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import signal
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from fitkit import _arguments, _compat, _pipeline, _reshard, checkpoint, distributed, memory, rng, slurm, strategies
from fitkit._callback_list import CallbackList, HookTimer
from fitkit._devices import resolve_device
from fitkit._loaders import data_signature
from fitkit._precision import Precision
from fitkit._run import FitRun, MetricSet, Run, plan_fit
from fitkit._steps import Steps
from fitkit.callbacks import _files
from fitkit.callbacks.base import Callback
from fitkit.callbacks.history import History
from fitkit.callbacks.progress import ProgressBar
from fitkit.lr_finder import LRFinder, LRFindResult
from fitkit.metrics import get_metric
from fitkit.remote import resolve_resume
from fitkit.signals import SignalGuard, TrainingInterrupted
from fitkit.state import GradientAccumulation, TrainerState
from fitkit.strategies import DDPStrategy, FSDPStrategy
from fitkit.summary import summarize


@runtime_checkable
class CheckpointWriter(Protocol):
    """A callback that writes full checkpoints into ``checkpoint_dir`` (``resume="auto"`` looks there)."""

    checkpoint_dir: Path


@runtime_checkable
class ResumeSource(Protocol):
    """A callback that names the checkpoint a ``fit(resume=None)`` continues from (BackupAndRestore)."""

    def resume_path(self) -> Path | None: ...


class _Modules(NamedTuple):
    """The modules that run forward passes: ``train`` (DDP-wrapped or sharded, compiled with ``compile=True``)
    and ``eval`` (the plain or compiled model)."""

    train: nn.Module
    eval: nn.Module


class Trainer(Steps, memory.BatchSizeSearch):
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
        accumulate_grad_batches: batches summed into each optimizer step (equal to one step on a batch that many
            times larger, sample-weighted), or a schedule by epoch, ``{0: 8, 4: 4}`` (1 before its first key).
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
        requeue_signal: the signal on which to stop as for SIGTERM, save, run ``scontrol requeue $SLURM_JOB_ID``
            (global rank 0) and exit with status 0 (`fitkit.slurm`); ``"auto"``: SIGUSR1 inside a SLURM job
            (``sbatch --signal=USR1@90``), None outside one; None: off.
        process_group_timeout: seconds a collective waits before failing, when fitkit starts the process group.
        fast_tensor_batches: cut the batches of a training or validation ``DataLoader(TensorDataset(...))``
            (default collate, no workers) by indexing its tensors with the loader's own sampler indices, instead of
            collating samples one by one: the same batches and random draws, bit for bit, at in-memory
            speed. False: always iterate the DataLoader itself.
        activation_checkpointing: recompute the activations of ``True``: the blocks FSDP's policy picks, a list of
            block classes (names), or a function ``module -> bool``, in backward (see `fitkit.memory`); bit-identical.
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
        accumulate_grad_batches: int | Mapping[int, int] = 1,
        verbose: int = 1,
        compile: bool = False,
        channels_last: bool = False,
        strategy: str | DDPStrategy | FSDPStrategy = "auto",
        debug_sync: bool | str = False,
        handle_signals: bool = True,
        requeue_signal: int | str | None = "auto",
        process_group_timeout: float = 1800.0,
        fast_tensor_batches: bool = True,
        activation_checkpointing: Any = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.device = resolve_device(device)
        self.precision = _arguments.resolve_precision(precision, self.device)
        self.grad_clip_norm = _arguments.positive_or_none(grad_clip_norm, "grad_clip_norm")
        self.grad_clip_value = _arguments.positive_or_none(grad_clip_value, "grad_clip_value")
        self.accumulate_grad_batches, schedule = _arguments.check_accumulate_grad_batches(accumulate_grad_batches)
        self.verbose = _arguments.check_verbose(verbose)
        self.debug_sync = _arguments.check_debug_sync(debug_sync)
        _arguments.check_flags(
            compile=compile, channels_last=channels_last, handle_signals=handle_signals,
            fast_tensor_batches=fast_tensor_batches,
        )  # fmt: skip
        self.handle_signals, self.compile, self.channels_last = handle_signals, compile, channels_last
        self.fast_tensor_batches = fast_tensor_batches
        self.callbacks: list[Callback] = _arguments.check_callbacks(callbacks)

        name = strategies.name_of(strategy)  # checks it before any process group is joined
        self._strategy = strategies.build(strategy, distributed.setup(name, self.device, process_group_timeout))
        if self.dist.device is not None:
            self.device = self.dist.device
        if self.device.type == "cuda":  # the current device: its generator is the one checkpoints save (rng)
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device)
        if channels_last:
            self.model = self._strategy.channels_last(self.model)
        self.optimizers = _arguments.resolve_optimizers(optimizer, self.model)
        self.loss = _arguments.resolve_loss(loss)
        if isinstance(self.loss, nn.Module):  # a learnable loss (its parameters may be in an optimizer)
            self.loss.to(self.device)
        _arguments.check_optimizers_hold_model(self.optimizers, self.model, self.loss)
        self._closure_optimizers = [name for name, opt in self.optimizers.items() if _arguments.needs_closure(opt)]
        _arguments.check_step_setup(
            self.optimizers, self._closure_optimizers, self.precision, max([self.accumulate_grad_batches, *schedule.values()])
        )  # fmt: skip
        train_metrics = [get_metric(m) for m in _arguments.metric_list(metrics)]
        weighted = [get_metric(m) for m in _arguments.metric_list(weighted_metrics, "weighted_metrics")]
        _arguments.check_metric_names(train_metrics + weighted, self.loss, self.model)
        self._train_set = MetricSet(train_metrics, weighted)
        self._val_set = MetricSet(copy.deepcopy(train_metrics), copy.deepcopy(weighted))
        memory.checkpoint_blocks(self.model, activation_checkpointing)  # before DDP/FSDP wrap the model
        self._modules = self._forward_modules()
        self._amp = Precision(self.precision, self.device)

        # Progress and resumable state (Trainer.state_dict gathers each part).
        self.state = TrainerState()
        self.history = History()
        self._accumulation = GradientAccumulation(schedule=schedule)
        self._epoch_rng: dict[str, Any] | None = None  # the generators before this epoch's iter(loader)
        self._trainable_params: dict[str, list[torch.Tensor]] = {}  # backward(optimizer=name)'s inputs
        self._signals = SignalGuard(self._on_signal, handle_signals, slurm.resolve_requeue_signal(requeue_signal))
        self._hooks_timed = False  # set once a HookTimer has measured this trainer's per-batch hooks
        # The current (or last) call's state: fit, evaluate or predict (see _run.py). None has run yet.
        self._run = Run(self, CallbackList([], self))

    def _forward_modules(self) -> _Modules:
        """The module training runs (wrapped or sharded by the strategy, compiled with ``compile=True``) and
        the one evaluation runs (compiled too; FSDP shards in place, so there the two are one)."""
        train_module = self._strategy.wrap(self.model, list(self.optimizers.values()), self.precision)
        eval_module = self.model
        if self.compile:
            train_module = torch.compile(train_module)  # type: ignore[assignment]
            eval_module = torch.compile(self.model) if train_module is not self.model else train_module  # type: ignore[assignment]
        return _Modules(train_module, eval_module)

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
        _arguments.check_optimizers_hold_model({name: optimizer}, self.model, self.loss)  # the build's checks
        closure = [name] if _arguments.needs_closure(optimizer) else []
        _arguments.check_step_setup({name: optimizer}, closure, self.precision, self.accumulate_grad_batches)
        self.optimizers, self._closure_optimizers = {name: optimizer}, closure
        self._trainable_params.clear()

    @property
    def train_loader(self) -> Any:
        """The training batches of the current (or last) ``fit``: the DataLoader as fitkit iterates it
        (with a DistributedSampler under DDP), or the in-memory batcher; None before the first ``fit``."""
        plan = self._run_of_fit().plan
        return None if plan is None else plan.train.loader

    @property
    def is_global_zero(self) -> bool:
        """True in the process that writes files (rank 0; always True without distribution)."""
        return self.dist.rank == 0

    @property
    def world_size(self) -> int:
        """The number of processes training together (1 without torchrun)."""
        return self.dist.world_size

    @property
    def dist(self) -> distributed.DistInfo:
        """The distributed run as this trainer sees it (rank, world size, strategy); read-only."""
        return self._strategy.info

    @property
    def shards_parameters(self) -> bool:
        """Every rank holds a shard of each parameter (``strategy="fsdp"``): code that reads or writes whole
        parameters must gather them."""
        return self._strategy.shards_parameters

    @property
    def strategy(self) -> str:
        """The strategy at work: ``"none"`` (one process), ``"ddp"`` or ``"fsdp"``."""
        return self._strategy.name

    @property
    def active_callbacks(self) -> list[Callback]:
        """The callbacks of the current (or last) ``fit`` in the order they run: this rank's share of
        [callbacks][fitkit.Trainer.callbacks], then History and the progress bar."""
        return self._run_of_fit().callbacks.callbacks

    def after_callbacks(self, action: Callable[[], None]) -> None:
        """Runs ``action`` once every callback has handled the current batch or epoch boundary, in the order given:
        a checkpoint then holds the state after all callbacks ran, whatever their order.

        Args:
            action: a function of no arguments, called after the last callback's hook."""
        self._run.deferred.append(action)

    # -- what the current (or last) call is doing --------------------------------------------------
    @property
    def batch(self) -> Any:
        """The batch being processed, on the device (per-batch hooks read it); None outside a call."""
        return self._run.batch

    @property
    def outputs(self) -> Any:
        """The model's outputs for the current batch, when the step sets them (a custom ``train_step`` sets
        ``self.outputs`` for callbacks that want them)."""
        return self._run.outputs

    @outputs.setter
    def outputs(self, value: Any) -> None:
        self._run.outputs = value

    @property
    def has_validation(self) -> bool:
        """The current (or last) ``fit`` validates."""
        plan = self._run_of_fit().plan
        return plan is not None and bool(plan.val_loaders)

    @property
    def num_train_batches(self) -> int | None:
        """Training batches per epoch of the current (or last) ``fit`` (None: unknown, or no fit yet)."""
        plan = self._run_of_fit().plan
        return None if plan is None else plan.num_train_batches

    @property
    def num_val_batches(self) -> dict[str | None, int | None]:
        """Batches per validation of each set of the current (or last) ``fit`` (None: the single set)."""
        plan = self._run_of_fit().plan
        return {} if plan is None else plan.num_val_batches

    @property
    def validate_every_n_steps(self) -> int | None:
        """``fit(validate_every_n_steps=...)`` of the current (or last) ``fit``."""
        plan = self._run_of_fit().plan
        return None if plan is None or plan.step_validation is None else plan.step_validation.every

    @property
    def epochs_planned(self) -> int | None:
        """The epoch the current (or last) ``fit`` stops before (None: until a budget ends it; 0: no fit)."""
        plan = self._run_of_fit().plan
        return 0 if plan is None else plan.epochs

    @property
    def steps_planned(self) -> int | None:
        """The global step the current (or last) ``fit`` ends at (None: unknown, e.g. data of unknown length)."""
        plan = self._run_of_fit().plan
        return None if plan is None else plan.last_step

    @property
    def resumed_from(self) -> Path | None:
        """The checkpoint the current (or last) ``fit`` continues, if any."""
        return self._run_of_fit().resumed_from

    @property
    def validation_set(self) -> str | None:
        """The named validation set being validated now (None: the single set, or none)."""
        return self._run.validation_set

    @property
    def predicting_sharded(self) -> bool:
        """``predict`` splits the data over the ranks (each predicts its own share; see ``predict``)."""
        return self._run.predicting_sharded

    def _run_of_fit(self) -> Run:
        """The current call's run, or during ``evaluate``/``predict`` inside a fit, the fit's."""
        run = self._run
        while run.outer is not None and run.plan is None:
            run = run.outer
        return run

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
        y: Any = None,
        validation_data: Any = None,
        callbacks: Sequence[Callback] | None = None,
        verbose: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> History:
        """Trains for ``epochs`` epochs (counted from 0, so ``epochs`` is the index to stop before).

        Args:
            train_data: a DataLoader (or any re-iterable of batches), or in-memory tensors/NumPy arrays
                with ``batch_size``. Batches are read as Keras reads them: ``x`` (a tensor or a dict),
                ``(x,)`` (no targets: see [compute_loss][fitkit.Trainer.compute_loss]), ``(x, y)`` or ``(x, y, sample_weight)``.
            val_data: the same kinds, evaluated after each ``validation_freq``-th epoch; or a dict of named
                sets, ``{"clean": dl1, "noisy": dl2}``, logged as ``val_clean_loss``, ``val_noisy_loss``, ...
            epochs: the epoch to stop before, as in Keras (``initial_epoch=5, epochs=10`` trains 5 epochs).
                Default: 1; with ``max_steps``, as many epochs as those steps need; with ``max_time`` alone, no limit.
            initial_epoch: the epoch to start at (ignored when ``resume`` restores a position).
            steps_per_epoch: use at most this many batches per epoch (a new iterator every epoch).
            validation_freq: validate every N epochs (int), or after the listed 1-based epochs (Keras);
                0 or None: no epoch-level validation (with ``validate_every_n_steps``).
            batch_size: batch size for in-memory data (default 32, as in Keras).
            shuffle: shuffle in-memory training data every epoch (DataLoaders keep their own sampler).
            validation_split: the fraction of in-memory training data held out (from the end, before shuffling; Keras).
            resume: a checkpoint path to continue from exactly, ``"auto"`` for the newest good checkpoint of this
                trainer's checkpoint callbacks (none found: start from scratch), or ``"restart"`` to start over after
                deleting the files of those callbacks that fitkit vouched for (nothing else; see Checkpoints).
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
            y: Keras's form for in-memory data: ``fit(x, y=y)`` is ``fit((x, y))``.
            validation_data: Keras's name for ``val_data``.
            callbacks: more callbacks for this call only, after the trainer's (Keras's ``fit(callbacks=...)``).
            verbose: this call's verbosity, as ``Trainer(verbose=...)`` (default: the trainer's).
            storage_options: with ``resume`` an fsspec URL (``"s3://bucket/run/last.pt"``), the filesystem's
                options (credentials, endpoint); the file is fetched and checked first (`fitkit.remote`).

        Returns:
            the [History][fitkit.History] of this call.
        """
        resume = resolve_resume(self, _arguments.check_resume(resume), storage_options)
        train_data, val_data = _arguments.keras_fit_data(train_data, val_data, y, validation_data)
        with _arguments.for_this_call(self, callbacks, verbose):
            self._run = run = self._prepare_fit(
                train_data, val_data, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                validation_freq=validation_freq, batch_size=batch_size, shuffle=shuffle, max_time=max_time,
                validation_split=validation_split, sample_weight=sample_weight, class_weight=class_weight,
                drop_last=drop_last, validate_every_n_steps=validate_every_n_steps, validation_steps=validation_steps,
                max_steps=max_steps)  # fmt: skip
            with self._signals:
                self._fit(run, resume)
        return self.history

    def _fit(self, run: FitRun, resume: str | Path | None) -> None:
        """Folders claimed, the summary, ``on_train_begin``, the resume, the epochs, ``on_train_end``."""
        try:
            _files.claim_folders(run.callbacks.callbacks)  # a second job in a folder: refused before anything
            if self.verbose and self.is_global_zero:  # the sizes are this fit's: its run is the current one
                print(self.summary(), flush=True)  # from the modules' parameters: no forward pass
            run.callbacks.fire("on_train_begin", {})
            self._resume(resume)
            run.warn_nothing_to_train()
            run.run()
        except BaseException as exc:
            failure = self._fit_failed(exc)
            if failure is exc:
                raise
            raise failure from (None if isinstance(exc, TrainingInterrupted) else exc)  # Ctrl-C: one traceback
        finally:
            run.callbacks.fire_all("on_train_end", {})
            self._modules.train.train()

    def _prepare_fit(self, train_data: Any, val_data: Any, **arguments_: Any) -> FitRun:
        """Checks fit's arguments, builds the loaders and this fit's callbacks, and resets the per-fit parts
        of the state; runs no hook."""
        plan = plan_fit(self, train_data, val_data, **arguments_)
        self.history = History()
        extra: list[Callback] = [self.history]
        if self.verbose and self.is_global_zero and not any(isinstance(cb, ProgressBar) for cb in self.callbacks):
            extra.append(ProgressBar(mode="bar" if self.verbose == 1 else "epoch"))  # a user's own replaces it
        active = [cb for cb in self.callbacks if self.is_global_zero or not cb.rank_zero_only] + extra
        callbacks = CallbackList(active, self)
        hooks = callbacks.hooks
        if not self._hooks_timed and (hooks["on_batch_begin"] or hooks["on_batch_end"]):
            HookTimer(callbacks, self._hooks_measured)  # times them on a few early batches
        self.state.should_stop, self.state.stop_reason = False, None
        self.state.epoch, self.state.batch_in_epoch = arguments_["initial_epoch"], 0
        if self.state.run_id is None:  # rank 0's for every rank; a resume replaces it with the run's own
            self.state.run_id = distributed.broadcast_object(uuid.uuid4().hex, self.dist)
        return FitRun(self, callbacks, plan)

    def _hooks_measured(self) -> None:
        self._hooks_timed = True

    def _fit_failed(self, exc: BaseException) -> BaseException:
        """Runs ``on_exception`` and returns what ``fit`` raises: a signal's conventional exit, the
        first failing rank's error in a distributed run, or ``exc`` itself."""
        self._run.deferred.clear()
        # Another rank's failure reaches this one as a failed collective: report the first failure. An error
        # that every rank raised together (a signal, a decision they agreed on) is no one rank's failure.
        together = isinstance(exc, TrainingInterrupted) or distributed.raised_on_every_rank(exc)
        peer_failure = None if together else distributed.on_failure(exc, self.dist)
        self._run.callbacks.fire("on_exception", exc)
        if isinstance(exc, TrainingInterrupted):
            if exc.requeue and self.is_global_zero:  # after on_exception: the checkpoints are saved
                slurm.requeue()
            return exc.exit_exception(_files.saved_on_interrupt(self._run.callbacks.callbacks))
        return peer_failure if peer_failure is not None else exc

    def _on_signal(self, signum: int) -> None:
        self.stop(f"interrupted by {signal.Signals(signum).name}")

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
        loaders = _pipeline.val_loaders(self, data, batch_size, "data", single_pass=True)  # a generator: one pass
        with self._call(callbacks) as run:
            return run.validate(loaders, "")

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
        loader = _pipeline.make_loader(self, data, batch_size, False, "data", single_pass=True)  # a generator: one pass
        with self._call(callbacks) as run:
            return run.predict(loader, return_outputs)

    @contextlib.contextmanager
    def _call(self, callbacks: Sequence[Callback] | None) -> Iterator[Run]:
        """An ``evaluate``/``predict`` call's run, the current one while it lasts (a call made inside a
        fit, by a callback, gets its own and leaves the fit's as it was)."""
        outer = self._run
        self._run = run = Run(self, CallbackList(_arguments.check_callbacks(callbacks), self), outer=outer)
        try:
            yield run
        finally:
            self._run = outer

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
        monitor: str = "loss",
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
            monitor: the key of ``train_step``'s logs to follow (a GAN's step may log ``"d_loss"``).

        Returns:
            an [LRFindResult][fitkit.lr_finder.LRFindResult] with ``lrs``, ``losses``, ``suggestion``, ``plot()``.
        """
        finder = LRFinder(start_lr, end_lr, num_steps, mode, smooth, stop_divergence, monitor)  # checks the arguments
        self._strategy.check_supported("lr_find")
        with self._left_as_found(train_data):
            self.callbacks, self.verbose, self._hooks_timed = [finder], 0, True  # put back on exit
            self.fit(train_data, epochs=num_steps * self.accumulate_grad_batches, batch_size=batch_size)
        return finder.result

    @contextlib.contextmanager
    def _left_as_found(self, data: Any) -> Iterator[None]:
        """Restores on exit what a side run of the loop (``lr_find``) changes: the configuration it swaps
        (callbacks, verbosity), the last fit's run and History, the weights (buffers, gradients, train/eval
        modes), a learnable loss's state, every optimizer's and the GradScaler's state, the progress
        counters, the running sums, a pending accumulation group, and every random generator, ``data``'s own
        included. Per-call state needs no restoring: it lives in the run the side fit made."""
        optimizers = list(self.optimizers.values())
        kept = (self.callbacks, self.verbose, self._hooks_timed, self._run, self.history, self._epoch_rng)
        k = self.accumulate_grad_batches  # a schedule by epoch sets it in the side run
        saved: dict[str, Any] = copy.deepcopy(
            {
                "model": self.model.state_dict(),
                "grads": [p.grad for p in self._learnable()],  # a learnable loss's too
                "loss": self.loss.state_dict() if isinstance(self.loss, nn.Module) else None,
                "optimizers": [o.state_dict() for o in optimizers],
                "scaler": None if self._amp.scaler is None else self._amp.scaler.state_dict(),
                "state": self.state.state_dict(),
                "tracker": self._train_set.tracker.state_dict(),
                "accumulation": self._accumulation.state_dict(),
            }
        )
        step_marks = [_compat.optimizer_step_marks(o) for o in optimizers]  # an LR scheduler's marks
        modes = [m.training for m in self.model.modules()]
        generators, data_generators = rng.capture(self.train_loader), rng.capture(data)
        try:
            yield
        finally:
            self.callbacks, self.verbose, self._hooks_timed, self._run, self.history, self._epoch_rng = kept
            self.accumulate_grad_batches = k
            self.model.load_state_dict(saved["model"])
            for param, grad in zip(self._learnable(), saved["grads"]):
                param.grad = grad
            if isinstance(self.loss, nn.Module):
                self.loss.load_state_dict(saved["loss"])
            for optimizer, state, marks in zip(optimizers, saved["optimizers"], step_marks):
                optimizer.load_state_dict(state)
                _compat.set_optimizer_step_marks(optimizer, marks)
            if self._amp.scaler is not None:
                self._amp.scaler.load_state_dict(saved["scaler"])
            self.state.load_state_dict(saved["state"])
            self._train_set.tracker.load_state_dict(saved["tracker"], self.device)
            self._accumulation.load_state_dict(saved["accumulation"])
            for module, training in zip(self.model.modules(), modes):
                module.training = training
            rng.restore(data_generators, data)
            rng.restore(generators, self.train_loader)

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
            self._strategy.check_supported("partial_accumulation_checkpoint")
            accumulation["grads"] = [None if p.grad is None else p.grad.detach().cpu() for p in self.model.parameters()]
        strategy, scaler = self._strategy, self._amp.scaler
        return {
            "fitkit": checkpoint.header("full"),
            "model": strategy.model_state_dict(self.model) if weights else None,  # FSDP: gathered
            "model_class": type(self.model).__name__,
            "optimizers": {
                name: strategy.optimizer_state_dict(self.model, opt) for name, opt in self.optimizers.items()
            }
            if weights
            else None,
            "optimizer_classes": {name: type(opt).__name__ for name, opt in self.optimizers.items()},
            "optimizer_params": checkpoint.optimizer_param_names(self.model, self.optimizers),  # checked on load
            "loss": self.loss.state_dict() if isinstance(self.loss, nn.Module) else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "trainer": self.state.state_dict(),
            "callbacks": self._callback_list().state_dict(),
            "rng": self._run_of_fit().rng_before_validation or rng.capture(self.train_loader),
            "epoch_rng": self._epoch_rng if mid_epoch else None,
            "train_tracker": self._train_set.tracker.state_dict(),
            "accumulation": accumulation,
            "data_position": self._data_position() if mid_epoch else None,
            "data": data_signature(self.train_loader),
            "world_size": self.world_size,
            "precision": self.precision,
        }

    #: The parts of `state_dict` that differ between the ranks of a distributed run: each rank's
    #: generators (dropout, its DataLoader workers' seeds), its share of the epoch's running sums, and
    #: its not yet all-reduced gradients. A checkpoint keeps every rank's under ``per_rank``.
    PER_RANK = ("rng", "epoch_rng", "train_tracker", "accumulation", "data_position")

    def _data_position(self) -> dict[str, Any] | None:
        """Where this rank is in the epoch's data (``TrainBatches.position``); None outside a fit."""
        plan = self._run_of_fit().plan
        return None if plan is None else plan.train.position(self.state.batch_in_epoch)

    def _callback_list(self) -> CallbackList:
        """This fit's callbacks; before the first fit, the ones given to the Trainer."""
        callbacks = self._run_of_fit().callbacks
        return callbacks if callbacks.callbacks else CallbackList(self.callbacks, self)

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
        saved = state.get("per_rank") or [state]  # every rank's own parts (one process: the state itself)
        state = checkpoint.upgrade({**state, **saved[self.dist.rank % len(saved)]})  # this rank's own part
        plan = self._run_of_fit().plan  # a fit's resume: hand the training data its saved positions
        resharded = plan is not None and _pipeline.restore_positions(plan.train, state, saved, strict)
        if weights:  # False: a sharded checkpoint checked and loaded them (sharded_checkpoint.load)
            self._load_weights(state, strict, resharded)
        if isinstance(self.loss, nn.Module) and state.get("loss") is not None:
            self.loss.load_state_dict(state["loss"], strict=strict)
        if self._amp.scaler is not None and state.get("scaler"):
            self._amp.scaler.load_state_dict(state["scaler"])
        self.state.load_state_dict(state["trainer"])
        self.state.should_stop, self.state.stop_reason = False, None
        self._callback_list().load_state_dict(state.get("callbacks", {}), strict=strict)
        if resharded:  # the epoch's sums so far, all on rank 0 (the epoch's logs add every rank's up)
            self._train_set.tracker.reset()
            if self.dist.rank == 0:
                self._train_set.tracker.load_state_dict(_reshard.merged_sums(saved), self.device)
        else:
            self._train_set.tracker.load_state_dict(state["train_tracker"], self.device)
        acc = state.get("accumulation") or {}
        if acc.get("grads") is not None and not resharded:
            for p, g in zip(self.model.parameters(), acc["grads"]):
                p.grad = None if g is None else g.to(p.device)
            self._accumulation.load_state_dict(acc)
        self._epoch_rng = state.get("epoch_rng")
        rng.restore(state["rng"], self.train_loader)

    def _load_weights(self, state: dict[str, Any], strict: bool, resharded: bool = False) -> None:
        """The model's and optimizers' part of `load_state_dict` (whole states, loaded through the strategy)."""
        model_state, strategy = state["model"], self._strategy
        if strict:
            signature = data_signature(self.train_loader)
            checkpoint.check_fits(
                state, model=self.model, optimizers=self.optimizers,
                world_size=state.get("world_size", 1) if resharded else self.world_size,
                data={"num_samples": signature["num_samples"]} if resharded else signature,
            )  # fmt: skip
            strategy.load_model_state_dict(self.model, model_state, strict=True)
        else:
            current = self.model.state_dict()
            fitting = {
                k: v for k, v in model_state.items() if k in current and tuple(v.shape) == tuple(current[k].shape)
            }
            strategy.load_model_state_dict(self.model, fitting, strict=False)
        for name, optimizer in self.optimizers.items():
            try:
                strategy.load_optimizer_state_dict(self.model, optimizer, state["optimizers"][name])
            except (ValueError, KeyError) as exc:
                if strict:
                    raise checkpoint.CheckpointError(
                        f"checkpoint state of optimizer {name!r} does not fit this optimizer: {exc}"
                    ) from exc

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
        _arguments.check_path(path, "save_checkpoint")
        meta = {"run": self.state.run_id, **(meta or {})}  # ModelCheckpoint knows its run's files by the run id
        return self._strategy.save_checkpoint(self, Path(path), meta)

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        """Loads a checkpoint written by fitkit (verified, ``weights_only``) into this trainer; a sharded
        (DCP) checkpoint directory loads into any trainer, each rank reading its part.

        Args:
            path: a checkpoint file, or a sharded checkpoint directory.
            strict: as in [load_state_dict][fitkit.Trainer.load_state_dict] (default True).
        """
        _arguments.check_path(path, "load_checkpoint")
        self._strategy.load_checkpoint(self, Path(path), strict)

    def model_state_dict(self) -> dict[str, Any]:
        """The model's weights, unsharded under FSDP (a collective: every rank calls it)."""
        return self._strategy.model_state_dict(self.model)

    def _resume(self, resume: str | Path | None) -> None:
        """Loads the checkpoint ``fit(resume=...)`` names, or the one a `ResumeSource` callback
        offers; every rank loads the file rank 0 chose. ``"restart"``: each checkpoint callback starts over."""
        if str(resume) == "restart":
            return _files.start_over(self, self._run.callbacks.callbacks)
        if resume is None:  # a BackupAndRestore callback resumes the same script after a crash
            sources = [cb for cb in self._run.callbacks.callbacks if isinstance(cb, ResumeSource)]
            resume = next((p for cb in sources for p in [cb.resume_path()] if p is not None), None)
        resume = distributed.broadcast_object(resume, self.dist)  # every rank resumes as rank 0 does
        if resume is None:
            return
        path = distributed.broadcast_object(self._resume_path(resume), self.dist)  # one file for all ranks
        if path is not None:
            self.load_checkpoint(path)
            self._run.resumed_from = path
            if self.verbose and self.is_global_zero:  # where the run continues, before its first progress line
                print(_arguments.resumed_line(path, self.state, self.epochs_planned), flush=True)

    def _resume_path(self, resume: str | Path) -> Path | None:
        """An explicit (verified) path, or for ``"auto"`` the newest good checkpoint in the folders of
        this fit's checkpoint callbacks (None when there is none yet)."""
        if str(resume) != "auto":
            path = Path(resume)
            checkpoint.verify(path)
            return path
        folders = [Path(cb.checkpoint_dir) for cb in self._run.callbacks.callbacks if isinstance(cb, CheckpointWriter)]
        if not folders:
            raise ValueError(
                "resume='auto' looks in the folders of the trainer's checkpoint callbacks "
                "(ModelCheckpoint, BackupAndRestore), and this trainer has none; pass a path instead"
            )
        return checkpoint.newest_good(folders, "resume='auto': skipping bad checkpoint")

    # -- loop machinery -------------------------------------------------------------------------


__all__ = ["CheckpointWriter", "ResumeSource", "Trainer", "TrainingInterrupted"]
