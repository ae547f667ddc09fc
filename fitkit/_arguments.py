"""Turning the Trainer's and fit's arguments into checked values, with errors that say how to fix them.

Each ``resolve_*`` takes what a user passed (a name, an object) and returns what the loop uses; each
``check_*`` raises a ``ValueError``/``TypeError`` that names what was received, what is allowed and the fix.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.callbacks._files import check_file_collisions
from fitkit.callbacks.base import Callback, check_hook_names

if TYPE_CHECKING:
    from fitkit.metrics import Metric

PRECISIONS = {
    "32": "32",
    32: "32",
    "fp32": "32",
    "32-true": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
    "fp16": "fp16",
    "16": "fp16",
    16: "fp16",
    "16-mixed": "fp16",
}

LOSSES: dict[str, Callable[[], Callable[..., torch.Tensor]]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "categorical_crossentropy": nn.CrossEntropyLoss,
    "sparse_categorical_crossentropy": nn.CrossEntropyLoss,
    "nll": nn.NLLLoss,
    "mse": nn.MSELoss,
    "mean_squared_error": nn.MSELoss,
    "mae": nn.L1Loss,
    "l1": nn.L1Loss,
    "mean_absolute_error": nn.L1Loss,
    "huber": nn.HuberLoss,
    "smooth_l1": nn.SmoothL1Loss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
    "binary_crossentropy_with_logits": nn.BCEWithLogitsLoss,
}

# Keras's default learning rates for the same optimizers.
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], float]] = {
    "adam": (torch.optim.Adam, 1e-3),
    "adamw": (torch.optim.AdamW, 1e-3),
    "sgd": (torch.optim.SGD, 1e-2),
    "rmsprop": (torch.optim.RMSprop, 1e-3),
    "adagrad": (torch.optim.Adagrad, 1e-3),
}
#: The named optimizers built with ``fused=True`` when every parameter is on a CUDA device (torch's fused
#: Adagrad is CPU-only and RMSprop has none).
FUSED_ON_CUDA = frozenset({"adam", "adamw", "sgd"})


def resolve_precision(precision: str | int, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}: use '32' (float32), 'bf16' (bfloat16 autocast) or "
            "'fp16' (float16 autocast with a GradScaler)"
        )
    resolved = PRECISIONS[precision]
    if resolved == "fp16" and device.type == "cpu":
        raise ValueError(
            "precision='fp16' needs a CUDA or MPS device: float16 autocast with a GradScaler is "
            "not supported for training on the CPU. Use precision='bf16' on the CPU."
        )
    if resolved == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bfloat16 support; use precision='fp16'"
        )
    return resolved


# -- scalar arguments: one family, one wording --------------------------------------------------------
def _means(meaning: str) -> str:
    return f" ({meaning})" if meaning else ""


def _is_int_from(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_int(value: Any, name: str, minimum: int, meaning: str = "") -> int:
    """``value`` when it is an int >= ``minimum`` (a bool is not); else a ``ValueError`` that says so.

    Args:
        value: what the user passed.
        name: the argument's name, as the message shows it.
        minimum: the smallest int allowed.
        meaning: what the number counts, shown in the message ("optimizer steps between updates"); "" for none.
    """
    if not _is_int_from(value, minimum):
        raise ValueError(f"{name} must be an int >= {minimum}{_means(meaning)}, got {value!r}")
    return value


def check_optional_int(value: Any, name: str, meaning: str = "", minimum: int = 1, none_means: str = "") -> int | None:
    """`check_int` that also takes None (returned as it is), with ``minimum`` 1 unless told.

    Args:
        value: what the user passed.
        name: the argument's name, as the message shows it.
        meaning: what the number counts, shown in the message; "" for none.
        minimum: the smallest int allowed.
        none_means: what None stands for, shown in the message ("epoch logs only"); "" for none.
    """
    if value is not None and not _is_int_from(value, minimum):
        raise ValueError(
            f"{name} must be None{_means(none_means)} or an int >= {minimum}{_means(meaning)}, got {value!r}"
        )
    return value


def check_positive_number(value: Any, name: str, meaning: str = "") -> float:
    """``value`` as a float when it is a finite int or float > 0 (a bool is not); else a ``ValueError``.

    Args:
        value: what the user passed.
        name: the argument's name, as the message shows it.
        meaning: what the number is, shown in the message ("the first step's learning rate"); "" for none.
    """
    if not _is_positive_number(value):
        raise ValueError(f"{name} must be a positive number{_means(meaning)}, got {value!r}")
    return float(value)


def positive_or_none(value: float | None, name: str) -> float | None:
    """`check_positive_number` that also takes None (an option that is off)."""
    if value is None:
        return None
    if not _is_positive_number(value):
        raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
    return float(value)


def resolve_optimizer(optimizer: torch.optim.Optimizer | str, model: nn.Module) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; names: {sorted(OPTIMIZERS)}, or pass a "
                "torch.optim.Optimizer over model.parameters()"
            )
        cls, lr = OPTIMIZERS[key]
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad=True) to optimize")
        if key in FUSED_ON_CUDA and all(p.is_cuda and p.is_floating_point() for p in params):
            # One kernel per step instead of one per parameter, and fp16's GradScaler then hands the
            # inf check to the optimizer instead of reading it on the host every step.
            return cls(params, lr=lr, fused=True)
        return cls(params, lr=lr)
    hint = f"; build one: optimizer={optimizer.__name__}(model.parameters())" if isinstance(optimizer, type) else ""
    raise TypeError(
        f"optimizer must be a torch.optim.Optimizer, a name or a dict of named optimizers, got {_kind(optimizer)}{hint}"
    )


def resolve_optimizers(
    optimizer: torch.optim.Optimizer | str | Mapping[str, torch.optim.Optimizer], model: nn.Module
) -> dict[str, torch.optim.Optimizer]:
    """The trainer's optimizers by name: ``{"optimizer": ...}`` for one, the user's names for a dict."""
    if isinstance(optimizer, Mapping):
        if not optimizer:
            raise ValueError("optimizer is an empty dict; pass one optimizer or a dict of named optimizers")
        resolved = {}
        for name, opt in optimizer.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(
                    f"optimizer names must be identifiers (they name log keys such as lr_<name>), got {name!r}"
                )
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizer[{name!r}] must be a torch.optim.Optimizer instance, got {_kind(opt)}; build "
                    f"each one over its model's parameters, e.g. torch.optim.Adam(netG.parameters())"
                )
            resolved[name] = opt
        return resolved
    return {"optimizer": resolve_optimizer(optimizer, model)}


def _kind(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__name__} (not an instance)"
    return type(obj).__name__


def check_optimizers_hold_model(
    optimizers: Mapping[str, torch.optim.Optimizer], model: nn.Module, loss: Any = None
) -> None:
    """Every optimizer holds parameters of the model (or of a learnable loss module), no parameter is in
    two optimizers, and a trainable parameter that no optimizer holds is reported."""
    owned = {id(p) for p in model.parameters()}
    if isinstance(loss, nn.Module):
        owned |= {id(p) for p in loss.parameters()}
    seen: dict[int, str] = {}
    several = len(optimizers) > 1
    for name, optimizer in optimizers.items():
        which = f"optimizer {name!r}" if several else "the optimizer"
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not held & owned:
            raise ValueError(
                f"{which} holds none of the model's parameters: it was probably built for another "
                "model instance. Build it with the model you pass: torch.optim.Adam(model.parameters())"
            )
        strangers = held - owned
        if strangers:
            raise ValueError(
                f"{which} holds {len(strangers)} parameter(s) that are not in the model"
                f"{' or the loss module' if isinstance(loss, nn.Module) else ''}; build it with this model's "
                "parameters"
            )
        for pid in held:
            if pid in seen:
                raise ValueError(
                    f"a parameter is held by both optimizer {seen[pid]!r} and optimizer {name!r}: each parameter "
                    "must belong to one optimizer (it would be updated twice per step)"
                )
            seen[pid] = name
    named = list(model.named_parameters())
    if isinstance(loss, nn.Module):
        named += [(f"loss.{n}", p) for n, p in loss.named_parameters()]
    missing = [n for n, p in named if p.requires_grad and id(p) not in seen]
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameter(s) are in no optimizer and will not be updated "
            f"(first: {missing[:3]}); set requires_grad=False on them if that is intended",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer whose ``step`` requires a closure that re-evaluates the loss (LBFGS)."""
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def resolve_loss(loss: Callable[[Any, Any], torch.Tensor] | str | None) -> Callable[[Any, Any], torch.Tensor] | None:
    """A loss callable from a name or a callable; None when the model computes its own loss."""
    if loss is None:
        return None
    if isinstance(loss, type):
        raise TypeError(
            f"loss is the class {loss.__name__}, not an instance; pass loss={loss.__name__}() (or a name such "
            "as 'cross_entropy')"
        )
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(
                f"unknown loss {loss!r}; names: {sorted(LOSSES)}, or pass a callable "
                "(outputs, targets) -> scalar tensor"
            )
        return LOSSES[loss]()
    if getattr(loss, "reduction", None) == "sum":
        warnings.warn(
            f"the loss {type(loss).__name__}(reduction='sum') returns a per-batch sum: the logged loss (a mean "
            "over samples of the batch losses) is then batch-size times a per-sample value. Use "
            "reduction='mean' for a per-sample loss, or override Trainer.compute_loss to scale it yourself",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )
    if not callable(loss):
        raise TypeError(
            f"loss must be a callable (outputs, targets) -> scalar tensor or a name, got {type(loss).__name__}"
        )
    return loss


def check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the loss must return a tensor, got {type(loss).__name__}")
    if loss.ndim != 0:
        raise ValueError(
            f"the loss must be a scalar (0-dim) tensor, got shape {tuple(loss.shape)}; use a mean- "
            "or sum-reduced loss (e.g. reduction='mean'), or reduce it in your loss function"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not require grad: no model parameter took part in computing it (a "
            "detached output, or a model with all parameters frozen?)"
        )


def check_step_logs(step_logs: Any, step: str = "train_step") -> None:
    """A step's return value: a dict of 0-dim tensors (any keys; the default steps return ``"loss"``)."""
    if not isinstance(step_logs, dict):
        raise TypeError(
            f"{step} must return a dict of 0-dim tensors (e.g. {{'loss': loss.detach()}}), got "
            f"{type(step_logs).__name__}"
        )
    for key, value in step_logs.items():
        if not isinstance(key, str):
            raise TypeError(f"{step} returned a dict with the key {key!r}; log keys must be strings")
        if isinstance(value, torch.Tensor) and value.ndim != 0:
            raise ValueError(
                f"{step} returned {key!r} with shape {tuple(value.shape)}; every logged value must be a 0-dim "
                f"tensor (reduce it, e.g. {key}.mean(), or return it from the step under another name as a scalar)"
            )


def validation_schedule(validation_freq: int | Sequence[int]) -> Callable[[int], bool]:
    if isinstance(validation_freq, int) and not isinstance(validation_freq, bool):
        if validation_freq < 1:
            raise ValueError(
                f"validation_freq must be an int >= 1 or a list of 1-based epochs, got {validation_freq!r}"
            )
        return lambda epoch: (epoch + 1) % validation_freq == 0
    if isinstance(validation_freq, (list, tuple, set)) and all(
        isinstance(e, int) and not isinstance(e, bool) for e in validation_freq
    ):
        if validation_freq and min(validation_freq) < 1:
            raise ValueError(
                f"validation_freq={validation_freq!r}: a list names the epochs to validate after, counted from "
                f"1 as in Keras, so the first is 1 (got {min(validation_freq)}); e.g. validation_freq=[1, 2] validates after the first "
                "two epochs. For no epoch-level validation pass validation_freq=None with validate_every_n_steps"
            )
        epochs = set(validation_freq)
        return lambda epoch: epoch + 1 in epochs
    raise ValueError(f"validation_freq must be an int >= 1 or a list of 1-based epochs, got {validation_freq!r}")


def check_accumulate_grad_batches(value: Any) -> tuple[int, dict[int, int]]:
    """The group size of epoch 0 and the schedule by epoch, ``{first epoch: batches per step}`` sorted by epoch
    (empty for an int), from an int >= 1 or such a mapping (before its first epoch: 1)."""
    if not isinstance(value, Mapping):
        return check_int(value, "accumulate_grad_batches", 1, "batches per optimizer step, or a schedule by epoch"), {}
    if not value or not all(_is_int_from(epoch, 0) and _is_int_from(k, 1) for epoch, k in value.items()):
        raise ValueError(
            "accumulate_grad_batches as a schedule must map first epochs (ints >= 0) to batches per optimizer "
            f"step (ints >= 1), such as {{0: 8, 4: 4}}, got {value!r}"
        )
    schedule = dict(sorted(value.items()))
    return schedule.get(0, 1), schedule


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (hasattr(value, "__array__") and hasattr(value, "shape"))


def keras_fit_data(train_data: Any, val_data: Any, y: Any, validation_data: Any) -> tuple[Any, Any]:
    """``fit``'s training and validation data from Keras's keywords: ``fit(x, y=y)`` is ``fit((x, y))``,
    ``validation_data`` is ``val_data``; Keras's positional ``fit(x, y)``, which fitkit would read as
    ``fit(train_data, val_data)``, is a ``TypeError`` that shows both forms."""
    if validation_data is not None:
        if val_data is not None:
            raise TypeError(
                "fit() got both val_data and validation_data (Keras's name): they are the same argument; pass one"
            )
        val_data = validation_data
    elif _is_array(train_data) and _is_array(val_data) and tuple(val_data.shape[1:]) != tuple(train_data.shape[1:]):
        raise TypeError(  # inputs to validate on have x's per-sample shape; these do not: Keras's y
            "fit(x, y) with arrays: fitkit reads the second argument as validation data, fit(train_data, "
            "val_data), and this one is not shaped like x's samples (its targets?). Pass the training data as one "
            "tuple, fit((x, y), epochs=...), or y by keyword as in Keras, fit(x, y=y, epochs=...)"
        )
    if y is None:
        return train_data, val_data
    if not _is_array(train_data):
        raise TypeError(
            f"fit(x, y=...) takes x as an array or tensor (Keras's form), got {type(train_data).__name__}; a "
            "DataLoader or a tuple already holds its targets: leave y out"
        )
    return (train_data, y), val_data


@contextlib.contextmanager
def for_this_call(trainer: Any, callbacks: Sequence[Any] | None, verbose: Any) -> Iterator[None]:
    """``fit(callbacks=..., verbose=...)`` as in Keras: the callbacks are added after the trainer's (checked as
    the Trainer checks its own) and the verbosity replaces the trainer's, for this call only."""
    kept = trainer.callbacks, trainer.verbose
    if callbacks is not None:
        trainer.callbacks = check_callbacks([*trainer.callbacks, *check_callbacks(callbacks)])
    if verbose is not None:
        trainer.verbose = check_verbose(verbose)
    try:
        yield
    finally:
        trainer.callbacks, trainer.verbose = kept


def resumed_line(path: Any, state: Any, planned: int | None) -> str:
    """The line a resumed fit prints: the file, and the epoch (1-based), batch and global step it continues at."""
    epoch = f"epoch {state.epoch + 1}" + (f" of {planned}" if planned else "")
    batch = f", after batch {state.batch_in_epoch} of the epoch" if state.batch_in_epoch else ""
    return f"Resumed from {path}: {epoch}, global step {state.global_step}{batch}"


def check_verbose(verbose: Any) -> int:
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0 (silent), 1 (progress bar) or 2 (one line per epoch), got {verbose!r}")
    return int(verbose)


def check_debug_sync(debug_sync: Any) -> bool | str:
    if debug_sync not in (False, True, "warn", "error"):
        raise ValueError(
            "debug_sync must be False (off), True or 'warn' (torch warns at every host-device "
            "synchronisation in the batch loop on CUDA) or 'error' (raises there instead), got "
            f"{debug_sync!r}"
        )
    return debug_sync


def check_callbacks(callbacks: Sequence[Any] | None) -> list[Callback]:
    """The callbacks as a list, each a [Callback][fitkit.callbacks.Callback] with valid hook names."""
    if isinstance(callbacks, Callback):
        raise TypeError(
            f"callbacks must be a list of callbacks, got a single {type(callbacks).__name__}; "
            f"wrap it in a list: callbacks=[{type(callbacks).__name__}(...)]"
        )
    if isinstance(callbacks, type):
        raise TypeError(
            f"callbacks must be a list of callback instances, got the class {callbacks.__name__}; "
            f"pass callbacks=[{callbacks.__name__}(...)]"
        )
    checked: list[Callback] = []
    for callback in callbacks or []:
        if isinstance(callback, type) and issubclass(callback, Callback):
            raise TypeError(
                f"callbacks holds the class {callback.__name__}, not an instance; pass {callback.__name__}(...)"
            )
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks must be fitkit.Callback instances, got {type(callback).__name__}; "
                "subclass fitkit.Callback or use fitkit.callbacks.LambdaCallback"
            )
        check_hook_names(callback)
        checked.append(callback)
    check_file_collisions(checked)  # two callbacks writing the same file: refused before anything runs
    return checked


def check_metric_names(metrics: list[Metric], loss: Any = None, model: nn.Module | None = None) -> list[Metric]:
    """Unique names other than ``loss``; given the Trainer's loss and model, what ``"accuracy"`` means
    (``_checks.fit_metrics_to_loss``)."""
    names = [m.name for m in metrics]
    if len(set(names)) != len(names) or "loss" in names:
        raise ValueError(f"metric names must be unique and not 'loss', got {names}; pass name= to tell them apart")
    if model is not None:
        from fitkit._checks import fit_metrics_to_loss

        fit_metrics_to_loss(metrics, loss, model)
    return metrics


def check_step_setup(
    optimizers: Mapping[str, torch.optim.Optimizer],
    closure_optimizers: Sequence[str],
    precision: str,
    accumulate_grad_batches: int,
) -> None:
    """Combinations of optimizers and step features that cannot work, refused when the Trainer is built."""
    if closure_optimizers:
        name = closure_optimizers[0]
        kind = type(optimizers[name]).__name__
        if precision == "fp16":
            raise ValueError(
                f"{kind} re-evaluates the loss through a closure, which GradScaler cannot scale: "
                "precision='fp16' does not work with it; use precision='32' or 'bf16'"
            )
        if accumulate_grad_batches > 1:
            raise ValueError(
                f"{kind} re-evaluates the loss of one batch through a closure: accumulate_grad_batches > 1 does "
                "not work with it; use accumulate_grad_batches=1 (a larger batch, if you need one)"
            )
    if len(optimizers) > 1 and accumulate_grad_batches > 1:
        raise ValueError(
            f"accumulate_grad_batches={accumulate_grad_batches} with several optimizers ({', '.join(optimizers)}) is "
            "not supported: each optimizer's gradients come from its own backward calls in your train_step; "
            "accumulate there (call optimizer_step every k batches) or use larger batches"
        )


def per_sample_loss(loss: Any) -> Callable[..., torch.Tensor]:
    """``loss`` returning one value per sample (a copy with ``reduction="none"``), for sample weights."""
    if getattr(loss, "reduction", None) in ("mean", "sum", "none"):
        unreduced = copy.copy(loss)
        unreduced.reduction = "none"
        return unreduced
    raise TypeError(
        f"sample weights need a loss that can return per-sample values, and {type(loss).__name__} has no "
        "reduction= argument: use a named loss or a torch loss (reduction='mean'), or override "
        "Trainer.compute_loss(inputs, targets, outputs, sample_weight) to weight it yourself"
    )


def class_weight_tensor(class_weight: Mapping[int, float] | None, device: torch.device) -> torch.Tensor | None:
    """``fit(class_weight=...)`` as a tensor indexed by class (weight 1.0 for classes not listed)."""
    if class_weight is None:
        return None
    if not isinstance(class_weight, Mapping) or not class_weight:
        raise TypeError(f"class_weight must be a non-empty dict {{class_index: weight}}, got {class_weight!r}")
    bad = [k for k in class_weight if not isinstance(k, int) or isinstance(k, bool) or k < 0]
    if bad:
        raise ValueError(f"class_weight keys must be class indices (ints >= 0), got {bad}")
    weights = torch.ones(max(class_weight) + 1, dtype=torch.float32)
    for index, weight in class_weight.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"class_weight[{index}] must be a finite number >= 0, got {weight!r}")
        weights[index] = float(weight)
    return weights.to(device)


_TRUE_WORDS = ("true", "yes", "y", "on", "1")
_FALSE_WORDS = ("false", "no", "n", "off", "0", "")


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: True/False (or NumPy's bools, or the ints 0 and 1); anything else, a string such
    as ``"False"`` above all (which Python reads as true), is a ``TypeError`` that names the fix."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ == "bool":  # np.bool_ from a config array
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    hint = ""
    if isinstance(value, str):
        word = value.strip().lower()
        meant = True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else None
        hint = (
            f" (a string: Python reads every non-empty string as true, so {value!r} would not mean what it says); "
            + (f"pass {name}={meant}" if meant is not None else "pass True or False")
            + ", e.g. parse a command-line flag with argparse's action='store_true'"
        )
    raise TypeError(f"{name} must be True or False, got {value!r}{hint}")


def check_flags(**flags: Any) -> None:
    """`check_bool` for each keyword argument (named as given)."""
    for name, value in flags.items():
        check_bool(value, name)


def metric_list(metrics: Any, name: str = "metrics") -> list[Any]:
    """``metrics`` as a list: None is empty, and a single metric (a name such as ``"accuracy"``, a
    ``Metric`` object, a function) is a list of one. Keras 3 raises for a bare string; fitkit takes it,
    since it can mean one thing only, where iterating it would read ``"a"``, ``"c"``, ... as metric names.
    A dict (Keras's per-output metrics) and a class are errors that name the fix."""
    if metrics is None:
        return []
    if isinstance(metrics, Mapping):
        raise TypeError(
            f"{name} is a dict ({sorted(map(str, metrics))}): fitkit has no per-output metrics (Keras's dict "
            f"form). Pass a list, {name}=['accuracy', ...]; to name a metric, pass a fitkit.metrics.Metric with "
            "name=, or compute per-output values in an overridden train_step/eval_step"
        )
    if isinstance(metrics, type):
        raise TypeError(f"{name} is the class {metrics.__name__}, not an instance; pass {name}=[{metrics.__name__}()]")
    if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)):
        return [metrics]  # one metric: "accuracy", a Metric, a torchmetrics metric or a function
    for metric in metrics:
        if isinstance(metric, type):
            raise TypeError(
                f"{name} holds the class {metric.__name__}, not an instance; pass {metric.__name__}() (a metric "
                "object, a name such as 'accuracy', or a function (outputs, targets) -> 0-dim tensor)"
            )
    return list(metrics)


def check_resume(resume: Any) -> str | Any | None:
    """``fit(resume=...)``: None (or False) starts fresh, ``"auto"`` or a path resumes, ``"restart"`` starts over
    (deleting the checkpoints fitkit vouched for); True and other types are a ``TypeError`` that names the forms."""
    if resume is None or resume is False:
        return None
    if isinstance(resume, str) and not resume.strip():
        raise ValueError("resume='' names no checkpoint: pass None to start fresh, 'auto' or a checkpoint path")
    if resume is True:
        raise TypeError(
            "resume=True is ambiguous: pass resume='auto' to continue from the newest good checkpoint of the "
            "trainer's checkpoint callbacks, or resume='path/to/checkpoint.pt' for a given file"
        )
    if not isinstance(resume, (str, bytes)) and not hasattr(resume, "__fspath__"):
        raise TypeError(
            "resume must be None, 'auto', 'restart' or a checkpoint path (str or pathlib.Path), got "
            f"{type(resume).__name__} {resume!r}"
        )
    return resume


def warn_unreachable_validation_epochs(validation_freq: Any, epochs: int | None) -> None:
    """A list ``validation_freq`` naming epochs beyond ``epochs`` would silently never validate there."""
    if epochs is None or not isinstance(validation_freq, (list, tuple, set)):
        return
    beyond = sorted(e for e in validation_freq if e > epochs)
    if beyond:
        warnings.warn(
            f"validation_freq lists the 1-based epoch(s) {beyond}, but this fit stops after epoch {epochs}: they "
            f"are never validated. Pass epochs={max(beyond)} or drop them from validation_freq",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )


def warn_unreachable_step_validation(every: int | None, last_step: int) -> None:
    """``validate_every_n_steps`` larger than the run's last optimizer step would silently never validate."""
    if every is not None and every > last_step:
        warnings.warn(
            f"validate_every_n_steps={every} is beyond this run's last step ({last_step}): step-level validation never "
            f"runs. Pass validate_every_n_steps <= {last_step}, or train longer (epochs=, max_steps=)",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )


def check_compute_loss_takes_weights(trainer: Any, class_weight: Any, sample_weight: Any) -> None:
    """Weights given to ``fit`` reach ``compute_loss`` as its fourth argument: an override written without one is a
    TypeError now, before training, instead of Python's "takes 4 positional arguments but 5 were given" at the
    first batch."""
    if class_weight is None and sample_weight is None:
        return
    try:
        inspect.signature(trainer.compute_loss).bind(None, None, None, None)
    except TypeError:
        given = "sample_weight" if sample_weight is not None else "class_weight"
        raise TypeError(
            f"fit({given}=...) gives weights, and {type(trainer).__name__}.compute_loss() takes no sample_weight: "
            "add a parameter, compute_loss(self, inputs, targets, outputs, sample_weight=None), and apply the "
            f"weights there (None when a batch has none), or leave {given} out"
        ) from None
    except ValueError:  # no signature to read (a builtin): let the call decide
        return


def check_path(path: Any, name: str) -> None:
    """A file path argument: a non-empty str or ``os.PathLike``; anything else is a ``TypeError``."""
    if isinstance(path, bool) or not (isinstance(path, str) or hasattr(path, "__fspath__")) or not str(path).strip():
        raise TypeError(f"{name} needs a file path (str or pathlib.Path) such as 'ckpt/last.pt', got {path!r}")


__all__ = [
    "PRECISIONS",
    "LOSSES",
    "OPTIMIZERS",
    "FUSED_ON_CUDA",
    "resolve_precision",
    "check_int",
    "check_optional_int",
    "check_positive_number",
    "positive_or_none",
    "resolve_optimizer",
    "resolve_optimizers",
    "check_optimizers_hold_model",
    "needs_closure",
    "resolve_loss",
    "check_loss",
    "check_step_logs",
    "validation_schedule",
    "check_accumulate_grad_batches",
    "check_verbose",
    "check_debug_sync",
    "check_callbacks",
    "check_metric_names",
    "check_step_setup",
    "per_sample_loss",
    "class_weight_tensor",
    "check_bool",
    "check_flags",
    "metric_list",
    "check_resume",
    "warn_unreachable_validation_epochs",
    "check_path",
]
