"""Training schedules: step-level validation, ``validation_steps``, and the ``max_steps``/``max_time`` budgets.

The loop asks two small objects at each batch boundary, and only when the feature is on:
`StepValidation` says whether the optimizer step just taken is one to validate after, and
`Budget` says whether a step or time budget has run out. Time is read from [clock][fitkit.schedule.clock] (a host
clock: no device sync), which tests replace with a fake; the training time so far lives in
``TrainerState.train_time`` so that it adds up across resumes.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from fitkit.data import InMemoryLoader
from fitkit.state import TrainerState

clock: Callable[[], float] = time.monotonic
"""The clock ``max_time`` reads: seconds, monotonic, host only (``time.monotonic``). Replace it to fake time in a
test, ``monkeypatch.setattr(fitkit.schedule, "clock", fake)``; each ``fit`` looks it up when it starts."""


def resolve_max_time(max_time: Any) -> float | None:
    """``max_time`` in seconds: a number of seconds or a ``datetime.timedelta``; None: no limit."""
    if max_time is None:
        return None
    if isinstance(max_time, datetime.timedelta):
        seconds = max_time.total_seconds()
    elif isinstance(max_time, (int, float)) and not isinstance(max_time, bool):
        seconds = float(max_time)
    else:
        raise TypeError(
            f"max_time must be None, a number of seconds or a datetime.timedelta, got {type(max_time).__name__}; "
            "e.g. max_time=3600 or max_time=datetime.timedelta(hours=1)"
        )
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"max_time must be a finite duration > 0 seconds, got {max_time!r}")
    return seconds


def check_validation_freq(validation_freq: Any, validate_every_n_steps: int | None) -> Any:
    """``validation_freq`` as the epoch schedule understands it; 0/None means "by steps only", which
    needs ``validate_every_n_steps``."""
    if validation_freq is None or (validation_freq == 0 and not isinstance(validation_freq, bool)):
        if validate_every_n_steps is None:
            raise ValueError(
                f"validation_freq={validation_freq!r} turns epoch-level validation off, which is for validating "
                "by steps only; pass validate_every_n_steps=N too, or validation_freq=an int >= 1 or a list of "
                "1-based epochs"
            )
        return []  # no epoch is validated
    return validation_freq


def epochs_for(
    epochs: int | None, max_steps: int | None, max_time: float | None, steps_per_epoch: int | None
) -> int | None:
    """The epoch to stop before: ``epochs`` when given; else enough epochs for ``max_steps`` (optimizer
    steps per epoch known), unlimited (None) for a budget alone, and 1 without any budget (Keras's default)."""
    if epochs is not None:
        return epochs
    if max_steps is not None and steps_per_epoch:
        return math.ceil(max_steps / steps_per_epoch)
    if max_steps is not None or max_time is not None:
        return None
    return 1


def val_loaders(val_data: Any, to_loader: Callable[[Any, str], Any], name: str) -> dict[str | None, Any]:
    """Validation data as ``{set name: loader}``; a single set is named None (keys ``val_loss``, ...).

    A dict of sets gives ``val_<name>_loss``...; a list or tuple of loaders is an error that suggests
    the dict (a tuple of two arrays stays in-memory ``(x, y)`` data).
    """
    if isinstance(val_data, Mapping):
        if not val_data:
            raise ValueError(f"{name} is an empty dict; pass {{'name': loader, ...}} with at least one set, or None")
        loaders: dict[str | None, Any] = {}
        for key, data in val_data.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(
                    f"{name}: validation set names must be identifiers (they become log keys such as "
                    f"val_<name>_loss), got {key!r}"
                )
            loaders[key] = to_loader(data, f"{name}[{key!r}]")
        return loaders
    if isinstance(val_data, (list, tuple)) and val_data and all(_is_loader_like(d) for d in val_data):
        raise TypeError(
            f"{name} is a {type(val_data).__name__} of {len(val_data)} loaders; to validate on several sets, "
            f"name them in a dict: {name}={{'clean': clean_loader, 'noisy': noisy_loader}} (logs val_clean_loss, "
            "val_noisy_loss, ...)"
        )
    return {None: to_loader(val_data, name)}


def _is_loader_like(obj: Any) -> bool:
    from torch.utils.data import DataLoader

    return isinstance(obj, (DataLoader, InMemoryLoader))


class StepValidation:
    """``validate_every_n_steps``: validate after every ``every``-th optimizer step of the whole run
    (``global_step`` counts across resumes), once per step even when accumulation keeps a step for
    several batches."""

    def __init__(self, every: int) -> None:
        self.every = every

    def due(self, state: TrainerState) -> bool:
        step = state.global_step
        return step > 0 and step % self.every == 0 and state.last_validation_step != step


class Budget:
    """``max_steps`` and ``max_time``: `check` after each batch stops the run (with the reason)
    once a budget has run out.

    The time is the wall time spent in ``fit``'s loop (training and validation), added to what
    ``state.train_time`` held when the fit started (a resumed run's earlier time). Only the process that
    ``decides`` (rank 0) reads its clock; the loop's per-batch stop all-reduce ends every rank at the
    same step.
    """

    def __init__(self, max_steps: int | None, max_time: float | None, state: TrainerState, decides: bool) -> None:
        self.max_steps, self.max_time, self.state = max_steps, max_time, state
        self.decides = decides
        self._clock = clock
        self._start = self._clock()
        self._base = state.train_time

    def elapsed(self) -> float:
        """Training time so far, resumed runs included (seconds); also stored in ``state.train_time``."""
        self.state.train_time = self._base + (self._clock() - self._start)
        return self.state.train_time

    def check(self) -> str | None:
        """The reason to stop now, or None."""
        if self.max_steps is not None and self.state.global_step >= self.max_steps:
            return f"max_steps: {self.state.global_step} optimizer steps reached max_steps={self.max_steps}"
        if self.max_time is not None:
            elapsed = self.elapsed()
            if self.decides and elapsed >= self.max_time:
                return f"max_time: {elapsed:.6g} s of training reached max_time={self.max_time:g} s"
        return None

    def spent(self) -> bool:
        """True on the deciding rank when ``max_time`` was spent before this fit trained (a resumed run)."""
        return self.decides and self.max_time is not None and self._base >= self.max_time

    def reason_elsewhere(self) -> str:
        """The reason on a rank that a budget vote stopped: ``max_steps`` (every rank counts the same steps), or
        ``max_time`` as rank 0's clock decided it."""
        if self.max_steps is not None and self.state.global_step >= self.max_steps:
            return self.check() or ""
        return f"max_time: rank 0's clock reached max_time={self.max_time:g} s (this rank's: {self.elapsed():.6g} s)"


__all__ = [
    "clock",
    "resolve_max_time",
    "check_validation_freq",
    "epochs_for",
    "val_loaders",
    "StepValidation",
    "Budget",
]
