"""torch.distributed: the process group, samplers, reductions. The only module that imports it.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the Trainer sets up the process group
when the user has not (nccl on CUDA after selecting the local device, gloo on CPU), wraps the model in
DistributedDataParallel (or shards it with FSDP2), shards the data, and all-reduces the epoch's sums. A
second, gloo group that only fitkit uses carries the small control messages (stop flags, signals) on the
host, so they never synchronise a GPU stream, and so that a failing rank can close it to release the
others at once (see `on_failure`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import itertools
import math
import os
import pickle
import re
import socket
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from fitkit import _compat, rng, slurm
from fitkit._warn import FitkitWarning, only_on_rank_zero, user_stacklevel
from fitkit.data import InMemoryLoader, rebuild_loader

_setups = itertools.count()  # numbers each setup() in this process: every rank builds its Trainers in order


class PeerFailure(RuntimeError):
    """Raised on every other rank when one rank of a distributed run failed: this rank stopped as well.

    The message names the rank that failed first and its exception; the exception this rank saw (the
    collective that could not complete) is chained as ``__cause__``.
    """


@dataclass
class DistInfo:
    """What the Trainer knows of the distributed run; ``world_size == 1`` without one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    strategy: str = "none"
    backend: str | None = None
    created_group: bool = False
    control_group: Any = None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    failure_key: str = ""
    closed_by: str | None = None
    _sharded: weakref.WeakKeyDictionary[Any, Any] = field(default_factory=weakref.WeakKeyDictionary)
    _background: DistInfo | None = None


def background(info: DistInfo) -> DistInfo:
    """``info`` for collectives run from a background thread (an asynchronous sharded save's): the same ranks
    with a gloo group of their own instead of the control group, so they never interleave with the loop's
    control messages nor with the model's collectives on the default group. The group is created by the first
    call (a collective: every rank calls it at the same point) and kept."""
    if info._background is None:
        group = dist.new_group(backend="gloo") if info.world_size > 1 or dist.is_initialized() else None
        info._background = dataclasses.replace(info, control_group=group, reduce=None, _background=None)
    return info._background


def _launched() -> bool:
    """Launched as one of several processes: by torchrun (WORLD_SIZE), by srun (`fitkit.slurm`), or into a
    process group the user initialised."""
    if "RANK" not in os.environ and slurm.launch_environment() is not None:
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )


def setup(strategy: str, device: torch.device, timeout_s: float) -> DistInfo:
    """Joins (or starts) the process group when the strategy asks for it.

    Args:
        strategy: the strategy's name (`fitkit.strategies.resolve`): ``"auto"`` (distributed when launched
            with WORLD_SIZE > 1, by srun with several tasks, or when the user initialised a process group of
            several ranks), ``"ddp"``,
            ``"fsdp"`` or ``"none"``.
        device: the device the Trainer resolved; a CUDA device is replaced by ``cuda:LOCAL_RANK``.
        timeout_s: seconds a collective waits before failing, for the groups fitkit creates.
    """
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not timeout_s > 0
        or math.isinf(timeout_s)
    ):
        raise ValueError(
            f"process_group_timeout must be a finite number of seconds > 0, got {timeout_s!r}; it "
            "bounds how long a collective waits for a rank that stopped answering"
        )
    if strategy == "none" or (strategy == "auto" and not _launched()):
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(
            f"strategy={strategy!r} needs torch.distributed, which this torch build lacks; use strategy='none'"
        )
    timeout = datetime.timedelta(seconds=float(timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen_device = None
    if device.type == "cuda":
        chosen_device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(chosen_device)
    created = False
    if not dist.is_initialized():
        _init_process_group(strategy, device, chosen_device, timeout)
        created = True
        atexit.register(_teardown)
    backend = dist.get_backend()
    only_on_rank_zero(dist.get_rank())  # the same advice from N ranks would print N times
    if device.type == "cuda" and backend == "gloo":
        warnings.warn(
            "the process group uses gloo on a CUDA run: gradient all-reduces go through the host; "
            "initialise it with backend='nccl' (fitkit does when it creates the group)",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )
    # fitkit's own host-side group, never the default one: a failing rank closes it to release the others
    # (see on_failure), and its messages never wait behind (or interleave with) DDP's gradient all-reduces.
    control = dist.new_group(backend="gloo", timeout=timeout)
    world_size = dist.get_world_size()
    info = DistInfo(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        device=chosen_device,
        strategy=strategy,
        backend=backend,
        created_group=created,
        control_group=control,
    )
    if world_size > 1:
        info.reduce = _SumOverRanks(info)
        info.failure_key = f"fitkit/failure/{broadcast_object(_new_round() if info.rank == 0 else None, info)}"
    return info


def _new_round() -> int:
    """A number the default group's store never handed out before (0 without a store): rank 0's is broadcast,
    so that every rank of this group keys its failure report alike, whatever each torchrun agent's restart
    count, and apart from a dead attempt's keys in a store that outlived it."""
    store = _store()
    try:
        return 0 if store is None else int(store.add("fitkit/rounds", 1))
    except Exception:  # a store without counters (a custom backend's)
        return next(_setups)


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (``TORCHELASTIC_RESTART_COUNT``; 0 without it)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _init_process_group(
    strategy: str, device: torch.device, chosen_device: torch.device | None, timeout: datetime.timedelta
) -> None:
    """Creates the default process group from the launcher's environment: torchrun's variables, else
    srun's (`fitkit.slurm.launch_environment`, set into ``os.environ`` as torchrun would have)."""
    if "RANK" not in os.environ and (from_slurm := slurm.launch_environment()) is not None:
        os.environ.update(from_slurm)
    missing = [var for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if var not in os.environ]
    if missing:
        raise RuntimeError(
            f"strategy={strategy!r} needs a launcher: {', '.join(missing)} missing from the "
            "environment. Run the script with torchrun (torchrun --nproc_per_node=2 train.py) or srun, "
            "call torch.distributed.init_process_group first, or use strategy='auto'/'none' "
            "to train in one process"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        timeout=timeout,
        device_id=chosen_device if backend == "nccl" else None,
        **_elastic_store(timeout),
    )


def _elastic_store(timeout: datetime.timedelta) -> dict[str, Any]:
    """Under torchrun, the keyword arguments that give this attempt's group keys of its own.

    By default torchrun's workers build their group in the agent's TCP store, which outlives them: the
    workers of a restart would read the addresses the dead workers left there and hang or get "Connection
    refused" (pytorch/pytorch#135712). Torchrun's restart count cannot key the attempts apart on several
    nodes: an agent whose own workers did not fail restarts them for the membership change without counting
    a restart, so the nodes' counts differ. The ranks agree on a fresh prefix through the store instead
    (`_agree_on_generation`). Empty (torch's own ``env://`` rendezvous) outside torchrun or with a store of
    the rendezvous' own (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    generation = _agree_on_generation(agent_store, rank, world_size, timeout.total_seconds())
    return {
        "store": dist.PrefixStore(f"fitkit/generation{generation}", agent_store),
        "rank": rank,
        "world_size": world_size,
    }


def _agree_on_generation(store: Any, rank: int, world_size: int, timeout_s: float) -> int:
    """A number that every rank of this attempt gets and that no earlier attempt used, agreed through
    ``store`` (which may hold the keys of dead attempts' workers).

    Rank 0 draws it from a counter (``add``: never handed out before). Every other rank appends a token of
    its own (fresh: a dead worker cannot have written it) to the list of greetings and waits for the
    answer under that token: only a live rank 0 answers, with its number. Rank 0 answers every token it
    finds (a dead worker's too: nobody reads that answer) until every rank of the attempt has counted
    itself in under the new number, then empties the list.
    """
    if rank != 0:
        token = uuid.uuid4().hex
        store.append("fitkit/greetings", f"{token},")
        generation = int(_text(store.get(f"fitkit/answer/{token}")))  # waits, up to the store's timeout
        store.add(f"fitkit/generation{generation}/joined", 1)
        return generation
    generation = int(store.add("fitkit/generations", 1))
    answered: set[str] = set()
    deadline, pause = time.monotonic() + timeout_s, 0.002
    while int(store.add(f"fitkit/generation{generation}/joined", 0)) < world_size - 1:
        if store.check(["fitkit/greetings"]):
            for token in _text(store.get("fitkit/greetings")).split(","):
                if token and token not in answered:
                    store.set(f"fitkit/answer/{token}", str(generation))
                    answered.add(token)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank 0 waited {timeout_s:.0f} s for the other {world_size - 1} rank(s) of this torchrun attempt "
                f"to join; {int(store.add(f'fitkit/generation{generation}/joined', 0))} did. A node that never "
                "started its workers, or a blocked network between the nodes?"
            )
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    store.delete_key("fitkit/greetings")  # every live rank's token is answered; the rest are the dead's
    return generation


def _teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _SumOverRanks:
    """``info.reduce``: sums the epoch's flat sums over the ranks; ``common_keys`` first agrees on their layout."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return _all_reduce(values.to("cpu", copy=True), self.info)  # on the host, on fitkit's gloo control group

    def common_keys(self, keys: list[str]) -> list[str]:
        """The union of every rank's keys, in rank order (a host-side gather): a rank that saw no batch has
        none, and its all-reduce must still have the length of the others' (a shorter one hangs nccl)."""
        return list(dict.fromkeys(key for rank_keys in gather_object(list(keys), self.info) for key in rank_keys))


def broadcast_from_rank_zero(tensor: torch.Tensor) -> None:
    """Overwrites ``tensor`` on every rank with rank 0's values, in place (a collective on the default group)."""
    dist.broadcast(tensor, src=0)


# -- control messages ---------------------------------------------------------------------------
def _control(info: DistInfo) -> Any:
    if info.control_group is None:
        raise RuntimeError(
            f"the distributed run already failed ({info.closed_by}); its control group is closed, "
            "so no rank can take part in a collective any more. Restart the job (resume from the "
            "last checkpoint)"
        )
    return info.control_group


class _InFlight:
    """The tensors that fitkit's collectives handed to gloo, until gloo's worker threads let go of them.

    A gloo collective runs on a worker thread of its process group, which drops its reference to the
    operation just after completing it: with it the last C++ reference to the tensors, whose Python
    objects it then releases, under the GIL. If that thread is still on its way there when the
    interpreter finalizes (the main thread went on to exit right after the collective returned),
    CPython ends the thread while it waits for the GIL, and unwinding through the C++ destructor aborts
    the process: "terminate called without an active exception", exit code -6, on a run that finished.
    So every collective on the control group goes through `_run`, which records its tensors, and `drain`
    (run at exit) waits until the workers have released them.
    """

    def __init__(self) -> None:
        self.entries: list[list[Any]] = []  # [tensor, its use count before the collective, the Work or None]
        self.registered = False

    def add(self, tensors: Sequence[torch.Tensor], bases: Sequence[int], work: Any) -> None:
        if not self.registered:  # after init_process_group's teardown: atexit runs this first (LIFO)
            atexit.register(self.drain)
            self.registered = True
        self.entries = [entry for entry in self.entries if not self._released(entry)]
        self.entries.extend([tensor, base, work] for tensor, base in zip(tensors, bases))

    @staticmethod
    def _released(entry: list[Any]) -> bool:
        tensor, base, work = entry
        if work is not None:
            if not work.is_completed():
                return False
            entry[2] = None  # the worker may still hold the Work (and so the tensor) a moment longer
        return _compat.tensor_use_count(tensor) <= base

    def let_go(self) -> None:
        """Drops every Work it holds (the control group is being closed): a Work holds the group's
        connections open, and they must close for the other ranks to be released. The tensors of the
        collectives that completed are still waited for at exit; the others never complete."""
        self.entries = [
            [tensor, base, None] for tensor, base, work in self.entries if work is None or work.is_completed()
        ]

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Waits (releasing the GIL) until gloo holds none of the tensors of a completed collective; True
        when it got there. A collective that never completed (a peer that died) is not waited for."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.entries = [entry for entry in self.entries if not self._released(entry)]
            if all(work is not None for _, _, work in self.entries):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)


_in_flight = _InFlight()


def _run(
    collective: Callable[..., Any], tensors: Sequence[torch.Tensor | list[torch.Tensor]], info: DistInfo, **kwargs: Any
) -> Any:
    """Starts ``collective(*tensors, group=<control group>, async_op=True, **kwargs)``; returns its Work.
    ``tensors`` are its arguments, each a tensor or a list of tensors (all_gather's outputs)."""
    flat = [t for arg in tensors for t in (arg if isinstance(arg, list) else [arg])]
    bases = [_compat.tensor_use_count(t) for t in flat]
    work = collective(*tensors, group=_control(info), async_op=True, **kwargs)
    _in_flight.add(flat, bases, work)
    return work


def _all_reduce(tensor: torch.Tensor, info: DistInfo, op: Any = None) -> torch.Tensor:
    """``tensor`` reduced over the ranks in place (SUM unless ``op``) on the control group; returns it."""
    _run(dist.all_reduce, [tensor], info, op=dist.ReduceOp.SUM if op is None else op).wait()
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on any (a host-side gloo all-reduce of one number)."""
    if info.world_size == 1:
        return flag
    return bool(_all_reduce(torch.tensor([int(flag)]), info, dist.ReduceOp.MAX).item())


class StopVote:
    """The per-batch vote "does any rank stop?", asynchronous: started after a batch, read at the next one.

    A host-side gloo all-reduce costs a round trip between the ranks (~0.3 ms on one machine), which a
    synchronous vote after every batch adds to every step. Started once a batch is done (`start`)
    and read once the next batch has been fetched (`stop_now`), it travels while that batch loads.
    The decision still lands on the same step on every rank: a rank that wants to stop after batch ``i``
    does not step on batch ``i + 1`` either, since every rank reads the vote before stepping on it.
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self._value: torch.Tensor | None = None
        self._work: Any = None

    def start(self, flag: bool | int) -> None:
        """Votes ``flag``: 0 go on, or a stop code (the largest over the ranks wins)."""
        self._value = torch.tensor([int(flag)])
        self._work = _run(dist.all_reduce, [self._value], self.info, op=dist.ReduceOp.MAX)

    def stop_now(self) -> int:
        """The last started vote's result: the largest code voted (non-zero when any rank voted to stop); 0 when
        none is pending."""
        if self._work is None or self._value is None:
            return 0
        work, self._work = self._work, None
        work.wait()
        return int(self._value.item())


def any_signal(signum: int | None, info: DistInfo) -> int | None:
    """The signal number any rank received (the largest), on every rank; None when none did."""
    if info.world_size == 1:
        return signum
    return int(_all_reduce(torch.tensor([signum or 0]), info, dist.ReduceOp.MAX).item()) or None


def mean_over_ranks(values: dict[str, float], info: DistInfo | None) -> dict[str, float]:
    """The mean of each value over the ranks (every rank must pass the same keys); a host-side all-reduce."""
    if info is None or info.world_size == 1 or not values:
        return values
    keys = sorted(values)
    summed = _all_reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64), info)
    return {k: v / info.world_size for k, v in zip(keys, summed.tolist())}


def _to_bytes(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor) -> Any:
    return pickle.loads(data.numpy().tobytes())  # from the job's own ranks, as torch's *_object collectives do


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (pickled, like ``torch.distributed.broadcast_object_list``)."""
    if info.world_size == 1:
        return obj
    payload = _to_bytes(obj) if info.rank == 0 else torch.empty(0, dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    _run(dist.broadcast, [size], info, src=0).wait()
    if info.rank != 0:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    _run(dist.broadcast, [payload], info, src=0).wait()
    return obj if info.rank == 0 else _from_bytes(payload)


def gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, on every rank (a list of one without distribution)."""
    if info.world_size == 1:
        return [obj]
    payload = _to_bytes(obj)
    sizes = torch.zeros(info.world_size, dtype=torch.int64)
    sizes[info.rank] = payload.numel()
    widths = _all_reduce(sizes, info).tolist()
    padded = torch.zeros(max(widths), dtype=torch.uint8)
    padded[: payload.numel()] = payload
    rows = [torch.empty_like(padded) for _ in range(info.world_size)]
    _run(dist.all_gather, [rows, padded], info).wait()
    return [_from_bytes(row[:width]) for row, width in zip(rows, widths)]


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        _all_reduce(torch.zeros(1), info)


def on_every_rank(error: BaseException) -> BaseException:
    """Marks ``error`` as raised by every rank at the same point (an agreed decision): ``fit`` then raises it
    as it is, not as one rank's failure (see `on_failure`)."""
    error._fitkit_on_every_rank = True  # type: ignore[attr-defined]
    return error


def raised_on_every_rank(error: BaseException) -> bool:
    return getattr(error, "_fitkit_on_every_rank", False) is True


def _store() -> Any:
    try:
        return _compat.default_store()
    except Exception:  # a process group without a store (a fake or custom backend): no messages
        return None


def on_failure(exc: BaseException, info: DistInfo) -> PeerFailure | None:
    """Called on a rank whose ``fit`` is ending with an exception that the other ranks did not raise with it.

    The first rank to fail records what happened in the rendezvous store, then closes fitkit's control
    group: the other ranks wait in (or soon reach) a control all-reduce, which then fails at once instead
    of waiting for the process-group timeout. Those ranks come here with that error and get back a
    [PeerFailure][fitkit.distributed.PeerFailure] naming the rank that failed first, to raise in its place. A rank blocked inside
    a gradient all-reduce of the default group is released when the failed process exits (its sockets
    close), as a crashed script's does; with nccl, the default group is aborted so that no GPU work
    waits on a rank that is gone.
    """
    if info.world_size == 1 or info.control_group is None:
        return None
    mine = f"rank {info.rank} on {socket.gethostname()} raised {type(exc).__name__}: {exc}"
    gone = _peer_gone(exc)
    if gone:  # no rank reported an error: one was killed (its connections closed) and cannot say so itself
        mine = (
            f"{_ENDED}, so rank {info.rank} on {socket.gethostname()} lost its "
            f"connection to it ({str(exc).splitlines()[0][:160]}): it was probably killed (SIGKILL, the out-of-memory "
            "killer, a preemption) or its machine failed; torchrun's failure summary names it and its exit signal"
        )
    first = mine
    store = _store()
    if store is not None:
        try:
            first = _text(store.compare_set(info.failure_key, "", mine))  # the first rank to fail wins
        except Exception:  # the store itself is gone (its host died): nothing better to report
            first = mine
    info.closed_by = first
    _in_flight.let_go()
    group, info.control_group = info.control_group, None
    with contextlib.suppress(Exception):
        dist.destroy_process_group(group)
    del group
    if info.backend == "nccl":
        with contextlib.suppress(Exception):
            _compat.abort_process_group()
    if first == mine and not gone:
        return None
    return PeerFailure(
        f"{first}; rank {info.rank} stopped too (the distributed run cannot go on without it). "
        f"{'Find out why it ended' if first.startswith(_ENDED) else 'Fix that error'} and restart the job, resuming "
        "from the last checkpoint"
    )


#: What gloo and nccl say when a peer process is gone (its sockets closed) rather than failed with an error.
_PEER_GONE = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|Connection refused|remote process exited|"
    r"NCCL communicator was aborted on rank|ProcessGroupNCCL.*(timeout|Watchdog caught)",
    re.IGNORECASE,
)


_ENDED = "a rank ended without reporting an error"


def _peer_gone(exc: BaseException) -> bool:
    return isinstance(exc, (RuntimeError, ConnectionError)) and bool(_PEER_GONE.search(str(exc)))


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def local_metric_values(metrics: list[Any]) -> Iterator[None]:
    """Inside it, torchmetrics metrics compute this rank's own value, without their cross-process sync (a
    collective): for readers that run on one rank only, such as the progress bar's running logs. Their
    cached value is left as it was, so the epoch's synced ``compute`` is not served a local one."""
    inner = [m.metric for m in metrics if _compat.is_torchmetrics_metric(getattr(m, "metric", None))]
    with _compat.torchmetrics_without_sync(inner):
        yield


# -- data ---------------------------------------------------------------------------------------
def set_epoch(loader: Any, epoch: int) -> None:
    """Tells a distributed sampler (or the sharded in-memory batcher) which epoch's order to draw, and a
    DataLoader's dataset which epoch it serves when it asks (`fitkit.data.seeded`, Hugging Face datasets)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    dataset: Any = getattr(loader, "dataset", None)
    if callable(getattr(dataset, "set_epoch", None)):
        dataset.set_epoch(epoch)
    sampler: Any = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner: Any = getattr(batch_sampler, "sampler", None)
    if hasattr(inner, "set_epoch") and inner is not sampler:
        inner.set_epoch(epoch)


def _shard_seed(info: DistInfo) -> int:
    """The shuffling seed shared by every rank: rank 0's ``seed_everything`` seed (0 without one)."""
    return int(broadcast_object(rng.last_seed() or 0, info))


def _rank_aware(sampler: Any) -> bool:
    return isinstance(sampler, DistributedSampler) or (hasattr(sampler, "num_replicas") and hasattr(sampler, "rank"))


def shard_train(loader: DataLoader, info: DistInfo) -> DataLoader:
    """Puts a DistributedSampler in place of the loader's sampler (shuffling preserved).

    Every rank then reads ``ceil(len(dataset) / world_size)`` samples per epoch: the sampler pads with
    the first samples of the epoch's order so that all ranks take the same number of steps.
    """
    if info.world_size == 1:
        return loader
    if isinstance(loader.dataset, IterableDataset):
        warnings.warn(
            "an IterableDataset cannot be sharded by fitkit: make each rank yield its own part "
            "(torch.distributed.get_rank() / get_world_size()), with the same number of batches on "
            "every rank",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )
        return loader
    if _rank_aware(loader.sampler) or _rank_aware(getattr(loader.batch_sampler, "sampler", None)):
        return loader  # the user's own per-rank sampler
    if loader.batch_sampler is None or type(loader.batch_sampler) is not BatchSampler:
        raise ValueError(
            f"train_data uses a custom batch_sampler ({type(loader.batch_sampler).__name__}), which "
            "fitkit cannot split across ranks; give it a per-rank sampler (with num_replicas and "
            "rank attributes, as DistributedSampler has) or use batch_size= with shuffle="
        )
    sampler = loader.sampler
    if type(sampler) is RandomSampler and (
        sampler.replacement or _compat.random_sampler_num_samples(sampler) is not None
    ):
        raise ValueError(
            "train_data's RandomSampler draws with replacement or a fixed num_samples, which a "
            "DistributedSampler cannot reproduce; shard it yourself per rank, or use shuffle=True"
        )
    if type(sampler) not in (RandomSampler, SequentialSampler):
        raise ValueError(
            f"train_data uses a {type(sampler).__name__}, which fitkit cannot split across ranks "
            "without changing what it draws; pass a per-rank sampler of your own (one with "
            "num_replicas and rank attributes, such as a DistributedSampler) in its place"
        )
    distributed_sampler: DistributedSampler[int] = DistributedSampler(
        loader.dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=type(sampler) is RandomSampler,
        seed=_shard_seed(info),
        drop_last=loader.drop_last,
    )
    return rebuild_loader(loader, sampler=distributed_sampler)


class _StridedSampler:
    """Indices ``rank, rank + world, ...``: every sample on exactly one rank, no padding duplicates."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_eval(loader: Any, info: DistInfo, split: bool = True) -> Any:
    """A per-rank share of the evaluation data; each sample is counted exactly once across ranks.

    Shares differ by at most one sample (no padding duplicates). Under FSDP every forward pass is a
    collective, so every rank must run the same number of batches: there each rank evaluates all the data
    and the all-reduced sums give the same means (at ``world_size`` times the work).
    """
    if info.world_size == 1 or not split:
        return loader
    with contextlib.suppress(KeyError, TypeError):
        return info._sharded[loader]
    if isinstance(loader, InMemoryLoader):
        sharded: Any = loader.subset(slice(info.rank, None, info.world_size))
    elif (
        isinstance(loader, DataLoader)
        and isinstance(loader.dataset, Sized)  # a map-style dataset that says its length
        and not isinstance(loader.dataset, IterableDataset)
    ):
        if loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler:
            raise ValueError(
                f"validation data uses a custom batch_sampler ({type(loader.batch_sampler).__name__}) "
                "that fitkit cannot split across ranks; use batch_size= on the DataLoader"
            )
        sharded = rebuild_loader(loader, sampler=_StridedSampler(len(loader.dataset), info.rank, info.world_size))
    else:
        warnings.warn(
            f"validation data of type {type(loader).__name__} cannot be sharded: every rank evaluates "
            "all of it and the means stay right, at world_size times the work; pass a DataLoader over a "
            "map-style dataset or (x, y) tensors to split it",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )
        sharded = _Replicated(loader, info.world_size)
    with contextlib.suppress(TypeError):
        info._sharded[loader] = sharded
    return sharded


def shard_predict(loader: Any, info: DistInfo, split: bool = True) -> tuple[Any, bool]:
    """``predict``'s per-rank share of ``loader`` (as `shard_eval` splits it) and whether it is
    strided: rank r holds samples r, r + world_size, ... of the data in order. False when every rank reads
    all of it (one process, FSDP, or data that cannot be split)."""
    sharded = shard_eval(loader, info, split)
    return sharded, sharded is not loader and not isinstance(sharded, _Replicated)


class _Replicated:
    """Evaluation data that every rank reads whole (the sums are all-reduced, so the means stay right)."""

    def __init__(self, loader: Any, world_size: int) -> None:
        self.loader, self.world_size = loader, world_size

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


def shard_in_memory(loader: Any, info: DistInfo, training: bool) -> Any:
    if not training:
        return loader  # sharded when evaluated
    return _ShardedInMemory(loader, info) if isinstance(loader, InMemoryLoader) else loader


class _ShardedInMemory:
    """The in-memory batcher's epoch order split across ranks as a DistributedSampler splits it (padded).

    It draws the permutation that ``DistributedSampler(seed=seed)`` draws for the epoch, so in-memory
    data and a DataLoader give the same batches on every rank.
    """

    def __init__(self, loader: Any, info: DistInfo) -> None:
        self.loader, self.info = loader, info
        self.seed = _shard_seed(info) if loader.shuffle else 0
        self.epoch = 0
        self.per_rank = -(-loader.num_samples // info.world_size)
        self._skip = 0

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    @property
    def pin_memory(self) -> bool:
        return bool(self.loader.pin_memory)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, num_batches: int) -> None:
        self._skip = num_batches

    def __len__(self) -> int:
        if self.loader.drop_last:
            return self.per_rank // self.loader.batch_size
        return -(-self.per_rank // self.loader.batch_size)

    def __iter__(self) -> Iterator[Any]:
        # The epoch's indices are made and copied to the device here, eagerly: the loop calls iter()
        # before its debug_sync window opens, and a pageable host-to-device copy is a sync.
        mine, skip = self._indices()
        self._skip = 0
        return self._batches(mine, skip)

    def _indices(self) -> tuple[torch.Tensor, int]:
        n, world = self.loader.num_samples, self.info.world_size
        if self.loader.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.per_rank * world
        padded = order.repeat(-(-total // n))[:total]  # DistributedSampler's padding
        return padded[self.info.rank :: world].to(self.loader.device), self._skip

    def _batches(self, mine: torch.Tensor, skip: int) -> Iterator[Any]:
        size = self.loader.batch_size
        for start in range(skip * size, len(self) * size if self.loader.drop_last else len(mine), size):
            index = mine[start : start + size]
            yield self.loader.batch(index)


__all__ = [
    "DistInfo",
    "PeerFailure",
    "StopVote",
    "any_rank",
    "any_signal",
    "background",
    "barrier",
    "broadcast_from_rank_zero",
    "broadcast_object",
    "gather_object",
    "local_metric_values",
    "mean_over_ranks",
    "on_every_rank",
    "on_failure",
    "raised_on_every_rank",
    "set_epoch",
    "setup",
    "shard_eval",
    "shard_in_memory",
    "shard_predict",
    "shard_train",
]
