"""Small shared pieces for the tests: tiny seeded data and models, a recording callback.

Additive: add helpers, do not change the behaviour of existing ones (other test files use them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fitkit import Callback, Trainer
from fitkit.callbacks.base import HOOKS


def make_classification(n: int = 12, features: int = 4, classes: int = 3,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of a linearly separable-ish toy task; drawn from a private generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w).argmax(dim=1)
    return x, y


class TinyNet(nn.Module):
    """Linear -> ReLU -> (Dropout) -> Linear; records (training, grad enabled) at every forward."""

    def __init__(self, features: int = 4, classes: int = 3, hidden: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc2 = nn.Linear(hidden, classes)
        self.forward_calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_calls.append((self.training, torch.is_grad_enabled()))
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def make_trainer(model: nn.Module | None = None, *, lr: float = 0.1, **kwargs: Any) -> Trainer:
    """A silent CPU Trainer with SGD and cross-entropy unless told otherwise."""
    model = TinyNet() if model is None else model
    kwargs.setdefault("optimizer", torch.optim.SGD(model.parameters(), lr=lr))
    kwargs.setdefault("loss", "cross_entropy")
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("verbose", 0)
    return Trainer(model, **kwargs)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@dataclass
class HookCall:
    name: str
    args: tuple[Any, ...]
    training: bool       # model.training when the hook ran
    grad_enabled: bool   # torch.is_grad_enabled() when the hook ran


def _recording_hook(name: str):  # type: ignore[no-untyped-def]
    def hook(self: RecordingCallback, *args: Any) -> None:
        # Snapshot dicts: the trainer may keep adding keys to the logs after this hook returns.
        copied = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        self.calls.append(HookCall(name, copied, self.trainer.model.training, torch.is_grad_enabled()))

    hook.__name__ = name
    return hook


class RecordingCallback(Callback):
    """Records every hook call (name, arguments, model mode, grad mode) in ``calls``."""

    def __init__(self) -> None:
        self.calls: list[HookCall] = []

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def of(self, name: str) -> list[HookCall]:
        return [c for c in self.calls if c.name == name]


for _name in HOOKS:
    setattr(RecordingCallback, _name, _recording_hook(_name))


class CountingDataset(Dataset):
    """(x[i], y[i]) pairs that count ``__getitem__`` calls."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.calls = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.x[i], self.y[i]

