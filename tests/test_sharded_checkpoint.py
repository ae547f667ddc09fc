"""Sharded (DCP) checkpoint directories: the manifest entry of a directory, safe reading, exact resume in
one process, and under FSDP on forked gloo ranks: every rank writes its shard, a resume reads each rank's
part, an incomplete or uncommitted checkpoint is skipped, and another world size loads with a warning."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_utils import run_ranks, run_single
from resume_utils import assert_same_state, build, final_state
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fitkit
from fitkit import checkpoint, sharded_checkpoint, strategies
from fitkit.callbacks import BackupAndRestore, ModelCheckpoint


class _SaveShardedAndCrash(fitkit.Callback):
    """Writes a DCP checkpoint after every callback of step ``step`` ran, then 'crashes'."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def _save_then_crash(self) -> None:
        sharded_checkpoint.save(self.trainer, self.path)
        raise RuntimeError("simulated crash")

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.trainer.global_step == self.step:
            self.trainer.after_callbacks(self._save_then_crash)


def _sgd_build(**kwargs: Any) -> tuple[fitkit.Trainer, Any, Any]:
    """resume_utils.build with plain SGD: an optimizer without state (saved by parameter position)."""
    trainer, train, val = build(**kwargs)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    return trainer, train, val


# -- one process --------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [build, _sgd_build], ids=["adam", "stateless-sgd"])
@pytest.mark.parametrize("step", [3, 6])  # mid-epoch, and the end of the first epoch
def test_a_dcp_directory_resumes_bit_exactly(tmp_path: Path, builder: Any, step: int) -> None:
    trainer, train, val = builder()
    trainer.fit(train, val, epochs=2)
    reference = final_state(trainer)

    path = tmp_path / "ckpt" / "step.pt"
    trainer, train, val = builder(callbacks=[_SaveShardedAndCrash(path, step)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(train, val, epochs=2)
    assert path.is_dir()
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "fitkit-state.pt"]
    record = checkpoint.verify(path)
    assert record["kind"] == "full" and record["layout"] == "dcp" and record["global_step"] == step
    assert set(record["files"]) == {".metadata", "__0_0.distcp", "fitkit-state.pt"}

    trainer, train, val = builder(seed=99)  # another process's random state
    trainer.fit(train, val, epochs=2, resume=path)
    assert_same_state(final_state(trainer), reference)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_a_dcp_directory_of_cuda_tensors_resumes_bit_exactly(tmp_path: Path) -> None:
    trainer, _, _ = build()
    assert trainer.device.type == "cuda"  # the Trainer's default device: DCP copies the shards from the GPU
    test_a_dcp_directory_resumes_bit_exactly(tmp_path, build, 3)


def _committed(tmp_path: Path, name: str = "ck.pt", files: dict[str, bytes] | None = None) -> Path:
    """A directory committed with the given files (default: two shards and a state file)."""
    path = tmp_path / name
    tmp = checkpoint.temporary_directory(path)
    for rel, data in (files or {"__0_0.distcp": b"zero", "__1_0.distcp": b"one", "fitkit-state.pt": b"s"}).items():
        (tmp / rel).write_bytes(data)
    checkpoint.commit_directory(tmp, path, {"kind": "full", "global_step": 1})
    return path


def test_a_directory_counts_only_when_every_file_is_in_place(tmp_path: Path) -> None:
    path = _committed(tmp_path)
    assert checkpoint.verify(path)["files"]["__1_0.distcp"]["size"] == 3
    assert not list(tmp_path.glob(".*.tmp"))  # committed: no temporary left
    (path / "__1_0.distcp").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"is incomplete or corrupted \(__1_0.distcp is missing\)"):
        checkpoint.verify(path)
    path = _committed(tmp_path, "b.pt")
    (path / "__0_0.distcp").write_bytes(b"ZERO")  # same size, other bytes
    with pytest.raises(checkpoint.CheckpointError, match=r"\(__0_0.distcp does not match its SHA-256\)"):
        checkpoint.verify(path)
    (path / "__0_0.distcp").write_bytes(b"zero!")
    with pytest.raises(checkpoint.CheckpointError, match=r"\(__0_0.distcp has 5 bytes, the manifest says 4\)"):
        checkpoint.verify(path)
    uncommitted = tmp_path / "c.pt"
    uncommitted.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match=r"c\.pt is a folder, not a checkpoint: give one checkpoint"):
        checkpoint.verify(uncommitted)  # nothing of a sharded checkpoint in it
    (uncommitted / ".metadata").write_bytes(b"dcp")  # a sharded checkpoint copied without its manifest
    with pytest.raises(checkpoint.CheckpointError, match=r"is not listed in .*fitkit-manifest.json: fitkit did not"):
        checkpoint.verify(uncommitted)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_recommitting_a_name_swaps_the_directory_and_leaves_no_temporary(
    tmp_path: Path, exchange: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not exchange:
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    _committed(tmp_path, files={"__0_0.distcp": b"old", "old-only": b"x"})
    path = _committed(tmp_path, files={"__0_0.distcp": b"new"})
    assert (path / "__0_0.distcp").read_bytes() == b"new" and not (path / "old-only").exists()
    assert list(checkpoint.verify(path)["files"]) == ["__0_0.distcp"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and "lock" not in p.name] == []
    # A file (a single-file checkpoint of the same name) is replaced by a directory too.
    checkpoint.atomic_save({"a": 1}, tmp_path / "f.pt", {"kind": "full"})
    _committed(tmp_path, "f.pt")
    assert (tmp_path / "f.pt").is_dir() and checkpoint.verify(tmp_path / "f.pt")


def test_removing_a_directory_deletes_only_the_files_its_entry_lists(tmp_path: Path) -> None:
    path = _committed(tmp_path)
    checkpoint.remove_checkpoint(path)
    assert not path.exists() and path.name not in checkpoint.read_manifest(tmp_path)["files"]
    path = _committed(tmp_path)
    (path / "notes.txt").write_text("mine")
    with pytest.warns(
        UserWarning, match=r"left the directory: it holds files fitkit did not write \(\['notes.txt'\]\)"
    ):
        checkpoint.remove_checkpoint(path)
    assert [p.name for p in path.iterdir()] == ["notes.txt"]


def test_a_manifest_entry_naming_files_outside_the_directory_deletes_and_trusts_nothing(tmp_path: Path) -> None:
    path = _committed(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    manifest = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    manifest["files"][path.name]["versions"][0]["files"]["../victim.txt"] = {"size": 7, "sha256": "0"}
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match=r"names '../victim.txt', outside the directory"):
        checkpoint.verify(path)
    checkpoint.remove_checkpoint(path)  # the files it lists inside the directory go, nothing outside
    assert not path.exists() and victim.read_text() == "keep me"


def test_resume_auto_sees_directories_as_one_checkpoint_and_ignores_temporaries(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    old = _committed(folder, "e1.pt")
    new = _committed(folder, "e2.pt")
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    manifest["files"]["e2.pt"]["versions"][0]["global_step"] = 2
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    stale = folder / ".e3.pt.999999.tmp"  # a killed save's shards: never a candidate, never "unvouched"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    assert checkpoint.unvouched_files(folder) == []
    assert checkpoint.newest_good([folder], "skip") == new
    (new / "__1_0.distcp").unlink()
    with pytest.warns(UserWarning, match=r"skip: the checkpoint directory .*e2.pt is incomplete"):
        assert checkpoint.newest_good([folder], "skip") == old
    assert checkpoint.unvouched_files(folder) == [new]  # reported as one, not file by file
    stranger = folder / "e9.pt"  # a DCP directory no manifest lists
    stranger.mkdir()
    (stranger / ".metadata").write_bytes(b"")
    (stranger / "__0_0.distcp").write_bytes(b"")
    assert stranger in checkpoint.unvouched_files(folder)
    _committed(folder, "e4.pt")  # the next commit in the folder clears temporaries of dead writers
    assert not stale.exists()


def _saved_run(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt" / "step.pt"
    trainer, train, val = build(callbacks=[_SaveShardedAndCrash(path, 3)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(train, val, epochs=2)
    return path


def test_trust_vouches_for_a_copied_dcp_directory(tmp_path: Path) -> None:
    path = _saved_run(tmp_path)
    copy = tmp_path / "copied" / "step.pt"
    shutil.copytree(path, copy)
    with pytest.raises(checkpoint.CheckpointError, match=r"is not listed in"):
        checkpoint.verify(copy)
    record = checkpoint.trust(copy)
    assert record["kind"] == "full" and record["global_step"] == 3 and record["trusted"]
    assert checkpoint.verify(copy)["sha256"] == checkpoint.verify(path)["sha256"]
    trainer, train, val = build()
    trainer.fit(train, val, epochs=1, resume=copy)
    assert trainer.global_step == 6


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch ran-code",))


def test_a_crafted_metadata_file_is_refused_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _saved_run(tmp_path)
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    shutil.rmtree(tmp_path / "ckpt" / checkpoint.MANIFEST, ignore_errors=True)
    (tmp_path / "ckpt" / checkpoint.MANIFEST).unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"its .metadata is not DCP metadata that fitkit can read"):
        checkpoint.trust(path)  # trust reads the metadata with fitkit's restricted unpickler
    assert not (tmp_path / "ran-code").exists()


def test_metadata_that_asks_dcp_to_unpickle_objects_is_refused(tmp_path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_save({"x": torch.zeros(2), "obj": {"a": [1, 2]}}, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    with pytest.raises(checkpoint.CheckpointError, match=r"stores pickled Python objects \(\['obj.a'\]\)"):
        checkpoint.read_sharded_metadata(tmp_path)


def test_loading_into_another_architecture_names_the_difference(tmp_path: Path) -> None:
    path = _saved_run(tmp_path)
    fitkit.seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))  # no Dropout: other keys
    trainer = fitkit.Trainer(model, torch.optim.Adam(model.parameters()), "cross_entropy", verbose=0)
    with pytest.raises(checkpoint.CheckpointError, match=r"^checkpoint model architecture mismatch: .*'3.bias'"):
        trainer.load_checkpoint(path)
    trainer, _, _ = build()
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(checkpoint.CheckpointError, match=r"^checkpoint optimizer type mismatch: .* Adam, .* SGD"):
        trainer.load_checkpoint(path)


# -- FSDP on forked gloo ranks --------------------------------------------------------------------
N = 96  # 2 ranks x 3 batches of 16


def _data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())


def _dcp_job(
    rank: int,
    out: Path,
    kill_at: int | None = None,
    crash_commit: int | None = None,
    backup: bool = True,
    weights_file: bool = True,
    epochs: int = 3,
    resume: Any = None,
    fsdp: bool = True,
) -> dict[str, Any]:
    folder = out.parent
    callbacks: list[Any] = [ModelCheckpoint(folder / "ckpt" / "e{epoch}.pt", monitor=None)]
    if weights_file:
        callbacks.append(ModelCheckpoint(folder / "weights" / "w{epoch}.pt", monitor=None, save_weights_only=True))
    if backup:
        callbacks.append(BackupAndRestore(folder / "backup", save_freq=1, delete_checkpoint=False))

    class Die(fitkit.Callback):  # after the writes of step kill_at, every rank dies at once
        def on_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.trainer.global_step == kill_at:
                self.trainer.after_callbacks(lambda: os._exit(9))

    calls = {"gathers": 0, "commits": 0}
    full_optimizer, commit = strategies.FSDP.optimizer_state_dict, checkpoint.commit_directory

    def counting_optimizer(*args: Any) -> Any:  # the full-checkpoint path gathers optimizer states
        calls["gathers"] += 1
        return full_optimizer(*args)

    def crashing_commit(*args: Any, **kwargs: Any) -> Any:  # rank 0 dies after every shard is written
        calls["commits"] += 1
        if calls["commits"] == crash_commit:
            os._exit(9)
        return commit(*args, **kwargs)

    strategies.FSDP.optimizer_state_dict = counting_optimizer  # type: ignore[method-assign]
    checkpoint.commit_directory = crashing_commit  # type: ignore[assignment]
    reads: list[int] = []
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    read_data = FileSystemReader.read_data

    def recording_read(self: Any, plan: Any, planner: Any) -> Any:
        reads.extend(self.storage_data[item.storage_index].length for item in plan.items)
        return read_data(self, plan, planner)

    FileSystemReader.read_data = recording_read  # type: ignore[method-assign]
    fitkit.seed_everything(0)  # per rank: seed + rank (dropout masks differ between ranks)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    trainer = fitkit.Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        "cross_entropy",
        metrics=["accuracy"],
        callbacks=[*callbacks, Die()],
        device="cpu",
        verbose=0,
        strategy="fsdp" if fsdp and os.environ.get("WORLD_SIZE", "1") != "1" else "auto",
    )
    train = DataLoader(_data(), batch_size=16, shuffle=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(train, DataLoader(_data(40), batch_size=16), epochs=epochs, resume=resume)
    gathers = calls["gathers"]
    return {
        "weights": trainer.model_state_dict(),
        "optimizer": trainer._strategy.optimizer_state_dict(trainer.model, trainer.optimizer),
        "history": history.history,
        "steps": trainer.global_step,
        "gathers": gathers,
        "reads": reads,
        "resumed_from": str(trainer.resumed_from),
        "warnings": [str(w.message) for w in caught],
    }


def _stored_bytes(path: Path) -> int:
    return sum(info.length for info in checkpoint.read_sharded_metadata(path).storage_data.values())


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_dcp_checkpoints_resume_bit_exactly_and_each_rank_reads_its_part(tmp_path: Path) -> None:
    whole = run_ranks(_dcp_job, tmp_path / "whole" / "out").check()
    assert whole[0]["gathers"] == 0  # no full-state checkpoint: nothing gathered the optimizer on one rank
    e3 = tmp_path / "whole" / "ckpt" / "e3.pt"
    assert {p.name for p in e3.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "fitkit-state.pt"}
    assert checkpoint.verify(e3)["world_size"] == 2
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    plain.load_state_dict(torch.load(tmp_path / "whole" / "weights" / "w3.pt", weights_only=True))  # still one file
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in whole[0]["weights"].items())

    killed = run_ranks(_dcp_job, tmp_path / "resumed" / "out", kill_at=4)
    assert killed.exitcodes == [9, 9], killed.errors
    resumed = run_ranks(_dcp_job, tmp_path / "resumed" / "out").check()
    assert resumed[0]["resumed_from"].endswith("backup/backup.pt") and resumed[0]["steps"] == 9
    for key in whole[0]["weights"]:
        assert torch.equal(resumed[0]["weights"][key], whole[0]["weights"][key]), key
    assert resumed[0]["history"] == whole[0]["history"]
    for param, state in whole[0]["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed[0]["optimizer"]["state"][param][key], value), (param, key)
    total = _stored_bytes(tmp_path / "resumed" / "backup" / "backup.pt")
    for rank in resumed:  # each rank read its own shard (plus the few replicated step counts), not all
        assert 0 < sum(rank["reads"]) < 0.6 * total, (sum(rank["reads"]), total)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_save_killed_before_its_commit_does_not_count(tmp_path: Path) -> None:
    whole = run_ranks(_dcp_job, tmp_path / "whole" / "out").check()
    # Commits 1-3: the backups of steps 1-3; 4: ckpt/e1.pt; 5-6: the backups of steps 4-5 (rank 0 dies in 6).
    killed = run_ranks(_dcp_job, tmp_path / "run" / "out", crash_commit=6, timeout=60)
    assert killed.exitcodes[0] == 9 and killed.exitcodes[1] != 0
    folder = tmp_path / "run" / "backup"
    assert [p.name for p in folder.glob(".backup.pt.*.tmp")]  # every shard written, never committed
    assert checkpoint.verify(folder / "backup.pt")["global_step"] == 4
    resumed = run_ranks(_dcp_job, tmp_path / "run" / "out").check()
    assert resumed[0]["steps"] == 9
    for key in whole[0]["weights"]:
        assert torch.equal(resumed[0]["weights"][key], whole[0]["weights"][key]), key
    assert not list(folder.glob(".backup.pt.*.tmp"))  # the next commit cleared the dead writer's directory


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_auto_falls_back_past_a_dcp_checkpoint_missing_a_shard(tmp_path: Path) -> None:
    whole = run_ranks(_dcp_job, tmp_path / "out", backup=False, weights_file=False).check()
    (tmp_path / "ckpt" / "e3.pt" / "__1_0.distcp").unlink()  # rank 1's shard of the newest checkpoint is lost
    resumed = run_ranks(_dcp_job, tmp_path / "out", backup=False, weights_file=False, resume="auto").check()
    assert resumed[0]["resumed_from"].endswith("ckpt/e2.pt") and resumed[0]["steps"] == 9
    assert any("skipping bad checkpoint" in w and "__1_0.distcp is missing" in w for w in resumed[0]["warnings"])
    for key in whole[0]["weights"]:
        assert torch.equal(resumed[0]["weights"][key], whole[0]["weights"][key]), key
    assert checkpoint.verify(tmp_path / "ckpt" / "e3.pt")  # rewritten whole


@pytest.mark.slow
@pytest.mark.distributed
def test_another_world_size_reshards_and_says_it_is_not_bit_exact(tmp_path: Path) -> None:
    run_ranks(_dcp_job, tmp_path / "two" / "out", backup=False, epochs=1).check()
    e1, w1 = tmp_path / "two" / "ckpt" / "e1.pt", torch.load(tmp_path / "two" / "weights" / "w1.pt", weights_only=True)
    for name, result in [
        ("one", run_single(_load_only, tmp_path / "one", e1)),
        ("three", run_ranks(_load_only, tmp_path / "three", e1, world_size=3, timeout=120).check()[0]),
    ]:
        assert all(torch.equal(result["weights"][k], v) for k, v in w1.items()), name
        assert result["step"] == 3 and result["exp_avg_shape"] == [16, 8], name
        assert any(
            f"written by 2 process(es), on {result['world']}: DCP reshards the model and optimizer states, but the "
            "run is not bit-exact" in w
            for w in result["warnings"]
        ), (name, result["warnings"])


def _load_only(rank: int, out: Path, path: Path) -> dict[str, Any]:
    """Resumes ``path`` (and trains on), recording the state it resumed with at the first epoch's start."""
    seen: dict[str, Any] = {}

    class Record(fitkit.Callback):
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if not seen:  # collectives: every rank gathers, rank 0 holds the result
                full = self.trainer.model_state_dict()
                seen["weights"] = {k: v.detach().clone() for k, v in full.items()}  # training goes on in place
                optimizer = self.trainer._strategy.optimizer_state_dict(self.trainer.model, self.trainer.optimizer)
                first = next(iter(optimizer["state"].values()), None) if optimizer else None  # 0.weight's (or 0's)
                seen["exp_avg_shape"] = list(first["exp_avg"].shape) if first else None
                seen["step"] = self.trainer.global_step

    fitkit.seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    distributed_run = os.environ.get("WORLD_SIZE", "1") != "1"
    trainer = fitkit.Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        "cross_entropy",
        callbacks=[Record()],
        device="cpu",
        verbose=0,
        strategy="fsdp" if distributed_run else "auto",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DataLoader(_data(), batch_size=16, shuffle=True), epochs=2, resume=path)
    return {**seen, "world": trainer.world_size, "warnings": [str(w.message) for w in caught]}


def test_trust_refuses_a_dcp_directory_whose_shard_links_out_of_it(tmp_path: Path) -> None:
    path = _saved_run(tmp_path)
    copy, outside = tmp_path / "copied" / "step.pt", tmp_path / "outside"
    shutil.copytree(path, copy)
    outside.mkdir()
    shutil.move(copy / "__0_0.distcp", outside / "victim.distcp")  # the same bytes: only the link is wrong
    (copy / "__0_0.distcp").symlink_to(outside / "victim.distcp")
    with pytest.raises(checkpoint.CheckpointError, match=r"__0_0\.distcp is a link .*outside"):
        checkpoint.trust(copy)
    assert not (copy.parent / checkpoint.MANIFEST).exists()
    with pytest.raises(checkpoint.CheckpointError, match=r"is not listed in"):
        checkpoint.verify(copy)


def _partial_copy(path: Path) -> None:
    """What global rank 0's commit leaves on its machine when rank 1 ran on another (no shared filesystem): its
    own files, and a manifest record that also lists rank 1's shard."""
    tmp = checkpoint.temporary_directory(path)
    (tmp / "__0_0.distcp").write_bytes(b"rank 0's shard")
    (tmp / ".metadata").write_bytes(b"metadata")
    theirs = {"__1_0.distcp": {"size": 14, "sha256": "0" * 64}}
    checkpoint.commit_directory(tmp, path, {"kind": "full", "epoch": 1, "global_step": 3}, theirs)


def test_a_machine_s_partial_copy_of_a_sharded_checkpoint_never_passes_for_complete_but_restart_removes_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "ckpt"
    _partial_copy(folder / "e1.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"__1_0\.distcp is missing"):
        checkpoint.verify(folder / "e1.pt")
    assert checkpoint.is_partial_copy(folder / "e1.pt")
    trainer, train, val = build(callbacks=[ModelCheckpoint(str(folder / "e{epoch}.pt"), monitor=None)])
    trainer.fit(train, val, epochs=1, resume="restart")  # fitkit's own partial copy: removed, not refused
    assert "files" not in checkpoint.verify(folder / "e1.pt")  # the new run's file in its place
    _partial_copy(tmp_path / "backup" / "backup.pt")  # a sharded backup's, the same
    trainer, train, val = build(callbacks=[BackupAndRestore(tmp_path / "backup")])
    trainer.fit(train, val, epochs=1, resume="restart")
    assert trainer.resumed_from is None and not (tmp_path / "backup" / "backup.pt").exists()
    # A present file altered: not fitkit's partial copy any more, and resume="restart" refuses to delete it.
    _partial_copy(tmp_path / "other" / "e1.pt")
    (tmp_path / "other" / "e1.pt" / "__0_0.distcp").write_bytes(b"someone else's")
    assert not checkpoint.is_partial_copy(tmp_path / "other" / "e1.pt")
    trainer, train, val = build(callbacks=[ModelCheckpoint(str(tmp_path / "other" / "e{epoch}.pt"), monitor=None)])
    with pytest.raises(ValueError, match="e1.pt"):
        trainer.fit(train, val, epochs=1, resume="restart")
    assert (tmp_path / "other" / "e1.pt" / "__0_0.distcp").read_bytes() == b"someone else's"
