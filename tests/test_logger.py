"""ExperimentLogger: the rule the loggers share, driven through real fits; and a Weights & Biases subclass (the
README's recipe) run in offline mode and read back from its run file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FakeTrainer, UnsizedBatches, make_classification, make_trainer

from fitkit import Callback
from fitkit.callbacks import ExperimentLogger
from fitkit.callbacks.logger import run_status


class Recorder(ExperimentLogger):
    """Records what the rule hands to a logger."""

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__(log_every_n_steps)
        self.calls: list[tuple[Any, ...]] = []

    def start_run(self) -> None:
        self.calls.append(("start",))

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.calls.append(("epoch", epoch, metrics))

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("step", step, metrics))

    def end_run(self, status: str) -> None:
        self.calls.append(("end", status))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == kind]


def test_epochs_steps_and_the_end_in_a_fit():
    x, y = make_classification(n=24)
    recorder = Recorder(log_every_n_steps=2)
    history = make_trainer(callbacks=[recorder]).fit((x, y), (x, y), epochs=2, batch_size=8)  # 3 steps per epoch
    assert recorder.calls[0] == ("start",) and recorder.calls[-1] == ("end", "FINISHED")
    assert [(c[1], c[2]) for c in recorder.of("epoch")] == [
        (epoch, {k: v[epoch] for k, v in history.history.items()}) for epoch in range(2)
    ]
    assert [c[1] for c in recorder.of("step")] == [2, 4, 6]
    assert all(set(c[2]) == {"loss", "lr"} and c[2]["lr"] == 0.1 for c in recorder.of("step"))


@pytest.mark.parametrize("sized", [True, False])
def test_every_n_steps_counts_optimizer_steps_with_accumulation(sized):
    x, y = make_classification(n=20)  # 5 batches of 4: groups (0, 1), (2, 3), (4) -> 3 steps per epoch
    recorder = Recorder(log_every_n_steps=2)
    trainer = make_trainer(accumulate_grad_batches=2, callbacks=[recorder])
    trainer.fit((x, y) if sized else UnsizedBatches(x, y, 4), epochs=2, batch_size=4 if sized else None)
    assert [c[1] for c in recorder.of("step")] == [2, 4, 6]  # step 6 is the unsized epoch's trailing group


def test_step_level_validations_are_logged_at_their_step():
    x, y = make_classification(n=24)
    recorder = Recorder()
    make_trainer(callbacks=[recorder]).fit(
        (x, y), (x, y), epochs=2, batch_size=8, validate_every_n_steps=2, validation_freq=None
    )
    steps = recorder.of("step")
    assert [c[1] for c in steps] == [2, 4, 6]
    assert all(set(c[2]) == {"val_loss"} for c in steps)


class _Raise(Callback):
    def __init__(self, exception: BaseException) -> None:
        self.exception = exception

    def on_epoch_end(self, epoch, logs=None):
        raise self.exception


@pytest.mark.parametrize(
    "exception, status", [(ValueError("bad"), "FAILED"), (KeyboardInterrupt(), "KILLED"), (SystemExit(2), "KILLED")]
)
def test_the_end_status_follows_how_fit_ended(exception, status):
    x, y = make_classification(n=8)
    recorder = Recorder()
    with pytest.raises(type(exception)):
        make_trainer(callbacks=[recorder, _Raise(exception)]).fit((x, y), epochs=2, batch_size=8)
    assert recorder.calls[-1] == ("end", status)


def test_run_status_of_a_pruned_trial_and_a_signal():
    class TrialPruned(Exception):  # optuna's name: recognised without importing optuna
        pass

    from fitkit.signals import TrainingInterrupted

    assert run_status(TrialPruned()) == run_status(TrainingInterrupted(15)) == "KILLED"
    assert run_status(None) == "FINISHED"
    assert run_status(None, "pruned by Optuna at epoch 2") == "KILLED"  # a pruned distributed run stops, then raises
    assert run_status(None, "EarlyStopping: val_loss did not improve") == "FINISHED"


def test_no_per_batch_hook_without_step_logging_and_a_resume_continues_the_steps():
    assert "on_batch_end" not in vars(Recorder()) and "on_before_optimizer_step" not in vars(Recorder())
    crashed, trainer = Recorder(log_every_n_steps=3), FakeTrainer()
    crashed.set_trainer(trainer)
    crashed.on_train_begin({})
    for step in range(1, 5):
        trainer.state.global_step = step
        crashed.on_before_optimizer_step()
        crashed.on_batch_end(0, {"loss": torch.tensor(float(step))})
    state = crashed.state_dict()
    resumed = Recorder(log_every_n_steps=3)
    resumed.set_trainer(trainer)
    resumed.on_train_begin({})
    trainer.state.global_step = 4
    resumed.load_state_dict(state)
    for step in range(5, 7):
        trainer.state.global_step = step
        resumed.on_batch_end(0, {"loss": torch.tensor(float(step))})
    assert [c[1] for c in crashed.of("step")] == [3] and [c[1] for c in resumed.of("step")] == [6]


def test_log_every_n_steps_is_checked():
    with pytest.raises(ValueError, match=r"log_every_n_steps must be None \(epoch logs only\) or an int >= 1 .*got 0"):
        Recorder(log_every_n_steps=0)


# -- Weights & Biases, offline -----------------------------------------------------------------------
class WandbLogger(ExperimentLogger):
    """The README's recipe: a W&B run per fit, epoch logs with their epoch, step-level values with the step."""

    def __init__(self, project: str, log_every_n_steps: int | None = None, **init: Any) -> None:
        super().__init__(log_every_n_steps)
        import wandb  # fail here when it is missing

        self.wandb, self.project, self.init, self.run, self.run_id = wandb, project, init, None, None

    def _run(self) -> Any:
        if self.run is None:
            self.run = self.wandb.init(
                project=self.project, id=self.run_id, resume="allow", config=self.trainer_params(), **self.init
            )
            self.run_id = self.run.id
        return self.run

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._run().log({**metrics, "epoch": epoch})

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._run().log({**{f"step/{k}": v for k, v in metrics.items()}, "global_step": step})

    def end_run(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
            self.run = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state["run_id"]


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of an offline run file (a LevelDB-style log of 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, position, block, pending, records = run_file.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow  # starts wandb's service process
def test_a_wandb_subclass_in_offline_mode(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    x, y = make_classification(n=16)
    logger = WandbLogger("fitkit-test", log_every_n_steps=1, dir=str(tmp_path))
    history = make_trainer(callbacks=[logger]).fit((x, y), (x, y), epochs=2, batch_size=8)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    records = _wandb_records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "wandb's service did not finish writing the run file"
        time.sleep(0.2)  # wandb's service writes the file after finish() returns
        records = _wandb_records(run_file)
    rows = [
        {key: json.loads(item.value_json) for item in r.history.item if not (key := _key(item)).startswith("_")}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    epochs = [row for row in rows if "epoch" in row]
    assert epochs == [{**{k: v[e] for k, v in history.history.items()}, "epoch": e} for e in range(2)]
    assert [row["global_step"] for row in rows if "global_step" in row] == [1, 2, 3, 4]
    config = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
    values = {_key(item): json.loads(item.value_json) for item in config.update}
    assert values["optimizer"] == "SGD" and values["lr"] == 0.1
    exit_record = next(r.exit for r in records if r.WhichOneof("record_type") == "exit")
    assert exit_record.exit_code == 0
    assert logger.state_dict()["run_id"] == run_file.stem.removeprefix("run-")
