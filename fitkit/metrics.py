"""Metrics that accumulate on the device and sync to the host once per epoch.

A metric keeps its running state as tensors (``sum`` and ``count``) so that ``update`` never reads a value
back to the host, and so that a distributed run can all-reduce the state before ``compute``.
Each metric says which way is better through ``higher_is_better``; monitoring callbacks read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class Metric:
    """Base class: a sample-weighted mean of a per-sample quantity.

    Subclasses implement ``batch_sum(outputs, targets) -> (sum, count)`` returning a 0-dim tensor on the
    device and an int sample count. ``compute()`` returns ``sum / count`` as a 0-dim tensor.

    Attributes:
        name: the key in the logs (``"accuracy"`` gives ``accuracy`` and ``val_accuracy``).
        higher_is_better: True when larger values are better; None when the metric cannot tell.
    """

    name: str = "metric"
    higher_is_better: bool | None = None

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        self._sum: torch.Tensor | None = None
        self._count = 0

    def batch_sum(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, outputs: Any, targets: Any) -> None:
        value, count = self.batch_sum(outputs, targets)
        value = value.detach().to(torch.float64 if value.device.type != "mps" else torch.float32)
        self._sum = value if self._sum is None else self._sum + value
        self._count += count

    def compute(self) -> torch.Tensor:
        if self._sum is None or self._count == 0:
            return torch.tensor(float("nan"))
        return self._sum / self._count

    def reset(self) -> None:
        self._sum, self._count = None, 0

    # The state travels as tensors so a distributed run can all-reduce it (see fitkit.distributed).
    def sync_state(self) -> list[torch.Tensor]:
        return [
            self._sum if self._sum is not None else torch.zeros((), dtype=torch.float64),
            torch.tensor(float(self._count), dtype=torch.float64),
        ]

    def load_sync_state(self, values: list[torch.Tensor]) -> None:
        self._sum, self._count = values[0], int(round(float(values[1])))

    def state_dict(self) -> dict[str, Any]:
        return {"sum": None if self._sum is None else self._sum.detach().cpu(), "count": self._count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        total = state["sum"]
        self._sum = None if total is None else total.to(device) if device is not None else total
        self._count = int(state["count"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Mean(Metric):
    """Sample-weighted mean of a value: ``update(value, weight)`` with a 0-dim or per-sample tensor.

    Used for the loss: ``update(batch_loss, batch_size)`` adds ``batch_loss * batch_size``.
    """

    name = "mean"
    higher_is_better = None

    @torch.no_grad()
    def update(self, value: torch.Tensor, weight: int | None = None) -> None:
        value = value.detach()
        if value.ndim == 0:
            n = 1 if weight is None else weight
            total = value.to(torch.float64 if value.device.type != "mps" else torch.float32) * n
        else:
            n = value.shape[0]
            total = value.to(torch.float64 if value.device.type != "mps" else torch.float32).sum()
        self._sum = total if self._sum is None else self._sum + total
        self._count += n


class Accuracy(Metric):
    """Fraction of samples whose target is among the ``top_k`` highest outputs.

    Outputs of shape ``(N, C)`` with integer targets ``(N,)`` or ``(N, 1)`` (or one-hot/probability
    targets ``(N, C)``);
    outputs of shape ``(N,)`` or ``(N, 1)`` are binary logits compared with ``threshold`` (0 for logits).
    """

    higher_is_better = True

    def __init__(self, top_k: int = 1, threshold: float = 0.0, name: str | None = None) -> None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        super().__init__(name or ("accuracy" if top_k == 1 else f"top{top_k}_accuracy"))
        self.top_k = top_k
        self.threshold = threshold

    def batch_sum(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, int]:
        if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError(
                f"{self.name}: expected tensor outputs and targets, got {type(outputs).__name__} "
                f"and {type(targets).__name__}"
            )
        n = targets.shape[0]
        if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
            predicted = outputs.reshape(-1) > self.threshold
            correct = predicted == (targets.reshape(-1) > 0.5)
            return correct.sum(), n
        if targets.ndim == outputs.ndim and targets.shape[-1] == 1:  # (N, 1) class indices, as Keras allows
            targets = targets.squeeze(-1)
        elif targets.ndim == outputs.ndim:  # one-hot or probabilities
            targets = targets.argmax(dim=-1)
        if outputs.ndim != 2 or targets.ndim != 1:
            raise ValueError(
                f"{self.name}: expected outputs (N, C) and targets (N,), got "
                f"{tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        if self.top_k > outputs.shape[1]:
            raise ValueError(f"{self.name}: top_k={self.top_k} but the outputs have only {outputs.shape[1]} classes")
        if self.top_k == 1:
            correct = outputs.argmax(dim=1) == targets
        else:
            correct = (outputs.topk(self.top_k, dim=1).indices == targets.unsqueeze(1)).any(dim=1)
        return correct.sum(), n


class _TorchmetricsAdapter(Metric):
    """Wraps a ``torchmetrics.Metric`` (duck-typed: torchmetrics is not a dependency)."""

    def __init__(self, metric: Any, name: str | None = None) -> None:
        super().__init__(name or _snake(type(metric).__name__))
        self.metric = metric
        self.higher_is_better = getattr(metric, "higher_is_better", None)

    @torch.no_grad()
    def update(self, outputs: Any, targets: Any) -> None:
        if hasattr(self.metric, "to"):
            device = outputs.device if isinstance(outputs, torch.Tensor) else None
            if device is not None and getattr(self.metric, "device", device) != device:
                self.metric.to(device)
        self.metric.update(outputs, targets)

    def compute(self) -> torch.Tensor:
        return torch.as_tensor(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()

    def sync_state(self) -> list[torch.Tensor]:
        return []  # torchmetrics syncs its own state across processes in compute()

    def load_sync_state(self, values: list[torch.Tensor]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        pass


class _FunctionMetric(Metric):
    """A plain function ``fn(outputs, targets) -> 0-dim tensor``, averaged over samples."""

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor], name: str | None = None) -> None:
        super().__init__(name or getattr(fn, "__name__", "metric"))
        self.fn = fn

    def batch_sum(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, int]:
        value = self.fn(outputs, targets)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise TypeError(
                f"metric function {self.name!r} must return a 0-dim tensor (the batch mean), got "
                f"{type(value).__name__}{'' if not isinstance(value, torch.Tensor) else tuple(value.shape)}"
            )
        n = targets.shape[0] if isinstance(targets, torch.Tensor) and targets.ndim else 1
        return value * n, n


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


_SHORTCUTS: dict[str, Callable[[], Metric]] = {
    "accuracy": Accuracy,
    "acc": Accuracy,
    "top5_accuracy": lambda: Accuracy(top_k=5),
}


def get_metric(metric: Any) -> Metric:
    """Turns a metric specification into a :class:`Metric`.

    Accepts a :class:`Metric`, a shortcut string (``"accuracy"``, ``"acc"``, ``"top5_accuracy"``), a
    ``torchmetrics.Metric`` object, or a function ``(outputs, targets) -> 0-dim tensor``.
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in _SHORTCUTS:
            raise ValueError(
                f"unknown metric {metric!r}; known shortcuts: {sorted(_SHORTCUTS)}. Pass a "
                "fitkit.metrics.Metric, a torchmetrics.Metric or a function (outputs, targets) -> tensor."
            )
        return _SHORTCUTS[metric]()
    if hasattr(metric, "update") and hasattr(metric, "compute") and hasattr(metric, "reset"):
        return _TorchmetricsAdapter(metric)
    if callable(metric):
        return _FunctionMetric(metric)
    raise TypeError(
        f"cannot use {metric!r} as a metric: expected a string, a fitkit.metrics.Metric, a "
        "torchmetrics.Metric or a function (outputs, targets) -> tensor"
    )


__all__ = ["Metric", "Mean", "Accuracy", "get_metric"]
