"""OptunaPruning: report a monitored value to an Optuna trial after each validation and stop a trial that
its pruner gives up on.

``optuna`` is imported when an ``OptunaPruning`` callback is built, never by ``import fitkit``.
"""

from __future__ import annotations

import math
from typing import Any

from fitkit import distributed
from fitkit.callbacks.base import Callback, Logs

#: The start of ``trainer.state.stop_reason`` when a trial was pruned (loggers then end the run KILLED).
PRUNED = "pruned by Optuna"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise ImportError(
            'fitkit.callbacks.OptunaPruning needs the optuna package, which is not installed: pip install "fitkit[optuna]"'
        ) from exc
    return optuna


class OptunaPruning(Callback):
    """Reports ``monitor`` to ``trial`` after every validation and raises ``optuna.TrialPruned`` when the
    study's pruner says so (as optuna-integration's Keras and Lightning callbacks do).

    The value is reported at the epoch index after each validated epoch, or, when ``fit`` validates by
    steps (``validate_every_n_steps``), at the global step of each validation. ``TrialPruned`` ends the
    fit like any exception: ``on_exception`` and ``on_train_end`` run, so loggers close their files
    (MLflow marks the run KILLED) and checkpoint callbacks write no half files; Optuna's ``study.optimize``
    then records the trial as pruned.

    Under torchrun, rank 0 reports and asks the pruner; its decision is broadcast, so every rank stops after
    the same validation (``trainer.stop``), and every rank raises ``TrialPruned`` from ``on_train_end``, once
    the fit has ended in step (raised inside the loop, it would reach the other ranks as a peer failure).
    Loggers then record the run as KILLED (the stop reason says it was pruned). Ranks other than 0 may pass
    ``trial=None``.

    Args:
        trial: the ``optuna.trial.Trial`` of the objective function.
        monitor: the key to report: an epoch-log key such as ``"val_loss"`` or ``"val_accuracy"`` (the
            study's direction says which way is better).

    Needs ``pip install "fitkit[optuna]"``.
    """

    def __init__(self, trial: Any, monitor: str = "val_loss") -> None:
        self._optuna = _optuna()
        if trial is not None and not (hasattr(trial, "report") and hasattr(trial, "should_prune")):
            raise TypeError(
                f"trial must be the optuna.trial.Trial your objective receives, got {type(trial).__name__}; "
                "create the callback inside the objective: OptunaPruning(trial, monitor='val_loss')"
            )
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a non-empty log key such as 'val_loss', got {monitor!r}")
        self.trial = trial
        self.monitor = monitor
        self._by_steps = False
        self._pruned: str | None = None

    def on_train_begin(self, logs: Logs | None = None) -> None:
        if self.trial is None and self.trainer.is_global_zero:
            raise ValueError("OptunaPruning(trial=None) on rank 0: rank 0 reports to the trial; pass the trial")
        self._by_steps = self.trainer.validate_every_n_steps is not None
        self._pruned = None
        if self.trial is not None and self.trainer.is_global_zero:
            self._check_running()

    def _check_running(self) -> None:
        """A finished trial (its objective returned, it was pruned or failed) refuses reports: an error now,
        before training, instead of at the first validation."""
        study, number = getattr(self.trial, "study", None), getattr(self.trial, "number", None)
        if study is None or number is None:  # not an optuna.trial.Trial (a test double): nothing to ask
            return
        state = next((t.state for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if state is not None and state.is_finished():
            raise ValueError(
                f"OptunaPruning: trial {number} is already finished ({state.name}); checked before training. Create "
                "the callback inside the objective with the trial it receives (each call gets a new one), or ask "
                "the study for a new trial (study.ask())"
            )

    def on_train_end(self, logs: Logs | None = None) -> None:
        pruned, self._pruned = self._pruned, None
        if pruned is not None:  # a distributed run: every rank stopped after the same validation
            raise self._optuna.TrialPruned(pruned)

    def on_validation_end(self, logs: Logs | None = None) -> None:
        if not self._by_steps or not logs or "step" not in logs:
            return
        self._report(self._value(logs), int(logs["step"]))

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self._by_steps:
            return
        logs = logs or {}
        skipped = self.monitor not in logs and not any(k.startswith("val_") for k in logs)
        if skipped and self.monitor.startswith("val_") and self.trainer.has_validation:
            return  # validation_freq skipped this epoch
        self._report(self._value(logs), epoch)

    def _value(self, logs: Logs) -> float:
        if self.monitor not in logs:
            hint = ""
            if self.monitor.startswith("val_") and not any(k.startswith("val_") for k in logs):
                hint = " Pass val_data (or validation_split) to fit to get val_ keys, or"
            raise KeyError(
                f"OptunaPruning(monitor={self.monitor!r}): no such key in the logs; available: "
                f"{sorted(k for k in logs if k not in ('step', 'epoch'))}.{hint} choose one of the available keys."
            )
        return float(logs[self.monitor])

    def _report(self, value: float, step: int) -> None:
        prune = False
        if self.trainer.is_global_zero:
            assert self.trial is not None
            self.trial.report(value, step)
            prune = bool(self.trial.should_prune())
        prune = distributed.broadcast_object(prune, self.trainer.dist)
        if prune:
            shown = f"{value:.4g}" if math.isfinite(value) else str(value)
            where = f"step {step}" if self._by_steps else f"epoch {step + 1}"
            message = f"trial pruned at {where} ({self.monitor}={shown})"
            self.trainer.stop(f"{PRUNED} at {where}")
            if self.trainer.world_size > 1:
                self._pruned = message
                return
            raise self._optuna.TrialPruned(message)


__all__ = ["OptunaPruning", "PRUNED"]
