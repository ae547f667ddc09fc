"""The learning-rate range test (Smith 2017; fastai's ``lr_find``, Lightning's ``Tuner.lr_find``).

[fitkit.Trainer.lr_find][] trains for up to ``num_steps`` optimizer steps while the learning rate of
every param group of every optimizer grows from ``start_lr`` to ``end_lr``, records the loss of each step,
and suggests the rate at the steepest descent of the smoothed loss. It runs the trainer's own loop (so
mixed precision, accumulation, clipping, several optimizers, a custom ``train_step`` and DDP behave as in
``fit``) with `LRFinder` as its only callback, and the trainer puts everything back afterwards:
weights, optimizer and GradScaler states, callbacks (never run), counters and every random generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fitkit import _arguments, distributed
from fitkit.callbacks.base import Callback, Logs

_MODES = ("exponential", "linear")


@dataclass
class LRFindResult:
    """What [fitkit.Trainer.lr_find][] measured.

    Attributes:
        lrs: the learning rate of each step taken.
        losses: the smoothed loss of each step (an exponential moving average, bias-corrected).
        raw_losses: each step's training loss (the mean over the batches of its accumulation group, and
            over the ranks of a distributed run).
        suggestion: the rate at the steepest descent of the smoothed loss (against log10(lr) in
            exponential mode, as fastai's ``steep``; against lr in linear mode), the first tenth of the
            steps and the last one left out as Lightning does; None with too few finite points.
        diverged: the test stopped early because the loss diverged (or became non-finite).
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    raw_losses: list[float] = field(default_factory=list)
    suggestion: float | None = None
    diverged: bool = False

    def plot(self, path: str | Path | None = None) -> Any:
        """The smoothed loss against the learning rate (log scale in exponential mode), the suggestion
        marked; needs ``pip install "fitkit[plot]"`` (matplotlib).

        Args:
            path: a PNG file to write, or None.

        Returns:
            the ``matplotlib.figure.Figure``.
        """
        figure_class = _figure_class("LRFindResult.plot")
        figure = figure_class(figsize=(6, 4))
        axes = figure.subplots()
        axes.plot(self.lrs, self.losses, label="smoothed loss")
        if len(self.lrs) > 1 and self.lrs[-1] / self.lrs[0] > 100:
            axes.set_xscale("log")
        if self.suggestion is not None:
            index = self.lrs.index(self.suggestion)
            axes.plot(
                [self.suggestion], [self.losses[index]], "o", color="red", label=f"suggestion {self.suggestion:.2e}"
            )
        axes.set_xlabel("learning rate")
        axes.set_ylabel("loss")
        axes.legend()
        figure.tight_layout()
        if path is not None:
            figure.savefig(Path(path), format="png")
        return figure


def _figure_class(who: str) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f'{who} draws with matplotlib, which is not installed: pip install "fitkit[plot]"') from exc
    return Figure


def suggest(lrs: list[float], losses: list[float], mode: str = "exponential") -> float | None:
    """The learning rate at the steepest descent of ``losses`` (see [LRFindResult][fitkit.lr_finder.LRFindResult]).

    Args:
        lrs: the rates, in the order they were used.
        losses: the (smoothed) loss at each rate; non-finite ones are left out.
        mode: ``"exponential"`` (the slope against log10(lr)) or ``"linear"`` (against lr).
    """
    import numpy as np

    skip_begin, skip_end = min(10, len(lrs) // 10), 1
    points = [
        (lr, loss) for lr, loss in list(zip(lrs, losses))[skip_begin : len(lrs) - skip_end] if math.isfinite(loss)
    ]
    if len(points) < 2:
        return None
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    gradients = np.gradient(y, np.log10(x) if mode == "exponential" else x)
    return float(points[int(np.argmin(gradients))][0])


class LRFinder(Callback):
    """The callback that drives a range test inside the trainer's loop: sets every param group's rate
    before each step, reads each step's loss (a host sync per optimizer step: the test needs it to stop
    on divergence) and stops training after ``num_steps`` steps or when the loss diverges.

    Args:
        start_lr: the first step's learning rate (> 0).
        end_lr: the last step's learning rate (> ``start_lr``).
        num_steps: optimizer steps to take at most (>= 2).
        mode: ``"exponential"`` (rates evenly spaced on a log scale, the default) or ``"linear"``.
        smooth: the weight of each new loss in the moving average, in (0, 1]; 1 means no smoothing
            (0.05 by default; Lightning's beta=0.98 is smooth=0.02).
        stop_divergence: stop when the smoothed loss exceeds this many times the best one so far (> 1;
            None: never stop early, except on a non-finite loss).
        monitor: the key of ``train_step``'s logs to follow (``"loss"``; a GAN's step may log ``"d_loss"``).
    """

    def __init__(
        self,
        start_lr: float = 1e-7,
        end_lr: float = 10.0,
        num_steps: int = 100,
        mode: str = "exponential",
        smooth: float = 0.05,
        stop_divergence: float | None = 4.0,
        monitor: str = "loss",
    ) -> None:
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be the name of a key of train_step's logs, such as 'loss', got {monitor!r}")
        self.monitor = monitor
        self.start_lr = _arguments.check_positive_number(start_lr, "start_lr", "the first step's learning rate")
        self.end_lr = _arguments.check_positive_number(end_lr, "end_lr", "the last step's learning rate")
        if self.end_lr <= self.start_lr:
            raise ValueError(
                f"end_lr must be larger than start_lr (the test sweeps upwards), got start_lr={start_lr!r}, "
                f"end_lr={end_lr!r}"
            )
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"num_steps must be an int >= 2 (optimizer steps to sweep over), got {num_steps!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES} (how the rate grows), got {mode!r}")
        if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or not 0 < smooth <= 1:
            raise ValueError(
                f"smooth must be a number in (0, 1] (the weight of each new loss in the moving average; "
                f"1: no smoothing), got {smooth!r}"
            )
        if stop_divergence is not None and (
            isinstance(stop_divergence, bool) or not isinstance(stop_divergence, (int, float)) or stop_divergence <= 1
        ):
            raise ValueError(
                f"stop_divergence must be None or a number > 1 (stop when the smoothed loss exceeds this many "
                f"times the best one), got {stop_divergence!r}"
            )
        self.num_steps = num_steps
        self.mode = mode
        self.smooth = float(smooth)
        self.stop_divergence = None if stop_divergence is None else float(stop_divergence)
        self.schedule = [self._lr_at(i) for i in range(num_steps)]
        self.result = LRFindResult()
        self._group: list[torch.Tensor] = []
        self._start_step = 0
        self._lr_set_for = -1
        self._average = 0.0
        self._best = math.inf

    def _lr_at(self, i: int) -> float:
        fraction = i / (self.num_steps - 1)
        if self.mode == "exponential":
            return self.start_lr * (self.end_lr / self.start_lr) ** fraction
        return self.start_lr + (self.end_lr - self.start_lr) * fraction

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.trainer.optimizers.values())

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.result = LRFindResult()
        self._group = []
        self._start_step = self.trainer.global_step
        self._lr_set_for = -1
        self._average, self._best = 0.0, math.inf

    def on_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        i = self.trainer.global_step - self._start_step
        if i != self._lr_set_for and i < self.num_steps:
            lr = self.schedule[i]
            for optimizer in self._optimizers():
                for group in optimizer.param_groups:
                    group["lr"] = lr
            self._lr_set_for = i

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if not isinstance(value, torch.Tensor):
            keys = sorted(k for k, v in (logs or {}).items() if isinstance(v, torch.Tensor))
            hint = f"; pass lr_find(monitor={keys[0]!r})" if keys else ""
            raise ValueError(
                f"lr_find follows train_step's {self.monitor!r} value, and this train_step logs no "
                f"{self.monitor!r} (its keys: {keys}): no step could be recorded{hint} to follow another key"
            )
        self._group.append(value.detach())
        self._record_steps()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self._record_steps()  # data of unknown length: the epoch's last group stepped after its last batch

    def _record_steps(self) -> None:
        steps = self.trainer.global_step - self._start_step
        if steps <= len(self.result.lrs) or not self._group:
            return
        with self.trainer.allow_sync():  # the test reads every step's loss, on purpose
            local = float(torch.stack([t.float() for t in self._group]).mean())
        self._group = []
        loss = distributed.mean_over_ranks({"loss": local}, self.trainer.dist)["loss"]
        result = self.result
        n = len(result.lrs) + 1
        result.lrs.append(self.schedule[n - 1])
        result.raw_losses.append(loss)
        self._average = (1 - self.smooth) * self._average + self.smooth * loss
        smoothed = self._average / (1 - (1 - self.smooth) ** n) if self.smooth < 1 else loss
        result.losses.append(smoothed)
        if not math.isfinite(smoothed):
            result.diverged = True
        elif smoothed < self._best or n == 1:
            self._best = smoothed
        elif self.stop_divergence is not None and n > 1 and smoothed > self.stop_divergence * self._best:
            result.diverged = True
        if result.diverged:
            self.trainer.stop("lr_find: the loss diverged")
        elif n >= self.num_steps:
            self.trainer.stop("lr_find: done")

    def on_train_end(self, logs: Logs | None = None) -> None:
        self.result.suggestion = suggest(self.result.lrs, self.result.losses, self.mode)


__all__ = ["LRFindResult", "LRFinder", "suggest"]
