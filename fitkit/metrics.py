"""Metrics that accumulate on the device and sync to the host once per epoch.

A metric keeps its running state as tensors (``sum`` and ``count``) so that ``update`` never reads a value
back to the host, and so that a distributed run can all-reduce the state before ``compute``.
Each metric says which way is better through ``higher_is_better``; monitoring callbacks read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fitkit._arguments import check_int
from fitkit._devices import sum_dtype
from fitkit._structure import describe


class Metric:
    """Base class: a sample-weighted mean of a per-sample quantity.

    Subclasses implement ``batch_sum(outputs, targets) -> (sum, count)`` returning a 0-dim tensor on the
    device and an int sample count. ``compute()`` returns ``sum / count`` as a 0-dim tensor.

    Attributes:
        name: the key in the logs (``"accuracy"`` gives ``accuracy`` and ``val_accuracy``).
        higher_is_better: True when larger values are better; None when the metric cannot tell.
        output: which of the model's outputs the metric reads when the model returns a tuple, list or
            dict (an index or a key, e.g. ``Accuracy(output="logits")``); None: the outputs as they are.
    """

    name: str = "metric"
    higher_is_better: bool | None = None

    def __init__(self, name: str | None = None, output: int | str | None = None) -> None:
        if name is not None:
            self.name = name
        self.output = output
        self._sum: torch.Tensor | None = None
        self._count = 0  # samples of unweighted batches
        self._weight: torch.Tensor | None = None  # the summed sample weights of weighted batches

    def select(self, outputs: Any) -> Any:
        """The part of the model's ``outputs`` this metric reads (see ``output``).

        Args:
            outputs: the model's outputs for a batch: a tensor, or a tuple, list or dict of them.
        """
        if self.output is None:
            return outputs
        try:
            return outputs[self.output]
        except (KeyError, IndexError, TypeError):
            if isinstance(self.output, str) and hasattr(outputs, self.output):
                return getattr(outputs, self.output)
            raise ValueError(
                f"metric {self.name!r}: output={self.output!r} does not pick anything from the model's outputs "
                f"({describe(outputs, 'size')}); use an index for a tuple or a key for a dict"
            ) from None

    def batch_sum(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, int]:
        """The batch's total and sample count; what a subclass implements.

        Args:
            outputs: the model's outputs for the batch, after [select][fitkit.metrics.Metric.select].
            targets: the batch's targets, on the same device.

        Returns:
            A 0-dim tensor on the device (no host read) and the number of samples it sums over (an int).
        """
        raise NotImplementedError

    def per_sample(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The quantity for each sample, ``(N,)``: what a weighted metric (``Trainer(weighted_metrics=...)``)
        weights. Metrics that can only give a batch total do not implement it.

        Args:
            outputs: the model's outputs for the batch, after [select][fitkit.metrics.Metric.select].
            targets: the batch's targets, on the same device.
        """
        raise TypeError(
            f"metric {self.name!r} ({type(self).__name__}) gives only a batch total, not per-sample values, so it "
            "cannot be a weighted metric; pass it in metrics= instead, or implement per_sample()"
        )

    @torch.no_grad()
    def update(self, outputs: Any, targets: Any, sample_weight: torch.Tensor | None = None) -> None:
        """Adds a batch; with ``sample_weight`` the sum of ``weight * per_sample`` and the weights' sum
        (Keras's weighted metrics: a weighted mean), else the batch sum and the sample count.

        Nothing is read back to the host: the sums stay on the device until [compute][fitkit.metrics.Metric.compute].

        Args:
            outputs: the model's outputs for the batch (the whole of them: ``output`` selects the part).
            targets: the batch's targets.
            sample_weight: one weight per sample, ``(N,)``, or None for an unweighted batch.
        """
        outputs = self.select(outputs)
        if sample_weight is None:
            value, count = self.batch_sum(outputs, targets)
            self._count += count
        else:
            values = self.per_sample(outputs, targets).detach()
            dtype = sum_dtype(values.device)
            weight = sample_weight.detach().reshape(-1).to(device=values.device, dtype=dtype)
            value = (values.reshape(-1).to(dtype) * weight).sum()
            total = weight.sum()
            self._weight = total if self._weight is None else self._weight + total
        value = value.detach().to(sum_dtype(value.device))
        self._sum = value if self._sum is None else self._sum + value

    def _denominator(self) -> Any:
        return self._count if self._weight is None else self._weight + self._count

    def compute(self) -> torch.Tensor:
        """The mean so far, ``sum / count`` (weighted batches: ``/ sum of weights``), as a 0-dim tensor on the
        device; NaN before any batch."""
        if self._sum is None or (self._count == 0 and self._weight is None):
            return torch.tensor(float("nan"))
        return self._sum / self._denominator()

    def reset(self) -> None:
        """Forgets every batch (the trainer calls it before each epoch and each validation pass)."""
        self._sum, self._count, self._weight = None, 0, None

    # The state travels as tensors so a distributed run can all-reduce it (see fitkit.distributed).
    def sync_state(self) -> list[torch.Tensor]:
        """The running sum and its denominator as tensors, for a distributed run to all-reduce (summed over
        the ranks, then passed to [load_sync_state][fitkit.metrics.Metric.load_sync_state])."""
        denominator = self._denominator()
        return [
            self._sum if self._sum is not None else torch.zeros((), dtype=torch.float64),
            denominator
            if isinstance(denominator, torch.Tensor)
            else torch.tensor(float(denominator), dtype=torch.float64),
        ]

    def load_sync_state(self, values: list[torch.Tensor]) -> None:
        """Takes the reduced sums back.

        Args:
            values: what [sync_state][fitkit.metrics.Metric.sync_state] returned, summed over the ranks.
        """
        # The denominator comes back as a float (a sum of weights need not be whole): kept as the weight.
        self._sum, self._count, self._weight = values[0], 0, values[1]

    def state_dict(self) -> dict[str, Any]:
        """The running sums on the CPU (``sum``, ``count``, ``weight``), saved in checkpoints for a
        mid-epoch resume."""
        return {
            "sum": None if self._sum is None else self._sum.detach().cpu(),
            "count": self._count,
            "weight": None if self._weight is None else self._weight.detach().cpu(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        """Restores what [state_dict][fitkit.metrics.Metric.state_dict] returned.

        Args:
            state: a dict that ``state_dict`` returned.
            device: where the sums go (the trainer's device); None leaves them on the CPU.
        """
        total, weight = state["sum"], state.get("weight")
        self._sum = None if total is None else total.to(device) if device is not None else total
        self._weight = None if weight is None else weight.to(device) if device is not None else weight
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
    def update(self, value: torch.Tensor, weight: int | None = None) -> None:  # type: ignore[override]  # a value, not outputs
        """Adds a value: a 0-dim mean counted ``weight`` times, or one value per sample.

        Args:
            value: a 0-dim tensor (e.g. a batch's mean loss), or a ``(N,)`` tensor of per-sample values.
            weight: for a 0-dim ``value``, the number of samples it stands for (default 1); ignored for
                per-sample values, which count one each.
        """
        value = value.detach()
        if value.ndim == 0:
            n = 1 if weight is None else weight
            total = value.to(sum_dtype(value.device)) * n
        else:
            n = value.shape[0]
            total = value.to(sum_dtype(value.device)).sum()
        self._sum = total if self._sum is None else self._sum + total
        self._count += n


class Accuracy(Metric):
    """Fraction of samples whose target is among the ``top_k`` highest outputs.

    Outputs of shape ``(N, C)`` with integer targets ``(N,)`` or ``(N, 1)`` (or one-hot/probability
    targets ``(N, C)``);
    outputs of shape ``(N,)`` or ``(N, 1)`` are binary, compared with ``threshold``.

    Args:
        top_k: a sample counts as right when its target is among its ``top_k`` highest outputs (an int >= 1,
            default 1); for ``top_k > 1`` the default name is ``"top<k>_accuracy"``.
        threshold: for binary outputs, the value above which a sample is predicted positive. None (the
            default): the Trainer decides from its loss, as Keras's ``compile`` does: 0.5 for probabilities
            (``BCELoss``, or a model ending in ``Sigmoid``), else 0.0 (logits); it refuses a regression loss.
        name: the key in the logs (default ``"accuracy"``).
        output: which of the model's outputs to read when it returns a tuple, list or dict (an index or a
            key); None: the outputs as they are.
    """

    higher_is_better = True

    def __init__(
        self, top_k: int = 1, threshold: float | None = None, name: str | None = None, output: int | str | None = None
    ) -> None:
        check_int(top_k, "top_k", 1)
        super().__init__(name or ("accuracy" if top_k == 1 else f"top{top_k}_accuracy"), output=output)
        self.top_k = top_k
        self.threshold = threshold

    def batch_sum(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, int]:
        """The number of right samples (a 0-dim tensor on the device) and the batch's size.

        Args:
            outputs: logits or probabilities, ``(N, C)``, or binary ``(N,)``/``(N, 1)``.
            targets: class indices ``(N,)``/``(N, 1)``, or one-hot/probabilities ``(N, C)``.
        """
        correct = self.per_sample(outputs, targets)
        return correct.sum(), correct.shape[0]

    def per_sample(self, outputs: Any, targets: Any) -> torch.Tensor:
        """1 where a sample is right, else 0 (``bool``), ``(N,)``.

        Args:
            outputs: logits or probabilities, ``(N, C)``, or binary ``(N,)``/``(N, 1)``.
            targets: class indices ``(N,)``/``(N, 1)``, or one-hot/probabilities ``(N, C)``.
        """
        if isinstance(outputs, (tuple, list, dict)) or hasattr(outputs, "keys"):
            raise TypeError(
                f"{self.name}: the model returns {describe(outputs, 'size')}, not one tensor; pick the output this "
                f"metric reads with output=, e.g. Accuracy(output=0) or Accuracy(output='logits')"
            )
        if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError(
                f"{self.name}: expected tensor outputs and targets, got {type(outputs).__name__} "
                f"and {type(targets).__name__}"
            )
        if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
            predicted = outputs.reshape(-1) > (0.0 if self.threshold is None else self.threshold)
            return predicted == (targets.reshape(-1) > 0.5)
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
        return correct


class _TorchmetricsAdapter(Metric):
    """Wraps a ``torchmetrics.Metric`` (duck-typed: torchmetrics is not a dependency)."""

    def __init__(self, metric: Any, name: str | None = None) -> None:
        super().__init__(name or _snake(type(metric).__name__))
        self.metric = metric
        self.higher_is_better = getattr(metric, "higher_is_better", None)

    @torch.no_grad()
    def update(self, outputs: Any, targets: Any, sample_weight: torch.Tensor | None = None) -> None:
        if sample_weight is not None:
            raise TypeError(
                f"metric {self.name!r} is a torchmetrics metric, which fitkit cannot weight; pass it in metrics="
            )
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

    def __init__(
        self, fn: Callable[[Any, Any], torch.Tensor], name: str | None = None, output: int | str | None = None
    ) -> None:
        super().__init__(name or getattr(fn, "__name__", "metric"), output=output)
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
    """Turns a metric specification into a [Metric][fitkit.metrics.Metric].

    Accepts a [Metric][fitkit.metrics.Metric], a shortcut string (``"accuracy"``, ``"acc"``, ``"top5_accuracy"``), a
    ``torchmetrics.Metric`` object, or a function ``(outputs, targets) -> 0-dim tensor``.

    Args:
        metric: the specification, one of the above.

    Raises:
        ValueError: an unknown shortcut string (the message lists the known ones).
        TypeError: anything that is none of these (a number, a dict).
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
