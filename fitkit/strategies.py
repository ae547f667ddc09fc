"""The distributed strategies: their options, and the objects that carry out each one.

``Trainer(strategy="ddp")`` and ``strategy="fsdp"`` use the defaults; pass a [DDPStrategy][fitkit.DDPStrategy] or an
[FSDPStrategy][fitkit.FSDPStrategy] to change them, as Lightning's ``DDPStrategy(find_unused_parameters=True)`` does.

Each Trainer holds one strategy object (`build`): `SingleDevice` (one process), `DDP` or `FSDP`. It owns
everything that differs between them: wrapping (or sharding) the model, turning the gradient all-reduce off on
accumulating batches, gathering and loading the model's and optimizers' state, writing and reading checkpoints
(one file, or a sharded DCP directory under FSDP), and whether evaluation data is split over the ranks. The
loop and the callbacks ask the strategy; none of them branches on which one it is. A new strategy is a
subclass here and an entry in `build`. The process group and the collectives live in `fitkit.distributed`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fitkit import _compat, checkpoint, distributed, sharded_checkpoint
from fitkit._structure import map_structure

if TYPE_CHECKING:
    from fitkit.distributed import DistInfo
    from fitkit.trainer import Trainer

NAMES = ("auto", "ddp", "fsdp", "none")


@dataclass(frozen=True)
class DDPStrategy:
    """DistributedDataParallel with these options (each passed to ``torch.nn.parallel.DistributedDataParallel``).

    Args:
        find_unused_parameters: find the parameters a forward pass did not use (a model with branches),
            at the cost of a graph traversal per step; default False.
        static_graph: the set of used parameters and the graph never change between steps: lets DDP
            skip that search and support reentrant activation checkpointing; default False.
        gradient_as_bucket_view: gradients are views into DDP's all-reduce buckets, which saves a copy
            and the memory of one set of gradients; default False.
        bucket_cap_mb: the size of each all-reduce bucket in MiB; None: torch's default (25).
    """

    find_unused_parameters: bool = False
    static_graph: bool = False
    gradient_as_bucket_view: bool = False
    bucket_cap_mb: float | None = None
    name = "ddp"

    def __post_init__(self) -> None:
        for option in ("find_unused_parameters", "static_graph", "gradient_as_bucket_view"):
            value = getattr(self, option)
            if not isinstance(value, bool):
                raise TypeError(f"DDPStrategy({option}=...) must be True or False, got {value!r}")
        cap = self.bucket_cap_mb
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise ValueError(f"DDPStrategy(bucket_cap_mb=...) must be a number of MiB > 0 or None, got {cap!r}")

    def ddp_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``DistributedDataParallel`` (``bucket_cap_mb`` only when set)."""
        kwargs: dict[str, Any] = {
            "find_unused_parameters": self.find_unused_parameters,
            "static_graph": self.static_graph,
            "gradient_as_bucket_view": self.gradient_as_bucket_view,
        }
        if self.bucket_cap_mb is not None:
            kwargs["bucket_cap_mb"] = self.bucket_cap_mb
        return kwargs


@dataclass(frozen=True)
class FSDPStrategy:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) applied per block, bottom-up, then to the root.

    Sharding each block lets FSDP gather one block's parameters at a time (and prefetch the next while
    this one computes), so a rank holds its shard of the model plus about one block unsharded; sharding
    the root alone keeps the whole model unsharded through forward and backward, as DDP does.

    Args:
        block_classes: the module classes to shard one by one (classes, or their names as strings, e.g.
            ``("TransformerBlock",)``); None (default): the repeated blocks fitkit finds (see
            `find_blocks`).
        reshard_after_forward: free each block's gathered parameters after its forward pass (gathering
            them again for backward): less memory, one more all-gather per block; default True. The root
            keeps its own few parameters gathered (they are used again at once).
        mixed_precision: with ``precision="bf16"``, keep the gathered parameters in bfloat16 for the compute
            and reduce gradients in float32 (``MixedPrecisionPolicy``): half the all-gather traffic and
            memory. Default True; no effect at ``"32"``; at ``"fp16"`` parameters stay float32 (autocast
            does the casting, and the GradScaler sees float32 gradients).
    """

    block_classes: Sequence[type[nn.Module] | str] | None = None
    reshard_after_forward: bool = True
    mixed_precision: bool = True
    name = "fsdp"

    def __post_init__(self) -> None:
        blocks = self.block_classes
        if blocks is not None:
            if isinstance(blocks, (str, type)) or not isinstance(blocks, Sequence) or not blocks:
                raise TypeError(
                    f"FSDPStrategy(block_classes=...) must be a non-empty list of nn.Module classes or class "
                    f"names, got {blocks!r}; e.g. block_classes=[TransformerBlock]"
                )
            for block in blocks:
                if not (isinstance(block, str) or (isinstance(block, type) and issubclass(block, nn.Module))):
                    raise TypeError(
                        f"FSDPStrategy(block_classes=...) holds {block!r}, which is neither an nn.Module "
                        "class nor a class name"
                    )
            object.__setattr__(self, "block_classes", tuple(blocks))
        for option in ("reshard_after_forward", "mixed_precision"):
            value = getattr(self, option)
            if not isinstance(value, bool):
                raise TypeError(f"FSDPStrategy({option}=...) must be True or False, got {value!r}")


StrategyArg = str | DDPStrategy | FSDPStrategy


def resolve(strategy: Any) -> tuple[str, DDPStrategy | FSDPStrategy | None]:
    """The strategy's name and its options object (the defaults for ``"ddp"``/``"fsdp"``)."""
    if isinstance(strategy, (DDPStrategy, FSDPStrategy)):
        return strategy.name, strategy
    if isinstance(strategy, str) and strategy in NAMES:
        defaults: dict[str, DDPStrategy | FSDPStrategy] = {"ddp": DDPStrategy(), "fsdp": FSDPStrategy()}
        return strategy, defaults.get(strategy)
    raise ValueError(
        f"unknown strategy {strategy!r}: use 'auto' (DDP when launched by torchrun with several "
        "processes), 'ddp', 'fsdp' or 'none'"
        + (
            ", or a fitkit.DDPStrategy(...) / fitkit.FSDPStrategy(...) to set their options"
            if not isinstance(strategy, str)
            else ""
        )
    )


def name_of(strategy: Any) -> str:
    """The strategy's name (`resolve`), checked against this torch before any process group is joined."""
    name = resolve(strategy)[0]
    if name == "fsdp" and not _has_fsdp2():
        raise ValueError(
            "strategy='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6), which "
            f"torch {torch.__version__} lacks; use strategy='ddp'"
        )
    return name


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def find_blocks(model: nn.Module, block_classes: Sequence[type[nn.Module] | str] | None = None) -> list[nn.Module]:
    """The modules FSDP shards one by one, outermost first (none nested in another).

    With ``block_classes``: every module of those classes (a class named there that the model lacks is an
    error). Without: the children of the ``nn.ModuleList`` (or ``nn.Sequential`` inside the model) that
    holds the most parameters, when it has at least two children with parameters (a transformer's
    layers, a ResNet stage); otherwise the instances of the most repeated module class that holds
    parameters (two or more); otherwise none (the root alone is sharded).

    Args:
        model: the (unwrapped) model to look into.
        block_classes: module classes, or their names as strings (``"TransformerBlock"``), to shard one by
            one; None (the default) guesses as above.

    Raises:
        ValueError: a class named in ``block_classes`` that the model has no instance of.
    """
    root_children = [m for m in model.modules() if m is not model]
    if block_classes is not None:
        wanted = tuple(block_classes)
        present = {type(m).__name__ for m in root_children}
        missing = [b if isinstance(b, str) else b.__name__ for b in wanted if _name(b) not in present]
        if missing:
            raise ValueError(
                f"FSDPStrategy(block_classes=...) names {missing}, which the model does not contain; its module "
                f"classes are {sorted(present)}"
            )
        names = {_name(b) for b in wanted}
        return _outermost([m for m in root_children if type(m).__name__ in names])
    containers = [
        m for m in root_children if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(_with_params(m)) >= 2
    ]
    if containers:
        largest = max(containers, key=_num_params)
        return _with_params(largest)
    counts: dict[type[nn.Module], list[nn.Module]] = {}
    for module in root_children:
        if _num_params(module) and not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            counts.setdefault(type(module), []).append(module)
    repeated = [modules for modules in counts.values() if len(modules) >= 2]
    if not repeated:
        return []
    return _outermost(max(repeated, key=len))


def _name(block: type[nn.Module] | str) -> str:
    return block if isinstance(block, str) else block.__name__


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _with_params(container: nn.Module) -> list[nn.Module]:
    return [child for child in container.children() if _num_params(child)]


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    inside = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inside]


def shard_blocks(model: nn.Module, options: FSDPStrategy, precision: str = "32") -> list[nn.Module]:
    """``fully_shard`` on each block ([fitkit.strategies.find_blocks][]), deepest first, then on the root.

    Returns the blocks. Each block's parameters are gathered just before its forward (and backward) and
    freed after it (``reshard_after_forward``); the root keeps its own parameters gathered. With
    ``precision="bf16"`` and ``options.mixed_precision``, the gathered parameters are bfloat16 and the
    gradients are reduced in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if any(not p.is_contiguous() for p in model.parameters()):
        raise ValueError(
            "strategy='fsdp' cannot shard non-contiguous parameters (a model converted with "
            "model.to(memory_format=torch.channels_last), say); keep the model contiguous: with "
            "Trainer(channels_last=True) fitkit then makes only the inputs channels-last under FSDP"
        )
    policy = MixedPrecisionPolicy()
    if precision == "bf16" and options.mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = find_blocks(model, options.block_classes)
    depth = {id(m): len(name.split(".")) for name, m in model.named_modules()}
    for block in sorted(blocks, key=lambda m: -depth[id(m)]):  # bottom-up: inner blocks before outer ones
        fully_shard(block, reshard_after_forward=options.reshard_after_forward, mp_policy=policy)
    fully_shard(model, reshard_after_forward=not blocks and options.reshard_after_forward, mp_policy=policy)
    return blocks


def _swap_optimizer_params(
    optimizer: torch.optim.Optimizer, before: dict[str, nn.Parameter], after: dict[str, nn.Parameter]
) -> None:
    """FSDP2 registers new (sharded) Parameter objects; an optimizer built before must update those."""
    new_of = {id(p): after[name] for name, p in before.items() if name in after}
    if any(optimizer.state.values()):
        raise ValueError(
            "strategy='fsdp' shards the model after the optimizer was built, so the optimizer must "
            "not hold state yet (momentum buffers); build it fresh, or load its state after "
            "building the Trainer"
        )
    for group in optimizer.param_groups:
        group["params"] = [new_of.get(id(p), p) for p in group["params"]]


def _to_cpu_tensor(value: Any) -> Any:
    """A plain CPU tensor (not a DTensor), so that a checkpoint loads with ``weights_only=True``."""
    if not isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach().cpu()


# -- the strategies at work -----------------------------------------------------------------------
class SingleDevice:
    """One process: the model as it is, its own state dicts, checkpoints as one file."""

    name = "none"
    #: Every rank holds a shard of each parameter (FSDP): code that reads or writes whole parameters (EMA,
    #: SWA) must gather them first.
    shards_parameters = False
    #: Evaluation and prediction data are split over the ranks (each sample counted once).
    splits_eval_data = False

    def __init__(self, info: DistInfo) -> None:
        self.info = info

    def wrap(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], precision: str) -> nn.Module:
        """The module that runs training forward passes."""
        return model

    def channels_last(self, model: nn.Module) -> nn.Module:
        """``model`` in the channels-last memory format (``Trainer(channels_last=True)``)."""
        return model.to(memory_format=torch.channels_last)

    def set_grad_sync(self, module: nn.Module, enabled: bool) -> None:
        """Turns the gradient all-reduce of the next forward/backward on or off (off on the accumulating
        batches of a group); nothing to do in one process."""

    def model_state_dict(self, model: nn.Module) -> dict[str, Any]:
        """The model's whole state (under FSDP a collective whose result rank 0 holds)."""
        return model.state_dict()

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's whole state (under FSDP a collective whose result rank 0 holds)."""
        return optimizer.state_dict()

    def load_model_state_dict(self, model: nn.Module, state: dict[str, Any], strict: bool) -> None:
        """Loads a whole model state (as `model_state_dict` returns it)."""
        model.load_state_dict(state, strict=strict)

    def load_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Loads a whole optimizer state (as `optimizer_state_dict` returns it)."""
        optimizer.load_state_dict(state)

    def check_supported(self, feature: str) -> None:
        """Raises NotImplementedError when this strategy cannot do ``feature`` (``"lr_find"``,
        ``"partial_accumulation_checkpoint"``)."""

    def save_checkpoint(self, trainer: Trainer, path: Path, meta: dict[str, Any]) -> Path:
        """Writes ``trainer``'s full state to the file ``path`` atomically: every rank's own part goes in
        (``Trainer.PER_RANK``) and rank 0 writes it; every rank calls it."""
        state = trainer.state_dict()
        everyone = distributed.gather_object({key: state[key] for key in trainer.PER_RANK}, self.info)
        if self.info.world_size > 1:
            state["per_rank"] = everyone
        if self.info.rank == 0:
            position = {
                "kind": "full",
                "epoch": trainer.state.epoch,
                "global_step": trainer.state.global_step,
                "batch_in_epoch": trainer.state.batch_in_epoch,
                **meta,
            }
            checkpoint.atomic_save(state, path, position)
        distributed.barrier(self.info)
        return path

    def load_checkpoint(self, trainer: Trainer, path: Path, strict: bool) -> None:
        """Loads a checkpoint file, or a sharded (DCP) directory, which loads into any strategy."""
        if path.is_dir():
            sharded_checkpoint.load(trainer, path, strict=strict)
        else:
            trainer.load_state_dict(checkpoint.load(path, map_location="cpu"), strict=strict)


class DDP(SingleDevice):
    """DistributedDataParallel (with `DDPStrategy`'s options): every rank holds the whole model."""

    name = "ddp"
    splits_eval_data = True

    def __init__(self, info: DistInfo, options: DDPStrategy | None = None) -> None:
        super().__init__(info)
        self.options = options if options is not None else DDPStrategy()

    def wrap(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], precision: str) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.info.device.index] if self.info.device is not None else None
        return DistributedDataParallel(model, device_ids=device_ids, **self.options.ddp_kwargs())

    def set_grad_sync(self, module: nn.Module, enabled: bool) -> None:
        # DDP reads the flag in forward, so it is set before the forward, not around backward only.
        wrapper: Any = _compat.compiled_module_inner(module)  # under torch.compile's wrapper
        wrapper.require_backward_grad_sync = enabled


class FSDP(SingleDevice):
    """FSDP2 (``fully_shard``) per block, then the root (with `FSDPStrategy`'s options): each rank holds a
    shard of every parameter; checkpoints are sharded DCP directories every rank writes its part of."""

    name = "fsdp"
    shards_parameters = True
    # Every forward pass is a collective, so every rank runs the same batches: each evaluates all the data
    # and the all-reduced sums give the same means (at world_size times the work).
    splits_eval_data = False

    def __init__(self, info: DistInfo, options: FSDPStrategy | None = None) -> None:
        super().__init__(info)
        self.options = options if options is not None else FSDPStrategy()

    def wrap(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], precision: str) -> nn.Module:
        """Shards ``model`` in place, block by block (`shard_blocks`), from rank 0's initial weights (as
        DDP does); every optimizer's parameters are swapped for the sharded ones, in place."""
        with torch.no_grad():  # fully_shard keeps each rank's own values otherwise
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                distributed.broadcast_from_rank_zero(tensor)
        before = dict(model.named_parameters())
        shard_blocks(model, self.options, precision)
        for optimizer in optimizers:
            _swap_optimizer_params(optimizer, before, dict(model.named_parameters()))
        return model

    def channels_last(self, model: nn.Module) -> nn.Module:
        return model  # FSDP2 shards contiguous parameters only: the inputs alone are converted

    def set_grad_sync(self, module: nn.Module, enabled: bool) -> None:
        wrapper: Any = _compat.compiled_module_inner(module)
        wrapper.set_requires_gradient_sync(enabled)

    def model_state_dict(self, model: nn.Module) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Gathered on rank 0 only, on the CPU (the other ranks get {}): rank 0 writes checkpoints.
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return map_structure(_to_cpu_tensor, get_optimizer_state_dict(model, optimizer, options=options))

    def load_model_state_dict(self, model: nn.Module, state: dict[str, Any], strict: bool) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))

    def load_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not _has_tensor_state(state):  # plain SGD, say: torch's loader needs a state tensor to find the device
            _load_param_groups(optimizer, state)
            return
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def check_supported(self, feature: str) -> None:
        if feature == "lr_find":
            raise NotImplementedError("lr_find does not support strategy='fsdp'; run it with strategy='ddp' or 'none'")
        if feature == "partial_accumulation_checkpoint":
            raise NotImplementedError(
                "saving a checkpoint in the middle of an accumulation group is not supported "
                "with strategy='fsdp' (the partial gradients are sharded); save at group "
                "ends: ModelCheckpoint/BackupAndRestore(save_freq=a multiple of "
                "accumulate_grad_batches) or 'epoch'"
            )

    def save_checkpoint(self, trainer: Trainer, path: Path, meta: dict[str, Any]) -> Path:
        """Every rank writes its shard into a DCP directory at ``path`` (`fitkit.sharded_checkpoint`)."""
        return sharded_checkpoint.save(trainer, path, meta)


def _has_tensor_state(state: dict[str, Any]) -> bool:
    """Whether a full optimizer state holds a tensor of one dimension or more (a stateless optimizer's does not:
    torch's ``set_optimizer_state_dict`` then fails with "Expected device to be set", torch 2.14)."""
    found = False

    def see(value: Any) -> Any:
        nonlocal found
        found = found or (isinstance(value, torch.Tensor) and value.dim() > 0)
        return value

    map_structure(see, state.get("state", {}))
    return found


def _load_param_groups(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A stateless optimizer's full state: its groups' hyperparameters (the parameters stay the sharded ones)."""
    saved = state.get("param_groups", [])
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"{len(saved)} saved parameter groups for {len(optimizer.param_groups)}")
    for group, values in zip(optimizer.param_groups, saved):
        group.update({key: value for key, value in values.items() if key != "params"})


def build(strategy: StrategyArg, info: DistInfo) -> SingleDevice:
    """The strategy object for ``Trainer(strategy=...)`` once the process group is known (``info``):
    one process always trains as `SingleDevice`; under a launcher, ``"auto"`` is DDP. A new strategy is
    a `SingleDevice` subclass and a line here."""
    name, options = resolve(strategy)
    if info.world_size == 1:
        return SingleDevice(info)
    if name == "fsdp":
        return FSDP(info, options if isinstance(options, FSDPStrategy) else None)
    return DDP(info, options if isinstance(options, DDPStrategy) else None)


__all__ = ["DDPStrategy", "FSDPStrategy", "find_blocks", "shard_blocks"]
