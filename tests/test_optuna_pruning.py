"""OptunaPruning with a real in-memory Optuna study and median pruner."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import TinyNet, make_classification, make_trainer

from fitkit import Callback
from fitkit.callbacks import OptunaPruning

optuna = pytest.importorskip("optuna")


class _Ended(Callback):
    def __init__(self) -> None:
        self.ended = 0

    def on_train_end(self, logs=None):
        self.ended += 1


def test_a_median_pruner_prunes_the_bad_learning_rates():
    x, y = make_classification(n=64, seed=1)
    ended = _Ended()

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-6, 1.0, log=True)
        torch.manual_seed(0)
        trainer = make_trainer(TinyNet(hidden=16), lr=lr, callbacks=[OptunaPruning(trial), ended])
        history = trainer.fit((x[:48], y[:48]), (x[48:], y[48:]), epochs=8, batch_size=8)
        return history.history["val_loss"][-1]

    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    for lr in (0.5, 0.3, 1e-6, 2e-6):  # two good runs set the median; the tiny rates learn nothing
        study.enqueue_trial({"lr": lr})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=4)
    states = {t.params["lr"]: t.state for t in study.trials}
    assert states[1e-6] == states[2e-6] == optuna.trial.TrialState.PRUNED
    assert states[0.5] == states[0.3] == optuna.trial.TrialState.COMPLETE
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(sorted(t.intermediate_values) == list(range(len(t.intermediate_values))) for t in pruned)
    assert [len(t.intermediate_values) for t in pruned] == [2, 2]  # pruned at the first step past warm-up
    assert ended.ended == 4  # every fit ran on_train_end, the pruned ones too
    assert study.best_params["lr"] == 0.5


def test_reports_each_step_level_validation_at_its_step():
    x, y = make_classification(n=32, seed=1)
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    trainer = make_trainer(callbacks=[OptunaPruning(trial)])
    trainer.fit((x, y), (x, y), epochs=2, batch_size=8, validate_every_n_steps=3, validation_freq=None)
    assert sorted(trial.storage.get_trial(trial._trial_id).intermediate_values) == [3, 6]


def test_a_missing_monitor_key_names_the_keys():
    x, y = make_classification(n=16, seed=1)
    trial = optuna.create_study().ask()
    trainer = make_trainer(callbacks=[OptunaPruning(trial, monitor="val_accuracy")])
    with pytest.raises(
        KeyError,
        match=r"OptunaPruning\(monitor='val_accuracy'\): no such key in the logs; available: \['loss', 'lr', 'val_loss'\]",
    ):
        trainer.fit((x, y), (x, y), epochs=1, batch_size=8)


def test_arguments_and_the_missing_package(monkeypatch):
    with pytest.raises(TypeError, match=r"trial must be the optuna.trial.Trial your objective receives, got str"):
        OptunaPruning("trial")
    with pytest.raises(ValueError, match=r"monitor must be a non-empty log key such as 'val_loss', got ''"):
        OptunaPruning(optuna.create_study().ask(), monitor="")
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r'optuna package, which is not installed: pip install "fitkit\[optuna\]"'):
        OptunaPruning(None)


def _pruned_on_ranks(rank: int, out) -> dict:
    x, y = make_classification(n=32, seed=1)
    trial = None
    if rank == 0:  # the study lives on rank 0; other ranks pass None
        study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # prunes any loss
        trial = study.ask()
    trainer = make_trainer(callbacks=[OptunaPruning(trial)])
    try:
        trainer.fit((x, y), (x, y), epochs=3, batch_size=8)
    except optuna.TrialPruned as exc:
        return {"pruned": str(exc), "epoch": trainer.epoch, "world": trainer.world_size}
    return {"pruned": None, "epoch": trainer.epoch, "world": trainer.world_size}


@pytest.mark.distributed
@pytest.mark.slow
def test_under_ddp_rank_zero_decides_for_every_rank(tmp_path):
    from dist_utils import run_ranks

    ranks = run_ranks(_pruned_on_ranks, tmp_path).check()
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["pruned"] == ranks[1]["pruned"] and ranks[0]["pruned"].startswith("trial pruned at epoch 1")
    assert ranks[0]["epoch"] == ranks[1]["epoch"]


def test_a_finished_trial_is_refused_before_the_first_batch():
    x, y = make_classification(n=16, seed=1)
    study = optuna.create_study()
    trial = study.ask()
    study.tell(trial, 0.5)  # the objective already returned: a re-used trial
    batches = []
    trainer = make_trainer(callbacks=[OptunaPruning(trial), Callback()])
    trainer.callbacks[1].on_batch_end = lambda batch, logs=None: batches.append(batch)
    with pytest.raises(ValueError, match=r"OptunaPruning: trial 0 is already finished \(COMPLETE\).*checked before"):
        trainer.fit((x, y), (x, y), epochs=1, batch_size=8)
    assert batches == []
