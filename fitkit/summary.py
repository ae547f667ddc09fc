"""``Trainer.summary()``: a Keras-like table of the model, built from its modules and parameters alone (no
forward pass, so no output shapes: those would need one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fitkit._loaders import data_signature

if TYPE_CHECKING:
    from fitkit.callbacks.base import TrainerLike


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _count(params: list[torch.Tensor]) -> tuple[int, int, int]:
    """(trainable, non-trainable, bytes) over distinct parameters."""
    unique = list({id(p): p for p in params}.values())
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    frozen = sum(p.numel() for p in unique if not p.requires_grad)
    return trainable, frozen, sum(p.numel() * p.element_size() for p in unique)


def _rows(module: nn.Module, depth: int, prefix: str = "", level: int = 1) -> list[tuple[str, str, int, int]]:
    """``(name, type, parameters, trainable)`` for each child down to ``depth`` levels, indented by level."""
    rows = []
    for name, child in module.named_children():
        trainable, frozen, _ = _count(list(child.parameters()))
        rows.append(("  " * (level - 1) + prefix + name, type(child).__name__, trainable + frozen, trainable))
        if level < depth:
            rows += _rows(child, depth, f"{prefix}{name}.", level + 1)
    return rows


def _data_lines(trainer: TrainerLike) -> list[str]:
    loader = trainer.train_loader
    if loader is None:
        return []
    signature = data_signature(loader)
    samples = signature["num_samples"]
    batches = trainer.num_train_batches or signature["num_batches"]
    lines = [
        "Training data: "
        + (f"{samples:,} samples, " if samples is not None else "")
        + (f"{batches:,} batches per epoch" if batches is not None else "batches per epoch unknown")
    ]
    val_batches = trainer.num_val_batches
    if trainer.has_validation and val_batches:
        parts = [
            ("" if name is None else f"{name}: ") + (f"{n:,} batches" if n is not None else "batches unknown")
            for name, n in val_batches.items()
        ]
        lines.append("Validation data: " + ", ".join(parts))
    return lines


def summarize(trainer: TrainerLike, depth: int = 1) -> str:
    """The table [fitkit.Trainer.summary][] returns.

    Args:
        trainer: the Trainer (its ``model``, device, precision and, during a fit, its data sizes).
        depth: levels of child modules to list (0: totals only).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int >= 0 (levels of child modules to list; 0: totals only), got {depth!r}")
    model: nn.Module = trainer.model
    rows = _rows(model, depth) if depth else []
    header = ("Layer (type)", "Params", "Trainable")
    cells = [(f"{name} ({kind})", f"{params:,}", f"{trainable:,}") for name, kind, params, trainable in rows]
    width0 = max([len(header[0]), *(len(c[0]) for c in cells)])
    width1 = max([len(header[1]), *(len(c[1]) for c in cells)])
    width2 = max([len(header[2]), *(len(c[2]) for c in cells)])
    total_width = width0 + width1 + width2 + 4
    line = lambda a, b, c: f"{a:<{width0}}  {b:>{width1}}  {c:>{width2}}"  # noqa: E731
    trainable, frozen, param_bytes = _count(list(model.parameters()))
    buffers = list(model.buffers())
    buffer_bytes = sum(b.numel() * b.element_size() for b in buffers)
    out = [f'Model: "{type(model).__name__}"', "=" * total_width]
    if cells:
        out += [line(*header), "-" * total_width, *(line(*c) for c in cells), "=" * total_width]
    out += [
        f"Total params: {trainable + frozen:,} ({_bytes(param_bytes)})",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {frozen:,}",
    ]
    if buffers:
        out.append(f"Buffers: {sum(b.numel() for b in buffers):,} values ({_bytes(buffer_bytes)})")
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}) or ["-"]
    world = trainer.world_size
    out.append(
        f"Device: {trainer.device} | Precision: {trainer.precision} (weights {', '.join(dtypes)})"
        + (f" | Strategy: {trainer.strategy}, {world} processes" if world > 1 else "")
    )
    out += _data_lines(trainer)
    return "\n".join(out)


__all__ = ["summarize"]
