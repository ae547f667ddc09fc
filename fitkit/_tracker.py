"""The epoch tracker: sample-weighted sums of the step logs and the metrics, kept on the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fitkit._devices import sum_dtype, to_host_float64
from fitkit.metrics import Metric


class EpochTracker:
    """Sample-weighted sums of step logs and the metrics, kept on the device until `compute`.

    ``add`` appends each step's tensors to a list rather than adding them to the float64 sums one by
    one: that mixed-precision ``add_`` per step was the largest single cost the loop added to a small
    model's step (~8 us on a CPU; ``benchmarks/README.md``). A run of steps with one batch size goes
    into the sums in one stacked float64 reduction per key, every ``FOLD`` steps, when the batch size
    changes, and before the sums are read; so a logged tensor must not be modified in place after the
    step returned it.

    Its `state_dict` is part of a mid-epoch checkpoint: the sums so far, the sample count and the
    metrics' states.
    """

    FOLD = 256

    def __init__(self, metrics: Sequence[Metric]) -> None:
        self.metrics = list(metrics)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self._pending: dict[str, list[torch.Tensor]] = {}  # step values not yet in the sums
        self._pending_n = 0  # the batch size of every pending step
        self._pending_steps = 0
        self.summed: frozenset[str] = frozenset()  # keys that are batch sums: added as they are, not times n
        # The folded steps' losses, kept (on the device) so that a non-finite epoch can name its first
        # bad batch without a per-batch check: see first_non_finite.
        self._losses: list[torch.Tensor] = []

    def reset(self) -> None:
        self.sums, self.count = {}, 0
        self._pending, self._pending_n, self._pending_steps = {}, 0, 0
        self._losses = []
        for metric in self.metrics:
            metric.reset()

    def add(self, step_logs: dict[str, Any], n: int) -> None:
        """Adds one step's 0-dim tensors, each weighted by the batch's ``n`` samples (no host sync)."""
        if n != self._pending_n or self._pending_steps == self.FOLD:
            self._fold()
            self._pending_n = n
        pending = self._pending
        for key, value in step_logs.items():
            if isinstance(value, torch.Tensor):
                values = pending.get(key)
                if values is None:
                    pending[key] = values = []
                values.append(value.detach() if value.requires_grad else value)
        self._pending_steps += 1
        self.count += n

    def _fold(self) -> None:
        """Adds the pending steps to the sums (see `fitkit._devices.sum_dtype`)."""
        if not self._pending_steps:
            return
        for key, values in self._pending.items():
            total = self.sums.get(key)
            if total is None:
                device = values[0].device
                self.sums[key] = total = torch.zeros((), dtype=sum_dtype(device), device=device)
            alpha = 1 if key in self.summed else self._pending_n  # a batch sum is already n samples' worth
            if len(values) == 1:
                total.add_(values[0], alpha=alpha)
                stacked = values[0].reshape(1)
            else:
                stacked = torch.stack(values)
                total.add_(stacked.sum(dtype=total.dtype), alpha=alpha)
            if key == "loss" and len(values) == self._pending_steps:
                self._losses.append(stacked)
        self._pending, self._pending_steps = {}, 0

    def first_non_finite(self) -> tuple[int, int] | None:
        """``(index, steps)``: the index of the first step whose ``"loss"`` was non-finite among the ``steps``
        steps added since the last reset or load, or None. One host read: call it only when the epoch's
        loss is non-finite."""
        self._fold()
        if not self._losses:
            return None
        losses = torch.cat([v.float().reshape(-1) for v in self._losses])
        bad = (~torch.isfinite(losses)).nonzero()
        return (int(bad[0, 0]), losses.numel()) if bad.numel() else None

    def compute(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The means so far: one host sync for everything (and one all-reduce, in a distributed run).

        ``reduce`` sums the flat tensor over the ranks. Every rank must pass the same layout, also a rank
        that saw no batch (validation data smaller than the world size): when ``reduce`` has a
        ``common_keys`` method, the ranks first agree on the union of their keys, and a key this rank
        never logged counts as a zero sum.
        """
        self._fold()
        keys = list(self.sums)
        common_keys = getattr(reduce, "common_keys", None)
        if common_keys is not None:
            keys = common_keys(keys)
        zero = torch.zeros(1, dtype=torch.float64)
        parts = [to_host_float64(self.sums[k]).reshape(1) if k in self.sums else zero for k in keys]
        sync_metrics = [m for m in self.metrics if m.sync_state()]
        for metric in sync_metrics:
            parts.extend(to_host_float64(s).reshape(1) for s in metric.sync_state())
        values = torch.cat([*parts, torch.tensor([float(self.count)], dtype=torch.float64)])
        if reduce is not None:
            values = reduce(values)
        flat = values.tolist()  # the host sync
        count = flat[-1]
        logs = {k: (flat[i] / count if count else float("nan")) for i, k in enumerate(keys)}
        offset = len(keys)
        for metric in sync_metrics:
            n_state = len(metric.sync_state())
            metric.load_sync_state([torch.tensor(v, dtype=torch.float64) for v in flat[offset : offset + n_state]])
            offset += n_state
        for metric in self.metrics:
            logs[metric.name] = float(metric.compute())
        return logs

    def state_dict(self) -> dict[str, Any]:
        """``sums`` (CPU tensors by key), ``count`` (samples so far) and ``metrics`` (their states, in order)."""
        self._fold()
        return {
            "sums": {k: v.detach().cpu() for k, v in self.sums.items()},
            "count": self.count,
            "metrics": [m.state_dict() for m in self.metrics],
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = int(state["count"])
        self._pending, self._pending_n, self._pending_steps = {}, 0, 0
        self._losses = []
        for metric, metric_state in zip(self.metrics, state["metrics"]):
            metric.load_state_dict(metric_state, device)


__all__ = ["EpochTracker"]
