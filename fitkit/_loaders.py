"""Turning what users pass to ``fit``/``evaluate``/``predict`` into the loaders the loop iterates.

A DataLoader is used as it is (with a DistributedSampler under DDP); ``(x, y)`` tensors or NumPy arrays
become an `InMemoryLoader`; any other re-iterable of batches is used as it is.
Everything else is an error that says what to pass instead.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sized
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, IterableDataset

from fitkit import _arrays, _checks, distributed
from fitkit._arrays import is_array, to_tensor
from fitkit._devices import fits_on_device, pinned
from fitkit._structure import map_structure
from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.data import InMemoryLoader, check_reiterable, first_tensor


@runtime_checkable
class SkippableLoader(Protocol):
    """A loader that can start its next epoch at a given batch without producing the skipped ones (the
    in-memory batchers): a mid-epoch resume re-draws the epoch's order and starts there."""

    def skip_next(self, num_batches: int) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...


def as_loader(
    data: Any,
    *,
    batch_size: int | None,
    shuffle: bool,
    name: str,
    device: torch.device,
    dist: distributed.DistInfo,
    training: bool = False,
    sample_weight: Any = None,
    drop_last: bool = False,
    single_pass: bool = False,
) -> Any:
    """The loader to iterate for ``data`` (the argument called ``name`` in messages).

    In-memory data is ``x``, ``(x,)`` (no targets: the loss comes from ``compute_loss`` or the model),
    ``(x, y)`` or ``(x, y, sample_weight)``, tensors or NumPy arrays.

    Args:
        batch_size: for in-memory data (default 32, as in Keras); an error with a DataLoader.
        shuffle: shuffle in-memory training data every epoch.
        training: shard a DataLoader with a DistributedSampler under DDP (validation data is sharded
            by the loop, without padding).
        sample_weight: per-sample weights for in-memory data (Keras's ``fit(sample_weight=...)``).
        drop_last: leave out a last, shorter in-memory batch (a BatchNorm model cannot train on one sample).
        single_pass: the data is read once (``evaluate``, ``predict``), so a generator is accepted.
    """
    in_memory = is_array(data) or (isinstance(data, tuple) and bool(data) and is_array(data[0]))
    if not in_memory and (sample_weight is not None or drop_last):
        option = "sample_weight" if sample_weight is not None else "drop_last"
        raise ValueError(
            f"{option}= is for in-memory (x, y) data; {name} is a {type(data).__name__}: put the weights in "
            "its batches as (x, y, sample_weight), or use the DataLoader's own drop_last="
        )
    if isinstance(data, DataLoader):
        _check_data_loader(data, batch_size, name, device)
        return distributed.shard_train(data, dist) if training else data
    if is_array(data):  # x alone, as Keras's fit(x)/predict(x) take it; iterating it would yield single rows
        data = (data,)
    if isinstance(data, tuple) and len(data) in (1, 2, 3) and is_array(data[0]):
        if len(data) == 3:
            if sample_weight is not None:
                raise ValueError(f"{name} is (x, y, sample_weight) and sample_weight= is given too; pass one")
            data, sample_weight = data[:2], data[2]
        return _in_memory(data, batch_size, shuffle, name, device, dist, training, sample_weight, drop_last)
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, IterableDataset):
        raise TypeError(
            f"{name} is a Dataset; wrap it in a DataLoader(dataset, batch_size=..., shuffle=...) "
            "or pass (x, y) tensors with batch_size="
        )
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        if not single_pass:
            check_reiterable(data, name)
        if isinstance(data, Sized) and len(data) == 0:
            raise ValueError(f"{name} is empty")
        if device.type == "cuda" and isinstance(data, list) and not pinned(data, device):
            first = first_tensor(data[0])
            if first is not None and first.device.type == "cpu":
                warnings.warn(
                    f"{name}: a list of unpinned CPU batches on a CUDA run: copying each one to the GPU waits "
                    "for it (a host sync per batch); pin them (tensor.pin_memory()), or pass a "
                    "DataLoader(..., pin_memory=True)",
                    FitkitWarning,
                    stacklevel=user_stacklevel(),
                )
        return data
    raise TypeError(
        f"{name} must be a DataLoader, a re-iterable of (inputs, targets) batches, or an (x, y) "
        f"tuple of tensors/arrays; got {type(data).__name__}"
    )


def _check_data_loader(loader: DataLoader, batch_size: int | None, name: str, device: torch.device) -> None:
    """`as_loader`'s checks of a DataLoader: no ``batch_size=`` beside it, not empty, pinned on a CUDA run."""
    if batch_size is not None:
        raise ValueError(
            f"batch_size is for in-memory data; {name} is a DataLoader with its own "
            f"batch_size ({loader.batch_size}). Drop batch_size= or pass (x, y) tensors."
        )
    if not isinstance(loader.dataset, IterableDataset) and len(loader) == 0:
        raise ValueError(
            f"{name} is an empty DataLoader (dataset of {len(loader.dataset)} samples"  # type: ignore[arg-type]
            f"{', drop_last=True' if loader.drop_last else ''}); there is nothing to iterate"
        )
    if device.type == "cuda" and not loader.pin_memory:
        warnings.warn(
            f"{name}: a DataLoader with pin_memory=False on a CUDA run: copying each batch from pageable "
            "memory to the GPU waits for it (a host sync per batch); pass pin_memory=True (and "
            "num_workers>0 to load batches while the GPU computes)",
            FitkitWarning,
            stacklevel=user_stacklevel(),  # the caller of fit/evaluate/predict, as as_loader's own warnings
        )


def _in_memory(
    data: tuple[Any, ...],
    batch_size: int | None,
    shuffle: bool,
    name: str,
    device: torch.device,
    dist: distributed.DistInfo,
    training: bool,
    sample_weight: Any,
    drop_last: bool,
) -> Any:
    x = data[0]
    y = data[1] if len(data) == 2 else None
    if len(x) == 0:
        raise ValueError(f"{name} holds 0 samples")
    size = 32 if batch_size is None else batch_size
    parts = [to_tensor(part, part_name) for part, part_name in ((x, "x"), (y, "y"), (sample_weight, "sample_weight"))
             if part is not None]  # fmt: skip
    on_device = fits_on_device(parts, device)
    loader = InMemoryLoader(
        x, y, size, shuffle=shuffle and training, device=device if on_device else None,
        sample_weight=sample_weight, drop_last=drop_last,
    )  # fmt: skip
    if sample_weight is not None:  # (its length is checked by the loader)
        _checks.check_sample_weight(parts[-1], len(x), name)
    loader.pin_memory = device.type == "cuda" and not on_device  # batches cut on the host: pinned ones
    if dist.world_size > 1:
        return distributed.shard_in_memory(loader, dist, training)
    return loader


def split_in_memory(data: Any, fraction: float) -> tuple[Any, Any]:
    """``validation_split``: the last ``fraction`` of in-memory ``(x, y)`` held out, before shuffling (Keras)."""
    data = _arrays.from_python(data, "train_data")  # Python lists, converted as Keras does
    if not (isinstance(data, tuple) and len(data) == 2 and is_array(data[0])):
        raise ValueError("validation_split works with in-memory (x, y) data only; for a DataLoader pass val_data")
    x, y = to_tensor(data[0], "x"), to_tensor(data[1], "y")
    split = int(len(x) * (1.0 - fraction))
    if split == 0 or split == len(x):
        raise ValueError(f"validation_split={fraction} leaves an empty training or validation set for {len(x)} samples")
    return (x[:split], y[:split]), (x[split:], y[split:])


def num_batches(loader: Any, steps: int | None) -> int | None:
    """Batches per epoch: the loader's length capped at ``steps``; ``steps`` (or None) when it has none."""
    try:
        total = len(loader)
    except TypeError:
        return steps
    return total if steps is None else min(total, steps)


def concat_outputs(outputs: list[Any]) -> Any:
    """``predict``'s per-batch outputs joined along dim 0 (tuples and dicts element-wise)."""
    return map_structure(_concat, *outputs)


def _concat(first: Any, *rest: Any) -> torch.Tensor:
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"predict: cannot concatenate outputs of type {type(first).__name__}")
    return torch.cat([first, *rest])


def take_rows(outputs: Any, order: torch.Tensor) -> Any:
    """``outputs`` (a tensor, or tuples/lists/dicts of them) with their rows in ``order`` (predictions gathered
    from ranks or files put back in sample order)."""
    return map_structure(lambda leaf: leaf[order] if isinstance(leaf, torch.Tensor) else leaf, outputs)


def data_signature(loader: Any) -> dict[str, Any]:
    """The training data's size (batches, samples), as far as the loader tells: a resume checks it."""
    signature: dict[str, Any] = {"num_batches": None, "num_samples": None}
    with contextlib.suppress(TypeError):
        signature["num_batches"] = len(loader)
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        with contextlib.suppress(TypeError):
            signature["num_samples"] = len(dataset)
    elif hasattr(loader, "num_samples"):
        signature["num_samples"] = loader.num_samples
    elif hasattr(loader, "loader"):
        signature["num_samples"] = getattr(loader.loader, "num_samples", None)
    return signature


__all__ = [
    "SkippableLoader",
    "as_loader",
    "split_in_memory",
    "num_batches",
    "concat_outputs",
    "take_rows",
    "data_signature",
]
