"""Noticing random augmentation in DataLoader workers that a mid-epoch resume cannot reproduce.

A worker draws from generators seeded once when it starts, and a resumed epoch hands its batches to the
workers in another rotation, so random draws made while loading samples differ from the uninterrupted run
(`fitkit.data.seeded` makes them a function of the sample instead). Whether a dataset draws at all cannot be
told from outside without loading a sample in the main process (which may open files the forked workers
then share), so fitkit watches the workers themselves: for a map-style DataLoader with workers over a dataset
not wrapped by ``seeded``, the training loader's ``collate_fn`` is wrapped (in a shallow copy of the loader,
the user's own is left alone) to compare, in the worker, the global generators (torch, ``random``, NumPy)
before a batch's samples are loaded with the states after the worker's previous batch. A change sets a flag in
shared memory; the main process reads it when a mid-epoch checkpoint is written and warns once.

The cost is in the workers (about 0.15 ms per batch, mostly reading NumPy's state, until the first draw is seen);
the main process reads one shared byte per checkpoint. Not seen: draws from a generator of the dataset's own (``torch.Generator``,
``numpy.random.default_rng``), which restart with the workers just the same, and draws in a worker's first
batch only.
"""

from __future__ import annotations

import copy
import random
import warnings
from typing import Any

import torch
from torch.utils.data import get_worker_info

from fitkit._warn import FitkitWarning
from fitkit.data import SeededDataset, is_map_style

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy ships with tensorboard
    np = None  # type: ignore[assignment]


def unseeded_workers(loader: Any) -> bool:
    """A map-style DataLoader with workers whose dataset is not wrapped by `fitkit.data.seeded`."""
    return is_map_style(loader) and loader.num_workers > 0 and not isinstance(loader.dataset, SeededDataset)


def _states() -> tuple[Any, ...]:
    numpy_state: Any = None
    if np is not None:
        state: Any = np.random.get_state(legacy=True)
        numpy_state = (state[1].tobytes(), state[2])
    return torch.get_rng_state(), random.getstate(), numpy_state


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


class WatchedCollate:
    """A ``collate_fn`` that, in a worker, sets ``flag`` when the generators moved since its last batch."""

    def __init__(self, collate_fn: Any, flag: torch.Tensor) -> None:
        self.collate_fn, self.flag = collate_fn, flag
        self.after: tuple[Any, ...] | None = None  # this worker's generators after its previous batch

    def __call__(self, samples: Any) -> Any:
        watching = get_worker_info() is not None and not bool(self.flag[0])
        if watching and self.after is not None and not _same(_states(), self.after):
            self.flag[0] = 1
        batch = self.collate_fn(samples)
        if watching:
            self.after = _states()
        return batch


class RandomWorkers:
    """Watches a training loader's workers (see the module docstring): ``loader`` is the copy to iterate."""

    def __init__(self, loader: Any) -> None:
        self.flag = torch.zeros(1, dtype=torch.uint8).share_memory_()
        self.loader = copy.copy(loader)
        self.loader.collate_fn = WatchedCollate(loader.collate_fn, self.flag)
        self.warned = False

    def warn_once(self) -> None:
        """Warns (once) when a worker was seen drawing random numbers: this checkpoint's resume is inexact."""
        if self.warned or not bool(self.flag[0]):
            return
        self.warned = True
        warnings.warn(
            "the training DataLoader's workers draw random numbers while loading samples (random augmentation): "
            "a resume from a mid-epoch checkpoint gives those samples other random draws than the uninterrupted "
            "run (the data order and everything in the main process stay exact). Wrap the dataset in "
            "fitkit.data.seeded(dataset) to make each sample's draws a function of the seed, the epoch and its "
            "index: then the resume is exact, and the batches are the same for any number of workers",
            FitkitWarning,
            stacklevel=6,
        )


__all__: list[str] = []
