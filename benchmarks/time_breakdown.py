"""Where does an epoch's time go? ``ThroughputMonitor``'s breakdown of one small image job, two ways.

The same CNN trains on the same images three ways: decoded and augmented per sample in the Dataset (an
antialiased resize from 128x128, a random crop and flip, a normalisation: CPU work, as a JPEG pipeline does) with
``num_workers=0`` (the loader runs in the training process, between the steps); the same with worker processes
(``--workers``, default 2); and resized once up front, the batches cut from tensors in memory (crop and flip
left out). The monitor's epoch logs are printed as they are (the docs page "Where does the time go" quotes them)
and the breakdown of the last epoch of each run is drawn as stacked bars.

Usage::

    python benchmarks/time_breakdown.py                 # writes docs/images/time-breakdown.png
    python benchmarks/time_breakdown.py --out /tmp/tb.png --epochs 2

Needs matplotlib (``pip install fitkit[bench]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

HERE = Path(__file__).resolve().parent
PARTS = ("time_data", "time_step", "time_callbacks", "time_validation")


class Images(Dataset):
    """``n`` synthetic 3x128x128 images and labels, each decoded and augmented on every read."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.raw = torch.randint(0, 256, (n, 3, 128, 128), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.raw[i].float().div(255).unsqueeze(0)
        image = nn.functional.interpolate(image, size=(40, 40), mode="bilinear", antialias=True)[0]
        top, left = torch.randint(0, 9, (2,)).tolist()
        image = image[:, top : top + 32, left : left + 32]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image - 0.5) / 0.25, self.labels[i]


def model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )  # fmt: skip


def in_memory(images: Images) -> tuple[torch.Tensor, torch.Tensor]:
    """The images resized and normalised once (no per-epoch augmentation)."""
    x = nn.functional.interpolate(images.raw.float().div(255), size=(32, 32), mode="bilinear", antialias=True)
    return (x - 0.5) / 0.25, images.labels


def run(workers: int | None, epochs: int, samples: int) -> list[dict[str, float]]:
    """``workers=None``: the data resized once and kept in memory as tensors."""
    import fitkit
    from fitkit.callbacks import ThroughputMonitor

    fitkit.seed_everything(0)
    train: Any = in_memory(Images(samples))
    val: Any = in_memory(Images(samples // 4, seed=1))
    if workers is not None:
        train = DataLoader(
            Images(samples), batch_size=64, shuffle=True, num_workers=workers, persistent_workers=workers > 0
        )
        val = DataLoader(Images(samples // 4, seed=1), batch_size=128, num_workers=workers)
    net = model()
    monitor = ThroughputMonitor(log_every_n_steps=None)
    trainer = fitkit.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.05), "cross_entropy", callbacks=[monitor],
                             device="cpu", verbose=0)  # fmt: skip
    history = trainer.fit(train, val, epochs=epochs, batch_size=None if workers is not None else 64).history
    keys = [k for k in history if k not in ("loss", "val_loss", "lr")]
    return [{k: history[k][e] for k in keys} for e in range(epochs)]


def machine() -> str:
    import os
    import platform

    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs{load}, torch {torch.__version__.split('+')[0]}, 1 thread"


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"time_data": "#C44E52", "time_step": "#4C72B0", "time_callbacks": "#8172B2", "time_validation": "#55A868"}
    fig, ax = plt.subplots(figsize=(7.5, 2.6))
    names = list(results)
    for row, name in enumerate(names):
        left = 0.0
        for part in PARTS:
            width = results[name][part]
            ax.barh(row, width, left=left, color=colors[part], label=part if row == 0 else None)
            if width > 0.04 * sum(results[name][p] for p in PARTS):
                ax.text(left + width / 2, row, f"{width:.1f}s", ha="center", va="center", color="white", fontsize=8)
            left += width
        ax.text(left, row, f"  {results[name]['samples_per_sec']:,.0f} samples/s", va="center", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"seconds of the last epoch ({machine()})", fontsize=8)
    ax.set_xlim(0, max(sum(r[p] for p in PARTS) for r in results.values()) * 1.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.28), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is drawn")
    parser.add_argument("--samples", type=int, default=2048, help="training images per epoch")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the second run")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "images" / "time-breakdown.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the step on one core; the workers on the others
    results = {}
    for workers in (0, args.workers, None):
        name = "in memory, resized once" if workers is None else f"augment per sample, num_workers={workers}"
        epochs = run(workers, args.epochs, args.samples)
        for epoch, logs in enumerate(epochs):
            print(f"{name}, epoch {epoch + 1}: " + json.dumps({k: round(v, 4) for k, v in logs.items()}))
        results[name] = epochs[-1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
