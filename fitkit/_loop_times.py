"""Where a fit's time goes: the laps of the training loop, kept only while a callback asks for them.

A `LoopTimes` exists in a `FitRun` only when one of the fit's callbacks sets ``wants_loop_times = True``
(`fitkit.callbacks.ThroughputMonitor`); otherwise the loop's few ``if clock is not None`` checks are all it
costs. The loop calls `LoopTimes.lap` at the boundaries between phases, so the epoch's wall time is split into
four buckets that sum to it: waiting for the data (the loader's ``next`` and the device copy), the step
(``train_step``, the running sums, the end of the epoch's last group), the callbacks (batch and epoch hooks, the
checkpoint writes they ask for) and validation. Each lap is one ``perf_counter()`` call: no device sync.

A training batch takes three laps: `LoopTimes.step_begins` (the time since the last batch's callbacks ended,
that is the loader's ``next`` and the device copy, is the data's), `LoopTimes.step_done` (the step's) and one
after the batch's end hooks (the callbacks'). The loader is not wrapped: the time the loop spends between two
batches outside any hook (fetching the next one) falls to the data by the next `step_begins`.

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
        last: ``perf_counter()`` at the last lap.
        next_step_under: the context `run_next_step_under` asked for, until the next training step enters it.
        epoch_start: ``perf_counter()`` when this epoch's ``on_epoch_begin`` started.
    """

    def __init__(self, device: torch.device) -> None:
        self.seconds = [0.0, 0.0, 0.0, 0.0]
        self.samples = 0
        self.batches = 0
        self.last = self.epoch_start = perf_counter()
        use_events = device.type == "cuda" and torch.cuda.is_available()
        self.event: Any = torch.cuda.Event() if use_events else None  # recorded after every step
        self.next_step_under: Any = None
        self._entered: Any = None  # that context while its step runs

    def lap(self, bucket: int) -> None:
        """Charges the time since the last lap to ``bucket``."""
        now = perf_counter()
        self.seconds[bucket] += now - self.last
        self.last = now

    # The two laps of every training step: inlined (no call to lap), as the loop pays for them on every batch.
    def step_begins(self) -> None:
        """Before a training step: the time since the last lap (the loader's ``next``, the device copy) is the
        data's."""
        now = perf_counter()
        self.seconds[DATA] += now - self.last
        self.last = now
        if self.next_step_under is not None:
            self._entered, self.next_step_under = self.next_step_under, None
            self._entered.__enter__()

    def step_done(self, n: int) -> None:
        """After a training step of ``n`` samples: charges its time to the step, counts it, marks it on the
        device's stream (CUDA: an event, recorded without waiting)."""
        if self._entered is not None:
            self.close()
        now = perf_counter()
        self.seconds[STEP] += now - self.last
        self.last = now
        self.samples += n
        self.batches += 1
        if self.event is not None:
            self.event.record()

    def run_next_step_under(self, context: contextlib.AbstractContextManager[Any] | None) -> None:
        """Enters ``context`` when the next training step begins and exits it when the step is done (the
        monitor's FLOP counter over the fit's first step: no hook on every batch); None cancels a request."""
        self.next_step_under = context

    def close(self) -> None:
        """Exits the context of `run_next_step_under` if its step began and did not finish (it raised; the loop
        calls this when an epoch ends, however it ends)."""
        entered, self._entered = self._entered, None
        if entered is not None:
            entered.__exit__(None, None, None)

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
