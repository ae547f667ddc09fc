"""Every private torch (and torchmetrics) API fitkit uses, one function each, in one place.

torch may rename or drop a private attribute in any release. Going through here keeps each such use in one
line, and ``tests/test_compat.py`` checks every function below against the installed versions, so a change
fails a named test instead of silently changing what fitkit does. A new private access belongs here, with its
test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import RandomSampler


def grad_scaler_scale(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The scale ``scaler`` multiplies the loss by, as the tensor it keeps on the device (``GradScaler._scale``).

    Unlike the public ``get_scale()``, which returns a Python float, reading it does not synchronise with the
    device. None for a disabled scaler and before the first ``scaler.scale(loss)``.
    """
    if not scaler.is_enabled():
        return None  # a disabled scaler never creates the attribute
    return scaler._scale


def random_sampler_num_samples(sampler: RandomSampler) -> int | None:
    """The ``num_samples`` a RandomSampler was built with (``RandomSampler._num_samples``); None when it draws
    the whole dataset (the public ``num_samples`` property then says ``len(data_source)``)."""
    return sampler._num_samples


def compiled_module_inner(module: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), or ``module`` itself when it is
    not a compiled wrapper."""
    inner: nn.Module = getattr(module, "_orig_mod", module)
    return inner


def foreach_div_(tensors: Sequence[torch.Tensor], divisor: float) -> None:
    """Divides every tensor in place by ``divisor`` in one fused call (``torch._foreach_div_``)."""
    torch._foreach_div_(list(tensors), divisor)


def tensor_use_count(tensor: torch.Tensor) -> int:
    """How many C++ references ``tensor`` has (``Tensor._use_count``; 1: only its Python object), so that a
    caller can tell when a worker thread has let go of it; 1 on a torch without the count."""
    count = getattr(tensor, "_use_count", None)
    return int(count()) if count is not None else 1


def is_batchnorm(module: nn.Module) -> bool:
    """True for every batch-norm layer, whose running statistics follow the data (``_BatchNorm``: BatchNorm1d,
    2d, 3d, their lazy forms and SyncBatchNorm)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def own_parameters(module: nn.Module) -> Mapping[str, nn.Parameter | None]:
    """The parameters registered on ``module`` itself, not on its children (``Module._parameters``), with the
    ones registered as None (``bias=False``) included."""
    return module._parameters


#: What an LR scheduler writes on the optimizer it wraps to check that ``optimizer.step()`` runs before
#: ``scheduler.step()``: torch 2.3 counts the steps (``_step_count``), torch >= 2.4 notes that one ran
#: (``_opt_called``).
_STEP_MARKS = ("_step_count", "_opt_called")


def optimizer_step_marks(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The marks an LR scheduler keeps on ``optimizer`` about its steps (empty when no scheduler wrapped it), to
    put back with `set_optimizer_step_marks` after steps that must leave no trace."""
    return {name: optimizer.__dict__[name] for name in _STEP_MARKS if name in optimizer.__dict__}


def set_optimizer_step_marks(optimizer: torch.optim.Optimizer, marks: Mapping[str, Any]) -> None:
    """Makes ``optimizer``'s step marks ``marks`` (from `optimizer_step_marks`): each mark is set, and a mark
    ``marks`` lacks is removed."""
    for name in _STEP_MARKS:
        if name in marks:
            optimizer.__dict__[name] = marks[name]
        else:
            optimizer.__dict__.pop(name, None)


def step_flop_counter(skip: Callable[[], bool] | None = None) -> Any:
    """A ``torch.utils.flop_counter.FlopCounterMode`` for one whole training step, eager or compiled: its total
    (``get_total_flops()``) is what the step's matrix products and convolutions cost.

    Two changes to torch's counter, through its private parts (``_FlopCounterMode``, ``flop_counts``, ``mode``):

    * its dispatch mode says ``ignore_compile_internals()``: ``torch.compile`` then compiles and runs the compiled
      code inside it (the mode sees the compiled code's library calls: matmuls, convolutions, attention), where a
      plain counter makes dynamo skip the frame and run it eagerly, a step other than the compiled one (its own
      dropout masks: training changes);
    * no module tracker: it would install global module hooks, which dynamo traces into (and fails on) when it
      compiles under the counter, and which make a compiled module warn; totals need no per-module attribution;
    * ops run while ``skip()`` is True are not counted (``FlopCounterMode._count_flops``): activation
      checkpointing's recomputation (`fitkit.memory.recomputing`).

    Args:
        skip: a function of no arguments, asked at every counted op; None: count everything.
    """
    from torch.utils import flop_counter

    class _SeesCompiledCode(flop_counter._FlopCounterMode):
        @classmethod
        def ignore_compile_internals(cls) -> bool:
            return True

    class _StepFlopCounter(flop_counter.FlopCounterMode):
        def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
            if skip is not None and skip():
                return out
            return super()._count_flops(func_packet, out, args, kwargs)

        def __enter__(self) -> Any:
            self.flop_counts.clear()
            self.mode = _SeesCompiledCode(self)
            self.mode.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            mode, self.mode = self.mode, None
            assert mode is not None  # entered
            return mode.__exit__(*exc)

    return _StepFlopCounter(display=False)


# -- torch.distributed ----------------------------------------------------------------------------
def default_store() -> Any:
    """The rendezvous store of the default process group (``distributed_c10d._get_default_store``): a key-value
    store every rank reaches, even when a collective cannot complete."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def abort_process_group() -> bool:
    """Aborts the default process group (``distributed_c10d._abort_process_group``), so that no GPU work waits
    on a rank that is gone (nccl). Returns False, doing nothing, when this torch has no such function."""
    from torch.distributed import distributed_c10d

    abort = getattr(distributed_c10d, "_abort_process_group", None)
    if abort is None:
        return False
    abort()
    return True


# -- torchmetrics ---------------------------------------------------------------------------------
def is_torchmetrics_metric(obj: Any) -> bool:
    """True for a ``torchmetrics.Metric`` (duck-typed by the sync switch below: torchmetrics is optional)."""
    return hasattr(obj, "_to_sync") and hasattr(obj, "_computed")


@contextlib.contextmanager
def torchmetrics_without_sync(metrics: Sequence[Any]) -> Iterator[None]:
    """Inside it, each torchmetrics metric's ``compute()`` returns this process's own value, without its
    cross-process sync (``Metric._to_sync``), and starts from an empty cache (``Metric._computed``). Both are
    put back on the way out, so that a later synced ``compute()`` is not served the local value."""
    saved = [(metric._to_sync, metric._computed) for metric in metrics]
    for metric in metrics:
        metric._to_sync, metric._computed = False, None
    try:
        yield
    finally:
        for metric, (to_sync, computed) in zip(metrics, saved):
            metric._to_sync, metric._computed = to_sync, computed
