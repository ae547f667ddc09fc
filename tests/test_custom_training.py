"""Custom training (issue 11): several optimizers, closure optimizers, compute_loss and models that return
their loss, Keras batch layouts with sample/class weights, picking one output for a metric, Trainer-subclass
hooks and state, the outputs callbacks see, and a custom step's logs."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from helpers import TinyNet, make_classification, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import Callback
from fitkit.callbacks import LRScheduler, ModelCheckpoint
from fitkit.metrics import Accuracy


# -- a two-network model for the several-optimizer tests ------------------------------------------------
class Pair(nn.Module):
    """A generator and a discriminator in one module, as a GAN script keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Linear(4, 4)
        self.d = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.g(x))


class GanTrainer(fitkit.Trainer):
    """A custom step with two optimizers: D on real vs fake, then G to fool D."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        (x,) = batch
        model = self.model
        fake = model.g(x)
        ones, zeros = torch.ones(len(x), 1), torch.zeros(len(x), 1)
        bce = nn.functional.binary_cross_entropy_with_logits
        d_loss = bce(model.d(x), ones) + bce(model.d(fake.detach()), zeros)
        self.backward(d_loss, optimizer="discriminator")
        self.optimizer_step("discriminator")
        g_loss = bce(model.d(fake), ones)
        self.backward(g_loss, optimizer="generator")
        self.optimizer_step("generator")
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}


def gan_trainer(cls: type = GanTrainer, verbose: int = 0, **kwargs: Any) -> fitkit.Trainer:
    torch.manual_seed(0)
    model = Pair()
    optimizers = {
        "generator": torch.optim.Adam(model.g.parameters(), lr=1e-2),
        "discriminator": torch.optim.Adam(model.d.parameters(), lr=1e-2),
    }
    return cls(model, optimizers, None, device="cpu", verbose=verbose, **kwargs)


def gan_data(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


def hand_gan(x: torch.Tensor, batch_size: int, epochs: int) -> tuple[Pair, list[float]]:
    """The tutorial GAN loop (pytorch/examples dcgan style) that GanTrainer must reproduce."""
    torch.manual_seed(0)
    model = Pair()
    opt_g = torch.optim.Adam(model.g.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(model.d.parameters(), lr=1e-2)
    bce = nn.functional.binary_cross_entropy_with_logits
    losses = []
    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size]
            ones, zeros = torch.ones(len(xb), 1), torch.zeros(len(xb), 1)
            model.d.zero_grad()
            fake = model.g(xb)
            d_loss = bce(model.d(xb), ones) + bce(model.d(fake.detach()), zeros)
            d_loss.backward()
            opt_d.step()
            model.g.zero_grad()
            g_loss = bce(model.d(fake), ones)
            g_loss.backward()
            opt_g.step()
            losses.append(d_loss.item())
    return model, losses


# -- several optimizers ---------------------------------------------------------------------------------
def test_a_dict_of_optimizers_trains_a_gan_like_the_hand_written_loop():
    x = gan_data()
    trainer = gan_trainer()
    history = trainer.fit((x,), batch_size=8, epochs=2, shuffle=False)
    model, losses = hand_gan(x, 8, 2)
    for ours, theirs in zip(trainer.model.parameters(), model.parameters()):
        assert torch.equal(ours, theirs)
    assert set(history.history) >= {"d_loss", "g_loss", "lr_generator", "lr_discriminator"}
    assert history.history["d_loss"][-1] == pytest.approx(sum(losses[-4:]) / 4, rel=1e-6)
    assert trainer.global_step == 8  # one per batch, though two optimizers stepped on each
    assert trainer.state.optimizer_steps == {"discriminator": 8, "generator": 8}


def test_backward_with_an_optimizer_name_leaks_no_gradient_into_the_other():
    trainer = gan_trainer()
    model = trainer.model
    x = gan_data(8)
    loss = model(x).mean()  # depends on both networks
    trainer.backward(loss, optimizer="generator")
    assert all(p.grad is not None for p in model.g.parameters())
    assert all(p.grad is None for p in model.d.parameters())


def test_the_single_optimizer_handle_points_to_the_dict_with_several():
    trainer = gan_trainer()
    assert list(trainer.optimizers) == ["generator", "discriminator"]
    with pytest.raises(AttributeError, match=r"this trainer has 2 optimizers \(generator, discriminator\): use "
                       r"trainer.optimizers\[name\], e.g. trainer.optimizers\['generator'\]"):  # fmt: skip
        _ = trainer.optimizer
    with pytest.raises(ValueError, match=r"name the one to use, e.g. self.optimizer_step\('generator'\)"):
        trainer.optimizer_step()
    with pytest.raises(KeyError, match=r"no optimizer named 'gen'; this trainer's optimizers are"):
        trainer.optimizer_step("gen")
    single = make_trainer()
    assert list(single.optimizers) == ["optimizer"] and single.optimizer is single.optimizers["optimizer"]


def test_the_parameter_check_considers_every_optimizer():
    torch.manual_seed(0)
    model = Pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "will not be updated": each network is in its own optimizer
        fitkit.Trainer(
            model, {"g": torch.optim.SGD(model.g.parameters(), 0.1), "d": torch.optim.SGD(model.d.parameters(), 0.1)},
            None, device="cpu", verbose=0,
        )  # fmt: skip
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\) are in no optimizer .*'d.weight', 'd.bias'"):
        fitkit.Trainer(model, {"g": torch.optim.SGD(model.g.parameters(), 0.1)}, None, device="cpu", verbose=0)
    with pytest.raises(ValueError, match=r"a parameter is held by both optimizer 'a' and optimizer 'b'"):
        fitkit.Trainer(
            model, {"a": torch.optim.SGD(model.parameters(), 0.1), "b": torch.optim.SGD(model.d.parameters(), 0.1)},
            None, device="cpu", verbose=0,
        )  # fmt: skip


@pytest.mark.parametrize(
    "optimizer, loss, match",
    [
        (
            torch.optim.Adam,
            "mse",
            r"got the class Adam \(not an instance\); build one: optimizer=Adam\(model.parameters",
        ),
        ("adam", nn.MSELoss, r"loss is the class MSELoss, not an instance; pass loss=MSELoss\(\)"),
        ({"g": "adam"}, None, r"optimizer\['g'\] must be a torch.optim.Optimizer instance, got str"),
        ({"my gen": None}, None, r"optimizer names must be identifiers .* got 'my gen'"),
    ],
)
def test_classes_where_instances_are_needed_are_clear_errors(optimizer, loss, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fitkit.Trainer(TinyNet(), optimizer, loss, device="cpu", verbose=0)


def test_several_optimizers_with_accumulation_are_refused_when_built():
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2 with several optimizers \(generator, "):
        gan_trainer(accumulate_grad_batches=2)


def test_lr_scheduler_follows_its_own_optimizer():
    trainer = gan_trainer()
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizers["discriminator"], step_size=1, gamma=0.5)
    trainer.callbacks.append(LRScheduler(scheduler, interval="step"))
    history = trainer.fit((gan_data(16),), batch_size=8, epochs=1)
    assert trainer.optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**2)
    assert trainer.optimizers["generator"].param_groups[0]["lr"] == 1e-2
    assert history.history["lr_discriminator"] == [pytest.approx(2.5e-3)]


def test_every_optimizer_is_checkpointed_and_restored(tmp_path):
    trainer = gan_trainer(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt")])
    trainer.fit((gan_data(),), batch_size=8, epochs=1)
    restored = gan_trainer()
    restored.load_checkpoint(tmp_path / "e1.pt")
    for name in ("generator", "discriminator"):
        saved, loaded = trainer.optimizers[name].state_dict(), restored.optimizers[name].state_dict()
        assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
        for key in saved["state"]:
            assert torch.equal(saved["state"][key]["exp_avg"], loaded["state"][key]["exp_avg"])
    assert restored.state.optimizer_steps == {"discriminator": 4, "generator": 4}
    swapped = gan_trainer()
    swapped.optimizers = {"gen": swapped.optimizers["generator"], "disc": swapped.optimizers["discriminator"]}
    with pytest.raises(fitkit.CheckpointError, match=r"optimizers mismatch: the checkpoint has optimizers named "
                       r"\['discriminator', 'generator'\], this trainer has \['disc', 'gen'\]"):  # fmt: skip
        swapped.load_checkpoint(tmp_path / "e1.pt")


# -- closure optimizers ------------------------------------------------------------------------------------
def test_lbfgs_with_the_default_step_equals_the_hand_written_loop():
    x, y = torch.randn(32, 3, generator=torch.Generator().manual_seed(0)), torch.randn(32, 1)

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        return model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)

    model, optimizer = build()
    criterion, losses = nn.MSELoss(), []
    for _ in range(3):  # the hand-written loop: the whole set as one batch, as the LBFGS example does

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            return loss

        losses.append(optimizer.step(closure).item())
    ours, ours_optimizer = build()
    trainer = fitkit.Trainer(ours, ours_optimizer, "mse", device="cpu", verbose=0)
    history = trainer.fit((x, y), batch_size=32, epochs=3, shuffle=False)
    for a, b in zip(ours.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert history.history["loss"] == pytest.approx(losses, rel=1e-6)  # the loss before each step
    assert trainer.global_step == 3


def test_lbfgs_combinations_that_cannot_work_are_refused():
    model = TinyNet()
    with pytest.raises(ValueError, match=r"LBFGS re-evaluates the loss of one batch through a closure: "
                       r"accumulate_grad_batches > 1 does not work with it"):  # fmt: skip
        fitkit.Trainer(model, torch.optim.LBFGS(model.parameters()), "mse", accumulate_grad_batches=2, device="cpu")


# -- compute_loss, loss=None, batches without targets ------------------------------------------------------
class Autoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 4))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        recon = self.net(x)
        return {"recon": recon, "loss": ((recon - x) ** 2).mean()}


def test_loss_none_takes_the_loss_the_model_returns_and_fit_x_needs_no_targets():
    torch.manual_seed(0)
    trainer = fitkit.Trainer(Autoencoder(), "adam", None, device="cpu", verbose=0)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    first = trainer.evaluate(x)["loss"]
    trainer.fit(x, batch_size=4, epochs=3)
    assert trainer.evaluate((x,))["loss"] < first


def test_loss_none_with_an_object_output_reads_its_loss_attribute():
    class Output:
        def __init__(self, loss: torch.Tensor) -> None:
            self.loss = loss

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> Output:
            return Output(((x * self.w) ** 2).mean())

    trainer = fitkit.Trainer(Model(), "sgd", None, device="cpu", verbose=0)
    assert trainer.evaluate(torch.ones(8, 2))["loss"] == pytest.approx(1.0)
    assert trainer.fit(torch.ones(8, 2), batch_size=8).history["loss"] == [pytest.approx(1.0)]


def test_loss_none_with_outputs_that_hold_no_loss_is_a_clear_error():
    trainer = fitkit.Trainer(TinyNet(), "sgd", None, device="cpu", verbose=0)
    with pytest.raises(ValueError, match=r"loss=None means the model computes its loss, but its output \(Tensor\) "
                       r"holds none: return a mapping with a 'loss' key"):  # fmt: skip
        trainer.fit(make_classification(8), batch_size=4)
    assert trainer.global_step == 0


def test_a_loss_without_targets_names_compute_loss_and_loss_none():
    trainer = make_trainer()
    with pytest.raises(ValueError, match=r"the batch has no targets.*override Trainer.compute_loss\(inputs, "
                       r"targets, outputs\), or pass loss=None if the model returns its loss"):  # fmt: skip
        trainer.fit((make_classification(8)[0],), batch_size=4)


def test_compute_loss_override_decides_alone():
    class Vae(fitkit.Trainer):
        def compute_loss(self, inputs, targets, outputs, sample_weight=None):
            return ((outputs - inputs) ** 2).sum(dim=1).mean()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 4))
    trainer = Vae(model, "adam", None, device="cpu", verbose=0)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    history = trainer.fit(x, x, batch_size=8, epochs=2)  # (x,) training data, validation on x too
    assert history.history["val_loss"][0] > history.history["val_loss"][1]


# -- sample and class weights ------------------------------------------------------------------------------
def test_sample_weight_is_the_batch_mean_of_weighted_per_sample_losses():
    x, y = make_classification(12)
    w = torch.linspace(0.0, 2.0, 12)
    trainer = make_trainer()
    logged = trainer.evaluate((x, y, w), batch_size=12)["loss"]
    per_sample = nn.functional.cross_entropy(trainer.model(x), y, reduction="none")
    assert logged == pytest.approx((per_sample * w).mean().item(), rel=1e-6)
    # in fit: the same weights given as sample_weight= or inside (x, y, w) batches train identically
    runs = []
    for data, kwargs in ((x, y), {"sample_weight": w}), ((DataLoader(TensorDataset(x, y, w), batch_size=4),), {}):
        torch.manual_seed(0)
        model = TinyNet()
        trainer = make_trainer(model)
        trainer.fit(data[0] if len(data) == 1 else data, batch_size=4 if kwargs else None, shuffle=False, **kwargs)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_class_weight_weighs_each_sample_by_its_class_in_training_only():
    x, y = make_classification(12)
    weights = {0: 1.0, 1: 5.0, 2: 0.5}
    per_sample = torch.tensor([weights[int(c)] for c in y])
    runs = []
    for kwargs in ({"class_weight": weights}, {"sample_weight": per_sample}):
        torch.manual_seed(0)
        model = TinyNet()
        history = make_trainer(model).fit((x, y), (x, y), batch_size=4, shuffle=False, **kwargs)
        runs.append(([p.detach().clone() for p in model.parameters()], history.history))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert runs[0][1]["val_loss"] == runs[1][1]["val_loss"]  # validation unweighted in both


def test_sample_weights_need_a_loss_with_per_sample_values():
    trainer = make_trainer(loss=lambda outputs, targets: nn.functional.cross_entropy(outputs, targets))
    x, y = make_classification(8)
    with pytest.raises(TypeError, match=r"sample weights need a loss that can return per-sample values, and "
                       r"function has no reduction= argument"):  # fmt: skip
        trainer.fit((x, y), sample_weight=torch.ones(8), batch_size=4)


@pytest.mark.parametrize(
    "class_weight, match",
    [({}, r"class_weight must be a non-empty dict"), ({-1: 2.0}, r"class_weight keys must be class indices"),
     ({0: float("nan")}, r"class_weight\[0\] must be a finite number >= 0, got nan")],
)  # fmt: skip
def test_bad_class_weights_are_refused(class_weight, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make_trainer().fit(make_classification(8), batch_size=4, class_weight=class_weight)


def test_a_class_weight_past_the_models_classes_is_an_error_before_any_step():
    trainer = make_trainer()  # TinyNet: 3 classes
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^class_weight lists class 3, but the model's outputs \(4, 3\) have 3 "):
        trainer.fit(make_classification(8), batch_size=4, class_weight={1: 2.0, 3: 5.0})  # 1-based by mistake
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.fit(make_classification(8), batch_size=4, class_weight={0: 2.0, 2: 5.0})  # every key a class: trains
    assert trainer.global_step == 2


def test_sum_reduced_losses_are_warned_about_when_built():
    with pytest.warns(UserWarning, match=r"CrossEntropyLoss\(reduction='sum'\) returns a per-batch sum: the logged "
                      r"loss .* is then batch-size times a per-sample value. Use reduction='mean'"):  # fmt: skip
        make_trainer(loss=nn.CrossEntropyLoss(reduction="sum"))


# -- outputs: picking one for a metric, and what callbacks see --------------------------------------------
class TwoHeads(TinyNet):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        return logits, logits.softmax(dim=1)


def test_a_metric_picks_one_output_of_a_tuple():
    class Trainer(fitkit.Trainer):
        def compute_loss(self, inputs, targets, outputs, sample_weight=None):
            return nn.functional.cross_entropy(outputs[0], targets)

    torch.manual_seed(0)
    trainer = Trainer(TwoHeads(), "sgd", None, metrics=[Accuracy(output=0)], device="cpu", verbose=0)
    history = trainer.fit(make_classification(16), make_classification(16), batch_size=4)
    assert 0.0 <= history.history["val_accuracy"][0] <= 1.0
    plain = Trainer(TwoHeads(), "sgd", None, metrics=["accuracy"], device="cpu", verbose=0)
    with pytest.raises(TypeError, match=r"accuracy: the model returns a tuple of 2, not one tensor; pick the "
                       r"output this metric reads with output="):  # fmt: skip
        plain.fit(make_classification(8), batch_size=4)


def test_callbacks_see_the_batch_and_the_outputs_of_the_step():
    seen = []

    class Probe(Callback):
        def on_batch_end(self, batch, logs=None):
            seen.append(("train", self.trainer.batch, self.trainer.outputs))

        def on_validation_batch_end(self, batch, logs=None):
            seen.append(("val", self.trainer.batch, self.trainer.outputs))

    x, y = make_classification(8)
    trainer = make_trainer(callbacks=[Probe()])
    trainer.fit((x, y), (x, y), batch_size=4)
    assert [phase for phase, _, _ in seen] == ["train", "train", "val", "val"]
    for _, batch, outputs in seen:
        assert isinstance(batch, tuple) and batch[0].shape == (4, 4)
        assert outputs.shape == (4, 3)
    val_batch, val_outputs = seen[2][1], seen[2][2]
    with torch.no_grad():
        assert torch.equal(trainer.model.eval()(val_batch[0]), val_outputs)  # the step's own outputs, no copy


# -- custom steps' logs -------------------------------------------------------------------------------------
def test_a_custom_step_may_log_any_scalars_and_none_is_called_loss(tmp_path, capsys):
    checkpoint = ModelCheckpoint(tmp_path / "{epoch}-{g_loss:.3f}.pt", monitor="g_loss", mode="min", save_top_k=1)
    trainer = gan_trainer(callbacks=[checkpoint], verbose=2)  # the progress line and a monitor on g_loss
    history = trainer.fit((gan_data(16),), batch_size=8, epochs=2)
    assert "loss" not in history.history and {"d_loss", "g_loss"} <= set(history.history)
    assert "g_loss" in capsys.readouterr().err
    assert len(list(tmp_path.glob("*.pt"))) == 1


def test_a_non_scalar_value_in_a_step_s_logs_names_the_key():
    class Wrong(fitkit.Trainer):
        def train_step(self, batch):
            logs = super().train_step(batch)
            return {**logs, "per_sample": torch.zeros(4)}

    trainer = Wrong(TinyNet(), "sgd", "cross_entropy", device="cpu", verbose=0)
    with pytest.raises(ValueError, match=r"train_step returned 'per_sample' with shape \(4,\); every logged value "
                       r"must be a 0-dim tensor"):  # fmt: skip
        trainer.fit(make_classification(8), batch_size=4)


# -- Trainer-subclass hooks and state ---------------------------------------------------------------------
class Stateful(fitkit.Trainer):
    """Carries a running value across batches, reset in its own hooks, saved through super()."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.carried = torch.zeros(())
        self.events: list[str] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append("trainer epoch_begin")
        self.carried = torch.zeros(())

    def on_validation_begin(self, logs=None):
        self.events.append("trainer validation_begin")

    def train_step(self, batch):
        logs = super().train_step(batch)
        self.carried = self.carried + logs["loss"]
        return logs

    def state_dict(self):
        return {**super().state_dict(), "carried": self.carried.clone()}

    def load_state_dict(self, state, strict=True):
        self.carried = state["carried"].clone()
        super().load_state_dict(state, strict=strict)


def test_trainer_subclass_hooks_run_before_callbacks_in_fit_and_evaluate():
    class Record(Callback):
        def __init__(self, events):
            self.events = events

        def on_epoch_begin(self, epoch, logs=None):
            self.events.append("callback epoch_begin")

        def on_validation_begin(self, logs=None):
            self.events.append("callback validation_begin")

    trainer = Stateful(TinyNet(), "sgd", "cross_entropy", device="cpu", verbose=0)
    trainer.callbacks.append(Record(trainer.events))
    trainer.fit(make_classification(8), make_classification(8), batch_size=4)
    assert trainer.events == [
        "trainer epoch_begin", "callback epoch_begin", "trainer validation_begin", "callback validation_begin",
    ]  # fmt: skip
    trainer.events.clear()
    trainer.evaluate(make_classification(8))  # the subclass's own hooks never miss evaluate()
    assert trainer.events == ["trainer validation_begin"]


def test_a_misspelled_hook_on_a_trainer_subclass_is_an_error():
    class Typo(fitkit.Trainer):
        def on_epoch_ned(self, epoch, logs=None):
            pass

    with pytest.raises(TypeError, match=r"Typo.on_epoch_ned is not a fitkit callback hook .* did you mean "
                       r"'on_epoch_end'\?"):  # fmt: skip
        Typo(TinyNet(), "sgd", "cross_entropy", device="cpu", verbose=0)  # when built, before any data


def test_subclass_state_is_checkpointed_and_restored(tmp_path):
    trainer = Stateful(TinyNet(), "sgd", "cross_entropy", device="cpu", verbose=0)
    trainer.fit(make_classification(8), batch_size=4)
    trainer.save_checkpoint(tmp_path / "state.pt")
    restored = Stateful(TinyNet(), "sgd", "cross_entropy", device="cpu", verbose=0)
    restored.load_checkpoint(tmp_path / "state.pt")
    assert torch.equal(restored.carried, trainer.carried) and restored.carried.item() > 0


# -- a learnable loss ----------------------------------------------------------------------------------------
class LearnedScale(nn.Module):
    """A loss with a parameter (uncertainty weighting): its optimizer holds it, fitkit saves it."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets) * self.log_scale.exp() + self.log_scale


def test_a_loss_module_with_parameters_is_trained_and_checkpointed(tmp_path):
    model, loss = TinyNet(), LearnedScale()
    optimizer = torch.optim.SGD([*model.parameters(), *loss.parameters()], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = fitkit.Trainer(model, optimizer, loss, device="cpu", verbose=0)
    trainer.fit(make_classification(8), batch_size=4, epochs=2)
    assert loss.log_scale.item() != 0.0
    trainer.save_checkpoint(tmp_path / "c.pt")
    other_loss = LearnedScale()
    other_model = TinyNet()
    other = fitkit.Trainer(
        other_model, torch.optim.SGD([*other_model.parameters(), *other_loss.parameters()], lr=0.1), other_loss,
        device="cpu", verbose=0,
    )  # fmt: skip
    other.load_checkpoint(tmp_path / "c.pt")
    assert other_loss.log_scale.item() == loss.log_scale.item()


def test_a_trainer_subclass_may_use_keras_3_hook_names():
    seen = []

    class KerasNamed(fitkit.Trainer):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    trainer = KerasNamed(TinyNet(), "sgd", "cross_entropy", device="cpu", verbose=0)
    trainer.fit(make_classification(8), batch_size=4)
    assert seen == [0, 1]

    class Both(fitkit.Trainer):
        def on_batch_end(self, batch, logs=None):
            pass

        def on_train_batch_end(self, batch, logs=None):
            pass

    with pytest.raises(TypeError, match=r"Both defines both on_batch_end and on_train_batch_end: one event"):
        Both(TinyNet(), "sgd", "cross_entropy", device="cpu", verbose=0)


# -- weighted metrics (Keras's weighted_metrics) --------------------------------------------------------------
def test_weighted_metrics_are_the_weighted_mean_and_metrics_stay_unweighted():
    x, y = make_classification(12)
    w = torch.linspace(0.0, 2.0, 12)
    trainer = make_trainer(metrics=["accuracy"], weighted_metrics=[Accuracy(name="weighted_accuracy")])
    logs = trainer.evaluate((x, y, w), batch_size=5)  # three batches, the last shorter
    correct = (trainer.model(x).argmax(dim=1) == y).double()
    assert logs["accuracy"] == pytest.approx(correct.mean().item(), rel=1e-12)
    w64 = w.double()  # the metric sums in float64
    assert logs["weighted_accuracy"] == pytest.approx(((correct * w64).sum() / w64.sum()).item(), rel=1e-12)
    unweighted = trainer.evaluate((x, y), batch_size=5)  # no weights: as plain as the unweighted metric
    assert unweighted["weighted_accuracy"] == pytest.approx(unweighted["accuracy"], rel=1e-12)


def test_class_weights_reach_the_weighted_metrics_in_training():
    x, y = make_classification(12)
    weights = {0: 1.0, 1: 5.0, 2: 0.5}
    trainer = make_trainer(lr=0.0, weighted_metrics=[Accuracy(name="weighted_accuracy")], metrics=["accuracy"])
    logs = trainer.fit((x, y), batch_size=12, class_weight=weights).history
    w = torch.tensor([weights[int(c)] for c in y], dtype=torch.float64)
    correct = (trainer.model(x).argmax(dim=1) == y).double()  # lr=0: the weights never moved
    assert logs["weighted_accuracy"] == [pytest.approx(((correct * w).sum() / w.sum()).item(), rel=1e-12)]
    assert logs["accuracy"] == [pytest.approx(correct.mean().item(), rel=1e-12)]


def test_a_metric_without_per_sample_values_cannot_be_weighted():
    trainer = make_trainer(weighted_metrics=[lambda outputs, targets: outputs.mean()])
    x, y = make_classification(8)
    with pytest.raises(TypeError, match=r"metric '<lambda>' \(_FunctionMetric\) gives only a batch total, not "
                       r"per-sample values, so it cannot be a weighted metric; pass it in metrics= instead"):  # fmt: skip
        trainer.evaluate((x, y, torch.ones(8)))
    with pytest.raises(ValueError, match=r"metric names must be unique"):
        make_trainer(metrics=["accuracy"], weighted_metrics=["accuracy"])


def test_weights_given_to_a_compute_loss_without_a_weight_parameter_are_refused_before_training():
    class NoWeights(fitkit.Trainer):
        def compute_loss(self, inputs, targets, outputs):  # written before weights were used
            return nn.functional.cross_entropy(outputs, targets)

    x, y = make_classification(n=16)
    model = TinyNet()
    trainer = NoWeights(model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", verbose=0, device="cpu")
    with pytest.raises(
        TypeError,
        match=r"fit\(sample_weight=\.\.\.\) gives weights, and NoWeights\.compute_loss\(\) takes no sample_weight",
    ):
        trainer.fit((x, y), epochs=1, batch_size=8, sample_weight=torch.ones(16))
    assert trainer.global_step == 0
