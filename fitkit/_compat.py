"""Every private torch (and torchmetrics) API fitkit uses, one function each, in one place.

torch may rename or drop a private attribute in any release. Going through here keeps each such use in one
line, and ``tests/test_compat.py`` checks every function below against the installed versions, so a change
fails a named test instead of silently changing what fitkit does. A new private access belongs here, with its
test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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
