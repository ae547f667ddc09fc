"""SpikeDetection: a training loss far above its recent values is reported with its step, or ends training."""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fitkit import _arguments, distributed
from fitkit.callbacks.base import Callback, Logs

ACTIONS = ("warn", "raise")


class LossSpikeError(RuntimeError):
    """Raised by ``SpikeDetection(action="raise")``.

    Args:
        message: what was found, where, and the checkpoint written.
        spike: the first spike: ``step``, ``epoch``, ``batch``, ``value``, ``mean``, ``std``, ``indices``.
    """

    def __init__(self, message: str, spike: dict[str, Any]) -> None:
        super().__init__(message)
        self.spike = spike


class SpikeDetection(Callback):
    """Finds training batches whose ``monitor`` value (the loss) jumps far above its running statistics.

    A value is a spike when it is not finite, or when, after ``warmup`` batches, it exceeds the mean of the last
    ``window`` values by more than ``threshold`` standard deviations of them (the deviation counted as at least
    1% of the mean, so that a flat loss does not make noise a spike). Spikes stay out of the statistics.

    The values stay on the device: each batch's is kept (no host read) and the kept ones are read back together
    every ``check_every_n_steps`` optimizer steps and at each epoch's end (one declared sync,
    ``trainer.allow_sync()``), then checked in order, so a spike is reported with its own step, epoch and
    batch index, and with the batch's sample indices when the batch is a mapping with an ``"indices"`` (or
    ``"index"``) entry. ``check_every_n_steps=1`` decides at the very step, at one sync per step.

    With ``action="warn"`` each spike is a ``RuntimeWarning`` and is added to ``spikes``; with ``"raise"`` the
    first one writes a checkpoint into ``dirpath`` (when given: ``spike-step<N>.pt``, the state after the batch
    that reads it) and raises `LossSpikeError`. Under torchrun each rank checks its own loss at the same steps
    and the ranks agree: when any rank found a spike, every rank writes its part of the checkpoint and raises.

    Args:
        monitor: the key of the per-batch logs to watch (``train_step``'s values; default ``"loss"``).
        window: how many of the last values give the running mean and deviation (>= 2).
        warmup: batches seen before a finite value can be a spike (>= ``window``; default 20).
        threshold: standard deviations above the mean that make a spike (> 0; default 6).
        action: ``"warn"`` or ``"raise"``.
        check_every_n_steps: optimizer steps between reads of the kept values (>= 1; default 10).
        dirpath: with ``action="raise"``, the folder for the checkpoint written before raising; None: none.
    """

    stops_mid_epoch = False  # it raises rather than stops (every rank at the same step)

    def __init__(
        self,
        monitor: str = "loss",
        window: int = 10,
        warmup: int = 20,
        threshold: float = 6.0,
        action: str = "warn",
        check_every_n_steps: int = 10,
        dirpath: str | Path | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(
                f"SpikeDetection(monitor=...) must be a key of the batch logs such as 'loss', got {monitor!r}"
            )
        self.monitor = monitor
        self.window = _arguments.check_int(window, "window", 2, "values in the running statistics")
        self.warmup = _arguments.check_int(warmup, "warmup", self.window, "batches before a spike can be found")
        self.threshold = _arguments.check_positive_number(threshold, "threshold", "standard deviations")
        if action not in ACTIONS:
            raise ValueError(f"SpikeDetection(action=...) must be one of {ACTIONS}, got {action!r}")
        self.action = action
        self.check_every_n_steps = _arguments.check_int(
            check_every_n_steps, "check_every_n_steps", 1, "optimizer steps"
        )
        if dirpath is not None:
            _arguments.check_path(dirpath, "SpikeDetection(dirpath=...)")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.spikes: list[dict[str, Any]] = []  # every spike found: step, epoch, batch, value, mean, std, indices
        self._values: deque[float] = deque(maxlen=self.window)
        self._seen = 0  # batches checked so far
        self._pending: list[tuple[int, int, int, Any, Any]] = []  # (step, epoch, batch, value, indices), unread
        self._checked_step = 0

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.spikes, self._pending = [], []
        self._checked_step = self.trainer.state.global_step

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        state = self.trainer.state
        step = state.global_step
        value = value.detach() if isinstance(value, torch.Tensor) else value  # kept on the device
        self._pending.append((step, state.epoch, batch, value, _indices(self.trainer.batch)))
        if step - self._checked_step >= self.check_every_n_steps:
            self._check()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self._check()

    # -- checking -------------------------------------------------------------------------------
    def _check(self) -> None:
        """Reads the kept values back (one declared sync), checks them in order, acts on the spikes found."""
        pending, self._pending = self._pending, []
        self._checked_step = self.trainer.state.global_step
        found = [spike for spike in map(self._judge, _read(pending, self.trainer)) if spike is not None]
        if self.trainer.world_size > 1:  # every rank reads at the same steps: they agree on raising
            if distributed.any_rank(bool(found), self.trainer.dist) and self.action == "raise":
                self._raise(found[0] if found else None)
        elif found and self.action == "raise":
            self._raise(found[0])
        for spike in found:
            self.spikes.append(spike)
            warnings.warn(_describe(self.monitor, spike), RuntimeWarning, stacklevel=2)

    def _judge(self, item: tuple[int, int, int, float, Any]) -> dict[str, Any] | None:
        """The spike ``item`` is, or None; a value that is no spike joins the statistics."""
        step, epoch, batch, value, indices = item
        values = self._values
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.pstdev(values) if len(values) > 1 else math.nan
        self._seen += 1
        spike = not math.isfinite(value)
        if not spike and self._seen > self.warmup and len(values) == self.window:
            spike = value > mean + self.threshold * max(std, 0.01 * abs(mean))
        if not spike:
            values.append(value)
            return None
        return {
            "step": step,
            "epoch": epoch,
            "batch": batch,
            "value": value,
            "mean": mean,
            "std": std,
            "indices": indices,
        }

    def _raise(self, spike: dict[str, Any] | None) -> None:
        trainer = self.trainer
        path = None
        if self.dirpath is not None:
            path = trainer.save_checkpoint(self.dirpath / f"spike-step{trainer.state.global_step}.pt")
        if spike is None:
            spike = {"step": trainer.state.global_step, "epoch": trainer.state.epoch, "on_another_rank": True}
            message = f"SpikeDetection: another rank found a spike of {self.monitor!r} by step {spike['step']}"
        else:
            message = _describe(self.monitor, spike)
        if path is not None:
            message += f"; the state at step {trainer.state.global_step} is saved in {path}"
        self.spikes.append(spike)
        error = LossSpikeError(message, spike)
        raise distributed.on_every_rank(error) if trainer.world_size > 1 else error

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        pending = _read(self._pending, self.trainer) if self._pending else []  # read in a checkpoint write
        return {"values": list(self._values), "seen": self._seen, "pending": [list(p[:4]) for p in pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._values = deque((float(v) for v in state["values"]), maxlen=self.window)
        self._seen = int(state["seen"])
        self._pending = [(int(s), int(e), int(b), float(v), None) for s, e, b, v in state.get("pending", [])]


def _indices(batch: Any) -> Any:
    """A batch's sample indices, when it is a mapping that carries them (kept on the device until read)."""
    if isinstance(batch, Mapping):
        for key in ("indices", "index"):
            if key in batch:
                return batch[key]
    return None


def _read(pending: list[tuple[int, int, int, Any, Any]], trainer: Any) -> list[tuple[int, int, int, float, Any]]:
    """The kept values as floats (and indices as lists), read back together: one declared host sync."""
    if not pending:
        return []
    tensors = [p[3].reshape(()).float() for p in pending if isinstance(p[3], torch.Tensor)]
    with trainer.allow_sync():
        read = iter(torch.stack(tensors).tolist() if tensors else [])
        values = [next(read) if isinstance(p[3], torch.Tensor) else float(p[3]) for p in pending]
        indices = [p[4].tolist() if isinstance(p[4], torch.Tensor) else p[4] for p in pending]
    return [(s, e, b, v, i) for (s, e, b, _, _), v, i in zip(pending, values, indices)]


def _describe(monitor: str, spike: dict[str, Any]) -> str:
    where = f"step {spike['step']} (epoch {spike['epoch'] + 1}, batch index {spike['batch']})"
    indices = f", samples {spike['indices']}" if spike.get("indices") is not None else ""
    return (
        f"SpikeDetection: {monitor} = {spike['value']:.6g} at {where}{indices}, against a running mean of "
        f"{spike['mean']:.6g} (std {spike['std']:.3g})"
    )


__all__ = ["LossSpikeError", "SpikeDetection"]
