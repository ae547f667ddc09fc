"""ThroughputMonitor (issue 21): FLOPs counted once on the real first step, the epoch's time breakdown, step-level
figures for the loggers, MFU's peak table, and a loop that pays nothing without a monitor."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from helpers import make_classification, make_trainer, params_of
from test_speed_features import _compile_unavailable
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fitkit import Callback
from fitkit.callbacks import ExperimentLogger, ThroughputMonitor
from fitkit.callbacks.throughput import compute_dtype, peak_flops

BREAKDOWN = ("time_data", "time_step", "time_callbacks", "time_validation")


def _linear_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 16, bias=False), nn.ReLU(), nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)
    )


def _loader(n: int = 32, batch_size: int = 8, dataset: Dataset | None = None) -> DataLoader:
    x, y = make_classification(n)
    return DataLoader(dataset if dataset is not None else TensorDataset(x, y), batch_size=batch_size)


def test_the_flop_count_of_a_linear_stack_is_the_analytic_count_and_leaves_training_unchanged():
    monitor = ThroughputMonitor(log_every_n_steps=None)
    counted = make_trainer(_linear_stack(), callbacks=[monitor])
    counted.fit(_loader(), epochs=2)
    params = sum(p.numel() for p in counted.model.parameters())
    # forward 2 x params, backward 4 x params per sample (6 x params), less the first layer's input gradient,
    # which autograd skips (the inputs need none): 2 x 4 x 16.
    assert monitor.flops_per_sample == 6 * params - 2 * 4 * 16
    assert counted.history.history["flops_per_sample"] == [monitor.flops_per_sample] * 2
    plain = make_trainer(_linear_stack())
    plain.fit(_loader(), epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(params_of(counted.model), params_of(plain.model)))
    assert counted.history.history["loss"] == plain.history.history["loss"]


class _SlowDataset(Dataset):
    def __init__(self, n: int, seconds: float) -> None:
        self.x, self.y = make_classification(n)
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.seconds)
        return self.x[i], self.y[i]


class _SlowCallback(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        time.sleep(self.seconds)


class _EpochWall(Callback):
    """Put first and last: the wall time from the first on_epoch_begin to the last on_epoch_end."""

    def __init__(self) -> None:
        self.start, self.walls = 0.0, []  # type: ignore[var-annotated]

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.walls.append(time.perf_counter() - self.start)


@pytest.mark.slow
def test_a_sleep_in_the_dataset_shows_up_in_time_data_and_the_parts_sum_to_the_wall_time():
    wall = _EpochWall()
    trainer = make_trainer(callbacks=[wall, ThroughputMonitor(log_every_n_steps=2)])
    trainer.fit(_loader(32, 8, _SlowDataset(32, 0.01)), _loader(16, 8), epochs=1)
    logs = trainer.history.history
    assert logs["time_data"][0] >= 32 * 0.01
    assert logs["time_callbacks"][0] < 0.1 and logs["time_validation"][0] < 0.1  # the sleep went to the data
    assert sum(logs[key][0] for key in BREAKDOWN) == pytest.approx(wall.walls[0], rel=0.03)


@pytest.mark.slow
def test_a_sleep_in_a_callback_shows_up_in_time_callbacks_and_validation_in_time_validation():
    wall = _EpochWall()
    monitor = ThroughputMonitor(log_every_n_steps=None)
    slow_val = _SlowDataset(16, 0.005)
    trainer = make_trainer(callbacks=[wall, _SlowCallback(0.02), monitor])
    trainer.fit(_loader(32, 8), _loader(16, 8, slow_val), epochs=1)
    logs = trainer.history.history
    assert logs["time_callbacks"][0] >= 4 * 0.02
    assert logs["time_validation"][0] >= 16 * 0.005
    assert logs["time_data"][0] < 0.04  # neither sleep went to the data
    assert sum(logs[key][0] for key in BREAKDOWN) == pytest.approx(wall.walls[0], rel=0.03)
    assert logs["samples_per_sec"][0] == pytest.approx(32 / (wall.walls[0] - logs["time_validation"][0]), rel=0.05)
    assert logs["batches_per_sec"][0] == pytest.approx(logs["samples_per_sec"][0] / 8)


class _StepRecorder(ExperimentLogger):
    def __init__(self, log_every_n_steps: int) -> None:
        super().__init__(log_every_n_steps)
        self.steps: list[tuple[int, dict[str, float]]] = []

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append((step, metrics))


def test_step_level_figures_every_n_steps_reach_a_logger_after_the_monitor():
    monitor = ThroughputMonitor(log_every_n_steps=2, tokens_per_sample=5, peak_flops=1e9)
    logger = _StepRecorder(log_every_n_steps=2)
    trainer = make_trainer(callbacks=[monitor, logger])
    trainer.fit(_loader(32, 4), epochs=1)  # 8 steps
    assert [step for step, _ in logger.steps] == [2, 4, 6, 8]
    for _, metrics in logger.steps:
        assert {"loss", "lr", "samples_per_sec", "batches_per_sec", "tokens_per_sec", "flops_per_sec", "mfu"} <= set(
            metrics
        )
        assert metrics["tokens_per_sec"] == pytest.approx(5 * metrics["samples_per_sec"])
        assert metrics["mfu"] == pytest.approx(metrics["flops_per_sec"] / 1e9)
    epoch = trainer.history.history
    assert epoch["mfu"][0] == pytest.approx(epoch["flops_per_sec"][0] / 1e9)
    assert "peak_memory_mb" not in epoch and epoch["host_rss_mb"][0] > 0  # CPU: no device memory figure


def test_tokens_from_a_function_of_the_batch():
    monitor = ThroughputMonitor(log_every_n_steps=None, tokens_per_sample=lambda batch: (batch[0] > 0).sum())
    trainer = make_trainer(callbacks=[monitor])
    loader = _loader(32, 8)
    trainer.fit(loader, epochs=1)
    x = loader.dataset.tensors[0]  # type: ignore[attr-defined]
    tokens, samples = float((x > 0).sum()), trainer.history.history["samples_per_sec"][0]
    assert trainer.history.history["tokens_per_sec"][0] == pytest.approx(samples * tokens / 32)


def test_no_clock_without_a_monitor_and_arguments_are_checked():
    trainer = make_trainer()
    trainer.fit(_loader(), epochs=1)
    assert trainer.loop_times is None
    with pytest.raises(ValueError, match="log_every_n_steps"):
        ThroughputMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="tokens_per_sample"):
        ThroughputMonitor(tokens_per_sample=0)
    with pytest.raises(ValueError, match="peak_flops"):
        ThroughputMonitor(peak_flops=-1.0)


@pytest.mark.parametrize(
    ("name", "precision", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "fp16", 989.4),
        ("NVIDIA H20", "bf16", 148.0),
        ("NVIDIA A100-SXM4-80GB", "32", 19.5),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA GeForce RTX 4090", "bf16", None),
    ],
)
def test_the_peak_table_by_device_name_and_dtype(monkeypatch, name, precision, tflops):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = peak_flops(torch.device("cuda"), precision)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))
    assert peak_flops(torch.device("cpu"), precision) is None


def test_float32_counts_as_tf32_when_torch_allows_it():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert compute_dtype("32") == "tf32" and compute_dtype("bf16") == "bf16"
        torch.set_float32_matmul_precision("highest")
        assert compute_dtype("32") == "fp32"
    finally:
        torch.set_float32_matmul_precision(before)


class _SlowToStart:
    """Re-iterable (x, y) batches whose iterator takes 0.1 s to start (a DataLoader starting its workers)."""

    def __init__(self) -> None:
        self.x, self.y = make_classification(16)

    def __len__(self) -> int:
        return 4

    def __iter__(self) -> Any:
        time.sleep(0.1)
        for start in range(0, 16, 4):
            yield self.x[start : start + 4], self.y[start : start + 4]


def test_starting_the_epochs_iterator_counts_as_data():
    trainer = make_trainer(callbacks=[ThroughputMonitor(log_every_n_steps=None)])
    trainer.fit(_SlowToStart(), epochs=1)
    logs = trainer.history.history
    assert logs["time_data"][0] >= 0.1 and logs["time_callbacks"][0] < 0.05


class _FakeEvent:
    """Stands in for the CUDA event the clock records after each step: counts, and its wait takes 0.05 s."""

    def __init__(self) -> None:
        self.recorded = self.waited = 0

    def record(self) -> None:
        self.recorded += 1

    def synchronize(self) -> None:
        self.waited += 1
        time.sleep(0.05)  # the device finishing the queued steps


class _InstallFakeEvent(Callback):
    def __init__(self) -> None:
        self.event = _FakeEvent()

    def on_train_begin(self, logs: Any = None) -> None:
        assert self.trainer.loop_times is not None
        self.trainer.loop_times.event = self.event


def test_on_cuda_the_clock_records_an_event_per_step_and_waits_only_at_points_charging_the_step():
    fake = _InstallFakeEvent()
    trainer = make_trainer(callbacks=[fake, ThroughputMonitor(log_every_n_steps=4)])
    trainer.fit(_loader(32, 4), epochs=2)  # 8 steps an epoch: points at steps 4, 8, 12, 16 and 2 epoch ends
    assert fake.event.recorded == 16 and fake.event.waited == 4 + 2
    logs = trainer.history.history
    assert min(logs["time_step"]) >= 3 * 0.05 and max(logs["time_callbacks"]) < 0.05  # the waits are the step's


# -- what the monitor costs per batch: three clock reads, one comparison (see docs/performance.md) -------------
def test_per_batch_the_monitor_costs_three_clock_reads_and_does_its_work_only_at_points(monkeypatch):
    from fitkit import _loop_times
    from fitkit.callbacks.base import bound_hook

    reads, checked = 0, 0
    real_clock = _loop_times.perf_counter

    def counting_clock() -> float:
        nonlocal reads
        reads += 1
        return real_clock()

    monkeypatch.setattr(_loop_times, "perf_counter", counting_clock)
    per_fit = []
    for batches in (8, 16):
        monitor = ThroughputMonitor(log_every_n_steps=4)
        real_check = monitor._batch_checked

        def counting_check(logs: Any, real_check: Any = real_check) -> None:
            nonlocal checked
            checked += 1
            real_check(logs)

        monitor._batch_checked = counting_check  # type: ignore[method-assign]
        reads = checked = 0
        make_trainer(callbacks=[monitor]).fit(_loader(4 * batches, 4), epochs=1)
        per_fit.append((reads, checked))
        assert bound_hook(monitor, "on_batch_begin") is None  # the FLOP count needs no hook on every batch
    assert per_fit[1][0] - per_fit[0][0] == 3 * 8  # 8 more batches: 3 reads each (no wrapper around the loader)
    assert per_fit[0][1] == 1 + 8 // 4 and per_fit[1][1] == 1 + 16 // 4  # the first batch (FLOPs), the points


class _MatmulInHooks(Callback):
    def on_batch_begin(self, batch: int, logs: Any = None) -> None:
        torch.ones(4, 4) @ torch.ones(4, 4)

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        torch.ones(4, 4) @ torch.ones(4, 4)


def test_the_flop_count_covers_the_first_step_alone_not_the_hooks_around_it():
    monitor = ThroughputMonitor(log_every_n_steps=None)
    trainer = make_trainer(_linear_stack(), callbacks=[monitor, _MatmulInHooks()])
    trainer.fit(_loader(), epochs=1)
    params = sum(p.numel() for p in trainer.model.parameters())
    assert monitor.flops_per_sample == 6 * params - 2 * 4 * 16
    assert trainer.loop_times is not None and trainer.loop_times.next_step_under is None


class _FailsInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.linear(x)  # counted, then the step fails with the counter entered
        raise RuntimeError("the first step fails")


def test_a_first_step_that_raises_under_the_flop_counter_leaves_no_dispatch_mode_behind():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    trainer = make_trainer(_FailsInForward(), callbacks=[ThroughputMonitor()])
    with pytest.raises(RuntimeError, match="the first step fails"):
        trainer.fit(_loader(), epochs=1)
    assert _get_current_dispatch_mode_stack() == []


def test_a_resumed_fit_keeps_the_checkpoints_flop_count_and_counts_no_step(tmp_path, monkeypatch):
    first = ThroughputMonitor(log_every_n_steps=None)
    trainer = make_trainer(_linear_stack(), callbacks=[first])
    trainer.fit(_loader(), epochs=1)
    trainer.save_checkpoint(tmp_path / "last.pt")
    from fitkit import _compat

    entered = []
    step_flop_counter = _compat.step_flop_counter

    class _Recording:  # the monitor's counter, recording whether a step entered it
        def __init__(self, skip: Any = None) -> None:
            self.counter = step_flop_counter(skip)

        def __enter__(self) -> Any:
            entered.append(self)
            return self.counter.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            return self.counter.__exit__(*exc)

        def get_total_flops(self) -> int:
            return int(self.counter.get_total_flops())

    monkeypatch.setattr(_compat, "step_flop_counter", _Recording)
    resumed = ThroughputMonitor(log_every_n_steps=None)
    again = make_trainer(_linear_stack(), callbacks=[resumed])
    again.fit(_loader(), epochs=2, resume=tmp_path / "last.pt")
    assert entered == [] and resumed.flops_per_sample == first.flops_per_sample
    assert again.history.history["flops_per_sample"][-1] == first.flops_per_sample  # the resumed epoch's logs


# -- compile=True (issue 21: features that meet) ----------------------------------------------------------------
def _dropout_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 16, bias=False),
        nn.ReLU(),
        nn.Dropout(0.5),  # compiled, its masks come from inductor's generator, not eager dropout's
        nn.Linear(16, 8, bias=False),
        nn.ReLU(),
        nn.Linear(8, 3, bias=False),
    )


@pytest.mark.slow  # torch.compile builds C++ kernels (about 10 s on 2 cores)
@pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))
def test_under_compile_the_flop_count_is_analytic_and_training_is_the_compiled_runs():
    import warnings

    torch._dynamo.reset()  # cold: the monitored run compiles the model itself, as a user's first fit does
    monitor = ThroughputMonitor(log_every_n_steps=None)
    counted = make_trainer(_dropout_stack(), callbacks=[monitor], compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of the count reaches the user (torch warns about global hooks)
        counted.fit(_loader(), epochs=2)
    params = sum(p.numel() for p in counted.model.parameters())
    assert monitor.flops_per_sample == 6 * params - 2 * 4 * 16  # the compiled step's own matrix products
    assert counted.history.history["flops_per_sample"] == [monitor.flops_per_sample] * 2
    plain = make_trainer(_dropout_stack(), compile=True)
    plain.fit(_loader(), epochs=2)
    # Every step ran compiled, as without the monitor: the same dropout masks, the same weights, bit for bit.
    assert counted.history.history["loss"] == plain.history.history["loss"]
    assert all(torch.equal(a, b) for a, b in zip(params_of(counted.model), params_of(plain.model)))
