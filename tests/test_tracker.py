"""The epoch tracker: float64 sums kept on the device, folded in batches, resumable."""

from __future__ import annotations

import pytest
import torch

from fitkit._tracker import EpochTracker


def test_tracker_sums_equal_a_float64_running_sum_across_folds_and_batch_size_changes(monkeypatch):
    monkeypatch.setattr(EpochTracker, "FOLD", 4)
    g = torch.Generator().manual_seed(0)
    tracker = EpochTracker([])
    expected, count = 0.0, 0
    sizes = [8] * 9 + [3] + [8] * 2 + [5]  # folds at 4 and 8 steps, and at every size change
    for step, n in enumerate(sizes):
        value = torch.rand((), generator=g) * 10
        tracker.add({"loss": value, "note": "not a tensor"}, n)
        expected, count = expected + value.item() * n, count + n
        if step == 6:  # a checkpoint mid-run reads the sums so far
            state = tracker.state_dict()
            assert state["sums"]["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert tracker.compute() == {"loss": pytest.approx(expected / count, rel=1e-12)}
    restored = EpochTracker([])
    restored.load_state_dict(tracker.state_dict(), torch.device("cpu"))
    assert restored.compute() == tracker.compute()


def test_tracker_keeps_no_autograd_graph_alive():
    weight = torch.ones(3, requires_grad=True)
    tracker = EpochTracker([])
    tracker.add({"loss": (weight * 2).sum()}, 4)  # a custom train_step that forgot .detach()
    (kept,) = tracker._pending["loss"]
    assert not kept.requires_grad and kept.grad_fn is None
    assert tracker.compute()["loss"] == pytest.approx(6.0)
