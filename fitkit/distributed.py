"""torch.distributed: the process group, samplers, reductions. The only module that imports it.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the Trainer sets up the process group
when the user has not (nccl on CUDA after selecting the local device, gloo on CPU), wraps the model in
DistributedDataParallel, shards the data, and all-reduces the epoch's sums. A second, gloo group carries
the small control messages (stop flags, signals) on the host, so they never synchronise a GPU stream.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

_STRATEGIES = ("auto", "ddp", "fsdp", "none")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    created_group: bool = False
    control_group: Any = None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    _sharded: dict[int, Any] = field(default_factory=dict)


def resolve_strategy(strategy: str) -> str:
    if strategy not in _STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: use 'auto' (DDP under torchrun), 'ddp', 'fsdp' or 'none'")
    return strategy


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized()
                                                           and dist.get_world_size() > 1)


def setup(strategy: str, device: torch.device, timeout_s: float) -> DistInfo:
    """Joins (or starts) the process group when the strategy asks for it."""
    if strategy == "none" or (strategy == "auto" and not _launched()):
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(f"strategy={strategy!r} needs torch.distributed, which this torch build lacks")
    if strategy == "fsdp" and not _has_fsdp2():
        raise ValueError("strategy='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                         "use strategy='ddp'")
    created = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen_device = None
    if device.type == "cuda":
        chosen_device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(chosen_device)
    if not dist.is_initialized():
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"strategy={strategy!r} needs a launcher such as torchrun (missing {var} in the "
                                   "environment), or call torch.distributed.init_process_group first")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=chosen_device if backend == "nccl" else None)
        created = True
        atexit.register(_teardown)
    world_size = dist.get_world_size()
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    info = DistInfo(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank, device=chosen_device,
                    created_group=created, control_group=control)
    if world_size > 1:
        info.reduce = lambda values: _all_reduce_sum(values, device if chosen_device is None else chosen_device)
    return info


def _teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist.get_backend() == "nccl":
        on_device = values.to(device)
        dist.all_reduce(on_device)
        return on_device.cpu()
    values = values.clone()
    dist.all_reduce(values)
    return values


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    if info.world_size == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device is not None else None
    return DistributedDataParallel(model, device_ids=device_ids)


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Skips DDP's gradient all-reduce on the accumulating batches of a group."""
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on any (a host-side gloo all-reduce)."""
    if info.world_size == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.control_group)
    return bool(value.item())


def any_signal(signum: int | None, info: DistInfo) -> int | None:
    if info.world_size == 1:
        return signum
    value = torch.tensor([signum or 0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.control_group)
    return int(value.item()) or None


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if info.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=info.control_group)
    return holder[0]


def gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, on every rank (a list of one without distribution)."""
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.control_group)
    return out


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier(group=info.control_group)


def set_epoch(loader: Any, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if hasattr(getattr(batch_sampler, "sampler", None), "set_epoch") and batch_sampler.sampler is not sampler:
        batch_sampler.sampler.set_epoch(epoch)


def _shard_seed() -> int:
    from fitkit import rng

    return rng.last_seed() or 0


def _rebuild(loader: DataLoader, sampler: Any) -> DataLoader:
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
                      persistent_workers=loader.persistent_workers)


def shard_train(loader: DataLoader, info: DistInfo) -> DataLoader:
    """Puts a DistributedSampler in place of the loader's sampler (shuffling preserved)."""
    if info.world_size == 1 or isinstance(loader.sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        warnings.warn("an IterableDataset cannot be sharded by fitkit: make each rank yield its own part "
                      "(torch.utils.data.get_worker_info and the RANK environment variable)", stacklevel=4)
        return loader
    if loader.batch_sampler is None or type(loader.batch_sampler).__name__ != "BatchSampler":
        raise ValueError("a custom batch_sampler cannot be sharded automatically; shard it yourself per rank")
    sampler = DistributedSampler(loader.dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=_shard_seed(),
                                 drop_last=loader.drop_last)
    return _rebuild(loader, sampler)


class _StridedSampler:
    """Indices ``rank, rank + world, ...``: every sample on exactly one rank, no padding duplicates."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_eval(loader: Any, info: DistInfo) -> Any:
    """A per-rank share of the evaluation data; each sample is counted exactly once across ranks."""
    if info.world_size == 1:
        return loader
    key = id(loader)
    if key in info._sharded:
        return info._sharded[key]
    from fitkit.data import InMemoryLoader

    if isinstance(loader, InMemoryLoader):
        sharded: Any = InMemoryLoader(loader.x[info.rank::info.world_size], loader.y[info.rank::info.world_size],
                                      loader.batch_size, shuffle=False)
    elif isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        sharded = _rebuild(loader, _StridedSampler(len(loader.dataset), info.rank, info.world_size))
    else:
        sharded = loader
    info._sharded[key] = sharded
    return sharded


def shard_in_memory(loader: Any, info: DistInfo, training: bool) -> Any:
    if not training:
        return loader  # sharded when evaluated
    from fitkit.data import InMemoryLoader

    return _ShardedInMemory(loader, info) if isinstance(loader, InMemoryLoader) else loader


class _ShardedInMemory:
    """The in-memory batcher's permutation, split across ranks like a DistributedSampler (padded)."""

    def __init__(self, loader: Any, info: DistInfo) -> None:
        self.loader, self.info = loader, info
        self.epoch = 0
        self.per_rank = -(-loader.num_samples // info.world_size)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, num_batches: int) -> None:
        self._skip = num_batches

    def __len__(self) -> int:
        return -(-self.per_rank // self.loader.batch_size)

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        n, world = self.loader.num_samples, self.info.world_size
        if self.loader.shuffle:
            g = torch.Generator()
            g.manual_seed(_shard_seed() + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        padded = torch.cat([order, order[: self.per_rank * world - n]])
        mine = padded[self.info.rank::world].to(self.loader.x.device)
        skip, self._skip = self._skip, 0
        size = self.loader.batch_size
        for start in range(skip * size, len(mine), size):
            index = mine[start:start + size]
            yield self.loader.x[index], self.loader.y[index]


@contextlib.contextmanager
def debug_sync_mode(mode: bool | str, device: torch.device) -> Iterator[None]:
    """torch.cuda.set_sync_debug_mode for the duration of ``fit`` (CUDA only)."""
    if not mode or device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error" if mode == "error" else "warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
