"""lr_find: a real range test through the trainer's loop that leaves the trainer bit-identical."""

from __future__ import annotations

import copy
import random
import sys

import numpy as np
import pytest
import torch
from helpers import TinyNet, make_classification, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitkit
import fitkit.rng
from fitkit import _compat
from fitkit.callbacks import CSVLogger, EarlyStopping, LRScheduler, ModelCheckpoint
from fitkit.lr_finder import LRFinder, LRFindResult, suggest


def _loader(seed: int = 0) -> DataLoader:
    x, y = make_classification(n=64, seed=3)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


def _snapshot(trainer: fitkit.Trainer, loader: DataLoader) -> dict:
    """Everything lr_find must leave as it was, as plain values and tensors."""
    optimizer = trainer.optimizer
    return {
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in trainer.model.parameters()],
        "optimizer": copy.deepcopy(optimizer.state_dict()["state"]),
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "step_marks": _compat.optimizer_step_marks(optimizer),
        "state": trainer.state.state_dict(),
        "callbacks": [cb.state_dict() for cb in trainer.callbacks],
        "history": dict(trainer.history.history),
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
        "torch": torch.get_rng_state(),
        "loader": loader.generator.get_state(),
        "training": [m.training for m in trainer.model.modules()],
    }


def _assert_same(before: dict, after: dict, two_trainers: bool = False) -> None:
    if two_trainers:  # wall time, run ids and checkpoint folders differ between two trainers, never within one
        before, after = (
            {**d, "callbacks": None, "state": {**d["state"], "train_time": 0, "run_id": None}} for d in (before, after)
        )
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if key == "model":
            assert all(torch.equal(a[k], b[k]) for k in a), key
        elif key == "grads":
            assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b)), key
        elif key == "optimizer":
            assert a.keys() == b.keys()
            for index in a:
                for name in a[index]:
                    assert torch.equal(torch.as_tensor(a[index][name]), torch.as_tensor(b[index][name])), (index, name)
        elif key in ("numpy",):
            assert np.array_equal(a, b), key
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), key
        else:
            assert a == b, key


def _trainer(tmp_path, dropout: float = 0.5) -> fitkit.Trainer:
    torch.manual_seed(0)
    model = TinyNet(hidden=16, dropout=dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    return make_trainer(
        model,
        optimizer=optimizer,
        metrics=["accuracy"],
        callbacks=[
            LRScheduler(scheduler),
            EarlyStopping(monitor="val_loss", patience=10),
            ModelCheckpoint(tmp_path / "ckpt" / "{epoch}.pt", save_top_k=1),
            CSVLogger(tmp_path / "log.csv"),
        ],
    )


def test_lr_find_leaves_the_trainer_bit_identical_and_a_later_fit_unchanged(tmp_path):
    x, y = make_classification(n=32, seed=4)
    plain, probed = _trainer(tmp_path / "a"), _trainer(tmp_path / "b")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    plain_loader = _loader()
    plain.fit(plain_loader, (x, y), epochs=2)
    plain_state = _snapshot(plain, plain_loader)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    probed_loader = _loader()
    probed.fit(probed_loader, (x, y), epochs=2)
    files = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    csv_text = (tmp_path / "b" / "log.csv").read_text()
    before = _snapshot(probed, probed_loader)
    _assert_same(plain_state, before, two_trainers=True)

    result = probed.lr_find(probed_loader, num_steps=30, start_lr=1e-5, end_lr=1.0)

    assert len(result.lrs) == 30 and len(result.losses) == 30 and not result.diverged
    _assert_same(before, _snapshot(probed, probed_loader))
    assert sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")) == files  # nothing written
    assert (tmp_path / "b" / "log.csv").read_text() == csv_text
    # the next fit is the same, bit for bit, as on the trainer that never ran lr_find
    # (the process's global generators are where lr_find left them: both fits start from there)
    generators = fitkit.rng.capture()
    plain_history = plain.fit(plain_loader, (x, y), epochs=4, initial_epoch=2)
    fitkit.rng.restore(generators)
    probed_history = probed.fit(probed_loader, (x, y), epochs=4, initial_epoch=2)
    assert plain_history.history == probed_history.history
    _assert_same(_snapshot(plain, plain_loader), _snapshot(probed, probed_loader), two_trainers=True)


def test_lr_find_before_any_fit_with_in_memory_data_and_accumulation():
    x, y = make_classification(n=48, seed=5)
    plain, probed = (
        make_trainer(TinyNet(), accumulate_grad_batches=2),
        make_trainer(TinyNet(), accumulate_grad_batches=2),
    )
    probed.model.load_state_dict(plain.model.state_dict())
    torch.manual_seed(7)
    result = probed.lr_find((x, y), batch_size=8, num_steps=10, end_lr=1.0)
    assert len(result.lrs) == 10 and probed.global_step == 0
    torch.manual_seed(7)
    a = plain.fit((x, y), epochs=2, batch_size=8)
    torch.manual_seed(7)
    b = probed.fit((x, y), epochs=2, batch_size=8)
    assert a.history == b.history
    assert all(torch.equal(p, q) for p, q in zip(plain.model.parameters(), probed.model.parameters()))


def test_the_schedule_the_lrs_used_and_the_suggestion():
    x, y = make_classification(n=64, seed=3)
    seen: list[float] = []

    class Record(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    model = TinyNet(hidden=16)
    trainer = make_trainer(model, optimizer=Record(model.parameters(), lr=0.1))
    result = trainer.lr_find((x, y), batch_size=8, num_steps=20, start_lr=1e-4, end_lr=10.0, stop_divergence=None)
    assert result.lrs == pytest.approx([1e-4 * (1e5) ** (i / 19) for i in range(20)], rel=1e-12)
    assert seen == result.lrs  # each step used its rate, in every param group
    assert result.suggestion in result.lrs[2:-1]
    # the suggestion is where the smoothed loss falls fastest against log10(lr)
    gradients = np.gradient(np.array(result.losses[2:-1]), np.log10(np.array(result.lrs[2:-1])))
    assert result.suggestion == result.lrs[2 + int(np.argmin(gradients))]
    assert trainer.optimizer.param_groups[0]["lr"] == 0.1


def test_a_diverging_loss_stops_the_test_early():
    x, y = make_classification(n=64, seed=3)
    trainer = make_trainer(TinyNet(hidden=16))
    result = trainer.lr_find((x, y), batch_size=8, num_steps=100, start_lr=1e-3, end_lr=1e6)
    assert result.diverged and 2 < len(result.lrs) < 100
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses)
    assert result.suggestion is not None and result.suggestion < result.lrs[-1]


def test_linear_mode_and_several_optimizers():
    x, y = make_classification(n=32, seed=3)
    model = TinyNet()
    optimizers = {
        "first": torch.optim.SGD(model.fc1.parameters(), lr=0.1),
        "second": torch.optim.Adam(model.fc2.parameters(), lr=0.01),
    }
    trainer = make_trainer(model, optimizer=optimizers)
    states = {name: {k: v.clone() for k, v in model.state_dict().items()} for name in optimizers}
    result = trainer.lr_find((x, y), batch_size=8, num_steps=5, start_lr=0.01, end_lr=0.05, mode="linear")
    assert result.lrs == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert [o.param_groups[0]["lr"] for o in optimizers.values()] == [0.1, 0.01]
    assert optimizers["second"].state_dict()["state"] == {}
    assert all(torch.equal(v, states["first"][k]) for k, v in model.state_dict().items())


def test_plot_saves_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = LRFindResult(lrs=[1e-4, 1e-3, 1e-2, 1e-1], losses=[1.0, 0.9, 0.5, 2.0], suggestion=1e-2)
    figure = result.plot(tmp_path / "lr.png")
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.axes[0].get_xscale() == "log"


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'matplotlib, which is not installed: pip install "fitkit\[plot\]"'):
        LRFindResult(lrs=[1.0], losses=[1.0]).plot()


def test_suggest_needs_two_finite_points():
    assert suggest([1.0, 2.0, 3.0], [1.0, float("nan"), 2.0]) is None
    assert suggest([1e-3, 1e-2, 1e-1, 1.0, 10.0], [1.0, 0.9, 0.2, 0.1, 5.0]) == 1e-2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(start_lr=0), r"start_lr must be a positive number \(the first step's learning rate\), got 0"),
        (dict(end_lr=1e-8), r"end_lr must be larger than start_lr \(the test sweeps upwards\), got start_lr=1e-07"),
        (dict(num_steps=1), r"num_steps must be an int >= 2 \(optimizer steps to sweep over\), got 1"),
        (dict(mode="log"), r"mode must be one of \('exponential', 'linear'\) \(how the rate grows\), got 'log'"),
        (dict(smooth=0), r"smooth must be a number in \(0, 1\] .*got 0"),
        (dict(stop_divergence=1.0), r"stop_divergence must be None or a number > 1 .*got 1.0"),
    ],
)
def test_arguments_are_checked_before_anything_runs(kwargs, match):
    trainer = make_trainer()
    with pytest.raises(ValueError, match=match):
        trainer.lr_find(None, **kwargs)
    with pytest.raises(ValueError, match=match):
        LRFinder(**kwargs)


def test_lr_find_is_exactly_the_same_twice():
    x, y = make_classification(n=32, seed=3)
    trainer = make_trainer(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3)))
    torch.manual_seed(3)
    first = trainer.lr_find((x, y), batch_size=8, num_steps=12)
    torch.manual_seed(3)
    second = trainer.lr_find((x, y), batch_size=8, num_steps=12)
    assert first == second


def test_the_data_loaders_own_generator_is_put_back():
    loader = _loader(seed=11)
    before = loader.generator.get_state()
    make_trainer(TinyNet()).lr_find(loader, num_steps=12)  # 12 steps: two passes over 8 batches
    assert torch.equal(loader.generator.get_state(), before)


# -- DDP ------------------------------------------------------------------------------------------
def _lr_find_on_ranks(rank: int, out) -> dict:
    x, y = make_classification(n=64, seed=3)
    torch.manual_seed(0)
    trainer = make_trainer(TinyNet(hidden=16))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    generator = torch.get_rng_state()
    result = trainer.lr_find((x, y), batch_size=8, num_steps=12, end_lr=1.0)
    return {
        "world": trainer.world_size,
        "result": result,
        "same_weights": all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())),
        "same_generator": torch.equal(generator, torch.get_rng_state()),
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_lr_find_under_ddp_gives_every_rank_the_same_result(tmp_path):
    from dist_utils import run_ranks

    ranks = run_ranks(_lr_find_on_ranks, tmp_path).check()
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["result"] == ranks[1]["result"]  # losses averaged over the ranks: one suggestion
    assert len(ranks[0]["result"].lrs) == 12
    assert all(r["same_weights"] and r["same_generator"] for r in ranks)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lr_find_on_cuda_puts_back_the_cuda_generator_and_weights():
    x, y = make_classification(n=64, seed=3)
    trainer = make_trainer(TinyNet(hidden=16, dropout=0.5), device="cuda")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    generator = torch.cuda.get_rng_state()
    trainer.lr_find((x, y), batch_size=8, num_steps=10)
    assert torch.equal(torch.cuda.get_rng_state(), generator)  # dropout on the GPU drew from it
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
