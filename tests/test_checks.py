"""_checks.py: first-batch checks of targets, dtypes, outputs and BatchNorm, with their pinned messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import _checks


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "cross_entropy", **kwargs: object) -> None:
    trainer = fitkit.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, verbose=0)
    trainer.fit(DataLoader(TensorDataset(x, y), batch_size=kwargs.pop("batch_size", 8)), epochs=1, **kwargs)  # type: ignore[arg-type]


X = torch.randn(32, 4)


@pytest.mark.parametrize(
    ("y", "error", "message"),
    [
        (torch.randint(0, 5, (32,)), ValueError, r"the label [34] is outside \[0, 3\): the model outputs 3 classes"),
        (
            torch.rand(32),
            TypeError,
            r"float32 tensor of shape \(8,\) as targets: class labels must be integers.*y\.long\(\)",
        ),
        (
            torch.randint(0, 3, (32,), dtype=torch.int32),
            TypeError,
            r"torch.int32 class labels but needs int64.*y\.long\(\)",
        ),
        (
            torch.randint(0, 3, (32, 1)),
            ValueError,
            r"targets have shape \(8, 1\) but class labels must be \(8,\).*squeeze\(1\)",
        ),
    ],
)
def test_bad_classification_targets_are_named_on_the_first_batch(y: torch.Tensor, error: type, message: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(error, match=message):
        _fit(nn.Linear(4, 3), X, y)


def test_a_bad_label_in_a_later_batch_gets_the_same_message() -> None:
    y = torch.zeros(32, dtype=torch.long)
    y[20] = 7  # batch 2: past the first-batch check
    with pytest.raises(ValueError, match=r"the label 7 is outside \[0, 3\)"):
        _fit(nn.Linear(4, 3), X, y)


def test_regression_outputs_n1_against_targets_n_are_an_error_not_a_broadcast() -> None:
    with pytest.raises(ValueError, match=r"outputs have shape \(8, 1\) but the targets \(8,\); torch would broadcast "
                       r"them to \(8, 8\).*targets\.unsqueeze\(1\)"):  # fmt: skip
        _fit(nn.Linear(4, 1), X, torch.randn(32), loss="mse")


def test_a_tuple_output_to_a_tensor_loss_names_the_structure_and_the_fix() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), x

    with pytest.raises(TypeError, match=r"the model returned a tuple of 2 \(Tensor, Tensor\).*override "
                       r"Trainer\.compute_loss"):  # fmt: skip
        _fit(Two(), X, torch.randint(0, 3, (32,)))


@pytest.mark.parametrize(("data", "model"), [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_inputs_and_model_of_different_float_dtypes_are_named(data: torch.dtype, model: torch.dtype) -> None:
    d, m = str(data)[6:], str(model)[6:]
    with pytest.raises(TypeError, match=rf"the inputs are {d} but the model's parameters are {m}.*astype\('{m}'\)"):
        _fit(nn.Linear(4, 3).to(model), X.to(data), torch.randint(0, 3, (32,)))


def test_batchnorm_with_a_last_batch_of_one_sample_is_refused_before_training() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"last batch \(batch 4 of each epoch\) holds 1 sample \(33 samples, "
                       r"batch_size=8\).*drop_last=True"):  # fmt: skip
        _fit(model, torch.randn(33, 4), torch.randint(0, 3, (33,)))
    _fit(model, torch.randn(32, 4), torch.randint(0, 3, (32,)))  # no single-sample batch: fine


def test_nan_inputs_stop_the_fit_naming_epoch_batch_and_sample() -> None:
    # Issue 19: they trained on for every epoch with one warning, the weights NaN from batch 2 on.
    x = X.clone()
    x[19] = float("nan")  # batch 2 (batch_size 8)
    model = nn.Linear(4, 3)
    trainer = fitkit.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", verbose=0)
    with pytest.raises(FloatingPointError, match=r"non-finite \(NaN or inf\) in epoch 1, batch 2, .* The training "
                       r"data hold NaN at sample 19 of the inputs \(position \(0,\)\), and 4 non-finite"):  # fmt: skip
        trainer.fit(DataLoader(TensorDataset(x, torch.randint(0, 3, (32,))), batch_size=8), epochs=3)
    assert trainer.epoch == 0 and trainer.global_step == 4  # stopped at the first epoch's end


def test_steps_per_epoch_beyond_the_data_warns() -> None:
    with pytest.warns(UserWarning, match=r"steps_per_epoch=10 but train_data holds 4 batches"):
        _fit(nn.Linear(4, 3), X, torch.randint(0, 3, (32,)), steps_per_epoch=10)


def test_monitoring_a_key_that_cannot_exist_fails_before_the_first_epoch() -> None:
    from fitkit.callbacks import EarlyStopping

    model = nn.Linear(4, 3)
    for monitor, message in [
        ("val_accuracy", r"'val_accuracy' is a validation key but this fit has no validation data"),
        ("val_acc", r"'val_acc' will never be in the epoch logs; did you mean 'val_accuracy'"),
    ]:
        calls = []
        trainer = fitkit.Trainer(model, "sgd", "cross_entropy", metrics=["accuracy"], verbose=0,
                                 callbacks=[EarlyStopping(monitor=monitor), fitkit.callbacks.LambdaCallback(
                                     on_epoch_begin=lambda epoch, logs: calls.append(epoch))])  # fmt: skip  # noqa: B023
        data = DataLoader(TensorDataset(X, torch.randint(0, 3, (32,))), batch_size=8)
        with pytest.raises(ValueError, match=message):
            trainer.fit(data, data if monitor == "val_acc" else None, epochs=2)
        assert calls == []


def test_explain_loss_error_ignores_errors_it_does_not_know() -> None:
    assert _checks.explain_loss_error(RuntimeError("boom"), nn.MSELoss(), torch.zeros(2), torch.zeros(2)) is None
