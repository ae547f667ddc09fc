"""Issue 10's "must never happen" list: each case as it was seen, now refused or exact."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from resume_utils import CTX, build, final_state
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import BackupAndRestore, EarlyStopping, ModelCheckpoint
from fitkit.callbacks._files import check_file_collisions, collide


class Script(fitkit.Callback):
    """Writes scripted values into the epoch logs as ``score``."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        logs["score"] = self.values[epoch]


def _pt(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.pt"))


# -- 1. a checkpoint's contents never choose which files get deleted ----------------------------
def test_a_loaded_list_of_kept_files_cannot_delete_files_outside_the_folder(tmp_path: Path) -> None:
    victim, sibling = tmp_path / "victim.pt", tmp_path / "run" / "ckpt" / "notes.pt"
    ckpt_dir = tmp_path / "run" / "ckpt"
    trainer, train, val = build(callbacks=[ModelCheckpoint(ckpt_dir / "e{epoch}.pt", monitor="val_loss", save_top_k=2)])
    trainer.fit(train, val, epochs=1)
    victim.write_bytes(b"precious")
    torch.save({"mine": torch.ones(1)}, sibling)
    checkpoint.trust(sibling)  # listed in the manifest, but not a file of this template
    # A crafted checkpoint: vouched for by the manifest, weights-only loadable, with a hostile kept list.
    state = checkpoint.load(ckpt_dir / "e1.pt")
    state["callbacks"]["ModelCheckpoint"]["kept"] = [
        [-1e9, 0, str(victim)],
        [-1e9, 0, str(ckpt_dir / ".." / ".." / "victim.pt")],
        [-1e9, 0, str(sibling)],
    ]
    state["callbacks"]["ModelCheckpoint"]["pending_removal"] = [str(victim), str(sibling)]
    checkpoint.atomic_save(state, ckpt_dir / "e1.pt", {"kind": "full", "epoch": 1, "global_step": 6})
    trainer, train, val = build(callbacks=[ModelCheckpoint(ckpt_dir / "e{epoch}.pt", monitor="val_loss", save_top_k=1)])
    with pytest.warns(UserWarning, match=r"lists 3 kept file\(s\) outside this callback's folder or template"):
        trainer.fit(train, val, epochs=4, resume=ckpt_dir / "e1.pt")
    assert victim.read_bytes() == b"precious" and sibling.exists()


def test_resuming_into_another_folder_never_deletes_the_old_run(tmp_path: Path) -> None:
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    trainer, train, val = build(callbacks=[ModelCheckpoint(run1 / "e{epoch}.pt", monitor=None, save_top_k=2)])
    trainer.fit(train, val, epochs=3)
    assert _pt(run1) == ["e2.pt", "e3.pt"]
    trainer, train, val = build(callbacks=[ModelCheckpoint(run2 / "e{epoch}.pt", monitor=None, save_top_k=2)])
    with pytest.warns(UserWarning, match="outside this callback's folder"):
        trainer.fit(train, val, epochs=6, resume=run1 / "e3.pt")
    assert _pt(run1) == ["e2.pt", "e3.pt"]
    assert _pt(run2) == ["e5.pt", "e6.pt"]


# -- 3. no silent restart over existing checkpoints ---------------------------------------------
def _two_epochs(folder: Path, template: str = "e{epoch}.pt") -> None:
    trainer, train, val = build(callbacks=[ModelCheckpoint(folder / template, monitor=None)])
    trainer.fit(train, val, epochs=2)


def test_resume_auto_refuses_checkpoints_without_a_manifest_and_trust_vouches_for_them(tmp_path: Path) -> None:
    _two_epochs(tmp_path / "ckpt")
    (tmp_path / "ckpt" / checkpoint.MANIFEST).unlink()  # copied to another machine without it
    before = (tmp_path / "ckpt" / "e2.pt").read_bytes()
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "ckpt" / "e{epoch}.pt", monitor=None)])
    with pytest.raises(checkpoint.CheckpointError, match=r"found 2 file\(s\) that no fitkit manifest vouches .*e2\.pt.*"
                       r"fitkit\.checkpoint\.trust\(path\)"):  # fmt: skip
        trainer.fit(train, val, epochs=4, resume="auto")
    assert (tmp_path / "ckpt" / "e2.pt").read_bytes() == before  # nothing overwritten
    # The documented way: vouch for the file, then resume="auto" continues from it.
    record = checkpoint.trust(tmp_path / "ckpt" / "e2.pt")
    assert record["kind"] == "full" and record["epoch"] == 2
    checkpoint.trust(tmp_path / "ckpt" / "e1.pt")
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "ckpt" / "e{epoch}.pt", monitor=None)])
    trainer.fit(train, val, epochs=4, resume="auto")
    assert trainer.resumed_from == tmp_path / "ckpt" / "e2.pt"
    assert trainer.global_step == 4 * 6  # 6 batches an epoch: two resumed, two trained


def test_resume_auto_refuses_an_unreadable_manifest(tmp_path: Path) -> None:
    _two_epochs(tmp_path / "ckpt")
    (tmp_path / "ckpt" / checkpoint.MANIFEST).write_bytes(b"")  # zero bytes
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "ckpt" / "e{epoch}.pt", monitor=None)])
    with pytest.raises(checkpoint.ManifestError, match="unreadable .*will not rewrite it.*trust"):
        trainer.fit(train, val, epochs=4, resume="auto")
    # Without resume, the write is refused too (before the first epoch), never a silent rewrite.
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "ckpt" / "e{epoch}.pt", monitor=None)])
    with pytest.raises(checkpoint.ManifestError):
        trainer.fit(train, val, epochs=4)
    assert (tmp_path / "ckpt" / checkpoint.MANIFEST).read_bytes() == b""


def test_resume_auto_finds_checkpoints_in_per_epoch_subfolders(tmp_path: Path) -> None:
    _two_epochs(tmp_path / "ckpt", "epoch{epoch}/model.pt")
    assert _pt(tmp_path / "ckpt") == ["epoch1/model.pt", "epoch2/model.pt"]
    trainer, train, val = build(
        callbacks=[ModelCheckpoint(tmp_path / "ckpt" / "epoch{epoch}" / "model.pt", monitor=None)]
    )
    trainer.fit(train, val, epochs=3, resume="auto")
    assert trainer.resumed_from == tmp_path / "ckpt" / "epoch2" / "model.pt"
    assert trainer.global_step == 3 * 6


def test_a_fresh_fit_never_overwrites_another_runs_checkpoints(tmp_path: Path) -> None:
    _two_epochs(tmp_path)
    before = (tmp_path / "e1.pt").read_bytes()
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None)])
    with pytest.raises(
        ValueError, match=r"already holds 2 checkpoint file\(s\) this fit did not write .*resume='auto'"
    ):
        trainer.fit(train, val, epochs=2)
    assert (tmp_path / "e1.pt").read_bytes() == before


def test_fit_twice_with_one_trainer_rewrites_its_own_files_as_keras_does(tmp_path: Path) -> None:
    """Issue 19's re-run policy: the files this trainer wrote are its own; a second fit continues training (as
    Keras's does) and writes its epochs' names again."""
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None)])
    trainer.fit(train, val, epochs=2)
    before = (tmp_path / "e1.pt").read_bytes()
    trainer.fit(train, val, epochs=2)
    assert (tmp_path / "e1.pt").read_bytes() != before  # the second fit's epoch 1, verified by its manifest
    assert checkpoint.verify(tmp_path / "e1.pt")["global_step"] == 3 * 6
    trainer.fit(train, val, epochs=4, initial_epoch=2)  # continuing the numbering is fine too
    assert [n for n in _pt(tmp_path) if n != "crash.pt"] == ["e1.pt", "e2.pt", "e3.pt", "e4.pt"]


def test_a_rerun_over_weights_only_files_is_told_to_restart_and_restart_deletes_only_vouched_files(
    tmp_path: Path,
) -> None:
    def script(resume: Any) -> fitkit.Trainer:
        callback = ModelCheckpoint(tmp_path / "ckpt" / "w{epoch}.pt", monitor=None, save_weights_only=True)
        trainer, train, val = build(callbacks=[callback])
        trainer.fit(train, val, epochs=1, resume=resume)
        return trainer

    script(None)
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")  # not a checkpoint: never touched
    with pytest.raises(ValueError, match=r"this fit did not write .*weights only, so no run can resume from them.*"
                       r"resume='restart'") as refused:  # fmt: skip
        script(None)
    assert "resume='auto'" not in str(refused.value)  # the advice that raised the same error again
    script("restart")  # deletes the files fitkit vouched for, then starts over
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"
    assert checkpoint.verify(tmp_path / "ckpt" / "w1.pt")["kind"] == "weights"


def test_restart_refuses_a_folder_holding_a_checkpoint_no_manifest_vouches_for_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    _two_epochs(tmp_path / "ckpt")
    stranger = tmp_path / "ckpt" / "e7.pt"
    stranger.write_bytes(b"another run's file")
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "ckpt" / "e{epoch}.pt", monitor=None)])
    with pytest.raises(ValueError, match=r"already holds 1 checkpoint file\(s\) this fit did not write .*e7\.pt"):
        trainer.fit(train, val, epochs=2, resume="restart")
    assert stranger.read_bytes() == b"another run's file"
    assert _pt(tmp_path / "ckpt") == ["e1.pt", "e2.pt", "e7.pt"]  # nothing deleted: checked before


@pytest.mark.slow  # three runs of the main example: 18 s
def test_the_main_example_fresh_starts_over_where_a_rerun_resumes(tmp_path: Path, capsys: Any) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_digits", Path(__file__).parents[1] / "examples/train_digits.py"
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = [
        "--epochs",
        "1",
        "--verbose",
        "0",
        "--checkpoint-dir",
        str(tmp_path / "c"),
        "--log-dir",
        str(tmp_path / "r"),
    ]
    example.main(argv)
    example.main([*argv, "--fresh"])
    assert "trained 1 epoch(s)" in capsys.readouterr().out
    assert checkpoint.verify(tmp_path / "c" / "last.pt")["global_step"] > 0


# -- 4. two writers, one folder -----------------------------------------------------------------
def _writer(folder: str, prefix: str, n: int) -> None:
    for i in range(n):
        checkpoint.atomic_save(
            {"w": torch.full((2000,), float(i))}, Path(folder) / f"{prefix}{i}.pt", {"kind": "weights"}
        )


def test_two_processes_writing_one_folder_lose_no_manifest_entry(tmp_path: Path) -> None:
    processes = [CTX.Process(target=_writer, args=(str(tmp_path), p, 25)) for p in ("a", "b")]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    listed = checkpoint.read_manifest(tmp_path)["files"]
    assert sorted(listed) == sorted(f"{p}{i}.pt" for p in ("a", "b") for i in range(25))
    for name in listed:
        checkpoint.verify(tmp_path / name)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("ckpt/e{epoch}.pt", "ckpt/e{epoch:02d}.pt"),
        ("ckpt/best.pt", "ckpt/best.pt"),
        ("ckpt/{epoch}-{val_loss:.2f}.pt", "ckpt/{epoch}-{loss:.3f}.pt"),
    ],
)
def test_two_checkpoint_callbacks_whose_templates_collide_are_refused(a: str, b: str, tmp_path: Path) -> None:
    os.chdir(tmp_path)
    assert collide(a, b)
    with pytest.raises(ValueError, match=r"both can name the same file"):
        fitkit.Trainer(
            torch.nn.Linear(2, 2), "sgd", "mse", callbacks=[ModelCheckpoint(a), ModelCheckpoint(b)], verbose=0
        )


def test_two_save_last_checkpoint_callbacks_in_one_folder_are_refused_when_the_trainer_is_built(
    tmp_path: Path,
) -> None:
    """Both would write ckpt/last.pt: refused before anything runs, not after the first epoch with a crash.pt."""
    callbacks = [
        ModelCheckpoint(tmp_path / "ckpt" / "best.pt", monitor="val_loss", save_best_only=True, save_last=True),
        ModelCheckpoint(tmp_path / "ckpt" / "e{epoch}.pt", monitor=None, save_last=True),
    ]
    with pytest.raises(ValueError, match=r"writes '.*ckpt/last\.pt' and ModelCheckpoint writes '.*ckpt/last\.pt'"):
        fitkit.Trainer(torch.nn.Linear(2, 2), "sgd", "mse", callbacks=callbacks, verbose=0)
    assert not (tmp_path / "ckpt").exists()


def test_backup_and_restore_in_a_model_checkpoint_folder_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BackupAndRestore writes .*backup.pt"):
        check_file_collisions([ModelCheckpoint(tmp_path / "backup.pt"), BackupAndRestore(tmp_path)])
    # Distinct names in one folder are fine; and the user's own backup.pt is never deleted.
    assert not collide(str(tmp_path / "e{epoch}.pt"), str(tmp_path / "backup.pt"))
    assert not collide(str(tmp_path / "e{epoch}.pt"), str(tmp_path / "best.pt"))
    (tmp_path / "backup.pt").write_bytes(b"the user's")
    trainer, train, val = build(callbacks=[BackupAndRestore(tmp_path / "other")])
    trainer.fit(train, val, epochs=1)
    assert (tmp_path / "backup.pt").read_bytes() == b"the user's"


# -- 5. a NaN is never the best ------------------------------------------------------------------
VALUES = [math.nan, 3.0, 2.0, 1.0, 0.5]


def test_a_nan_monitored_value_is_never_kept_as_best(tmp_path: Path) -> None:
    top = ModelCheckpoint(tmp_path / "top" / "e{epoch}.pt", monitor="score", mode="min", save_top_k=2)
    best = ModelCheckpoint(tmp_path / "best" / "e{epoch}.pt", monitor="score", mode="min", save_best_only=True)
    stop = EarlyStopping(monitor="score", mode="min", patience=1, restore_best_weights=True)
    trainer, train, val = build(callbacks=[Script(VALUES), top, best, stop])
    trainer.fit(train, val, epochs=len(VALUES))
    assert _pt(tmp_path / "top") == ["e4.pt", "e5.pt"]
    assert _pt(tmp_path / "best") == ["e2.pt", "e3.pt", "e4.pt", "e5.pt"]
    assert stop.stopped_epoch == 0 and stop.best == 0.5 and stop.best_epoch == 4


# -- 6. SIGTERM during validation ----------------------------------------------------------------
class TermDuringValidation(fitkit.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_validation_batch_end(self, batch: int, logs: Any = None) -> None:
        if (self.trainer.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_resumes_exactly(tmp_path: Path) -> None:
    trainer, train, val = build()
    trainer.fit(train, val, epochs=3)
    reference = final_state(trainer)
    trainer, train, val = build(callbacks=[TermDuringValidation(1, 1), ModelCheckpoint(tmp_path / "e{epoch}.pt")])
    with pytest.raises(SystemExit):
        trainer.fit(train, val, epochs=3)
    assert (tmp_path / "last.pt").exists()
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt")])
    trainer.fit(train, val, epochs=3, resume=tmp_path / "last.pt")
    resumed = final_state(trainer)
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert reference["history"]["loss"][-1] == resumed["history"]["loss"][-1]


# -- 8. a user's seeded DataLoader keeps its order after a resume ---------------------------------
def _seeded(callbacks: list[Any]) -> tuple[fitkit.Trainer, DataLoader]:
    fitkit.seed_everything(0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(7))  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return fitkit.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", callbacks=callbacks,
                          verbose=0), loader  # fmt: skip


def test_a_users_seeded_dataloader_keeps_its_order_after_a_mid_epoch_resume(tmp_path: Path) -> None:
    trainer, loader = _seeded([])
    trainer.fit(loader, epochs=3)
    reference = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    class StopAt11(fitkit.Callback):
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == 11:
                self.trainer.stop("test")

    trainer, loader = _seeded([StopAt11(), ModelCheckpoint(tmp_path / "s{step}.pt", save_freq=1, monitor=None)])
    trainer.fit(loader, epochs=3)
    trainer, loader = _seeded([])
    trainer.fit(loader, epochs=3, resume=tmp_path / "s11.pt")
    for key, value in reference.items():
        assert torch.equal(value, trainer.model.state_dict()[key]), key


# -- 9. leftovers --------------------------------------------------------------------------------
def test_a_kill_between_a_write_and_its_top_k_removal_leaves_no_extra_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_top_k=2)])
    trainer.fit(train, val, epochs=2)
    # As if SIGKILLed right after e3 was written, before e1 was removed.
    monkeypatch.setattr(ModelCheckpoint, "_remove_pending", lambda self: None)
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_top_k=2)])
    trainer.fit(train, val, epochs=3, resume="auto")
    assert _pt(tmp_path) == ["e1.pt", "e2.pt", "e3.pt"]
    monkeypatch.undo()
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "e{epoch}.pt", monitor=None, save_top_k=2)])
    trainer.fit(train, val, epochs=4, resume="auto")
    assert _pt(tmp_path) == ["e3.pt", "e4.pt"]


def test_stale_temporary_manifests_are_removed_at_the_next_write(tmp_path: Path) -> None:
    stale = tmp_path / f".{checkpoint.MANIFEST}.99999999.tmp"
    stale.write_text("{")
    dead_writer = tmp_path / ".a.pt.99999999.tmp"
    dead_writer.write_bytes(b"half")
    checkpoint.atomic_save({"w": torch.zeros(1)}, tmp_path / "a.pt")
    assert not stale.exists() and not dead_writer.exists()


# -- misc trust --------------------------------------------------------------------------------
def test_trust_refuses_a_crafted_pickle(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": hashlib.sha256}, path)  # needs a global: refused by weights_only
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        checkpoint.trust(path)
    assert checkpoint.MANIFEST not in os.listdir(tmp_path)


def test_verify_names_trust_as_the_way_to_load_a_file_without_manifest(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"fitkit\.checkpoint\.trust\("):
        checkpoint.verify(tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.trust(tmp_path / "w.pt")
    checkpoint.verify(tmp_path / "w.pt")


@pytest.mark.parametrize("function", [checkpoint.load, checkpoint.verify, checkpoint.trust])
@pytest.mark.parametrize("path", [None, "", 3])
def test_the_checkpoint_functions_name_a_path_that_is_no_path(function: Any, path: Any) -> None:
    with pytest.raises(
        TypeError, match=rf"^fitkit\.checkpoint\.{function.__name__}\(\) takes the path of a checkpoint"
    ):
        function(path)


def test_resuming_from_a_folder_of_checkpoints_names_its_files_and_resume_auto(tmp_path: Path) -> None:
    trainer, train, _ = build(callbacks=[ModelCheckpoint(str(tmp_path / "ckpt" / "e{epoch}.pt"), monitor=None)])
    trainer.fit(train, epochs=2)
    again, train, _ = build()
    with pytest.raises(checkpoint.CheckpointError) as caught:
        again.fit(train, epochs=3, resume=str(tmp_path / "ckpt"))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'ckpt'} is a folder, not a checkpoint: give one checkpoint file, e.g. ")
    assert "(it holds e1.pt, e2.pt), or resume='auto'" in message
    assert again.global_step == 0


# -- a crash-restart may rewrite what the crashed process wrote after its last backup -------------------
class _CrashAfterEpochWrites(fitkit.Callback):
    """Raises after epoch ``epoch``'s checkpoint files are written (listed last, its action runs last)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if epoch == self.epoch:
            self.trainer.after_callbacks(lambda: os.kill(os.getpid(), signal.SIGKILL))


def _crash_restart_job(folder: str, crash: bool) -> None:
    root = Path(folder)
    callbacks: list[Any] = [
        BackupAndRestore(root / "backup", save_freq=1, delete_checkpoint=False),
        ModelCheckpoint(root / "ckpt" / "best.pt", monitor="val_loss", save_best_only=True, save_last=True),
        ModelCheckpoint(root / "top" / "e{epoch}.pt", monitor="val_loss", save_top_k=2),
    ]
    trainer, train, val = build(callbacks=callbacks + ([_CrashAfterEpochWrites(1)] if crash else []))
    trainer.fit(train, val, epochs=3)
    checkpoint.atomic_save(final_state(trainer), root / "final.pt")


def test_a_restart_after_a_kill_rewrites_the_files_its_run_wrote_after_the_last_backup(tmp_path: Path) -> None:
    from resume_utils import assert_same_state, run_child

    reference = run_child(_crash_restart_job, str(tmp_path / "reference"), False)
    reference.join(60)
    killed = run_child(_crash_restart_job, str(tmp_path / "run"), True)
    killed.join(60)
    assert killed.exitcode == -signal.SIGKILL
    # The kill came after epoch 2's files (e2.pt, best.pt, last.pt) but before the next backup: the restart
    # replays epoch 2's end and writes those names again, as the uninterrupted run did.
    assert checkpoint.load(tmp_path / "run" / "backup" / "backup.pt")["trainer"]["global_step"] == 12
    restarted = run_child(_crash_restart_job, str(tmp_path / "run"), False)
    restarted.join(60)
    assert restarted.exitcode == 0
    assert_same_state(
        checkpoint.load(tmp_path / "run" / "final.pt"), checkpoint.load(tmp_path / "reference" / "final.pt")
    )
    for sub in ("ckpt", "top"):
        assert _pt(tmp_path / "run" / sub) == _pt(tmp_path / "reference" / sub)
    for name in ("ckpt/best.pt", "ckpt/last.pt", "top/e3.pt"):
        ours, theirs = (checkpoint.load(tmp_path / run / name)["model"] for run in ("run", "reference"))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_a_new_run_in_a_folder_of_another_run_is_still_refused_after_a_resume(tmp_path: Path) -> None:
    """The run id vouches only for the resumed run's own files: another run's are still refused."""
    _two_epochs(tmp_path / "other")
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "mine" / "e{epoch}.pt", monitor=None)])
    trainer.fit(train, val, epochs=1)
    trainer.save_checkpoint(tmp_path / "mine.pt")
    trainer, train, val = build(callbacks=[ModelCheckpoint(tmp_path / "other" / "e{epoch}.pt", monitor=None)])
    with pytest.raises(ValueError, match=r"already holds 2 checkpoint file\(s\) this fit did not write"):
        trainer.fit(train, val, epochs=3, resume=tmp_path / "mine.pt")
