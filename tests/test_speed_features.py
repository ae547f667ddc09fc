"""Speed features that a CPU can check: the import cost, ``compile=True``, ``channels_last=True``, the
slow-callback warning, and ``debug_sync`` (its validation, and its window on a faked CUDA mode; the real
CUDA runs are behind ``skipif``). Speed itself is measured in ``benchmarks/``, not here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
from helpers import TinyNet, make_classification, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitkit
import fitkit._loaders
import fitkit.trainer as trainer_module
from fitkit import Callback
from fitkit._devices import pinned as loader_is_pinned

CUDA = torch.cuda.is_available()


# -- import cost ---------------------------------------------------------------------------------
_IMPORT_PROBE = """
import json, sys
import torch
import fitkit
print(json.dumps({"modules": sorted(sys.modules)}))
"""
_OPTIONAL = (
    "torchvision", "tensorboard", "torch.utils.tensorboard", "matplotlib", "sklearn", "lightning", "mlflow", "optuna",
    "wandb", "ipywidgets", "IPython",
)  # fmt: skip


def _import_probe() -> dict:
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_fitkit_imports_no_optional_package():
    """The time ``import fitkit`` adds is a benchmark figure (``benchmarks/overhead.py``: from cached bytecode,
    and compiling from source), not a timed test; what it imports is checked here."""
    modules = _import_probe()["modules"]
    loaded = [name for name in _OPTIONAL if name in modules]
    assert loaded == [], f"import fitkit imported optional packages {loaded}; import them where they are used"


# -- compile=True --------------------------------------------------------------------------------
def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if sys.platform == "win32" or not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "torch.compile's CPU backend needs a C++ compiler"
    return None


@pytest.mark.slow  # torch.compile builds C++ kernels
@pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))
@pytest.mark.timeout(600)
def test_compile_trains_like_eager_and_checkpoints_keep_the_plain_keys(tmp_path):
    x, y = make_classification(48, seed=3)

    def run(compile: bool) -> fitkit.Trainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        trainer = make_trainer(model, compile=compile)
        trainer.fit((x, y), batch_size=16, epochs=2)  # 48 = 3 x 16: one shape, one compilation
        return trainer

    eager, compiled = run(False), run(True)
    assert compiled._modules.train is not compiled.model  # the compiled wrapper runs the steps ...
    assert (
        list(compiled.model.state_dict())
        == list(eager.model.state_dict())
        == ["0.weight", "0.bias", "2.weight", "2.bias"]
    )
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)  # ... and trains the same model
    assert eager.history.history["loss"] == pytest.approx(compiled.history.history["loss"], rel=1e-4)

    # Checkpoints hold the plain module's keys: they load across compiled and eager trainers.
    compiled.save_checkpoint(tmp_path / "compiled.pt")
    eager.save_checkpoint(tmp_path / "eager.pt")
    for path, target_compiled in ((tmp_path / "compiled.pt", False), (tmp_path / "eager.pt", True)):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        target = make_trainer(model, compile=target_compiled)
        target.load_checkpoint(path)  # strict: the same keys
        source = compiled if path.name == "compiled.pt" else eager
        for a, b in zip(source.model.parameters(), target.model.parameters()):
            assert torch.equal(a, b)


# -- channels_last=True --------------------------------------------------------------------------
class _RecordingConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.inputs_channels_last: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs_channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_channels_last_converts_model_and_4d_inputs_and_trains_the_same():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 2, (16,), generator=g)
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = _RecordingConvNet()
        trainer = make_trainer(model, channels_last=channels_last)
        if channels_last:
            assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
        trainer.fit(DataLoader(TensorDataset(x, y), batch_size=8), epochs=2)
        assert set(model.inputs_channels_last) == {channels_last}
        results[channels_last] = model
    for a, b in zip(results[False].parameters(), results[True].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_channels_last_with_non_image_inputs_trains_as_usual():
    x, y = make_classification(8)
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = TinyNet()
        make_trainer(model, channels_last=channels_last).fit((x, y), batch_size=4, epochs=1)
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):  # 2-D inputs: nothing to convert
        assert torch.equal(a, b)


# -- the slow-callback warning -------------------------------------------------------------------
class _BusyCallback(Callback):
    """Spins (not sleeps: a sleeping process may wait to get its core back) for ``seconds`` per batch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.calls += 1
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass


class _CheapCallback(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.calls += 1


@pytest.fixture
def one_thread():
    # On a busy machine torch's intra-op thread pool can stall a tiny step far longer than the Python
    # callback it is compared with; one thread keeps the shares what they are on an idle machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _fit_recording_warnings(trainer: fitkit.Trainer, n_batches: int, epochs: int = 1) -> list[str]:
    x, y = make_classification(4 * n_batches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit((x, y), batch_size=4, epochs=epochs)
    return [str(w.message) for w in caught if "is slow" in str(w.message)]


def test_a_slow_callback_is_named_once_with_its_time_per_batch(one_thread):
    slow, cheap = _BusyCallback(0.01), _CheapCallback()
    trainer = make_trainer(callbacks=[cheap, slow])
    messages = _fit_recording_warnings(trainer, n_batches=30, epochs=2)
    assert len(messages) == 1
    assert messages[0].startswith("callback _BusyCallback is slow: its on_batch_end takes ")
    assert "ms per training batch" in messages[0] and "(medians over batches 5-24)" in messages[0]
    assert "every N batches, or in on_epoch_end" in messages[0]
    assert slow.calls == cheap.calls == 60  # timed or not, every hook ran on every batch
    # The timers are gone: the loop calls the callbacks' own bound methods again.
    assert trainer._run.callbacks.hooks["on_batch_end"] == [slow.on_batch_end]
    assert trainer._run.callbacks.hooks["on_batch_begin"] == [cheap.on_batch_begin]
    assert _fit_recording_warnings(trainer, n_batches=30) == []  # once per Trainer


def test_cheap_callbacks_and_short_epochs_raise_no_warning(one_thread):
    cheap = _CheapCallback()
    assert _fit_recording_warnings(make_trainer(callbacks=[cheap], verbose=2), n_batches=30) == []
    assert cheap.calls == 30
    slow = _BusyCallback(0.01)
    assert _fit_recording_warnings(make_trainer(callbacks=[slow]), n_batches=10, epochs=2) == []  # < 25 batches
    assert slow.calls == 20


def test_no_timing_at_all_without_per_batch_hooks(monkeypatch):
    built = []
    monkeypatch.setattr(trainer_module, "HookTimer", lambda callbacks, on_measured: built.append(callbacks))

    class EpochOnly(Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            pass

    _fit_recording_warnings(make_trainer(callbacks=[EpochOnly()], verbose=0), n_batches=30)
    assert built == []
    _fit_recording_warnings(make_trainer(callbacks=[_CheapCallback()], verbose=0), n_batches=30)
    assert len(built) == 1


# -- debug_sync ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["loud", "raise", 2, None])
def test_debug_sync_rejects_unknown_values(value):
    with pytest.raises(
        ValueError,
        match=r"debug_sync must be False \(off\), True or 'warn' \(torch warns at every "
        r"host-device synchronisation in the batch loop on CUDA\) or 'error' "
        r"\(raises there instead\), got " + re.escape(repr(value)),
    ):
        make_trainer(debug_sync=value)


@pytest.mark.parametrize("value", [False, True, "warn", "error"])
def test_debug_sync_is_a_no_op_off_cuda(value, monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: pytest.fail("touched CUDA's sync mode"))
    x, y = make_classification(8)
    trainer = make_trainer(debug_sync=value)
    trainer.fit((x, y), (x, y), batch_size=4, epochs=1)
    assert trainer.debug_sync == value


class _FakeSyncMode:
    """Stands in for torch.cuda's sync debug mode, recording the mode in force at each event."""

    def __init__(self) -> None:
        self.mode = 0
        self.seen: list[tuple[str, int | str]] = []

    def get(self) -> int | str:
        return self.mode

    def set(self, mode: int | str) -> None:
        self.mode = mode


def test_debug_sync_window_covers_batches_not_deliberate_syncs(monkeypatch):
    fake = _FakeSyncMode()
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", fake.get)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake.set)

    class Probe(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            fake.seen.append(("epoch_begin", fake.mode))

        def on_batch_end(self, batch, logs=None):
            fake.seen.append(("batch_end", fake.mode))
            if batch == 1:
                with self.trainer.allow_sync():
                    fake.seen.append(("allowed", fake.mode))

        def on_validation_batch_end(self, batch, logs=None):
            fake.seen.append(("val_batch_end", fake.mode))

        def on_epoch_end(self, epoch, logs=None):
            fake.seen.append(("epoch_end", fake.mode))

    x, y = make_classification(8)
    trainer = make_trainer(callbacks=[Probe()], debug_sync="error")
    # Only the window logic sees CUDA: the model and the data stay on the CPU.
    trainer.device = torch.device("cuda")
    monkeypatch.setattr(fitkit._loaders, "fits_on_device", lambda tensors, device: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # host batches would be pinned for CUDA
    monkeypatch.setattr(fitkit._pipeline, "move_to_device", lambda batch, device, non_blocking=False: batch)
    trainer.fit((x, y), (x, y), batch_size=4, epochs=1)
    assert fake.seen == [
        ("epoch_begin", 0),
        ("batch_end", "error"),
        ("batch_end", "error"),
        ("allowed", 0),
        ("val_batch_end", "error"),
        ("val_batch_end", "error"),
        ("epoch_end", 0),
    ]
    assert fake.mode == 0  # restored


# -- CUDA: run where a GPU is present ------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_cuda_epoch_makes_no_per_batch_sync(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    x, y = make_classification(256)
    model = TinyNet()
    trainer = fitkit.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        "cross_entropy",
        device="cuda",
        precision=precision,
        verbose=0,
        debug_sync="error",
        metrics=["accuracy"],
    )
    history = trainer.fit((x, y), (x, y), batch_size=16, epochs=2)  # in-memory: the data live on the GPU
    assert len(history.history["loss"]) == 2


def test_non_blocking_copies_follow_the_loader_being_iterated():
    x, y = make_classification(8)
    pinned = DataLoader(TensorDataset(x, y), batch_size=4, pin_memory=True)
    plain = DataLoader(TensorDataset(x, y), batch_size=4)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert loader_is_pinned(pinned, cuda) and not loader_is_pinned(plain, cuda)
    assert not loader_is_pinned(pinned, cpu) and not loader_is_pinned((x, y), cuda)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_pinned_training_loader_is_copied_without_blocking_even_with_an_unpinned_validation_one():
    x, y = make_classification(64)
    seen, copies = [], []
    move = fitkit._pipeline.move_to_device

    def recording(batch, device, non_blocking=False):  # what each batch's copy was asked to do
        copies.append(non_blocking)
        return move(batch, device, non_blocking)

    class Probe(Callback):
        def on_batch_end(self, batch, logs=None):
            seen.append(("train", copies[-1]))

        def on_validation_batch_end(self, batch, logs=None):
            seen.append(("val", copies[-1]))

    trainer = fitkit.Trainer(TinyNet(), "sgd", "cross_entropy", device="cuda", verbose=0, callbacks=[Probe()])
    fitkit._pipeline.move_to_device = recording  # type: ignore[assignment]
    try:
        trainer.fit(
            DataLoader(TensorDataset(x, y), batch_size=32, pin_memory=True),
            DataLoader(TensorDataset(x, y), batch_size=32, num_workers=1),
            epochs=1,
        )
    finally:
        fitkit._pipeline.move_to_device = move  # type: ignore[assignment]
    assert seen == [("train", True), ("train", True), ("val", False), ("val", False)]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_pinned_loader_copies_without_blocking_and_unpinned_one_warns():
    x, y = make_classification(64)
    trainer = fitkit.Trainer(TinyNet(), "sgd", "cross_entropy", device="cuda", verbose=0, debug_sync="error")
    trainer.fit(DataLoader(TensorDataset(x, y), batch_size=16, pin_memory=True), epochs=1)  # no sync: no error
    assert trainer._run.plan.train.feed.non_blocking
    trainer = fitkit.Trainer(TinyNet(), "sgd", "cross_entropy", device="cuda", verbose=0)
    with pytest.warns(UserWarning, match="a DataLoader with pin_memory=False on a CUDA run"):
        trainer.fit(DataLoader(TensorDataset(x, y), batch_size=16), epochs=1)


# -- the step methods ----------------------------------------------------------------------------
def test_overridden_step_methods_are_called_however_they_are_overridden(monkeypatch):
    """The loop calls train_step/backward/optimizer_step through the instance every batch, so an
    override in a subclass, on the instance or patched on the class takes effect."""
    calls = []

    class OwnBackward(fitkit.Trainer):
        def backward(self, loss):
            calls.append("subclass backward")
            super().backward(loss)

    model = TinyNet()
    subclassed = OwnBackward(
        model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", device="cpu", verbose=0
    )
    subclassed.fit(make_classification(8), batch_size=4, epochs=1)
    assert calls == ["subclass backward"] * 2
    on_instance = make_trainer()
    on_instance.train_step = lambda batch: (
        calls.append("instance step"),
        fitkit.Trainer.train_step(on_instance, batch),
    )[1]
    on_instance.fit(make_classification(8), batch_size=4, epochs=1)
    assert calls[2:] == ["instance step"] * 2
    original = fitkit.Trainer.optimizer_step
    monkeypatch.setattr(
        fitkit.Trainer, "optimizer_step", lambda self, *args: (calls.append("patched step"), original(self, *args))
    )
    make_trainer().fit(make_classification(8), batch_size=4, epochs=1)
    assert calls[4:] == ["patched step"] * 2
