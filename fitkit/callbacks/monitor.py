"""MonitorCallback: "watch a key, in a mode, with min_delta", written once.

EarlyStopping, ReduceLROnPlateau and ModelCheckpoint share it. The decisions follow Keras 3's
``MonitorCallback``: in ``"min"`` mode a value improves when ``value + min_delta < best``, in ``"max"``
mode when ``value - min_delta > best`` (strictly, so a change of exactly ``min_delta`` is no improvement).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from fitkit.callbacks.base import Callback, Logs, TrainerLike, overrides

_MODES = ("auto", "min", "max")


class MonitorCallback(Callback):
    """Base for callbacks that track the best value of one epoch-log key.

    Args:
        monitor: the epoch-log key to watch (``"val_loss"``, ``"accuracy"``, ...).
        mode: ``"min"``, ``"max"``, or ``"auto"``: lower is better for ``loss``/``val_loss``, and a
            metric says which way is better through its ``higher_is_better``; ``"auto"`` raises when the
            key's direction cannot be told, rather than guessing from its name.
        min_delta: the smallest change that counts as an improvement (>= 0; the sign is ignored, as Keras does).
        baseline: a value the monitored key must beat before anything counts as an improvement (None: off).
    """

    def __init__(
        self, monitor: str = "val_loss", mode: str = "auto", min_delta: float = 0.0, baseline: float | None = None
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a non-empty epoch-log key such as 'val_loss', got {monitor!r}")
        if mode not in _MODES:
            raise ValueError(f"{type(self).__name__}(mode={mode!r}): mode must be one of {_MODES}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)):
            raise TypeError(f"min_delta must be a number, got {type(min_delta).__name__}")
        if baseline is not None and (isinstance(baseline, bool) or not isinstance(baseline, (int, float))):
            raise TypeError(f"baseline must be None or a number, got {type(baseline).__name__}")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = abs(float(min_delta))
        self.baseline = baseline
        self.best: float | None = None
        self._resolved_mode: str | None = None if mode == "auto" else mode

    # -- direction ------------------------------------------------------------------------------
    @property
    def resolved_mode(self) -> str:
        """``"min"`` or ``"max"``; with ``mode="auto"`` asked of the trainer's metrics on first use."""
        if self._resolved_mode is None:
            self._resolved_mode = self._infer_mode()
        return self._resolved_mode

    def _infer_mode(self) -> str:
        name = self.monitor[4:] if self.monitor.startswith("val_") else self.monitor
        if name == "loss" or (self.monitor.startswith("val_") and name.endswith("_loss")):  # val_<set>_loss
            return "min"
        for metric in [*self.trainer.metrics, *self.trainer.weighted_metrics]:
            named_set = self.monitor.startswith("val_") and name.endswith("_" + metric.name)  # val_<set>_<metric>
            if (metric.name == name or named_set) and metric.higher_is_better is not None:
                return "max" if metric.higher_is_better else "min"
        raise ValueError(
            f"{type(self).__name__}(monitor={self.monitor!r}, mode='auto') cannot tell whether {self.monitor!r} "
            "should go up or down: it is neither the loss nor a metric that states higher_is_better. Pass "
            "mode='min' or mode='max'."
        )

    def is_improvement(self, value: float, reference: float | None) -> bool:
        """True when ``value`` beats ``reference`` by more than ``min_delta`` (always, if no reference).

        A non-finite value (NaN, inf) is never an improvement, as in Keras 3 (which starts ``best`` at
        +/-inf): a diverged epoch must not become the best one for ever.

        Args:
            value: the monitored value just logged.
            reference: the value to beat (the best so far), or None when there is none yet.
        """
        if not math.isfinite(value):
            return False
        if reference is None:
            return True
        if self.resolved_mode == "min":
            return value + self.min_delta < reference
        return value - self.min_delta > reference

    # -- reading the logs -----------------------------------------------------------------------
    def check_monitor_key(self) -> None:
        """Raises before the first epoch when ``monitor`` cannot appear in this fit's epoch logs."""
        check_key_can_exist(self.monitor, self.trainer, f"{type(self).__name__}(monitor=...)")

    def get_monitor_value(self, logs: Logs | None) -> float | None:
        """The monitored value, or None on an epoch that ``validation_freq`` did not validate.

        A key missing for any other reason is an error that lists the keys that exist.

        Args:
            logs: the epoch's (or a validation's) logs, as ``on_epoch_end``/``on_validation_end`` receive them.

        Raises:
            KeyError: ``monitor`` is not in ``logs`` for another reason than a skipped validation.
        """
        logs = logs or {}
        if self.monitor in logs:
            return float(logs[self.monitor])
        if (
            self.monitor.startswith("val_")
            and self.trainer.has_validation
            and not any(k.startswith("val_") for k in logs)
        ):
            return None  # validation_freq skipped this epoch
        hint = ""
        if self.monitor.startswith("val_") and not any(k.startswith("val_") for k in logs):
            hint = " Pass val_data (or validation_split) to fit to get val_ keys,"
        raise KeyError(
            f"{type(self).__name__}(monitor={self.monitor!r}): no such key in the epoch logs; "
            f"available: {sorted(logs)}.{hint} or choose one of the available keys."
        )

    def decides_on_validations(self, logs: Logs | None = None) -> bool:
        """True when this fit validates by steps (``validate_every_n_steps``) and the key is a validation
        key: decisions are then taken after every validation in ``fit`` (``on_validation_end``, whose logs
        hold ``"step"``), not at epoch ends; patience and the like count validations. With ``logs``, also
        that they are a validation's in ``fit`` (``evaluate``'s carry no ``"step"``).

        Args:
            logs: an ``on_validation_end`` event's logs to check as well, or None to ask about the fit only.
        """
        by_steps = self.trainer.validate_every_n_steps is not None and self.monitor.startswith("val_")
        return by_steps and (logs is None or "step" in logs)

    # -- state ----------------------------------------------------------------------------------
    def reset_monitor(self) -> None:
        """Forgets the best value and, for ``mode="auto"``, the direction (the next fit may have other metrics)."""
        self.best = None
        self._resolved_mode = None if self.mode == "auto" else self.mode

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]


def check_key_can_exist(key: str, trainer: TrainerLike, who: str) -> None:
    """Raises a ``ValueError`` when ``key`` cannot be in the epoch logs of ``trainer``'s current fit: a
    ``val_`` key without validation data, or (with the default steps, whose keys are known) a key that is
    neither the loss, a metric, a learning rate nor their ``val_`` forms; names the closest key."""
    from fitkit.trainer import Trainer  # here: fitkit.trainer imports the callbacks

    if not isinstance(trainer, Trainer):
        return  # a unit test's fake trainer: its keys are whatever the test scripts
    if any(_may_add_keys(cb) for cb in trainer.active_callbacks):
        return  # a callback of the user's may write this key into the logs itself (Keras allows it)
    if key.startswith("val_") and not trainer.has_validation:
        raise ValueError(
            f"{who}: {key!r} is a validation key but this fit has no validation data; pass val_data (or "
            f"validation_split) to fit, or monitor a training key such as {key[4:]!r}"
        )
    if type(trainer).train_step is not Trainer.train_step or type(trainer).eval_step is not Trainer.eval_step:
        return  # an overridden step may log any key
    known = ["loss"] + [m.name for m in [*trainer.metrics, *trainer.weighted_metrics]]
    name = key[4:] if key.startswith("val_") else key
    if name.startswith("lr") or any(name == k or name.endswith("_" + k) for k in known):
        return  # named validation sets log val_<set>_<key>
    keys = known + ["lr"] + ([f"val_{k}" for k in known] if trainer.has_validation else [])
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"{who}: {key!r} will never be in the epoch logs; {hint}this fit logs {keys}")


def _may_add_keys(callback: Callback) -> bool:
    """True for a callback that is not one of fitkit's own logging-neutral ones and has an
    ``on_epoch_end``: it may add keys to the epoch logs."""
    builtin = type(callback).__module__.startswith("fitkit.") and type(callback).__name__ != "LambdaCallback"
    return not builtin and overrides(callback, "on_epoch_end")


__all__ = ["MonitorCallback", "check_key_can_exist"]
