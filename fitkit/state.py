"""The trainer's documented, resumable progress counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainerState:
    """Where training stands. Callbacks read it as ``trainer.state``.

    Attributes:
        epoch: the current (or next) epoch, 0-based as in Keras; messages print ``epoch + 1``.
        global_step: optimizer steps taken since the first ``fit`` (accumulation groups count once).
        batch_in_epoch: training batches consumed in the current epoch; 0 at an epoch boundary.
        epoch_finished: True once the current epoch's training batches are done (between the last batch
            and ``on_epoch_end``), so a checkpoint taken there resumes with validation, not with training.
        should_stop: set by ``trainer.stop()`` or ``trainer.stop_training = True``.
        stop_reason: a short human-readable reason, set by whoever stopped training.
    """

    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0
    epoch_finished: bool = False
    should_stop: bool = False
    stop_reason: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        unknown = set(state) - names
        if unknown:
            raise KeyError(f"TrainerState.load_state_dict: unknown keys {sorted(unknown)}; expected {sorted(names)}")
        for key, value in state.items():
            setattr(self, key, value)
