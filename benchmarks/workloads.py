"""The models and synthetic data shared by the benchmark scripts.

Two overhead-bound workloads from the speed issue:

* ``mlp``: an MLP 32-64-10 on random features, batch 64: a step costs well under a millisecond, so
  anything a training loop adds per batch shows.
* ``cnn``: a small CNN (conv 8, conv 16, linear) on 3x32x32 random images, batch 128: compute
  dominates, the loop should vanish.

The data are random tensors drawn from a fixed seed, so every process sees the same numbers.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class Workload:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    train_batches: int  # per epoch
    val_batches: int

    @property
    def train_samples(self) -> int:
        return self.train_batches * self.batch_size

    @property
    def val_samples(self) -> int:
        return self.val_batches * self.batch_size

    def scaled(self, train_batches: int, val_batches: int) -> Workload:
        return Workload(self.name, self.input_shape, self.num_classes, self.batch_size, train_batches, val_batches)


WORKLOADS = {
    # 3 epochs of 1000 batches with a validation pass each epoch, as in the issue.
    "mlp": Workload("mlp", (32,), 10, 64, train_batches=1000, val_batches=200),
    # Fewer batches: a CNN step costs ~40x an MLP step on one CPU thread.
    "cnn": Workload("cnn", (3, 32, 32), 10, 128, train_batches=40, val_batches=8),
}


def build_model(name: str) -> nn.Module:
    """A fresh model, initialised from the global torch generator (seed it first)."""
    if name == "mlp":
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 8 * 8, 10),
        )
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(WORKLOADS)}")


def make_tensors(workload: Workload, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, x_val, y_val)``: random inputs and integer labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(workload.train_samples, *workload.input_shape, generator=gen)
    y = torch.randint(0, workload.num_classes, (workload.train_samples,), generator=gen)
    x_val = torch.randn(workload.val_samples, *workload.input_shape, generator=gen)
    y_val = torch.randint(0, workload.num_classes, (workload.val_samples,), generator=gen)
    return x, y, x_val, y_val


def make_loaders(workload: Workload, tensors: tuple[torch.Tensor, ...]) -> tuple[DataLoader, DataLoader]:
    """The tutorial's loaders: ``DataLoader(TensorDataset)``, shuffled for training, in the main process."""
    x, y, x_val, y_val = tensors
    train = DataLoader(TensorDataset(x, y), batch_size=workload.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=workload.batch_size)
    return train, val


def machine_info() -> dict[str, object]:
    """What a reader needs to compare figures: CPU, core count, versions, and the load when measured."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["loadavg_1min"] = os.getloadavg()[0]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    return info
