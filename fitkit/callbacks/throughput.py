"""ThroughputMonitor: how fast training runs, how close to the hardware, and where an epoch's time goes.

Figures (added to the logs, so History, TensorBoard, CSVLogger and MLflowLogger record them):

* ``samples_per_sec``, ``batches_per_sec``, ``tokens_per_sec`` (with ``tokens_per_sample``): training samples
  per second of training time (the epoch's wall time less its validation; step-level: the wall time since the
  last point, step-level validations included), over the whole job under torchrun (every rank's samples summed);
* ``flops_per_sample``: counted once, with ``torch.utils.flop_counter.FlopCounterMode``, over the first training
  batch's real step (forward, backward and optimizer step of that batch: no extra step, nothing changed; with
  ``compile=True`` the compiled code runs under the counter, which sees its matmul and convolution calls:
  `fitkit._compat.step_flop_counter`, over the second step, as compiling may run inside the first (DDP's
  graph split compiles at the first call); activation checkpointing's recomputation is left out, as MFU asks);
  ``flops_per_sec``; ``mfu``, the model FLOP utilisation ``flops_per_sec / (peak x GPUs)``, where the peak is
  known: `peak_flops` looks the device and precision up in `PEAK_TFLOPS`, or ``peak_flops=`` overrides it;
* the epoch's time breakdown in seconds, ``time_data`` (waiting for the loader and the device copy),
  ``time_step`` (``train_step``), ``time_callbacks`` (the hooks, the checkpoint writes they ask for) and
  ``time_validation``: they sum to the epoch's wall time (see ``fitkit/_loop_times.py``);
* ``peak_memory_mb`` (CUDA: ``torch.cuda.max_memory_allocated``, reset at each epoch's start) and
  ``host_rss_mb`` (the process's resident memory now).

No host sync per batch: the loop's clock reads ``time.perf_counter()`` at each phase boundary (three reads a
batch); on CUDA it records an event after each step, and the monitor waits for the last one only at its
step-level points (every ``log_every_n_steps`` optimizer steps, under ``trainer.allow_sync()``) and at the
epoch's end. The monitor's own per-batch work is one comparison in ``on_batch_end`` (with ``tokens_per_sample``
a function, also that function's call): the clock counts the samples and batches, and runs the fit's first step
under the FLOP counter itself (`LoopTimes.run_next_step_under`), so the monitor has no ``on_batch_begin``.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

import torch

from fitkit import _arguments, _compat, distributed
from fitkit._loop_times import BUCKETS
from fitkit.callbacks.base import Callback, Logs

#: Dense peak TFLOP/s of current NVIDIA datacenter GPUs by compute dtype (NVIDIA's data sheets; SXM parts
#: unless named): ``"fp32"`` (CUDA cores), ``"tf32"``, ``"bf16"`` and ``"fp16"`` (tensor cores, no sparsity).
#: Matched against ``torch.cuda.get_device_name()`` in this order (the first key found in the name wins).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GB200": {"fp32": 80.0, "tf32": 1250.0, "bf16": 2500.0, "fp16": 2500.0},
    "B200": {"fp32": 80.0, "tf32": 1100.0, "bf16": 2250.0, "fp16": 2250.0},
    "GH200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "H20": {"fp32": 44.0, "tf32": 74.0, "bf16": 148.0, "fp16": 148.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0},
    "L40": {"fp32": 90.5, "tf32": 90.5, "bf16": 181.0, "fp16": 181.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0},
    "V100": {"fp32": 15.7, "tf32": 15.7, "bf16": 15.7, "fp16": 125.0},
}


def compute_dtype(precision: str) -> str:
    """The dtype a trainer's matrix products run in: ``"bf16"``, ``"fp16"``, or for ``"32"`` ``"tf32"`` when
    torch may use TF32 for float32 matmuls (``torch.get_float32_matmul_precision()`` is not ``"highest"``),
    else ``"fp32"``.

    Args:
        precision: the trainer's ``precision`` (``"32"``, ``"bf16"`` or ``"fp16"``).
    """
    if precision in ("bf16", "fp16"):
        return precision
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device: torch.device, precision: str) -> float | None:
    """One device's dense peak FLOP/s for ``precision`` from `PEAK_TFLOPS`; None off CUDA or for a GPU
    the table does not list.

    Args:
        device: the trainer's device.
        precision: the trainer's ``precision``.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[compute_dtype(precision)] * 1e12
    return None


def host_rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux: ``/proc/self/statm``; elsewhere its peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class ThroughputMonitor(Callback):
    """Samples, tokens and FLOPs per second, MFU, the epoch's time breakdown and peak memory, in the logs.

    Every ``log_every_n_steps`` optimizer steps the step-level figures since the last point are added to that
    batch's ``on_batch_end`` logs (as floats: a logger with the same ``log_every_n_steps`` placed after this
    callback records them) and kept in ``step_logs``; at each epoch's end the epoch's figures go into its logs
    (place the monitor before the loggers so they see them). See the module docstring for each key.

    Args:
        log_every_n_steps: optimizer steps between step-level points (None: epoch logs only).
        tokens_per_sample: tokens in one sample (an int), or a function of the batch (on the device) returning
            the batch's token count (an int or a 0-dim tensor, summed on the device); None: no ``tokens_per_sec``.
        peak_flops: one device's peak FLOP/s for ``mfu`` (e.g. ``989e12``); None: looked up in
            `PEAK_TFLOPS` on CUDA (no ``mfu`` on other devices or on a GPU the table lacks).
    """

    wants_loop_times = True
    stops_mid_epoch = False

    def __init__(
        self,
        log_every_n_steps: int | None = 50,
        tokens_per_sample: int | Callable[[Any], Any] | None = None,
        peak_flops: float | None = None,
    ) -> None:
        self.log_every_n_steps = _arguments.check_optional_int(
            log_every_n_steps,
            "log_every_n_steps",
            "optimizer steps between step-level points",
            none_means="epoch logs only",
        )
        if tokens_per_sample is not None and not callable(tokens_per_sample):
            _arguments.check_int(tokens_per_sample, "tokens_per_sample", 1, "tokens in one sample, or a function")
        self.tokens_per_sample = tokens_per_sample
        self._token_fn = tokens_per_sample if callable(tokens_per_sample) else None
        self.peak_flops = _arguments.positive_or_none(peak_flops, "peak_flops")
        self.flops_per_sample: float | None = None
        self.step_logs: dict[str, float] = {}  # the last step-level figures
        self.epoch_logs: dict[str, float] = {}  # the last epoch's figures
        self._counter: Any = None  # the FlopCounterMode the clock runs one step under
        self._count_from: int | None = None  # the clock's samples when that step was asked for (None: not yet)
        self._tokens: Any = 0  # tokens counted so far (with a function: on the device)
        self._next_point: float = math.inf  # the global step of the next step-level point
        self._next_check: float = 0  # on_batch_end does more than compare once global_step reaches this
        self._step_mark = (0.0, 0, 0, 0.0)  # (clock, samples, batches, tokens) at the last step-level point
        self._epoch_mark = (0, 0, 0.0)  # (samples, batches, tokens) at the epoch's start

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._tokens, self._epoch_mark = 0, (0, 0, 0.0)
        self._next_point = self._point_after(self.trainer.state.global_step)
        self._next_check = 0  # the first batch's end: the FLOP count, the points from a resumed step
        clock, self._counter, self._count_from = self.trainer.loop_times, None, None
        self._step_mark = (0.0 if clock is None else clock.last, 0, 0, 0.0)
        if clock is not None and self.flops_per_sample is None:
            from fitkit.memory import recomputing  # activation checkpointing's recomputation: not the model's

            self._counter = _compat.step_flop_counter(skip=recomputing)  # a dispatch mode over the real step
            if not self.trainer.compile:  # compiled: the first step compiles, the next is counted (_batch_checked)
                self._count_next_step()

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        trainer, clock = self.trainer, self.trainer.loop_times
        if clock is not None:
            self._epoch_mark = (clock.samples, clock.batches, self._token_count())
        if trainer.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(trainer.device)

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        # The per-batch path: one comparison, no device read (the clock counts samples and batches).
        if self.trainer.state.global_step >= self._next_check:
            self._batch_checked(logs)

    def _batch_checked(self, logs: Logs | None) -> None:
        """The batch's end when there is more to do: the FLOP count (the first batch's; compiled, the second's),
        the tokens of a function of the batch (on every batch), the step-level figures when a point is due."""
        if self._counter is not None:
            if self._count_from is None:  # compile=True: the first step compiled the model; count the next
                self._count_next_step()
            else:
                self._finish_count()
        if self._token_fn is not None:
            self._tokens = self._tokens + self._token_fn(self.trainer.batch)  # on the device: read at points
        step = self.trainer.state.global_step
        if step >= self._next_point:  # one or more multiples of log_every_n_steps reached by this batch
            self._next_point = self._point_after(step)
            self.step_logs = self._step_figures()
            if logs is not None:
                logs.update(self.step_logs)
        self._next_check = 0 if self._token_fn is not None or self._counter is not None else self._next_point

    def _point_after(self, step: int) -> float:
        """The first global step after ``step`` that is a multiple of ``log_every_n_steps`` (inf: none)."""
        every = self.log_every_n_steps
        return math.inf if every is None else (step // every + 1) * every

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        clock = self.trainer.loop_times
        if clock is None:
            return
        with self.trainer.allow_sync():
            clock.wait_for_device()
        times = clock.epoch_seconds()
        samples, batches, tokens = self._epoch_mark
        train_seconds = times["time_epoch"] - times["time_validation"]
        figures = self._rates(
            train_seconds, clock.samples - samples, clock.batches - batches, self._token_count() - tokens
        )
        figures.update({key: times[key] for key in BUCKETS})
        figures.update(self._memory())
        self.epoch_logs = figures
        if logs is not None:
            logs.update(figures)

    def on_exception(self, exception: BaseException) -> None:
        self._close_counter()

    def on_train_end(self, logs: Logs | None = None) -> None:
        self._close_counter()

    # -- figures --------------------------------------------------------------------------------
    def _count_next_step(self) -> None:
        clock = self.trainer.loop_times
        if clock is not None:
            self._count_from = clock.samples
            clock.run_next_step_under(self._counter)

    def _finish_count(self) -> None:
        counter, self._counter = self._counter, None
        clock = self.trainer.loop_times
        samples = 0 if clock is None else clock.samples - (self._count_from or 0)
        if samples > 0:  # the counted step's: all the clock has counted since it was asked for
            self.flops_per_sample = counter.get_total_flops() / samples

    def _close_counter(self) -> None:
        """Drops the count asked for in ``on_train_begin`` (a resume brought the figure, or the fit ended): the
        clock enters no counter after this; one its step entered is exited by the loop, however the step ends."""
        if self._counter is not None:
            self._counter = None
            clock = self.trainer.loop_times
            if clock is not None:
                clock.run_next_step_under(None)

    def _token_count(self) -> float:
        """Tokens so far (with a function of the batch, read back from the device: a deliberate sync)."""
        if isinstance(self.tokens_per_sample, int):
            clock = self.trainer.loop_times
            return float(0 if clock is None else clock.samples * self.tokens_per_sample)
        with self.trainer.allow_sync():
            return float(self._tokens)

    def _step_figures(self) -> dict[str, float]:
        """The figures since the last step-level point (a deliberate sync: the last step's event)."""
        clock = self.trainer.loop_times
        if clock is None:
            return {}
        with self.trainer.allow_sync():
            clock.wait_for_device()
        then, samples, batches, tokens = self._step_mark
        now, token_count = clock.last, self._token_count()
        self._step_mark = (now, clock.samples, clock.batches, token_count)
        return self._rates(now - then, clock.samples - samples, clock.batches - batches, token_count - tokens)

    def _rates(self, seconds: float, samples: float, batches: float, tokens: float) -> dict[str, float]:
        """Per-second figures over the whole job (this rank's counts summed over the ranks)."""
        trainer = self.trainer
        counts = {"seconds": seconds, "samples": float(samples), "batches": float(batches), "tokens": tokens}
        world = trainer.world_size
        if world > 1:  # a host-side all-reduce, at points every rank reaches at the same step
            counts = {k: v * world for k, v in distributed.mean_over_ranks(counts, trainer.dist).items()}
            counts["seconds"] /= world
        seconds = max(counts["seconds"], 1e-12)
        figures = {"samples_per_sec": counts["samples"] / seconds, "batches_per_sec": counts["batches"] / seconds}
        if self.tokens_per_sample is not None:
            figures["tokens_per_sec"] = counts["tokens"] / seconds
        if self.flops_per_sample is not None:
            figures["flops_per_sample"] = self.flops_per_sample
            figures["flops_per_sec"] = self.flops_per_sample * figures["samples_per_sec"]
            peak = self.peak_flops if self.peak_flops is not None else peak_flops(trainer.device, trainer.precision)
            if peak is not None:
                figures["mfu"] = figures["flops_per_sec"] / (peak * world)
        return figures

    def _memory(self) -> dict[str, float]:
        device = self.trainer.device
        figures = {"host_rss_mb": host_rss_mb()}
        if device.type == "cuda" and torch.cuda.is_available():
            figures["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return figures

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"flops_per_sample": self.flops_per_sample}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flops_per_sample = state.get("flops_per_sample")
        if self.flops_per_sample is not None:  # a resume, after on_train_begin asked for a count: not needed
            self._close_counter()


__all__ = ["PEAK_TFLOPS", "ThroughputMonitor", "compute_dtype", "host_rss_mb", "peak_flops"]
