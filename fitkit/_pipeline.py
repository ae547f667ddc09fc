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
from torch.utils.data import DataLoader, IterableDataset

from fitkit import _arrays, _checks, _reshard, _tensor_batches, _watch, checkpoint, distributed, rng, schedule
from fitkit._devices import channels_last as to_channels_last
from fitkit._devices import pinned
from fitkit._loaders import SkippableLoader, as_loader, num_batches
from fitkit._warn import FitkitWarning, user_stacklevel
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


def _counts_may_differ(loader: Any, steps_per_epoch: int | None, info: distributed.DistInfo) -> bool:
    """Whether the ranks' training batches per epoch may differ (one gather of each rank's count, per fit):
    unknown on some rank (an IterableDataset), or known and unequal (a rank-aware sampler of the user's)."""
    count = num_batches(loader, steps_per_epoch)
    counts = distributed.gather_object(count, info)
    return None in counts or len(set(counts)) > 1


_DONE = object()


class TrainBatches:
    """One fit's training data: `epoch` gives each epoch's batches, on the device through `feed`.

    ``epoch_rng`` holds the random generators as they were before the current epoch's ``iter(loader)``
    (checkpointed mid-epoch), so that a resumed run rebuilds the same order and worker seeds without
    loading the batches it skips. Iterable data resumes from its own saved position when it has one
    (``source``: a loader, or a dataset read in the main process, with ``state_dict``/``load_state_dict``).
    A checkpoint of another number of ranks continues the interrupted epoch with the samples no rank had
    read (``_reshard``). `position` is what a mid-epoch checkpoint records; `restore` takes it back.
    """

    def __init__(self, trainer: Trainer, loader: Any, steps_per_epoch: int | None) -> None:
        # Random augmentation in workers without fitkit.data.seeded: watched, to warn at a mid-epoch checkpoint.
        self.random_workers = _watch.RandomWorkers(loader) if _watch.unseeded_workers(loader) else None
        if self.random_workers is not None:
            loader = self.random_workers.loader  # a shallow copy: the user's loader is left alone
        self.loader = loader
        self.steps = steps_per_epoch
        self.fast = trainer.fast_tensor_batches and _tensor_batches.eligible(loader)
        self.info = trainer.dist
        self.feed = DeviceFeed(trainer, loader)
        self.source = stateful_source(loader)  # whose state_dict() is the position in the data, if any
        self.order = _reshard.order_spec(loader)  # how an epoch's order is drawn, if fitkit can recompute it
        self.restored: dict[str, Any] | None = None  # what a resume loaded for the interrupted epoch
        self.segment: dict[str, Any] | None = None  # the resharded epoch being read: where it began
        # Under torchrun, data whose ranks may hold different numbers of batches (an IterableDataset, a rank's own
        # sampler) are read in step: a rank that ran out would leave the others waiting in DDP's all-reduce.
        self.in_step = self.info.world_size > 1 and _counts_may_differ(loader, steps_per_epoch, self.info)
        self.uneven_warned = False

    def epoch(self, epoch: int, skip: int, epoch_rng: dict[str, Any] | None) -> tuple[Iterator[Any], Any]:
        """The epoch's batch iterator, starting after ``skip`` batches (a mid-epoch resume, which needs
        the ``epoch_rng`` recorded when the epoch began), and the generators' state before it began."""
        loader, steps = self.loader, self.steps
        distributed.set_epoch(loader, epoch)
        restored, self.restored, self.segment = self.restored, None, None
        if skip == 0:
            epoch_rng = rng.capture(loader)
            iterator: Iterator[Any] = _tensor_batches.iterate(loader) if self.fast else iter(loader)
        elif restored is not None and restored.get("resharded") is not None:
            return self._resharded(epoch, skip, restored["resharded"]), epoch_rng  # steps_per_epoch: cut there
        elif epoch_rng is None:
            raise RuntimeError("internal: mid-epoch resume without the epoch's random state")
        else:
            iterator = self._resumed(skip, epoch_rng, None if restored is None else restored.get("state"))
        if steps is not None:
            iterator = itertools.islice(iterator, max(0, steps - skip))
        if self.in_step:
            iterator = self._in_step(iterator, epoch)
        return iterator, epoch_rng

    def _in_step(self, batches: Iterator[Any], epoch: int) -> Iterator[Any]:
        """``batches`` while every rank has one: before each batch the ranks agree that all of them have it (a
        host-side all-reduce of one number on fitkit's gloo group, no device sync), so when the shortest rank's
        data run out, every rank ends the epoch at that same batch instead of the others waiting for it in the
        next gradient all-reduce until the process group's timeout. The longer ranks' remaining batches go unread
        that epoch; rank 0 says so once per fit."""
        iterator, info, count = iter(batches), self.info, 0
        while True:
            batch = next(iterator, _DONE)
            if distributed.any_rank(batch is _DONE, info):
                break
            count += 1
            yield batch
        if distributed.any_rank(batch is not _DONE, info) and not self.uneven_warned:
            self.uneven_warned = True
            warnings.warn(
                f"the ranks' training data held different numbers of batches in epoch {epoch + 1}: every rank ended "
                f"the epoch after {count} batch(es), where the first rank's data ran out, and the other ranks' "
                "remaining batches went unread (data-parallel training steps every rank together). Give every rank "
                "the same number of batches (an IterableDataset: split the stream evenly over "
                "torch.distributed.get_rank() / get_world_size(), or stop each rank's part at a common count)",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )

    def _resumed(self, skip: int, epoch_rng: dict[str, Any], data_state: Any) -> Iterator[Any]:
        """The interrupted epoch's iterator after ``skip`` batches, drawn from the epoch's own random state;
        the generators are left as they were (or where the uninterrupted epoch leaves a loader's own)."""
        loader, steps = self.loader, self.steps
        now, replayed = rng.capture(loader), None
        rng.restore(epoch_rng, loader)
        if data_state is not None and self.source is not None:  # its own position: nothing is re-read
            self.source.load_state_dict(data_state)
            iterator = iter(loader)
        elif isinstance(loader, SkippableLoader):  # in-memory batches: re-draw the permutation, start at skip
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
                f"resuming mid-epoch on {type(loader).__name__}, which neither has random access nor saves its "
                f"position: re-reading {skip} batches to skip them (they do not reach the model). To resume at "
                "the exact sample without re-reading, give the iterable dataset (read with num_workers=0) or "
                "the loader state_dict()/load_state_dict() methods, or read it with torchdata's "
                "StatefulDataLoader",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
            iterator = iter(loader)
            for _ in range(skip):
                next(iterator)
        rng.restore(now, loader)
        if replayed is not None:
            rng.restore_loader(replayed, loader)
        return iterator

    def _resharded(self, epoch: int, skip: int, record: dict[str, Any]) -> Iterator[Any]:
        """The rest of an epoch interrupted under another number of ranks: this rank's share of the samples
        no rank had read (see ``_reshard``)."""
        assert self.order is not None  # checked by restore
        size = self.order["batch_size"]
        samples = _reshard.remaining(record["origin"], epoch)
        if self.steps is not None:  # the N ranks would have read only their next ``steps - skip`` batches each
            samples = samples[: _reshard.left_in_steps(record["origin"], self.steps)]
        samples = samples[record["offset"] :]
        batches, repeated = _reshard.share(samples, self.info.rank, self.info.world_size, size)
        if repeated:
            warnings.warn(
                f"the resumed epoch's last {len(samples) % (size * self.info.world_size)} samples are fewer than "
                f"the {self.info.world_size} ranks: {repeated} of them are read twice, so that no rank has an "
                "empty batch",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
        self.segment = {"origin": record["origin"], "offset": record["offset"], "start": skip, "batch_size": size}
        return _reshard.batches_of(self.loader, batches)

    def position(self, batch_in_epoch: int) -> dict[str, Any]:
        """Where this rank is in the epoch's data, for a mid-epoch checkpoint (`Trainer.state_dict`'s
        ``data_position``): ``state`` (the stateful source's ``state_dict()``), ``order`` (how the epoch's
        order is drawn, see ``_reshard.order_spec``) and ``resharded`` (in a resharded epoch, its origin
        and how many of its remaining samples are consumed)."""
        segment, resharded = self.segment, None
        if segment is not None:
            done = batch_in_epoch - segment["start"]
            offset = _reshard.consumed_after(segment["offset"], done, self.info.world_size, segment["batch_size"])
            resharded = {"origin": segment["origin"], "offset": offset}
        if self.random_workers is not None:
            self.random_workers.warn_once()
        if self.source is None:
            return {"state": None, "order": self.order, "resharded": resharded}
        return {"state": self.source.state_dict(), "order": None, "resharded": None}  # its own order: per rank

    def restore(self, saved: list[Any], skip: int, epoch_rng: dict[str, Any] | None, strict: bool) -> bool:
        """Takes back every rank's saved `position` (``saved``, by rank; None at an epoch's end) for the
        interrupted epoch, which resumes after ``skip`` batches. On another number of ranks it continues with
        the samples no rank had read; ``epoch_rng`` is rank 0's (one process's order is drawn from it).
        A stateful source that implements ``reshard_state_dict`` (`_reshard.reshard_source`) is handed every
        saved rank's state and returns this rank's. Returns False when the epoch cannot be resharded (the
        caller decides with ``strict``) and changes nothing then; raises a CheckpointError (``strict``) for a
        resharded stream under ``steps_per_epoch``, which cannot be exact."""
        mine = saved[self.info.rank % len(saved)]
        if skip == 0:  # an epoch's end: the next epoch starts afresh on any number of ranks
            return True
        if mine is None:  # written before fitkit saved data positions: the same ranks replay as before
            return len(saved) == self.info.world_size or not strict
        resharded = mine.get("resharded")
        if resharded is None and len(saved) == self.info.world_size:
            self.restored = {"state": mine.get("state")}
            return True
        if resharded is None and self.source is not None and _reshard.reshardable(self.source):
            state = _reshard.reshard_source(self.source, saved, self.info, strict and self.steps is not None)
            if state is not None:
                self.restored = {"state": state}
                return True
        if self.order is None or self.source is not None or (resharded is None and mine.get("order") is None):
            if strict:
                return False
            self.restored = {"state": mine.get("state")}  # strict=False: each rank's own part, as it was
            return True
        if resharded is None:
            spec = mine["order"]
            origin = {"spec": spec, "skip": skip, "epoch_rng": epoch_rng if spec["kind"] == "random" else None}
            resharded = {"origin": origin, "offset": 0}
        self.restored = {"resharded": resharded}
        return True


def restore_positions(train: TrainBatches, state: dict[str, Any], saved: list[dict[str, Any]], strict: bool) -> bool:
    """A resumed fit's part of ``Trainer.load_state_dict`` for the data: hands every saved rank's position
    to ``train`` (`TrainBatches.restore`). Returns True when the checkpoint was written by another number of
    ranks and the interrupted epoch goes on with the samples no rank had read (with a warning); raises a
    CheckpointError (``strict``) when the data cannot be dealt out to another number of ranks."""
    saved_world, world = state.get("world_size", 1), train.info.world_size
    positions = [part.get("data_position") for part in saved]
    if not train.restore(positions, state["trainer"]["batch_in_epoch"], saved[0].get("epoch_rng"), strict):
        raise checkpoint.world_size_mismatch(saved_world, world)
    if saved_world == world or not strict:
        return False
    if (state.get("accumulation") or {}).get("grads") is not None:
        raise checkpoint.CheckpointError(
            f"this checkpoint was written by {saved_world} process(es) in the middle of a gradient accumulation "
            f"group, whose partial gradients belong to those processes: resume it on {saved_world}, or from a "
            "checkpoint written at an optimizer step"
        )
    warnings.warn(
        f"resuming a checkpoint written by {saved_world} process(es) on {world}: the interrupted epoch continues "
        f"with the samples no rank had read, each once, dealt out to the {world}; the weights will not be "
        f"bit-identical to those of an uninterrupted {saved_world}-process run (other batches per rank, another "
        "reduction order, other random streams per rank)",
        FitkitWarning,
        stacklevel=user_stacklevel(),
    )
    return True


def stateful_source(loader: Any) -> Any:
    """The object whose ``state_dict()`` is the position in ``loader``'s data: the loader itself when it has
    ``state_dict``/``load_state_dict`` (torchdata's StatefulDataLoader, also over map-style data: its workers
    draw otherwise than a DataLoader's, so only its own state resumes it exactly; a re-iterable of batches), or
    a DataLoader's iterable dataset that has them, read in the main process (with workers, each holds a copy
    whose position the main process cannot see). None otherwise: DataLoaders replay their indices instead."""
    if _has_state(loader):
        return loader
    dataset = getattr(loader, "dataset", None)
    if isinstance(loader, DataLoader) and isinstance(dataset, IterableDataset) and _has_state(dataset):
        return dataset if loader.num_workers == 0 else None
    return None


def _has_state(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


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
