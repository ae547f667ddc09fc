"""One short run that a lent GPU does end to end (under 5 minutes): the CUDA tests, then a summary.

It runs every test marked ``cuda`` (the sync-free data paths with ``debug_sync="error"``, fp16/bf16 with
clipping, accumulation and a per-step scheduler, fused optimizers, weights-only files with CPU tensors, the
CUDA generator's exact resume), FSDP on one GPU through a one-rank nccl group, and prints one line per part.

Usage::

    python benchmarks/gpu_check.py            # needs a CUDA device; exit status 1 if a part failed
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, command: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> tuple[str, bool]:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        ok, tail = done.returncode == 0, (done.stdout + done.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        ok, tail = False, ["timed out"]
    print(f"{'ok  ' if ok else 'FAIL'} {name} ({time.perf_counter() - start:.0f} s): {' '.join(tail)}", flush=True)
    return name, ok


FSDP_ONE_GPU = """
import torch, fitkit
from torch import nn
model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)], nn.Linear(64, 10))
trainer = fitkit.Trainer(model, "adamw", "cross_entropy", device="cuda", precision="bf16", verbose=0,
                         strategy="fsdp", debug_sync="error")
x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
history = trainer.fit((x, y), batch_size=64, epochs=2)
print("fsdp world_size", trainer.world_size, "loss", history.history["loss"])
"""


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    python = sys.executable
    results = [
        _run("CUDA tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]),
        _run(
            "FSDP on one GPU (torchrun, 1 process)",
            [python, "-c", FSDP_ONE_GPU],
            env=dict(
                os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531"
            ),
        ),
        # The throughput benchmark's GPU rows (TF32/cudnn.benchmark and a pinned-loader row are still to add).
        _run(
            "throughput rows",
            [python, "benchmarks/throughput.py", "--devices", "cuda", "--models", "mlp,cnn", "--no-compile"],
            timeout=240,
        ),
    ]
    failed = [name for name, ok in results if not ok]
    print(
        f"\ngpu_check: {len(results) - len(failed)}/{len(results)} parts passed"
        + (f"; failed: {failed}" if failed else "")
    )
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
