"""Where a fit's time goes: the laps of the training loop, kept only while a callback asks for them.

A `LoopTimes` exists in a `FitRun` only when one of the fit's callbacks sets ``wants_loop_times = True``
(`fitkit.callbacks.ThroughputMonitor`); otherwise the loop's few ``if clock is not None`` checks are all it
costs. The loop calls `LoopTimes.lap` at the boundaries between phases, so the epoch's wall time is split into
four buckets that sum to it: waiting for the data (the loader's ``next`` and the device copy), the step
(``train_step``, the running sums, the end of the epoch's last group), the callbacks (batch and epoch hooks, the
checkpoint writes they ask for) and validation. Each lap is one ``perf_counter()`` call: no device sync.

On CUDA the host runs ahead of the device, so a host clock alone would charge the device's work to whichever
phase happens to wait for it. The clock therefore records one CUDA event after each step (asynchronous), and a
reader (the monitor, at its log interval) calls `LoopTimes.wait_for_device`, which waits on the last step's
event and charges that wait to the step; the epoch's end waits too (its logs are read from the device inside
the step's lap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from time import perf_counter
from typing import Any

import torch

DATA, STEP, CALLBACKS, VALIDATION = range(4)
BUCKETS = ("time_data", "time_step", "time_callbacks", "time_validation")


class LoopTimes:
    """The laps of one fit's training loop (see the module docstring); read by ``trainer.loop_times``.

    Attributes:
        seconds: this epoch's seconds per bucket, in the order of ``BUCKETS``.
        samples: training samples (this rank's) since the fit started.
        batches: training batches since the fit started.
        epoch_start: ``perf_counter()`` when this epoch's ``on_epoch_begin`` started.
    """

    def __init__(self, device: torch.device) -> None:
        self.seconds = [0.0, 0.0, 0.0, 0.0]
        self.samples = 0
        self.batches = 0
        self.last = self.epoch_start = perf_counter()
        use_events = device.type == "cuda" and torch.cuda.is_available()
        self.event: Any = torch.cuda.Event() if use_events else None  # recorded after every step

    def lap(self, bucket: int) -> None:
        """Charges the time since the last lap to ``bucket``."""
        now = perf_counter()
        self.seconds[bucket] += now - self.last
        self.last = now

    def step_done(self, n: int) -> None:
        """After a training step of ``n`` samples: charges its time to the step, counts it, marks it on the
        device's stream (CUDA: an event, recorded without waiting)."""
        self.lap(STEP)
        self.samples += n
        self.batches += 1
        if self.event is not None:
            self.event.record()

    def fetching(self, batches: Any) -> Iterator[Any]:
        """``batches`` with each ``next`` charged to the data, and the time between a batch and the next
        ``next`` (the batch's end hooks and the checkpoint writes they ask for) to the callbacks. The time
        before the first batch (making the epoch's iterator: a DataLoader starts its workers) is the data's."""
        self.lap(DATA)
        iterator = iter(batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                self.lap(DATA)
                return
            self.lap(DATA)
            yield batch
            self.lap(CALLBACKS)

    def start_epoch(self) -> None:
        """At the start of an epoch (before ``on_epoch_begin``): the buckets start from zero."""
        self.seconds = [0.0, 0.0, 0.0, 0.0]
        self.last = self.epoch_start = perf_counter()

    @contextlib.contextmanager
    def validating(self) -> Iterator[None]:
        """Charges what comes before to the callbacks and the block's time to validation."""
        self.lap(CALLBACKS)
        try:
            yield
        finally:
            self.lap(VALIDATION)

    def wait_for_device(self) -> None:
        """Waits until the device has finished the last step (CUDA: its event; a host sync, on purpose) and
        charges the wait to the step; the time before it to the callbacks (the caller is one)."""
        if self.event is None:
            return
        self.lap(CALLBACKS)
        self.event.synchronize()
        self.lap(STEP)

    def epoch_seconds(self) -> dict[str, float]:
        """The buckets so far in this epoch by name, the time since the last lap charged to the callbacks
        (the caller is one), and ``time_epoch``, the epoch's wall time so far (their sum)."""
        self.lap(CALLBACKS)
        times = dict(zip(BUCKETS, self.seconds))
        times["time_epoch"] = self.last - self.epoch_start
        return times


__all__ = ["BUCKETS", "CALLBACKS", "DATA", "STEP", "VALIDATION", "LoopTimes"]
