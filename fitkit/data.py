"""Batches: moving them to the device, unpacking them, and the in-memory batcher.

The in-memory path (``fit((x, y), batch_size=...)``) cuts batches straight from tensors with one
permutation per epoch. It draws exactly the random numbers that ``DataLoader(TensorDataset(x, y),
batch_size, shuffle=True)`` draws, so both paths give identical results for the same seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from fitkit import rng
from fitkit._arrays import to_tensor
from fitkit._structure import describe, leaves, map_structure


def move_to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Moves every tensor nested in tuples, lists and dicts to ``device``; other leaves are kept."""

    def move(leaf: Any) -> Any:
        return leaf.to(device, non_blocking=non_blocking) if isinstance(leaf, torch.Tensor) else leaf

    return map_structure(move, obj)


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor found depth-first in a nested batch, or None."""
    return next((leaf for leaf in leaves(obj) if isinstance(leaf, torch.Tensor)), None)


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its targets, else of its first tensor.

    Host metadata only: reading a shape never synchronises with the device.
    """
    if (
        isinstance(batch, (list, tuple))
        and len(batch) in (2, 3)
        and isinstance(batch[1], torch.Tensor)
        and batch[1].ndim > 0
    ):
        return batch[1].shape[0]
    tensor = first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise ValueError(
            f"cannot tell the number of samples in a batch of type {type(batch).__name__}: it holds no tensor "
            "with a batch dimension. Yield (inputs, targets) tensors, or override Trainer.train_step/eval_step."
        )
    return tensor.shape[0]


def split_batch(batch: Any) -> tuple[Any, Any, Any]:
    """Splits a batch into ``(inputs, targets, sample_weight)`` as Keras reads batches.

    ``x`` (a tensor or a dict of inputs) and ``(x,)`` have no targets; ``(x, y)``; ``(x, y, sample_weight)``.
    Missing parts are None. Anything else is an error that names the layouts and how to handle another.
    """
    if type(batch) is list or type(batch) is tuple:  # the usual (x, y) first: this runs once per batch
        n = len(batch)
        if n == 2:
            return batch[0], batch[1], None
        if n == 3:
            return batch[0], batch[1], batch[2]
    if isinstance(batch, (torch.Tensor, Mapping)):
        return batch, None, None
    if isinstance(batch, (list, tuple)) and 1 <= len(batch) <= 3:
        return batch[0], batch[1] if len(batch) > 1 else None, batch[2] if len(batch) > 2 else None
    raise ValueError(
        f"cannot read a batch of {describe(batch)}: fitkit reads batches as Keras does, x (a tensor or a dict), "
        "(x,), (x, y) or (x, y, sample_weight), where x may itself be a tuple of tensors or a dict. Make the "
        "dataset return one of these, or subclass Trainer and override train_step(batch) / eval_step(batch)."
    )


class InMemoryLoader:
    """Batches cut from in-memory tensors: ``x[perm[i:i + batch_size]]``.

    Args:
        x: the inputs, a tensor (or NumPy array).
        y: the targets with the same leading dimension, or None for unsupervised data (batches are then
            ``(x,)``).
        batch_size: samples per batch; the last batch may be shorter unless ``drop_last`` (as in Keras).
        shuffle: draw one permutation per epoch, with the same random numbers ``DataLoader(shuffle=True)``
            draws from the global torch generator (or ``generator``).
        device: where the tensors live; batches are cut there, so a GPU run copies the data once.
        sample_weight: per-sample weights ``(N,)``; batches are then ``(x, y, sample_weight)``.
        drop_last: leave out the last batch when it is shorter than ``batch_size``.
    """

    def __init__(
        self,
        x: Any,
        y: Any = None,
        batch_size: int = 32,
        shuffle: bool = True,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        sample_weight: Any = None,
        drop_last: bool = False,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        tensors = [to_tensor(x, "x")]
        if y is not None:
            tensors.append(to_tensor(y, "y"))
        if sample_weight is not None:
            if y is None:
                raise ValueError("sample_weight needs targets: pass (x, y) with sample_weight=")
            tensors.append(to_tensor(sample_weight, "sample_weight"))
        for name, tensor in zip(("y", "sample_weight"), tensors[1:]):
            if tensor.shape[0] != tensors[0].shape[0]:
                raise ValueError(
                    f"x and {name} must have the same number of samples, got {tensors[0].shape[0]} and "
                    f"{tensor.shape[0]}"
                )
        if device is not None:
            tensors = [t.to(device) for t in tensors]
        self.tensors = tuple(tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        # Set for a CUDA run whose data stay on the host (too big for the GPU): each batch is cut into
        # pinned memory, so its copy to the GPU is asynchronous instead of a host sync per batch.
        self.pin_memory = False
        self._skip = 0

    @property
    def x(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def y(self) -> torch.Tensor | None:
        return self.tensors[1] if len(self.tensors) > 1 else None

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def batch(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, ...]:
        """The batch of the samples at ``index``: ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``."""
        if self.pin_memory:
            return tuple(t[index].pin_memory() for t in self.tensors)
        return tuple(t[index] for t in self.tensors)

    def subset(self, index: slice, shuffle: bool = False) -> InMemoryLoader:
        """A loader over the samples at ``index`` (a rank's share of validation data), same batch size."""
        part = InMemoryLoader(self.tensors[0][index], batch_size=self.batch_size, shuffle=shuffle)
        part.tensors = tuple(t[index] for t in self.tensors)
        part.pin_memory = self.pin_memory
        return part

    @property
    def num_samples(self) -> int:
        return self.x.shape[0]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return (self.num_samples + self.batch_size - 1) // self.batch_size

    def skip_next(self, num_batches: int) -> None:
        """Makes the next iteration start at batch ``num_batches`` (the permutation is drawn as usual)."""
        self._skip = num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # The same two draws as DataLoader(TensorDataset, shuffle=True): the iterator's base seed for
        # workers, then RandomSampler's seed for its private generator. Keeping them makes the two paths
        # interchangeable, bit for bit. They are made here, eagerly, not at the first next(): a resumed
        # epoch restores the epoch-start random state just around this call.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        perm = None
        if self.shuffle:
            if self.generator is None:
                seed = int(torch.empty((), dtype=torch.int64).random_().item())
                generator = torch.Generator()
                generator.manual_seed(seed)
            else:
                generator = self.generator
            perm = torch.randperm(self.num_samples, generator=generator).to(self.x.device)
            if self.generator is not None:
                # RandomSampler then draws a second permutation for the remaining num_samples % n == 0
                # samples; with a private generator per epoch that is unseen, with the caller's it is not.
                torch.randperm(self.num_samples, generator=generator)
        skip, self._skip = self._skip, 0
        return self._batches(perm, skip)

    def _batches(self, perm: torch.Tensor | None, skip: int) -> Iterator[tuple[torch.Tensor, ...]]:
        size = self.batch_size
        end = len(self) * size if self.drop_last else self.num_samples
        for start in range(skip * size, end, size):
            yield self.batch(slice(start, start + size) if perm is None else perm[start : start + size])


class _ListBatchSampler:
    """Replays precomputed batches of indices (the rest of an interrupted epoch)."""

    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Sequence[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def is_map_style(loader: Any) -> bool:
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)


# What rebuild_loader carries over as it is; ``dataset`` and the way indices are drawn (``batch_size``,
# ``shuffle``, ``sampler``, ``batch_sampler``, ``drop_last``) are handled apart. tests/test_data.py checks this
# against DataLoader's signature, so an argument a new torch adds is not silently dropped.
LOADER_SETTINGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


def rebuild_loader(
    loader: DataLoader, *, sampler: Any = None, batch_sampler: Any = None, **overrides: Any
) -> DataLoader:
    """A new DataLoader over ``loader``'s dataset that carries every one of its constructor arguments.

    Args:
        loader: the DataLoader to copy.
        sampler: the indices to draw instead of ``loader.sampler``, batched as ``loader`` batches them
            (``batch_size``, ``drop_last``). Not with a loader that has a batch_sampler of its own.
        batch_sampler: batches of indices to draw instead of the loader's (``batch_size`` and ``drop_last``
            then no longer apply).
        overrides: other DataLoader arguments to change, e.g. ``generator=`` or ``persistent_workers=``.

    With neither sampler, the copy draws from the loader's own sampler or batch sampler (the very objects).
    ``shuffle`` is not an argument to carry: it chose ``loader.sampler``, which is.
    """
    if sampler is not None and batch_sampler is not None:
        raise ValueError("rebuild_loader: pass a sampler or a batch_sampler, not both")
    own_batch_sampler = loader.batch_size is None and loader.batch_sampler is not None  # the user's, not torch's
    if sampler is not None and own_batch_sampler:
        raise ValueError(
            f"rebuild_loader: the loader draws its batches from its own batch_sampler "
            f"({type(loader.batch_sampler).__name__}), so a new sampler cannot replace its indices; pass "
            "batch_sampler= instead"
        )
    kwargs: dict[str, Any] = {name: getattr(loader, name) for name in LOADER_SETTINGS}
    if loader.num_workers == 0:
        kwargs["prefetch_factor"] = None  # DataLoader refuses a prefetch_factor without workers
    if batch_sampler is None and sampler is None and own_batch_sampler:
        batch_sampler = loader.batch_sampler
    if batch_sampler is not None:
        kwargs["batch_sampler"] = batch_sampler
    else:
        kwargs["batch_size"], kwargs["drop_last"] = loader.batch_size, loader.drop_last
        if not isinstance(loader.dataset, IterableDataset):  # an iterable dataset takes no sampler
            kwargs["sampler"] = sampler if sampler is not None else loader.sampler
    kwargs.update(overrides)
    return DataLoader(loader.dataset, **kwargs)


def resume_loader_iterator(loader: DataLoader, skip: int) -> Iterator[Any]:
    """An iterator over ``loader`` that starts at batch ``skip`` without loading the skipped batches.

    Must be called with the random generators in the state they had when the interrupted epoch called
    ``iter(loader)``. It makes the draws that iterator made, in the same order (the worker base seed,
    then the sampler's), from the same generators, so the remaining batches and the worker seeds match.
    Index lists are cheap: no sample is loaded for the skipped batches.
    """
    base_state = loader.generator.get_state() if loader.generator is not None else torch.get_rng_state()
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)  # the iterator's base seed
    index_sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    remaining = list(index_sampler)[skip:]
    replay = torch.Generator()
    replay.set_state(base_state)  # makes the new iterator draw the very same base seed
    # One pass over the rest of the epoch: workers that persist would outlive it for nothing.
    if loader.batch_sampler is not None:
        clone = rebuild_loader(
            loader, batch_sampler=_ListBatchSampler(remaining), generator=replay, persistent_workers=False
        )
    else:  # no automatic batching (batch_size=None): each index is a batch
        clone = rebuild_loader(loader, sampler=remaining, generator=replay, persistent_workers=False)
    return iter(clone)


_MASK = 2**64 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed that is a function of ``(seed, epoch, index)`` only (splitmix64 over the three)."""
    value = 0x9E3779B97F4A7C15
    for part in (seed, epoch, index):
        value = (value ^ (part & _MASK)) + 0x9E3779B97F4A7C15 & _MASK
        value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK
        value ^= value >> 31
    return value


class SeededDataset(Dataset[Any]):
    """A map-style dataset whose every sample draws its random numbers from generators seeded with
    ``(seed, epoch, index)``: what `seeded` returns (see there). ``dataset`` is the wrapped one."""

    def __init__(self, dataset: Any, seed: int | None = None) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"fitkit.data.seeded takes a map-style dataset (with __getitem__ and __len__), got "
                f"{type(dataset).__name__}; an iterable dataset seeds its augmentation from its own state "
                "(state_dict/load_state_dict) instead"
            )
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None (the run's seed_everything seed), got {seed!r}")
        self.dataset, self.seed = dataset, seed
        # [seed, epoch] in shared memory: DataLoader workers (persistent ones too) see the epoch fitkit sets.
        self._shared = torch.tensor([-1 if seed is None else seed, 0], dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Called by fitkit before each epoch's ``iter(loader)`` (also after a resume); sets the run's seed
        too, when none was given: the last ``seed_everything`` seed (0 without one), shared by every rank."""
        if self.seed is None:
            self._shared[0] = rng.last_seed() or 0
        self._shared[1] = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        seed, epoch = self._shared.tolist()
        if seed < 0:  # read before any epoch began (outside fit)
            seed = rng.last_seed() or 0
        value = sample_seed(seed, epoch, int(index))
        if get_worker_info() is not None:  # a worker's generators serve its samples only
            _seed_generators(value)
            return self.dataset[index]
        saved = _generator_states()  # the main process: its own streams (dropout, shuffling) must not move
        try:
            _seed_generators(value)
            return self.dataset[index]
        finally:
            _set_generator_states(saved)


def _seed_generators(value: int) -> None:
    random.seed(value)
    torch.default_generator.manual_seed(value)  # the CPU generator only: a CUDA one is the trainer's
    if rng.np is not None:
        rng.np.random.seed(value % 2**32)


def _generator_states() -> tuple[Any, Any, Any]:
    numpy_state = None if rng.np is None else rng.np.random.get_state()
    return torch.default_generator.get_state(), random.getstate(), numpy_state


def _set_generator_states(states: tuple[Any, Any, Any]) -> None:
    torch.default_generator.set_state(states[0])
    random.setstate(states[1])
    if states[2] is not None:
        rng.np.random.set_state(states[2])


def seeded(dataset: Any, seed: int | None = None) -> SeededDataset:
    """``dataset`` with random draws that depend on the sample, not on who loads it or when.

    Before each sample is loaded, the global generators it may draw from (torch's CPU generator, Python's
    ``random``, NumPy's global ``np.random``) are seeded with a function of the run's seed, the epoch and the
    sample's index. So random augmentation in ``DataLoader(num_workers>0)`` gives the same batches for 0, 1
    or 8 workers, for any number of ranks, and a run resumed mid-epoch reads the rest of the epoch with the
    very draws of the uninterrupted run: the resume is exact, bit for bit. Read in the main process
    (``num_workers=0``), the main process's own streams are saved and put back around each sample.

    fitkit tells the dataset the epoch (``set_epoch``) before each epoch of ``fit``; read outside ``fit``
    (``evaluate``, your own loop) it stays at epoch 0 unless you call ``set_epoch``.

    Not covered: a generator of the dataset's own (``torch.Generator``, ``numpy.random.default_rng``) and
    draws on a GPU: seed those from ``torch.initial_seed()`` in ``__getitem__`` if you use them.

    Args:
        dataset: a map-style dataset (``__getitem__`` and ``__len__``).
        seed: the run's seed; None (the default) takes the last ``fitkit.seed_everything`` seed when an
            epoch starts (0 without one).

    Returns:
        a `SeededDataset` over ``dataset``.
    """
    return SeededDataset(dataset, seed)


def check_reiterable(data: Iterable[Any], name: str) -> None:
    if iter(data) is data:
        raise TypeError(
            f"{name} is a one-shot iterator ({type(data).__name__}); fit needs data it can iterate once per "
            "epoch. Pass a DataLoader, a list of batches, or an (x, y) tuple of tensors with batch_size=."
        )


__all__ = [
    "move_to_device",
    "first_tensor",
    "batch_size_of",
    "split_batch",
    "InMemoryLoader",
    "is_map_style",
    "LOADER_SETTINGS",
    "rebuild_loader",
    "resume_loader_iterator",
    "check_reiterable",
    "seeded",
    "SeededDataset",
    "sample_seed",
]
