"""LambdaCallback: Keras's callback of plain functions, with only the given hooks visible to the trainer."""

from __future__ import annotations

import copy

import pytest
from helpers import make_classification, make_trainer

from fitkit.callbacks import LambdaCallback
from fitkit.callbacks.base import HOOKS, check_hook_names, overrides


def test_functions_are_called_with_the_hook_arguments_in_fit():
    calls = []
    callback = LambdaCallback(
        on_train_begin=lambda logs: calls.append(("train_begin", dict(logs))),
        on_epoch_begin=lambda epoch, logs: calls.append(("epoch_begin", epoch)),
        on_batch_end=lambda batch, logs: calls.append(("batch_end", batch, sorted(logs))),
        on_epoch_end=lambda epoch, logs: calls.append(("epoch_end", epoch, sorted(logs))),
        on_before_optimizer_step=lambda: calls.append(("before_step",)),
        on_train_end=lambda logs: calls.append(("train_end",)),
    )
    trainer = make_trainer(callbacks=[callback])
    x, y = make_classification(n=8)
    trainer.fit((x, y), epochs=2, batch_size=4)
    assert calls == [
        ("train_begin", {}),
        ("epoch_begin", 0),
        ("before_step",),
        ("batch_end", 0, ["loss"]),
        ("before_step",),
        ("batch_end", 1, ["loss"]),
        ("epoch_end", 0, ["loss", "lr"]),
        ("epoch_begin", 1),
        ("before_step",),
        ("batch_end", 0, ["loss"]),
        ("before_step",),
        ("batch_end", 1, ["loss"]),
        ("epoch_end", 1, ["loss", "lr"]),
        ("train_end",),
    ]


def test_only_the_given_hooks_are_overridden():
    epoch_only = LambdaCallback(on_epoch_end=lambda epoch, logs: None, on_batch_end=None)  # None is ignored
    batch_only = LambdaCallback(on_batch_end=lambda batch, logs: None)
    assert [h for h in HOOKS if overrides(epoch_only, h)] == ["on_epoch_end"]
    assert [h for h in HOOKS if overrides(batch_only, h)] == ["on_batch_end"]  # instances do not share hooks
    assert isinstance(epoch_only, LambdaCallback) and type(epoch_only).__name__ == "LambdaCallback"
    check_hook_names(epoch_only)  # what Trainer(callbacks=...) runs: no error
    assert repr(epoch_only) == "LambdaCallback(on_epoch_end=...)"
    clone = copy.deepcopy(epoch_only)
    assert overrides(clone, "on_epoch_end") and not overrides(clone, "on_batch_end")


def test_the_function_gets_the_arguments_positionally_as_in_keras():
    seen = []
    callback = LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append((epoch, logs)))
    callback.on_epoch_end(3, {"loss": 0.5})
    assert seen == [(3, {"loss": 0.5})]


@pytest.mark.parametrize(
    "name, match",
    [
        ("on_train_epoch_end", r"unknown hook 'on_train_epoch_end': fitkit calls this hook 'on_epoch_end'"),
        ("on_epoch_ends", r"unknown hook 'on_epoch_ends': did you mean 'on_epoch_end'\? The hooks are: on_train_begin"),
        ("logger", r"unknown hook 'logger': the hooks are: on_train_begin, on_train_end, on_epoch_begin"),
    ],
)
def test_unknown_hook_names_are_a_type_error(name, match):
    with pytest.raises(TypeError, match=match):
        LambdaCallback(**{name: lambda *args: None})


def test_a_hook_must_be_a_function():
    with pytest.raises(TypeError, match=r"LambdaCallback\(on_epoch_end=...\) must be a function, got int"):
        LambdaCallback(on_epoch_end=3)
