"""History: the per-epoch logs of a ``fit`` call, as Keras returns them."""

from __future__ import annotations

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
    """

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        self.validations: list[dict[str, float]] = []

    def on_validation_end(self, logs: Logs | None = None) -> None:
        self.validations.append(dict(logs or {}))

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "epoch": list(self.epoch),
            "validations": [dict(v) for v in self.validations],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.epoch = list(state["epoch"])
        self.validations = [dict(v) for v in state.get("validations", [])]

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={sorted(self.history)})"
