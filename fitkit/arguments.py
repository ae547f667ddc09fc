"""Turning the Trainer's and fit's arguments into checked values, with errors that say how to fix them.

Each ``resolve_*`` takes what a user passed (a name, an object) and returns what the loop uses; each
``check_*`` raises a ``ValueError``/``TypeError`` that names what was received, what is allowed and the fix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fitkit.callbacks.base import Callback, check_hook_names
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


def positive_or_none(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
    return float(value)


def check_int(value: Any, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
        return cls(params, lr=lr)
    raise TypeError(f"optimizer must be a torch.optim.Optimizer or a name, got {type(optimizer).__name__}")


def check_optimizer_holds_model(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    model_params = {id(p) for p in model.parameters()}
    if not held & model_params:
        raise ValueError(
            "the optimizer holds none of the model's parameters: it was probably built for another "
            "model instance. Build it with the model you pass: torch.optim.Adam(model.parameters())"
        )
    strangers = held - model_params
    if strangers:
        raise ValueError(
            f"the optimizer holds {len(strangers)} parameter(s) that are not in the model; build it "
            "with this model's parameters"
        )
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameter(s) are not in the optimizer and will not be updated "
            f"(first: {missing[:3]}); set requires_grad=False on them if that is intended",
            stacklevel=3,
        )


def resolve_loss(loss: Callable[[Any, Any], torch.Tensor] | str) -> Callable[[Any, Any], torch.Tensor]:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(
                f"unknown loss {loss!r}; names: {sorted(LOSSES)}, or pass a callable "
                "(outputs, targets) -> scalar tensor"
            )
        return LOSSES[loss]()
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


def check_step_logs(step_logs: Any) -> None:
    if not isinstance(step_logs, dict) or "loss" not in step_logs:
        raise TypeError(
            f"train_step/eval_step must return a dict of 0-dim tensors holding 'loss', got "
            f"{type(step_logs).__name__}{'' if not isinstance(step_logs, dict) else sorted(step_logs)}"
        )


def validation_schedule(validation_freq: int | Sequence[int]) -> Callable[[int], bool]:
    if isinstance(validation_freq, int) and not isinstance(validation_freq, bool):
        if validation_freq < 1:
            raise ValueError(
                f"validation_freq must be an int >= 1 or a list of 1-based epochs, got {validation_freq!r}"
            )
        return lambda epoch: (epoch + 1) % validation_freq == 0
    if isinstance(validation_freq, (list, tuple, set)) and all(isinstance(e, int) for e in validation_freq):
        epochs = set(validation_freq)
        return lambda epoch: epoch + 1 in epochs
    raise ValueError(f"validation_freq must be an int >= 1 or a list of 1-based epochs, got {validation_freq!r}")


def check_accumulate_grad_batches(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"accumulate_grad_batches must be an int >= 1 (batches per optimizer step), got {value!r}")
    return value


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
    """The callbacks as a list, each a :class:`~fitkit.Callback` with valid hook names."""
    if isinstance(callbacks, Callback):
        raise TypeError(
            f"callbacks must be a list of callbacks, got a single {type(callbacks).__name__}; "
            f"wrap it in a list: callbacks=[{type(callbacks).__name__}(...)]"
        )
    checked: list[Callback] = []
    for callback in callbacks or []:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks must be fitkit.Callback instances, got {type(callback).__name__}; "
                "subclass fitkit.Callback or use fitkit.callbacks.LambdaCallback"
            )
        check_hook_names(callback)
        checked.append(callback)
    return checked


def check_metric_names(metrics: list[Metric]) -> list[Metric]:
    names = [m.name for m in metrics]
    if len(set(names)) != len(names) or "loss" in names:
        raise ValueError(f"metric names must be unique and not 'loss', got {names}; pass name= to tell them apart")
    return metrics
