"""TensorBoard: event files read back with tensorboard's own reader."""

from __future__ import annotations

import subprocess
import sys
import time
import types
import warnings

import pytest
import torch
from helpers import FakeTrainer, UnsizedBatches, make_classification, make_trainer
from torch import nn

from fitkit.callbacks import TensorBoard

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def _read(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _f32(value):
    return torch.tensor(value, dtype=torch.float32).item()  # event files hold float32


def _hparams(events):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, sorted(m.name.tag for m in experiment.metric_infos)


@pytest.mark.slow  # a fresh interpreter imports torch
def test_import_fitkit_does_not_import_tensorboard():
    code = (
        "import sys, fitkit, fitkit.callbacks; "
        "bad = [m for m in sys.modules "
        "       if m.split('.')[0] == 'tensorboard' or m.startswith('torch.utils.tensorboard')]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_missing_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"tensorboard package, which is not installed: pip install tensorboard"):
        TensorBoard()


def test_fit_writes_epoch_step_histogram_graph_and_hparams(tmp_path):
    x, y = make_classification(n=16)
    trainer = make_trainer(
        metrics=["accuracy"], callbacks=[TensorBoard(tmp_path, update_freq=1, histogram_freq=1, write_graph=True)]
    )
    history = trainer.fit((x, y), (x, y), epochs=2, batch_size=8)  # 2 optimizer steps per epoch
    events = _read(tmp_path)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        # x axis: the global step at each epoch's end (CSVLogger's step column, MLflow's step)
        values = history.history[key]
        assert _scalars(events, f"epoch/{key}") == [(2, _f32(values[0])), (4, _f32(values[1]))]
    assert [s for s, _ in _scalars(events, "step/loss")] == [1, 2, 3, 4]  # the step each point follows
    assert _scalars(events, "step/lr") == [(s, _f32(0.1)) for s in range(1, 5)]
    assert [len(events.Histograms(f"weights/{n}")) for n, _ in trainer.model.named_parameters()] == [2, 2, 2, 2]
    assert events.Tags()["graph"]
    hparams, metrics = _hparams(events)
    assert hparams == {
        "optimizer": "SGD",
        "lr": pytest.approx(0.1),
        "weight_decay": 0.0,
        "batch_size": 8.0,
        "precision": "32",
        "accumulate_grad_batches": 1.0,
        "epochs": 2.0,
    }
    assert metrics == ["epoch/accuracy", "epoch/loss", "epoch/lr", "epoch/val_accuracy", "epoch/val_loss"]


class _DrawsRandomNumbers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.0 * torch.rand_like(x)  # in eval mode too: tracing must not shift the run's random stream


def test_write_graph_leaves_training_unchanged(tmp_path):
    def run(write_graph):
        torch.manual_seed(0)
        model = nn.Sequential(
            _DrawsRandomNumbers(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)
        )
        callbacks = [TensorBoard(tmp_path / str(write_graph), write_graph=write_graph)]
        trainer = make_trainer(model, callbacks=callbacks)
        x, y = make_classification(n=16)
        history = trainer.fit((x, y), epochs=2, batch_size=8)
        return history.history["loss"], model.state_dict()

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch.jit's deprecation notice is not passed on
        losses_graph, state_graph = run(True)
    losses, state = run(False)
    assert losses_graph == losses
    for key, value in state.items():  # BatchNorm statistics included: the trace ran in eval mode
        assert torch.equal(value, state_graph[key]), key
    assert _read(tmp_path / "True").Tags()["graph"]


@pytest.mark.parametrize("sized", [True, False])
def test_update_freq_counts_optimizer_steps_with_accumulation(tmp_path, sized):
    x, y = make_classification(n=20)  # 5 batches of 4: groups (0, 1), (2, 3), (4) -> 3 steps per epoch
    trainer = make_trainer(accumulate_grad_batches=2, callbacks=[TensorBoard(tmp_path, update_freq=2)])
    trainer.fit((x, y) if sized else UnsizedBatches(x, y, 4), epochs=2, batch_size=4 if sized else None)
    events = _read(tmp_path)
    # global steps 2, 4, 6 are due; without a length, step 6 (the last, shorter group) happens after the
    # epoch's last on_batch_end and is caught at the epoch's end
    assert [s for s, _ in _scalars(events, "step/loss")] == [2, 4, 6]
    assert [s for s, _ in _scalars(events, "epoch/loss")] == [3, 6]


def test_epoch_only_by_default_and_reuse_across_fits(tmp_path, monkeypatch):
    x, y = make_classification(n=16)
    trainer = make_trainer(callbacks=[TensorBoard(tmp_path)])
    trainer.fit((x, y), epochs=2, batch_size=8)
    # Each fit writes its own event file, named by the second and a per-process counter that sorts as text (10
    # before 9): in a long test process two fits in one second can be read back in the wrong order, and the reader
    # then drops the "out of order" steps. Date the second file later, as a later fit would be (CI caught it once).
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: time.time() + 2.0))
    trainer.fit((x, y), epochs=1, batch_size=8)
    events = _read(tmp_path)
    assert not [t for t in events.Tags()["scalars"] if t.startswith("step/")]
    assert [s for s, _ in _scalars(events, "epoch/loss")] == [2, 4, 6]


def test_resume_hides_what_the_crashed_run_wrote_after_the_checkpoint(tmp_path, monkeypatch):
    def run(callback, trainer, steps, offset):
        for step in steps:
            trainer.state.global_step = step
            callback.on_before_optimizer_step()
            callback.on_batch_end(0, {"loss": torch.tensor(float(offset + step))})

    crashed, trainer = TensorBoard(tmp_path, update_freq=1), FakeTrainer()
    crashed.set_trainer(trainer)
    crashed.on_train_begin()
    run(crashed, trainer, range(1, 6), 0)
    state = crashed.state_dict()  # the checkpoint, after 5 optimizer steps
    run(crashed, trainer, range(6, 10), 0)  # written, then lost with the crash
    crashed.writer.flush()

    # A resumed run is a later process, so its event file sorts after the crashed run's. In one process the
    # names can share their second and differ only by a counter that sorts as text (10 before 9, once other
    # tests have opened writers): date the resumed file later, as a restart would.
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: time.time() + 2.0))
    resumed, trainer = TensorBoard(tmp_path, update_freq=1), FakeTrainer()
    resumed.set_trainer(trainer)
    resumed.on_train_begin()
    trainer.state.global_step = 5  # the trainer's state is loaded before the callbacks'
    resumed.load_state_dict(state)
    run(resumed, trainer, range(6, 8), 100)
    resumed.on_train_end()
    crashed.on_train_end()
    assert _scalars(_read(tmp_path), "step/loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 5.0),
        (6, 106.0),
        (7, 107.0),
    ]


def test_a_graph_that_cannot_be_traced_is_a_warning(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def fail(*args, **kwargs):
        raise RuntimeError("untraceable")

    monkeypatch.setattr(SummaryWriter, "add_graph", fail)
    x, y = make_classification(n=8)
    trainer = make_trainer(callbacks=[TensorBoard(tmp_path, write_graph=True)])
    with pytest.warns(UserWarning, match=r"could not trace TinyNet \(RuntimeError: untraceable\); no graph written"):
        trainer.fit((x, y), epochs=2, batch_size=4)
    assert trainer.model.training


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(update_freq=0), ValueError, r"update_freq must be 'epoch', 'batch' or an int >= 1 .*got 0"),
        (dict(update_freq="step"), ValueError, r"update_freq must be 'epoch', 'batch' or an int >= 1 .*got 'step'"),
        (dict(histogram_freq=-1), ValueError, r"histogram_freq must be an int >= 0 .*got -1"),
        (dict(write_graph="yes"), TypeError, r"write_graph must be True or False, got 'yes'"),
    ],
)
def test_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        TensorBoard(tmp_path, **kwargs)


def test_writes_on_rank_zero_only_and_batch_is_every_step(tmp_path):
    assert TensorBoard.rank_zero_only is True
    assert TensorBoard(tmp_path, update_freq="batch")._step_freq == 1


def test_step_level_validations_are_written_at_their_step(tmp_path):
    x, y = make_classification(n=24)  # 3 optimizer steps per epoch, a validation every 2
    trainer = make_trainer(callbacks=[TensorBoard(tmp_path)])
    history = trainer.fit((x, y), (x, y), epochs=2, batch_size=8, validate_every_n_steps=2)
    expected = [(v["step"], _f32(v["val_loss"])) for v in history.validations]  # x: the step it ran after
    assert _scalars(_read(tmp_path), "step/val_loss") == expected
    assert [step for step, _ in expected] == [2, 3, 4, 6]
