"""What does the training loop cost? fitkit against the two hand-written loops tutorials teach.

Runs each loop in its own process (one CPU thread, ``torch.set_num_threads(1)``), in interleaved rounds
so that a noisy neighbour slows every runner alike, and reports training steps per second: the
train steps of a timed ``fit`` (3 epochs, each with a validation pass) over its wall time. A separate
short warm-up run in the same process comes first and is not timed; of the ``--repeats`` timed runs
in a process the fastest counts; the table gives the median over rounds, and the median of the
per-round ratios to ``loop`` (paired: the two ran minutes apart at most).

Runners (``ratio`` is against ``loop``, measured in the same round):

* ``loop``: the tutorial loop without per-step syncs (``total += loss.detach() * len(x)``), 1.00.
* ``loop_item``: the same loop with ``loss.item()`` every batch, as most tutorials write it.
* ``loop_mem``: the ``loop`` cutting batches from in-memory tensors (one permutation per epoch).
* ``fitkit``: ``Trainer`` defaults (History, and the progress bar writing to a pipe) on the DataLoaders.
* ``fitkit_v0``: the same with ``verbose=0``. The training DataLoader is a ``DataLoader(TensorDataset)``,
  so fitkit cuts its batches by indexing the tensors (``fast_tensor_batches``, bit-identical batches).
* ``fitkit_dl``: ``fitkit_v0`` with ``Trainer(fast_tensor_batches=False)``: the DataLoader itself, sample by sample.
* ``fitkit_mem``: ``fit((x, y), (x_val, y_val), batch_size=..., epochs=3)`` with defaults, no DataLoader.
* with ``--monitor``: ``fitkit_mon``, ``fitkit_v0`` with a ``ThroughputMonitor()`` (default interval, 50 steps):
  what the monitor costs is its ratio to ``fitkit_v0`` (sharper: ``--paired fitkit_mon --against fitkit_v0``).
* with ``--peers``: ``lightning`` (no bar), ``lightning_bar`` (its tqdm bar), ``keras`` (Keras 3 on torch,
  ``verbose=0``), each reading the same DataLoaders; "not installed" when the package is missing.

Usage::

    python benchmarks/overhead.py                     # MLP and CNN, 5 rounds (a few minutes)
    python benchmarks/overhead.py --peers --rounds 7  # with Lightning and Keras rows
    python benchmarks/overhead.py --workloads mlp --rounds 2 --train-batches 300   # a quick look
    python benchmarks/overhead.py --workloads mlp --rounds 3 --monitor  # with ThroughputMonitor on
    python benchmarks/overhead.py --workloads mlp --paired fitkit_mon --against fitkit_v0 --rounds 40 \
        --val-batches 0                               # what the monitor adds to a training step
    python benchmarks/overhead.py --workloads mlp --paired fitkit_mon --against fitkit_v0 --rounds 30 \
        --per-batch                                   # the same, per batch and once per fit, on a loaded machine

Writes ``benchmarks/results/overhead.json`` (``--json`` to change) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BASE_RUNNERS = ["loop", "loop_item", "loop_mem", "fitkit", "fitkit_v0", "fitkit_dl", "fitkit_mem"]
PEER_RUNNERS = ["lightning", "lightning_bar", "keras"]
PEER_PACKAGES = {"lightning": "lightning", "lightning_bar": "lightning", "keras": "keras"}

# The targets: (workload, runner) -> minimum ratio to `loop`.
TARGETS = {
    ("mlp", "fitkit"): 0.97,
    ("mlp", "fitkit_v0"): 0.98,
    ("mlp", "fitkit_mem"): 1.6,
    ("cnn", "fitkit"): 0.99,
}

DESCRIPTIONS = {
    "loop": "hand-written loop, no per-step sync (reference)",
    "loop_item": "hand-written loop, `loss.item()` every batch",
    "loop_mem": "hand-written loop, batches cut from in-memory tensors",
    "fitkit": "fitkit defaults (History + progress bar to a pipe)",
    "fitkit_v0": "fitkit `verbose=0` (TensorDataset fast path)",
    "fitkit_dl": "fitkit `verbose=0, fast_tensor_batches=False` (the DataLoader itself)",
    "fitkit_mem": "fitkit `fit((x, y), (x_val, y_val), batch_size=...)`",
    "fitkit_mon": "fitkit `verbose=0` with `ThroughputMonitor()` (default interval)",
    "lightning": "Lightning, no progress bar",
    "lightning_bar": "Lightning with its tqdm bar (to a pipe)",
    "keras": "Keras 3 on torch, `verbose=0`",
}


# -- the runners (run inside a child process) ------------------------------------------------------
class _Clock:
    """Wall time and this process's CPU time (all threads) of the timed section.

    CPU time hardly moves when a neighbour takes the core away for a while (wall time does), so on a
    shared machine it is the steadier estimate of what the loop costs; both are reported.
    """

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _loop(
    workload: Any, tensors: tuple, epochs: int, sync_every_step: bool, in_memory: bool = False
) -> tuple[float, float]:
    import torch
    from torch import nn
    from workloads import build_model, make_loaders

    model = build_model(workload.name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    train_loader, val_loader = make_loaders(workload, tensors)
    x_all, y_all, x_val_all, y_val_all = tensors
    bs = workload.batch_size

    def train_batches():
        if not in_memory:
            yield from train_loader
            return
        perm = torch.randperm(len(x_all))
        for start in range(0, len(x_all), bs):
            index = perm[start : start + bs]
            yield x_all[index], y_all[index]

    def val_batches():
        if not in_memory:
            yield from val_loader
            return
        for start in range(0, len(x_val_all), bs):
            yield x_val_all[start : start + bs], y_val_all[start : start + bs]

    clock = _Clock()
    for _ in range(epochs):
        model.train()
        total: Any = 0.0 if sync_every_step else torch.zeros(())
        for x, y in train_batches():
            optimizer.zero_grad()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            if sync_every_step:
                total += loss.item() * len(x)
            else:
                total += loss.detach() * len(x)
        train_loss = float(total) / len(x_all)
        model.eval()
        val_total: Any = 0.0 if sync_every_step else torch.zeros(())
        with torch.no_grad():
            for x, y in val_batches():
                loss = loss_fn(model(x), y)
                val_total += loss.item() * len(x) if sync_every_step else loss * len(x)
        val_loss = float(val_total) / max(len(x_val_all), 1)  # --val-batches 0: no validation
        assert train_loss == train_loss and val_loss == val_loss  # the epoch's figures, computed once
    return clock.stop()


def _fitkit(
    workload: Any,
    tensors: tuple,
    epochs: int,
    verbose: int = 1,
    in_memory: bool = False,
    fast: bool = True,
    monitor: bool = False,
    null_step: bool = False,
) -> tuple[float, float]:
    import torch
    from workloads import build_model, make_loaders

    import fitkit

    model = build_model(workload.name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    options = {} if fast else {"fast_tensor_batches": False}
    callbacks = [fitkit.callbacks.ThroughputMonitor()] if monitor else []
    trainer = (_null_step_trainer() if null_step else fitkit.Trainer)(
        model, optimizer, "cross_entropy", callbacks=callbacks, device="cpu", verbose=verbose, **options
    )
    clock = _Clock()
    validate = workload.val_batches > 0  # --val-batches 0: no validation
    if in_memory:
        x, y, x_val, y_val = tensors
        trainer.fit((x, y), (x_val, y_val) if validate else None, batch_size=workload.batch_size, epochs=epochs)
    else:
        train, val = make_loaders(workload, tensors)
        trainer.fit(train, val if validate else None, epochs=epochs)
    return clock.stop()


def _null_step_trainer() -> Any:
    import fitkit

    class NullStep(fitkit.Trainer):
        """A train_step that does nothing: what is left is the loop's own Python (``--per-batch``)."""

        def train_step(self, batch: Any) -> dict[str, Any]:
            return {}

    return NullStep


def _lightning(workload: Any, tensors: tuple, epochs: int, progress_bar: bool = False) -> tuple[float, float]:
    import lightning as L
    import torch
    from torch import nn
    from workloads import build_model, make_loaders

    class LitModel(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model(workload.name)
            self.loss_fn = nn.CrossEntropyLoss()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = self.loss_fn(self.model(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", self.loss_fn(self.model(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    warnings.filterwarnings("ignore")  # "does not have many workers", "GPU available but not used" ...
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
    )
    module = LitModel()
    train_loader, val_loader = make_loaders(workload, tensors)
    clock = _Clock()
    trainer.fit(module, train_loader, val_loader)
    return clock.stop()


def _keras(workload: Any, tensors: tuple, epochs: int) -> tuple[float, float]:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras
    from workloads import make_loaders

    layers = keras.layers
    if workload.name == "mlp":
        model = keras.Sequential(
            [keras.Input(workload.input_shape), layers.Dense(64, activation="relu"), layers.Dense(10)]
        )
    else:
        conv = {"padding": "same", "activation": "relu", "data_format": "channels_first"}
        model = keras.Sequential(
            [
                keras.Input(workload.input_shape),
                layers.Conv2D(8, 3, **conv),
                layers.MaxPooling2D(2, data_format="channels_first"),
                layers.Conv2D(16, 3, **conv),
                layers.MaxPooling2D(2, data_format="channels_first"),
                layers.Flatten(),
                layers.Dense(10),
            ]
        )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    train_loader, val_loader = make_loaders(workload, tensors)
    clock = _Clock()
    model.fit(train_loader, validation_data=val_loader, epochs=epochs, verbose=0)
    return clock.stop()


RUNNERS: dict[str, Callable[..., tuple[float, float]]] = {
    "loop": lambda w, t, e: _loop(w, t, e, sync_every_step=False),
    "loop_item": lambda w, t, e: _loop(w, t, e, sync_every_step=True),
    "loop_mem": lambda w, t, e: _loop(w, t, e, sync_every_step=False, in_memory=True),
    "fitkit": lambda w, t, e, **o: _fitkit(w, t, e, **o),
    "fitkit_v0": lambda w, t, e, **o: _fitkit(w, t, e, verbose=0, **o),
    "fitkit_dl": lambda w, t, e, **o: _fitkit(w, t, e, verbose=0, fast=False, **o),
    "fitkit_mem": lambda w, t, e, **o: _fitkit(w, t, e, in_memory=True, **o),
    "fitkit_mon": lambda w, t, e, **o: _fitkit(w, t, e, verbose=0, monitor=True, **o),
    "lightning": lambda w, t, e: _lightning(w, t, e),
    "lightning_bar": lambda w, t, e: _lightning(w, t, e, progress_bar=True),
    "keras": _keras,
}


def count_opcodes(run: Callable[..., Any], workload: Any, small: int = 20, large: int = 60) -> float:
    """Python bytecode instructions the loop executes per training batch (``sys.settrace``).

    Deterministic where times are not: two one-epoch fits of ``small`` and ``large`` training batches
    (the same 2 validation batches), after the warm-up; the difference over ``large - small``.
    """
    import torch
    from workloads import make_tensors

    def counted(train_batches: int) -> int:
        scaled = workload.scaled(train_batches, 2)
        tensors = make_tensors(scaled)
        count = 0

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            nonlocal count
            frame.f_trace_opcodes = True
            if event == "opcode":
                count += 1
            return tracer

        torch.manual_seed(0)
        sys.settrace(tracer)
        try:
            run(scaled, tensors, 1)
        finally:
            sys.settrace(None)
        return count

    return (counted(large) - counted(small)) / (large - small)


def child(args: argparse.Namespace) -> None:
    """One measurement: a short warm-up fit, then ``--repeats`` timed ones (fresh model each time); the
    fastest counts, as the one least disturbed by other processes. Prints ``RESULT <json>``."""
    import torch
    from workloads import WORKLOADS, make_tensors

    torch.set_num_threads(1)
    workload = WORKLOADS[args.workload].scaled(args.train_batches, args.val_batches)
    warm = workload.scaled(min(30, workload.train_batches), min(5, workload.val_batches))
    run = RUNNERS[args.child]
    torch.manual_seed(1)
    run(warm, make_tensors(warm, seed=1), 1)
    if args.count_opcodes:
        print(
            "RESULT "
            + json.dumps(
                {"runner": args.child, "workload": workload.name, "opcodes_per_batch": count_opcodes(run, workload)}
            ),
            flush=True,
        )
        return
    tensors = make_tensors(workload)
    times = []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        times.append(run(workload, tensors, args.epochs))
    wall, cpu = min(times)
    steps = args.epochs * workload.train_batches
    print(
        "RESULT "
        + json.dumps(
            {
                "runner": args.child,
                "workload": workload.name,
                "steps": steps,
                "wall_s": wall,
                "cpu_s": cpu,
                "steps_per_s": steps / wall,
                "steps_per_cpu_s": steps / cpu,
                "all_wall_s": [t[0] for t in times],
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


# -- the parent: rounds, medians, the table ------------------------------------------------------
def paired(
    runner: str, workload_name: str, train_batches: int, val_batches: int, rounds: int, against: str = "loop"
) -> dict[str, Any]:
    """``runner`` and ``against`` alternating in this one process (one thread), one epoch each time.

    Sharper than separate processes for small differences: both see the same machine state within
    seconds. Returns the medians of the paired per-batch time differences (validation batches count;
    ``val_batches=0`` trains only, so that a batch is a training step), in wall time and in this
    process's CPU time, which a neighbour taking the core away hardly moves; and the difference of the
    two runners' fastest epochs (``min_diff``: a neighbour only ever adds time, so on a loaded machine
    the least disturbed epochs are the steadier estimate).
    """
    import torch
    from workloads import WORKLOADS, make_tensors

    torch.set_num_threads(1)
    workload = WORKLOADS[workload_name].scaled(train_batches, val_batches)
    tensors = make_tensors(workload)
    times: dict[str, list[tuple[float, float]]] = {against: [], runner: []}
    for index in range(rounds + 2):  # the first two of each are warm-up
        order = [against, runner] if index % 2 else [runner, against]
        for name in order:
            torch.manual_seed(0)
            times[name].append(RUNNERS[name](workload, tensors, 1))
    batches = train_batches + val_batches
    result: dict[str, Any] = {
        "runner": runner,
        "against": against,
        "workload": workload_name,
        "rounds": rounds,
        "batches": batches,
        "train_batches": train_batches,
        "val_batches": val_batches,
    }
    for clock, index in (("", 0), ("cpu_", 1)):  # wall time, then CPU time
        reference = [t[index] for t in times[against][2:]]
        measured = [t[index] for t in times[runner][2:]]
        diffs = sorted((m - r) / batches * 1e6 for r, m in zip(reference, measured))
        result |= {
            f"{clock}median_diff_us_per_batch": statistics.median(diffs),
            f"{clock}iqr_us_per_batch": [diffs[len(diffs) // 4], diffs[-(len(diffs) // 4) - 1]],
            f"{clock}min_diff_us_per_batch": (min(measured) - min(reference)) / batches * 1e6,
            f"{clock}ratio_of_medians": statistics.median(reference) / statistics.median(measured),
            f"{clock}reference_ms_per_batch": statistics.median(reference) / batches * 1e3,
            f"{clock}reference_min_ms_per_batch": min(reference) / batches * 1e3,
        }
    return result


def paired_line(result: dict[str, Any]) -> str:
    """One line per clock: the median difference, its IQR, the reference's time per batch, the share."""
    runner, against = result["runner"], result["against"]
    unit = "training batch" if result["val_batches"] == 0 else "batch (validation batches count)"
    parts = []
    for clock, name in (("", "wall"), ("cpu_", "CPU")):
        diff, (low, high) = result[f"{clock}median_diff_us_per_batch"], result[f"{clock}iqr_us_per_batch"]
        reference, fastest = result[f"{clock}reference_ms_per_batch"], result[f"{clock}min_diff_us_per_batch"]
        least = result[f"{clock}reference_min_ms_per_batch"]
        parts.append(
            f"  {name:4s}: {diff:+.2f} us (IQR {low:+.2f} .. {high:+.2f}), {diff / (reference * 10):+.2f}% of "
            f"{against}'s {reference:.3f} ms; fastest epochs {fastest:+.2f} us, {fastest / (least * 10):+.2f}% "
            f"of {least:.3f} ms"
        )
    return (
        f"{result['workload']}: {runner} - {against} per {unit}, median of {result['rounds']} pairs of "
        f"{result['batches']} batches\n" + "\n".join(parts)
    )


def per_batch_cost(
    runner: str, against: str, workload_name: str, rounds: int, small: int = 100, large: int = 1100
) -> dict[str, Any]:
    """What ``runner`` (a fitkit runner) adds to each training batch over ``against``, and once per fit.

    Per batch, the loop's own Python alone: fits whose ``train_step`` does nothing, on batches of one sample,
    where that Python is the whole batch, so a loaded machine's noise (a share of the batch time) is small
    beside it; each runner's fastest of ``rounds`` fits of ``small`` and of ``large`` batches, and the slope
    between them, so that what a fit pays once cancels. That is set over ``against``'s real training step
    (its fastest fit of ``large`` batches, per batch). Once per fit: the difference of the fastest real fits
    of ``small`` batches, less ``small`` times the per-batch difference (for ``fitkit_mon``: the FLOP-counted
    first step). All in CPU time (one thread): a neighbour taking the core away hardly moves it.
    """
    import torch
    from workloads import WORKLOADS, make_tensors

    torch.set_num_threads(1)
    workload = WORKLOADS[workload_name]
    sizes = {(n, null): workload.scaled(n, 0) for n in (small, large) for null in (True, False)}
    for n in (small, large):  # one sample a batch where the step does nothing: less time cutting batches
        sizes[n, True] = dataclasses.replace(sizes[n, True], batch_size=1)
    tensors = {key: make_tensors(scaled) for key, scaled in sizes.items()}
    best: dict[tuple[str, int, bool], float] = {}

    def fit(name: str, n: int, null_step: bool) -> None:
        torch.manual_seed(0)
        seconds = RUNNERS[name](sizes[n, null_step], tensors[n, null_step], 1, null_step=null_step)[1]  # CPU
        best[name, n, null_step] = min(best.get((name, n, null_step), float("inf")), seconds)

    for index in range(rounds):
        for name in [runner, against] if index % 2 else [against, runner]:
            fit(name, small, True)
            fit(name, large, True)
            fit(name, small, False)
        fit(against, large, False)
    slopes = {name: (best[name, large, True] - best[name, small, True]) / (large - small) for name in (runner, against)}
    per_batch = slopes[runner] - slopes[against]
    step = best[against, large, False] / large
    once = best[runner, small, False] - best[against, small, False] - small * per_batch
    return {
        "runner": runner,
        "against": against,
        "workload": workload_name,
        "rounds": rounds,
        "batches": [small, large],
        "null_step_us_per_batch": {name: slope * 1e6 for name, slope in slopes.items()},
        "per_batch_us": per_batch * 1e6,
        "reference_step_ms": step * 1e3,
        "per_batch_share_of_step": per_batch / step,
        "once_per_fit_ms": once * 1e3,
    }


def per_batch_line(result: dict[str, Any]) -> str:
    runner, against = result["runner"], result["against"]
    small, large = result["batches"]
    slopes = result["null_step_us_per_batch"]
    return (
        f"{result['workload']}: {runner} - {against}, per training batch: {result['per_batch_us']:+.2f} us, "
        f"{result['per_batch_share_of_step']:+.2%} of {against}'s {result['reference_step_ms']:.3f} ms training "
        f"step\n  (a step that does nothing: {slopes[runner]:.2f} against {slopes[against]:.2f} us per batch, "
        f"slopes of the fastest of {result['rounds']} fits of {small} and {large} batches)\n"
        f"  once per fit, with the real step: {result['once_per_fit_ms']:+.2f} ms"
    )


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _measure(runner: str, workload: str, args: argparse.Namespace, opcodes: bool = False) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        runner,
        "--workload",
        workload,
        "--epochs",
        str(args.epochs),
        "--train-batches",
        str(args.train_batches[workload]),
        "--val-batches",
        str(args.val_batches[workload]),
        "--repeats",
        str(args.repeats),
    ]
    cmd += ["--count-opcodes"] if opcodes else []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", KERAS_BACKEND="torch")
    # stdout and stderr are pipes: progress bars see no terminal, as under a job scheduler.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{runner} on {workload} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def summarize(
    samples: dict[tuple[str, str], list[dict[str, Any]]], workloads: list[str], runners: list[str], missing: list[str]
) -> tuple[list[dict[str, Any]], str]:
    rows, lines = [], []
    lines.append(
        "| workload | runner | steps/s (median) | min - max | ratio to `loop` | per-round ratios min - max | target |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---|")
    for workload in workloads:
        reference = [s["steps_per_s"] for s in samples.get((workload, "loop"), [])]
        for runner in runners + missing:
            if runner in missing:
                lines.append(f"| {workload} | {runner} | not installed | | | | |")
                rows.append({"workload": workload, "runner": runner, "installed": False})
                continue
            values = [s["steps_per_s"] for s in samples[(workload, runner)]]
            med = statistics.median(values)
            # Paired within a round: both ran minutes apart at most, under the same neighbours.
            ratios = [v / r for v, r in zip(values, reference)]
            ratio = statistics.median(ratios)
            target = TARGETS.get((workload, runner))
            verdict = "" if target is None else f">= {target}: {'met' if ratio >= target else 'MISSED'}"
            lines.append(
                f"| {workload} | {runner} | {_fmt(med)} | {_fmt(min(values))} - {_fmt(max(values))} | "
                f"{ratio:.3f} | {min(ratios):.3f} - {max(ratios):.3f} | {verdict} |"
            )
            rows.append(
                {
                    "workload": workload,
                    "runner": runner,
                    "installed": True,
                    "description": DESCRIPTIONS[runner],
                    "steps_per_s": values,
                    "median": med,
                    "ratio_to_loop": ratio,
                    "ratios": ratios,
                    "target": target,
                    "target_met": None if target is None else ratio >= target,
                }
            )
    return rows, "\n".join(lines)


_IMPORT_PROBE = (
    "import time; start = time.perf_counter(); import torch; middle = time.perf_counter(); "
    "import fitkit; print(middle - start, time.perf_counter() - middle)"
)


def import_cost(runs: int = 5) -> dict[str, Any]:
    """Seconds ``import torch`` and then ``import fitkit`` take in a fresh process (least of ``runs``), as a
    user's installed package imports: from cached bytecode (written to a temporary ``PYTHONPYCACHEPREFIX``
    by a first run that is not counted, even where ``PYTHONDONTWRITEBYTECODE`` is set). ``fitkit_cold_s``:
    the same import compiling every module from source (no bytecode cache), the first import after an
    editable install or a change."""

    def probe(env: dict[str, str]) -> tuple[float, float]:
        out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True, env=env)
        first, second = out.stdout.split()
        return float(first), float(second)

    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    with tempfile.TemporaryDirectory() as cache:
        cached = {**base, "PYTHONPYCACHEPREFIX": cache}
        probe(cached)  # writes the bytecode
        warm = [probe(cached) for _ in range(runs)]
    with tempfile.TemporaryDirectory() as empty:
        cold = [probe({**base, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}) for _ in range(runs)]
    return {
        "torch_s": min(t for t, _ in warm),
        "fitkit_over_torch_s": min(f for _, f in warm),
        "fitkit_cold_s": min(f for _, f in cold),
        "runs": runs,
    }


def opcode_table(results: list[dict[str, Any]]) -> str:
    lines = ["| workload | runner | Python bytecodes per training batch | more than `loop` |", "|---|---|---:|---:|"]
    reference = {r["workload"]: r["opcodes_per_batch"] for r in results if r["runner"] == "loop"}
    for r in results:
        extra = r["opcodes_per_batch"] - reference[r["workload"]] if r["workload"] in reference else float("nan")
        lines.append(f"| {r['workload']} | {r['runner']} | {r['opcodes_per_batch']:,.0f} | {extra:+,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="mlp,cnn", help="comma-separated: mlp, cnn (default both)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per process, the fastest counts (default 2)")
    parser.add_argument(
        "--train-batches", type=int, default=None, help="training batches per epoch (default: 1000 for mlp, 40 for cnn)"
    )
    parser.add_argument(
        "--val-batches", type=int, default=None, help="validation batches per epoch (default: 200 for mlp, 8 for cnn)"
    )
    parser.add_argument("--runners", default=",".join(BASE_RUNNERS), help="comma-separated runner names")
    parser.add_argument("--peers", action="store_true", help="add Lightning and Keras rows when installed")
    parser.add_argument("--monitor", action="store_true", help="add fitkit_mon: fitkit_v0 with a ThroughputMonitor")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "overhead.json", help="output JSON path")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    parser.add_argument(
        "--opcodes",
        action="store_true",
        help="also count the Python bytecodes each loop runs per training batch (deterministic)",
    )
    parser.add_argument("--count-opcodes", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--paired",
        metavar="RUNNER",
        help="instead: alternate RUNNER and --against in one process (--rounds pairs of one epoch, "
        "500 + 100 batches unless --train-batches/--val-batches; --val-batches 0 trains only) and print "
        "the median per-batch difference, in wall and in CPU time",
    )
    parser.add_argument("--against", default="loop", help="the reference of --paired (default loop)")
    parser.add_argument(
        "--per-batch",
        action="store_true",
        help="with --paired (fitkit runners): what RUNNER adds per training batch, measured on fits whose "
        "train_step does nothing (the slope of the fastest of --rounds fits of 100 and 1100 batches), over "
        "--against's real training step; and what it adds once per fit",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child(args)
        return 0
    if args.paired:
        if args.paired not in RUNNERS or args.against not in RUNNERS:
            parser.error(f"unknown runner in --paired/--against; choose from {sorted(RUNNERS)}")
        for workload in args.workloads.split(","):
            if args.per_batch:
                if not (args.paired.startswith("fitkit") and args.against.startswith("fitkit")):
                    parser.error("--per-batch compares fitkit runners (their train_step is replaced)")
                print(per_batch_line(per_batch_cost(args.paired, args.against, workload, max(args.rounds, 4))))
                continue
            result = paired(
                args.paired,
                workload,
                args.train_batches or 500,
                100 if args.val_batches is None else args.val_batches,
                max(args.rounds, 4),
                args.against,
            )
            print(paired_line(result), flush=True)
        return 0

    from workloads import WORKLOADS, machine_info

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {sorted(WORKLOADS)}")
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    if args.peers:
        runners += [r for r in PEER_RUNNERS if r not in runners]
    if args.monitor and "fitkit_mon" not in runners:
        runners.append("fitkit_mon")
    unknown = [r for r in runners if r not in RUNNERS]
    if unknown:
        parser.error(f"unknown runner(s) {unknown}; choose from {sorted(RUNNERS)}")
    if "loop" not in runners:
        runners.insert(0, "loop")  # the reference every ratio needs
    missing = [r for r in runners if r in PEER_PACKAGES and not _installed(PEER_PACKAGES[r])]
    runners = [r for r in runners if r not in missing]
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.rounds < 0 or (args.rounds == 0 and not args.opcodes):
        parser.error("--rounds must be >= 1 (or 0 with --opcodes, to count bytecodes only)")
    args.train_batches = {w: args.train_batches or WORKLOADS[w].train_batches for w in workloads}
    args.val_batches = {
        w: args.val_batches if args.val_batches is not None else WORKLOADS[w].val_batches for w in workloads
    }

    info = machine_info()
    print(
        f"# {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, load {info.get('loadavg_1min')}",
        file=sys.stderr,
    )
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    started = time.time()
    for round_idx in range(args.rounds):
        for workload in workloads:
            # Rotate the order every round so that no runner always follows the same one.
            shift = round_idx % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                result = _measure(runner, workload, args)
                samples.setdefault((workload, runner), []).append(result)
                print(
                    f"round {round_idx + 1}/{args.rounds} {workload:4s} {runner:14s} "
                    f"{result['steps_per_s']:9.1f} steps/s",
                    file=sys.stderr,
                    flush=True,
                )
    rows, table = summarize(samples, workloads, runners, missing) if args.rounds else ([], "")
    imports = import_cost()
    table += ("\n\n" if table else "") + (
        f"`import fitkit` after `import torch`: {imports['fitkit_over_torch_s'] * 1e3:.0f} ms from cached bytecode "
        f"(target <= 100 ms; `import torch`: {imports['torch_s']:.2f} s; least of {imports['runs']} runs), "
        f"{imports['fitkit_cold_s'] * 1e3:.0f} ms compiling from source (no bytecode cache)"
    )
    opcodes: list[dict[str, Any]] = []
    if args.opcodes:
        for workload in workloads:
            for runner in runners:
                opcodes.append(_measure(runner, workload, args, opcodes=True))
                print(
                    f"opcodes {workload:4s} {runner:14s} {opcodes[-1]['opcodes_per_batch']:9.1f} per batch",
                    file=sys.stderr,
                    flush=True,
                )
        table += ("\n\n" if table else "") + opcode_table(opcodes)
    info["loadavg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = {
        "benchmark": "overhead",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": info,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "epochs": args.epochs,
        "train_batches": args.train_batches,
        "val_batches": args.val_batches,
        "wall_s": time.time() - started,
        "rows": rows,
        "opcodes": opcodes,
        "import": imports,
        "markdown": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"\nwrote {args.json} ({report['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
