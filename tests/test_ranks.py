"""Ranks that see different things (issue 15): a rank with no validation batch, per-rank seeds, the
asynchronous stop vote. Forked gloo ranks on the CPU (see ``dist_utils``)."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_ranks, run_single
from test_distributed import build, make_data
from test_speed_features import _compile_unavailable
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import distributed, rng
from fitkit.callbacks.base import may_stop_mid_epoch

pytestmark = pytest.mark.distributed


def _one_validation_sample(rank: int, out: Path) -> dict[str, Any]:
    trainer = build()
    x, y = make_data(1).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # rank 1's share is empty
    history = trainer.fit(DataLoader(make_data(), batch_size=96 // trainer.world_size), loader, epochs=2)
    return {
        "fit": {k: v for k, v in history.history.items() if k.startswith("val_")},
        "loader": trainer.evaluate(loader),
        "in_memory": trainer.evaluate((x, y), batch_size=4),
    }


def test_a_rank_without_validation_batches_reduces_the_same_layout(tmp_path: Path) -> None:
    one = run_single(_one_validation_sample, tmp_path / "one")
    for rank in run_ranks(_one_validation_sample, tmp_path / "two", timeout=30).check():
        for kind in ("fit", "loader", "in_memory"):
            assert rank[kind].keys() == one[kind].keys(), kind
            for key, value in one[kind].items():
                assert rank[kind][key] == pytest.approx(value, abs=1e-6), (kind, key)


def test_the_common_layout_is_the_union_of_the_ranks_keys_in_rank_order(monkeypatch: pytest.MonkeyPatch) -> None:
    reducer = distributed._SumOverRanks(distributed.DistInfo(world_size=2))
    monkeypatch.setattr(distributed, "gather_object", lambda obj, info: [["loss", "aux"], []])
    assert reducer.common_keys([]) == ["loss", "aux"]


# -- seeds: one per rank, the shared shuffling seed untouched -------------------------------------------
def _seeds(rank: int, out: Path, per_rank: bool) -> dict[str, Any]:
    fitkit.seed_everything(7, per_rank=per_rank)
    draw = torch.rand(3)
    loader = DataLoader(make_data(8), batch_size=4, num_workers=0)
    base_seed = iter(loader)._base_seed  # what each DataLoader worker's seed derives from
    return {"draw": draw, "last_seed": rng.last_seed(), "worker_base_seed": base_seed}


def test_each_rank_draws_its_own_random_numbers_from_one_seed(tmp_path: Path) -> None:
    ranks = run_ranks(_seeds, tmp_path / "per_rank", per_rank=True).check()
    assert not torch.equal(ranks[0]["draw"], ranks[1]["draw"])
    assert ranks[0]["worker_base_seed"] != ranks[1]["worker_base_seed"]
    assert ranks[0]["last_seed"] == ranks[1]["last_seed"] == 7  # the DistributedSampler's shared seed
    single = run_single(_seeds, tmp_path / "one", per_rank=True)
    assert torch.equal(single["draw"], ranks[0]["draw"])  # rank 0 (and one process) use the seed itself
    same = run_ranks(_seeds, tmp_path / "same", per_rank=False).check()
    assert torch.equal(same[0]["draw"], same[1]["draw"])


# -- CUDA generators: the trainer's device only -------------------------------------------------------
def test_rng_state_keeps_the_current_cuda_generator_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device], dtype=torch.uint8))
    monkeypatch.setattr(rng, "_warn_other_devices", lambda device: None)
    state = rng.capture()
    assert torch.equal(state["cuda"], torch.tensor([1], dtype=torch.uint8))
    restored: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s.tolist(), device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # resumed where the GPU has another index
    rng.restore(state)
    assert restored == [([1], 0)]
    restored_all: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored_all.append(len(states)))
    rng.restore({**state, "cuda": [torch.zeros(1), torch.zeros(1)]})  # a checkpoint of fitkit 0.1
    assert restored_all == [2]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dropout_resumes_exactly_from_the_devices_generator(tmp_path: Path) -> None:
    from torch import nn

    def run(resume: Path | None) -> torch.Tensor:
        fitkit.seed_everything(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 2))
        trainer = fitkit.Trainer(model, "sgd", "cross_entropy", device="cuda", verbose=0)
        data = make_data().tensors
        if resume is None:
            trainer.fit(data, batch_size=16, epochs=1)
            trainer.save_checkpoint(tmp_path / "e1.pt")
        else:
            trainer.fit(data, batch_size=16, epochs=1)  # the same first epoch, then the checkpoint's state
            trainer.load_checkpoint(resume)
        trainer.fit(data, batch_size=16, epochs=2)
        return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])

    assert torch.equal(run(None), run(tmp_path / "e1.pt"))


# -- the asynchronous stop vote ---------------------------------------------------------------------------
def _stop_at(
    rank: int, out: Path, step: int, on_ranks: tuple[int, ...] = (0, 1), declared: bool = False, extra: Any = ()
) -> dict[str, Any]:
    class StopOnRankOne(fitkit.Callback):
        stops_mid_epoch = not declared  # declared: it wrongly says it never stops mid-epoch

        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.dist.rank == 1 and self.trainer.global_step == step:
                self.trainer.stop("rank 1 had enough")

    votes = []
    start = distributed.StopVote.start
    distributed.StopVote.start = lambda vote, flag: (votes.append(flag), start(vote, flag))[1]  # type: ignore[method-assign]
    callbacks = [StopOnRankOne()] if rank in on_ranks else []
    trainer = build(callbacks=[*callbacks, *(make() for make in extra)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=3)
    return {
        "steps": trainer.global_step,
        "reason": trainer.state.stop_reason,
        "epochs": len(trainer.history.epoch),
        "votes": len(votes),
        "warnings": [str(w.message) for w in caught if "stop vote" in str(w.message)],
    }


@pytest.mark.parametrize("on_ranks", [(0, 1), (1,)])  # (1,): rank 0 has no such callback, yet votes with rank 1
@pytest.mark.parametrize("step, epochs", [(2, 1), (3, 1), (6, 2)])  # mid-epoch, and an epoch's last batch
def test_an_asynchronous_stop_vote_stops_every_rank_after_the_same_step(
    tmp_path: Path, step: int, epochs: int, on_ranks: tuple[int, ...]
) -> None:
    ranks = run_ranks(_stop_at, tmp_path, step=step, on_ranks=on_ranks, timeout=30).check()
    assert [r["steps"] for r in ranks] == [step, step]
    assert [r["epochs"] for r in ranks] == [epochs, epochs]
    assert [r["reason"] for r in ranks] == ["stopped on another rank", "rank 1 had enough"]
    assert [r["votes"] for r in ranks] == [step, step]  # one vote per batch, on both ranks
    assert os.environ.get("RANK") is None  # the parent stays a plain process


def test_no_stop_vote_when_nothing_can_stop_mid_epoch(tmp_path: Path) -> None:
    """Batch-level hooks of the built-in callbacks that never stop training cost no collective per batch."""
    extra = (
        lambda: fitkit.callbacks.ModelCheckpoint(
            str(tmp_path / "ckpt" / "{epoch}-{step}.pt"), monitor=None, save_freq=2
        ),
        lambda: fitkit.callbacks.EMA(decay=0.9),
        lambda: fitkit.callbacks.ProgressBar(),
    )
    ranks = run_ranks(_stop_at, tmp_path, step=99, on_ranks=(), extra=extra, timeout=60).check()
    assert [(r["votes"], r["steps"], r["epochs"]) for r in ranks] == [(0, 9, 3), (0, 9, 3)]


def test_a_stop_from_a_hook_declared_never_to_stop_lands_at_the_epochs_end_on_every_rank(tmp_path: Path) -> None:
    ranks = run_ranks(_stop_at, tmp_path, step=4, declared=True, timeout=30).check()
    assert [(r["votes"], r["steps"], r["epochs"]) for r in ranks] == [(0, 6, 2), (0, 6, 2)]  # no hang, same step
    assert ranks[0]["warnings"] == [] and len(ranks[1]["warnings"]) == 1
    assert ranks[1]["warnings"][0].startswith("training was stopped mid-epoch (rank 1 had enough) by code that")
    assert [r["reason"] for r in ranks] == [None, "rank 1 had enough"]


def test_only_the_class_that_declares_it_has_hooks_that_never_stop() -> None:
    class Bar(fitkit.callbacks.ProgressBar):  # overrides on_batch_end: it may stop again
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            self.trainer.stop("mine")

    class Quiet(fitkit.callbacks.ProgressBar):  # inherits ProgressBar's declared hook
        pass

    assert may_stop_mid_epoch(Bar().on_batch_end)
    assert not may_stop_mid_epoch(Quiet().on_batch_end)
    assert not may_stop_mid_epoch(fitkit.callbacks.ProgressBar().on_batch_end)
    assert may_stop_mid_epoch(fitkit.callbacks.TerminateOnNaN().on_batch_end)
    assert may_stop_mid_epoch(lambda batch, logs=None: None)


def test_the_built_in_callbacks_that_never_stop_mid_epoch_say_so() -> None:
    import fitkit.callbacks as module
    from fitkit.callbacks.base import MID_EPOCH_HOOKS

    classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, fitkit.Callback)]
    with_hooks = {c.__name__ for c in classes if any(h in vars(k) for k in c.__mro__[:-2] for h in MID_EPOCH_HOOKS)}
    declared = {c.__name__ for c in classes if any(vars(k).get("stops_mid_epoch") is False for k in c.__mro__)}
    assert declared == {
        "ProgressBar", "TensorBoard", "ModelCheckpoint", "BackupAndRestore", "LRScheduler", "EMA",
        "ThroughputMonitor", "Profiler", "SpikeDetection",  # SpikeDetection raises on every rank at once, not stops
    }  # fmt: skip
    assert with_hooks - declared == {"TerminateOnNaN"}  # it stops after the batch whose loss is not finite


# -- exit: no gloo worker still holds a collective's tensors when the interpreter finalizes -------------
class _Held:
    """Stands in for a tensor that a gloo worker thread still references (its use count above the base)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def _use_count(self) -> int:
        return self.count


class _Work:
    def __init__(self, completed: bool) -> None:
        self.completed = completed

    def is_completed(self) -> bool:
        return self.completed


def _in_flight() -> distributed._InFlight:
    flight = distributed._InFlight()
    flight.registered = True  # no atexit hook from a test
    return flight


def test_the_exit_drain_waits_until_the_worker_lets_go_of_a_completed_collective() -> None:
    flight, held = _in_flight(), _Held(3)
    flight.add([held], [1], _Work(completed=True))
    threading.Timer(0.2, setattr, (held, "count", 1)).start()  # the worker drops its references 0.2 s later
    start = time.monotonic()
    assert flight.drain(timeout_s=10)
    assert time.monotonic() - start >= 0.19
    assert flight.entries == []


def test_the_exit_drain_does_not_wait_for_a_collective_that_never_completed() -> None:
    flight = _in_flight()
    flight.add([_Held(3)], [1], _Work(completed=False))  # a vote whose peer died: it would never end
    start = time.monotonic()
    assert flight.drain(timeout_s=10)
    assert time.monotonic() - start < 1
    flight = _in_flight()
    flight.add([_Held(3)], [1], _Work(completed=True))  # completed, but never released: bounded
    assert not flight.drain(timeout_s=0.1)


def test_closing_the_control_group_lets_go_of_every_work() -> None:
    flight, done, stuck = _in_flight(), _Held(2), _Held(2)
    flight.add([done], [1], _Work(completed=True))
    flight.add([stuck], [1], _Work(completed=False))
    flight.let_go()  # a Work holds the group's connections open: the other ranks wait until they close
    assert [(entry[0], entry[2]) for entry in flight.entries] == [(done, None)]


def _control_messages(rank: int, out: Path) -> dict[str, Any]:
    from torch import distributed as dist

    trainer = build(callbacks=[fitkit.callbacks.ModelCheckpoint(str(out / f"r{rank}" / "{epoch}.pt"), monitor=None)])
    info = trainer.dist
    calls: dict[str, int] = {"control": 0, "tracked": 0}
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier"):
        original = getattr(dist, name)

        def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            calls["control"] += kwargs.get("group") is info.control_group
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    run = distributed._run

    def tracked(*args: Any, **kwargs: Any) -> Any:
        calls["tracked"] += 1
        return run(*args, **kwargs)

    distributed._run = tracked
    trainer.fit(DataLoader(make_data(), batch_size=16), DataLoader(make_data(40), batch_size=16), epochs=2)
    trainer.predict(DataLoader(make_data(24), batch_size=8))
    objects = {
        "gathered": distributed.gather_object(
            {"rank": rank, "blob": b"x" * (1000 * rank), "t": torch.ones(rank)}, info
        ),
        "broadcast": distributed.broadcast_object(("from", rank, torch.arange(3)), info),
        "mean": distributed.mean_over_ranks({"a": float(rank), "b": 2.0}, info),
    }
    distributed.barrier(info)
    drained = distributed._in_flight.drain(timeout_s=10)
    return {**objects, **calls, "drained": drained, "left": len(distributed._in_flight.entries)}


def test_every_control_message_is_tracked_until_gloo_lets_go_of_it(tmp_path: Path) -> None:
    for rank, result in enumerate(run_ranks(_control_messages, tmp_path, timeout=60).check()):
        assert result["control"] > 10 and result["control"] == result["tracked"], result  # none bypasses _run
        assert result["drained"] and result["left"] == 0
        gathered = result["gathered"]
        assert [g["rank"] for g in gathered] == [0, 1] and [len(g["blob"]) for g in gathered] == [0, 1000]
        assert [g["t"].tolist() for g in gathered] == [[], [1.0]]
        assert result["broadcast"][:2] == ("from", 0) and result["broadcast"][2].tolist() == [0, 1, 2], rank
        assert result["mean"] == {"a": 0.5, "b": 2.0}


# -- warnings: fitkit's own print once (rank 0), not once per rank -----------------------------------------
def _warnings_seen(rank: int, out: Path) -> dict[str, list[str]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = build()
        loader = DataLoader(make_data(), batch_size=96 // trainer.world_size)
        # validate_every_n_steps beyond the run's last step: a FitkitWarning computed alike on every rank
        trainer.fit(loader, DataLoader(make_data(8), batch_size=4), epochs=1, validate_every_n_steps=1000)
        warnings.warn("the user's own warning", UserWarning, stacklevel=1)  # never filtered by fitkit
    return {
        "fitkit": [str(w.message) for w in seen if issubclass(w.category, fitkit.FitkitWarning)],
        "other": [str(w.message) for w in seen if w.category is UserWarning],
    }


def test_fitkit_warnings_print_on_rank_zero_only(tmp_path: Path) -> None:
    # Issue 19: each of fitkit's warnings printed once per rank (N copies of the same advice under torchrun).
    ranks = run_ranks(_warnings_seen, tmp_path, timeout=60).check()
    assert any("validate_every_n_steps=1000 is beyond this run's last step" in m for m in ranks[0]["fitkit"])
    assert ranks[1]["fitkit"] == []
    assert ranks[0]["other"] == ranks[1]["other"] == ["the user's own warning"]
    assert issubclass(fitkit.FitkitWarning, UserWarning)  # pytest.warns(UserWarning) and filters keep working


# -- uneven data: an IterableDataset whose ranks hold different numbers of batches (issue 19) ------------------
class _RankStream(torch.utils.data.IterableDataset):
    """Rank r's own part of a stream: ``counts[r]`` batches of 4 samples."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        data = make_data(96)
        for i in range(self.counts[rank] * 4):
            yield data[(rank * 37 + i) % len(data)]


def _uneven(rank: int, out: Path, counts: list[int]) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = build(process_group_timeout=20)
        trainer.fit(DataLoader(_RankStream(counts), batch_size=4), epochs=2)
    return {
        "step": trainer.global_step,
        "weights": [p.detach().clone() for p in trainer.model.parameters()],
        "warnings": [str(w.message) for w in seen if "different numbers of batches" in str(w.message)],
    }


def test_ranks_with_unequal_batch_counts_end_each_epoch_together(tmp_path: Path) -> None:
    # It hung in DDP's all-reduce until the process group's timeout: rank 0 had left the epoch, rank 1 had not.
    uneven = run_ranks(_uneven, tmp_path / "uneven", [5, 8], timeout=60).check()
    cut = run_ranks(_uneven, tmp_path / "cut", [5, 5], timeout=60).check()  # the same data, cut by hand
    for rank in (0, 1):
        assert uneven[rank]["step"] == 10  # 5 batches an epoch: the shortest rank's
        for mine, reference in zip(uneven[rank]["weights"], cut[rank]["weights"]):
            assert torch.equal(mine, reference)  # exactly the training of the data every rank had
    assert (
        len(uneven[0]["warnings"]) == 1 and "every rank ended the epoch after 5 batch(es)" in uneven[0]["warnings"][0]
    )
    assert uneven[1]["warnings"] == [] and cut[0]["warnings"] == []  # rank 0 only; equal data: nothing to say


def _uneven_monitored(rank: int, out: Path, counts: list[int]) -> dict[str, Any]:
    from fitkit.callbacks import ThroughputMonitor

    monitor = ThroughputMonitor(log_every_n_steps=2)
    trainer = build(process_group_timeout=20, callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uneven-data warning (tested above)
        trainer.fit(DataLoader(_RankStream(counts), batch_size=4), epochs=2)
    clock = trainer.loop_times
    assert clock is not None
    return {"history": trainer.history.history, "samples": clock.samples, "batches": clock.batches}


def test_the_monitors_job_wide_rates_count_only_the_batches_trained_on_uneven_data(tmp_path: Path) -> None:
    # Rank 1 holds 8 batches an epoch, rank 0 5: every rank trains 5 (the ranks stay in step), and the job's
    # samples per second are those 2 x 5 x 4 samples over the ranks' mean training time, each epoch.
    ranks = run_ranks(_uneven_monitored, tmp_path / "uneven", [5, 8], timeout=60).check()
    for rank in ranks:
        assert rank["samples"] == 2 * 5 * 4 and rank["batches"] == 2 * 5  # 2 epochs of 5 batches of 4
    parts = ("time_data", "time_step", "time_callbacks")  # an epoch's training time: its wall time less validation
    for epoch in range(2):
        seconds = [sum(rank["history"][part][epoch] for part in parts) for rank in ranks]
        expected = 2 * 5 * 4 / (sum(seconds) / 2)
        for rank in ranks:
            assert rank["history"]["samples_per_sec"][epoch] == pytest.approx(expected, rel=1e-6)
            assert rank["history"]["batches_per_sec"][epoch] == pytest.approx(expected / 4, rel=1e-6)


class _UserNet(torch.nn.Module):
    """The monitor tests' dropout stack inside a module of user code: dynamo compiles its frame when DDP's forward
    calls it (it skips torch's own nn.Sequential as a frame of its own there)."""

    def __init__(self) -> None:
        from test_throughput_monitor import _dropout_stack

        super().__init__()
        self.body = _dropout_stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _compiled_ddp(rank: int, out: Path, monitored: bool) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    from fitkit.callbacks import ThroughputMonitor

    monitor = ThroughputMonitor(log_every_n_steps=None)
    fitkit.seed_everything(0)  # per rank: each rank's own dropout masks
    model = _UserNet()
    trainer = fitkit.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        "cross_entropy",
        device="cpu",
        verbose=0,
        compile=True,
        callbacks=[monitor] if monitored else [],
    )
    x, y = make_data(64).tensors
    trainer.fit(DataLoader(TensorDataset(x[:, :4], y), batch_size=8, shuffle=True), epochs=2)
    return {
        "flops_per_sample": monitor.flops_per_sample,
        "graphs": counters["stats"]["unique_graphs"],
        "loss": trainer.history.history["loss"],
        "weights": [p.detach().clone() for p in model.parameters()],
    }


@pytest.mark.slow  # torch.compile in each rank
@pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))
def test_the_monitor_counts_a_compiled_ddp_step_and_leaves_its_training_alone(tmp_path: Path) -> None:
    # DDP compiles its graph's pieces at their first call, inside the first step: a count of that step counted the
    # compiler's traced ops too (1600 to 3200 FLOPs a sample, not 1168). The monitor counts the second step.
    # Fresh interpreters: after another test's compiled backward, a fork of this process cannot run autograd (in CI's
    # full run the forked ranks hung until the deadline).
    monitored = run_ranks(_compiled_ddp, tmp_path / "monitored", True, timeout=240, start_method="spawn").check()
    plain = run_ranks(_compiled_ddp, tmp_path / "plain", False, timeout=240, start_method="spawn").check()
    params = 4 * 16 + 16 * 8 + 8 * 3
    for mine, reference in zip(monitored, plain):
        assert mine["graphs"] == 1  # the step ran compiled
        assert mine["flops_per_sample"] == 6 * params - 2 * 4 * 16
        assert mine["loss"] == reference["loss"]
        assert all(torch.equal(a, b) for a, b in zip(mine["weights"], reference["weights"]))
