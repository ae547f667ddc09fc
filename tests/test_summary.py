"""Trainer.summary(): a Keras-like table from the modules alone, printed once at fit start with verbose."""

from __future__ import annotations

import pytest
from helpers import TinyNet, make_classification, make_trainer
from torch import nn


def test_summary_lists_children_totals_memory_device_and_precision():
    trainer = make_trainer(TinyNet(hidden=8))
    assert trainer.summary() == "\n".join(
        [
            'Model: "TinyNet"',
            "=" * 34,
            "Layer (type)     Params  Trainable",
            "-" * 34,
            "fc1 (Linear)         40         40",
            "drop (Identity)       0          0",
            "fc2 (Linear)         27         27",
            "=" * 34,
            "Total params: 67 (268 B)",
            "Trainable params: 67",
            "Non-trainable params: 0",
            "Device: cpu | Precision: 32 (weights float32)",
        ]
    )


def test_depth_frozen_parameters_buffers_and_shared_weights():
    inner = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model = nn.Sequential(inner, nn.Linear(4, 2))
    inner[0].weight.requires_grad_(False)
    text = make_trainer(model).summary(depth=2)
    assert "\n".join(text.splitlines()[4:8]) == "\n".join(
        [
            "0 (Sequential)           28         12",
            "  0.0 (Linear)           20          4",
            "  0.1 (BatchNorm1d)       8          8",
            "1 (Linear)               10         10",
        ]
    )
    assert "Total params: 38 (152 B)\nTrainable params: 22\nNon-trainable params: 16" in text
    assert "Buffers: 9 values (40 B)" in text  # running mean/var (float32) and the step count (int64)
    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight  # shared weights count once
    assert "Total params: 15 " in make_trainer(tied).summary()
    assert "Layer (type)" not in make_trainer(TinyNet()).summary(depth=0)


@pytest.mark.parametrize("depth", [-1, 1.5, True])
def test_depth_must_be_a_non_negative_int(depth):
    with pytest.raises(
        ValueError, match=r"depth must be an int >= 0 \(levels of child modules to list; 0: totals only\)"
    ):
        make_trainer().summary(depth=depth)


def test_fit_prints_it_once_with_the_data_sizes_and_no_extra_forward(capsys):
    x, y = make_classification(n=20)
    quiet_model, loud_model = TinyNet(), TinyNet()
    make_trainer(quiet_model, verbose=0).fit((x, y), (x[:10], y[:10]), epochs=2, batch_size=8)
    assert capsys.readouterr().out == ""
    make_trainer(loud_model, verbose=2).fit((x, y), (x[:10], y[:10]), epochs=2, batch_size=8)
    out = capsys.readouterr().out
    assert out.count('Model: "TinyNet"') == 1
    assert "Training data: 20 samples, 3 batches per epoch\nValidation data: 2 batches" in out
    assert len(loud_model.forward_calls) == len(quiet_model.forward_calls)  # the table ran no forward pass
