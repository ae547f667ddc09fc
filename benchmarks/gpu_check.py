"""One short run that a lent GPU does end to end (under 5 minutes), printing one summary.

Parts, each in its own process (a crash in one does not hide the others):

1. the CUDA tests (``pytest -m cuda``): sync-free data paths, pinned loaders, fp16 with a fused optimizer and a
   per-step scheduler, weights-only files with CPU tensors, the CUDA generator's exact resume, a sharded (DCP)
   checkpoint of CUDA tensors resuming bit for bit;
2. ``debug_sync="error"`` fits with every built-in callback in its per-batch mode (the list
   ``tests/test_sync_debug.py`` uses), gradient clipping, a pinned DataLoader with workers;
3. fp16 and bf16 with clipping, gradient accumulation and a per-step LR scheduler, under ``debug_sync="error"``;
4. ``compile=True`` (fp32 and bf16), under ``debug_sync="error"`` after the warm-up epoch;
5. FSDP2 on the one GPU: a one-rank nccl group, fitkit's per-block ``shard_blocks`` with bf16
   ``MixedPrecisionPolicy``, a few steps, then a DCP save and load of the sharded state (``Trainer`` itself
   trains one process unsharded: FSDP across ranks needs several GPUs);
6. the performance tools (issue 21): ``ThroughputMonitor`` (MFU from the peak table, the time breakdown, peak
   memory) under ``debug_sync="error"``, ``Profiler`` (a trace with CUDA kernels), ``find_batch_size`` catching a
   real OOM under a memory fraction (the trainer left bit-identical), activation checkpointing (bit-identical
   with dropout, less peak memory);
7. the throughput rows (``benchmarks/throughput.py``: CPU and GPU, mlp and cnn, each setting, the pinned
   DataLoader row, TF32 stated, ``cudnn.benchmark`` on).

Usage::

    python benchmarks/gpu_check.py              # on a CUDA machine; exit status 1 if a part failed
    python benchmarks/gpu_check.py --dry-run    # anywhere: the same parts on the CPU where they can run
                                                # (tiny sizes; CUDA tests only collected, compile skipped)

Writes ``benchmarks/results/gpu_check.json`` (``--out``): each part's status, seconds and output tail.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Each script takes the device ("cuda" or "cpu") as its first argument and prints one summary line last.
CALLBACKS = """
import sys, tempfile
from pathlib import Path
import torch, fitkit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, "tests")
from test_sync_debug import _every_builtin_callback  # the list the CPU test checks, one source of truth

device = sys.argv[1]
fitkit.seed_everything(0)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(512, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))
trainer = fitkit.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "cross_entropy",
                         metrics=["accuracy"], device=device, grad_clip_norm=1.0, verbose=0,
                         debug_sync="error" if device == "cuda" else False)
callbacks = _every_builtin_callback(Path(tempfile.mkdtemp()), trainer.optimizer)
trainer.callbacks.extend(callbacks)
pin = device == "cuda"
train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, num_workers=2, pin_memory=pin,
                   persistent_workers=True)
val = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=64, num_workers=2, pin_memory=pin)
history = trainer.fit(train, val, epochs=2)
print(f"{len(callbacks)} built-in callbacks, debug_sync={trainer.debug_sync!r}: loss {history.history['loss']}")
"""

PRECISION = """
import sys, math
import torch, fitkit
from torch import nn
from fitkit.callbacks import LRScheduler

device = sys.argv[1]
lines = []
for precision in (["fp16", "bf16"] if device == "cuda" else ["bf16"]):
    fitkit.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 64, generator=g), torch.randint(0, 10, (1024,), generator=g)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = LRScheduler(torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.9), interval="step")
    trainer = fitkit.Trainer(model, optimizer, "cross_entropy", device=device, precision=precision,
                             grad_clip_norm=1.0, accumulate_grad_batches=2, callbacks=[scheduler], verbose=0,
                             debug_sync="error" if device == "cuda" else False)
    loss = trainer.fit((x, y), batch_size=64, epochs=2).history["loss"]
    assert all(math.isfinite(v) for v in loss) and loss[-1] < loss[0], (precision, loss)
    lines.append(f"{precision}: loss {loss[0]:.3f} -> {loss[-1]:.3f}, {trainer.global_step} steps")
print("; ".join(lines) + " (clipping, accumulation 2, per-step StepLR)")
"""

COMPILE = """
import sys, math, time
import torch, fitkit
from torch import nn

device = sys.argv[1]
lines = []
for precision in ["32", "bf16"]:
    fitkit.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, 3, 16, 16, generator=g), torch.randint(0, 10, (2048,), generator=g)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    trainer = fitkit.Trainer(model, "adamw", "cross_entropy", device=device, precision=precision, compile=True,
                             channels_last=True, verbose=0)
    start = time.perf_counter()
    trainer.fit((x, y), batch_size=128, epochs=1)  # compiles
    first = time.perf_counter() - start
    trainer.debug_sync = "error" if device == "cuda" else False  # compiled steps: no unmarked sync either
    start = time.perf_counter()
    loss = trainer.fit((x, y), batch_size=128, epochs=2, initial_epoch=1).history["loss"]
    assert all(math.isfinite(v) for v in loss), loss
    lines.append(f"{precision}: compile epoch {first:.1f} s, next epoch {time.perf_counter() - start:.2f} s")
print("; ".join(lines))
"""

FSDP = """
import os, sys, tempfile, warnings
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from fitkit import strategies
from fitkit.strategies import FSDPStrategy

device = sys.argv[1]
if device == "cuda":
    torch.cuda.set_device(0)
dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1,
                        init_method=f"tcp://127.0.0.1:{sys.argv[2]}")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), *[nn.Sequential(nn.Linear(128, 128), nn.GELU()) for _ in range(4)],
                      nn.Linear(128, 10)).to(device)
precision = "bf16" if device == "cuda" else "32"
blocks = strategies.shard_blocks(model, FSDPStrategy(), precision)
assert all(isinstance(b, FSDPModule) for b in blocks) and isinstance(model, FSDPModule), blocks
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(256, 64, device=device), torch.randint(0, 10, (256,), device=device)
for _ in range(5):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
folder = tempfile.mkdtemp()
state = get_model_state_dict(model)
dcp.save(state, checkpoint_id=folder)
before = {k: v.full_tensor().clone() for k, v in state.items()}
with torch.no_grad():
    for p in model.parameters():
        p.zero_()
state = get_model_state_dict(model)
dcp.load(state, checkpoint_id=folder)
set_model_state_dict(model, state)
after = get_model_state_dict(model)
assert all(torch.equal(after[k].full_tensor(), v) for k, v in before.items())
print(f"{len(blocks)} blocks + root sharded (FSDP2, {precision}), loss {loss.item():.3f}, DCP save/load equal")
dist.destroy_process_group()
"""


PERF_TOOLS = """
import copy, glob, json, sys, tempfile
import torch, fitkit
from torch import nn
from fitkit.callbacks import Profiler, ThroughputMonitor

device = sys.argv[1]
cuda = device == "cuda"


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(width, 4 * width), nn.Linear(4 * width, width), nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def build(width=1024 if cuda else 64, depth=8, **kwargs):
    fitkit.seed_everything(0)
    blocks = nn.Sequential(*[Block(width) for _ in range(depth)])  # the blocks find_blocks picks
    model = nn.Sequential(nn.Linear(64, width), blocks, nn.Linear(width, 10))
    return fitkit.Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-4), "cross_entropy", device=device,
                          precision="bf16" if cuda else "32", verbose=0, **kwargs)


g = torch.Generator().manual_seed(0)
x, y = torch.randn(8192 if cuda else 512, 64, generator=g), torch.randint(0, 10, (8192 if cuda else 512,), generator=g)
out = []

# ThroughputMonitor: MFU, the breakdown, peak memory; no unmarked sync in the batch loop.
folder = tempfile.mkdtemp()
monitor = ThroughputMonitor(log_every_n_steps=10)
trainer = build(callbacks=[monitor, Profiler(folder, wait=2, warmup=1, active=2)],
                debug_sync="error" if cuda else False)
logs = trainer.fit((x, y), (x[:1024], y[:1024]), batch_size=256, epochs=2).history
parts = ["time_data", "time_step", "time_callbacks", "time_validation"]
assert all(k in logs for k in parts + ["samples_per_sec", "flops_per_sec", "host_rss_mb"]), sorted(logs)
if cuda:
    assert 0 < logs["mfu"][-1] < 1 and logs["peak_memory_mb"][-1] > 0, logs
out.append(f"{logs['samples_per_sec'][-1]:,.0f} samples/s, {logs['flops_per_sec'][-1] / 1e12:.2f} TFLOP/s, MFU "
           f"{logs.get('mfu', [float('nan')])[-1]:.1%}, peak {logs.get('peak_memory_mb', [0])[-1]:.0f} MiB, "
           + ", ".join(f"{k[5:]} {logs[k][-1]:.3f}s" for k in parts) + f"; step: {monitor.step_logs}")

# Profiler: one trace of the scheduled steps, with GPU kernels on CUDA.
traces = glob.glob(f"{folder}/*.pt.trace.json")
events = json.load(open(traces[0]))["traceEvents"]
kernels = sum(1 for e in events if e.get("cat") == "kernel")
assert len(traces) == 1 and (kernels > 0 or not cuda), (traces, kernels)
out.append(f"profiler: 1 trace, {kernels} kernel events")

# find_batch_size: a real OOM caught (CUDA, under a memory fraction), the trainer left bit-identical.
trainer = build(width=2048 if cuda else 64)
trainer.fit((x[:512], y[:512]), batch_size=64, epochs=1)
before = copy.deepcopy(trainer.state_dict())
if cuda:
    torch.cuda.set_per_process_memory_fraction(0.05)
result = trainer.find_batch_size((x, y), mode="binsearch", max_batch_size=8192,
                                 max_memory_mb=None if cuda else 6.0)
if cuda:
    torch.cuda.set_per_process_memory_fraction(1.0)
after = trainer.state_dict()
assert all(torch.equal(a, b) for a, b in zip(after["model"].values(), before["model"].values()))
assert after["rng"].keys() == before["rng"].keys() and after["trainer"] == before["trainer"]
errors = [t.error for t in result.trials if t.error]
assert result.batch_size and (not cuda or "out of memory" in errors), result
out.append(f"find_batch_size: {result.batch_size} after {[t.batch_size for t in result.trials]} ({errors[:1]})")

# Activation checkpointing: the same losses (dropout included), less peak memory.
peaks, losses = [], []
for checkpointing in (False, True):
    trainer = build(activation_checkpointing=checkpointing)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses.append(trainer.fit((x, y), batch_size=512, epochs=1).history["loss"])
    peaks.append(torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0)
    del trainer
assert losses[0] == losses[1], losses
assert peaks[1] < peaks[0] or not cuda, peaks
out.append(f"activation checkpointing: losses equal, peak {peaks[0]:.0f} -> {peaks[1]:.0f} MiB")
print("; ".join(out))
"""


def _run(name: str, command: list[str], timeout: float, results: list[dict[str, Any]]) -> None:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        ok, output = done.returncode == 0, (done.stdout + done.stderr).strip()
        summary = done.stdout if ok and done.stdout.strip() else output  # the part's own last line
    except subprocess.TimeoutExpired as exc:
        ok, output = False, f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout:.0f} s"
        summary = output
    lines = [line for line in output.splitlines() if line.strip()]
    last = next((line for line in reversed(summary.splitlines()) if line.strip()), "no output")
    seconds = time.perf_counter() - start
    print(f"{'ok  ' if ok else 'FAIL'} {name} ({seconds:.0f} s): {last[:300]}", flush=True)
    results.append({"part": name, "ok": ok, "seconds": round(seconds, 1), "tail": lines[-40:]})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run the parts on the CPU (no GPU needed)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    where = "dry run on the CPU" if args.dry_run else torch.cuda.get_device_name()
    print(f"gpu_check: {where}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    python = sys.executable
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    _run("CUDA tests" + (" (collected only)" if args.dry_run else ""), pytest + (["--collect-only"] * args.dry_run),
         timeout=150, results=results)  # fmt: skip
    _run("debug_sync='error' with every built-in callback", [python, "-c", CALLBACKS, device], 90, results)
    _run("fp16/bf16 + clipping + accumulation", [python, "-c", PRECISION, device], 60, results)
    if args.dry_run:
        print("skip compile (--dry-run: compiling on the CPU takes minutes)", flush=True)
    else:
        _run("compile (fp32, bf16)", [python, "-c", COMPILE, device], 150, results)
    _run("FSDP2 on one device + DCP", [python, "-c", FSDP, device, str(_free_port())], 60, results)
    _run("ThroughputMonitor, Profiler, find_batch_size, checkpointing", [python, "-c", PERF_TOOLS, device], 150,
         results)  # fmt: skip
    throughput = [python, "benchmarks/throughput.py", "--out", str(args.out.parent / "gpu_check_throughput")]
    if args.dry_run:
        throughput += ["--devices", "cpu", "--models", "mlp", "--no-compile", "--seconds", "0.2", "--repeats", "1"]
    else:
        throughput += [
            "--devices",
            "cpu,cuda",
            "--models",
            "mlp,cnn",
            "--no-compile",
            "--seconds",
            "1",
            "--repeats",
            "2",
        ]
    _run("throughput rows", throughput, 180, results)
    failed = [r["part"] for r in results if not r["ok"]]
    total = time.perf_counter() - started
    print(f"\ngpu_check ({where}): {len(results) - len(failed)}/{len(results)} parts passed in {total:.0f} s")
    print("| part | result | seconds |\n|---|---|---:|")
    for r in results:
        print(f"| {r['part']} | {'ok' if r['ok'] else 'FAILED'} | {r['seconds']:.0f} |")
    table = args.out.parent / "gpu_check_throughput" / "throughput.md"
    if table.exists():
        print("\n" + table.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"device": where, "dry_run": args.dry_run, "seconds": total, "parts": results}, indent=1) + "\n"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    sys.exit(main())
