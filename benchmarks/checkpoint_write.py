"""How long a full, atomic, verified checkpoint of the main example's model takes to write and read.

    python benchmarks/checkpoint_write.py            # 20 saves after one epoch of examples/train_digits.py
    python benchmarks/checkpoint_write.py --stall    # the loop's stall per save, sync vs async_save=True
    torchrun --nproc-per-node=2 benchmarks/checkpoint_write.py --stall --fsdp   # the same, sharded (DCP)

``--stall`` trains a 134 MB model (two 4096x4096 linear layers, SGD) with ``ModelCheckpoint(save_freq=N)`` and
reports how long the loop stops at each save point: the whole write without ``async_save``; only the copy to host
memory (and any wait for the previous save) with it. With ``--fsdp`` (under torchrun), each rank writes its shard
of a DCP directory, and the async stall is DCP's staging of that shard to host memory.

Each save is a temporary file, torch.save through a SHA-256 hashing writer, fsync, a two-phase manifest
update around the rename (three fsyncs in all) and a directory fsync; the load verifies size and SHA-256
before ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from train_digits import build_model, load_digits

import fitkit
from fitkit import checkpoint


def stall(saves: int, every: int, strategy: str = "auto") -> None:
    """The loop's pause at each save point of a fit, sync vs ``async_save=True``."""
    import os
    import shutil

    from torch import nn

    from fitkit.callbacks import ModelCheckpoint

    for async_save in (False, True):
        fitkit.seed_everything(0)
        model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096))
        x, y = torch.randn(64 * every * saves, 4096), torch.randn(64 * every * saves, 4096)
        # One folder for every rank of a torchrun job (the same path on each: named by the job's port).
        folder = Path(tempfile.gettempdir()) / f"fitkit-stall-{os.environ.get('MASTER_PORT', os.getpid())}-{async_save}"
        callback = ModelCheckpoint(
            folder / "step{step:04d}.pt", monitor=None, save_freq=every, save_top_k=1, async_save=async_save
        )
        trainer = fitkit.Trainer(
            model,
            torch.optim.SGD(model.parameters(), lr=1e-4),
            "mse",
            callbacks=[callback],
            device="cpu",
            verbose=0,
            strategy=strategy,
        )
        pauses: list[float] = []
        queue = trainer.after_callbacks

        def timed(action, queue=queue, pauses=pauses):  # type: ignore[no-untyped-def]
            def run() -> None:
                start = time.perf_counter()
                action()
                pauses.append(time.perf_counter() - start)

            queue(run)

        trainer.after_callbacks = timed  # type: ignore[method-assign]
        start = time.perf_counter()
        trainer.fit((x, y), batch_size=64 // trainer.world_size, epochs=1)
        total = time.perf_counter() - start
        if trainer.is_global_zero:
            kept = max(folder.glob("step*.pt"))
            files = [kept] if kept.is_file() else [f for f in kept.rglob("*") if f.is_file()]
            size = sum(f.stat().st_size for f in files) / 1e6
            print(
                f"strategy={trainer.strategy}, {trainer.world_size} rank(s), async_save={async_save!s:5}: "
                f"{size:.0f} MB checkpoint, stall per save: median {1e3 * statistics.median(pauses):.0f} ms "
                f"(min {1e3 * min(pauses):.0f}, max {1e3 * max(pauses):.0f}) over {len(pauses)} saves; "
                f"fit {total:.1f} s for {saves * every} steps"
            )
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=20)
    parser.add_argument("--stall", action="store_true", help="the loop's stall per save, sync vs async_save=True")
    parser.add_argument("--every", type=int, default=10, help="with --stall: steps between saves")
    parser.add_argument("--fsdp", action="store_true", help="with --stall under torchrun: strategy='fsdp'")
    args = parser.parse_args()
    if args.stall:
        return stall(min(args.saves, 5), args.every, "fsdp" if args.fsdp else "auto")
    torch.set_num_threads(1)
    fitkit.seed_everything(0)
    x, y = load_digits()
    model = build_model()
    trainer = fitkit.Trainer(
        model, torch.optim.Adam(model.parameters(), 1e-3), "cross_entropy", metrics=["accuracy"], verbose=0
    )
    trainer.fit((x, y), validation_split=0.2, batch_size=64, epochs=1)
    with tempfile.TemporaryDirectory() as folder:
        times = []
        for i in range(args.saves):
            start = time.perf_counter()
            trainer.save_checkpoint(Path(folder) / f"c{i % 2}.pt")
            times.append(time.perf_counter() - start)
        path = Path(folder) / "c0.pt"
        start = time.perf_counter()
        checkpoint.load(path)
        load_ms = 1e3 * (time.perf_counter() - start)
        print(
            f"model: {sum(p.numel() for p in model.parameters()):,} parameters, Adam; "
            f"checkpoint file {path.stat().st_size / 1e6:.2f} MB"
        )
        print(
            f"save: median {1e3 * statistics.median(times):.1f} ms, min {1e3 * min(times):.1f} ms, "
            f"max {1e3 * max(times):.1f} ms over {args.saves} saves; verified load {load_ms:.1f} ms"
        )


if __name__ == "__main__":
    main()
