"""The data pipeline, in one place: user data -> loader -> this rank's batches -> the device.

``fit``/``evaluate``/``predict`` turn what the user passed into loaders here (`make_loader`, `val_loaders`:
in-memory arrays as Keras reads them, DataLoaders sharded over the ranks), and the training loop asks one
object per fit, `TrainBatches`, for each epoch's batches (`TrainBatches.epoch`): the fast tensor path, the
random state snapshot before ``iter(loader)`` and the mid-epoch resume skip are decided there. Every batch
reaches the device through a `DeviceFeed` (device copy, channels-last, the first batch's dtype check).
The parts it assembles live in `fitkit._arrays` (array conversion), `fitkit._loaders` (loaders),
`fitkit._tensor_batches` (the fast path), `fitkit.data` (device moves, replays) and `fitkit.distributed`
(per-rank shares).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from fitkit import _arrays, _checks, _tensor_batches, distributed, rng, schedule
from fitkit._devices import channels_last as to_channels_last
from fitkit._devices import pinned
from fitkit._loaders import SkippableLoader, as_loader, num_batches
from fitkit._warn import user_stacklevel
from fitkit.data import batch_size_of, is_map_style, move_to_device, resume_loader_iterator, split_batch

if TYPE_CHECKING:
    from fitkit.trainer import Trainer


def make_loader(
    trainer: Trainer,
    data: Any,
    batch_size: int | None,
    shuffle: bool,
    name: str,
    training: bool = False,
    **options: Any,
) -> Any:
    """``data`` as a loader of this rank's batches: in-memory data as Keras reads it (Python lists converted,
    floats in the model's dtype), a DataLoader sharded over the ranks."""
    data = _arrays.follow_model(
        _arrays.from_python(data, name), _arrays.model_float_dtype(trainer.model),
        isinstance(trainer.loss, _checks.CLASSIFICATION_LOSSES),
    )  # fmt: skip
    return as_loader(
        data, batch_size=batch_size, shuffle=shuffle, name=name, device=trainer.device, dist=trainer.dist,
        training=training, **options,
    )  # fmt: skip


def val_loaders(
    trainer: Trainer, data: Any, batch_size: int | None, name: str, single_pass: bool = False
) -> dict[str | None, Any]:
    """``{set name: loader}`` for validation data: one set (named None) or a dict of named sets."""
    return schedule.val_loaders(
        data, lambda one, where: make_loader(trainer, one, batch_size, False, where, single_pass=single_pass), name
    )


class DeviceFeed:
    """Puts a loader's batches on the device: ``feed(batch)`` returns the batch there and sets ``n`` (its
    samples). The first batch's input dtypes are checked against the model's (``_checks.py``)."""

    def __init__(self, trainer: Trainer, loader: Any) -> None:
        self.device = trainer.device
        self.non_blocking = pinned(loader, self.device)
        self.channels_last = trainer.channels_last
        self.copy = self.device.type != "cpu" or self.channels_last
        self.model = trainer.model if trainer.precision == "32" else None  # the first batch's check, once
        self.n = 0

    def __call__(self, batch: Any) -> Any:
        self.n = batch_size_of(batch)
        if self.model is not None:
            _checks.check_input_dtypes(split_batch(batch)[0], self.model)
            self.model = None
        if not self.copy:
            return batch
        batch = move_to_device(batch, self.device, self.non_blocking)
        if self.channels_last:
            batch = to_channels_last(batch)
        return batch


class TrainBatches:
    """One fit's training data: `epoch` gives each epoch's batches, on the device through `feed`.

    ``epoch_rng`` holds the random generators as they were before the current epoch's ``iter(loader)``
    (checkpointed mid-epoch), so that a resumed run rebuilds the same order and worker seeds without
    loading the batches it skips.
    """

    def __init__(self, trainer: Trainer, loader: Any, steps_per_epoch: int | None) -> None:
        self.loader = loader
        self.steps = steps_per_epoch
        self.fast = trainer.fast_tensor_batches and _tensor_batches.eligible(loader)
        self.info = trainer.dist
        self.feed = DeviceFeed(trainer, loader)

    def epoch(self, epoch: int, skip: int, epoch_rng: dict[str, Any] | None) -> tuple[Iterator[Any], Any]:
        """The epoch's batch iterator, starting after ``skip`` batches (a mid-epoch resume, which needs
        the ``epoch_rng`` recorded when the epoch began), and the generators' state before it began."""
        loader, steps = self.loader, self.steps
        distributed.set_epoch(loader, epoch)
        if skip == 0:
            epoch_rng = rng.capture(loader)
            iterator: Iterator[Any] = _tensor_batches.iterate(loader) if self.fast else iter(loader)
        elif epoch_rng is None:
            raise RuntimeError("internal: mid-epoch resume without the epoch's random state")
        else:
            iterator = self._resumed(skip, epoch_rng)
        if steps is not None:
            iterator = itertools.islice(iterator, max(0, steps - skip))
        return iterator, epoch_rng

    def _resumed(self, skip: int, epoch_rng: dict[str, Any]) -> Iterator[Any]:
        """The interrupted epoch's iterator after ``skip`` batches, drawn from the epoch's own random state;
        the generators are left as they were (or where the uninterrupted epoch leaves a loader's own)."""
        loader, steps = self.loader, self.steps
        now, replayed = rng.capture(loader), None
        rng.restore(epoch_rng, loader)
        if isinstance(loader, SkippableLoader):  # in-memory batches: re-draw the permutation, start at skip
            loader.skip_next(skip)
            iterator = iter(loader)
        elif self.fast or is_map_style(loader):
            resumed = _tensor_batches.resume if self.fast else resume_loader_iterator
            iterator = resumed(loader, skip)
            # The replay drew the whole epoch's indices from the loader's own generators, and a
            # RandomSampler draws once more when it is exhausted: keep them where the uninterrupted
            # epoch leaves them (a user's DataLoader(generator=g) then keeps its order in later epochs).
            total = num_batches(loader, None)
            if steps is None or (total is not None and steps > total):
                replayed = rng.capture_loader(loader)
        else:
            warnings.warn(
                f"resuming mid-epoch on {type(loader).__name__} without random access: "
                f"re-reading {skip} batches to skip them (they do not reach the model)",
                stacklevel=user_stacklevel(),
            )
            iterator = iter(loader)
            for _ in range(skip):
                next(iterator)
        rng.restore(now, loader)
        if replayed is not None:
            rng.restore_loader(replayed, loader)
        return iterator


def eval_batches(trainer: Trainer, loader: Any, steps: int | None, split: bool) -> tuple[Iterator[Any], Any]:
    """One validation set's batches for this rank (at most ``steps``) and the loader they come from. The
    same fast path as training: DataLoader(TensorDataset) batches cut by indexing, with the same draws."""
    loader = distributed.shard_eval(loader, trainer.dist, split)
    fast = trainer.fast_tensor_batches and _tensor_batches.eligible(loader)
    batches: Iterator[Any] = _tensor_batches.iterate(loader) if fast else iter(loader)
    if steps is not None:
        batches = itertools.islice(batches, steps)
    return batches, loader


def cpu(obj: Any) -> Any:
    """``obj``'s tensors on the CPU (predict's outputs)."""
    return move_to_device(obj, torch.device("cpu"))


__all__: list[str] = []
