"""Devices: choosing one, what each supports, and the batch layouts that depend on it."""

from __future__ import annotations

from typing import Any

import torch

from fitkit import _structure


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA, then MPS, then CPU), a name such as ``"cuda:1"``, or a ``torch.device``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps' or a torch.device"
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device='auto' or 'cpu'")
        index = resolved.index if resolved.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device("cuda", index)
    if resolved.type == "mps" and not _mps_available():
        raise ValueError(f"device={device!r} but MPS is not available here; use device='auto' or 'cpu'")
    return resolved


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype for running sums on ``device``: float64, or float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def to_host_float64(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU as float64: copied first, converted there (MPS cannot hold float64)."""
    return tensor.detach().cpu().double()


def pinned(loader: Any, device: torch.device) -> bool:
    """True when ``loader`` yields pinned batches for a CUDA device: copy them with ``non_blocking=True``.

    A DataLoader (or the in-memory batcher) says so with ``pin_memory``; a list of batches the user made
    counts as pinned when every tensor of its first batch is pinned (or already on the GPU).
    """
    if device.type != "cuda":
        return False
    if isinstance(loader, list) and loader:
        tensors = _structure.tensors(loader[0])
        return bool(tensors) and all(t.device.type == "cuda" or t.is_pinned() for t in tensors)
    return bool(getattr(loader, "pin_memory", False))


def fits_on_device(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """True when ``tensors`` take under half of ``device``'s free memory (always on CPU and MPS)."""
    if device.type != "cuda":
        return True
    size = sum(t.numel() * t.element_size() for t in tensors)
    free, _ = torch.cuda.mem_get_info(device)
    return size < 0.5 * free


def channels_last(batch: Any) -> Any:
    """Every 4-D tensor nested in ``batch`` in the channels-last memory format."""

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.ndim == 4:
            return leaf.contiguous(memory_format=torch.channels_last)
        return leaf

    return _structure.map_structure(convert, batch)


__all__ = ["resolve_device", "sum_dtype", "to_host_float64", "pinned", "fits_on_device", "channels_last"]
