"""EarlyStopping: stop when a monitored epoch value stops improving, with Keras 3's decisions."""

from __future__ import annotations

from typing import Any

import torch

from fitkit import _arguments
from fitkit.callbacks.base import Logs
from fitkit.callbacks.monitor import MonitorCallback


class EarlyStopping(MonitorCallback):
    """Stops training when ``monitor`` has not improved for ``patience`` epochs.

    The decisions are Keras 3's (``keras/src/callbacks/early_stopping.py``), so the same sequence of
    monitored values stops at the same epoch:

    * an epoch is monitored once ``epoch >= start_from_epoch`` and the key is in the logs (an epoch that
      ``validation_freq`` skipped counts for nothing);
    * every monitored epoch adds one to ``wait``; an improvement on the best value so far (by more than
      ``min_delta``, strictly) records the new best and resets ``wait`` to 0, but with a ``baseline``
      only once the value also beats the baseline by more than ``min_delta``;
    * a monitored epoch that does not improve stops training when ``wait >= patience`` (and
      ``epoch > 0``). An epoch that improves never stops training, even when it does not beat the baseline.

    Args:
        monitor: the epoch-log key to watch (default ``"val_loss"``).
        min_delta: an improvement must exceed this (>= 0; the sign is ignored, as in Keras). Default 0.
        patience: monitored epochs without improvement before stopping (int >= 0; 0 stops at the first
            epoch that does not improve). Default 0.
        verbose: 1 prints Keras's messages ("Epoch N: early stopping", "Restoring model weights ...").
        mode: ``"min"``, ``"max"`` or ``"auto"`` (the loss is minimised; a metric states its direction
            through ``higher_is_better``; ``"auto"`` raises when it cannot tell, instead of guessing from
            the name as Keras 2 did).
        baseline: a value the monitored key must beat before ``wait`` is reset (None: off).
        restore_best_weights: at the end of ``fit``, whatever ended it (early stop, last epoch, an
            exception), load the weights of the best monitored epoch, as Keras 3 does. The best weights
            are copied to the CPU on every improving epoch (a host sync then; no GPU memory is held).
        start_from_epoch: epochs (0-based indices below this) that are not monitored at all: a warm-up.

    Attributes:
        stopped_epoch: the 0-based epoch at which this callback stopped training (0 if it did not).
        best_epoch: the 0-based epoch of the best monitored value.
        wait: monitored epochs since the last improvement that reset it.

    The reason passed to ``trainer.stop`` (``trainer.state.stop_reason``) names the key, the best value
    and its epoch. Messages print 1-based epochs, as Keras does.

    Deliberate differences from Keras: a monitored key missing from the logs is an error (Keras warns
    and never stops); an unknown ``mode`` is an error (Keras falls back to ``"auto"``); Keras compares
    through ``keras.ops`` in float32 while fitkit compares Python floats (float64), which can only
    matter for values closer than float32's resolution.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        super().__init__(monitor=monitor, mode=mode, min_delta=min_delta, baseline=baseline)
        self.patience = _arguments.check_int(
            patience,
            "patience",
            0,
            "monitored epochs without improvement before stopping; 0 stops at the first epoch that does not improve",
        )
        self.start_from_epoch = _arguments.check_int(
            start_from_epoch, "start_from_epoch", 0, "0-based epochs to skip before monitoring starts"
        )
        if verbose not in (0, 1):
            raise ValueError(f"verbose must be 0 (silent) or 1 (print when stopping and restoring), got {verbose!r}")
        if not isinstance(restore_best_weights, bool):
            raise TypeError(f"restore_best_weights must be True or False, got {restore_best_weights!r}")
        self.verbose = verbose
        self.restore_best_weights = restore_best_weights
        self._reset()

    def _reset(self) -> None:
        self.reset_monitor()
        self.wait = 0
        self.stopped_epoch = 0
        self.best_epoch = 0
        self.best_weights: dict[str, torch.Tensor] | None = None

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._reset()  # reset_monitor() also forgets the direction: re-asked of this fit's metrics
        self.check_monitor_key()  # a key that cannot exist: an error now (naming the closest), not after an epoch
        _ = self.resolved_mode  # fail before the first epoch, not after it, when "auto" cannot tell

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if not self.decides_on_validations():
            self._decide(epoch, logs, step=None)

    def on_validation_end(self, logs: Logs | None = None) -> None:
        if self.decides_on_validations(logs):  # validate_every_n_steps: every validation is monitored
            assert logs is not None
            self._decide(int(logs["epoch"]), logs, step=int(logs["step"]))

    def _decide(self, epoch: int, logs: Logs | None, step: int | None) -> None:
        current = self.get_monitor_value(logs)
        if current is None or epoch < self.start_from_epoch:
            return  # a skipped validation epoch, or still warming up
        if self.restore_best_weights and self.best_weights is None:
            # Keras: the first monitored epoch's weights are the best until something improves on them.
            self.best_weights = self._copy_weights()
            self.best_epoch = epoch
        self.wait += 1
        if self.is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = self._copy_weights()
            # Only a value that beats both the best and the baseline restarts the count.
            if self.baseline is None or self.is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and (epoch > 0 or step is not None):
            self.stopped_epoch = epoch
            self.trainer.stop(self._stop_reason(epoch, step))

    def on_train_end(self, logs: Logs | None = None) -> None:
        if self.stopped_epoch > 0 and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.model.load_state_dict(self.best_weights)

    # -- helpers --------------------------------------------------------------------------------
    def _stop_reason(self, epoch: int, step: int | None = None) -> str:
        best = "none" if self.best is None else f"{self.best:.6g}"
        unit = "epoch(s)" if step is None else "validation(s)"
        where = f"epoch {epoch + 1}" if step is None else f"step {step} (epoch {epoch + 1})"
        reason = (
            f"EarlyStopping: {self.monitor} did not improve by more than {self.min_delta:g} for "
            f"{self.wait} monitored {unit} (patience={self.patience}); best {best} at epoch "
            f"{self.best_epoch + 1}; stopped after {where}"
        )
        if self.baseline is not None and self.best is not None and not self.is_improvement(self.best, self.baseline):
            reason += f"; the baseline {self.baseline:g} was never beaten"
        return reason

    def _copy_weights(self) -> dict[str, torch.Tensor]:
        # A copy on the CPU: restoring needs it once, and keeping it on the GPU would double the model's
        # memory there. Buffers (BatchNorm statistics) are part of the weights, as in Keras.
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best_epoch": self.best_epoch,
            "best_weights": self.best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.wait = int(state["wait"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self.best_epoch = int(state["best_epoch"])
        weights = state["best_weights"]
        self.best_weights = None if weights is None else {k: v.detach().cpu() for k, v in weights.items()}


__all__ = ["EarlyStopping"]
