"""Profiler: ``torch.profiler`` over a few scheduled training batches, traces for TensorBoard and Perfetto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fitkit import _arguments
from fitkit.callbacks.base import Callback, Logs


class Profiler(Callback):
    """Profiles a window of training batches with ``torch.profiler`` and writes its traces to ``dirpath``.

    The window follows ``torch.profiler.schedule``: the first ``wait`` batches of the fit are skipped,
    ``warmup`` are traced and thrown away (the profiler's own start-up), ``active`` are recorded, and that cycle
    runs ``repeat`` times; each cycle's trace is one ``<worker>.<time>.pt.trace.json`` file
    (``torch.profiler.tensorboard_trace_handler``), which TensorBoard's profiler plugin reads
    (``tensorboard --logdir <dirpath>``, with ``torch-tb-profiler`` installed) and https://ui.perfetto.dev opens.
    The worker is named ``rank<N>``.

    Outside the window nothing is recorded: during ``wait`` the profiler is idle, and once the last cycle is
    written it is stopped and dropped (the batch hook then returns at once). CPU activity is always recorded,
    CUDA kernels on a GPU.

    Args:
        dirpath: the folder the traces are written to (created when needed).
        wait: batches at the start of each cycle that are not profiled.
        warmup: batches profiled and thrown away before the recorded ones.
        active: batches recorded in each cycle.
        repeat: cycles (>= 1).
        record_shapes: record the input shapes of each operator.
        profile_memory: record tensor allocations and frees (the memory view).
        with_stack: record the Python call stack of each operator (larger traces, slower).
        all_ranks: under torchrun, profile on every rank (one trace per rank); False: rank 0 only.
    """

    stops_mid_epoch = False

    def __init__(
        self,
        dirpath: str | Path,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        repeat: int = 1,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
        all_ranks: bool = False,
    ) -> None:
        _arguments.check_path(dirpath, "Profiler")
        self.dirpath = Path(dirpath)
        self.wait = _arguments.check_int(wait, "wait", 0, "batches skipped before each cycle")
        self.warmup = _arguments.check_int(warmup, "warmup", 0, "batches profiled and discarded")
        self.active = _arguments.check_int(active, "active", 1, "batches recorded in each cycle")
        self.repeat = _arguments.check_int(repeat, "repeat", 1, "cycles")
        _arguments.check_flags(
            record_shapes=record_shapes, profile_memory=profile_memory, with_stack=with_stack, all_ranks=all_ranks
        )
        self.options = {"record_shapes": record_shapes, "profile_memory": profile_memory, "with_stack": with_stack}
        self.rank_zero_only = not all_ranks  # read by the trainer when it picks this rank's callbacks
        self.traces: list[Path] = []  # the trace files written by the last fit
        self._profiler: Any = None
        self._steps_left = 0
        self._before: set[Path] = set()  # trace files already in dirpath when the fit started

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.traces = []
        self.dirpath.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.trainer.device.type == "cuda" and torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat)
        handler = torch.profiler.tensorboard_trace_handler(
            str(self.dirpath), worker_name=f"rank{self.trainer.dist.rank}"
        )
        options = self.options
        self._profiler = torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=handler,
            record_shapes=options["record_shapes"],
            profile_memory=options["profile_memory"],
            with_stack=options["with_stack"],
        )
        self._steps_left = (self.wait + self.warmup + self.active) * self.repeat
        self._before = set(self.dirpath.glob("*.pt.trace.json"))
        self._profiler.start()

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self._profiler is None:
            return
        self._profiler.step()
        self._steps_left -= 1
        if self._steps_left == 0:  # the last cycle is written: no profiler from here on
            self._stop()

    def on_train_end(self, logs: Logs | None = None) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        with self.trainer.allow_sync():  # the trace is collected (and on CUDA synchronised) once, on purpose
            profiler.stop()
        self.traces = sorted(set(self.dirpath.glob("*.pt.trace.json")) - self._before)


__all__ = ["Profiler"]
