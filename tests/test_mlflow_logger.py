"""MLflowLogger: a real local MLflow store (sqlite in a temporary folder), read back with MlflowClient."""

from __future__ import annotations

import csv
import sys

import pytest
from helpers import FakeTrainer, make_classification, make_trainer

from fitkit import Callback
from fitkit.callbacks import MLflowLogger, ModelCheckpoint

mlflow_tracking = pytest.importorskip("mlflow.tracking")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its tables takes seconds); each test its own experiment."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts under ./mlruns


def _client(store):
    return mlflow_tracking.MlflowClient(tracking_uri=store)


def _history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow  # a real sqlite store: creating its tables takes seconds
def test_fit_logs_params_every_epoch_steps_and_finishes(store, request):
    x, y = make_classification(n=16)
    logger = MLflowLogger(
        request.node.name, tracking_uri=store, params={"model": "tiny", "seed": 0}, log_every_n_steps=1
    )
    trainer = make_trainer(metrics=["accuracy"], callbacks=[logger])
    history = trainer.fit((x, y), (x, y), epochs=3, batch_size=8)  # 2 optimizer steps per epoch
    client = _client(store)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == request.node.name
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        # x: the global step at each epoch's end, as TensorBoard and CSVLogger's step column
        assert _history(client, logger.run_id, key) == [(2 * (e + 1), history.history[key][e]) for e in range(3)]
    assert [s for s, _ in _history(client, logger.run_id, "step/loss")] == [1, 2, 3, 4, 5, 6]
    assert _history(client, logger.run_id, "step/lr") == [(s, 0.1) for s in range(1, 7)]
    params = run.data.params
    assert params["model"] == "tiny" and params["seed"] == "0"
    assert params["optimizer"] == "SGD" and float(params["lr"]) == 0.1 and params["epochs"] == "3"
    assert params["batch_size"] == "8" and params["precision"] == "32"


@pytest.mark.slow  # a real sqlite store: creating its tables takes seconds
def test_a_step_level_validation_is_logged_at_its_global_step(store, request):
    logger, trainer = MLflowLogger(request.node.name, tracking_uri=store), FakeTrainer()
    trainer.validate_every_n_steps = 4  # what fit(validate_every_n_steps=4) sets
    logger.set_trainer(trainer)
    logger.on_train_begin({})
    trainer.state.global_step = 4
    logger.on_validation_end({"val_loss": 0.5, "val_accuracy": 0.75, "step": 4, "epoch": 0})
    logger.on_validation_end({"loss": 0.25, "step": 8, "epoch": 1})  # unprefixed keys get val_
    logger.on_validation_end({"loss": 9.0})  # evaluate(): no step, not logged
    logger.on_epoch_end(1, {"loss": 1.0, "val_loss": 0.25})
    logger.on_train_end({})
    client = _client(store)
    assert _history(client, logger.run_id, "step/val_loss") == [(4, 0.5), (8, 0.25)]
    assert _history(client, logger.run_id, "step/val_accuracy") == [(4, 0.75)]
    assert _history(client, logger.run_id, "val_loss") == [(4, 0.25)]  # the epoch's end: global step 4


@pytest.mark.slow  # a real sqlite store: creating its tables takes seconds
def test_without_step_level_validation_validations_come_with_the_epoch_logs(store, request):
    logger, trainer = MLflowLogger(request.node.name, tracking_uri=store), FakeTrainer()
    logger.set_trainer(trainer)
    logger.on_train_begin({})
    logger.on_validation_end({"val_loss": 0.5, "step": 2, "epoch": 0})  # an epoch-level validation in fit
    logger.on_epoch_end(0, {"loss": 1.0, "val_loss": 0.5})
    logger.on_train_end({})
    client = _client(store)
    assert _history(client, logger.run_id, "step/val_loss") == []
    assert _history(client, logger.run_id, "val_loss") == [(0, 0.5)]


class _Raise(Callback):
    def __init__(self, exception: BaseException) -> None:
        self.exception = exception

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise self.exception


@pytest.mark.slow  # a real sqlite store: creating its tables takes seconds
@pytest.mark.slow  # a real sqlite store: creating its tables takes seconds
@pytest.mark.parametrize("exception, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_the_run_status_says_how_fit_ended(store, request, exception, status):
    x, y = make_classification(n=16)
    logger = MLflowLogger(request.node.name, tracking_uri=store)
    trainer = make_trainer(callbacks=[logger, _Raise(exception)])
    with pytest.raises(type(exception)):
        trainer.fit((x, y), epochs=3, batch_size=8)
    client = _client(store)
    assert client.get_run(logger.run_id).info.status == status
    assert [s for s, _ in _history(client, logger.run_id, "loss")] == [2, 4]


@pytest.mark.slow  # a real sqlite store: creating its tables takes seconds
def test_a_resumed_fit_continues_the_same_run(store, request, tmp_path):
    x, y = make_classification(n=16)
    name = request.node.name
    first_logger = MLflowLogger(name, tracking_uri=store, log_every_n_steps=1)
    first = make_trainer(callbacks=[first_logger])
    first.fit((x, y), epochs=1, batch_size=8)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    resumed_logger = MLflowLogger(name, tracking_uri=store, log_every_n_steps=1)
    resumed = make_trainer(callbacks=[resumed_logger])
    history = resumed.fit((x, y), epochs=3, batch_size=8, resume=tmp_path / "ckpt.pt")
    assert resumed_logger.run_id == first_logger.run_id
    client = _client(store)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    points = _history(client, resumed_logger.run_id, "loss")
    assert [s for s, _ in points] == [2, 4, 6]
    assert [v for _, v in points][-len(history.history["loss"]) :] == history.history["loss"]
    assert [s for s, _ in _history(client, resumed_logger.run_id, "step/loss")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # a real sqlite store: creating its tables takes seconds
def test_log_checkpoints_uploads_the_files_model_checkpoint_keeps(store, request, tmp_path):
    x, y = make_classification(n=16)
    logger = MLflowLogger(request.node.name, tracking_uri=store, log_checkpoints=True)
    saver = ModelCheckpoint(tmp_path / "ckpt" / "{epoch:02d}.pt", save_top_k=2, save_last=True)
    make_trainer(callbacks=[saver, logger]).fit((x, y), (x, y), epochs=3, batch_size=8)
    artifacts = sorted(f.path for f in _client(store).list_artifacts(logger.run_id, "checkpoints"))
    assert artifacts == sorted(f"checkpoints/{p.name}" for p in (tmp_path / "ckpt").glob("*.pt"))
    assert len(artifacts) == 3  # the two best epochs and last.pt


@pytest.mark.slow  # a real sqlite store: creating its tables takes seconds
def test_reuse_across_fits_keeps_one_run(store, request):
    x, y = make_classification(n=16)
    logger = MLflowLogger(request.node.name, tracking_uri=store)
    trainer = make_trainer(callbacks=[logger])
    trainer.fit((x, y), epochs=1, batch_size=8)
    run_id = logger.run_id
    trainer.fit((x, y), epochs=2, batch_size=8, initial_epoch=1)
    assert logger.run_id == run_id
    assert [s for s, _ in _history(_client(store), run_id, "loss")] == [2, 4]
    state = logger.state_dict()
    assert (state["run_id"], state["params_logged"]) == (run_id, True)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(experiment_name=""), ValueError, r"experiment_name must be a non-empty string, got ''"),
        (dict(tracking_uri=3), TypeError, r"tracking_uri must be None or a string, got int 3"),
        (dict(params=[("a", 1)]), TypeError, r"params must be None or a dict with string keys.*got \[\('a', 1\)\]"),
        (dict(log_every_n_steps=0), ValueError, r"log_every_n_steps must be None .* or an int >= 1 .*got 0"),
        (dict(log_checkpoints="yes"), TypeError, r"log_checkpoints must be True or False, got 'yes'"),
    ],
)
def test_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MLflowLogger(**kwargs)


def test_a_missing_package_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'mlflow package, which is not installed: pip install "fitkit\[mlflow\]"'):
        MLflowLogger()


def test_rank_zero_only_and_no_per_batch_hook_without_step_logging():
    assert MLflowLogger.rank_zero_only is True
    assert "on_batch_end" not in vars(MLflowLogger())
    assert "on_batch_end" in vars(MLflowLogger(log_every_n_steps=5))


class _CountBatches(Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_batch_end(self, batch, logs=None):
        self.count += 1


@pytest.mark.parametrize(
    "uri, match",
    [
        ("bogus://nowhere", r"cannot use the MLflow tracking store 'bogus://nowhere' .*checked before training"),
        (
            "http://127.0.0.1:9",
            r"cannot use the MLflow tracking store 'http://127\.0\.0\.1:9' .*checked before training",
        ),
    ],
    ids=["bogus-uri", "unreachable-server"],
)
def test_an_unusable_tracking_store_fails_before_the_first_batch_within_seconds(uri, match):
    import time

    x, y = make_classification(n=16)
    batches = _CountBatches()
    trainer = make_trainer(callbacks=[batches, MLflowLogger("e", tracking_uri=uri)])
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=match):
        trainer.fit((x, y), epochs=2, batch_size=8)
    assert batches.count == 0
    assert time.perf_counter() - start < 30  # MLflow's own HTTP retries take minutes


@pytest.mark.slow  # a real sqlite store: creating its tables takes seconds
def test_resuming_a_run_missing_from_the_store_fails_before_the_first_batch(store, request, tmp_path):
    x, y = make_classification(n=16)
    first_logger = MLflowLogger(request.node.name, tracking_uri=store)
    first = make_trainer(callbacks=[first_logger])
    first.fit((x, y), epochs=1, batch_size=8)
    first.save_checkpoint(tmp_path / "ckpt.pt")
    other_store = f"sqlite:///{tmp_path / 'other.db'}"  # the run was logged elsewhere
    batches = _CountBatches()
    resumed = make_trainer(callbacks=[batches, MLflowLogger(request.node.name, tracking_uri=other_store)])
    with pytest.raises(RuntimeError, match=rf"continues the MLflow run {first_logger.run_id}, which .* does not hold"):
        resumed.fit((x, y), epochs=3, batch_size=8, resume=tmp_path / "ckpt.pt")
    assert batches.count == 0


@pytest.mark.slow  # a real sqlite store and three loggers: seconds
def test_tensorboard_csv_and_mlflow_put_each_point_at_the_same_x(store, request, tmp_path):
    # Issue 19: TensorBoard drew an epoch at the 0-based index of its last step, MLflow at the epoch's index and
    # the CSV had no step at all: one point, three x values. Now every logger uses the global step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fitkit.callbacks import CSVLogger, TensorBoard

    x, y = make_classification(n=24)  # 3 optimizer steps per epoch
    mlflow = MLflowLogger(request.node.name, tracking_uri=store, log_every_n_steps=1)
    loggers = [TensorBoard(tmp_path / "tb", update_freq=1), CSVLogger(tmp_path / "log.csv"), mlflow]
    trainer = make_trainer(callbacks=loggers)
    history = trainer.fit((x, y), (x, y), epochs=3, batch_size=8, validate_every_n_steps=2)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    client = _client(store)

    def tensorboard(tag):
        return [e.step for e in events.Scalars(tag)]

    def mlflow_steps(key):
        return [m.step for m in client.get_metric_history(mlflow.run_id, key)]

    with open(tmp_path / "log.csv") as f:
        csv_steps = [int(row["step"]) for row in csv.DictReader(f)]
    with open(tmp_path / "log_validations.csv") as f:
        csv_validation_steps = [int(row["step"]) for row in csv.DictReader(f)]
    epoch_ends = [3, 6, 9]
    assert csv_steps == tensorboard("epoch/val_loss") == mlflow_steps("val_loss") == epoch_ends
    assert tensorboard("epoch/loss") == mlflow_steps("loss") == epoch_ends
    assert tensorboard("step/loss") == mlflow_steps("step/loss") == list(range(1, 10))
    validations = [v["step"] for v in history.validations]
    assert csv_validation_steps == tensorboard("step/val_loss") == mlflow_steps("step/val_loss") == validations
    assert trainer.global_step == 9
