"""ExperimentLogger: the one rule for what a logger records, and when; TensorBoard, CSVLogger and
MLflowLogger are subclasses that only say how to write.

The rule:

* **one x axis**: every point is at ``trainer.global_step``, the optimizer steps done when it is written (an
  epoch's logs at the global step at its end), in every logger: TensorBoard's step, CSVLogger's ``step`` column
  and MLflow's step name the same point with the same number;
* **every epoch**: the epoch's logs (the numbers among them: ``loss``, metrics, ``val_*``, ``lr``) at the
  end of the epoch, through [ExperimentLogger.log_epoch][fitkit.callbacks.ExperimentLogger.log_epoch];
* **every N optimizer steps** (``log_every_n_steps=N``; None: never): the loss of the batch that completed
  the step and ``lr``, the learning rate of param group 0 that the step used, through
  [ExperimentLogger.log_step][fitkit.callbacks.ExperimentLogger.log_step] at the global step after that step (1 for the first). Reading the loss
  is a host sync, made on those steps only and marked with ``trainer.allow_sync()``; when no step is due
  the per-batch cost is an integer comparison, and a logger without ``log_every_n_steps`` has no per-batch
  hook at all;
* **every validation, when validation runs by steps** (``fit(validate_every_n_steps=N)``; each
  ``on_validation_end`` in ``fit`` holds ``"step"``): the ``val_*`` values at that global step, through
  [ExperimentLogger.log_validation][fitkit.callbacks.ExperimentLogger.log_validation] (by default the same as a step);
* **at the end**: [ExperimentLogger.end_run][fitkit.callbacks.ExperimentLogger.end_run] with ``"FINISHED"`` (fit returned), ``"KILLED"``
  (Ctrl-C, SIGTERM, an Optuna pruning) or ``"FAILED"`` (any other exception).

A logger runs on rank 0 only (``rank_zero_only``), resumes exactly (the steps it has seen are in its
state, so a resumed run neither repeats nor skips a due step), and is reused across ``fit`` calls.

A new logger (Weights & Biases, Comet, ...) is a short subclass::

    class WandbLogger(ExperimentLogger):
        def __init__(self, project, log_every_n_steps=None):
            super().__init__(log_every_n_steps)
            self.project, self.run = project, None

        def log_epoch(self, epoch, metrics):
            self._run().log({**metrics, "epoch": epoch}, step=self.trainer.global_step)

        def log_step(self, step, metrics):
            self._run().log({f"step/{k}": v for k, v in metrics.items()}, step=step)

        def end_run(self, status):
            if self.run is not None:
                self.run.finish(exit_code=0 if status == "FINISHED" else 1)
                self.run = None

        def _run(self):
            import wandb

            if self.run is None:
                self.run = wandb.init(project=self.project, config=self.trainer_params())
            return self.run
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from fitkit import _arguments
from fitkit.callbacks.base import Callback, Logs, TrainerLike

#: How `ExperimentLogger.end_run` is told the way ``fit`` ended.
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"

# Exceptions that end a run on purpose rather than by a bug: the run was killed, not failed. Named, not
# imported: optuna is optional.
_KILLED_NAMES = ("TrainingInterrupted", "TrialPruned")


def run_status(exception: BaseException | None, stop_reason: str | None = None) -> str:
    """``"FINISHED"`` without an exception, ``"KILLED"`` for an interruption (Ctrl-C, SIGTERM, a pruned
    Optuna trial, also one that stopped a distributed run: its ``stop_reason``), ``"FAILED"`` for any other
    exception."""
    if exception is None:
        return KILLED if stop_reason is not None and stop_reason.startswith("pruned by Optuna") else FINISHED
    if isinstance(exception, (KeyboardInterrupt, SystemExit)):
        return KILLED
    if any(cls.__name__ in _KILLED_NAMES for cls in type(exception).__mro__):
        return KILLED
    return FAILED


def numbers_in(logs: Logs | None) -> dict[str, float]:
    """The real numbers among ``logs`` as floats (strings, booleans and tensors are left out)."""
    return {k: float(v) for k, v in (logs or {}).items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def first_optimizer(trainer: TrainerLike) -> torch.optim.Optimizer:
    """The trainer's optimizer, or the first of several (``trainer.optimizers``): its param group 0 is the
    ``lr`` a logger records."""
    return next(iter(trainer.optimizers.values()))


class ExperimentLogger(Callback):
    """Base class of the loggers: decides what is logged when (see the module docstring); a subclass
    writes. Override [log_epoch][fitkit.callbacks.ExperimentLogger.log_epoch] and [log_step][fitkit.callbacks.ExperimentLogger.log_step], and as needed [log_validation][fitkit.callbacks.ExperimentLogger.log_validation],
    [start_run][fitkit.callbacks.ExperimentLogger.start_run] (called at each fit's ``on_train_begin``, before a resumed state is loaded: open
    files lazily) and [end_run][fitkit.callbacks.ExperimentLogger.end_run].

    Args:
        log_every_n_steps: also log the training loss and learning rate every this many optimizer steps
            (None: epoch logs only).
    """

    rank_zero_only = True

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self.log_every_n_steps = _arguments.check_optional_int(
            log_every_n_steps,
            "log_every_n_steps",
            "optimizer steps between step-level points",
            none_means="epoch logs only",
        )
        self._seen_step = 0  # the global step up to which due steps have been logged
        self._step_lr: float | None = None
        self._last_batch_logs: Logs | None = None
        self._status_exception: BaseException | None = None
        self.final_logs: dict[str, float] | None = None  # the last epoch's numbers, for summaries at the end
        if self.log_every_n_steps is not None:
            # Per-batch hooks only when step logging is on, as instance attributes: a logger that logs per
            # epoch costs the batch loop nothing. A subclass with its own class-level hook calls
            # log_batch_steps / capture_step_lr itself.
            cls = type(self)
            if cls.on_batch_end is Callback.on_batch_end:
                self.__dict__["on_batch_end"] = self.log_batch_steps
            if cls.on_before_optimizer_step is Callback.on_before_optimizer_step:
                self.__dict__["on_before_optimizer_step"] = self.capture_step_lr

    # -- what subclasses write ------------------------------------------------------------------
    def start_run(self) -> None:
        """Called at each fit's ``on_train_begin``, before a resumed state is loaded."""

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Writes one epoch's numbers.

        Args:
            epoch: the epoch's 0-based index.
            metrics: the epoch logs' numbers as floats (``loss``, metrics, ``val_*``, ``lr``).
        """

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Writes step-level values.

        Args:
            step: the global step after the optimizer step (1 for the first).
            metrics: ``loss`` (the batch that completed the step) and ``lr`` (param group 0's rate it used).
        """

    def log_validation(self, step: int, metrics: dict[str, float]) -> None:
        """Writes a validation's values when ``fit`` validates by steps (default: [log_step][fitkit.callbacks.ExperimentLogger.log_step]).

        Args:
            step: the global step the validation ran after.
            metrics: its ``val_*`` values as floats.
        """
        self.log_step(step, metrics)

    def end_run(self, status: str) -> None:
        """Called once per fit when it ends; close files here.

        Args:
            status: ``"FINISHED"`` (fit returned), ``"KILLED"`` (Ctrl-C, SIGTERM, a pruned Optuna trial) or
                ``"FAILED"`` (any other exception).
        """

    # -- helpers for subclasses -----------------------------------------------------------------
    def trainer_params(self) -> dict[str, str | bool | int | float]:
        """The run's configuration as plain values: optimizer, lr, weight_decay, batch_size, precision,
        accumulate_grad_batches, grad clipping and epochs (what is unknown is left out). With several
        optimizers, ``optimizer`` names them all (``"generator=Adam,discriminator=SGD"``) and ``lr`` and
        ``weight_decay`` are the first one's."""
        trainer = self.trainer
        optimizer = first_optimizer(trainer)
        optimizers = trainer.optimizers
        if len(optimizers) > 1:
            name = ",".join(f"{key}={type(opt).__name__}" for key, opt in optimizers.items())
        else:
            name = type(optimizer).__name__
        group = optimizer.param_groups[0]
        loader = trainer.train_loader  # DataLoader and in-memory batches both say it
        batch_size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "loader", None), "batch_size", None)
        candidates = {
            "optimizer": name,
            "lr": group.get("initial_lr", group["lr"]),
            "weight_decay": group.get("weight_decay"),
            "batch_size": batch_size,
            "precision": trainer.precision,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "grad_clip_norm": trainer.grad_clip_norm,
            "grad_clip_value": trainer.grad_clip_value,
            "epochs": trainer.epochs_planned,
        }
        params: dict[str, str | bool | int | float] = {}
        for key, value in candidates.items():
            if isinstance(value, torch.Tensor):
                value = float(value)
            if isinstance(value, (str, bool, int, float)):
                params[key] = value
        return params

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._seen_step = self.trainer.state.global_step
        self._step_lr = None
        self._last_batch_logs = None
        self._status_exception = None
        self.final_logs = None
        self.start_run()

    def capture_step_lr(self) -> None:
        """``on_before_optimizer_step`` with step logging: the rate the coming step uses (a scheduler
        may change it before the batch ends)."""
        lr = first_optimizer(self.trainer).param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):  # a capturable optimizer's rate lives on the device
            with self.trainer.allow_sync():
                lr = float(lr)
        self._step_lr = float(lr)

    def log_batch_steps(self, batch: int, logs: Logs | None = None) -> None:
        """``on_batch_end`` with step logging: logs when this batch completed a due optimizer step.

        Args:
            batch: the batch's index in the epoch.
            logs: the batch's logs (0-dim tensors; read only when a step is due).
        """
        self._last_batch_logs = logs
        if self.trainer.state.global_step != self._seen_step:
            self._steps_done(logs)

    def on_validation_end(self, logs: Logs | None = None) -> None:
        # Validations in fit carry "step"; with step-level validation on, each is logged at its step.
        # Without it, the validation's keys come with the epoch logs (evaluate()'s carry no "step").
        if not logs or "step" not in logs or self.trainer.validate_every_n_steps is None:
            return
        metrics = {
            (k if k.startswith("val_") else f"val_{k}"): v
            for k, v in numbers_in(logs).items()
            if k not in ("step", "epoch")
        }
        self.log_validation(int(logs["step"]), metrics)

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.log_every_n_steps is not None and self.trainer.state.global_step != self._seen_step:
            # Data of unknown length: the epoch's last, shorter group stepped after the last on_batch_end.
            self._steps_done(self._last_batch_logs)
        self.final_logs = numbers_in(logs)
        self.log_epoch(epoch, self.final_logs)

    def on_exception(self, exception: BaseException) -> None:
        self._status_exception = exception

    def on_train_end(self, logs: Logs | None = None) -> None:
        self.end_run(run_status(self._status_exception, self.trainer.state.stop_reason))
        self._status_exception = None

    # -- per-step values ------------------------------------------------------------------------
    def _steps_done(self, logs: Logs | None) -> None:
        step = self.trainer.state.global_step
        every = self.log_every_n_steps
        assert every is not None
        # Every step in between counts, so that "every N steps" holds also when one batch makes several.
        due = [s for s in range(self._seen_step + 1, step + 1) if s % every == 0]
        self._seen_step = step
        if not due:
            return
        values = {k: v for k, v in (logs or {}).items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        with self.trainer.allow_sync():  # one host sync for all the batch's values, on logging steps only
            floats = torch.stack([v.detach().reshape(()).float() for v in values.values()]).tolist() if values else []
        metrics = dict(zip(values, floats))
        metrics.update(numbers_in(logs))  # figures a callback before this one added as floats (ThroughputMonitor)
        if self._step_lr is not None:
            metrics["lr"] = self._step_lr
        else:
            with self.trainer.allow_sync():  # a device-side rate (capturable optimizers) is read back
                metrics["lr"] = float(first_optimizer(self.trainer).param_groups[0]["lr"])
        self.log_step(due[-1], metrics)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seen_step": self._seen_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seen_step = int(state["seen_step"])


__all__ = ["ExperimentLogger", "first_optimizer", "numbers_in", "run_status"]
