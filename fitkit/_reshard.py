"""The rest of an interrupted epoch on another number of ranks (a checkpoint of N ranks resumed on M).

An epoch's global sample order is a function of the seed and the epoch only: under torchrun every rank's
DistributedSampler (or fitkit's sharded in-memory batcher) cuts its share out of one permutation of the
seed and the epoch, and one process draws its order from the random state recorded when the epoch began
(``epoch_rng``). So the samples the N ranks consumed before the checkpoint can be recomputed from a few
numbers (`order_spec`, written into the checkpoint) without storing any index: rank ``r`` read the first
``skip`` batches of its share. `remaining` lists the samples of the epoch not yet seen, in the global
order, each once; `share` cuts them into this rank's batches, the same number of batches on every rank
(DDP and FSDP need every rank to step together). A resumed-then-interrupted-again epoch keeps counting in
the same list: ``offset`` is how many of its samples were consumed before the current segment.

A stateful stream cannot be recomputed from numbers: it reshards itself when it implements
``reshard_state_dict(states, rank, world_size)`` (`reshard_source`), which takes the N ranks' saved
``state_dict()``s and returns this rank's state for ``world_size`` ranks.

Runs once, when the resumed epoch starts: nothing here is per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from fitkit import _compat, checkpoint, rng
from fitkit.data import InMemoryLoader, _ListBatchSampler, is_map_style, rebuild_loader


def order_spec(loader: Any) -> dict[str, Any] | None:
    """How ``loader`` orders an epoch, as plain values; None when fitkit cannot recompute it (a custom
    sampler or batch sampler, an iterable dataset, a loader of another kind)."""
    inner = getattr(loader, "loader", None)
    if isinstance(inner, InMemoryLoader) and hasattr(loader, "info"):  # the sharded in-memory batcher
        return {
            "kind": "distributed", "world_size": loader.info.world_size, "shuffle": inner.shuffle,
            "seed": loader.seed, "sampler_drop_last": False, "num_samples": inner.num_samples,
            "batch_size": inner.batch_size, "drop_last": inner.drop_last, "generator": None,
        }  # fmt: skip
    if isinstance(loader, InMemoryLoader):
        return {
            "kind": "random" if loader.shuffle else "sequential", "world_size": 1, "num_samples": loader.num_samples,
            "batch_size": loader.batch_size, "drop_last": loader.drop_last,
            "generator": None if loader.generator is None else "loader",
        }  # fmt: skip
    if not is_map_style(loader) or type(loader.batch_sampler) is not BatchSampler or loader.batch_size is None:
        return None
    sampler = loader.sampler
    spec: dict[str, Any] = {
        "num_samples": len(loader.dataset), "batch_size": loader.batch_size, "drop_last": loader.drop_last,
    }  # fmt: skip
    if type(sampler) is DistributedSampler:
        spec.update(
            kind="distributed", world_size=sampler.num_replicas, shuffle=sampler.shuffle, seed=sampler.seed,
            sampler_drop_last=sampler.drop_last, generator=None,
        )  # fmt: skip
        return spec
    if type(sampler) is SequentialSampler:
        return {**spec, "kind": "sequential", "world_size": 1, "generator": None}
    if (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and _compat.random_sampler_num_samples(sampler) is None
    ):
        own = sampler.generator
        which = None if own is None else ("loader" if own is loader.generator else "sampler")
        return {**spec, "kind": "random", "world_size": 1, "generator": which}
    return None


def _rank_orders(spec: dict[str, Any], epoch: int, epoch_rng: dict[str, Any] | None) -> list[list[int]]:
    """Each rank's index order for the epoch, as the run that wrote the checkpoint drew it."""
    n = spec["num_samples"]
    if spec["kind"] == "distributed":
        orders = []
        for rank in range(spec["world_size"]):
            sampler: DistributedSampler[int] = DistributedSampler(
                range(n),  # type: ignore[arg-type]  # only its length is read
                num_replicas=spec["world_size"], rank=rank, shuffle=spec["shuffle"], seed=spec["seed"],
                drop_last=spec["sampler_drop_last"],
            )  # fmt: skip
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        return orders
    if spec["kind"] == "sequential":
        return [list(range(n))]
    if epoch_rng is None:
        raise RuntimeError("internal: resharding a shuffled epoch of one process without its random state")
    # The draws iter(loader) made when the epoch began: the workers' base seed, then the sampler's order.
    generator = None
    loader_states = epoch_rng.get("loader", {})
    if spec["generator"] is not None:
        generator = torch.Generator()
        generator.set_state(loader_states[spec["generator"]])
    now = rng.capture()
    rng.restore(epoch_rng)
    try:
        base_generator = generator if spec["generator"] == "loader" else None
        torch.empty((), dtype=torch.int64).random_(generator=base_generator)
        order = list(RandomSampler(range(n), generator=generator))
    finally:
        rng.restore(now)
    return [order]


def remaining(origin: dict[str, Any], epoch: int) -> list[int]:
    """The samples of the interrupted epoch that no rank had read at the checkpoint, in the global order
    (position ``p`` of the order is rank ``p % N``'s ``p // N``-th sample), each once."""
    spec, skip = origin["spec"], origin["skip"]
    orders = _rank_orders(spec, epoch, origin.get("epoch_rng"))
    size = spec["batch_size"]
    consumed = {index for order in orders for index in order[: skip * size]}
    read = [order[: len(order) // size * size] if spec["drop_last"] else order for order in orders]
    longest = max(len(order) for order in read)
    interleaved = (order[i] for i in range(longest) for order in read if i < len(order))
    return [index for index in dict.fromkeys(interleaved) if index not in consumed]


def share(samples: list[int], rank: int, world_size: int, batch_size: int) -> tuple[list[list[int]], int]:
    """This rank's batches of ``samples``: global steps of ``world_size * batch_size`` samples, each step's
    chunk dealt out as ``chunk[rank::world_size]``, so every rank takes the same number of steps and every
    sample goes to one rank. A last chunk smaller than the world size repeats samples (returned: how many)
    so that no rank has an empty batch."""
    step = world_size * batch_size
    batches, repeated = [], 0
    for start in range(0, len(samples), step):
        chunk = samples[start : start + step]
        if len(chunk) < world_size:
            repeated = world_size - len(chunk)
            chunk = (chunk * world_size)[:world_size]
        batches.append(chunk[rank::world_size])
    return batches, repeated


def consumed_after(offset: int, batches_done: int, world_size: int, batch_size: int) -> int:
    """How many of `remaining`'s samples are consumed after ``batches_done`` batches of a segment that began
    at ``offset`` (every batch but a last short one takes ``world_size * batch_size``)."""
    return offset + batches_done * world_size * batch_size


def left_in_steps(origin: dict[str, Any], steps: int) -> int:
    """How many of `remaining`'s samples the N ranks that wrote the checkpoint would still have read under
    ``steps_per_epoch=steps``: each rank's batches ``skip`` to ``steps - 1`` (the first ones of the list)."""
    spec = origin["spec"]
    return max(0, steps - origin["skip"]) * spec["world_size"] * spec["batch_size"]


def reshardable(source: Any) -> bool:
    """Whether a stateful stream (or loader) deals its own unread data out to another number of ranks: it
    has ``reshard_state_dict(states, rank, world_size)`` (docs/checkpoints.md, "Another number of ranks")."""
    return callable(getattr(source, "reshard_state_dict", None))


def reshard_source(source: Any, saved: list[Any], info: Any, refuse_steps: bool) -> Any:
    """This rank's state of ``source`` for ``info.world_size`` ranks, from every saved rank's position
    (``saved``, by rank): ``source.reshard_state_dict(states, rank, world_size)``, where ``states`` are the N
    ranks' ``state_dict()``s. None when a rank saved no state. ``refuse_steps`` (``steps_per_epoch`` with
    ``strict``): a CheckpointError, since the stream deals out all that the N ranks had not read, not the
    batches each would still have read within ``steps_per_epoch``."""
    states = [None if part is None else part.get("state") for part in saved]
    if any(state is None for state in states):
        return None
    if refuse_steps:
        raise checkpoint.CheckpointError(
            f"this checkpoint was written by {len(saved)} process(es) in the middle of an epoch cut by "
            f"steps_per_epoch: {type(source).__name__}.reshard_state_dict deals out everything those processes had "
            f"not read, not just the batches each would still have read before steps_per_epoch, so the resumed "
            f"epoch on {info.world_size} cannot read exactly the samples left. Resume on {len(saved)} process(es), "
            "from an epoch-end checkpoint, without steps_per_epoch, or pass strict=False"
        )
    return source.reshard_state_dict(states, info.rank, info.world_size)


def merged_sums(saved: list[dict[str, Any]]) -> dict[str, Any]:
    """Every saved rank's running sums of the epoch added up (rank 0 of the new run holds them all, so the
    epoch's logs count every sample once); the metrics' states are rank 0's (metric states of the other saved
    ranks' share are not merged)."""
    trackers = [part["train_tracker"] for part in saved]
    sums: dict[str, torch.Tensor] = {}
    for tracker in trackers:
        for key, value in tracker["sums"].items():
            sums[key] = sums[key] + value if key in sums else value.clone()
    return {"sums": sums, "count": sum(int(t["count"]) for t in trackers), "metrics": trackers[0]["metrics"]}


def batches_of(loader: Any, batches: list[list[int]]) -> Iterator[Any]:
    """The batches with these indices, read through ``loader`` (its dataset, collate and workers)."""
    if isinstance(loader, DataLoader):
        clone = rebuild_loader(loader, batch_sampler=_ListBatchSampler(batches), persistent_workers=False)
        return iter(clone)
    inner = getattr(loader, "loader", loader)  # the sharded in-memory batcher cuts from its InMemoryLoader
    return (inner.batch(torch.tensor(index, device=inner.device)) for index in batches)


__all__: list[str] = []
