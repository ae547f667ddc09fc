"""MonitorCallback: "watch a key, in a mode, with min_delta", written once.

EarlyStopping, ReduceLROnPlateau and ModelCheckpoint share it. The decisions follow Keras 3's
``MonitorCallback``: in ``"min"`` mode a value improves when ``value + min_delta < best``, in ``"max"``
mode when ``value - min_delta > best`` (strictly, so a change of exactly ``min_delta`` is no improvement).
"""

from __future__ import annotations

from typing import Any

from fitkit.callbacks.base import Callback, Logs

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
        if name == "loss":
            return "min"
        trainer = getattr(self, "trainer", None)
        for metric in getattr(trainer, "metrics", None) or []:
            if metric.name == name and metric.higher_is_better is not None:
                return "max" if metric.higher_is_better else "min"
        raise ValueError(
            f"{type(self).__name__}(monitor={self.monitor!r}, mode='auto') cannot tell whether {self.monitor!r} "
            "should go up or down: it is neither the loss nor a metric that states higher_is_better. Pass "
            "mode='min' or mode='max'."
        )

    def is_improvement(self, value: float, reference: float | None) -> bool:
        """True when ``value`` beats ``reference`` by more than ``min_delta`` (always, if no reference)."""
        if reference is None:
            return True
        if self.resolved_mode == "min":
            return value + self.min_delta < reference
        return value - self.min_delta > reference

    # -- reading the logs -----------------------------------------------------------------------
    def get_monitor_value(self, logs: Logs | None) -> float | None:
        """The monitored value, or None on an epoch that ``validation_freq`` did not validate.

        A key missing for any other reason is an error that lists the keys that exist.
        """
        logs = logs or {}
        if self.monitor in logs:
            return float(logs[self.monitor])
        trainer = getattr(self, "trainer", None)
        if (
            self.monitor.startswith("val_")
            and getattr(trainer, "has_validation", False)
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

    # -- state ----------------------------------------------------------------------------------
    def reset_monitor(self) -> None:
        """Forgets the best value and, for ``mode="auto"``, the direction (the next fit may have other metrics)."""
        self.best = None
        self._resolved_mode = None if self.mode == "auto" else self.mode

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
