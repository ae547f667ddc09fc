"""EMA and SWA against torch.optim.swa_utils (AveragedModel, get_ema_multi_avg_fn, SWALR, update_bn)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from helpers import make_classification, make_trainer
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn, update_bn
from torch.utils.data import DataLoader, TensorDataset

from fitkit import Callback
from fitkit.callbacks import EMA, SWA, ModelCheckpoint


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _data(n: int = 48):
    return make_classification(n=n, seed=2)


class _ReferenceEMA(Callback):
    """torch's AveragedModel, updated after the same optimizer steps as fitkit's EMA."""

    def __init__(self, decay: float, every: int = 1, start: int = 0) -> None:
        self.decay, self.every, self.start, self.averaged = decay, every, start, None
        self.seen = 0

    def on_train_begin(self, logs=None):
        if self.averaged is None:
            self.averaged = AveragedModel(
                self.trainer.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True
            )

    def on_batch_end(self, batch, logs=None):
        step = self.trainer.global_step
        if step != self.seen and step >= self.start and step % self.every == 0:
            self.averaged.update_parameters(self.trainer.model)
        self.seen = step


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("decay, every, start", [(0.9, 1, 0), (0.75, 2, 3)])
def test_ema_equals_torchs_averaged_model(decay, every, start):
    x, y = _data()
    model = _model()
    reference = _ReferenceEMA(decay, every, start)
    ema = EMA(decay=decay, every_n_steps=every, start_step=start, swap_at_end=False)
    trainer = make_trainer(model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), callbacks=[ema, reference])
    trainer.fit((x, y), epochs=3, batch_size=8)
    assert ema.n_averaged == int(reference.averaged.n_averaged)
    assert _max_difference(ema.averaged, _tensors(reference.averaged.module)) < 1e-6


def test_ema_leaves_training_unchanged_validates_with_the_averages_and_swaps_at_end():
    x, y = _data()
    plain = make_trainer(_model(), metrics=["accuracy"])
    torch.manual_seed(5)
    plain.fit((x, y), (x[:16], y[:16]), epochs=3, batch_size=8)
    ema, reference = EMA(decay=0.8), _ReferenceEMA(0.8)
    trainer = make_trainer(_model(), metrics=["accuracy"], callbacks=[ema, reference])
    torch.manual_seed(5)
    history = trainer.fit((x, y), (x[:16], y[:16]), epochs=3, batch_size=8)
    # training itself saw the trained weights (the swap is undone after every validation) ...
    assert plain.history.history["loss"] == history.history["loss"]
    # ... validation the averaged ones, and the model holds them after fit, so evaluate agrees
    assert plain.history.history["val_loss"] != history.history["val_loss"]
    assert _max_difference(_tensors(trainer.model), _tensors(reference.averaged.module)) < 1e-6
    assert trainer.evaluate((x[:16], y[:16]))["loss"] == pytest.approx(history.history["val_loss"][-1], abs=1e-6)


def test_evaluate_after_fit_with_the_callback_uses_the_averages_and_puts_the_weights_back():
    x, y = _data()
    ema = EMA(decay=0.8, swap_at_end=False)
    trainer = make_trainer(_model(), callbacks=[ema])
    history = trainer.fit((x, y), (x[:16], y[:16]), epochs=2, batch_size=8)
    trained = _tensors(trainer.model)
    with_ema = trainer.evaluate((x[:16], y[:16]), callbacks=[ema])
    assert with_ema["loss"] == pytest.approx(history.history["val_loss"][-1], abs=1e-6)
    assert _max_difference(_tensors(trainer.model), trained) == 0.0
    assert trainer.evaluate((x[:16], y[:16]))["loss"] != with_ema["loss"]
    with ema.averaged_weights():
        assert _max_difference(_tensors(trainer.model), ema.averaged) == 0.0
    assert _max_difference(_tensors(trainer.model), trained) == 0.0


def test_ema_with_several_optimizers():
    x, y = _data()
    model = _model()
    optimizers = {
        "body": torch.optim.SGD([*model[0].parameters(), *model[1].parameters()], lr=0.1),
        "head": torch.optim.Adam(model[4].parameters(), lr=1e-2),
    }
    ema, reference = EMA(decay=0.9), _ReferenceEMA(0.9)
    make_trainer(model, optimizer=optimizers, callbacks=[ema, reference]).fit((x, y), epochs=2, batch_size=8)
    assert _max_difference(ema.averaged, _tensors(reference.averaged.module)) < 1e-6


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_resume_is_exact(tmp_path, kind):
    x, y = _data()

    def run(epochs, folder, resume=None, initial=None):
        averaging = EMA(decay=0.8) if kind == "ema" else SWA(swa_start_epoch=1, swa_lr=0.05)
        saver = ModelCheckpoint(folder / "{epoch}.pt", save_last=True, monitor=None)
        trainer = make_trainer(_model(), callbacks=[averaging, saver])
        torch.manual_seed(3)
        history = trainer.fit((x, y), (x[:16], y[:16]), epochs=epochs, batch_size=8, resume=resume)
        return trainer, averaging, history

    whole, whole_avg, whole_history = run(4, tmp_path / "whole")
    run(2, tmp_path / "part")
    resumed, resumed_avg, resumed_history = run(4, tmp_path / "part", resume=tmp_path / "part" / "last.pt")
    assert resumed_history.history == whole_history.history
    assert _max_difference(resumed_avg.averaged, whole_avg.averaged) == 0.0
    assert _max_difference(_tensors(resumed.model), _tensors(whole.model)) == 0.0
    assert resumed.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]


def test_swa_equals_torchs_swa_utils():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # no shuffle: update_bn sees the same batches
    swa = SWA(swa_start_epoch=2, swa_lr=0.05, anneal_epochs=2)
    trainer = make_trainer(_model(), callbacks=[swa])
    seen_lrs = []
    trainer.callbacks.append(_RecordLR(seen_lrs))
    torch.manual_seed(11)
    trainer.fit(loader, epochs=6)

    # the same training by hand with torch.optim.swa_utils, from the same random stream (dropout)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averaged, scheduler, lrs = AveragedModel(model, use_buffers=True), None, []
    torch.manual_seed(11)
    for epoch in range(6):
        if epoch == 2:
            scheduler = SWALR(optimizer, swa_lr=0.05, anneal_epochs=2)
        lrs.append(optimizer.param_groups[0]["lr"])
        for xb, yb in loader:
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if epoch >= 2:
            averaged.update_parameters(model)
            scheduler.step()
    with torch.no_grad():
        update_bn(loader, averaged)
    assert seen_lrs == pytest.approx(lrs, abs=1e-12) and lrs[:3] == [0.1, 0.1, 0.1] and lrs[-1] == 0.05
    assert swa.n_averaged == int(averaged.n_averaged) == 4
    assert _max_difference(_tensors(trainer.model), _tensors(averaged.module)) < 1e-6


class _RecordLR(Callback):
    def __init__(self, lrs: list[float]) -> None:
        self.lrs = lrs

    def on_epoch_begin(self, epoch, logs=None):
        self.lrs.append(self.trainer.optimizer.param_groups[0]["lr"])


def test_swa_validates_with_the_average_from_its_first_epoch():
    x, y = _data()
    swa = SWA(swa_start_epoch=1, swa_lr=0.05)
    plain = make_trainer(_model())
    torch.manual_seed(1)
    plain.fit((x, y), (x[:16], y[:16]), epochs=3, batch_size=8)
    trainer = make_trainer(_model(), callbacks=[swa])
    torch.manual_seed(1)
    history = trainer.fit((x, y), (x[:16], y[:16]), epochs=3, batch_size=8)
    assert history.history["val_loss"][0] == plain.history.history["val_loss"][0]  # no average yet
    assert history.history["loss"][:2] == plain.history.history["loss"][:2]  # the same training until then


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: EMA(decay=1.5),
            ValueError,
            r"decay must be a number in \[0, 1\] \(the weight of the old average\), got 1.5",
        ),
        (
            lambda: EMA(every_n_steps=0),
            ValueError,
            r"every_n_steps must be an int >= 1 \(optimizer steps between updates\), got 0",
        ),
        (lambda: EMA(start_step=-1), ValueError, r"start_step must be an int >= 0 .*got -1"),
        (lambda: EMA(evaluate_with_ema="yes"), TypeError, r"evaluate_with_ema must be True or False, got 'yes'"),
        (
            lambda: SWA(-1, 0.1),
            ValueError,
            r"swa_start_epoch must be an int >= 0 \(the first averaged epoch, 0-based\), got -1",
        ),
        (
            lambda: SWA(1, 0),
            ValueError,
            r"swa_lr must be a positive number \(the learning rate of the SWA epochs\), got 0",
        ),
        (lambda: SWA(1, 0.1, anneal_epochs=-2), ValueError, r"anneal_epochs must be an int >= 0, got -2"),
        (
            lambda: SWA(1, 0.1, anneal_strategy="step"),
            ValueError,
            r"anneal_strategy must be 'cos' or 'linear', got 'step'",
        ),
    ],
)
def test_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    x, y = _data()
    ema = EMA(decay=0.9)
    make_trainer(_model(), callbacks=[ema]).fit((x, y), epochs=1, batch_size=8)
    other = EMA()
    other.set_trainer(make_trainer(nn.Linear(4, 3)))
    with pytest.raises(
        ValueError, match=r"EMA: the checkpoint's averages do not fit this model \(9 tensors saved, the model has 2\)"
    ):
        other.load_state_dict(ema.state_dict())


# -- DDP ------------------------------------------------------------------------------------------
def _fit_with_ema(rank: int, out: Path) -> dict:
    x, y = _data(64)
    reference, ema = _ReferenceEMA(0.8), EMA(decay=0.8, swap_at_end=False)
    trainer = make_trainer(_model(), callbacks=[ema, reference])
    history = trainer.fit((x, y), (x[:16], y[:16]), epochs=2, batch_size=8)
    return {
        "ema": ema.averaged,
        "reference": _tensors(reference.averaged.module),
        "model": _tensors(trainer.model),
        "val_loss": history.history["val_loss"],
        "world": trainer.world_size,
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_ema_under_ddp_on_two_ranks(tmp_path):
    ranks = run_ranks(_fit_with_ema, tmp_path).check()
    assert [r["world"] for r in ranks] == [2, 2]
    # rank 0's averages are every rank's: DDP keeps the parameters equal, and the BatchNorm statistics that
    # each rank's batches moved are rank 0's again at the next forward (and in the EMA, at every use)
    assert _max_difference(ranks[0]["ema"], ranks[0]["reference"]) < 1e-6
    assert _max_difference(ranks[0]["ema"], ranks[1]["ema"]) == 0.0
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_ema_on_cuda_equals_torchs_averaged_model_without_host_syncs(precision):
    x, y = _data()
    reference, ema = _ReferenceEMA(0.9), EMA(decay=0.9, swap_at_end=False)
    trainer = make_trainer(_model(), device="cuda", precision=precision, callbacks=[ema, reference])
    torch.cuda.set_sync_debug_mode("error")  # an update that read a value back to the host would raise here
    try:
        trainer.fit((x, y), epochs=2, batch_size=8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(t.device.type == "cuda" for t in ema.averaged)
    assert _max_difference(ema.averaged, _tensors(reference.averaged.module)) < 1e-6


def _fit_with_swa(rank: int, out: Path) -> dict:
    x, y = _data(64)
    swa = SWA(swa_start_epoch=1, swa_lr=0.05)
    trainer = make_trainer(_model(), callbacks=[swa])
    history = trainer.fit((x, y), (x[:16], y[:16]), epochs=3, batch_size=8)
    return {"model": _tensors(trainer.model), "val_loss": history.history["val_loss"], "n": swa.n_averaged}


@pytest.mark.distributed
@pytest.mark.slow
def test_swa_under_ddp_leaves_every_rank_the_same_model(tmp_path):
    ranks = run_ranks(_fit_with_swa, tmp_path).check()
    assert [r["n"] for r in ranks] == [2, 2]
    # each rank's update_bn saw its shard: the statistics are averaged over the ranks, so the models agree
    assert _max_difference(ranks[0]["model"], ranks[1]["model"]) == 0.0
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"]


@pytest.mark.parametrize(
    ("make", "fit", "match"),
    [
        (
            lambda: EMA(start_step=13),
            {"epochs": 2},
            r"EMA\(start_step=13, every_n_steps=1\) never averages in this fit: "
            r"its first update would be at step 13, and the fit ends at step 12",
        ),  # fmt: skip
        (lambda: EMA(every_n_steps=7), {"epochs": 1}, r"first update would be at step 7, and the fit ends at step 6"),
        (lambda: EMA(start_step=5), {"epochs": 9, "max_steps": 4}, r"the fit ends at step 4"),
        (
            lambda: SWA(2, 0.05),
            {"epochs": 2},
            r"SWA\(swa_start_epoch=2\) never averages in this fit: epochs are "
            r"0-based here and the fit ends after epoch 1 \(epochs=2\)",
        ),  # fmt: skip
    ],
)
def test_an_average_that_never_starts_says_so_before_training(make, fit, match):
    # Issue 19: SWA/EMA starting after the last step trained on silently and left the model's own weights.
    x, y = _data()
    trainer = make_trainer(_model(), callbacks=[make()])
    with pytest.warns(UserWarning, match=match):
        trainer.fit((x, y), batch_size=8, **fit)


@pytest.mark.parametrize("make", [lambda: EMA(start_step=12), lambda: EMA(every_n_steps=6), lambda: SWA(1, 0.05)])
def test_an_average_that_starts_on_the_last_step_is_no_misconfiguration(make, recwarn):
    x, y = _data()
    make_trainer(_model(), callbacks=[make()]).fit((x, y), epochs=2, batch_size=8)
    assert not [w for w in recwarn.list if "never averages" in str(w.message)]
