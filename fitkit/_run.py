"""One call of ``fit``, ``evaluate`` or ``predict``: the state that lives for that call, and its loop.

The `Trainer` keeps what outlives a call (model, optimizers, loss, configuration, ``TrainerState``,
callbacks). Everything that exists only while one call runs lives in the `Run` it makes, and is dropped with
it: the callbacks of this call, the batch being processed and its size, the metrics of the running phase,
the first-batch checks, the checkpoint writes callbacks asked for, and, in a `FitRun`, the plan, the
budgets, the stop vote and the step-validation state. Nothing is reset by hand: a new call makes a new run.
The Trainer keeps the last one, so that ``trainer.train_loader`` and friends describe the last fit.

The fit loop reads top to bottom in short phases::

    FitRun.run              the epochs: on_epoch_begin, run_epoch, validate_epoch, on_epoch_end, write_checkpoints
      FitRun.run_epoch      the batches: run_batch, then after_batch when it has work; the end of the epoch
        FitRun.run_batch    hooks, device copy, train_step, the running sums
        FitRun.after_batch  budgets, step validation, write_checkpoints, the stop vote
    Run.validate            on_validation_begin, evaluate_set for each set, on_validation_end
    Run.predict             predict's batches

`Run.write_checkpoints` is the one place where the saves callbacks asked for
(``trainer.after_callbacks``) are carried out: after a batch's hooks (and its step validation), and after
``on_epoch_end``. This module is the Trainer's own loop, split from ``trainer.py`` to keep each file short:
it uses the Trainer's private parts by design.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fitkit import _arguments, _checks, _pipeline, distributed, rng, schedule
from fitkit._callback_list import CallbackList
from fitkit._loaders import concat_outputs, num_batches, split_in_memory, take_rows
from fitkit._loop_times import CALLBACKS, DATA, STEP, LoopTimes
from fitkit._precision import NO_CONTEXT
from fitkit._steps import Steps
from fitkit._tracker import EpochTracker
from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.callbacks.base import MID_EPOCH_HOOKS, may_stop_mid_epoch
from fitkit.metrics import Metric

if TYPE_CHECKING:
    from fitkit.trainer import Trainer


@dataclass
class MetricSet:
    """The metrics of one phase (training, or validation/evaluate) and their running sums."""

    metrics: list[Metric]
    weighted: list[Metric]
    tracker: EpochTracker = field(init=False)

    def __post_init__(self) -> None:
        self.tracker = EpochTracker(self.metrics + self.weighted)


@dataclass
class FitPlan:
    """What one ``fit`` call iterates, resolved from its arguments before any hook runs."""

    train: _pipeline.TrainBatches
    val_loaders: dict[str | None, Any]  # {set name: loader}; a single set is named None; empty: no validation
    epochs: int | None  # None: until a max_steps/max_time budget ends the run
    validate_at: Callable[[int], bool]
    num_train_batches: int | None
    step_validation: schedule.StepValidation | None = None
    validation_steps: int | None = None
    max_steps: int | None = None
    max_time: float | None = None
    class_weight: torch.Tensor | None = None
    last_step: int | None = None  # the global step the run ends at (None: unknown)

    @property
    def num_val_batches(self) -> dict[str | None, int | None]:
        """Batches per validation of each set (None: unknown)."""
        return {name: num_batches(loader, self.validation_steps) for name, loader in self.val_loaders.items()}


class Run:
    """The state of one ``evaluate`` or ``predict`` call (and the base of `FitRun`)."""

    plan: FitPlan | None = None
    clock: LoopTimes | None = None  # a fit's loop laps, when a callback wants them (FitRun)
    # The generators before a fit's epoch validation, while it runs: a checkpoint written then (SIGTERM)
    # records them, so the resumed run validates again from the same random state (exact resume).
    rng_before_validation: dict[str, Any] | None = None

    def __init__(self, trainer: Trainer, callbacks: CallbackList, outer: Run | None = None) -> None:
        self.trainer = trainer
        self.callbacks = callbacks
        self.outer = outer  # the run this call was made inside (an evaluate in a fit's callback), if any
        self.batch: Any = None  # the batch being processed, on the device (callbacks read trainer.batch)
        self.outputs: Any = None  # the model's outputs for it, when the step sets them
        self.n = 0  # its samples
        self.stepped = False  # an optimizer stepped in this iteration (GradScaler.update, global_step)
        self.phase: MetricSet = trainer._train_set  # whose metrics update_metrics feeds
        trainer._train_set.tracker.summed = trainer._val_set.tracker.summed = frozenset(trainer.batch_sum_logs)
        self.check_loss_inputs = True  # the first batch's loss-input checks (_checks.py) still to run
        self.class_weight: torch.Tensor | None = None
        self.per_sample_loss: Callable[..., torch.Tensor] | None = None  # the loss with reduction="none"
        self.deferred: list[Callable[[], None]] = []  # saves asked for by callbacks (after_callbacks)
        self.sync_debug_on = False  # inside a debug_sync window (see sync_window)
        self.validation_set: str | None = None  # the named set being validated now (None: the single set)
        self.predicting_sharded = False  # predict: each rank predicts its own share
        self.resumed_from: Any = None  # the checkpoint a fit continues, if any

    # -- shared machinery ---------------------------------------------------------------------------------
    def write_checkpoints(self) -> None:
        """The checkpoint phase: carries out, in order, the saves callbacks asked for since the last one."""
        actions, self.deferred = self.deferred, []
        with self.allow_sync():  # checkpoint writes copy tensors to the host on purpose
            for action in actions:
                action()

    def allow_sync(self) -> contextlib.AbstractContextManager[Any]:
        """Lifts debug_sync's flagging for a deliberate host read (see ``Trainer.allow_sync``)."""
        if not self.sync_debug_on:
            return NO_CONTEXT
        return sync_debug_mode(0)

    @contextlib.contextmanager
    def sync_window(self) -> Iterator[None]:
        """torch's sync debug mode on (``debug_sync`` on CUDA) while a batch loop's body runs: epoch
        boundaries (logs, checkpoints) synchronise on purpose. Callers create the iterator before they
        open it: the in-memory path copies the epoch's permutation there."""
        trainer = self.trainer
        if not trainer.debug_sync or trainer.device.type != "cuda":
            yield
            return
        outer, self.sync_debug_on = self.sync_debug_on, True
        try:
            with sync_debug_mode("error" if trainer.debug_sync == "error" else "warn"):
                yield
        finally:
            self.sync_debug_on = outer  # a step-level validation's window sits inside the training one

    def interrupted(self) -> bool:
        """A signal arrived (one process: a distributed run decides together, in check_interrupt)."""
        return self.trainer._signals.signum is not None and self.trainer.world_size == 1

    def check_interrupt(self) -> None:
        signum = distributed.any_signal(self.trainer._signals.signum, self.trainer.dist)
        if signum is not None:
            raise self.trainer._signals.interrupted(signum)

    def finish_iteration(self) -> None:
        """After a batch in which optimizers stepped: fp16's one ``GradScaler.update``."""
        self.stepped = False
        self.trainer._amp.update()

    # -- validation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(
        self, loaders: dict[str | None, Any], prefix: str, steps: int | None = None, in_fit: bool = False
    ) -> dict[str, float]:
        """One validation: ``on_validation_begin``, every set's batches, ``on_validation_end``, in eval mode;
        the logs (``<prefix><set>_<key>``). A signal during it ends it with TrainingInterrupted before
        ``on_validation_end`` (no partial results). In ``fit``, ``state.last_validation_step`` is set before
        ``on_validation_end``, so that a checkpoint written after it does not validate again on resume."""
        trainer = self.trainer
        modules = trainer._modules
        was_training = modules.train.training
        modules.eval.eval()
        try:
            self.callbacks.fire("on_validation_begin", {})
            logs: dict[str, float] = {}
            for name, loader in loaders.items():
                self.validation_set = name
                try:
                    logs.update(self.evaluate_set(loader, prefix if name is None else f"{prefix}{name}_", steps))
                finally:
                    self.validation_set = None
            self.check_interrupt()
            end_logs: dict[str, Any] = dict(logs)
            if in_fit:
                trainer.state.last_validation_step = trainer.state.global_step
                end_logs.update(step=trainer.state.global_step, epoch=trainer.state.epoch)
            self.callbacks.fire("on_validation_end", end_logs)
        finally:
            modules.train.train(was_training)
            modules.eval.train(was_training)
        return logs

    def evaluate_set(self, loader: Any, prefix: str, steps: int | None = None) -> dict[str, float]:
        """One pass over one validation set (at most ``steps`` batches): its logs, keys prefixed."""
        trainer = self.trainer
        hooks = self.callbacks.hooks
        batch_begin, batch_end = hooks["on_validation_batch_begin"], hooks["on_validation_batch_end"]
        trainer._modules.eval.eval()
        self.phase = phase = trainer._val_set
        tracker = phase.tracker
        tracker.reset()
        batches, loader = _pipeline.eval_batches(trainer, loader, steps, trainer._strategy.splits_eval_data)
        feed = _pipeline.DeviceFeed(trainer, loader)
        eval_step = trainer.eval_step
        try:
            with self.sync_window():
                for batch_idx, batch in enumerate(batches):
                    for fn in batch_begin:
                        fn(batch_idx, {})
                    self.batch = batch = feed(batch)
                    self.n, self.outputs = feed.n, None
                    step_logs = eval_step(batch)
                    if batch_idx == 0:
                        _arguments.check_step_logs(step_logs)
                    tracker.add(step_logs, feed.n)
                    for fn in batch_end:
                        fn(batch_idx, step_logs)
                    if self.interrupted():
                        break
        finally:
            del batches  # a DataLoader's workers shut down now, even on an exception (see run_epoch)
            self.phase = trainer._train_set
        if tracker.count == 0 and trainer.world_size == 1:
            raise ValueError("validation data yielded no batches; pass a non-empty DataLoader or None")
        logs = tracker.compute(trainer.dist.reduce)
        return {prefix + k: v for k, v in logs.items()}

    # -- predict --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, loader: Any, return_outputs: bool) -> Any:
        """The model's outputs over ``loader`` (see ``Trainer.predict``)."""
        trainer = self.trainer
        hooks = self.callbacks.hooks
        batch_begin, batch_end = hooks["on_predict_batch_begin"], hooks["on_predict_batch_end"]
        share, strided = distributed.shard_predict(loader, trainer.dist, trainer._strategy.splits_eval_data)
        self.predicting_sharded = strided
        rank, world = (trainer.dist.rank, trainer.world_size) if strided else (0, 1)
        feed = _pipeline.DeviceFeed(trainer, loader)
        module = trainer._modules.eval
        was_training = module.training
        module.eval()
        outputs: list[Any] = []
        positions: list[torch.Tensor] = []
        seen = 0  # rows predicted so far by this rank
        try:
            self.callbacks.fire("on_predict_begin", {})
            for batch_idx, batch in enumerate(share):
                for fn in batch_begin:
                    fn(batch_idx, {})
                self.batch = batch = feed(batch)
                self.n = feed.n
                batch_outputs = trainer.predict_step(batch)
                indices = torch.arange(seen, seen + feed.n) * world + rank  # rows of the result (host only)
                seen += feed.n
                if return_outputs:
                    outputs.append(_pipeline.cpu(batch_outputs))
                    positions.append(indices)
                for fn in batch_end:
                    fn(batch_idx, {"outputs": batch_outputs, "indices": indices})
            self.callbacks.fire("on_predict_end", {})
        finally:
            module.train(was_training)
        if seen == 0 and not strided:
            raise ValueError("predict: data yielded no batches")
        if not return_outputs:
            return None
        if strided:  # every rank's share, put back in the data's order
            shares = distributed.gather_object((outputs, positions), trainer.dist)
            outputs = [o for part, _ in shares for o in part]
            order = torch.argsort(torch.cat([p for _, ranks in shares for p in ranks]))
            return take_rows(concat_outputs(outputs), order)
        return concat_outputs(outputs)


class FitRun(Run):
    """The state and the loop of one ``fit`` call."""

    def __init__(self, trainer: Trainer, callbacks: CallbackList, plan: FitPlan) -> None:
        super().__init__(trainer, callbacks)
        self.plan = plan
        self.class_weight = plan.class_weight
        self.budget = schedule.Budget(None, None, trainer.state, decides=True)  # started by run()
        self.stop_vote = False  # the ranks vote after every batch (see may_stop_mid_epoch)
        self.unvoted_stop_warned = self.non_finite_reported = self.budget_stopped = False
        # Where the last step-level validation ran, (epoch, batch_in_epoch): the epoch's validation reuses its
        # logs only when no batch has trained since (global_step alone misses a step that never counts).
        self.step_validated_at: tuple[int, int] | None = None
        self.step_probe: _checks.UncountedStepProbe | None = None  # a custom train_step, until its first batch
        # The loop's laps (ThroughputMonitor's time breakdown): only when a callback asks; else None, and the
        # loop's `if clock is not None` checks are all it costs.
        wanted = any(cb.wants_loop_times for cb in callbacks.callbacks)
        self.clock: LoopTimes | None = LoopTimes(trainer.device) if wanted else None

    # -- the epochs -----------------------------------------------------------------------------------------
    def run(self) -> None:
        """The epochs: train, validate when scheduled, ``on_epoch_end``, the checkpoint phase, stop check."""
        trainer, plan, state = self.trainer, self.plan, self.trainer.state
        assert plan is not None
        # Started after a resume loaded the time already spent; only rank 0's clock decides (see Budget).
        self.budget = schedule.Budget(plan.max_steps, plan.max_time, state, decides=trainer.is_global_zero)
        # Agreed by every rank (their callbacks differ: rank-0-only ones exist on rank 0 alone).
        self.stop_vote = trainer.world_size > 1 and distributed.any_rank(self.may_stop_mid_epoch(), trainer.dist)
        epochs = itertools.count(state.epoch) if plan.epochs is None else range(state.epoch, plan.epochs)
        if plan.max_steps is not None and state.global_step >= plan.max_steps:
            return  # resumed at the step budget: nothing to train (fit warned)
        if plan.max_time is not None and distributed.any_rank(self.budget.spent(), trainer.dist):  # rank 0 decides
            return trainer.stop(f"max_time: {state.train_time:.6g} s trained before, max_time={plan.max_time:g} s")
        if state.batch_in_epoch > 0 and self.validated_before_resume():
            self.step_validated_at = (state.epoch, state.batch_in_epoch)
        if type(trainer).train_step is not Steps.train_step:
            self.step_probe = _checks.UncountedStepProbe(
                trainer.optimizers, state.global_step, trainer.model, trainer.precision, trainer.device.type
            )
        for epoch in epochs:
            state.epoch = epoch
            if trainer._accumulation.schedule:  # accumulate_grad_batches by epoch: this epoch's group size
                trainer.accumulate_grad_batches = trainer._accumulation.size_at(epoch)
            if self.clock is not None:
                self.clock.start_epoch()
            if state.batch_in_epoch == 0:  # a resumed epoch already ran on_epoch_begin
                trainer._train_set.tracker.reset()
                self.callbacks.fire("on_epoch_begin", epoch, {})
            logs = self.run_epoch(epoch)
            if not self.non_finite_reported and not math.isfinite(logs.get("loss", 0.0)):
                self.report_non_finite(epoch)
            logs.update(self.validate_epoch(epoch))
            self.check_interrupt()
            logs.update(trainer._lr_logs())
            self.budget.elapsed()  # state.train_time, for the checkpoints written at the epoch's end
            self.callbacks.fire("on_epoch_end", epoch, logs)
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            self.write_checkpoints()
            state.should_stop = distributed.any_rank(state.should_stop, trainer.dist)
            if state.should_stop:
                break

    def warn_nothing_to_train(self) -> None:
        """After a resume: a run already at its ``epochs`` or ``max_steps`` trains nothing; say so."""
        plan, state = self.plan, self.trainer.state
        assert plan is not None
        if plan.epochs is not None and state.epoch >= plan.epochs:
            warnings.warn(
                f"nothing to train: the run is at epoch {state.epoch} and epochs={plan.epochs}; "
                "pass a larger epochs= to train further",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
        elif plan.max_steps is not None and state.global_step >= plan.max_steps:
            warnings.warn(
                f"nothing to train: the run is at step {state.global_step} and "
                f"max_steps={plan.max_steps}; pass a larger max_steps= to train further",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
        elif plan.max_time is not None and state.train_time >= plan.max_time:
            warnings.warn(
                f"nothing to train: the run has trained for {state.train_time:.6g} s and max_time={plan.max_time:g} s; "
                "pass a larger max_time= to train further",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )

    def may_stop_mid_epoch(self) -> bool:
        """Whether anything on this rank may stop training inside an epoch, so that the ranks must vote after
        every batch: a step or time budget (rank 0's clock decides), validation every N steps, a Trainer
        subclass (its step may), or a batch-level hook not declared ``stops_mid_epoch = False``."""
        plan = self.plan
        assert plan is not None
        if plan.max_steps is not None or plan.max_time is not None or plan.step_validation is not None:
            return True
        from fitkit.trainer import Trainer  # a subclass's step may stop

        if type(self.trainer) is not Trainer:
            return True
        return any(may_stop_mid_epoch(fn) for name in MID_EPOCH_HOOKS for fn in self.callbacks.hooks[name])

    def report_non_finite(self, epoch: int) -> None:
        """Once per fit, naming the epoch and the first bad batch (read back now, not per batch): an error when the
        weights are non-finite too (nothing after can train), else a warning (fp16's skipped steps, a loss that
        recovers)."""
        self.non_finite_reported = True
        trainer = self.trainer
        found = trainer._train_set.tracker.first_non_finite()
        batch = None if found is None else trainer.state.batch_in_epoch - found[1] + found[0]
        # Agreed by every rank (FSDP: each holds a shard): an error when the weights are ruined, unless a callback
        # (TerminateOnNaN) already stopped the run at the bad batch.
        ruined = distributed.any_rank(not _checks.weights_are_finite(trainer.model), trainer.dist)
        if ruined and not distributed.any_rank(trainer.state.should_stop, trainer.dist):
            assert self.plan is not None
            raise distributed.on_every_rank(_checks.non_finite_weights(epoch, batch, self.plan.train.loader))
        _checks.warn_non_finite_loss(epoch, batch)

    # -- one epoch ------------------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns the epoch's training logs (floats)."""
        trainer, plan, state = self.trainer, self.plan, self.trainer.state
        assert plan is not None
        trainer._modules.train.train()
        self.phase = trainer._train_set
        clock = self.clock
        if clock is not None:
            clock.lap(CALLBACKS)  # on_epoch_begin; from here to the first step is the data's (step_begins)
        batches, trainer._epoch_rng = plan.train.epoch(epoch, state.batch_in_epoch, trainer._epoch_rng)
        vote = distributed.StopVote(trainer.dist) if self.stop_vote else None  # started after a batch
        # after_batch has work on every batch only with these; else only when a callback asked for a save
        # or a stop (checked per batch, two attribute reads).
        every_batch = vote is not None or plan.step_validation is not None or self.budget_on()
        voted_stop = 0  # the vote's code: 0 none, 1 a rank stopped, 2 a budget (max_time on rank 0's clock)
        resumed_before_validation = state.batch_in_epoch > 0 and plan.step_validation is not None
        if resumed_before_validation and plan.step_validation.due(state) and self.after_batch(None):  # type: ignore[union-attr]
            batches = iter(())  # the resumed step's validation (what follows its batch) stopped the run
        try:
            with self.sync_window():
                for batch in batches:
                    if vote is not None and (voted_stop := vote.stop_now()):  # a rank stopped after the last batch
                        break
                    self.run_batch(batch)
                    if (every_batch or self.deferred or state.should_stop) and self.after_batch(vote):
                        break
        finally:
            # A failing step keeps this frame in the exception's traceback: drop the epoch's iterator here, so
            # that a DataLoader's workers shut down now. Left to a later garbage collection, multiprocessing's
            # own finalizers close their queues first and each worker is waited for 5 s, then killed.
            del batches
            if clock is not None:
                clock.close()  # a step that raised under run_next_step_under's context leaves it entered
        if clock is not None:
            clock.lap(DATA)  # the last next(), which found the data exhausted
        voted_stop = voted_stop or (vote.stop_now() if vote is not None else 0)
        if voted_stop and not state.should_stop:  # every rank names the budget that ended the run
            trainer.stop(self.budget.reason_elsewhere() if voted_stop == 2 else "stopped on another rank")
        logs = self.end_epoch(epoch)
        if clock is not None:
            clock.lap(STEP)  # the last group's step and the read of the epoch's sums
        return logs

    def check_step_probe(self) -> None:
        """The first batch of a custom ``train_step``: did it step an optimizer that fitkit did not count?"""
        probe, self.step_probe, plan = self.step_probe, None, self.plan
        assert probe is not None and plan is not None
        probe.check(
            self.trainer.state.global_step,
            {"max_steps": plan.max_steps, "validate_every_n_steps": plan.step_validation},
        )

    def budget_on(self) -> bool:
        return self.budget.max_steps is not None or self.budget.max_time is not None

    def run_batch(self, batch: Any) -> None:
        """One training batch: ``on_batch_begin``, the device copy, ``train_step``, the running sums,
        ``on_batch_end``."""
        trainer, state, clock = self.trainer, self.trainer.state, self.clock
        hooks = self.callbacks.hooks
        batch_idx = state.batch_in_epoch
        if hooks["on_batch_begin"]:
            self.begin_batch(batch_idx)
        feed = self.plan.train.feed  # type: ignore[union-attr]
        self.batch = batch = feed(batch)
        self.n, self.outputs = feed.n, None
        if clock is not None:
            clock.step_begins()  # the data's time: the loader's next(), the device copy
        k = trainer.accumulate_grad_batches
        if k > 1:
            accumulation = trainer._accumulation
            total = self.plan.num_train_batches  # type: ignore[union-attr]
            accumulation.step_now = (batch_idx + 1) % k == 0 or batch_idx + 1 == total
            if total is not None:  # epochs of unknown length keep the all-reduce on: their last group ends later
                trainer._strategy.set_grad_sync(trainer._modules.train, accumulation.step_now)
        step_logs = trainer.train_step(batch)
        if self.stepped:  # fp16's one GradScaler.update per iteration in which optimizers stepped
            self.stepped = False
            if trainer._amp.scaler is not None:
                trainer._amp.scaler.update()
        if batch_idx == 0:
            _arguments.check_step_logs(step_logs)
            if self.step_probe is not None:
                self.check_step_probe()
        trainer._train_set.tracker.add(step_logs, feed.n)
        state.batch_in_epoch = batch_idx + 1
        if clock is not None:
            clock.step_done(feed.n)
        for fn in hooks["on_batch_end"]:
            fn(batch_idx, step_logs)
        if clock is not None:
            clock.lap(CALLBACKS)

    def begin_batch(self, batch_idx: int) -> None:
        """The ``on_batch_begin`` hooks (called only when there are some), timed as the callbacks' when the
        loop has a clock."""
        clock = self.clock
        if clock is not None:
            clock.lap(DATA)  # the loader's next()
        for fn in self.callbacks.hooks["on_batch_begin"]:
            fn(batch_idx, {})
        if clock is not None:
            clock.lap(CALLBACKS)

    def after_batch(self, vote: distributed.StopVote | None) -> bool:
        """What follows a batch: the budgets, a step-level validation, the checkpoint phase (the saves asked
        for by the batch's hooks and the validation's), the stop vote. Returns whether the epoch ends here."""
        state, plan = self.trainer.state, self.plan
        assert plan is not None
        if self.budget_on() and not state.should_stop and (reason := self.budget.check()) is not None:
            self.trainer.stop(reason)  # before the writes: a checkpoint of this batch holds its train_time
            self.budget_stopped = True
        if plan.step_validation is not None and plan.step_validation.due(state):
            self.validate_step()
        if self.deferred:
            self.write_checkpoints()
        if self.clock is not None:  # the budgets, a validation's callbacks, the writes: the callbacks' time
            self.clock.lap(CALLBACKS)
        if vote is not None:  # read before the next batch's step; the epoch's end reads the last one
            vote.start(2 if self.budget_stopped else int(state.should_stop))
            return False
        if not state.should_stop:
            return False
        if self.trainer.world_size == 1:
            return True
        self.unvoted_stop()  # the other ranks cannot know: all stop at the epoch's end
        return False

    def unvoted_stop(self) -> None:
        if not self.unvoted_stop_warned:
            self.unvoted_stop_warned = True
            warnings.warn(
                f"training was stopped mid-epoch ({self.trainer.state.stop_reason or 'stop_training = True'}) by "
                "code that fitkit did not expect to stop there, in a distributed run whose ranks skip the per-batch "
                "stop vote: every rank stops at this epoch's end instead. A callback that stops in a batch-level "
                "hook must not declare stops_mid_epoch = False",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """The end of an epoch's batches: a signal is raised, a partial accumulation group stepped (or
        dropped, after a stop); the epoch's training logs."""
        trainer, state = self.trainer, self.trainer.state
        self.check_interrupt()
        if state.batch_in_epoch == 0:
            raise ValueError(
                f"train_data yielded no batches in epoch {epoch}; check the dataset and "
                "steps_per_epoch (an iterable dataset may be exhausted)"
            )
        if trainer._accumulation.pending:
            if state.should_stop:  # stopped mid-group (TerminateOnNaN, say): drop the partial group
                for optimizer in trainer.optimizers.values():
                    optimizer.zero_grad(set_to_none=True)
                trainer._accumulation.reset()
            else:
                for name in trainer.optimizers:
                    trainer.optimizer_step(name)
                self.finish_iteration()
        return trainer._train_set.tracker.compute(trainer.dist.reduce)

    # -- validation in fit ----------------------------------------------------------------------------------
    def validate_epoch(self, epoch: int) -> dict[str, float]:
        """The validation after an epoch when it is scheduled; when a step-level validation just ran at this
        very step (the epoch's last), its logs, without validating the same weights twice."""
        plan, state, history = self.plan, self.trainer.state, self.trainer.history
        assert plan is not None
        if not plan.val_loaders or not plan.validate_at(epoch) or self.interrupted():
            return {}
        last = history.validations[-1] if history.validations else None
        if self.step_validated_at == (epoch, state.batch_in_epoch) and last is not None:
            return {k: v for k, v in last.items() if k not in ("step", "epoch")}
        # Kept until validation completes (not in a finally: on_exception's checkpoint needs it). Like the
        # hand-written loop, iter(val_loader) draws from the global generator here.
        self.rng_before_validation = rng.capture(plan.train.loader)
        with self.validating():
            logs = self.validate(plan.val_loaders, "val_", plan.validation_steps, in_fit=True)
        self.rng_before_validation = None
        return logs

    def validating(self) -> contextlib.AbstractContextManager[Any]:
        """The validation's lap of the loop clock, when there is one."""
        return NO_CONTEXT if self.clock is None else self.clock.validating()

    def validate_step(self) -> None:
        """A validation after an optimizer step (``validate_every_n_steps``), inside the batch loop.

        It leaves every random generator as it found it, so adding or moving step-level validations never
        changes training, and a run resumed from a checkpoint written before it finished runs it again
        with the same result. Its logs are not part of the epoch's logs (see ``history.validations``).
        """
        plan = self.plan
        assert plan is not None
        saved = rng.capture()
        try:
            with self.allow_sync(), self.validating():  # the validation's sums are read back once, on purpose
                self.validate(plan.val_loaders, "val_", plan.validation_steps, in_fit=True)
        finally:
            rng.restore(saved)
        state = self.trainer.state
        self.step_validated_at = (state.epoch, state.batch_in_epoch)

    def validated_before_resume(self) -> bool:
        """A run resumed mid-epoch from a checkpoint written right after a step-level validation of this
        epoch (nothing trained since): the epoch's validation, if it falls here, reuses its logs."""
        state, validations = self.trainer.state, self.trainer.history.validations
        if not validations or state.last_validation_step != state.global_step:
            return False
        last = validations[-1]
        return last.get("step") == state.global_step and last.get("epoch") == state.epoch


# -- planning a fit -----------------------------------------------------------------------------------------
def plan_fit(
    trainer: Trainer,
    train_data: Any,
    val_data: Any,
    *,
    epochs: int | None,
    initial_epoch: int,
    steps_per_epoch: int | None,
    validation_freq: Any,
    batch_size: int | None,
    shuffle: bool,
    validation_split: float,
    sample_weight: Any = None,
    class_weight: Any = None,
    drop_last: bool = False,
    validate_every_n_steps: int | None = None,
    validation_steps: int | None = None,
    max_steps: int | None = None,
    max_time: Any = None,
) -> FitPlan:
    """Checks ``fit``'s arguments and builds what it iterates (see ``Trainer.fit`` for each argument)."""
    if epochs is not None:
        _arguments.check_int(epochs, "epochs", 0)
    _arguments.check_int(initial_epoch, "initial_epoch", 0)
    _arguments.check_flags(shuffle=shuffle, drop_last=drop_last)
    if steps_per_epoch is not None:
        _arguments.check_int(steps_per_epoch, "steps_per_epoch", 1)
    every = _arguments.check_optional_int(validate_every_n_steps, "validate_every_n_steps", "optimizer steps")
    validation_steps = _arguments.check_optional_int(validation_steps, "validation_steps", "batches per set")
    max_steps = _arguments.check_optional_int(max_steps, "max_steps", "optimizer steps of the whole run")
    max_time = schedule.resolve_max_time(max_time)
    validate_at = _arguments.validation_schedule(schedule.check_validation_freq(validation_freq, every))
    train_data, val_data = _split_off_validation(train_data, val_data, validation_split)
    _checks.check_weights_fit_loss(trainer.loss, class_weight, sample_weight)
    _arguments.check_compute_loss_takes_weights(trainer, class_weight, sample_weight)
    _checks.check_closure_optimizers(
        trainer.optimizers, trainer._closure_optimizers, type(trainer).train_step is Steps.train_step
    )
    train_loader = _pipeline.make_loader(
        trainer, train_data, batch_size, shuffle, "train_data", training=True, sample_weight=sample_weight,
        drop_last=drop_last,
    )  # fmt: skip
    weights = _arguments.class_weight_tensor(class_weight, trainer.device)
    val_loaders = {} if val_data is None else _pipeline.val_loaders(trainer, val_data, batch_size, "val_data")
    _checks.check_validation_keys(
        list(val_loaders), ["loss", *(m.name for m in trainer.metrics + trainer.weighted_metrics)]
    )
    if every is not None and not val_loaders:
        raise ValueError(f"validate_every_n_steps={every} needs validation data; pass val_data (or validation_split)")
    num_train_batches = _check_train_batches(trainer, train_loader, steps_per_epoch)
    k = max(trainer._accumulation.schedule.values(), default=trainer.accumulate_grad_batches)  # enough epochs
    steps_in_epoch = None if num_train_batches is None else -(-num_train_batches // k)
    epochs = schedule.epochs_for(epochs, max_steps, max_time, steps_in_epoch)
    _arguments.warn_unreachable_validation_epochs(validation_freq, epochs)
    last_step = max_steps
    if not trainer._accumulation.schedule and epochs is not None and steps_in_epoch is not None:
        last_step = min(epochs * steps_in_epoch, max_steps or 1 << 62)
        _arguments.warn_unreachable_step_validation(every, last_step)
    return FitPlan(
        _pipeline.TrainBatches(trainer, train_loader, steps_per_epoch), val_loaders, epochs, validate_at,
        num_train_batches, step_validation=None if every is None else schedule.StepValidation(every),
        validation_steps=validation_steps, max_steps=max_steps, max_time=max_time, class_weight=weights,
        last_step=last_step,
    )  # fmt: skip


def _split_off_validation(train_data: Any, val_data: Any, validation_split: Any) -> tuple[Any, Any]:
    """``fit(validation_split=...)``: the last fraction of in-memory training data held out (Keras)."""
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
        raise TypeError(f"validation_split must be a fraction in [0, 1) such as 0.2, got {validation_split!r}")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
    if validation_split and val_data is not None:
        raise ValueError("pass either val_data or validation_split, not both")
    if validation_split:
        return split_in_memory(train_data, validation_split)
    return train_data, val_data


def _check_train_batches(trainer: Trainer, loader: Any, steps_per_epoch: int | None) -> int | None:
    """The training batches per epoch (None: unknown), refusing none and warning about a too large
    ``steps_per_epoch`` and a last batch of one sample under BatchNorm (``_checks.py``)."""
    count = num_batches(loader, steps_per_epoch)
    if count == 0:
        raise ValueError(
            "train_data yields no batches (an empty dataset, or drop_last=True with fewer "
            "samples than batch_size); fit has nothing to train on"
        )
    _checks.check_last_batch(trainer.model, loader, steps_per_epoch)
    if steps_per_epoch is not None and count is not None and count < steps_per_epoch:
        warnings.warn(
            f"steps_per_epoch={steps_per_epoch} but train_data holds {count} batches: each "
            f"epoch ends after {count} (the data runs out). Lower steps_per_epoch, or repeat the data",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )
    return count


# -- helpers ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def sync_debug_mode(mode: int | str) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


__all__: list[str] = []
