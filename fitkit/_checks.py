"""Checks that need a batch: targets, dtypes and output structures against the loss and the model.

Pure functions, run once on the first batch of a fit (never per batch: no host sync in the loop but the
one deliberate read of the first batch's label range), plus `explain_loss_error`, which turns a later
raw torch error from the loss (an ``IndexError`` for a label out of range, a CUDA device-side assert, a
shape or dtype ``RuntimeError``) into the same message, and `explain_forward_error`, which does the same
for the model's first mismatched layer (inputs with the wrong number of features or channels). Each message
says what was received, what is allowed, and how to fix it.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from fitkit import _compat
from fitkit._structure import describe, tensors
from fitkit._warn import FitkitWarning, user_stacklevel

#: Losses whose targets are class indices ``(N,)`` (or ``(N, d1, ...)``) in ``[0, num_classes)``.
CLASSIFICATION_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)
#: Losses that compare outputs and targets element-wise and broadcast silently when their shapes differ.
ELEMENTWISE_LOSSES = (
    nn.MSELoss,
    nn.L1Loss,
    nn.HuberLoss,
    nn.SmoothL1Loss,
    nn.BCEWithLogitsLoss,
    nn.BCELoss,
)


def _loss_name(loss_fn: Any) -> str:
    return type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__name__", "the loss")


def check_loss_inputs(loss_fn: Any, outputs: Any, targets: Any) -> None:
    """Raises a ``TypeError``/``ValueError`` when ``outputs`` and ``targets`` do not fit a built-in torch
    loss: a tuple/dict of outputs, float or int32 class labels, ``(N, 1)`` labels, labels outside
    ``[0, num_classes)`` (one host read of the batch's label range), or shapes an element-wise loss would
    broadcast. Custom loss functions are not second-guessed."""
    if not isinstance(loss_fn, CLASSIFICATION_LOSSES + ELEMENTWISE_LOSSES):
        return
    name = _loss_name(loss_fn)
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(
            f"{name} expects the model's output to be a tensor, but the model returned {describe(outputs, 'items')}. "
            "Return the logits tensor from forward, or compute the loss from the structure yourself: override "
            "Trainer.compute_loss(inputs, targets, outputs) (e.g. return self.loss(outputs[0], targets))"
        )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} expects the targets to be a tensor, got {describe(targets, 'items')}")
    if isinstance(loss_fn, CLASSIFICATION_LOSSES):
        _check_class_targets(loss_fn, name, outputs, targets)
    elif outputs.shape != targets.shape:
        fix = (
            "targets.unsqueeze(1) (or y.reshape(-1, 1))"
            if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1
            else "targets of the outputs' shape"
        )
        raise ValueError(
            f"{name}: the outputs have shape {tuple(outputs.shape)} but the targets {tuple(targets.shape)}; torch "
            f"would broadcast them to {_broadcast(outputs, targets)} and train on a wrong loss. Pass {fix}, or "
            "squeeze the model's output"
        )


def _broadcast(a: torch.Tensor, b: torch.Tensor) -> str:
    try:
        return str(tuple(torch.broadcast_shapes(a.shape, b.shape)))
    except RuntimeError:
        return "an error"


def _check_class_targets(loss_fn: Any, name: str, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.is_floating_point():
        if targets.shape == outputs.shape:
            return  # class probabilities (soft labels): CrossEntropyLoss accepts them
        raise TypeError(
            f"{name} got {describe(targets, 'items')} as targets: class labels must be integers (int64). Cast them: "
            "y.long() (NumPy: y.astype('int64')); for class probabilities, pass targets of the outputs' shape "
            f"{tuple(outputs.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.uint8):
        raise TypeError(
            f"{name} got {targets.dtype} class labels but needs int64 (torch.long): cast them with y.long() "
            "(NumPy: y.astype('int64')). Keras casts silently; fitkit says so to keep every batch free of casts"
        )
    if outputs.ndim >= 2 and targets.ndim == outputs.ndim and targets.shape[1] == 1 and outputs.shape[1] != 1:
        raise ValueError(
            f"{name}: the targets have shape {tuple(targets.shape)} but class labels must be {(outputs.shape[0],)} "
            f"for outputs {tuple(outputs.shape)}: squeeze them with y.squeeze(1) (NumPy: y.ravel())"
        )
    if targets.numel() == 0 or outputs.ndim < 1:
        return
    num_classes = outputs.shape[1] if outputs.ndim >= 2 else outputs.shape[0]
    ignore = getattr(loss_fn, "ignore_index", -100)
    valid = targets[targets != ignore]
    if valid.numel() == 0:
        return
    read = [valid.min(), valid.max()]
    if outputs.ndim == 2 and num_classes > 1:  # softmax outputs: rows of non-negative values summing to 1
        rows = outputs.detach().float()
        read.append(((rows >= 0).all() & ((rows.sum(dim=1) - 1).abs() <= 1e-4).all()).long())
    low, high, *probabilities = (int(v) for v in torch.stack(read).tolist())  # the one deliberate read
    if low < 0 or high >= num_classes:
        raise ValueError(_label_message(name, low if low < 0 else high, num_classes))
    if probabilities and probabilities[0]:
        raise ValueError(_probabilities_message(loss_fn, name, "look like probabilities (each row sums to 1)"))


def _probabilities_message(loss_fn: Any, name: str, seen: str) -> str:
    if isinstance(loss_fn, nn.NLLLoss) and not isinstance(loss_fn, nn.CrossEntropyLoss):
        return (
            f"the model's outputs {seen}, but {name} expects log-probabilities: end the model with "
            "nn.LogSoftmax(dim=1) instead, or drop the softmax and use loss='cross_entropy' on the logits"
        )
    return (
        f"the model's outputs {seen}, but {name} ('cross_entropy', 'categorical_crossentropy' and "
        "'sparse_categorical_crossentropy' alike) expects logits and applies log_softmax itself, unlike Keras's "
        "losses, which take probabilities by default: remove the final Softmax (predict probabilities with "
        "torch.softmax(trainer.predict(x), dim=1))"
    )


class UncountedStepProbe:
    """Finds what a custom ``train_step`` silently loses at its first batch: an ``optimizer.step()`` called
    directly, which fitkit does not count (``global_step`` stays put), and, under a mixed ``precision``, a
    forward outside ``self.autocast()`` (the precision is then off). A step post hook on each optimizer and
    a forward pre-hook on the model until the first batch's check, then none (nothing on later batches)."""

    def __init__(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        global_step: int,
        model: nn.Module | None = None,
        precision: str = "32",
        device_type: str = "cpu",
    ) -> None:
        self.fired, self.start = 0, global_step
        self.handles = [optimizer.register_step_post_hook(self._fired) for optimizer in optimizers.values()]
        self.precision, self.device_type = precision, device_type
        self.autocast_seen: list[bool] = []  # at each forward of the model: was autocast on?
        if model is not None and precision != "32":
            self.handles.append(model.register_forward_pre_hook(self._forward))

    def _fired(self, *args: Any) -> None:
        self.fired += 1

    def _forward(self, *args: Any) -> None:
        try:
            on = torch.is_autocast_enabled(self.device_type)
        except TypeError:  # torch < 2.4: no device argument
            on = torch.is_autocast_cpu_enabled() if self.device_type == "cpu" else torch.is_autocast_enabled()
        self.autocast_seen.append(on)

    def check(self, global_step: int, step_features: dict[str, Any]) -> None:
        """After a batch: refuses the features that count steps, else warns (once: the hooks are removed)."""
        for handle in self.handles:
            handle.remove()
        if self.autocast_seen and not any(self.autocast_seen):
            warnings.warn(
                f"precision={self.precision!r} is off in this Trainer's train_step: it calls the model outside "
                "self.autocast(), so the model runs in float32; wrap the forward and the loss in "
                "`with self.autocast():`",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
        if not self.fired or global_step != self.start:
            return
        fix = (
            "call self.optimizer_step() instead of self.optimizer.step() (it unscales, clips, steps, zeroes the "
            "gradients and counts the step)"
        )
        used = [name for name, value in step_features.items() if value is not None]
        if used:
            raise ValueError(
                f"{used[0]}= counts optimizer steps (global_step), but this Trainer's train_step calls "
                f"optimizer.step() itself, which fitkit does not count (global_step stays {global_step}), so "
                f"{used[0]} would never be reached: {fix}"
            )
        warnings.warn(
            f"this Trainer's train_step calls optimizer.step() itself, which fitkit does not count: global_step "
            f"stays {global_step}, so step-based LR schedules, ModelCheckpoint's {{step}} and the loggers' step "
            f"axis do not move; {fix}",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )


#: Losses of continuous targets: no classes to count, so no accuracy.
REGRESSION_LOSSES = (nn.MSELoss, nn.L1Loss, nn.HuberLoss, nn.SmoothL1Loss)


def unweighted_loss_message(given: str) -> str:
    """``loss=None`` (the model returns its loss) with weights that fitkit could not apply."""
    return (
        f"loss=None: the model computes its own loss, which fitkit cannot weight per sample, so {given} would be "
        f"silently ignored: weigh the samples inside the model (pass the weights as an input), or give the "
        f"Trainer a loss= (or override Trainer.compute_loss) to use {given}"
    )


def check_weights_fit_loss(loss_fn: Any, class_weight: Any, sample_weight: Any) -> None:
    """``fit(class_weight=, sample_weight=)`` against the loss, before training: a model that returns its
    own loss cannot be weighted, and a regression loss has no classes to weigh."""
    if loss_fn is None:
        for given, value in (("class_weight", class_weight), ("sample_weight", sample_weight)):
            if value is not None:
                raise ValueError(unweighted_loss_message(given))
    elif class_weight is not None and isinstance(loss_fn, REGRESSION_LOSSES):
        raise ValueError(
            f"class_weight weighs each sample by its class, and {_loss_name(loss_fn)} is a regression loss with no "
            "classes (its float targets would be truncated to class indices): pass sample_weight= (one weight per "
            "sample) instead"
        )


def check_closure_optimizers(optimizers: dict[str, Any], closure_optimizers: list[str], default_step: bool) -> None:
    """The default ``train_step`` steps a closure optimizer (LBFGS) alone: with others, they would never step."""
    if not closure_optimizers or len(optimizers) == 1 or not default_step:
        return
    name = closure_optimizers[0]
    others = ", ".join(repr(other) for other in optimizers if other != name)
    raise ValueError(
        f"{type(optimizers[name]).__name__} ({name!r}) re-evaluates the loss through a closure, and the default "
        f"train_step steps it alone: {others} would never step. Write train_step yourself: "
        f"self.optimizer_step({name!r}, closure=...) for it and self.optimizer_step(name) for the others"
    )


def check_validation_keys(sets: list[str | None], names: list[str]) -> None:
    """The epoch-log keys of every validation set (``val_<set>_<name>``) are distinct from each other and from
    the training keys: two sources of one key would overwrite each other silently."""

    def what(name: str) -> str:
        return "the loss" if name == "loss" else f"the metric {name!r}"

    seen = {name: f"{what(name)} of training" for name in names}
    for set_name in sets:
        prefix = "val_" if set_name is None else f"val_{set_name}_"
        where = "validation" if set_name is None else f"the validation set {set_name!r}"
        for name in names:
            key, source = prefix + name, f"{what(name)} of {where}"
            if key in seen:
                raise ValueError(
                    f"two values would be logged as {key!r}: {seen[key]} and {source}, one silently overwriting "
                    "the other; rename the validation set (fit(val_data={...}) keys) or the metric (name=)"
                )
            seen[key] = source


def check_sample_weight(weights: torch.Tensor, n: int, name: str) -> None:
    """In-memory ``sample_weight``: one finite weight >= 0 per sample, not all 0 (one read, before training)."""
    if weights.ndim not in (1, 2) or weights.shape[0] != n or (weights.ndim == 2 and weights.shape[1] != 1):
        raise ValueError(
            f"{name}: sample_weight must hold one weight per sample, shape ({n},), got {tuple(weights.shape)}"
        )
    if not weights.is_floating_point() and weights.dtype == torch.bool:
        raise TypeError(f"{name}: sample_weight must be numbers, got {weights.dtype}")
    values = weights.detach().double()
    finite, low, total = torch.stack([torch.isfinite(values).all().double(), values.min(), values.sum()]).tolist()
    if not finite:
        raise ValueError(f"{name}: sample_weight must be finite numbers, and some are NaN or infinite")
    if low < 0:
        raise ValueError(f"{name}: sample_weight must be >= 0 (a weight scales a sample's loss), got {low:g}")
    if total == 0:
        raise ValueError(
            f"{name}: sample_weight is 0 for every sample: the loss would be 0 and nothing would train; "
            "give the samples that count a weight > 0"
        )


def _last_layer(model: nn.Module) -> nn.Module:
    """The layer that makes a Sequential model's outputs (its last, through nested Sequentials); else the
    model itself (the order of a custom module's layers says nothing about its forward)."""
    while isinstance(model, nn.Sequential) and len(model):
        model = model[-1]
    return model


def fit_metrics_to_loss(metrics: list[Any], loss_fn: Any, model: nn.Module) -> None:
    """Decides what ``"accuracy"`` means from the loss and the model's last layer, as Keras's ``compile``
    does: a threshold of 0.5 on probabilities (``BCELoss``, or a model ending in ``Sigmoid``), 0 on logits.
    Refuses, when the Trainer is built, an accuracy without an explicit threshold on a regression loss and a
    cross-entropy loss on a model that ends in ``Softmax`` (both silently wrong numbers)."""
    from fitkit.metrics import Accuracy

    last = _last_layer(model)
    if isinstance(loss_fn, CLASSIFICATION_LOSSES) and isinstance(last, nn.Softmax):
        name = _loss_name(loss_fn)
        raise ValueError(_probabilities_message(loss_fn, name, "are probabilities (the model ends in Softmax)"))
    probabilities = isinstance(loss_fn, nn.BCELoss) or loss_fn is torch.nn.functional.binary_cross_entropy
    if not isinstance(loss_fn, nn.BCEWithLogitsLoss) and isinstance(last, nn.Sigmoid):
        probabilities = True
    for metric in metrics:
        if not isinstance(metric, Accuracy) or metric.threshold is not None:
            continue
        if isinstance(loss_fn, REGRESSION_LOSSES):
            raise ValueError(
                f"metric {metric.name!r} (accuracy) with the loss {_loss_name(loss_fn)}: accuracy counts right "
                "classes, and a regression model has none (it would log a meaningless ~0.5). Use a regression "
                "metric: def mae(outputs, targets): return (outputs - targets).abs().mean(), then metrics=[mae]; "
                "or, for 0/1 targets fitted by least squares, say the cut: Accuracy(threshold=0.5)"
            )
        metric.threshold = 0.5 if probabilities else 0.0


def check_class_weight(class_weight: torch.Tensor, outputs: Any) -> None:
    """``fit(class_weight=...)`` against the first batch's outputs: a key past the model's classes would
    weigh no sample (a typo, or a 1-based class), so it is an error rather than silently ignored.
    ``class_weight`` is the weights by class index (its length: the largest key + 1)."""
    if not isinstance(outputs, torch.Tensor) or outputs.ndim < 1:
        return
    # (N, C) logits: C classes; (N,) or (N, 1) binary outputs: classes 0 and 1
    num_classes = outputs.shape[1] if outputs.ndim >= 2 and outputs.shape[1] > 1 else 2
    if class_weight.shape[0] > num_classes:
        raise ValueError(
            f"class_weight lists class {class_weight.shape[0] - 1}, but the model's outputs "
            f"{tuple(outputs.shape)} have {num_classes} classes: its keys are class indices in [0, {num_classes}) "
            "(0-based, as the labels)"
        )


def _label_message(name: str, label: int | None, num_classes: int | None) -> str:
    which = f"the label {label}" if label is not None else "a label"
    classes = f"{num_classes} classes" if num_classes is not None else "the model's number of classes"
    allowed = f"[0, {num_classes})" if num_classes is not None else "[0, num_classes)"
    return (
        f"{name}: {which} is outside {allowed}: the model outputs {classes}. Make the last layer output as many "
        "classes as the labels need (max label + 1), or remap the labels to 0..num_classes-1 (1-based labels: "
        "y - 1)"
    )


def explain_loss_error(exc: BaseException, loss_fn: Any, outputs: Any, targets: Any) -> Exception | None:
    """The fitkit error for a raw torch error the loss raised on a later batch, or None when it is not
    one fitkit recognises. Reads no tensor value when the device is CUDA (after a device-side assert the
    context is unusable)."""
    text = str(exc)
    name = _loss_name(loss_fn)
    if "device-side assert" in text:
        return RuntimeError(
            f"a CUDA device-side assert fired while computing {name}: most often a class label outside "
            "[0, num_classes) (the first batch's labels were checked; a later batch has one). "
            + _label_message(name, None, None)
            + ". Run on the CPU, or with CUDA_LAUNCH_BLOCKING=1, to see the batch"
        )
    if isinstance(exc, IndexError) and "out of bounds" in text and isinstance(outputs, torch.Tensor):
        num_classes = outputs.shape[1] if outputs.ndim >= 2 else None
        label = None
        if isinstance(targets, torch.Tensor) and targets.device.type == "cpu" and num_classes is not None:
            bad = targets[(targets < 0) | (targets >= num_classes)]
            ignore = getattr(loss_fn, "ignore_index", -100)
            bad = bad[bad != ignore]
            label = int(bad[0]) if bad.numel() else None
        return ValueError(_label_message(name, label, num_classes))
    try:
        check_loss_inputs(loss_fn, outputs, targets)
    except (TypeError, ValueError) as explained:
        return explained
    return None


def check_input_dtypes(inputs: Any, model: nn.Module, name: str = "the data") -> None:
    """Raises a ``TypeError`` when floating inputs and the model's floating parameters differ in dtype
    (float64 NumPy data for a float32 model, or the reverse); Keras would cast, fitkit says so (a cast on
    every batch would cost time the user did not ask for)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return
    for tensor in tensors(inputs):
        if tensor.is_floating_point() and tensor.dtype != param.dtype:
            data, model_dtype = str(tensor.dtype).replace("torch.", ""), str(param.dtype).replace("torch.", "")
            raise TypeError(
                f"{name}: the inputs are {data} but the model's parameters are {model_dtype}. Cast the data once "
                f"(x.to(torch.{model_dtype}); NumPy: x.astype('{model_dtype}')), or the model "
                f"(model.to(torch.{data})) before building the Trainer"
            )


def check_last_batch(model: nn.Module, loader: Any, steps_per_epoch: int | None) -> None:
    """Raises a ``ValueError`` when the model has ``BatchNorm1d`` layers and the training data's last
    batch holds a single sample (BatchNorm cannot compute batch statistics from one value per channel;
    torch would fail at the end of the first epoch)."""
    if not any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        return
    batch_size = getattr(loader, "batch_size", None)
    if not isinstance(batch_size, int) or batch_size < 2 or getattr(loader, "drop_last", False):
        return
    sampler = getattr(loader, "sampler", None)
    try:
        samples = len(sampler) if sampler is not None else int(loader.num_samples)
        batches = len(loader)
    except (TypeError, AttributeError):
        return
    if samples % batch_size != 1 or (steps_per_epoch is not None and steps_per_epoch < batches):
        return
    fix = (
        "DataLoader(..., drop_last=True)"
        if sampler is not None
        else "fit(..., drop_last=True) (or a batch_size that does not leave one sample)"
    )
    raise ValueError(
        f"the training data's last batch (batch {batches - 1} of each epoch) holds 1 sample ({samples} samples, "
        f"batch_size={batch_size}), and the model has BatchNorm1d layers, which need more than one value per "
        f"channel in training. Drop the short batch with {fix}, or change batch_size"
    )


def warn_non_finite_loss(epoch: int, batch: int | None) -> None:
    """The one report of a non-finite training loss in a fit (without TerminateOnNaN training goes on)."""
    where = f"epoch {epoch + 1}" + (f", batch {batch}" if batch is not None else "")
    warnings.warn(
        f"the training loss became non-finite (NaN or inf) in {where}; the weights are probably ruined from "
        "there on. Lower the learning rate, clip gradients (grad_clip_norm=1.0), check the data for NaN/inf, or "
        "add fitkit.callbacks.TerminateOnNaN() to stop at the first such batch. (Reported once per fit.)",
        FitkitWarning,
        stacklevel=user_stacklevel(),
    )


def weights_are_finite(model: torch.nn.Module) -> bool:
    """True when every parameter and floating buffer is finite (one host sync)."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def non_finite_weights(epoch: int, batch: int | None, loader: Any) -> FloatingPointError:
    """The error that ends a fit whose weights became non-finite (NaN inputs, a diverged run): nothing after it can
    train, and every checkpoint written before holds finite weights. Names the first non-finite value of the
    training tensors when they are in memory (a ``TensorDataset``, as ``fit((x, y))`` makes)."""
    where = f"epoch {epoch + 1}" + (f", batch {batch}" if batch is not None else "")
    found = first_non_finite_sample(loader)
    data = (
        f"The training data hold {found}: clean or impute those values (torch.nan_to_num, a mask) before fit"
        if found is not None
        else "Check the data for NaN/inf (a batch's inputs or targets), lower the learning rate or clip gradients"
    )
    return FloatingPointError(
        f"the weights became non-finite (NaN or inf) in {where}, where the training loss first was: training "
        f"cannot go on from them, so fit stops here. {data}. Checkpoints are never written with non-finite "
        "weights: fit(..., resume='auto') continues from the last good one. (fitkit.callbacks.TerminateOnNaN "
        "stops at the first such batch instead of the epoch's end.)"
    )


def first_non_finite_sample(loader: Any) -> str | None:
    """``"NaN at sample 100 of the inputs (position (2,)), ..."`` for the first non-finite value of in-memory
    training tensors (``fit((x, y))``'s, or a DataLoader's TensorDataset), one pass over them (called once, when
    a fit has already failed); None for other data."""
    from torch.utils.data import TensorDataset

    from fitkit.data import InMemoryLoader

    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, InMemoryLoader):
        tensors = loader.tensors
    elif isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
    else:
        return None
    for index, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            continue
        bad = (~torch.isfinite(tensor)).nonzero()
        if len(bad):
            position = tuple(int(i) for i in bad[0])
            value = tensor[position].item()
            kind = "NaN" if value != value else ("inf" if value > 0 else "-inf")
            part = "the inputs" if index == 0 else ("the targets" if index == 1 else f"tensor {index}")
            return f"{kind} at sample {position[0]} of {part} (position {position[1:]}), and {len(bad)} non-finite value(s) in all"
    return None


_MATMUL = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")
_CHANNELS = re.compile(
    r"weight of size \[(\d+), (\d+)[^\]]*\], expected input\[([\d, ]+)\] to have (\d+) channels, but got (\d+) channels"
)


def explain_forward_error(exc: BaseException, model: nn.Module, inputs: Any) -> Exception | None:
    """torch's shape error from a ``Linear`` or ``ConvNd`` of ``model``, in fitkit's words: which layer, what
    it takes, what it got, and whether the data (the model's first such layer) or the model is to fix. None
    for any other error (it is raised as it was)."""
    text = str(exc)
    kinds: tuple[type[nn.Module], ...]
    if (found := _MATMUL.search(text)) is not None:  # F.linear: (N x got) @ (takes x out)
        got, takes, out = int(found[2]), int(found[3]), int(found[4])
        kinds, size = (nn.Linear,), ("in_features", "out_features")
        what, unit = f"Linear(in_features={takes}, out_features={out})", "features"
    elif (found := _CHANNELS.search(text)) is not None:  # weight [out, in/groups, ...]
        out, takes, got = int(found[1]), int(found[4]), int(found[5])
        kinds, size = (nn.Conv1d, nn.Conv2d, nn.Conv3d), ("in_channels", "out_channels")
        what, unit = f"a convolution with in_channels={takes}, out_channels={out}", "channels"
    else:
        return None
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    matching = [(name, m) for name, m in layers if (getattr(m, size[0]), getattr(m, size[1])) == (takes, out)]
    if not matching:
        return None
    name, layer = matching[0]
    where = f"'{name}'" if name else "the model"
    first = next((m for m in model.modules() if next(m.children(), None) is None and _compat.own_parameters(m)), None)
    dim = -1 if unit == "features" else 1
    fed_by_data = isinstance(inputs, torch.Tensor) and inputs.ndim >= 2 and inputs.shape[dim] == got
    if layer is first and fed_by_data:
        shape = f" (shape {tuple(inputs.shape)})"
        who = f"the model's first layer {where}" if name else "the model"  # the model may be that one layer
        return ValueError(
            f"the inputs have {got} {unit}{shape}, but {who}, {what}, takes {takes}: "
            f"give it inputs with {takes} {unit} (check the data's columns or layout), or build that layer with "
            f"{size[0]}={got}"
        )
    return ValueError(
        f"the model's layer {where}, {what}, received {got} {unit}: the layers before it output {got}, not "
        f"{takes}. Build it with {size[0]}={got} (nn.LazyLinear / nn.LazyConv2d infer it)"
    )


def explain_dict_batch(exc: TypeError, model: nn.Module, inputs: dict[str, Any]) -> Exception | None:
    """The error for a dict batch the model's ``forward`` does not take as keyword arguments: what a dict batch
    means (the model's inputs, as Keras reads a dict ``x``) and how to give inputs and targets; None for another
    TypeError."""
    found = re.search(r"unexpected keyword argument '([^']+)'|missing \d+ required positional argument", str(exc))
    if found is None:
        return None
    name = type(model).__name__
    what = f"takes no {found[1]!r}" if found[1] else "needs other arguments"
    return TypeError(
        f"a dict batch is the model's inputs, passed as keyword arguments (as Keras reads a dict x), and "
        f"{name}.forward() {what}; this batch's keys are {sorted(inputs)}. If the dict holds the inputs and the "
        "targets, have the Dataset (or collate_fn) return (inputs, targets) instead, e.g. (batch['x'], batch['y']); "
        f"or name forward()'s parameters after the keys. ({exc})"
    )


__all__ = [
    "CLASSIFICATION_LOSSES",
    "ELEMENTWISE_LOSSES",
    "REGRESSION_LOSSES",
    "UncountedStepProbe",
    "check_closure_optimizers",
    "check_sample_weight",
    "check_validation_keys",
    "check_weights_fit_loss",
    "unweighted_loss_message",
    "fit_metrics_to_loss",
    "check_loss_inputs",
    "check_class_weight",
    "explain_loss_error",
    "check_input_dtypes",
    "check_last_batch",
    "warn_non_finite_loss",
    "explain_forward_error",
    "explain_dict_batch",
]
