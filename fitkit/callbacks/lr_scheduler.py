"""Learning-rate callbacks: Keras's ReduceLROnPlateau and LearningRateScheduler, and LRScheduler, which
drives any ``torch.optim.lr_scheduler`` object per epoch or per optimizer step."""

from __future__ import annotations

import inspect
import math
import numbers
import struct
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import lr_scheduler as torch_lr_scheduler

from fitkit import _arguments
from fitkit.callbacks.base import Callback, Logs
from fitkit.callbacks.monitor import MonitorCallback

_INTERVALS = ("epoch", "step")


def set_lr(group: dict[str, Any], value: float) -> None:
    """Sets a param group's learning rate, in place when the optimizer holds it as a tensor."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)  # a tensor lr (capturable/fused optimizers) must keep its identity
    else:
        group["lr"] = value


def _float32(value: float) -> float:
    """``value`` rounded to float32, as Keras stores a learning rate."""
    return struct.unpack("f", struct.pack("f", value))[0]


class ReduceLROnPlateau(MonitorCallback):
    """Multiplies the learning rate of every param group by ``factor`` when ``monitor`` stops improving.

    The decisions are Keras 3's (``keras/src/callbacks/reduce_lr_on_plateau.py``), which count patience
    differently from ``torch.optim.lr_scheduler.ReduceLROnPlateau``. On each epoch that has the monitored
    value:

    1. during a cooldown, the cooldown counter goes down by one and ``wait`` is reset to 0;
    2. an improvement (``value < best - min_delta`` in min mode, ``value > best + min_delta`` in max mode,
       Keras's own arithmetic; the first value always improves) becomes the best and resets ``wait``;
    3. otherwise, outside a cooldown, ``wait`` goes up by one, and when ``wait >= patience`` every group
       whose learning rate is still above ``min_lr`` (compared in float32, as Keras stores the rate) gets
       ``max(lr * factor, min_lr)``; a reduction starts a cooldown of ``cooldown`` epochs and resets
       ``wait``. With the rate already at ``min_lr`` nothing changes and ``wait`` keeps counting.

    Args:
        monitor: the epoch-log key to watch (default ``"val_loss"``).
        factor: the multiplier, ``0 < factor < 1`` (default 0.1).
        patience: epochs without improvement before a reduction (int >= 0, default 10).
        verbose: 1 prints Keras's message at each reduction.
        mode: ``"min"``, ``"max"`` or ``"auto"``: the loss is minimised and a metric states its direction
            through ``higher_is_better`` (Keras 3 guesses from whether the name contains ``"acc"``;
            fitkit asks the metric and raises when it cannot tell).
        min_delta: the margin an improvement must exceed (>= 0; the sign is ignored). Default 1e-4.
        cooldown: epochs after a reduction during which ``wait`` stays 0 (int >= 0, default 0).
        min_lr: the lower bound (>= 0): one float for every group, or a sequence with one per param group.

    A monitored key missing from the logs is an error (Keras warns and does nothing), except on epochs
    that ``validation_freq`` skipped, which count for nothing.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__(monitor=monitor, mode=mode, min_delta=min_delta)
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0.0 < factor < 1.0:
            raise ValueError(
                f"factor must be a number with 0 < factor < 1 (new_lr = lr * factor), got {factor!r}; "
                "use e.g. factor=0.5 to halve the learning rate"
            )
        self.factor: float = float(factor)
        self.patience: int = _arguments.check_int(
            patience, "patience", 0, "epochs without improvement before a reduction"
        )
        self.cooldown: int = _arguments.check_int(
            cooldown, "cooldown", 0, "epochs after a reduction before counting again"
        )
        if verbose not in (0, 1):
            raise ValueError(f"verbose must be 0 (silent) or 1 (print each reduction), got {verbose!r}")
        self.verbose: int = verbose
        per_group = isinstance(min_lr, Sequence) and not isinstance(min_lr, str)
        bounds = list(min_lr) if per_group else [min_lr]
        for bound in bounds:
            if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not 0 <= bound < math.inf:
                raise ValueError(
                    f"min_lr must be a finite number >= 0, or a sequence of them (one per param group), got {min_lr!r}"
                )
        self.min_lr: float | list[float] = [float(b) for b in bounds] if per_group else float(bounds[0])
        self.wait: int = 0
        self.cooldown_counter: int = 0

    # -- decisions ------------------------------------------------------------------------------
    def is_improvement(self, value: float, reference: float | None) -> bool:
        """Keras ReduceLROnPlateau's test: ``value < best - min_delta`` (min), ``value > best + min_delta``
        (max); no best yet counts as ``+inf`` (min) or ``-inf`` (max), as Keras initialises it.

        Args:
            value: the monitored value just logged.
            reference: the best value so far, or None when there is none yet.
        """
        if self.resolved_mode == "min":
            return value < (math.inf if reference is None else reference) - self.min_delta
        return value > (-math.inf if reference is None else reference) + self.min_delta

    def in_cooldown(self) -> bool:
        """True while the ``cooldown`` epochs (or validations) after a reduction are running: no counting."""
        return self.cooldown_counter > 0

    def _min_lrs(self) -> list[float]:
        groups = self.trainer.optimizer.param_groups
        if isinstance(self.min_lr, list):
            if len(self.min_lr) != len(groups):
                raise ValueError(
                    f"ReduceLROnPlateau: min_lr holds {len(self.min_lr)} values but the optimizer "
                    f"has {len(groups)} param groups; pass one value per group, or a single float"
                )
            return self.min_lr
        return [self.min_lr] * len(groups)

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.reset_monitor()
        self.wait = 0
        self.cooldown_counter = 0
        self.check_monitor_key()  # a key that cannot exist: an error now, not after the first epoch
        _ = self.resolved_mode  # re-asked every fit (reset_monitor); fail before the first epoch if "auto" cannot tell
        self._min_lrs()  # and when min_lr does not fit the param groups

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if not self.decides_on_validations():
            self._decide(epoch, logs)

    def on_validation_end(self, logs: Logs | None = None) -> None:
        if self.decides_on_validations(logs):  # validate_every_n_steps: patience counts validations
            assert logs is not None
            self._decide(int(logs["epoch"]), logs)

    def _decide(self, epoch: int, logs: Logs | None) -> None:
        current = self.get_monitor_value(logs)
        if current is None:
            return  # validation_freq skipped this epoch
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self.is_improvement(current, self.best):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience and self._reduce(epoch):
                self.cooldown_counter = self.cooldown
                self.wait = 0

    def _reduce(self, epoch: int) -> bool:
        reduced = False
        for index, (group, min_lr) in enumerate(zip(self.trainer.optimizer.param_groups, self._min_lrs())):
            old_lr = float(group["lr"])
            if _float32(old_lr) > _float32(min_lr):
                new_lr = max(old_lr * self.factor, min_lr)
                set_lr(group, new_lr)
                reduced = True
                if self.verbose:
                    which = "" if len(self.trainer.optimizer.param_groups) == 1 else f" of param group {index}"
                    print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate{which} to {new_lr}.")
        return reduced

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])


def _schedule_arity(schedule: Callable[..., Any]) -> int:
    """2 when ``schedule`` takes ``(epoch, lr)``, 1 when it takes ``(epoch)`` only (Keras's old API)."""
    try:
        signature = inspect.signature(schedule)
    except (TypeError, ValueError):  # a builtin without a signature: assume the current API
        return 2
    for arity, args in ((2, (0, 0.1)), (1, (0,))):
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return arity
    raise TypeError(
        f"schedule must be a function (epoch, lr) -> new_lr (or epoch -> new_lr); "
        f"{schedule!r} has the signature {signature}"
    )


class LearningRateScheduler(Callback):
    """Sets the learning rate at the start of every epoch to ``schedule(epoch, lr)``, as in Keras.

    ``schedule`` receives the 0-based epoch and the current learning rate and returns the new one; it is
    applied to every param group, each with its own current rate (a group's ratio to the others survives a
    multiplicative schedule). A function of the epoch alone (Keras's old API) also works.

    Args:
        schedule: ``(epoch: int, lr: float) -> float``.
        verbose: 1 prints Keras's message at every epoch.

    The schedule must return a finite real number >= 0 (an int is accepted; Keras insists on a float).
    A run resumed in the middle of an epoch keeps the rate that epoch started with (it is in the
    optimizer's state); the schedule is not called again for that epoch.
    """

    def __init__(self, schedule: Callable[..., float], verbose: int = 0) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be a function (epoch, lr) -> new_lr, got {type(schedule).__name__}")
        if verbose not in (0, 1):
            raise ValueError(f"verbose must be 0 (silent) or 1 (print the rate every epoch), got {verbose!r}")
        self.schedule = schedule
        self.verbose = verbose
        self._arity = _schedule_arity(schedule)

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        groups = self.trainer.optimizer.param_groups
        for index, group in enumerate(groups):
            lr = float(group["lr"])
            new_lr = self.schedule(epoch, lr) if self._arity == 2 else self.schedule(epoch)
            if (
                isinstance(new_lr, bool)
                or not isinstance(new_lr, numbers.Real)
                or not new_lr >= 0
                or math.isinf(new_lr)
            ):
                hint = "; return a Python float (e.g. with .item())" if isinstance(new_lr, torch.Tensor) else ""
                raise ValueError(
                    f"LearningRateScheduler: schedule(epoch={epoch}, lr={lr}) returned {new_lr!r}; it "
                    f"must return the new learning rate as a finite number >= 0{hint}"
                )
            set_lr(group, float(new_lr))
            if self.verbose:
                which = "" if len(groups) == 1 else f" of param group {index}"
                print(f"\nEpoch {epoch + 1}: LearningRateScheduler setting learning rate{which} to {float(new_lr)}.")


class LRScheduler(Callback):
    """Drives a ``torch.optim.lr_scheduler`` object: ``scheduler.step()`` per epoch or per optimizer step.

    Args:
        scheduler: any scheduler built on one of the trainer's optimizers (StepLR, CosineAnnealingLR,
            OneCycleLR, LambdaLR, SequentialLR, ..., or ``ReduceLROnPlateau``); with several optimizers
            (``trainer.optimizers``) a per-step schedule follows its own optimizer's steps.
        interval: ``"epoch"``: step at each epoch's end (after validation), as the torch docs do;
            ``"step"``: step after every optimizer step, for warmup and one-cycle schedules.
        monitor: the epoch-log key passed to ``ReduceLROnPlateau.step(value)`` (required for it, and only
            for it). Epochs that ``validation_freq`` skipped do not step it; a key missing for any other
            reason is an error naming the keys that exist.

    Per optimizer step means per ``trainer.global_step`` advance: with ``accumulate_grad_batches=k`` the
    schedule moves once every k batches. (With data of unknown length, an epoch's last, shorter group steps
    after the epoch's last ``on_batch_end``; that step is caught at the epoch's end.) With
    ``precision="fp16"``, a step that the GradScaler skipped (inf/NaN gradients) does not move the
    schedule; finding out reads the scale back from the device, so an fp16 per-step schedule pays one
    host sync per optimizer step.

    The scheduler's ``state_dict`` is part of this callback's state, so a resumed run continues the
    schedule exactly. One instance may serve several ``fit`` calls: the schedule carries on where it was,
    as a torch scheduler does.
    """

    def __init__(self, scheduler: Any, interval: str = "epoch", monitor: str | None = None) -> None:
        if not isinstance(scheduler, torch_lr_scheduler.LRScheduler):
            raise TypeError(
                f"scheduler must be a torch.optim.lr_scheduler object (e.g. "
                f"torch.optim.lr_scheduler.OneCycleLR(optimizer, ...)), got {type(scheduler).__name__}; "
                "for a function of the epoch use LearningRateScheduler(schedule)"
            )
        if interval not in _INTERVALS:
            raise ValueError(
                f"interval must be 'epoch' (step the scheduler at each epoch's end) or 'step' (after "
                f"every optimizer step), got {interval!r}"
            )
        plateau = isinstance(scheduler, torch_lr_scheduler.ReduceLROnPlateau)
        if plateau and monitor is None:
            raise ValueError(
                "torch's ReduceLROnPlateau steps on a monitored value: pass monitor= an epoch-log "
                "key, e.g. LRScheduler(scheduler, monitor='val_loss')"
            )
        if plateau and interval != "epoch":
            raise ValueError("torch's ReduceLROnPlateau steps on an epoch-log value: use interval='epoch'")
        if not plateau and monitor is not None:
            raise ValueError(
                f"monitor={monitor!r} is only for torch's ReduceLROnPlateau; "
                f"{type(scheduler).__name__}.step() takes no value. Drop monitor="
            )
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor must be a non-empty epoch-log key such as 'val_loss', got {monitor!r}")
        self.scheduler = scheduler
        self.interval = interval
        self.monitor = monitor
        self._plateau = plateau
        self._seen_step = 0
        self._optimizer_name: str | None = None

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        optimizers = self.trainer.optimizers
        names = [name for name, optimizer in optimizers.items() if optimizer is self.scheduler.optimizer]
        if not names:
            raise ValueError(
                "LRScheduler: the scheduler was built for an optimizer that is not one of the trainer's "
                f"({', '.join(optimizers)}); build it on the optimizer you passed to Trainer "
                "(trainer.optimizers[name] when there are several)"
            )
        # With several optimizers the schedule follows its own optimizer's steps (a GAN's discriminator
        # may step more often than its generator); with one, the global step.
        self._optimizer_name = None if len(optimizers) == 1 else names[0]
        self._seen_step = self._steps()

    def _steps(self) -> int:
        if self._optimizer_name is None:
            return int(self.trainer.state.global_step)
        return int(self.trainer.state.optimizer_steps.get(self._optimizer_name, 0))

    stops_mid_epoch = False  # on_batch_end only steps the schedule: under torchrun, no per-batch stop vote for it

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self.interval == "step" and self._steps() != self._seen_step:
            self._catch_up()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.interval == "step":
            if self._steps() != self._seen_step:
                self._catch_up()  # data of unknown length: the last, shorter group stepped after on_batch_end
        elif self._plateau:
            value = MonitorCallback.get_monitor_value(self, logs)  # type: ignore[arg-type]  # same rules, this name
            if value is not None:
                plateau = self.scheduler
                assert isinstance(plateau, torch_lr_scheduler.ReduceLROnPlateau)  # checked in __init__
                plateau.step(value)
        else:
            self.scheduler.step()

    def _catch_up(self) -> None:
        step = self._steps()
        steps, self._seen_step = step - self._seen_step, step
        if self.trainer.precision == "fp16":
            with self.trainer.allow_sync():  # reads the GradScaler's scale back: fp16's per-step price
                skipped = self.trainer.last_step_skipped
            if skipped:
                steps -= 1  # the GradScaler skipped the optimizer step: the schedule must not move either
        for _ in range(steps):
            self.scheduler.step()

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "seen_step": self._seen_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self._seen_step = int(state["seen_step"])


__all__ = ["LRScheduler", "LearningRateScheduler", "ReduceLROnPlateau", "set_lr"]
