"""The memory tools (issue 21): find_batch_size leaves the trainer bit-identical and reports what it tried;
activation checkpointing is bit-identical (dropout included) and saves activation memory, measured with
saved_tensors_hooks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import make_classification, make_trainer, params_of
from resume_utils import assert_nested_equal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fitkit import Trainer, seed_everything
from fitkit.memory import SavedTensors, checkpoint_blocks, is_checkpointed, next_batch_size


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(width, 4 * width), nn.Linear(4 * width, width), nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(torch.relu(self.fc1(x))))


class Stack(nn.Module):
    def __init__(self, width: int = 16, depth: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def _stack_trainer(**kwargs: Any) -> Trainer:
    seed_everything(0)
    model = Stack()
    return Trainer(
        model, torch.optim.Adam(model.parameters(), lr=1e-2), "cross_entropy", device="cpu", verbose=0, **kwargs
    )


def _data() -> DataLoader:
    x, y = make_classification(64, seed=3)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


# -- activation checkpointing ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_activation_checkpointing_is_bit_identical_with_dropout():
    plain = _stack_trainer()
    plain.fit(_data(), epochs=2)
    checkpointed = _stack_trainer(activation_checkpointing=True)
    assert [is_checkpointed(b) for b in checkpointed.model.blocks] == [True] * 4  # find_blocks' choice: the blocks
    assert not is_checkpointed(checkpointed.model.inp)
    checkpointed.fit(_data(), epochs=2)
    assert checkpointed.history.history["loss"] == plain.history.history["loss"]
    for a, b in zip(params_of(checkpointed.model), params_of(plain.model)):
        assert torch.equal(a, b)
    assert list(checkpointed.model.state_dict()) == list(plain.model.state_dict())  # same keys
    assert type(copy.deepcopy(checkpointed.model).blocks[0]).__name__ == "Block"


def test_the_flop_count_leaves_out_the_recomputation_and_training_is_unchanged():
    from fitkit.callbacks import ThroughputMonitor

    runs = {}
    for checkpointing in (False, True):
        monitor = ThroughputMonitor(log_every_n_steps=None)
        trainer = _stack_trainer(activation_checkpointing=checkpointing, callbacks=[monitor])
        trainer.fit(_data(), epochs=1)
        runs[checkpointing] = (monitor.flops_per_sample, trainer.history.history["loss"], params_of(trainer.model))
    # The model's FLOPs (MFU's), not the hardware's: the blocks' forward re-run in backward is left out.
    assert runs[True][0] == runs[False][0] and runs[True][0] is not None
    assert runs[True][1] == runs[False][1]
    assert all(torch.equal(a, b) for a, b in zip(runs[True][2], runs[False][2]))


def _saved_bytes(model: nn.Module) -> int:
    x = torch.randn(256, 4)
    with SavedTensors(exclude=model.parameters()) as saved:
        loss = model(x).sum()
    loss.backward()
    return saved.bytes


def test_activation_checkpointing_saves_activation_memory():
    torch.manual_seed(0)
    model = Stack(width=32, depth=6)
    plain_bytes = _saved_bytes(model)
    checkpoint_blocks(model, [Block])
    checkpointed_bytes = _saved_bytes(model)
    # Without: every block keeps its 4x-wide hidden activations; with: each block's input alone.
    assert checkpointed_bytes < plain_bytes / 4, (checkpointed_bytes, plain_bytes)


def test_policies_and_their_errors():
    model = Stack()
    assert checkpoint_blocks(model, False) == []
    assert checkpoint_blocks(model, lambda m: isinstance(m, nn.Linear) and m.out_features == 3) == [model.out]
    assert checkpoint_blocks(Stack(), ["Block"]) != []
    with pytest.raises(ValueError, match="no block"):
        checkpoint_blocks(nn.Linear(2, 2), True)
    with pytest.raises(TypeError, match="activation_checkpointing"):
        checkpoint_blocks(Stack(), 3)


# -- find_batch_size ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_find_batch_size_leaves_the_trainer_bit_identical_and_reports_what_it_tried():
    x, y = make_classification(64, seed=3)
    searched = _stack_trainer(accumulate_grad_batches={0: 2, 1: 1})
    searched.fit((x, y), epochs=2, batch_size=8)  # a trainer mid-life: optimizer state, counters, history
    before = copy.deepcopy(searched.state_dict())
    result = searched.find_batch_size((x, y), max_memory_mb=0.2, max_batch_size=64)
    assert [t.batch_size for t in result.trials] == [2, 4, 8, 16, 32, 64]
    assert result.trials[-1].fits is False and "max_memory_mb" in (result.trials[-1].error or "")
    assert result.batch_size == result.trials[-2].batch_size and all(t.fits for t in result.trials[:-1])
    memories = [t.memory_mb for t in result.trials]
    assert memories == sorted(memories)  # more samples, more saved activations
    assert "largest that fits" in str(result)
    assert_nested_equal(searched.state_dict(), before)  # weights, optimizer, counters, every generator
    assert searched.accumulate_grad_batches == 1 and len(searched.history.history["loss"]) == 2  # side fits: k=2

    searched.fit((x, y), epochs=3, batch_size=8)  # then a fit equals one without the search, bit for bit
    untouched = _stack_trainer(accumulate_grad_batches={0: 2, 1: 1})  # (seeds the global generator again)
    untouched.fit((x, y), epochs=2, batch_size=8)
    untouched.fit((x, y), epochs=3, batch_size=8)
    assert searched.history.history["loss"] == untouched.history.history["loss"]
    for a, b in zip(params_of(searched.model), params_of(untouched.model)):
        assert torch.equal(a, b)


def test_binsearch_bisects_between_the_last_fit_and_the_first_failure():
    tried: dict[int, bool] = {}
    fits_up_to = 37
    while (size := next_batch_size("binsearch", tried, 2, 1000)) is not None:
        tried[size] = size <= fits_up_to
    assert max(b for b, ok in tried.items() if ok) == fits_up_to
    assert list(tried)[:6] == [2, 4, 8, 16, 32, 64]
    power: dict[int, bool] = {}
    while (size := next_batch_size("power", power, 2, 1000)) is not None:
        power[size] = size <= fits_up_to
    assert list(power) == [2, 4, 8, 16, 32, 64]


def test_find_batch_size_arguments():
    trainer = make_trainer()
    x, y = make_classification(16)
    with pytest.raises(ValueError, match="max_memory_mb"):
        trainer.find_batch_size((x, y))
    with pytest.raises(ValueError, match="mode"):
        trainer.find_batch_size((x, y), mode="linear", max_memory_mb=1)
    result = trainer.find_batch_size(TensorDataset(x, y), max_memory_mb=100, mode="binsearch")
    assert result.batch_size == 16 and [t.batch_size for t in result.trials] == [2, 4, 8, 16]
