"""How long a full, atomic, verified checkpoint of the main example's model takes to write and read.

    python benchmarks/checkpoint_write.py            # 20 saves after one epoch of examples/train_digits.py

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saves", type=int, default=20)
    args = parser.parse_args()
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
