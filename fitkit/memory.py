"""The memory tools: activation checkpointing around a model's blocks, a meter of the activations autograd saves,
and the search behind ``Trainer.find_batch_size``.

* `checkpoint_blocks` (``Trainer(activation_checkpointing=...)``): each block that the FSDP block policy picks
  (`fitkit.strategies.find_blocks`) runs under non-reentrant ``torch.utils.checkpoint``: its activations are not
  kept for backward but recomputed there, with the random state of the first pass (dropout draws the same
  masks), so losses and weights are bit-identical to a run without it, and the memory saved for backward
  shrinks to each block's inputs. While a block re-runs its forward in backward, `recomputing` is True:
  ``ThroughputMonitor`` leaves those FLOPs out of ``flops_per_sample`` (they are not the model's: MFU, not
  hardware utilisation).
* `BatchSizeSearch` (``Trainer.find_batch_size``, a mixin of the Trainer as ``_steps.Steps`` is): each batch size
  is a short side fit of the trainer's own loop inside ``Trainer._left_as_found``, as ``lr_find`` runs, so the
  trainer is left bit-identical; `BatchSizeResult` and `BatchSizeTrial` report what it tried.
* `SavedTensors`: the bytes autograd keeps for backward while it is open (``saved_tensors_hooks``), parameters
  left out: the batch-dependent memory of a step, measured on any device.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset

from fitkit import _arguments
from fitkit.callbacks.base import Callback, Logs
from fitkit.strategies import find_blocks

if TYPE_CHECKING:
    from fitkit.callbacks.history import History

_CHECKPOINTED: dict[type, type] = {}  # a block class -> its checkpointing subclass (one per class)
_recomputations = 0  # checkpointed blocks re-running their forward now (in backward)


def recomputing() -> bool:
    """Whether a block under activation checkpointing is re-running its forward now, in backward (eager:
    ``torch.utils.checkpoint``'s recomputation context; a compiled step recomputes inside its graph)."""
    return _recomputations > 0


class _Recomputation:
    """The context ``torch.utils.checkpoint`` enters around a block's recomputation (``context_fn``)."""

    def __enter__(self) -> None:
        global _recomputations
        _recomputations += 1

    def __exit__(self, *exc: Any) -> None:
        global _recomputations
        _recomputations -= 1


def _checkpoint_contexts() -> tuple[contextlib.AbstractContextManager[Any], _Recomputation]:
    return contextlib.nullcontext(), _Recomputation()


def checkpoint_blocks(model: nn.Module, policy: Any) -> list[nn.Module]:
    """Makes each chosen block of ``model`` run its forward under ``torch.utils.checkpoint`` (non-reentrant, the
    random state preserved) whenever gradients are recorded; returns the blocks (none for ``False``).

    The block's class is swapped for a subclass of the same name that only overrides ``forward`` (as FSDP2
    does): parameter names, ``state_dict`` keys, ``isinstance`` and copies of the model are unchanged.

    Args:
        model: the model whose blocks to checkpoint, in place.
        policy: ``False`` (nothing), ``True`` (the blocks `fitkit.strategies.find_blocks` picks, the repeated
            layers FSDP shards one by one), a sequence of block classes or class names (as
            ``FSDPStrategy(block_classes=...)``), or a function ``module -> bool`` (the outermost modules it
            accepts).

    Raises:
        ValueError: the policy picks no block (name the block classes then).
        TypeError: a policy of another kind.
    """
    if policy is False:
        return []
    if policy is True:
        blocks = find_blocks(model)
    elif isinstance(policy, Sequence) and not isinstance(policy, str):
        blocks = find_blocks(model, policy)
    elif callable(policy) and not isinstance(policy, type):
        chosen = [m for m in model.modules() if m is not model and policy(m)]
        inside = {id(sub) for m in chosen for sub in m.modules() if sub is not m}
        blocks = [m for m in chosen if id(m) not in inside]
    else:
        raise TypeError(
            "activation_checkpointing must be False, True (the repeated blocks fitkit finds), a list of block "
            f"classes or class names, or a function module -> bool; got {policy!r}"
        )
    if not blocks:
        raise ValueError(
            f"activation_checkpointing={policy!r} found no block to checkpoint in {type(model).__name__}: "
            "name them, e.g. activation_checkpointing=[TransformerBlock]"
        )
    for block in blocks:
        block.__class__ = _checkpointing_class(type(block))
    return blocks


def _checkpointing_class(cls: type) -> type:
    if getattr(cls, "_fitkit_checkpointed", False):
        return cls
    if cls not in _CHECKPOINTED:
        plain_forward = cls.forward  # type: ignore[attr-defined]

        @functools.wraps(plain_forward)
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():  # evaluation: nothing is saved for backward anyway
                return plain_forward(self, *args, **kwargs)
            if torch.compiler.is_compiling():  # dynamo takes no context_fn of ours; the graph recomputes
                return checkpoint(plain_forward, self, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
            return checkpoint(
                plain_forward,
                self,
                *args,
                use_reentrant=False,
                preserve_rng_state=True,
                context_fn=_checkpoint_contexts,
                **kwargs,
            )

        namespace = {"forward": forward, "_fitkit_checkpointed": True, "__module__": cls.__module__}
        _CHECKPOINTED[cls] = type(cls.__name__, (cls,), namespace)
        _CHECKPOINTED[cls].__qualname__ = cls.__qualname__
    return _CHECKPOINTED[cls]


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module`` runs under activation checkpointing (`checkpoint_blocks`).

    Args:
        module: any module of the model.
    """
    return bool(getattr(type(module), "_fitkit_checkpointed", False))


class SavedTensors:
    """A context that counts what autograd saves for backward inside it (``saved_tensors_hooks``): ``bytes``,
    each storage once, the given parameters' storages left out. Nesting inside activation checkpointing, it
    sees only what the checkpointed regions keep (their inputs), which is what checkpointing saves.

    Args:
        exclude: tensors whose storages are not counted (the model's parameters: they exist anyway).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {_storage_key(t) for t in exclude}
        self.bytes = 0
        self.tensors = 0
        self._seen: set[tuple[Any, ...]] = set()
        self._hooks: Any = None

    def __enter__(self) -> SavedTensors:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(*exc)

    @property
    def mb(self) -> float:
        """``bytes`` in MiB."""
        return self.bytes / 2**20

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self.excluded and key not in self._seen:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
            self.tensors += 1
        return tensor


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    storage = tensor.untyped_storage()
    return (tensor.device, storage.data_ptr(), storage.nbytes())


@dataclass
class BatchSizeTrial:
    """One batch size ``Trainer.find_batch_size`` tried.

    Attributes:
        batch_size: the batch size.
        fits: whether its steps ran within the budget (no out-of-memory error, under ``max_memory_mb``).
        memory_mb: the peak memory of the step measured (CUDA: ``max_memory_allocated``; elsewhere the
            parameters, gradients, optimizer state and batch plus the activations saved for backward); None
            when it failed before a measurement.
        error: why it did not fit, in words; None when it fit.
    """

    batch_size: int
    fits: bool
    memory_mb: float | None
    error: str | None = None


@dataclass
class BatchSizeResult:
    """What ``Trainer.find_batch_size`` found; ``str()`` is a table of the trials.

    Attributes:
        batch_size: the largest batch size that fits; None when even the first did not.
        trials: each batch size tried, in order (`BatchSizeTrial`).
    """

    batch_size: int | None
    trials: list[BatchSizeTrial] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["batch_size  fits  memory_mb  note"]
        for t in self.trials:
            memory = "-" if t.memory_mb is None else f"{t.memory_mb:.1f}"
            lines.append(f"{t.batch_size:>10}  {'yes' if t.fits else 'no':>4}  {memory:>9}  {t.error or ''}")
        lines.append(f"largest that fits: {self.batch_size}")
        return "\n".join(lines)


def state_bytes(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """The bytes of the model's parameters, of the gradients of those that train (they exist through each
    backward and step) and of the optimizers' state tensors."""
    total = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in model.parameters())
    for optimizer in optimizers:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def next_batch_size(mode: str, tried: dict[int, bool], start: int, limit: int) -> int | None:
    """The next batch size to try: ``"power"`` doubles from ``start`` until one fails or ``limit`` is reached;
    ``"binsearch"`` then halves the gap between the largest that fit and the smallest that failed."""
    fits = [b for b, ok in tried.items() if ok]
    fails = [b for b, ok in tried.items() if not ok]
    if not tried:
        return min(start, limit)
    if not fits:
        return None
    best = max(fits)
    if not fails:
        return None if best >= limit else min(best * 2, limit)
    if mode == "power":
        return None
    low, high = best, min(b for b in fails if b > best)
    return None if high - low <= 1 else (low + high) // 2


MODES = ("power", "binsearch")
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")


class _StepMemory(Callback):
    """Measures each training step of a side fit off CUDA: the parameters, gradients, optimizer state and batch
    plus what autograd saved for backward (`SavedTensors`); ``peak`` is the largest, in bytes."""

    def __init__(self) -> None:
        self.peak = 0
        self.saved: SavedTensors | None = None

    def on_batch_begin(self, batch: int, logs: Logs | None = None) -> None:
        self.saved = SavedTensors(exclude=self.trainer.model.parameters()).__enter__()

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self.close()
        trainer = self.trainer
        batch_bytes = sum(t.numel() * t.element_size() for t in _tensors(trainer.batch))
        total = state_bytes(trainer.model, trainer.optimizers.values()) + batch_bytes
        self.peak = max(self.peak, total + self._last_saved)

    def close(self) -> None:
        saved, self.saved = self.saved, None
        self._last_saved = 0 if saved is None else saved.bytes
        if saved is not None:
            saved.__exit__(None, None, None)

    _last_saved = 0


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in _OOM_WORDS)


class BatchSizeSearch:
    """``find_batch_size``, for `fitkit.Trainer` (documented there)."""

    # Set by Trainer.
    device: torch.device
    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    callbacks: list[Callback]
    verbose: int
    history: History
    _hooks_timed: bool

    _left_as_found: Callable[[Any], contextlib.AbstractContextManager[None]]  # Trainer's
    fit: Callable[..., History]  # Trainer's

    def find_batch_size(
        self,
        train_data: Any,
        *,
        max_batch_size: int = 4096,
        mode: str = "power",
        start_batch_size: int = 2,
        max_memory_mb: float | None = None,
        steps: int = 2,
    ) -> BatchSizeResult:
        """The largest batch size whose training steps fit in memory, and every size tried.

        Each size runs ``steps`` real training steps of this trainer's loop (forward, backward, optimizer step:
        optimizer state included) on ``train_data`` with no callback of yours, and the trainer is then left as it
        was, bit for bit, as after [lr_find][fitkit.Trainer.lr_find]. On CUDA a size fits when it raises no
        out-of-memory error (and, with ``max_memory_mb``, peaks under it: ``max_memory_allocated``); elsewhere
        ``max_memory_mb`` is required and a size fits when its measured peak stays under it: the parameters,
        gradients, optimizer state and batch, plus the activations autograd saved in the real step
        (`fitkit.memory.SavedTensors`). ``"power"`` doubles from ``start_batch_size`` until a size fails (or
        ``max_batch_size``, or the data's size, is reached); ``"binsearch"`` then bisects between the last size
        that fit and the first that failed.

        Args:
            train_data: in-memory tensors/arrays (cut into batches of each size), a ``Dataset``, or a
                ``DataLoader`` (its dataset and collate function are batched again, in order, without workers).
            max_batch_size: the largest size to try.
            mode: ``"power"`` or ``"binsearch"``.
            start_batch_size: the first size tried.
            max_memory_mb: the memory budget in MiB (required off CUDA; on CUDA optional).
            steps: training steps run per size (>= 1; 2 includes the optimizer state the first step creates).

        Returns:
            a [BatchSizeResult][fitkit.memory.BatchSizeResult]: ``batch_size`` (None when even the first size
            failed) and ``trials``; ``print(result)`` shows them as a table.
        """
        limit = _arguments.check_int(max_batch_size, "max_batch_size", 1, "the largest batch size to try")
        start = _arguments.check_int(start_batch_size, "start_batch_size", 1, "the first batch size to try")
        steps = _arguments.check_int(steps, "steps", 1, "training steps per batch size")
        if mode not in MODES:
            raise ValueError(f"find_batch_size(mode=...) must be one of {MODES}, got {mode!r}")
        budget = _arguments.positive_or_none(max_memory_mb, "max_memory_mb")
        if budget is None and self.device.type != "cuda":
            raise ValueError(
                f"find_batch_size on {self.device.type} needs max_memory_mb=, the memory budget in MiB: only CUDA "
                "reports running out of memory reliably"
            )
        samples = _num_samples(train_data)
        limit = min(limit, samples)
        tried: dict[int, bool] = {}
        result = BatchSizeResult(None)
        while (size := next_batch_size(mode, tried, start, limit)) is not None:
            trial = self._try_batch_size(train_data, size, min(steps, -(-samples // size)), budget)
            tried[size] = trial.fits
            result.trials.append(trial)
        fits = [t.batch_size for t in result.trials if t.fits]
        result.batch_size = max(fits) if fits else None
        return result

    def _try_batch_size(self, data: Any, size: int, steps: int, budget: float | None) -> BatchSizeTrial:
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        probe = _StepMemory()
        error = None
        with self._left_as_found(data):
            self.callbacks, self.verbose, self._hooks_timed = [] if cuda else [probe], 0, True  # put back on exit
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                loader, batch_size = _batches(data, size)
                self.fit(loader, epochs=1, steps_per_epoch=steps, batch_size=batch_size, shuffle=False)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                error = "out of memory"
            finally:
                probe.close()
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else probe.peak
        if cuda:  # what the failed size held goes back to the allocator before the next try
            gc.collect()
            torch.cuda.empty_cache()
        memory_mb = None if error is not None and not cuda else peak / 2**20
        if error is None and budget is not None and memory_mb is not None and memory_mb > budget:
            error = f"over max_memory_mb={budget:g}"
        return BatchSizeTrial(size, error is None, memory_mb, error)


def _num_samples(data: Any) -> int:
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, (tuple, list)):
        data = data[0]
    if isinstance(data, dict):
        data = next(iter(data.values()))
    try:
        return len(data)
    except TypeError as exc:
        raise TypeError(
            "find_batch_size needs data of known size: in-memory tensors or arrays, a Dataset or a DataLoader "
            f"over one; got {type(data).__name__}"
        ) from exc


def _batches(data: Any, size: int) -> tuple[Any, int | None]:
    """``data`` in batches of ``size``: (what fit takes, fit's batch_size argument)."""
    if isinstance(data, DataLoader):
        return DataLoader(data.dataset, batch_size=size, collate_fn=data.collate_fn), None
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=size), None
    return data, size


__all__ = [
    "BatchSizeResult",
    "BatchSizeSearch",
    "BatchSizeTrial",
    "SavedTensors",
    "checkpoint_blocks",
    "is_checkpointed",
    "next_batch_size",
    "recomputing",
    "state_bytes",
]
