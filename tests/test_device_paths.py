"""The CUDA/MPS paths as far as a CPU can check them (issue 15), and their CUDA tests (skipped here; run by
``benchmarks/gpu_check.py`` on a GPU): pinned copies and the unpinned-loader warnings, float64 sums through
``devices.sum_dtype``, weights-only files with CPU tensors, fused named optimizers, the sharded in-memory
permutation made before the batch loop."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from helpers import TinyNet, make_classification
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import _loaders, distributed, metrics
from fitkit._devices import pinned
from fitkit.callbacks import ModelCheckpoint
from fitkit.data import InMemoryLoader

CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
CUDA_DEVICE = torch.device("cuda")  # a device object only: nothing here touches a GPU


def _as_loader(data: Any, name: str = "train_data", **kwargs: Any) -> Any:
    kwargs.setdefault("batch_size", None)
    return _loaders.as_loader(
        data, shuffle=True, name=name, device=CUDA_DEVICE, dist=distributed.DistInfo(), training=True, **kwargs
    )


# -- item 3: pinned copies, and a warning for every unpinned CUDA loader ------------------------------
@pytest.mark.parametrize("workers, name", [(0, "train_data"), (2, "train_data"), (2, "val_data")])
def test_any_unpinned_dataloader_on_cuda_warns_naming_pin_memory(workers: int, name: str) -> None:
    x, y = make_classification(8)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, num_workers=workers)
    with pytest.warns(UserWarning) as record:
        _as_loader(loader, name)
    assert [str(w.message) for w in record] == [
        f"{name}: a DataLoader with pin_memory=False on a CUDA run: copying each batch from pageable memory "
        "to the GPU waits for it (a host sync per batch); pass pin_memory=True (and num_workers>0 to load "
        "batches while the GPU computes)"
    ]


def test_a_pinned_dataloader_does_not_warn() -> None:
    x, y = make_classification(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _as_loader(DataLoader(TensorDataset(x, y), batch_size=4, pin_memory=True))


def test_a_list_of_unpinned_cpu_batches_on_cuda_warns() -> None:
    x, y = make_classification(8)
    with pytest.warns(UserWarning, match=r"^train_data: a list of unpinned CPU batches on a CUDA run: .*pin_memory"):
        _as_loader([(x[:4], y[:4]), (x[4:], y[4:])])
    assert not pinned([(x[:4], y[:4])], CUDA_DEVICE)
    assert not pinned([(x[:4], y[:4])], torch.device("cpu"))


def test_in_memory_data_too_big_for_the_gpu_is_cut_into_pinned_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_loaders, "fits_on_device", lambda tensors, device: False)
    loader = _as_loader(make_classification(8), batch_size=4)
    assert isinstance(loader, InMemoryLoader) and loader.pin_memory and loader.x.device.type == "cpu"
    assert pinned(loader, CUDA_DEVICE)  # so the loop copies its batches with non_blocking=True
    part = loader.subset(slice(0, 4))  # a rank's share of validation data stays pinned too
    assert part.pin_memory


@pytest.mark.cuda
@pytest.mark.parametrize(
    "case", ["in-memory on the GPU", "in-memory on the host", "pinned DataLoader with workers", "pinned list"]
)
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_cuda_every_data_path_trains_without_a_per_batch_sync(
    case: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not CUDA:
        pytest.skip("needs a CUDA device")
    x, y = make_classification(256)
    if case == "in-memory on the host":
        monkeypatch.setattr(_loaders, "fits_on_device", lambda tensors, device: False)
    data: Any = (x, y)
    kwargs: dict[str, Any] = {"batch_size": 32}
    if case == "pinned DataLoader with workers":
        data, kwargs = DataLoader(TensorDataset(x, y), batch_size=32, num_workers=2, pin_memory=True), {}
    elif case == "pinned list":
        data, kwargs = [(x[i : i + 32].pin_memory(), y[i : i + 32].pin_memory()) for i in range(0, 256, 32)], {}
    model = TinyNet()
    trainer = fitkit.Trainer(
        model, "adam", "cross_entropy", device="cuda", precision=precision, verbose=0, debug_sync="error"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unpinned-loader warning either
        history = trainer.fit(data, epochs=2, **kwargs)
    assert len(history.history["loss"]) == 2


# -- item 6: every float64 sum goes through devices.sum_dtype (float32 on MPS) ------------------------
def test_metrics_sum_in_the_dtype_the_device_supports(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def fake_sum_dtype(device: torch.device) -> torch.dtype:
        asked.append(device.type)
        return torch.float32  # what MPS gets

    monkeypatch.setattr(metrics, "sum_dtype", fake_sum_dtype)
    accuracy, mean = metrics.Accuracy(), metrics.Mean()
    accuracy.update(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    mean.update(torch.tensor(2.0), 3)
    mean.update(torch.tensor([1.0, 2.0]))
    assert accuracy._sum is not None and accuracy._sum.dtype == torch.float32
    assert mean._sum is not None and mean._sum.dtype == torch.float32
    assert asked == ["cpu", "cpu", "cpu"]


# -- item 5: weights-only files hold CPU tensors ---------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_weights_only_checkpoints_load_on_a_machine_without_a_gpu(tmp_path: Any) -> None:
    model = TinyNet()
    checkpoint = ModelCheckpoint(tmp_path / "w{epoch}.pt", monitor=None, save_weights_only=True)
    trainer = fitkit.Trainer(model, "sgd", "cross_entropy", device="cuda", verbose=0, callbacks=[checkpoint])
    trainer.fit(make_classification(32), batch_size=16, epochs=1)
    weights = torch.load(tmp_path / "w1.pt", weights_only=True)
    assert weights and all(t.device.type == "cpu" for t in weights.values())


# -- item 7: named optimizers are fused on CUDA ----------------------------------------------------------
def test_named_optimizers_are_not_fused_off_cuda() -> None:
    trainer = fitkit.Trainer(TinyNet(), "adam", "cross_entropy", device="cpu", verbose=0)
    assert not trainer.optimizer.defaults.get("fused")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name, fused", [("adam", True), ("adamw", True), ("sgd", True), ("rmsprop", None)])
def test_cuda_named_optimizers_are_fused_where_torch_has_a_fused_kernel(name: str, fused: bool | None) -> None:
    trainer = fitkit.Trainer(TinyNet(), name, "cross_entropy", device="cuda", verbose=0)
    assert trainer.optimizer.defaults.get("fused") == fused


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_fp16_with_a_fused_optimizer_and_a_step_scheduler_makes_no_unmarked_sync() -> None:
    from fitkit.callbacks import LRScheduler

    trainer = fitkit.Trainer(
        TinyNet(),
        "adamw",
        "cross_entropy",
        device="cuda",
        precision="fp16",
        verbose=0,
        debug_sync="error",
        grad_clip_norm=1.0,
        accumulate_grad_batches=2,
        callbacks=[
            LRScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9), interval="step")
        ],
    )
    trainer.fit(make_classification(128), batch_size=16, epochs=1)
    assert trainer.global_step == 4


# -- item 4: the sharded in-memory batcher makes its epoch's indices in __iter__ --------------------------
def test_the_sharded_in_memory_batcher_makes_the_epochs_indices_before_the_first_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(distributed, "_shard_seed", lambda info: 0)
    x, y = make_classification(10)
    info = distributed.DistInfo(rank=1, world_size=2)
    sharded = distributed.shard_in_memory(InMemoryLoader(x, y, batch_size=2, shuffle=True), info, training=True)
    made: list[int] = []
    original = sharded._indices
    monkeypatch.setattr(sharded, "_indices", lambda: (made.append(1), original())[1])
    iterator = iter(sharded)
    assert made == [1]  # before any batch is asked for: outside the loop's debug_sync window
    sharded.set_epoch(3)  # too late for this epoch's order
    first = [b[1] for b in iterator]
    sharded.set_epoch(0)
    assert all(torch.equal(a, b[1]) for a, b in zip(first, sharded))
