"""The Trainer loop: hook order, modes, sample weighting, equivalence with a hand-written loop,
accumulation, clipping, bf16, stopping, evaluate/predict, inputs, errors, shortcuts, history, output and
host syncs. Every test is a seeded CPU run of a tiny model."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CountingDataset,
    RecordingCallback,
    TinyNet,
    make_classification,
    make_trainer,
    params_of,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fitkit import Callback, History, Trainer

TRAIN_BATCH = ["on_batch_begin", "on_before_backward", "on_before_optimizer_step", "on_batch_end"]


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 4, **kwargs) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, **kwargs)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# -- 1. hook order and logs --------------------------------------------------------------------------
def test_hook_order_of_a_fit_with_validation():
    x, y = make_classification(12)
    recorder = RecordingCallback()
    trainer = make_trainer(metrics=["accuracy"], callbacks=[recorder])
    trainer.fit(loader(x, y, 4), loader(x[:8], y[:8], 4), epochs=2)  # 3 train, 2 val batches

    epoch = [
        "on_epoch_begin",
        *TRAIN_BATCH * 3,
        "on_validation_begin",
        *["on_validation_batch_begin", "on_validation_batch_end"] * 2,
        "on_validation_end",
        "on_epoch_end",
    ]
    assert recorder.names() == ["on_train_begin", *epoch * 2, "on_train_end"]
    assert [c.args[0] for c in recorder.of("on_epoch_begin")] == [0, 1]
    assert [c.args[0] for c in recorder.of("on_batch_end")] == [0, 1, 2, 0, 1, 2]
    assert [c.args[0] for c in recorder.of("on_validation_batch_end")] == [0, 1, 0, 1]


def test_epoch_logs_are_floats_with_val_keys_and_batch_logs_are_0dim_tensors():
    x, y = make_classification(12)
    recorder = RecordingCallback()
    trainer = make_trainer(metrics=["accuracy"], callbacks=[recorder])
    trainer.fit(loader(x, y, 4), loader(x[:8], y[:8], 4), epochs=2)

    for call in recorder.of("on_epoch_end"):
        logs = call.args[1]
        assert set(logs) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
        assert all(type(v) is float for v in logs.values()), logs
    for name in ("on_batch_end", "on_validation_batch_end"):
        for call in recorder.of(name):
            loss = call.args[1]["loss"]
            assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad
    validation_logs = recorder.of("on_validation_end")[0].args[0]
    assert set(validation_logs) == {"val_loss", "val_accuracy", "step", "epoch"}  # as the epoch logs name them
    assert validation_logs["val_loss"] == recorder.of("on_epoch_end")[0].args[1]["val_loss"]
    assert (validation_logs["step"], validation_logs["epoch"]) == (3, 0)
    before_backward = recorder.of("on_before_backward")[0].args[0]
    assert before_backward.ndim == 0 and before_backward.requires_grad


def test_callbacks_run_in_list_order_and_share_the_logs_dict():
    order: list[str] = []

    class Writer(Callback):
        def on_batch_end(self, batch, logs=None):
            order.append("writer")
            logs["double_loss"] = logs["loss"] * 2

        def on_epoch_end(self, epoch, logs=None):
            order.append("writer")
            logs["note"] = 7.0

    class Reader(Callback):
        def __init__(self):
            self.seen = []

        def on_batch_end(self, batch, logs=None):
            order.append("reader")
            self.seen.append(logs["double_loss"] / logs["loss"])

        def on_epoch_end(self, epoch, logs=None):
            order.append("reader")
            self.seen.append(logs["note"])

    reader = Reader()
    x, y = make_classification(8)
    history = make_trainer(callbacks=[Writer(), reader]).fit((x, y), batch_size=4, epochs=1)
    assert order == ["writer", "reader"] * 3
    assert [float(v) for v in reader.seen] == [2.0, 2.0, 7.0]
    assert history.history["note"] == [7.0]  # History runs after the user's callbacks


# -- 2. modes and grad -------------------------------------------------------------------------------
def test_train_mode_in_batch_hooks_eval_and_no_grad_in_validation():
    x, y = make_classification(12)
    model = TinyNet(dropout=0.5)
    recorder = RecordingCallback()
    make_trainer(model, callbacks=[recorder]).fit(loader(x, y, 4), loader(x[:8], y[:8], 4), epochs=2)

    for name in ("on_batch_begin", "on_before_backward", "on_before_optimizer_step", "on_batch_end"):
        assert all(c.training and c.grad_enabled for c in recorder.of(name)), name
    for name in ("on_validation_begin", "on_validation_batch_begin", "on_validation_batch_end", "on_validation_end"):
        assert not any(c.training or c.grad_enabled for c in recorder.of(name)), name
    train, val = (True, True), (False, False)
    assert model.forward_calls == [train] * 3 + [val] * 2 + [train] * 3 + [val] * 2
    assert model.training


@pytest.mark.parametrize("method", ["evaluate", "predict"])
@pytest.mark.parametrize("start_in_train_mode", [True, False])
def test_evaluate_and_predict_restore_the_mode_they_found(method, start_in_train_mode):
    x, y = make_classification(8)
    model = TinyNet(dropout=0.5)
    trainer = make_trainer(model)
    model.train(start_in_train_mode)
    getattr(trainer, method)((x, y), batch_size=4)
    assert model.forward_calls == [(False, False)] * 2
    assert model.training is start_in_train_mode
    assert all(m.training is start_in_train_mode for m in model.modules())


# -- 3. sample-weighted logs ---------------------------------------------------------------------------
def test_training_logs_are_sample_weighted_over_an_uneven_last_batch():
    x, y = make_classification(10)
    torch.manual_seed(0)
    model = TinyNet()
    by_hand = copy.deepcopy(model)
    history = make_trainer(model, lr=0.5, metrics=["accuracy"]).fit((x, y), batch_size=4, shuffle=False, epochs=1)

    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.5)
    loss_sum, correct, batch_means = 0.0, 0, []
    for start in (0, 4, 8):  # batches of 4, 4, 2
        xb, yb = x[start : start + 4], y[start : start + 4]
        outputs = by_hand(xb)
        loss_sum += F.cross_entropy(outputs, yb, reduction="sum").item()
        batch_means.append(F.cross_entropy(outputs, yb).item())
        correct += int((outputs.argmax(dim=1) == yb).sum())
        optimizer.zero_grad()
        F.cross_entropy(outputs, yb).backward()
        optimizer.step()

    assert history.history["loss"] == [pytest.approx(loss_sum / 10, rel=1e-6)]
    assert history.history["loss"][0] != pytest.approx(sum(batch_means) / 3, rel=1e-6)  # not a mean of means
    assert history.history["accuracy"] == [pytest.approx(correct / 10)]
    for p, q in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("as_loader", [False, True])
def test_evaluate_is_sample_weighted_over_an_uneven_last_batch(as_loader):
    x, y = make_classification(10, seed=3)
    torch.manual_seed(1)
    model = TinyNet()
    trainer = make_trainer(model, metrics=["accuracy"])
    results = trainer.evaluate(loader(x, y, 4)) if as_loader else trainer.evaluate((x, y), batch_size=4)

    with torch.no_grad():
        outputs = model(x)
        expected_loss = F.cross_entropy(outputs, y, reduction="sum").item() / 10
        expected_accuracy = (outputs.argmax(dim=1) == y).sum().item() / 10
    assert results == {"loss": pytest.approx(expected_loss, rel=1e-6), "accuracy": pytest.approx(expected_accuracy)}
    assert all(type(v) is float for v in results.values())


# -- 4. no hidden magic ----------------------------------------------------------------------------------
def tutorial_loop(model, optimizer, train_loader, val_loader, epochs):
    """The hand-written loop of the PyTorch tutorials, with sample-weighted epoch means."""
    loss_fn = nn.CrossEntropyLoss()
    train_losses, val_losses = [], []
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
        train_losses.append(total / count)
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in val_loader:
                total, count = total + loss_fn(model(x), y).item() * len(y), count + len(y)
        val_losses.append(total / count)
    return train_losses, val_losses


def test_fit_reproduces_the_hand_written_loop_bit_for_bit():
    x, y = make_classification(22)
    runs = []
    for use_fitkit in (False, True):
        torch.manual_seed(0)
        model = TinyNet(dropout=0.5)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        train_loader, val_loader = loader(x[:16], y[:16], 5, shuffle=True), loader(x[16:], y[16:], 4)
        if use_fitkit:
            history = make_trainer(model, optimizer=optimizer).fit(train_loader, val_loader, epochs=3)
            losses = history.history["loss"], history.history["val_loss"]
        else:
            losses = tutorial_loop(model, optimizer, train_loader, val_loader, epochs=3)
        runs.append((model, losses))
    (hand_model, (hand_train, hand_val)), (fit_model, (fit_train, fit_val)) = runs
    assert fit_train == pytest.approx(hand_train, rel=1e-12, abs=0)
    assert fit_val == pytest.approx(hand_val, rel=1e-12, abs=0)
    assert_same_weights(fit_model, hand_model)


def fit_seeded(train_data, epochs=2, seed=0, **fit_kwargs):
    torch.manual_seed(seed)
    model = TinyNet(dropout=0.5)
    history = make_trainer(model, lr=0.2).fit(train_data, epochs=epochs, **fit_kwargs)
    return model, history.history


@pytest.mark.parametrize("as_numpy", [False, True])
def test_in_memory_fit_equals_a_shuffled_dataloader_bit_for_bit(as_numpy):
    x, y = make_classification(14)
    via_loader, loader_history = fit_seeded(loader(x, y, 4, shuffle=True), epochs=3)
    data = (x.numpy(), y.numpy()) if as_numpy else (x, y)
    in_memory, memory_history = fit_seeded(data, epochs=3, batch_size=4)
    assert_same_weights(in_memory, via_loader)
    assert memory_history == loader_history
    unshuffled, _ = fit_seeded(data, epochs=3, batch_size=4, shuffle=False)
    assert not torch.equal(unshuffled.fc1.weight, via_loader.fc1.weight)  # the order does matter here


@pytest.mark.parametrize("fraction, n_train", [(0.2, 8), (0.25, 7)])  # Keras: floor(n * (1 - fraction))
def test_validation_split_holds_out_the_last_fraction(fraction, n_train):
    x, y = make_classification(10)
    split_model, split_history = fit_seeded((x, y), batch_size=4, validation_split=fraction)
    explicit_model, explicit_history = fit_seeded(
        (x[:n_train], y[:n_train]), batch_size=4, val_data=(x[n_train:], y[n_train:])
    )
    assert_same_weights(split_model, explicit_model)
    assert split_history == explicit_history
    evaluated = make_trainer(split_model).evaluate((x[n_train:], y[n_train:]))
    assert evaluated["loss"] == pytest.approx(split_history["val_loss"][-1], rel=1e-12)


# -- 5. gradient accumulation ------------------------------------------------------------------------------
def fit_once(model, data, epochs=2, **trainer_kwargs):
    make_trainer(model, lr=0.3, **trainer_kwargs).fit(data, epochs=epochs)
    return model


def test_accumulating_two_batches_of_4_equals_batches_of_8():
    x, y = make_classification(20)  # batches of 8, 8, 4: the last group is shorter
    torch.manual_seed(0)
    base = TinyNet()
    accumulated = fit_once(copy.deepcopy(base), loader(x, y, 4), accumulate_grad_batches=2)
    big_batches = fit_once(copy.deepcopy(base), loader(x, y, 8))
    small_batches = fit_once(copy.deepcopy(base), loader(x, y, 4))
    for p, q, r in zip(accumulated.parameters(), big_batches.parameters(), small_batches.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
        assert not torch.allclose(p, r, atol=1e-4)  # the comparison can tell the two apart


@pytest.mark.parametrize(
    "n, batch_size, k, groups",
    [
        (10, 2, 3, [6, 4]),  # the last group has fewer batches
        (14, 4, 2, [8, 6]),  # the last group ends with a short batch
    ],
)
def test_accumulation_with_a_short_last_group_weights_samples_equally(n, batch_size, k, groups):
    x, y = make_classification(n)
    torch.manual_seed(0)
    base = TinyNet()
    starts = list(itertools.accumulate([0, *groups]))
    batch_sampler = [list(range(a, b)) for a, b in zip(starts, starts[1:])]
    trainer = make_trainer(copy.deepcopy(base), lr=0.3, accumulate_grad_batches=k)
    trainer.fit(loader(x, y, batch_size), epochs=2)
    reference = fit_once(copy.deepcopy(base), DataLoader(TensorDataset(x, y), batch_sampler=batch_sampler))
    for p, q in zip(trainer.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert trainer.global_step == 2 * len(groups)


# -- 6. clipping ---------------------------------------------------------------------------------------------
class GradProbe(Callback):
    """Records the gradients as the optimizer will see them."""

    def __init__(self):
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self):
        self.grads.append([p.grad.detach().clone() for p in self.model.parameters()])


def global_norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_grad_clip_norm_bounds_the_global_norm_at_the_optimizer_step():
    x, y = make_classification(12)
    probe = GradProbe()
    bound = 1e-3  # far below any raw gradient norm of this task, so every step is clipped
    make_trainer(callbacks=[probe], grad_clip_norm=bound).fit((x, y), batch_size=4, epochs=2)
    norms = [global_norm(g) for g in probe.grads]
    assert len(norms) == 6
    assert norms == pytest.approx([bound] * 6, rel=1e-3)


def test_grad_clip_value_bounds_every_element():
    x, y = make_classification(12)
    probe = GradProbe()
    bound = 1e-3
    make_trainer(callbacks=[probe], grad_clip_value=bound).fit((x, y), batch_size=4, epochs=1)
    assert len(probe.grads) == 3
    largest = max(g.abs().max().item() for grads in probe.grads for g in grads)
    assert largest == pytest.approx(bound)


def raw_gradients(model, x, y):
    model = copy.deepcopy(model)
    F.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("clip", ["grad_clip_norm", "grad_clip_value"])
def test_a_huge_learning_rate_step_uses_the_clipped_gradients(clip):
    x, y = make_classification(4)
    torch.manual_seed(0)
    model = TinyNet()
    before, raw = params_of(model), raw_gradients(model, x, y)
    lr, bound = 1e3, 0.01
    make_trainer(model, lr=lr, **{clip: bound}).fit((x, y), batch_size=4, epochs=1)  # one step
    steps = [(b - p.detach()) / lr for b, p in zip(before, model.parameters())]
    if clip == "grad_clip_norm":
        scale = bound / global_norm(raw)
        assert scale < 0.1  # the raw gradients are well over the bound
        expected = [g * scale for g in raw]
    else:
        expected = [g.clamp(-bound, bound) for g in raw]
    for step, g in zip(steps, expected):
        torch.testing.assert_close(step, g, rtol=1e-3, atol=1e-6)


# -- 7. bf16 on CPU ----------------------------------------------------------------------------------------
class AutocastProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def forward(self, x):
        out = self.linear(x)
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
        return out


def test_bf16_on_cpu_trains_under_autocast():
    x, y = make_classification(64, seed=1)
    torch.manual_seed(0)
    model = AutocastProbe()
    trainer = make_trainer(model, optimizer=torch.optim.Adam(model.parameters(), lr=0.05), precision="bf16")
    history = trainer.fit((x, y), (x[:16], y[:16]), batch_size=16, epochs=8)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0], losses
    assert set(model.seen) == {(True, torch.bfloat16, torch.bfloat16)}  # training and validation
    assert model.linear.weight.dtype == torch.float32  # autocast leaves the parameters in float32
    model.seen.clear()
    trainer.predict(x[:4], batch_size=4)
    assert model.seen == [(True, torch.bfloat16, torch.bfloat16)]


def test_fp32_runs_without_autocast():
    x, y = make_classification(8)
    model = AutocastProbe()
    make_trainer(model).fit((x, y), batch_size=8)
    assert [(enabled, out_dtype) for enabled, _, out_dtype in model.seen] == [(False, torch.float32)]


def test_fp16_on_cpu_is_an_error_that_suggests_bf16():
    with pytest.raises(ValueError, match=r"precision='fp16' needs a CUDA or MPS device.*Use precision='bf16'"):
        make_trainer(precision="fp16")


# -- 8. stopping and exceptions ----------------------------------------------------------------------------
class StopAtBatch(Callback):
    def __init__(self, epoch, batch, reason=None):
        self.at, self.reason = (epoch, batch), reason

    def on_batch_end(self, batch, logs=None):
        if (self.trainer.epoch, batch) == self.at:
            if self.reason is None:
                self.trainer.stop_training = True
            else:
                self.trainer.stop(self.reason)


def test_stop_training_mid_epoch_ends_after_that_batch():
    x, y = make_classification(20)
    recorder = RecordingCallback()
    trainer = make_trainer(callbacks=[StopAtBatch(0, 2), recorder])
    history = trainer.fit((x, y), (x, y), batch_size=4, epochs=3)  # 5 batches per epoch
    assert len(recorder.of("on_batch_end")) == 3
    assert recorder.names()[-2:] == ["on_epoch_end", "on_train_end"]
    assert len(recorder.of("on_epoch_end")) == 1
    assert history.epoch == [0]
    assert set(history.history) == {"loss", "val_loss", "lr"} and all(len(v) == 1 for v in history.history.values())
    assert trainer.global_step == 3 and trainer.stop_training
    assert trainer.state.stop_reason is None


def test_trainer_stop_records_the_reason():
    x, y = make_classification(20)
    trainer = make_trainer(callbacks=[StopAtBatch(1, 0, reason="loss plateaued")])
    history = trainer.fit((x, y), batch_size=4, epochs=5)
    assert history.epoch == [0, 1]
    assert trainer.state.stop_reason == "loss plateaued"
    assert trainer.global_step == 5 + 1


def test_stop_training_in_on_epoch_end_ends_after_that_epoch():
    class StopAfterFirstEpoch(Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.trainer.stop_training = True

    x, y = make_classification(8)
    history = make_trainer(callbacks=[StopAfterFirstEpoch()]).fit((x, y), batch_size=4, epochs=4)
    assert history.epoch == [0]


def test_on_exception_and_on_train_end_run_after_a_callback_raises():
    class Boom(Callback):
        def on_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("boom at batch 1")

    x, y = make_classification(12)
    recorder = RecordingCallback()
    trainer = make_trainer(callbacks=[Boom(), recorder])
    with pytest.raises(RuntimeError, match="boom at batch 1") as raised:
        trainer.fit((x, y), batch_size=4, epochs=2)
    assert recorder.names()[-2:] == ["on_exception", "on_train_end"]
    assert recorder.of("on_exception")[0].args[0] is raised.value
    assert len(recorder.of("on_batch_end")) == 1  # Boom raised before the recorder's turn at batch 1
    assert "on_epoch_end" not in recorder.names()


# -- 9. evaluate and predict --------------------------------------------------------------------------------
def test_evaluate_returns_loss_and_metrics_as_floats():
    x, y = make_classification(8)
    results = make_trainer(metrics=["accuracy"]).evaluate((x, y), batch_size=3)
    assert set(results) == {"loss", "accuracy"}
    assert all(type(v) is float for v in results.values())


@pytest.mark.parametrize("source", ["loader_of_pairs", "loader_of_tensors", "tensor", "tuple_of_x", "numpy"])
def test_predict_concatenates_outputs_along_dim_0(source):
    x, y = make_classification(10)
    torch.manual_seed(0)
    model = TinyNet(dropout=0.5)
    trainer = make_trainer(model)
    data, kwargs = {
        "loader_of_pairs": (loader(x, y, 4), {}),
        "loader_of_tensors": (DataLoader(x, batch_size=4), {}),
        "tensor": (x, {"batch_size": 4}),
        "tuple_of_x": ((x,), {"batch_size": 4}),
        "numpy": (x.numpy(), {"batch_size": 4}),
    }[source]
    predictions = trainer.predict(data, **kwargs)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert predictions.device.type == "cpu"
    torch.testing.assert_close(predictions, expected)


class MultiOutput(nn.Module):
    def __init__(self, as_dict):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.as_dict = as_dict

    def forward(self, x):
        logits = self.linear(x)
        return {"logits": logits, "features": x * 2} if self.as_dict else (logits, x * 2)


@pytest.mark.parametrize("as_dict", [False, True])
def test_predict_concatenates_tuple_and_dict_outputs_elementwise(as_dict):
    x, y = make_classification(10)
    model = MultiOutput(as_dict)
    predictions = make_trainer(model).predict(loader(x, y, 4))
    with torch.no_grad():
        logits = model.linear(x)
    if as_dict:
        assert set(predictions) == {"logits", "features"}
        logits_out, features_out = predictions["logits"], predictions["features"]
    else:
        assert isinstance(predictions, tuple) and len(predictions) == 2
        logits_out, features_out = predictions
    torch.testing.assert_close(logits_out, logits)
    torch.testing.assert_close(features_out, x * 2)


# -- 10. tuple, dict and nested inputs -----------------------------------------------------------------------
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, a, b):
        return self.a(a) + self.b(b)


class KeywordInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(2, 3), nn.Linear(1, 3)

    def forward(self, *, image, extra):
        b, c = extra  # a nested tuple of tensors
        return self.a(image) + self.b(b) + self.c(c)


class PairsDataset(torch.utils.data.Dataset):
    def __init__(self, x, y, as_dict):
        g = torch.Generator().manual_seed(5)
        self.x, self.y, self.as_dict = x, y, as_dict
        self.b, self.c = torch.randn(len(x), 2, generator=g), torch.randn(len(x), 1, generator=g)

    def __len__(self):
        return len(self.x)

    def inputs(self, i):
        if self.as_dict:
            return {"image": self.x[i], "extra": (self.b[i], self.c[i])}
        return self.x[i], self.b[i]

    def __getitem__(self, i):
        return self.inputs(i), self.y[i]


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_inputs_are_positional_and_dict_inputs_keyword_arguments(as_dict):
    x, y = make_classification(10)
    torch.manual_seed(0)
    model = KeywordInputs() if as_dict else TwoInputs()
    dataset = PairsDataset(x, y, as_dict)
    trainer = make_trainer(model, lr=0.5)
    before = params_of(model)
    history = trainer.fit(DataLoader(dataset, batch_size=4), DataLoader(dataset, batch_size=4), epochs=3)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert not torch.equal(before[0], model.a.weight)

    everything = dataset.inputs(slice(None))
    with torch.no_grad():
        expected = model(**everything) if as_dict else model(*everything)
    torch.testing.assert_close(trainer.predict(DataLoader(dataset, batch_size=4)), expected)
    expected_loss = F.cross_entropy(expected, y).item()
    assert trainer.evaluate(DataLoader(dataset, batch_size=3))["loss"] == pytest.approx(expected_loss, rel=1e-5)


# -- 11. bad inputs --------------------------------------------------------------------------------------------
class OnEpochEnds(Callback):
    def on_epoch_ends(self, epoch, logs=None):
        pass


class KerasName(Callback):  # both names of one event: which one would run?
    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_batch_end(self, batch, logs=None):
        pass


class LightningName(Callback):
    def on_train_epoch_end(self, trainer=None, module=None):
        pass


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"precision": "fp8"}, ValueError, r"unknown precision 'fp8': use '32' \(float32\), 'bf16'"),
        ({"precision": "fp16"}, ValueError, r"precision='fp16' needs a CUDA or MPS device"),
        ({"device": "tpu"}, ValueError, r"unknown device 'tpu': use 'auto', 'cpu', 'cuda'"),
        (
            {"callbacks": [OnEpochEnds()]},
            TypeError,
            r"OnEpochEnds.on_epoch_ends is not a fitkit callback hook.*did you mean 'on_epoch_end'\?",
        ),
        (
            {"callbacks": [KerasName()]},
            TypeError,
            r"KerasName defines both on_batch_end and on_train_batch_end, Keras 3's name for the same event; keep "
            r"one of them",
        ),
        ({"callbacks": [LightningName()]}, TypeError, r"fitkit calls this hook 'on_epoch_end'"),
        (
            {"callbacks": [lambda logs: None]},
            TypeError,
            r"callbacks must be fitkit.Callback instances, got function; subclass fitkit.Callback",
        ),
        ({"grad_clip_norm": 0}, ValueError, r"grad_clip_norm must be None or a finite number > 0, got 0"),
        ({"grad_clip_norm": -1.0}, ValueError, r"grad_clip_norm must be None or a finite number > 0, got -1.0"),
        ({"grad_clip_norm": float("inf")}, ValueError, r"grad_clip_norm must be None or a finite number > 0, got inf"),
        ({"grad_clip_norm": "1"}, ValueError, r"grad_clip_norm must be None or a finite number > 0, got '1'"),
        ({"grad_clip_value": True}, ValueError, r"grad_clip_value must be None or a finite number > 0, got True"),
        ({"accumulate_grad_batches": 0}, ValueError, r"accumulate_grad_batches must be an int >= 1 .*got 0"),
        ({"accumulate_grad_batches": 2.0}, ValueError, r"accumulate_grad_batches must be an int >= 1 .*got 2.0"),
        ({"verbose": 3}, ValueError, r"verbose must be 0 \(silent\), 1 \(progress bar\) or 2 .*got 3"),
        ({"optimizer": "adamax"}, ValueError, r"unknown optimizer 'adamax'; names: \['adagrad', 'adam'"),
        ({"loss": "hinge"}, ValueError, r"unknown loss 'hinge'; names: \["),
        ({"metrics": ["f1"]}, ValueError, r"unknown metric 'f1'; known shortcuts"),
        ({"metrics": ["accuracy", "acc"]}, ValueError, r"metric names must be unique and not 'loss'"),
    ],
)
def test_bad_trainer_arguments_are_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_trainer(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_an_error():
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available here; use device='auto' or 'cpu'"):
        make_trainer(device="cuda")


def test_an_optimizer_built_for_another_model_instance_is_an_error():
    model, other = TinyNet(), TinyNet()
    with pytest.raises(
        ValueError,
        match=r"the optimizer holds none of the model's parameters: it was probably "
        r"built for another model instance",
    ):
        Trainer(model, torch.optim.SGD(other.parameters(), lr=0.1), "cross_entropy", device="cpu", verbose=0)


def one_shot():
    x, y = make_classification(8)
    return (batch for batch in [(x[:4], y[:4]), (x[4:], y[4:])])


@pytest.mark.parametrize(
    "make_data, fit_kwargs, error, message",
    [
        (
            lambda x, y: loader(x[:0], y[:0]),
            {},
            ValueError,
            r"train_data is an empty DataLoader \(dataset of 0 samples\); there is nothing to iterate",
        ),
        (
            lambda x, y: loader(x[:3], y[:3], 4, drop_last=True),
            {},
            ValueError,
            r"train_data is an empty DataLoader \(dataset of 3 samples, drop_last=True\)",
        ),
        (
            lambda x, y: one_shot(),
            {},
            TypeError,
            r"train_data is a one-shot iterator \(generator\); fit needs data it "
            r"can iterate once per epoch",
        ),
        (
            lambda x, y: TensorDataset(x, y),
            {},
            TypeError,
            r"train_data is a Dataset; wrap it in a DataLoader\(dataset, batch_size=..., shuffle=...\)",
        ),
        (
            lambda x, y: loader(x, y),
            {"batch_size": 4},
            ValueError,
            r"batch_size is for in-memory data; train_data is a DataLoader with its own batch_size \(4\)",
        ),
        (
            lambda x, y: (x, y),
            {"validation_freq": 0},
            ValueError,
            r"validation_freq=0 turns epoch-level validation off, which is for validating by steps only; pass "
            r"validate_every_n_steps=N too",
        ),
        (lambda x, y: (x, y), {"validation_split": 1.0}, ValueError, r"validation_split must be in \[0, 1\), got 1.0"),
        (lambda x, y: (x, y), {"epochs": -1}, ValueError, r"epochs must be an int >= 0, got -1"),
        (lambda x, y: (x[:0], y[:0]), {}, ValueError, r"train_data holds 0 samples"),
        (
            lambda x, y: x,
            {"batch_size": 4},
            ValueError,
            r"the batch has no targets, so the loss cannot be computed: batches are x or \(x,\) without targets",
        ),
        (
            lambda x, y: "data.csv",
            {},
            TypeError,
            r"train_data must be a DataLoader, a re-iterable of \(inputs, targets\)",
        ),
    ],
)
def test_bad_fit_arguments_are_clear_errors(make_data, fit_kwargs, error, message):
    x, y = make_classification(8)
    trainer = make_trainer()
    with pytest.raises(error, match=message):
        trainer.fit(make_data(x, y), **fit_kwargs)
    assert trainer.global_step == 0


def test_a_batch_that_is_not_inputs_and_targets_fails_on_the_first_batch():
    x, y = make_classification(12)
    dataset = CountingDataset(x, y)
    quads = DataLoader(dataset, batch_size=4, collate_fn=lambda items: (*torch.utils.data.default_collate(items), 0, 0))
    shown = (
        r"tuple\(Tensor\(shape=\(4, 4\), dtype=torch.float32\), Tensor\(shape=\(4,\), dtype=torch.int64\), int, int\)"
    )
    with pytest.raises(ValueError, match=r"cannot read a batch of " + shown):
        make_trainer().fit(quads)
    assert dataset.calls == 4  # only the first batch was loaded


def test_a_loss_that_is_not_a_scalar_fails_on_the_first_batch():
    x, y = make_classification(12)
    dataset = CountingDataset(x, y)
    trainer = make_trainer(loss=nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(
        ValueError,
        match=r"the loss must be a scalar \(0-dim\) tensor, got shape \(4,\); use a "
        r"mean- or sum-reduced loss",
    ):
        trainer.fit(DataLoader(dataset, batch_size=4))
    assert dataset.calls == 4
    assert trainer.global_step == 0


def test_fit_reads_each_sample_once_per_epoch():
    x, y = make_classification(10)
    train, val = CountingDataset(x, y), CountingDataset(x[:6], y[:6])
    trainer = make_trainer()
    trainer.fit(DataLoader(train, batch_size=4, shuffle=True), DataLoader(val, batch_size=4), epochs=3)
    assert (train.calls, val.calls) == (10 * 3, 6 * 3)
    trainer.evaluate(DataLoader(val, batch_size=4))
    trainer.predict(DataLoader(val, batch_size=4))
    assert val.calls == 6 * 5


# -- 12. string shortcuts and metric kinds ------------------------------------------------------------------
@pytest.mark.parametrize("name, cls, lr", [("adam", torch.optim.Adam, 1e-3), ("sgd", torch.optim.SGD, 1e-2)])
def test_optimizer_names_build_over_the_model_with_keras_defaults(name, cls, lr):
    model = TinyNet()
    trainer = make_trainer(model, optimizer=name)
    assert type(trainer.optimizer) is cls
    assert trainer.optimizer.param_groups[0]["lr"] == lr
    held = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in held] == [id(p) for p in model.parameters()]
    before = params_of(model)
    x, y = make_classification(8)
    trainer.fit((x, y), batch_size=8)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "name, reference",
    [
        ("cross_entropy", lambda out, y: F.cross_entropy(out, y)),
        ("mse", lambda out, y: F.mse_loss(out, F.one_hot(y, 3).float())),
    ],
)
def test_loss_names(name, reference):
    x, y = make_classification(10)
    targets = y if name == "cross_entropy" else F.one_hot(y, 3).float()
    torch.manual_seed(0)
    model = TinyNet()
    results = make_trainer(model, loss=name).evaluate((x, targets), batch_size=5)
    with torch.no_grad():
        assert results["loss"] == pytest.approx(reference(model(x), y).item(), rel=1e-6)


class CountCorrect:
    """A torchmetrics-like object: update/compute/reset, nothing else."""

    higher_is_better = True

    def __init__(self):
        self.reset()

    def update(self, outputs, targets):
        self.correct += int((outputs.argmax(dim=1) == targets).sum())

    def compute(self):
        return torch.tensor(float(self.correct))

    def reset(self):
        self.correct = 0


def mean_max_logit(outputs, targets):
    return outputs.max(dim=1).values.mean()


def test_accuracy_name_metric_function_and_duck_typed_metric():
    x, y = make_classification(10)
    torch.manual_seed(0)
    model = TinyNet()
    trainer = make_trainer(model, metrics=["accuracy", mean_max_logit, CountCorrect()])
    results = trainer.evaluate((x, y), batch_size=4)
    with torch.no_grad():
        outputs = model(x)
    correct = int((outputs.argmax(dim=1) == y).sum())
    assert results == {
        "loss": pytest.approx(F.cross_entropy(outputs, y).item(), rel=1e-6),
        "accuracy": pytest.approx(correct / 10),
        "mean_max_logit": pytest.approx(outputs.max(dim=1).values.mean().item(), rel=1e-6),
        "count_correct": float(correct),
    }
    history = trainer.fit((x, y), (x, y), batch_size=4, epochs=2)
    assert {"count_correct", "val_count_correct", "mean_max_logit", "val_accuracy"} <= set(history.history)
    assert all(0 <= v <= 10 for v in history.history["count_correct"])  # reset every epoch


# -- 13. history ------------------------------------------------------------------------------------------------
def test_history_holds_one_float_per_epoch_and_is_the_trainers():
    x, y = make_classification(8)
    trainer = make_trainer(metrics=["accuracy"])
    history = trainer.fit((x, y), (x, y), batch_size=4, epochs=3)
    assert isinstance(history, History) and history is trainer.history
    assert history.epoch == [0, 1, 2]
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert all(len(v) == 3 and all(type(f) is float for f in v) for v in history.history.values())


def test_validation_freq_2_logs_val_keys_every_second_epoch():
    x, y = make_classification(8)
    recorder = RecordingCallback()
    history = make_trainer(callbacks=[recorder]).fit((x, y), (x, y), batch_size=4, epochs=4, validation_freq=2)
    with_val = [c.args[0] for c in recorder.of("on_epoch_end") if "val_loss" in c.args[1]]
    assert with_val == [1, 3]
    assert len(history.history["val_loss"]) == 2 and len(history.history["loss"]) == 4
    assert len(recorder.of("on_validation_begin")) == 2


def test_two_fits_continue_training_like_one_longer_fit():
    x, y = make_classification(12)
    torch.manual_seed(0)
    once = TinyNet(dropout=0.5)
    long_history = make_trainer(once).fit((x, y), batch_size=4, epochs=4).history

    torch.manual_seed(0)
    twice = TinyNet(dropout=0.5)
    trainer = make_trainer(twice)
    first = trainer.fit((x, y), batch_size=4, epochs=2)
    second = trainer.fit((x, y), batch_size=4, epochs=2)
    assert second is trainer.history and first is not second
    assert first.history["loss"] + second.history["loss"] == long_history["loss"]
    assert second.epoch == [0, 1]  # as in Keras, a new fit counts epochs from initial_epoch
    assert trainer.global_step == 4 * 3
    assert_same_weights(twice, once)


# -- 14. verbose ------------------------------------------------------------------------------------------------
def test_verbose_0_prints_nothing(capsys):
    x, y = make_classification(8)
    make_trainer(verbose=0).fit((x, y), (x, y), batch_size=4, epochs=2)
    make_trainer(verbose=0).evaluate((x, y))
    assert capsys.readouterr() == ("", "")


def test_verbose_2_prints_one_line_per_epoch(capsys):
    x, y = make_classification(8)
    make_trainer(verbose=2).fit((x, y), (x, y), batch_size=4, epochs=3)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out.startswith('Model: "TinyNet"') and out.count("Model:") == 1  # the summary, once at fit start
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    assert all("val_loss: " in line for line in lines)


# -- 16. host syncs ---------------------------------------------------------------------------------------------
SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__")


def count_syncs(monkeypatch, run) -> int:
    """Calls of the Tensor methods that read a value back to the host, made from Python during ``run``."""
    count = 0

    def counting(original):
        def wrapper(self, *args, **kwargs):
            nonlocal count
            count += 1
            return original(self, *args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in SYNC_METHODS:
            patch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
        run()
    return count


@pytest.mark.parametrize("as_loader", [False, True])
def test_host_syncs_do_not_grow_with_the_number_of_batches(monkeypatch, as_loader):
    x, y = make_classification(200)

    def run(batches):
        batch_size = 200 // batches
        trainer = make_trainer(metrics=["accuracy"])
        if as_loader:
            data = loader(x, y, batch_size, shuffle=True), loader(x[:100], y[:100], batch_size)
            return lambda: trainer.fit(*data, epochs=2)
        return lambda: trainer.fit((x, y), (x[:100], y[:100]), batch_size=batch_size, epochs=2)

    few, many = count_syncs(monkeypatch, run(20)), count_syncs(monkeypatch, run(200))
    assert many == few
    assert 0 < few <= 40  # the wrappers see the per-epoch reads


def test_the_sync_counter_sees_a_callback_that_reads_every_batch(monkeypatch):
    class ReadsEveryBatch(Callback):
        def on_batch_end(self, batch, logs=None):
            if logs["loss"] > 0:  # __bool__ on a tensor: a host read per batch
                float(logs["loss"])

    x, y = make_classification(40)

    def run(batch_size):
        return lambda: make_trainer(callbacks=[ReadsEveryBatch()]).fit((x, y), batch_size=batch_size, epochs=1)

    assert count_syncs(monkeypatch, run(2)) - count_syncs(monkeypatch, run(20)) == 2 * (20 - 2)


def test_evaluate_outside_fit_runs_only_the_callbacks_given_to_it():
    x, y = make_classification(n=12)
    fit_recorder, eval_recorder = RecordingCallback(), RecordingCallback()
    trainer = make_trainer(callbacks=[fit_recorder])
    trainer.fit((x, y), (x, y), batch_size=4, epochs=1)
    seen_in_fit = len(fit_recorder.calls)
    trainer.evaluate((x, y), batch_size=4, callbacks=[eval_recorder])
    assert len(fit_recorder.calls) == seen_in_fit  # the fit's callbacks already got on_train_end
    names = [call.name for call in eval_recorder.calls]
    assert names[0] == "on_validation_begin" and names[-1] == "on_validation_end"
    assert names.count("on_validation_batch_end") == 3
