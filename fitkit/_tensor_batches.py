"""The fast path for a training ``DataLoader(TensorDataset(...))``: whole batches indexed out of the tensors.

A DataLoader over a TensorDataset builds each batch by calling ``dataset[i]`` once per sample and stacking
the samples in ``default_collate``: for a small model most of a step's time. When nothing can change what
a batch holds (the exact ``DataLoader`` and ``TensorDataset`` classes, the default collate function, no
workers, torch's own ``BatchSampler``), fitkit cuts the same batches with one indexing per tensor,
``tensor[indices]``, using the very indices the loader's batch sampler yields. Everything random is
drawn from the same generators, in the same order, at the same moments as the DataLoader's iterator
draws it (its base seed when the iterator is made, the sampler's draws as batches are taken), so the
batches, their order and every later random number are bit-identical; any other loader keeps the
normal path. ``Trainer(fast_tensor_batches=False)`` turns it off.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, TensorDataset, default_collate


def eligible(loader: Any) -> bool:
    """True when indexing the tensors gives exactly the batches ``iter(loader)`` would give."""
    return (
        type(loader) is DataLoader
        and type(loader.dataset) is TensorDataset
        and loader.num_workers == 0
        and loader.collate_fn is default_collate
        and type(loader.batch_sampler) is BatchSampler  # automatic batching by batch_size, any sampler
        and not getattr(loader.dataset, "__getitems__", None)
    )


def iterate(loader: DataLoader) -> Iterator[list[torch.Tensor]]:
    """What ``iter(loader)`` yields, cut straight from the tensors.

    The DataLoader's single-process iterator first makes its batch sampler's iterator (lazy: nothing drawn
    yet), then draws its base seed from ``loader.generator`` (or the global generator); the sampler draws
    its own numbers when the first batch is taken. Done here in the same order.
    """
    index_batches = iter(loader.batch_sampler)  # type: ignore[arg-type]
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)  # the iterator's base seed
    return _batches(loader, index_batches)


def resume(loader: DataLoader, skip: int) -> Iterator[list[torch.Tensor]]:
    """The batches of an interrupted epoch from batch ``skip`` on, with the generators in the state they had
    when the epoch called ``iter(loader)`` (see `fitkit.data.resume_loader_iterator`). Every draw is
    made here, eagerly: the caller restores the generators' current state right after."""
    index_batches = iter(loader.batch_sampler)  # type: ignore[arg-type]
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    remaining = list(index_batches)[skip:]
    return _batches(loader, remaining)


def _batches(loader: DataLoader, index_batches: Iterable[Sequence[int]]) -> Iterator[list[torch.Tensor]]:
    tensors = loader.dataset.tensors  # type: ignore[attr-defined]
    # DataLoader pins its batches when asked and an accelerator exists (MPS excepted); so does this.
    pin = loader.pin_memory and torch.cuda.is_available()
    for indices in index_batches:
        index = torch.as_tensor(indices)
        if index.dtype != torch.int64:
            index = index.long()
        # default_collate returns a list for tuple samples (a torch backwards-compatibility choice).
        batch = [tensor[index] for tensor in tensors]
        yield [part.pin_memory() for part in batch] if pin else batch


__all__ = ["eligible", "iterate", "resume"]
