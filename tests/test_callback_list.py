"""The callbacks of one fit: which hooks are bound, hooks set on an instance, on_train_end for everyone."""

from __future__ import annotations

import ast
import inspect

import pytest
from helpers import make_classification, make_trainer

import fitkit.checkpoint
from fitkit import Callback
from fitkit._callback_list import CallbackList
from fitkit.callbacks import CSVLogger, EarlyStopping


def test_only_overridden_hooks_are_bound():
    class EpochEnd(Callback):
        def on_epoch_end(self, epoch, logs=None):
            pass

    callback = EpochEnd()
    callbacks = CallbackList([callback], make_trainer())
    assert callbacks.hooks["on_epoch_end"] == [callback.on_epoch_end]
    assert all(not hooks for name, hooks in callbacks.hooks.items() if name != "on_epoch_end")


def test_a_hook_set_on_an_instance_runs():
    seen = []
    callback = Callback()
    callback.on_epoch_end = lambda epoch, logs: seen.append((epoch, sorted(logs)))
    make_trainer(callbacks=[callback]).fit(make_classification(8), batch_size=4, epochs=2)
    assert seen == [(0, ["loss", "lr"]), (1, ["loss", "lr"])]


def test_a_misspelled_hook_on_an_instance_is_an_error_before_training():
    callback = Callback()
    callback.on_epoch_ned = lambda epoch, logs: None
    with pytest.raises(
        TypeError,
        match=r"Callback instance attribute on_epoch_ned is not a fitkit callback hook and would never be "
        r"called; did you mean 'on_epoch_end'\?",
    ):
        make_trainer(callbacks=[callback])
    # set after the Trainer was built: caught when fit binds the hooks, before any batch
    late = Callback()
    trainer = make_trainer(callbacks=[late])
    late.on_train_epoch_end = lambda epoch, logs: None  # Lightning's name
    with pytest.raises(TypeError, match=r"on_train_epoch_end .*fitkit calls this hook 'on_epoch_end'"):
        trainer.fit(make_classification(8), batch_size=4)
    assert trainer.global_step == 0


def test_a_hook_attribute_that_is_not_callable_is_an_error():
    callback = Callback()
    callback.on_epoch_end = 3
    with pytest.raises(TypeError, match=r"instance attribute on_epoch_end holds a int value, not a function"):
        make_trainer(callbacks=[callback])


def test_every_on_train_end_runs_when_one_fails_then_the_first_error_is_raised(tmp_path):
    ended = []

    class Failing(Callback):
        def on_train_end(self, logs=None):
            ended.append("failing")
            raise RuntimeError("on_train_end failed")

    class Later(Callback):
        def on_train_end(self, logs=None):
            ended.append("later")

    csv = CSVLogger(tmp_path / "log.csv")
    trainer = make_trainer(callbacks=[Failing(), csv, Later()])
    with pytest.raises(RuntimeError, match="on_train_end failed"):
        trainer.fit(make_classification(8), batch_size=4)
    assert ended == ["failing", "later"]
    assert (tmp_path / "log.csv").read_text().startswith("epoch,step,loss,lr")  # CSVLogger closed and flushed it


def test_callbacks_not_in_a_list_is_a_clear_error():
    with pytest.raises(
        TypeError,
        match=r"callbacks must be a list of callbacks, got a single EarlyStopping; wrap it in a list: "
        r"callbacks=\[EarlyStopping\(...\)\]",
    ):
        make_trainer(callbacks=EarlyStopping(monitor="loss"))


def test_state_is_keyed_by_class_name_with_a_counter_for_repeats():
    first, second = EarlyStopping(monitor="loss"), EarlyStopping(monitor="loss", patience=3)
    callbacks = CallbackList([first, second], make_trainer())
    assert [key for key, _ in callbacks.keyed()] == ["EarlyStopping", "EarlyStopping_2"]
    assert set(callbacks.state_dict()) == {"EarlyStopping", "EarlyStopping_2"}


def test_checkpoint_module_reads_no_private_trainer_attribute():
    """checkpoint.py handles files: it neither imports the trainer nor reaches into anything's privates."""
    tree = ast.parse(inspect.getsource(fitkit.checkpoint))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert "fitkit.trainer" not in imported
    private = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    ]
    assert private == []


def test_a_cleanup_failure_never_replaces_the_error_that_ended_fit():
    # on_train_end runs in fit's `finally`: its failure used to become the exception fit raised.
    class Breaks(Callback):
        def on_batch_end(self, batch, logs=None):
            raise KeyError("the real failure")

    class CleanupBreaks(Callback):
        def on_train_end(self, logs=None):
            raise RuntimeError("cleanup failed")

    x, y = make_classification(n=16)
    trainer = make_trainer(callbacks=[Breaks(), CleanupBreaks()])
    warned = r"CleanupBreaks.on_train_end failed \(RuntimeError: cleanup failed\) while fit was ending on KeyError"
    with pytest.warns(UserWarning, match=warned), pytest.raises(KeyError, match="the real failure"):
        trainer.fit((x, y), epochs=1, batch_size=4)
    # With nothing else failing, the cleanup's own error is raised.
    with pytest.raises(RuntimeError, match="cleanup failed"):
        make_trainer(callbacks=[CleanupBreaks()]).fit((x, y), epochs=1, batch_size=4)
