"""Weight averaging: EMA (an exponential moving average after every optimizer step) and SWA (stochastic
weight averaging, on ``torch.optim.swa_utils``).

Both average the parameters *and buffers* of ``trainer.model`` (as ``AveragedModel(..., use_buffers=True)``),
keep the averages on the model's device, swap them into the model for validation (``on_validation_begin``
/ ``on_validation_end``, so ``val_*`` logs, EarlyStopping and ModelCheckpoint's choice of the best epoch
see the averaged weights), and leave them in the model when ``fit`` finishes. Their state (the averages
and counters) is in every full checkpoint, so a resumed run is exact; the model's own state in a checkpoint
(and a weights-only file written during ``fit``) holds the trained weights, which training continues from.
Save the averaged weights after ``fit`` (the model holds them) or with ``with ema.averaged_weights():``. They run on every rank of a
distributed run: DDP keeps the weights equal on every rank, so the averages are too.

``trainer.evaluate(data)`` after ``fit`` sees the averaged weights when they were left in the model
(``swap_at_end=True``, the default); otherwise pass the callback, ``trainer.evaluate(data, callbacks=[ema])``,
or use ``with ema.averaged_weights(): ...`` around any code.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from fitkit import _compat, distributed
from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.callbacks.base import Callback, Logs, TrainerLike
from fitkit.data import move_to_device, split_batch


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters, then its buffers, in ``AveragedModel(use_buffers=True)``'s order."""
    return [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]


def _grouped(
    averaged: list[torch.Tensor], current: list[torch.Tensor]
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The pairs grouped by (device, dtype), as ``AveragedModel`` groups them for its ``multi_avg_fn``."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for a, c in zip(averaged, current):
        group = groups.setdefault((a.device, a.dtype), ([], []))
        group[0].append(a)
        group[1].append(c.to(a.device))
    return list(groups.values())


class _WeightAveraging(Callback):
    """What EMA and SWA share: the averaged tensors, the swap for validation, the state."""

    def __init__(self, evaluate_with_average: bool, swap_at_end: bool) -> None:
        for name, value in (("evaluate_with_ema", evaluate_with_average), ("swap_at_end", swap_at_end)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.evaluate_with_average = evaluate_with_average
        self.swap_at_end = swap_at_end
        self.averaged: list[torch.Tensor] | None = None  # None until the first update
        self.n_averaged = 0
        self._backup: list[torch.Tensor] | None = None
        self._failed = False

    # -- averages -------------------------------------------------------------------------------
    def _check_model(self) -> None:
        if self.trainer.shards_parameters:
            raise NotImplementedError(
                f"{type(self).__name__} does not support strategy='fsdp' (its parameters are sharded); "
                "use strategy='ddp'"
            )

    def _update(self) -> None:
        """One more model in the average (the first one is copied)."""
        current = _tensors(self.trainer.model)
        if self.averaged is None or self.n_averaged == 0:
            self.averaged = [t.clone() for t in current]
        else:
            for averaged, model in _grouped(self.averaged, current):
                self._average(averaged, model)
        self.n_averaged += 1

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _sync_buffers(self) -> None:
        """Rank 0's averaged buffers on every rank. DDP keeps the parameters equal, but each rank's
        BatchNorm statistics follow its own batches until DDP broadcasts rank 0's at the next forward:
        the averages of rank 0 are the ones every rank uses (and the ones a checkpoint holds)."""
        trainer = self.trainer
        if self.averaged is None or trainer.world_size == 1:
            return
        first = len(list(trainer.model.parameters()))
        buffers = distributed.broadcast_object([t.cpu() for t in self.averaged[first:]], trainer.dist)
        with torch.no_grad():
            for t, b in zip(self.averaged[first:], buffers):
                t.copy_(b)

    def _swap_in(self) -> None:
        if self.averaged is None or self._backup is not None:
            return
        self._sync_buffers()
        tensors = _tensors(self.trainer.model)
        self._backup = [t.clone() for t in tensors]
        with torch.no_grad():
            for t, a in zip(tensors, self.averaged):
                t.copy_(a)

    def _swap_out(self) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for t, b in zip(_tensors(self.trainer.model), self._backup):
                t.copy_(b)
        self._backup = None

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The averaged weights in the model inside the block, the trained ones back after it."""
        self._swap_in()
        try:
            yield
        finally:
            self._swap_out()

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self._check_model()
        self._backup = None
        self._failed = False

    def on_validation_begin(self, logs: Logs | None = None) -> None:
        if self.evaluate_with_average:
            self._swap_in()

    def on_validation_end(self, logs: Logs | None = None) -> None:
        self._swap_out()

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        self._swap_out()  # a validation it ended (SIGTERM): checkpoints written after this hold the trained weights

    def on_train_end(self, logs: Logs | None = None) -> None:
        self._swap_out()  # a validation that an exception ended
        if not self._failed:  # (a failed rank may not take part in a collective)
            self._sync_buffers()
        if self.swap_at_end and not self._failed and self.averaged is not None:
            # Keras's finalize step: the model keeps the averages (a failed fit keeps the trained
            # weights, so that calling fit again continues exactly).
            with torch.no_grad():
                for t, a in zip(_tensors(self.trainer.model), self.averaged):
                    t.copy_(a)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The averages; written during a validation that swapped them in (a checkpoint callback's
        ``on_exception`` that ran before this one's), also the trained weights, which the model holds again
        when the checkpoint is loaded."""
        return {
            "averaged": None if self.averaged is None else [t.detach().cpu().clone() for t in self.averaged],
            "n_averaged": self.n_averaged,
            "trained": None if self._backup is None else [t.detach().cpu().clone() for t in self._backup],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_averaged = int(state["n_averaged"])
        averaged = state["averaged"]
        if averaged is None:
            self.averaged = None
            return
        tensors = _tensors(self.trainer.model)
        if len(averaged) != len(tensors) or any(a.shape != t.shape for a, t in zip(averaged, tensors)):
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's averages do not fit this model "
                f"({len(averaged)} tensors saved, the model has {len(tensors)}); resume with the same architecture"
            )
        self.averaged = [a.to(device=t.device, dtype=t.dtype) for a, t in zip(averaged, tensors)]
        if state.get("trained") is not None:  # saved while the averages were swapped in: the trained weights
            with torch.no_grad():
                for t, trained in zip(tensors, state["trained"]):
                    t.copy_(trained)


class EMA(_WeightAveraging):
    """An exponential moving average of the weights, updated after optimizer steps.

    After each ``every_n_steps``-th optimizer step from ``start_step`` on, ``average = decay * average +
    (1 - decay) * weights`` for every parameter and buffer (the first update copies the weights): the
    values torch's ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)``
    computes, with the same function. The update stays on the device (no host sync).

    Args:
        decay: the weight of the old average, in [0, 1] (0.999 by default).
        every_n_steps: optimizer steps between updates (>= 1).
        start_step: the first global step that updates the average (earlier steps are not averaged).
        evaluate_with_ema: validate (in ``fit``, and in ``evaluate(callbacks=[ema])``) with the averaged weights.
        swap_at_end: when ``fit`` finishes without an exception, leave the averaged weights in the model.
    """

    def __init__(
        self,
        decay: float = 0.999,
        every_n_steps: int = 1,
        start_step: int = 0,
        evaluate_with_ema: bool = True,
        swap_at_end: bool = True,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1] (the weight of the old average), got {decay!r}")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(
                f"every_n_steps must be an int >= 1 (optimizer steps between updates), got {every_n_steps!r}"
            )
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0 (the first global step averaged), got {start_step!r}")
        super().__init__(evaluate_with_ema, swap_at_end)
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        self.decay = float(decay)
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self._multi_avg_fn = get_ema_multi_avg_fn(self.decay)
        self._seen_step = 0

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        self._multi_avg_fn(averaged, current, None)

    def on_train_begin(self, logs: Logs | None = None) -> None:
        super().on_train_begin(logs)
        self._seen_step = self.trainer.global_step
        last = self.trainer.steps_planned
        first = -(-max(self.start_step, 1) // self.every_n_steps) * self.every_n_steps  # the first step averaged
        if last is not None and first > last:
            warnings.warn(
                f"EMA(start_step={self.start_step}, every_n_steps={self.every_n_steps}) never averages in this fit: "
                f"its first update would be at step {first}, and the fit ends at step {last}. The model ends with "
                "its own weights, not an average: lower start_step/every_n_steps, or train longer",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )

    stops_mid_epoch = False  # on_batch_end only updates the average: under torchrun, no per-batch stop vote for it

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self.trainer.global_step != self._seen_step:  # an optimizer step happened: an int comparison
            self._steps_done()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        self._steps_done()  # data of unknown length: the epoch's last group stepped after its last batch

    def _steps_done(self) -> None:
        step = self.trainer.global_step
        due = any(s >= self.start_step and s % self.every_n_steps == 0 for s in range(self._seen_step + 1, step + 1))
        self._seen_step = step
        if due:
            self._update()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seen_step": self._seen_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._seen_step = int(state["seen_step"])


class SWA(_WeightAveraging):
    """Stochastic weight averaging (Izmailov et al. 2018) on ``torch.optim.swa_utils``.

    From epoch ``swa_start_epoch`` (0-based) on, a ``SWALR`` schedule per optimizer anneals every param
    group's learning rate to ``swa_lr`` over ``anneal_epochs`` epochs (stepped at each epoch's end), and the
    weights at the end of each epoch join an equal-weight average (``AveragedModel``'s default average,
    parameters and buffers). Validation runs with the average once it exists. When ``fit`` finishes, the
    model gets the average and ``update_bn`` recomputes its BatchNorm statistics with one pass over the
    training data (averaged over the ranks of a distributed run). Do not combine it with another LR
    schedule during the SWA epochs: both would set the rate.

    Args:
        swa_start_epoch: the first epoch (0-based) whose end weights are averaged.
        swa_lr: the learning rate to anneal to (one for every param group of every optimizer).
        anneal_epochs: epochs of annealing from the current rate to ``swa_lr`` (>= 0).
        anneal_strategy: ``"cos"`` or ``"linear"`` (as ``SWALR``).
        evaluate_with_swa: validate with the average (from the first SWA epoch's end).
        swap_at_end: when ``fit`` finishes without an exception, leave the average (with fresh BatchNorm
            statistics) in the model.
    """

    def __init__(
        self,
        swa_start_epoch: int,
        swa_lr: float,
        anneal_epochs: int = 1,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        evaluate_with_swa: bool = True,
        swap_at_end: bool = True,
    ) -> None:
        if isinstance(swa_start_epoch, bool) or not isinstance(swa_start_epoch, int) or swa_start_epoch < 0:
            raise ValueError(
                f"swa_start_epoch must be an int >= 0 (the first averaged epoch, 0-based), got {swa_start_epoch!r}"
            )
        if isinstance(swa_lr, bool) or not isinstance(swa_lr, (int, float)) or not math.isfinite(swa_lr) or swa_lr <= 0:
            raise ValueError(f"swa_lr must be a positive number (the learning rate of the SWA epochs), got {swa_lr!r}")
        if isinstance(anneal_epochs, bool) or not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(f"anneal_epochs must be an int >= 0, got {anneal_epochs!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        super().__init__(evaluate_with_swa, swap_at_end)
        self.swa_start_epoch = swa_start_epoch
        self.swa_lr = float(swa_lr)
        self.anneal_epochs = anneal_epochs
        self.anneal_strategy = anneal_strategy
        self.schedulers: dict[str, Any] | None = None
        self._scheduler_states: dict[str, Any] | None = None

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor]) -> None:
        # AveragedModel's default (equal-weight) average, tensor by tensor (as it does off the devices with
        # foreach kernels; integer buffers such as num_batches_tracked included), the count as a tensor.
        from torch.optim.swa_utils import get_swa_avg_fn

        average, n = get_swa_avg_fn(), torch.tensor(self.n_averaged, device=averaged[0].device)
        for a, c in zip(averaged, current):
            a.copy_(average(a, c, n))

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return dict(self.trainer.optimizers)

    def _ensure_schedulers(self) -> None:
        if self.schedulers is not None:
            return
        from torch.optim.swa_utils import SWALR

        self.schedulers = {}
        for name, optimizer in self._optimizers().items():
            lrs = [group["lr"] for group in optimizer.param_groups]
            scheduler = SWALR(optimizer, self.swa_lr, self.anneal_epochs, self.anneal_strategy)
            if self._scheduler_states is not None:  # resumed: the optimizer's rates are already the run's
                scheduler.load_state_dict(self._scheduler_states[name])
                for group, lr in zip(optimizer.param_groups, lrs):
                    group["lr"] = lr
            self.schedulers[name] = scheduler
        self._scheduler_states = None

    def on_train_begin(self, logs: Logs | None = None) -> None:
        super().on_train_begin(logs)
        self.schedulers = None
        planned = self.trainer.epochs_planned
        if planned is not None and self.swa_start_epoch >= planned:
            warnings.warn(
                f"SWA(swa_start_epoch={self.swa_start_epoch}) never averages in this fit: epochs are 0-based here "
                f"and the fit ends after epoch {planned - 1} (epochs={planned}). The model ends with its own "
                f"weights, not an average: pass epochs > {self.swa_start_epoch} or a smaller swa_start_epoch",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        if epoch >= self.swa_start_epoch:
            self._ensure_schedulers()

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if epoch < self.swa_start_epoch:
            return
        self._ensure_schedulers()  # a run resumed inside the epoch had no on_epoch_begin
        assert self.schedulers is not None
        self._update()
        for scheduler in self.schedulers.values():
            scheduler.step()

    def on_train_end(self, logs: Logs | None = None) -> None:
        self._swap_out()
        if not self._failed:
            self._sync_buffers()
        if self.swap_at_end and not self._failed and self.averaged is not None:
            with torch.no_grad():
                for t, a in zip(_tensors(self.trainer.model), self.averaged):
                    t.copy_(a)
            self._update_bn()

    def _update_bn(self) -> None:
        """``torch.optim.swa_utils.update_bn`` over the training data, through the trainer's forward."""
        from torch.optim.swa_utils import update_bn

        trainer = self.trainer
        model = trainer.model
        if not any(_compat.is_batchnorm(m) for m in model.modules()):
            return
        with torch.no_grad():
            update_bn(_Inputs(trainer), _Forward(trainer))
        if trainer.world_size > 1:  # each rank saw its shard: average the statistics over the ranks
            buffers = [b for m in model.modules() if _compat.is_batchnorm(m) for b in m.buffers()]
            everyone = distributed.gather_object([b.detach().cpu() for b in buffers], trainer.dist)
            with torch.no_grad():
                for i, b in enumerate(buffers):
                    mean = torch.stack([ranks[i].double() for ranks in everyone]).mean(0)
                    b.copy_(mean.to(b.dtype) if b.is_floating_point() else everyone[0][i])
        self.averaged = [t.clone() for t in _tensors(model)]  # the average now holds the new statistics

    def state_dict(self) -> dict[str, Any]:
        schedulers = None
        if self.schedulers is not None:
            schedulers = {name: s.state_dict() for name, s in self.schedulers.items()}
        elif self._scheduler_states is not None:
            schedulers = self._scheduler_states
        return {**super().state_dict(), "schedulers": schedulers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.schedulers = None
        self._scheduler_states = state["schedulers"]


class _Inputs:
    """The training data's inputs on the trainer's device, for ``update_bn``."""

    def __init__(self, trainer: TrainerLike) -> None:
        self.trainer = trainer

    def __iter__(self) -> Iterator[Any]:
        for batch in self.trainer.train_loader:
            inputs = split_batch(batch)[0]
            yield _Wrapped(move_to_device(inputs, self.trainer.device, False))


class _Wrapped:
    """One batch's inputs, opaque to ``update_bn`` (which would take ``input[0]`` of a tuple)."""

    def __init__(self, inputs: Any) -> None:
        self.inputs = inputs


class _Forward(nn.Module):
    """The model called as the trainer calls it (a tuple of inputs as positional arguments, a dict as
    keyword arguments), for ``update_bn``."""

    def __init__(self, trainer: TrainerLike) -> None:
        super().__init__()
        self.model = trainer.model
        self._trainer = [trainer]  # not a submodule

    def forward(self, wrapped: _Wrapped) -> Any:
        inputs = wrapped.inputs
        if isinstance(inputs, dict):
            return self.model(**inputs)
        if isinstance(inputs, (list, tuple)):
            return self.model(*inputs)
        return self.model(inputs)


__all__ = ["EMA", "SWA"]
