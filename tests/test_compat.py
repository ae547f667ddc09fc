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


def test_step_flop_counter_counts_matmuls_lets_torch_compile_run_inside_and_installs_no_module_hooks():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    counter = _compat.step_flop_counter()
    with counter:
        torch.ones(2, 3) @ torch.ones(3, 4)
        modes = _get_current_dispatch_mode_stack()
        assert [type(mode).ignore_compile_internals() for mode in modes] == [True]  # dynamo compiles inside it
        assert not torch.nn.modules.module._has_any_global_hook()  # nothing for dynamo to trace into
    assert counter.get_total_flops() == 2 * 2 * 3 * 4
    assert _get_current_dispatch_mode_stack() == []


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


def test_tensor_use_count_counts_the_cpp_references():
    assert hasattr(torch.Tensor, "_use_count"), "Tensor._use_count is gone: tensor_use_count would always say 1"
    tensor = torch.ones(4)
    assert _compat.tensor_use_count(tensor) == 1  # its Python object only
    view = tensor.view(2, 2)  # a view keeps a C++ reference to its base
    assert _compat.tensor_use_count(tensor) == 2
    del view
    assert _compat.tensor_use_count(tensor) == 1


@pytest.mark.parametrize(
    "layer",
    [nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.LazyBatchNorm1d(), nn.SyncBatchNorm(3)],
    ids=lambda layer: type(layer).__name__,
)
def test_is_batchnorm_covers_every_batch_norm_layer(layer: nn.Module):
    assert _compat.is_batchnorm(layer)


@pytest.mark.parametrize("layer", [nn.LayerNorm(3), nn.GroupNorm(1, 3), nn.InstanceNorm1d(3), nn.Linear(3, 3)])
def test_is_batchnorm_leaves_out_other_layers(layer: nn.Module):
    assert not _compat.is_batchnorm(layer)


def test_own_parameters_are_the_module_s_own_with_the_empty_ones():
    linear = nn.Linear(2, 3, bias=False)
    own = _compat.own_parameters(linear)
    assert list(own) == ["weight", "bias"] and own["weight"] is linear.weight and own["bias"] is None
    assert not _compat.own_parameters(nn.ReLU())
    parent = nn.Sequential(linear)
    assert not _compat.own_parameters(parent)  # the child's parameters are not the parent's own
    assert list(parent.parameters()) == [linear.weight]


def test_optimizer_step_marks_are_what_an_lr_scheduler_writes_on_the_optimizer():
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert _compat.optimizer_step_marks(optimizer) == {}  # no scheduler: no marks
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    before = _compat.optimizer_step_marks(optimizer)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    after = _compat.optimizer_step_marks(optimizer)
    assert after and after != before, (
        f"an optimizer step under an LR scheduler left the marks {before} as they were ({after}): the scheduler "
        "now tracks optimizer.step() under another attribute; add it to _compat._STEP_MARKS"
    )
    _compat.set_optimizer_step_marks(optimizer, before)
    assert _compat.optimizer_step_marks(optimizer) == before
    # What the marks are for: put back, they make the scheduler see no optimizer step, as before the step.
    with pytest.warns(UserWarning, match=r"lr_scheduler\.step\(\)` before `optimizer\.step\(\)"):
        scheduler.step()
