"""History: the per-epoch logs of a ``fit`` call, as Keras returns them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fitkit.callbacks.base import Callback, Logs


class History(Callback):
    """Records every epoch's logs. ``fit`` attaches one and returns it.

    Attributes:
        history: ``{key: [value per epoch]}``; a key that is missing on some epochs (``val_*`` with
            ``validation_freq > 1``) has fewer values, as in Keras.
        epoch: the 0-based epochs recorded, in order.
        validations: every validation of the fit, in order, as a dict of its ``val_...`` logs plus
            ``"step"`` (the global step it ran after) and ``"epoch"``: the step-level ones
            (``validate_every_n_steps``) and the epoch-level ones alike.
        epochs_of: ``{key: [epoch of each value]}``, for keys logged on some epochs only.
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        self.validations: list[dict[str, float]] = []
        self.epochs_of: dict[str, list[int]] = {}

    def on_validation_end(self, logs: Logs | None = None) -> None:
        self.validations.append(dict(logs or {}))

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)
            self.epochs_of.setdefault(key, []).append(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "epoch": list(self.epoch),
            "validations": [dict(v) for v in self.validations],
            "epochs_of": {k: list(v) for k, v in self.epochs_of.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.epoch = list(state["epoch"])
        self.validations = [dict(v) for v in state.get("validations", [])]
        # Checkpoints written before epochs_of: a key with every epoch's value has the recorded epochs.
        self.epochs_of = {k: list(v) for k, v in state.get("epochs_of", {}).items()}
        for key, values in self.history.items():
            if key not in self.epochs_of and len(values) == len(self.epoch):
                self.epochs_of[key] = list(self.epoch)

    def plot(self, keys: Sequence[str] | None = None, path: str | Path | None = None) -> Any:
        """Draws each metric and its ``val_`` twin against the (1-based) epoch, one axis per metric, and
        returns the ``matplotlib.figure.Figure``; with ``path``, also saves it as a PNG.

        Args:
            keys: the metrics to draw, without the ``val_`` prefix (``["loss", "accuracy"]``); None: every
                key of the history (``lr`` included, on a log scale).
            path: a PNG file to write (its folder is created if needed).

        Needs ``pip install "fitkit[plot]"`` (matplotlib).
        """
        base = [k[4:] if k.startswith("val_") else k for k in self.history]
        available = list(dict.fromkeys(base))
        if keys is None:
            keys = available
        elif isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"keys must be a list of metric names such as ['loss', 'accuracy'], got {keys!r}")
        missing = [k for k in keys if k not in available]
        if missing:
            raise KeyError(f"History.plot: no such key(s) {missing} in the history; available: {available}")
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                'History.plot draws with matplotlib, which is not installed: pip install "fitkit[plot]"'
            ) from exc
        columns = min(3, max(1, len(keys)))
        rows = max(1, math.ceil(len(keys) / columns))
        figure = Figure(figsize=(4.5 * columns, 3.2 * rows))
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax, key in zip(axes, keys):
            for name, label in ((key, "train" if key != "lr" else key), (f"val_{key}", "validation")):
                if name in self.history:
                    epochs = self.epochs_of.get(name) or self.epoch[: len(self.history[name])]
                    ax.plot([e + 1 for e in epochs], self.history[name], marker="o", markersize=3, label=label)
            if key == "lr" and all(v > 0 for v in self.history["lr"]):
                ax.set_yscale("log")
            ax.set_title(key)
            ax.set_xlabel("epoch")
            ax.legend()
        for ax in axes[len(keys) :]:
            ax.set_visible(False)
        figure.tight_layout()
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, format="png")
        return figure

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"


__all__ = ["History"]
