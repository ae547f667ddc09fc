"""The options of the distributed strategies, and how FSDP2 finds the blocks it shards one by one.

``Trainer(strategy="ddp")`` and ``strategy="fsdp"`` use the defaults; pass a [DDPStrategy][fitkit.DDPStrategy] or an
[FSDPStrategy][fitkit.FSDPStrategy] to change them, as Lightning's ``DDPStrategy(find_unused_parameters=True)`` does. The
process group, the wrapping and the sharding themselves live in `fitkit.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

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


Strategy = str | DDPStrategy | FSDPStrategy


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


__all__ = ["DDPStrategy", "FSDPStrategy", "find_blocks"]
