"""fitkit._compat: each private torch (and torchmetrics) API fitkit uses still behaves as fitkit needs it.

A failure here means the installed torch changed a private attribute: update the one function in
``fitkit/_compat.py`` that names it, not the code that calls it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import RandomSampler

from fitkit import _compat


def test_grad_scaler_scale_is_the_device_tensor_the_scaler_multiplies_by():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert _compat.grad_scaler_scale(scaler) is None  # created lazily by the first scale()
    assert torch.equal(scaler.scale(torch.tensor(2.0)), torch.tensor(16.0))
    scale = _compat.grad_scaler_scale(scaler)
    assert isinstance(scale, torch.Tensor), f"GradScaler._scale is {type(scale).__name__}, not a tensor"
    assert scale.item() == scaler.get_scale() == 8.0
    scaler.update(new_scale=4.0)
    current = _compat.grad_scaler_scale(scaler)
    assert current is not None and current.item() == scaler.get_scale() == 4.0  # read afresh, not a stale copy


def test_grad_scaler_scale_of_a_disabled_scaler_is_none():
    assert _compat.grad_scaler_scale(torch.amp.GradScaler("cpu", enabled=False)) is None


def test_random_sampler_num_samples_is_the_constructor_argument():
    assert _compat.random_sampler_num_samples(RandomSampler(range(10))) is None
    assert _compat.random_sampler_num_samples(RandomSampler(range(10), num_samples=4)) == 4
    assert _compat.random_sampler_num_samples(RandomSampler(range(10), replacement=True, num_samples=30)) == 30


@pytest.mark.slow  # importing torch._dynamo takes ~2 s
def test_compiled_module_inner_unwraps_torch_compile():
    model = nn.Linear(2, 2)
    compiled = torch.compile(model)  # compiles at the first call: building the wrapper is cheap
    assert compiled is not model
    assert _compat.compiled_module_inner(compiled) is model
    assert _compat.compiled_module_inner(model) is model


def test_foreach_div_divides_every_tensor_in_place():
    a, b = torch.tensor([2.0, 4.0]), torch.tensor([[6.0]])
    _compat.foreach_div_([a, b], 2.0)
    assert torch.equal(a, torch.tensor([1.0, 2.0])) and torch.equal(b, torch.tensor([[3.0]]))


def test_abort_process_group_exists_and_takes_no_required_argument():
    from torch.distributed import distributed_c10d

    abort = getattr(distributed_c10d, "_abort_process_group", None)
    assert callable(abort), "torch.distributed.distributed_c10d._abort_process_group is gone"
    required = [
        p for p in inspect.signature(abort).parameters.values() if p.default is p.empty and p.kind is not p.VAR_KEYWORD
    ]
    assert required == [], f"_abort_process_group now requires {required}"


def test_default_store_is_the_rendezvous_store_with_compare_set(tmp_path: Path):
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        store = _compat.default_store()
        # distributed.on_failure relies on this: the first rank to fail writes its message, later ones read it.
        assert _text(store.compare_set("fitkit/test", "", "first")) == "first"
        assert _text(store.compare_set("fitkit/test", "", "second")) == "first"
    finally:
        dist.destroy_process_group()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_torchmetrics_without_sync_switches_the_sync_off_and_restores_it():
    torchmetrics = pytest.importorskip("torchmetrics")
    metric = torchmetrics.MeanMetric()
    assert _compat.is_torchmetrics_metric(metric)
    assert not _compat.is_torchmetrics_metric(nn.Linear(1, 1))
    metric.update(torch.tensor([1.0, 3.0]))
    cached = metric.compute()  # compute() caches its result in _computed
    assert metric._computed is not None and metric._to_sync is True
    with _compat.torchmetrics_without_sync([metric]):
        assert metric._to_sync is False and metric._computed is None
        assert metric.compute().item() == 2.0
    assert metric._to_sync is True and metric._computed is cached
