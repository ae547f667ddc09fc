"""Scaling out: training samples per second of the same job with 1 and 2 processes (and one per GPU).

The job is the overhead benchmark's workloads (``workloads.py``): the MLP (32-64-10, batch 64: a step of
well under a millisecond, so communication shows) and the small CNN (3x32x32, batch 128: compute
dominates). Each run is the unchanged script launched by torchrun
(``python -m torch.distributed.run --standalone --nproc_per_node=N``): ``Trainer(strategy="auto")``
trains in one process for N=1 and with DDP for N>1, on a ``DataLoader(shuffle=True)`` that fitkit gives a
DistributedSampler. The batch size is per process, so N processes take N times fewer steps per epoch
over the same data (an effective batch N times larger); samples/s counts every rank's samples.

On the CPU each process uses one thread (gloo), so 2 processes use 2 cores against 1: the ideal
speed-up is 2.0. On CUDA (nccl) there is one process per GPU: 1, then every GPU when there are several.
Each rank also times the per-step stop vote (a one-number gloo all-reduce on fitkit's control group,
which lets one rank's ``stop_training`` stop all), both ways: synchronous (``distributed.any_rank``, what
fitkit did before: the whole round trip after every batch) and as the loop runs it now
(``distributed.StopVote``: started after a batch, read once the next batch has been fetched from the
training DataLoader), counting only the time the loop waits in ``start`` and ``stop_now``. Both are
reported against the step time. The loop votes only when something can stop training mid-epoch: the plain
job has no such hook and no per-batch collective at all; a second N-process row ("+ batch hook") adds a
callback whose ``on_batch_end`` may stop, so that the ranks vote after every batch, and shows what it costs.

On CUDA the DataLoaders are what a GPU job should use: ``--workers`` worker processes (default 2) with
``pin_memory=True`` and persistent workers, so the host-to-device copies are asynchronous.

A control row (CPU) runs N independent one-process jobs at once, without any communication: the most
this machine gives N busy processes (on a shared or small machine, less than N times one). "of the
control" is the N-process job's throughput against it, which separates what synchronous training costs
(all-reduces, and every step waiting for the slowest rank) from what the machine cannot give.

Runs alternate between configurations in ``--rounds`` rounds, so a noisy neighbour slows each alike; the
median is reported. A short warm-up ``fit`` in the same processes comes first and is not timed.

Usage::

    python benchmarks/scaling.py                       # CPU: mlp and cnn, 1 and 2 processes (~2 min)
    python benchmarks/scaling.py --device cuda         # one process per GPU (nccl)
    python benchmarks/scaling.py --workloads cnn --rounds 5 --epochs 3

Writes ``benchmarks/results/scaling.json`` (``--json`` to change) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# -- the worker: what each torchrun process runs ---------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)
    from torch.utils.data import DataLoader, TensorDataset
    from workloads import WORKLOADS, build_model, make_tensors

    import fitkit
    from fitkit import distributed

    workload = WORKLOADS[args.workload]
    x, y, _, _ = make_tensors(workload)
    workers = args.workers if args.workers is not None else (2 if args.device == "cuda" else 0)
    feeding: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0}
    if args.device == "cuda":
        feeding["pin_memory"] = True  # non-blocking host-to-device copies

    class BatchHook(fitkit.Callback):  # a batch-level hook that might stop training: the ranks vote per batch
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            pass

    fitkit.seed_everything(0)
    model = build_model(args.workload)
    trainer = fitkit.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        "cross_entropy",
        device=args.device,
        verbose=0,
        callbacks=[BatchHook()] if args.batch_hook else [],
    )
    warmup = DataLoader(
        TensorDataset(x[: workload.batch_size * 20], y[: workload.batch_size * 20]),
        batch_size=workload.batch_size,
        shuffle=True,
        **feeding,
    )
    trainer.fit(warmup, epochs=1)  # DDP's first buckets, allocator, kernels: not timed
    train = DataLoader(TensorDataset(x, y), batch_size=workload.batch_size, shuffle=True, **feeding)
    steps_before = trainer.global_step
    distributed.barrier(trainer.dist)  # start together
    start = time.perf_counter()
    trainer.fit(train, epochs=args.epochs)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    steps = trainer.global_step - steps_before
    calls = 2000
    distributed.barrier(trainer.dist)
    flag_start = time.perf_counter()
    for _ in range(calls):
        distributed.any_rank(False, trainer.dist)
    flag_us = (time.perf_counter() - flag_start) / calls * 1e6 if trainer.world_size > 1 else 0.0
    vote_us = _async_vote_us(trainer, calls) if trainer.world_size > 1 else 0.0
    share = len(trainer.train_loader.sampler) * args.epochs  # this rank's samples (its DistributedSampler's)
    result = {
        "rank": trainer.dist.rank,
        "world_size": trainer.world_size,
        "seconds": seconds,
        "steps": steps,
        "samples": share,
        "stop_flag_us": flag_us,
        "stop_vote_us": vote_us,
        "voted_per_batch": trainer._run.stop_vote,
        "strategy": type(trainer._modules.train).__name__,
    }
    Path(args.out, f"rank{trainer.dist.rank}.json").write_text(json.dumps(result))


def _async_vote_us(trainer: Any, calls: int) -> float:
    """Microseconds per batch that the training loop waits on the asynchronous stop vote: in ``start``
    after a batch and in ``stop_now`` once the next batch has been fetched (the fetch overlaps the
    all-reduce, as in ``Trainer._run_epoch``)."""
    from fitkit import distributed

    vote = distributed.StopVote(trainer.dist)
    batches = iter(trainer.train_loader)
    waited = 0.0
    distributed.barrier(trainer.dist)
    for _ in range(calls):
        begin = time.perf_counter()
        vote.start(False)
        started = time.perf_counter()
        try:
            next(batches)
        except StopIteration:
            batches = iter(trainer.train_loader)
            next(batches)
        fetched = time.perf_counter()
        vote.stop_now()
        waited += (started - begin) + (time.perf_counter() - fetched)
    return waited / calls * 1e6


# -- the parent: launches torchrun, alternates process counts, reports -------------------------------
def _launch(
    workload: str, nproc: int, device: str, epochs: int, out: str, workers: int | None = None, batch_hook: bool = False
) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1") if device == "cpu" else dict(os.environ)
    command = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(Path(__file__).resolve()),
            "--worker",
            "--workload",
            workload,
            "--device",
            device,
            "--epochs",
            str(epochs),
            "--out",
            out,
        ]
        + (["--workers", str(workers)] if workers is not None else [])
        + (["--batch-hook"] if batch_hook else [])
    )
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_once(
    workload: str,
    nproc: int,
    device: str,
    epochs: int,
    timeout: float,
    independent: int = 1,
    workers: int | None = None,
    batch_hook: bool = False,
) -> dict[str, Any]:
    """One torchrun launch of ``nproc`` processes; or, with ``independent=k``, k single-process launches at
    once (no communication: what the machine gives k processes, the ceiling for a k-process run).
    ``batch_hook``: the job has a callback with an ``on_batch_end`` that may stop training (the ranks vote
    after every batch); without it nothing can stop mid-epoch and the loop has no per-batch collective."""
    with tempfile.TemporaryDirectory() as root:
        outs = [str(Path(root, str(i))) for i in range(independent)]
        for out in outs:
            Path(out).mkdir()
        launches = [_launch(workload, nproc, device, epochs, out, workers, batch_hook) for out in outs]
        for launch in launches:
            _, stderr = launch.communicate(timeout=timeout)
            if launch.returncode != 0:
                raise RuntimeError(f"torchrun with {nproc} process(es) failed ({launch.returncode}):\n{stderr[-3000:]}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for out in outs for r in range(nproc)]
    seconds = max(r["seconds"] for r in ranks)  # the job ends when its slowest rank does
    samples = sum(r["samples"] for r in ranks)
    steps = ranks[0]["steps"]
    return {
        "samples_per_s": samples / seconds,
        "step_ms": seconds / steps * 1e3,
        "seconds": seconds,
        "samples": samples,
        "steps_per_rank": steps,
        "strategy": ranks[0]["strategy"],
        "stop_flag_us": statistics.mean(r["stop_flag_us"] for r in ranks),
        "stop_vote_us": statistics.mean(r.get("stop_vote_us", 0.0) for r in ranks),
        "voted_per_batch": ranks[0]["voted_per_batch"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="mlp,cnn")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--processes",
        default=None,
        help="comma-separated process counts (default: 1,2 on the CPU; 1 and every GPU on CUDA)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per torchrun launch")
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="skip the control runs (N independent 1-process jobs at once, CPU only)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers per process (default: 2 with pin_memory on CUDA, 0 on the CPU)",
    )
    parser.add_argument(
        "--no-vote-row",
        action="store_true",
        help="skip the N-process rows whose job has a batch hook that may stop training (a stop vote per batch)",
    )
    parser.add_argument("--json", default=str(HERE / "results" / "scaling.json"))
    parser.add_argument("--batch-hook", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    import torch
    from workloads import machine_info

    if args.processes:
        counts = [int(n) for n in args.processes.split(",")]
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here; run on the CPU (the default)")
        gpus = torch.cuda.device_count()
        counts = [1] if gpus == 1 else [1, gpus]
    else:
        counts = [1, 2]
    workloads = args.workloads.split(",")
    # (processes, independent launches, batch hook): (n, 1, False) is one n-process job; (n, 1, True) the same
    # job with a batch hook that may stop training (a stop vote per batch); (1, n, False) is n one-process jobs.
    configs = [(n, 1, False) for n in counts]
    if not args.no_vote_row:
        configs += [(n, 1, True) for n in counts if n > 1]
    if args.device == "cpu" and not args.no_control:
        configs += [(1, n, False) for n in counts if n > 1]
    samples: dict[tuple[str, int, int, bool], list[dict[str, Any]]] = {
        (w, n, k, v): [] for w in workloads for n, k, v in configs
    }
    failures: list[str] = []
    for round_index in range(args.rounds):
        for workload in workloads:
            for n, k, v in configs:  # alternate, so that a busy neighbour slows every configuration alike
                try:
                    result = run_once(
                        workload, n, args.device, args.epochs, args.timeout, k, args.workers, batch_hook=v
                    )
                except RuntimeError as exc:  # reported, and counted in the JSON; one retry
                    print(f"launch failed, retrying once: {exc}", file=sys.stderr, flush=True)
                    failures.append(str(exc)[-3000:])
                    result = run_once(
                        workload, n, args.device, args.epochs, args.timeout, k, args.workers, batch_hook=v
                    )
                samples[(workload, n, k, v)].append(result)
                label = (f"x{n}" if k == 1 else f"{k} independent x1") + (" + batch hook" if v else "")
                print(
                    f"round {round_index + 1}/{args.rounds} {workload} {label}: {result['samples_per_s']:,.0f} "
                    f"samples/s ({result['step_ms']:.2f} ms/step)",
                    file=sys.stderr,
                    flush=True,
                )

    from workloads import WORKLOADS

    rows = []
    for workload in workloads:
        base = statistics.median(r["samples_per_s"] for r in samples[(workload, counts[0], 1, False)]) / counts[0]
        for n, k, v in configs:
            runs = samples[(workload, n, k, v)]
            rate = statistics.median(r["samples_per_s"] for r in runs)
            step_ms = statistics.median(r["step_ms"] for r in runs)
            flag_us = statistics.median(r["stop_flag_us"] for r in runs)
            vote_us = statistics.median(r["stop_vote_us"] for r in runs)
            ceiling = samples.get((workload, 1, n, False)) if k == 1 and n > 1 else None
            rows.append(
                {
                    "workload": workload,
                    "device": args.device,
                    "processes": n * k,
                    "run": (f"{n}-process job" if k == 1 else f"{k} independent 1-process jobs (control)")
                    + (" + batch hook" if v else ""),
                    "voted_per_batch": runs[0]["voted_per_batch"],
                    "batch_per_process": WORKLOADS[workload].batch_size,
                    "effective_batch": WORKLOADS[workload].batch_size * n,
                    "strategy": runs[0]["strategy"],
                    "samples_per_s": rate,
                    "samples_per_s_runs": [r["samples_per_s"] for r in runs],
                    "speedup": rate / base,
                    "efficiency": rate / (base * n * k),
                    "step_ms": step_ms,
                    "of_control": rate / statistics.median(r["samples_per_s"] for r in ceiling) if ceiling else None,
                    "stop_flag_us": flag_us,
                    "stop_flag_share": flag_us / 1e3 / step_ms if n > 1 else 0.0,
                    "stop_vote_us": vote_us,
                    "stop_vote_share": vote_us / 1e3 / step_ms if n > 1 else 0.0,
                }
            )
    report = {
        "machine": machine_info(),
        "epochs": args.epochs,
        "workers": args.workers if args.workers is not None else (2 if args.device == "cuda" else 0),
        "rounds": args.rounds,
        "rows": rows,
        "failed_launches": failures,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(
        f"\n{report['machine']['cpu']}, {report['machine']['cpu_count']} cores, torch {report['machine']['torch']}, "
        f"load {report['machine'].get('loadavg_1min', float('nan')):.2f}; median of {args.rounds} rounds\n"
    )
    print(
        "| workload | run | batch/process | samples/s | speed-up | of the control | ms/step | votes per batch "
        "| stop vote, synchronous | stop vote, asynchronous (waited) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for row in rows:
        distributed_run = row["processes"] > 1 and "control" not in row["run"]
        flag = f"{row['stop_flag_us']:.0f} µs ({row['stop_flag_share']:.1%})" if distributed_run else "-"
        vote = f"{row['stop_vote_us']:.0f} µs ({row['stop_vote_share']:.1%})" if distributed_run else "-"
        control = f"{row['of_control']:.0%}" if row["of_control"] is not None else "-"
        voted = ("yes" if row["voted_per_batch"] else "no") if distributed_run else "-"
        print(
            f"| {row['workload']} | {row['run']} ({row['device']}) | {row['batch_per_process']} | "
            f"{row['samples_per_s']:,.0f} | {row['speedup']:.2f}x | {control} | {row['step_ms']:.2f} | {voted} "
            f"| {flag} | {vote} |"
        )
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
