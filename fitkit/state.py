"""The trainer's documented, resumable state objects: progress counters and gradient accumulation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrainerState:
    """Where training stands. Callbacks read it as ``trainer.state``.

    Attributes:
        epoch: the current (or next) epoch, 0-based as in Keras; messages print ``epoch + 1``.
        global_step: training iterations in which an optimizer stepped, since the first ``fit``
            (accumulation groups count once; a GAN's two optimizer steps on one batch count once).
        optimizer_steps: each optimizer's own steps, by the name in ``trainer.optimizers``.
        batch_in_epoch: training batches consumed in the current epoch; 0 at an epoch boundary.
        should_stop: set by ``trainer.stop()`` or ``trainer.stop_training = True``.
        stop_reason: a short human-readable reason, set by whoever stopped training.
        last_validation_step: the ``global_step`` of the last finished validation in ``fit`` (None: none
            yet); a run resumed from before a step-level validation finished runs it again.
        train_time: seconds spent in ``fit``'s loop, summed across resumes (``max_time`` reads it).
        run_id: names the run: made (at random, drawing on no generator) when a ``fit`` starts without
            one, restored by a resume, so every checkpoint of one run, in any process, carries the same id
            in its manifest record; checkpoint callbacks of a resumed run recognise their files by it.
    """

    epoch: int = 0
    global_step: int = 0
    optimizer_steps: dict[str, int] = field(default_factory=dict)
    batch_in_epoch: int = 0
    should_stop: bool = False
    stop_reason: str | None = None
    last_validation_step: int | None = None
    train_time: float = 0.0
    run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """Every field by name, as plain Python values."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Sets the fields from what [state_dict][fitkit.TrainerState.state_dict] returned.

        Args:
            state: field names to values; a missing field keeps its value (older checkpoints).

        Raises:
            KeyError: a key that is no field, naming the expected ones.
        """
        names = {f.name for f in fields(self)}
        unknown = set(state) - names
        if unknown:
            raise KeyError(f"TrainerState.load_state_dict: unknown keys {sorted(unknown)}; expected {sorted(names)}")
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class GradientAccumulation:
    """Where the current accumulation group stands (``accumulate_grad_batches > 1``, or a custom step that
    calls ``backward`` without ``optimizer_step``).

    Attributes:
        pending: gradients have been accumulated since the last optimizer step.
        units: the group's weight so far: each batch counts its size over the group's first batch size,
            so a short last batch weighs less; ``optimizer_step`` divides the summed gradients by it.
        first_n: the size of the group's first batch.
        step_now: the current batch ends a group (set by the loop before each step; not saved).
        schedule: ``accumulate_grad_batches`` given as a schedule by epoch, ``{first epoch: batches per step}``
            (before its first epoch: 1); empty for a fixed number. Saved with the state, for the record: the
            group size in force follows from the epoch, so a resumed run uses the same one.
    """

    pending: bool = False
    units: float = 0.0
    first_n: int = 0
    step_now: bool = True
    schedule: dict[int, int] = field(default_factory=dict)

    def size_at(self, epoch: int) -> int:
        """The scheduled group size of ``epoch`` (1 before the schedule's first epoch)."""
        return next((k for first, k in reversed(self.schedule.items()) if first <= epoch), 1)

    def reset(self) -> None:
        """After an optimizer step (or a dropped partial group): nothing pending."""
        self.pending, self.units = False, 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending, "units": self.units, "first_n": self.first_n, "schedule": dict(self.schedule)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = bool(state.get("pending", state.get("grads") is not None))
        self.units, self.first_n = float(state["units"]), int(state["first_n"])


__all__ = ["GradientAccumulation", "TrainerState"]
