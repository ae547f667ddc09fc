"""The steps a `fitkit.Trainer` subclass overrides, and the calls they are made of.

``train_step`` / ``eval_step`` / ``predict_step`` run one batch; they are built from ``forward``,
``compute_loss``, ``backward``, ``optimizer_step`` and ``update_metrics``, which a custom step calls too.
`Trainer` inherits them (as Keras's ``Model`` inherits its ``Trainer``): this module holds the per-batch
mathematics, ``trainer.py`` the configuration and the entry points, ``_run.py`` the loop that calls them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fitkit import _arguments, _checks, _compat, distributed
from fitkit._precision import NO_CONTEXT
from fitkit.data import split_batch

if TYPE_CHECKING:
    from fitkit._loop_times import LoopTimes
    from fitkit._precision import Precision
    from fitkit._run import MetricSet, Run
    from fitkit.metrics import Metric
    from fitkit.state import GradientAccumulation, TrainerState
    from fitkit.strategies import SingleDevice


class Steps:
    """The step API of [Trainer][fitkit.Trainer] (documented there); state lives on the Trainer."""

    #: Keys of the step logs that are batch sums (a VAE's summed reconstruction loss), not batch means: they
    #: are logged per sample (the epoch's sum over its samples), and the gradients are whatever the step made
    #: of them. A subclass sets it, e.g. ``batch_sum_logs = ("loss",)``.
    batch_sum_logs: tuple[str, ...] = ()

    if TYPE_CHECKING:  # set by Trainer.__init__ (documented there)
        model: nn.Module
        optimizers: dict[str, torch.optim.Optimizer]
        loss: Any
        state: TrainerState
        accumulate_grad_batches: int
        grad_clip_norm: float | None
        grad_clip_value: float | None
        _closure_optimizers: list[str]
        _trainable_params: dict[str, list[torch.Tensor]]
        _accumulation: GradientAccumulation
        _amp: Precision
        _run: Run
        _train_set: MetricSet
        _modules: Any
        _strategy: SingleDevice
        optimizer: torch.optim.Optimizer  # a property of Trainer

    @property
    def metrics(self) -> list[Metric]:
        """The training metrics (validation uses copies of them), as ``Metric`` objects."""
        return self._train_set.metrics

    @property
    def weighted_metrics(self) -> list[Metric]:
        """The training metrics weighted by sample weights (see ``weighted_metrics=``)."""
        return self._train_set.weighted

    @property
    def loop_times(self) -> LoopTimes | None:
        """The current (or last) fit's loop clock (`fitkit._loop_times.LoopTimes`: where the epoch's time goes),
        when one of its callbacks asked for it with ``wants_loop_times = True`` (ThroughputMonitor); else None."""
        run = self._run
        while run.clock is None and run.outer is not None:  # an evaluate made inside the fit: the fit's clock
            run = run.outer
        return run.clock

    def allow_sync(self) -> contextlib.AbstractContextManager[Any]:
        """A context for deliberate host-device synchronisations inside the batch loop (a progress
        refresh, a checkpoint write, fp16's GradScaler check): ``debug_sync`` does not flag them.

        Use it in a callback that reads tensor values on purpose every N batches::

            with self.trainer.allow_sync():
                value = float(logs["loss"])
        """
        return self._run.allow_sync()

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward, [compute_loss][fitkit.Trainer.compute_loss], [backward][fitkit.Trainer.backward] and, at the end of an accumulation group, an
        [optimizer_step][fitkit.Trainer.optimizer_step] of every optimizer; returns ``{"loss": ...}``.

        Override it for custom logic (a GAN's two optimizers, several losses): call [forward][fitkit.Trainer.forward] (under
        [autocast][fitkit.Trainer.autocast]), [backward][fitkit.Trainer.backward] (``optimizer=`` routes gradients to one optimizer's
        parameters) and [optimizer_step][fitkit.Trainer.optimizer_step] as needed, set ``self.outputs`` for callbacks that want the
        outputs, and return a dict of 0-dim tensors (any keys); each is averaged over samples into the
        epoch logs. An optimizer whose ``step`` needs a closure (LBFGS) is stepped with one here.

        Args:
            batch: the batch as the data yields it, already on the trainer's device: Keras's layouts ``x``,
                ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` for the default step, any structure for yours.

        Returns:
            The step's values as 0-dim tensors, ``"loss"`` included; keep them on the device (no ``.item()``).
        """
        inputs, targets, sample_weight = split_batch(batch)
        if self._run.class_weight is not None:
            sample_weight = self._with_class_weight(targets, sample_weight)
        if self._closure_optimizers:
            return self._closure_step(inputs, targets, sample_weight)
        with self.autocast():
            self._run.outputs = outputs = self.forward(inputs)  # trainer.outputs, without the property call
            loss = self._loss(inputs, targets, outputs, sample_weight)
        self.backward(loss)
        if self._accumulation.step_now:
            for name in self.optimizers:
                self.optimizer_step(name)
        if self._run.phase.metrics or self._run.phase.weighted:
            self.update_metrics(outputs, targets, sample_weight)
        return {"loss": loss.detach()}

    def _closure_step(self, inputs: Any, targets: Any, sample_weight: Any) -> dict[str, torch.Tensor]:
        """The default step for an optimizer that re-evaluates the loss (LBFGS), as the hand-written loop
        does: ``optimizer.step(closure)`` with a closure that zeroes the gradients, runs forward and the
        loss, backward and clipping. The logged loss and the metrics are the first evaluation's (the loss
        before the step), which is what ``step`` returns."""
        (name,) = self._closure_optimizers
        optimizer = self.optimizers[name]
        first: list[Any] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                outputs = self.forward(inputs)
                loss = self._loss(inputs, targets, outputs, sample_weight)
            self.backward(loss)
            self._clip(optimizer)
            if not first:
                first.append(outputs)
            return loss

        loss = self.optimizer_step(name, closure=closure)
        self.outputs = first[0]
        if self._run.phase.metrics or self._run.phase.weighted:
            self.update_metrics(first[0], targets, sample_weight)
        return {"loss": loss.detach()}

    def compute_loss(self, inputs: Any, targets: Any, outputs: Any, sample_weight: Any = None) -> torch.Tensor:
        """The loss of a batch; the default steps call it. Override it for a loss the model's outputs do
        not give directly (a VAE's reconstruction + KL term); the override decides alone.

        Default: ``loss(outputs, targets)``; with ``sample_weight`` (a batch's third element, or
        ``fit(class_weight=...)``) the batch mean of ``weight * per-sample loss`` (Keras's "sum over batch
        size"); with ``loss=None``, the loss the model returned (``outputs["loss"]`` or ``outputs.loss``).

        Args:
            inputs: the batch's inputs (``x``), as the model received them.
            targets: the batch's targets (``y``), or None for a batch without them.
            outputs: the model's outputs for ``inputs``.
            sample_weight: one weight per sample, ``(N,)``, or None (unweighted).

        Returns:
            The batch's loss, a 0-dim tensor on the device.
        """
        if self.loss is None:
            if sample_weight is not None:  # (x, y, sample_weight) batches: weights fitkit cannot apply
                raise ValueError(_checks.unweighted_loss_message("sample_weight"))
            return _loss_from_outputs(outputs)
        if targets is None:
            raise ValueError(
                "the batch has no targets, so the loss cannot be computed: batches are x or (x,) without "
                "targets. Yield (x, y) batches, or compute the loss yourself: override Trainer.compute_loss("
                "inputs, targets, outputs), or pass loss=None if the model returns its loss"
            )
        run = self._run
        if run.check_loss_inputs:  # the first batch of a call: _checks.py (one deliberate read of its label range)
            run.check_loss_inputs = False
            with self.allow_sync():
                _checks.check_loss_inputs(self.loss, outputs, targets)
            if run.class_weight is not None:
                _checks.check_class_weight(run.class_weight, outputs)
        try:
            if sample_weight is None:
                return self.loss(outputs, targets)
            return self._weighted_loss(outputs, targets, sample_weight)
        except (IndexError, RuntimeError, ValueError, TypeError) as exc:  # a later batch: the same message
            explained = _checks.explain_loss_error(exc, self.loss, outputs, targets)
            if explained is None:
                raise
            raise explained from exc

    def _with_class_weight(self, targets: Any, sample_weight: Any) -> Any:
        """The sample weights times ``fit(class_weight=...)``'s weight of each sample's class (training only,
        as in Keras; one-hot targets count as their argmax class)."""
        class_weight = self._run.class_weight
        if targets is None or class_weight is None:
            return sample_weight
        classes = targets.argmax(dim=-1) if targets.ndim == 2 and targets.shape[1] > 1 else targets.reshape(-1)
        classes, size = classes.long(), class_weight.shape[0]
        known = (classes >= 0) & (classes < size)  # a class the dict does not list weighs 1.0 (no host read)
        weights = torch.where(known, class_weight[classes.clamp(0, size - 1)], 1.0)
        return weights if sample_weight is None else sample_weight * weights

    def _loss(self, inputs: Any, targets: Any, outputs: Any, sample_weight: Any) -> torch.Tensor:
        """[compute_loss][fitkit.Trainer.compute_loss], with ``sample_weight`` passed on only when there is one (an override
        written without the argument still works for unweighted data)."""
        if sample_weight is None:
            return self.compute_loss(inputs, targets, outputs)
        return self.compute_loss(inputs, targets, outputs, sample_weight)

    def _weighted_loss(self, outputs: Any, targets: Any, sample_weight: torch.Tensor) -> torch.Tensor:
        per_sample = self._run.per_sample_loss
        if per_sample is None:
            per_sample = self._run.per_sample_loss = _arguments.per_sample_loss(self.loss)
        values = per_sample(outputs, targets)
        n = values.shape[0] if values.ndim else 1
        values = values.reshape(n, -1).mean(dim=1) if values.ndim > 1 else values.reshape(n)
        return (values * sample_weight.reshape(n).to(values.dtype)).sum() / n

    def eval_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward and [compute_loss][fitkit.Trainer.compute_loss] under ``no_grad`` in eval mode; override
        like [train_step][fitkit.Trainer.train_step].

        Args:
            batch: a validation batch, already on the trainer's device (the layouts ``train_step`` takes).

        Returns:
            ``{"loss": ...}`` and any other values, as 0-dim tensors; averaged over samples into the logs.
        """
        inputs, targets, sample_weight = split_batch(batch)
        with self.autocast():
            self._run.outputs = outputs = self.forward(inputs, training=False)
            loss = self._loss(inputs, targets, outputs, sample_weight)
        self.update_metrics(outputs, targets, sample_weight)
        return {"loss": loss}

    def predict_step(self, batch: Any) -> Any:
        """The model's outputs for a batch of inputs (targets, if the batch has them, are ignored).

        Args:
            batch: a batch of ``predict``'s data, already on the trainer's device.
        """
        inputs = split_batch(batch)[0]
        with self.autocast():
            return self.forward(inputs, training=False)

    def forward(self, inputs: Any, training: bool = True) -> Any:
        """Calls the model: a tensor as one argument, a tuple/list as positional and a dict as keyword
        arguments.

        Args:
            inputs: the model's input(s): a tensor, a tuple or list, or a dict.
            training: True (the default) calls the module training uses (DDP/FSDP-wrapped, compiled when
                ``compile=True``); False the one evaluation and prediction use. Train/eval mode is the loop's.
        """
        module = self._modules.train if training else self._modules.eval
        try:
            if isinstance(inputs, torch.Tensor):
                return module(inputs)
            if isinstance(inputs, dict):
                try:
                    return module(**inputs)
                except TypeError as exc:  # only on the error path: a clear word on what dict batches mean
                    explained = _checks.explain_dict_batch(exc, self.model, inputs)
                    if explained is None:
                        raise
                    raise explained from exc
            if isinstance(inputs, (list, tuple)):
                return module(*inputs)
            return module(inputs)
        except RuntimeError as exc:  # torch's shape error of a Linear/Conv: which layer, and what to fix
            explained = _checks.explain_forward_error(exc, self.model, inputs)
            if explained is None:
                raise
            raise explained from exc

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The mixed-precision context of this trainer (a no-op at ``precision="32"``)."""
        amp = self._amp
        return NO_CONTEXT if amp.dtype is None else amp.autocast()  # fp32: no call on the per-batch path

    def backward(self, loss: torch.Tensor, optimizer: str | None = None) -> None:
        """``loss.backward()`` with loss scaling (fp16) and the accumulation weight applied.

        Args:
            loss: a 0-dim tensor that requires grad.
            optimizer: the name of one of [optimizers][fitkit.Trainer.optimizers]: gradients then flow only into that
                optimizer's parameters (``loss.backward(inputs=...)``), so a generator's loss never adds to the
                discriminator's gradients. None: every parameter, as ``loss.backward()``.
        """
        accumulation, run = self._accumulation, self._run
        if not accumulation.pending:
            _arguments.check_loss(loss)
        for fn in run.callbacks.hooks["on_before_backward"]:
            fn(loss)
        if self.accumulate_grad_batches > 1:
            # Weight each batch by its size so that a group equals one big batch, also when the last
            # group or batch is short; optimizer_step divides by the group's total weight.
            n = run.n
            if not accumulation.pending:
                accumulation.first_n, accumulation.units = n, 0.0
            weight = n / accumulation.first_n
            accumulation.units += weight
            loss = loss * weight
        if self._amp.scaler is not None:
            loss = self._amp.scaler.scale(loss)
        if optimizer is None:
            loss.backward()  # skips DDP's all-reduce on accumulating batches (see set_grad_sync in _run_epoch)
        else:
            loss.backward(inputs=self._trainable(optimizer))
        accumulation.pending = True

    def optimizer_step(self, name: str | None = None, closure: Callable[[], torch.Tensor] | None = None) -> Any:
        """Unscale, accumulate, clip, ``step``, ``zero_grad`` one optimizer; counts the step.

        Args:
            name: which of [optimizers][fitkit.Trainer.optimizers] (may be omitted when there is one).
            closure: for an optimizer that re-evaluates the loss (LBFGS): passed to its ``step``; the
                closure clips its own gradients (see the default [train_step][fitkit.Trainer.train_step]).

        Returns:
            what the optimizer's ``step`` returned (the closure's first loss for LBFGS; usually None).

        ``global_step`` counts training iterations in which an optimizer stepped (a GAN's two steps on one
        batch are one global step); ``state.optimizer_steps[name]`` counts each optimizer's own steps.
        """
        name = self._optimizer_name(name)
        optimizer, scaler, accumulation, run = self.optimizers[name], self._amp.scaler, self._accumulation, self._run
        if self.accumulate_grad_batches > 1 and accumulation.units not in (0.0, 1.0):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            _compat.foreach_div_(grads, accumulation.units)
        if closure is None and (self.grad_clip_norm is not None or self.grad_clip_value is not None):
            self._clip(optimizer)
        for fn in run.callbacks.hooks["on_before_optimizer_step"]:
            fn()
        if scaler is not None:
            self._amp.record_scale()  # kept on the device: last_step_skipped compares it only when asked
            with self.allow_sync():  # reads the inf flag on the host: fp16's one sync per step
                result = scaler.step(optimizer)
        elif closure is not None:
            # LBFGS reads the loss and gradient norms on the host to decide its line search and stop: the
            # price of a closure optimizer, so debug_sync does not flag it.
            with self.allow_sync():
                result = optimizer.step(closure)  # type: ignore[arg-type]  # torch types it as returning float; LBFGS documents a tensor
        else:
            result = optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accumulation.reset()
        steps = self.state.optimizer_steps
        steps[name] = steps.get(name, 0) + 1
        if not run.stepped:
            run.stepped = True
            self.state.global_step += 1
        return result

    def _clip(self, optimizer: torch.optim.Optimizer) -> None:
        """Clips ``optimizer``'s gradients (after unscaling them, under fp16) when clipping is configured."""
        if self.grad_clip_norm is None and self.grad_clip_value is None:
            return
        if self._amp.scaler is not None:
            self._amp.scaler.unscale_(optimizer)  # clip the real gradients, not the scaled ones
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(_params(optimizer), self.grad_clip_norm)
        if self.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(_params(optimizer), self.grad_clip_value)

    def _optimizer_name(self, name: str | None) -> str:
        if name is None:
            if len(self.optimizers) == 1:
                return next(iter(self.optimizers))
            raise ValueError(
                f"this trainer has {len(self.optimizers)} optimizers ({', '.join(self.optimizers)}): name the one "
                "to use, e.g. self.optimizer_step('generator') or self.backward(loss, optimizer='generator')"
            )
        if name not in self.optimizers:
            raise KeyError(f"no optimizer named {name!r}; this trainer's optimizers are {sorted(self.optimizers)}")
        return name

    def _trainable(self, name: str) -> list[torch.Tensor]:
        """The parameters of optimizer ``name`` that take gradients (cached; FSDP swaps them at build)."""
        params = self._trainable_params.get(name)
        if params is None:
            params = [p for p in _params(self.optimizers[self._optimizer_name(name)]) if p.requires_grad]
            self._trainable_params[name] = params
        return params

    def _learnable(self) -> list[torch.Tensor]:
        """The model's parameters, then a learnable loss module's (what ``backward`` gives gradients)."""
        return [*self.model.parameters(), *(self.loss.parameters() if isinstance(self.loss, nn.Module) else ())]

    def _lr_logs(self) -> dict[str, float]:
        """``lr`` (the first param group's) with one optimizer, ``lr_<name>`` for each of several."""
        if len(self.optimizers) == 1:
            return {"lr": float(self.optimizer.param_groups[0]["lr"])}
        return {f"lr_{name}": float(opt.param_groups[0]["lr"]) for name, opt in self.optimizers.items()}

    @property
    def last_step_skipped(self) -> bool:
        """True when fp16's GradScaler skipped the last optimizer step (inf/NaN gradients).

        Reads the scale back from the device (a host sync); always False without fp16.
        """
        return self._amp.last_step_skipped()

    def update_metrics(self, outputs: Any, targets: Any, sample_weight: torch.Tensor | None = None) -> None:
        """Updates the metrics of the running phase (training, or validation/evaluate); the weighted metrics
        get the batch's sample weights (unweighted without them, as in Keras).

        Args:
            outputs: the model's outputs for the batch (each metric selects its part with ``output=``).
            targets: the batch's targets.
            sample_weight: one weight per sample, ``(N,)``, or None.
        """
        phase = self._run.phase
        for metric in phase.metrics:
            metric.update(outputs, targets)
        for metric in phase.weighted:
            metric.update(outputs, targets, sample_weight)

    def running_logs(self) -> dict[str, float]:
        """The training loss and metrics so far in this epoch (one host sync); in a distributed run, this
        rank's own (no collective: rank-0-only callbacks such as the progress bar call it)."""
        with self.allow_sync(), distributed.local_metric_values(self.metrics + self.weighted_metrics):
            return self._train_set.tracker.compute()


def _loss_from_outputs(outputs: Any) -> torch.Tensor:
    """The loss a model returned itself (``loss=None``): ``outputs["loss"]`` or ``outputs.loss``."""
    if isinstance(outputs, Mapping) and "loss" in outputs:
        loss = outputs["loss"]
    elif not isinstance(outputs, Mapping) and getattr(outputs, "loss", None) is not None:
        loss = outputs.loss
    else:
        keys = f" (keys: {sorted(outputs)})" if isinstance(outputs, Mapping) else ""
        raise ValueError(
            f"loss=None means the model computes its loss, but its output ({type(outputs).__name__}{keys}) holds "
            "none: return a mapping with a 'loss' key or an object with a .loss attribute (as Hugging Face "
            "models do when given labels), pass a loss= to the Trainer, or override Trainer.compute_loss"
        )
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the model's output 'loss' must be a tensor, got {type(loss).__name__}")
    return loss


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


__all__: list[str] = []
