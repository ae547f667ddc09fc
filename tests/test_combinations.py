"""Features that meet (issue 19, "Silently wrong numbers"): each test pins one place where two features
used together gave a silently wrong number, against an invariant (validation is recomputed when due,
``last.pt`` is the newest state, a resume is exact)."""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_classification
from resume_utils import assert_same_state, build, final_state

import fitkit
from fitkit import Callback, checkpoint
from fitkit.callbacks import EMA, ModelCheckpoint


class StepsItsOwnOptimizer(fitkit.Trainer):
    """The docs' early custom-step pattern: ``self.optimizer.step()`` directly, never ``optimizer_step``."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = self.loss(self.forward(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}


class CountValidations(Callback):
    def __init__(self) -> None:
        self.begins = 0
        self.ends: list[float] = []

    def on_validation_begin(self, logs: Any = None) -> None:
        self.begins += 1

    def on_validation_end(self, logs: Any = None) -> None:
        self.ends.append(logs["val_loss"])


@pytest.mark.filterwarnings("ignore:this Trainer.s train_step calls optimizer.step")
def test_custom_step_that_steps_its_optimizer_itself_gets_every_epoch_validated() -> None:
    x, y = make_classification(48)
    model = torch.nn.Linear(4, 3)
    counter = CountValidations()
    trainer = StepsItsOwnOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.5), "cross_entropy", callbacks=[counter], verbose=0,
        device="cpu",
    )  # fmt: skip
    history = trainer.fit((x, y), (x, y), epochs=4, batch_size=16)
    assert counter.begins == 4 and len(counter.ends) == 4  # every epoch's validation ran
    assert history.history["val_loss"] == counter.ends  # the logs are each epoch's own
    assert len(set(history.history["val_loss"])) == 4  # training changed the weights: no stale number
    expected = trainer.evaluate((x, y), batch_size=16)["loss"]
    assert abs(history.history["val_loss"][-1] - expected) < 1e-6


class Scores(Callback):
    """Puts scripted values into the epoch logs (before ModelCheckpoint in the list)."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs["score"] = self.values[epoch]


@pytest.mark.parametrize(
    ("option", "kept"), [({"save_top_k": 1}, ["e4.pt"]), ({"save_best_only": True}, ["e1.pt", "e4.pt"])]
)
def test_save_last_is_the_newest_state_also_when_the_epoch_is_not_kept(
    tmp_path: Path, option: Any, kept: list[str]
) -> None:
    """Lightning's save_last: last.pt at every save point, whether or not the epoch enters the top k."""
    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor="score", mode="min", save_last=True, **option)
    trainer, train, val = build(callbacks=[Scores([1.0, 2.0, 3.0, 0.5, 4.0]), ckpt])
    trainer.fit(train, val, epochs=5)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [*kept, "last.pt"]
    last = checkpoint.load(tmp_path / "last.pt")
    assert last["trainer"]["epoch"] == 5 and last["trainer"]["global_step"] == trainer.global_step
    assert torch.equal(last["model"]["0.weight"], trainer.model.state_dict()["0.weight"])


def _binary_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    return x, (x[:, 0] > 0).float().unsqueeze(1)


def _perfect_sigmoid_model() -> torch.nn.Module:
    """Sigmoid(20 * x0): a perfect classifier of _binary_data, its outputs probabilities."""
    linear = torch.nn.Linear(2, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[20.0, 0.0]]))
        linear.bias.zero_()
    return torch.nn.Sequential(linear, torch.nn.Sigmoid())


def test_accuracy_of_a_sigmoid_bce_model_thresholds_its_probabilities_at_one_half() -> None:
    x, y = _binary_data()
    model = _perfect_sigmoid_model()
    trainer = fitkit.Trainer(model, "sgd", torch.nn.BCELoss(), metrics=["accuracy"], verbose=0, device="cpu")
    assert trainer.evaluate((x, y), batch_size=16)["accuracy"] == 1.0
    # The same model's logits with BCEWithLogitsLoss: thresholded at 0, also perfect.
    logits = model[0]
    trainer = fitkit.Trainer(logits, "sgd", "bce_with_logits", metrics=["accuracy"], verbose=0, device="cpu")
    assert trainer.evaluate((x, y), batch_size=16)["accuracy"] == 1.0
    # A custom loss: the model's final Sigmoid says its outputs are probabilities.
    trainer = fitkit.Trainer(
        model, "sgd", torch.nn.functional.binary_cross_entropy, metrics=["accuracy"], verbose=0, device="cpu"
    )
    assert trainer.evaluate((x, y), batch_size=16)["accuracy"] == 1.0


def test_an_explicit_threshold_is_kept() -> None:
    metric = fitkit.metrics.Accuracy(threshold=0.9)
    fitkit.Trainer(_perfect_sigmoid_model(), "sgd", torch.nn.BCELoss(), metrics=[metric], verbose=0, device="cpu")
    assert metric.threshold == 0.9


def test_accuracy_with_a_regression_loss_is_refused_with_the_fix() -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"accuracy.*MSELoss.*regression.*metrics=\[mae\]"):
        fitkit.Trainer(model, "sgd", "mse", metrics=["accuracy"], verbose=0, device="cpu")
    # Said explicitly (0/1 targets fitted by least squares), it is the user's choice.
    fitkit.Trainer(model, "sgd", "mse", metrics=[fitkit.metrics.Accuracy(threshold=0.5)], verbose=0, device="cpu")


def test_keras_crossentropy_names_on_a_softmax_model_are_refused_with_the_fix() -> None:
    """Keras's "sparse_categorical_crossentropy" takes probabilities; fitkit's (torch's) takes logits."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1))
    for name in ("sparse_categorical_crossentropy", "categorical_crossentropy", "cross_entropy"):
        with pytest.raises(ValueError, match=r"ends in Softmax.*logits.*remove the final Softmax"):
            fitkit.Trainer(model, "sgd", name, verbose=0, device="cpu")


def test_cross_entropy_on_probabilities_from_forward_is_refused_at_the_first_batch() -> None:
    class SoftmaxInForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.fc(x), dim=1)

    x, y = make_classification(32)
    trainer = fitkit.Trainer(SoftmaxInForward(), "sgd", "sparse_categorical_crossentropy", verbose=0, device="cpu")
    with pytest.raises(ValueError, match=r"probabilities.*each row sums to 1.*logits"):
        trainer.fit((x, y), epochs=1, batch_size=16)


def test_a_custom_step_that_steps_its_optimizer_itself_is_named_once() -> None:
    x, y = make_classification(48)
    model = torch.nn.Linear(4, 3)
    trainer = StepsItsOwnOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", verbose=0)
    with pytest.warns(UserWarning, match=r"optimizer.step\(\) itself.*global_step.*self.optimizer_step\(\)") as seen:
        trainer.fit((x, y), epochs=2, batch_size=16)
    assert len([w for w in seen if "optimizer.step() itself" in str(w.message)]) == 1


@pytest.mark.parametrize("option", [{"max_steps": 4}, {"validate_every_n_steps": 2}])
def test_step_counting_features_refuse_a_step_that_is_not_counted(option: dict[str, int]) -> None:
    x, y = make_classification(48)
    model = torch.nn.Linear(4, 3)
    trainer = StepsItsOwnOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", verbose=0)
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"{name}.*counts optimizer steps.*self.optimizer_step\(\)"):
        trainer.fit((x, y), (x, y), epochs=2, batch_size=16, **option)
    assert trainer.global_step == 0


class SigtermInValidation(Callback):
    """SIGTERM to this process during the given epoch's validation."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_validation_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.trainer.state.epoch == self.epoch and batch == 0 and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("order", ["checkpoint_first", "ema_first"])
def test_sigterm_during_ema_validation_saves_the_trained_weights_and_resumes_exactly(
    tmp_path: Path, order: str
) -> None:
    def callbacks(folder: Path) -> list[Any]:
        ckpt = ModelCheckpoint(folder / "e{epoch}.pt", monitor=None, save_last=True)
        ema = EMA(decay=0.5)
        return [ckpt, ema] if order == "checkpoint_first" else [ema, ckpt]

    reference, train, val = build(callbacks=callbacks(tmp_path / "a"))
    reference.fit(train, val, epochs=3)
    trainer, train, val = build(callbacks=[*callbacks(tmp_path / "b"), SigtermInValidation(1)])
    with pytest.raises((fitkit.TrainingInterrupted, SystemExit)):
        trainer.fit(train, val, epochs=3)
    saved = checkpoint.load(tmp_path / "b" / "last.pt")
    # The trained weights, not the averages: in the file when EMA's on_exception ran first, else in EMA's state
    # (ModelCheckpoint wrote during the swap), which puts them back into the model on load.
    trained = saved["model"] if order == "ema_first" else None
    if trained is None:
        names = [name for name, _ in trainer.model.named_parameters()]  # the model has no buffers
        trained = dict(zip(names, saved["callbacks"]["EMA"]["trained"]))
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(trained[key], value), key
    resumed, train, val = build(callbacks=callbacks(tmp_path / "b"))
    resumed.fit(train, val, epochs=3, resume="auto")
    assert_same_state(final_state(resumed), final_state(reference))


class TwoLosses(fitkit.Trainer):
    """The docs' GAN shape: a step that logs d_loss and g_loss, no "loss"."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        with self.autocast():
            loss = self.compute_loss(x, y, self.forward(x))
        self.backward(loss)
        self.optimizer_step()
        return {"d_loss": loss.detach(), "g_loss": 2 * loss.detach()}


def _two_losses() -> TwoLosses:
    model = torch.nn.Linear(4, 3)
    return TwoLosses(model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", verbose=0, device="cpu")


def test_lr_find_without_a_loss_key_names_the_keys_and_follows_the_one_named() -> None:
    x, y = make_classification(64)
    trainer = _two_losses()
    with pytest.raises(ValueError, match=r"lr_find.*no 'loss'.*\['d_loss', 'g_loss'\].*monitor='d_loss'"):
        trainer.lr_find((x, y), num_steps=5, batch_size=8)
    result = trainer.lr_find((x, y), num_steps=5, batch_size=8, monitor="g_loss")
    assert len(result.lrs) == 5 and result.suggestion is not None


def test_terminate_on_nan_without_a_loss_key_checks_every_logged_value() -> None:
    class NaNLater(TwoLosses):
        def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
            logs = super().train_step(batch)
            if self.global_step == 3:
                logs["g_loss"] = torch.tensor(float("nan"))
            return logs

    x, y = make_classification(64)
    model = torch.nn.Linear(4, 3)
    trainer = NaNLater(
        model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", verbose=0, device="cpu",
        callbacks=[fitkit.callbacks.TerminateOnNaN()],
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="g_loss is nan"):
        trainer.fit((x, y), epochs=2, batch_size=8)
    assert trainer.global_step == 3 and "g_loss" in (trainer.state.stop_reason or "")


def test_a_pruned_optuna_trial_leaves_no_backup_for_the_next_trial(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    from helpers import make_trainer

    from fitkit.callbacks import BackupAndRestore, OptunaPruning

    class PruneAtEpoch2(optuna.pruners.BasePruner):
        def prune(self, study: Any, trial: Any) -> bool:
            return trial.last_step is not None and trial.last_step >= 1  # after the second epoch

    x, y = make_classification(48)
    study = optuna.create_study(pruner=PruneAtEpoch2())
    trial = study.ask()
    backup = BackupAndRestore(tmp_path / "backup")
    trainer = make_trainer(callbacks=[backup, OptunaPruning(trial)])
    with pytest.raises(optuna.TrialPruned):
        trainer.fit((x, y), (x, y), epochs=3, batch_size=16)
    assert not backup.path.exists()  # a pruned trial is over: the next trial starts fresh, not from this one
    nxt = make_trainer(callbacks=[BackupAndRestore(tmp_path / "backup")])
    nxt.fit((x, y), (x, y), epochs=1, batch_size=16)
    assert nxt.resumed_from is None


class ReturnsItsLoss(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.fc(x)
        return {"logits": logits, "loss": logits.pow(2).mean()}


def test_weights_given_with_a_model_that_returns_its_loss_are_refused() -> None:
    x, y = make_classification(32)
    model = ReturnsItsLoss()
    trainer = fitkit.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, verbose=0, device="cpu")
    with pytest.raises(ValueError, match=r"loss=None.*cannot weight.*class_weight would be silently ignored"):
        trainer.fit((x, y), epochs=1, batch_size=8, class_weight={0: 2.0})
    with pytest.raises(ValueError, match=r"loss=None.*cannot weight.*sample_weight would be silently ignored"):
        trainer.fit((x, y), epochs=1, batch_size=8, sample_weight=torch.ones(32))
    batches = [(x[i : i + 8], y[i : i + 8], torch.ones(8)) for i in range(0, 32, 8)]  # weights in the batches
    with pytest.raises(ValueError, match=r"loss=None.*cannot weight.*sample_weight would be silently ignored"):
        trainer.fit(batches, epochs=1)
    assert trainer.global_step == 0


def test_class_weight_with_a_regression_loss_is_refused() -> None:
    x = torch.randn(32, 4)
    y = torch.randn(32, 1)
    trainer = fitkit.Trainer(torch.nn.Linear(4, 1), "sgd", "mse", verbose=0, device="cpu")
    with pytest.raises(ValueError, match=r"class_weight.*MSELoss.*no classes.*sample_weight"):
        trainer.fit((x, y), epochs=1, batch_size=8, class_weight={0: 1.0, 1: 2.0})


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (-torch.ones(32), r"sample_weight.*>= 0.*-1"),
        (torch.full((32,), float("nan")), r"sample_weight.*finite"),
        (torch.zeros(32), r"sample_weight is 0 for every sample"),
        (torch.ones(32, 2), r"one weight per sample, shape \(32,\), got \(32, 2\)"),
        (torch.ones(31), r"x and sample_weight must have the same number of samples, got 32 and 31"),
    ],
    ids=["negative", "nan", "all_zero", "two_columns", "too_short"],
)
def test_bad_sample_weights_are_refused_before_training(weights: torch.Tensor, message: str) -> None:
    x, y = make_classification(32)
    trainer = fitkit.Trainer(torch.nn.Linear(4, 3), "sgd", "cross_entropy", verbose=0, device="cpu")
    with pytest.raises(ValueError, match=message):
        trainer.fit((x, y), epochs=1, batch_size=8, sample_weight=weights)
    assert trainer.global_step == 0


def test_a_named_validation_set_and_a_metric_that_make_the_same_key_are_refused() -> None:
    x, y = make_classification(32)
    metric = fitkit.metrics.Accuracy(name="b_loss")
    trainer = fitkit.Trainer(torch.nn.Linear(4, 3), "sgd", "cross_entropy", metrics=[metric], verbose=0, device="cpu")
    with pytest.raises(
        ValueError,
        match=r"'val_a_b_loss': the metric 'b_loss' of the validation set 'a' and the loss of the validation set 'a_b'",
    ):
        trainer.fit((x, y), {"a": (x, y), "a_b": (x, y)}, epochs=1, batch_size=8)
    assert trainer.global_step == 0


@pytest.mark.parametrize("uses_autocast", [False, True])
def test_bf16_in_a_custom_step_without_autocast_is_named_once(uses_autocast: bool) -> None:
    class Step(fitkit.Trainer):
        def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
            x, y = batch
            with self.autocast() if uses_autocast else contextlib.nullcontext():
                loss = self.compute_loss(x, y, self.forward(x))
            self.backward(loss)
            self.optimizer_step()
            return {"loss": loss.detach()}

    x, y = make_classification(48)
    model = torch.nn.Linear(4, 3)
    trainer = Step(model, "sgd", "cross_entropy", precision="bf16", verbose=0, device="cpu")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit((x, y), epochs=2, batch_size=16)
    named = [w for w in seen if "precision='bf16' is off" in str(w.message)]
    assert len(named) == (0 if uses_autocast else 1)
    assert not named or "self.autocast()" in str(named[0].message)


def test_replacing_the_optimizer_after_build_runs_the_build_checks() -> None:
    model = torch.nn.Linear(4, 3)
    trainer = fitkit.Trainer(model, "sgd", "cross_entropy", verbose=0, device="cpu", accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"LBFGS.*accumulate_grad_batches"):
        trainer.optimizer = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match=r"parameters"):
        trainer.optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    # From LBFGS to SGD: the default step no longer steps through a closure.
    x, y = make_classification(32)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    trainer = fitkit.Trainer(model, torch.optim.LBFGS(model.parameters()), "cross_entropy", verbose=0, device="cpu")
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer.fit((x, y), epochs=1, batch_size=8, shuffle=False)
    torch.manual_seed(0)
    fresh = torch.nn.Linear(4, 3)
    expected = fitkit.Trainer(
        fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), "cross_entropy", verbose=0, device="cpu"
    )
    expected.fit((x, y), epochs=1, batch_size=8, shuffle=False)
    assert torch.equal(model.weight, fresh.weight)


def test_a_closure_optimizer_among_several_is_refused_with_the_default_step() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    optimizers = {
        "first": torch.optim.LBFGS(model[0].parameters()),
        "second": torch.optim.SGD(model[1].parameters(), lr=0.1),
    }
    trainer = fitkit.Trainer(model, optimizers, "cross_entropy", verbose=0, device="cpu")
    x, y = make_classification(32)
    with pytest.raises(ValueError, match=r"LBFGS.*closure.*'second' would never step.*train_step"):
        trainer.fit((x, y), epochs=1, batch_size=8)


def _docs_namespace(page: str, until: str) -> dict[str, Any]:
    """The namespace of a docs page's blocks, run in order up to the one holding ``until``."""
    from markdown_blocks import ROOT, compile_block, python_blocks

    namespace: dict[str, Any] = {"__name__": "docs_page"}
    for block in python_blocks(ROOT / "docs" / page):
        if block.runs:
            exec(compile_block(block), namespace)  # the documentation's own code
        if until in block.code:
            return namespace
    raise AssertionError(f"{page} has no block with {until!r}")


def test_the_documented_stateful_rnn_trains_the_same_with_validation_every_step() -> None:
    docs = _docs_namespace("customizing-fit.md", "class StatefulTrainer")
    weights = []
    for every in (None, 1):
        torch.manual_seed(0)
        trainer = docs["StatefulTrainer"](docs["LSTMModel"](), "adam", loss=None, verbose=0, device="cpu")
        trainer.fit(docs["windows"], docs["windows"], epochs=2, validate_every_n_steps=every)
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))  # a validation never changes training


class TwoBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))))


def test_an_optimizer_over_the_same_parameters_in_another_order_is_refused_on_resume(tmp_path: Path) -> None:
    x, y = make_classification(32)
    model = TwoBlocks()
    trainer = fitkit.Trainer(model, torch.optim.Adam(model.parameters()), "cross_entropy", verbose=0, device="cpu")
    trainer.fit((x, y), epochs=1, batch_size=8)
    trainer.save_checkpoint(tmp_path / "run.pt")
    again = TwoBlocks()  # the script now registers its blocks with the optimizer in the other order
    params = [*again.b.parameters(), *again.a.parameters(), *again.head.parameters()]
    swapped = fitkit.Trainer(again, torch.optim.Adam(params), "cross_entropy", verbose=0, device="cpu")
    with pytest.raises(checkpoint.CheckpointError, match=r"parameter order of optimizer.*'a.weight'.*'b.weight'"):
        swapped.fit((x, y), epochs=2, batch_size=8, resume=str(tmp_path / "run.pt"))
    same = TwoBlocks()
    ok = fitkit.Trainer(same, torch.optim.Adam(same.parameters()), "cross_entropy", verbose=0, device="cpu")
    ok.fit((x, y), epochs=2, batch_size=8, resume=str(tmp_path / "run.pt"))


class SummedLoss(fitkit.Trainer):
    """A VAE-style step: its loss is a batch sum (Adam's training depends on that scale)."""

    def compute_loss(self, inputs: Any, targets: Any, outputs: Any, sample_weight: Any = None) -> torch.Tensor:
        return torch.nn.functional.mse_loss(outputs, targets, reduction="sum")


class SummedLossDeclared(SummedLoss):
    batch_sum_logs = ("loss",)


def test_a_batch_sum_loss_is_logged_per_sample_with_the_same_training() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randn(40, 2, generator=g)
    runs = []
    for cls in (SummedLoss, SummedLossDeclared):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        trainer = cls(model, "adam", "mse", verbose=0, device="cpu")
        history = trainer.fit((x, y), (x, y), epochs=2, batch_size=8, shuffle=False)
        runs.append((model, history, trainer))
    (plain, _, _), (declared, history, trainer) = runs
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), declared.parameters()))  # gradients unchanged
    with torch.no_grad():
        per_sample = float(((declared(x) - y) ** 2).sum() / len(x))
    assert history.history["val_loss"][-1] == pytest.approx(per_sample, rel=1e-5)
    assert trainer.evaluate((x, y), batch_size=8)["loss"] == pytest.approx(per_sample, rel=1e-5)


class LearnableTemperature(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = torch.nn.Parameter(torch.ones(()))

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs * self.t, targets)


def test_lr_find_leaves_a_learnable_loss_as_found_pending_gradients_included() -> None:
    x, y = make_classification(64)
    weights = []
    for find in (False, True):
        fitkit.seed_everything(0)
        model, loss = torch.nn.Linear(4, 3), LearnableTemperature()
        optimizer = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=0.01)
        trainer = fitkit.Trainer(model, optimizer, loss, verbose=0, device="cpu", accumulate_grad_batches=2)
        trainer.fit((x, y), epochs=1, batch_size=8, steps_per_epoch=3)
        loss.t.grad = torch.tensor(0.5)  # a gradient the loss holds when lr_find is called
        if find:
            trainer.lr_find((x, y), num_steps=5, batch_size=8)
            assert loss.t.grad is not None and float(loss.t.grad) == 0.5
        trainer.fit((x, y), epochs=2, batch_size=8)
        weights.append([p.detach().clone() for p in (*model.parameters(), *loss.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*weights))  # a fit after lr_find equals one without it
