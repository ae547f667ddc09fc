"""Object-store checkpoints (fitkit.remote) against a real S3-protocol server on localhost: moto's server mode,
started once for the module on a free port, reached through s3fs (the dev extra has both)."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fitkit
from fitkit import checkpoint, remote
from fitkit.callbacks import BackupAndRestore, ModelCheckpoint
from fitkit.checkpoint import CheckpointError

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {
        "key": "testing", "secret": "testing", "skip_instance_cache": True, "use_listings_cache": False,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 1}},
    }  # fmt: skip
    import boto3  # moto's dependency

    client = boto3.client(
        "s3", aws_access_key_id="testing", aws_secret_access_key="testing", **options["client_kwargs"]
    )
    client.create_bucket(Bucket="fitkit-test")
    try:
        yield options
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FITKIT_STAGING", str(tmp_path / "staging"))  # this test's own "machine"
    return tmp_path / "staging"


def fs(options: dict[str, Any]) -> Any:
    return s3fs.S3FileSystem(**options)


def build(callbacks: list[Any]) -> fitkit.Trainer:
    fitkit.seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return fitkit.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "cross_entropy",
        callbacks=callbacks, device="cpu", verbose=0,
    )  # fmt: skip


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    return x, (x[:, 0] > 0).long()


def weights(trainer: fitkit.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.slow  # two fits and a resume against the S3 server: 6 s of the quick loop
def test_model_checkpoint_to_s3_keeps_top_k_and_a_fresh_machine_resumes_auto_exactly(
    s3: dict[str, Any], staging: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "s3://fitkit-test/topk"
    reference = build([])
    reference.fit(data(), epochs=6, batch_size=16)
    first = build([ModelCheckpoint(url + "/{epoch:02d}.pt", monitor=None, save_top_k=2, storage_options=s3)])
    first.fit(data(), epochs=4, batch_size=16)
    listing = sorted(Path(key).name for key in fs(s3).ls("fitkit-test/topk"))
    assert listing == ["03.pt", "04.pt", "fitkit-manifest.json"]  # top 2; no temporary key left
    assert sorted(remote.RemoteFolder(url, s3).read_manifest()["files"]) == ["03.pt", "04.pt"]
    assert checkpoint.verify(url + "/04.pt", storage_options=s3)["global_step"] == 16
    assert checkpoint.load(url + "/04.pt", storage_options=s3)["trainer"]["epoch"] == 4
    monkeypatch.setenv("FITKIT_STAGING", str(tmp_path / "another-machine"))  # a fresh machine: nothing local
    second = build([ModelCheckpoint(url + "/{epoch:02d}.pt", monitor=None, save_top_k=2, storage_options=s3)])
    second.fit(data(), epochs=6, batch_size=16, resume="auto")
    assert second.resumed_from is not None and second.resumed_from.name == "04.pt"
    assert second.resumed_from.parent == remote.staging_folder(url) != staging / remote.staging_folder(url).name
    assert all(torch.equal(a, b) for a, b in zip(weights(second).values(), weights(reference).values()))
    # The top 2 read back from the checkpoint: 03.pt, never fetched on this machine, leaves the bucket as it
    # would have on the first machine (the remote manifest vouches for it); 04.pt, fetched to resume, too.
    assert sorted(remote.RemoteFolder(url, s3).read_manifest()["files"]) == ["05.pt", "06.pt"]
    assert sorted(Path(key).name for key in fs(s3).ls("fitkit-test/topk")) == ["05.pt", "06.pt", "fitkit-manifest.json"]
    assert [Path(item[2]).name for item in second.callbacks[0].kept] == ["05.pt", "06.pt"]


def test_backup_and_restore_on_s3_resumes_a_killed_run_from_the_remote_backup(
    s3: dict[str, Any], staging: Path
) -> None:
    url = "s3://fitkit-test/backup"
    reference = build([])
    reference.fit(data(), epochs=3, batch_size=16)
    crashing = build([BackupAndRestore(url, save_freq=3, storage_options=s3)])
    from fitkit.callbacks import LambdaCallback

    def crash(batch: int, logs: Any) -> None:
        if crashing.global_step == 7:
            raise RuntimeError("the machine died")

    crashing.callbacks.append(LambdaCallback(on_batch_end=crash))
    with pytest.raises(RuntimeError, match="the machine died"):
        crashing.fit(data(), epochs=3, batch_size=16)
    assert remote.RemoteFolder(url, s3).verify("backup.pt")["global_step"] == 6
    shutil.rmtree(staging)  # a fresh machine: nothing local
    again = build([BackupAndRestore(url, save_freq=3, storage_options=s3)])
    again.fit(data(), epochs=3, batch_size=16)  # resume=None: the backup's
    assert again.resumed_from is not None
    assert all(torch.equal(a, b) for a, b in zip(weights(again).values(), weights(reference).values()))
    assert not fs(s3).exists("fitkit-test/backup/backup.pt")  # deleted after a finished fit, as on disk
    explicit = build([])
    with pytest.raises(CheckpointError, match="does not vouch"):
        explicit.fit(data(), epochs=3, batch_size=16, resume=url + "/backup.pt", storage_options=s3)


@pytest.mark.filterwarnings("ignore:ModelCheckpoint. could not save")  # crash.pt's upload is cut off too
@pytest.mark.parametrize("cut", ["raises", "truncated"])
def test_an_upload_cut_off_midway_leaves_the_previous_good_checkpoint(
    s3: dict[str, Any], cut: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://fitkit-test/cut-{cut}"
    callback = ModelCheckpoint(url + "/last.pt", monitor=None, storage_options=s3)
    trainer = build([callback])
    trainer.fit(data(), epochs=1, batch_size=16)
    folder = remote.RemoteFolder(url, s3)
    good = folder.verify("last.pt")
    assert callback.remote_folder is not None
    uploads = callback.remote_folder.fs

    def cut_off(local: str, key: str, **kwargs: Any) -> None:
        half = Path(local).read_bytes()[: Path(local).stat().st_size // 2]
        uploads.pipe_file(key, half)  # half the bytes reach the temporary key ...
        if cut == "raises":
            raise ConnectionResetError("connection reset by peer")  # ... then the connection drops

    monkeypatch.setattr(uploads, "put_file", cut_off)
    with pytest.raises(ConnectionResetError if cut == "raises" else CheckpointError):
        trainer.fit(data(), epochs=2, batch_size=16, resume="auto")
    assert folder.verify("last.pt") == good  # the previous good checkpoint, in force and intact
    assert folder.newest_good() == "last.pt"
    assert [Path(k).name for k in fs(s3).ls(f"fitkit-test/cut-{cut}")] == ["fitkit-manifest.json", "last.pt"]


def test_keys_fitkit_did_not_write_are_never_overwritten_nor_deleted_and_trust_vouches_for_one(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    url = "s3://fitkit-test/foreign"
    store = fs(s3)
    store.pipe_file("fitkit-test/foreign/02.pt", b"someone else's file")
    store.pipe_file("fitkit-test/foreign/notes.txt", b"keep me")
    trainer = build([ModelCheckpoint(url + "/{epoch:02d}.pt", monitor=None, save_top_k=1, storage_options=s3)])
    with pytest.raises(CheckpointError, match="never overwrites a key it did not write"):
        trainer.fit(data(), epochs=2, batch_size=16)
    assert store.cat_file("fitkit-test/foreign/02.pt") == b"someone else's file"
    assert store.cat_file("fitkit-test/foreign/notes.txt") == b"keep me"
    # A checkpoint copied into the bucket by hand: refused until trusted, then it loads.
    saved = build([])
    saved.save_checkpoint(tmp_path / "handmade.pt")
    store.put_file(str(tmp_path / "handmade.pt"), "fitkit-test/foreign/handmade.pt")
    with pytest.raises(CheckpointError, match="does not vouch"):
        checkpoint.load(url + "/handmade.pt", storage_options=s3)
    assert checkpoint.trust(url + "/handmade.pt", storage_options=s3)["kind"] == "full"
    assert "trainer" in checkpoint.load(url + "/handmade.pt", storage_options=s3)


def test_storage_options_without_a_url_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_options is for an fsspec URL"):
        ModelCheckpoint(tmp_path / "{epoch}.pt", storage_options={"anon": True})
    with pytest.raises(ValueError, match="storage_options is for an fsspec URL"):
        BackupAndRestore(tmp_path, storage_options={"anon": True})
    with pytest.raises(ValueError, match="fields belong in the file name"):
        ModelCheckpoint("memory://runs/{epoch}/model.pt")
    with pytest.raises(ValueError, match="storage_options is for a resume"):
        build([]).fit(data(), epochs=1, batch_size=16, storage_options={"anon": True})


# -- FSDP: sharded checkpoint directories, every rank's shards uploaded -------------------------------------
def _fsdp_remote_job(
    rank: int,
    out: Path,
    options: dict[str, Any],
    url: str,
    epochs: int,
    staging: Path,
    fail_on_rank: int = -1,
    async_save: bool = False,
) -> dict[str, Any]:
    import os

    from test_distributed import make_data
    from test_fsdp import Blocky
    from torch.utils.data import DataLoader

    os.environ["FITKIT_STAGING"] = str(staging)  # this run's "machine"
    if rank == fail_on_rank:  # this rank's shard upload is cut off midway: half the bytes, then an error
        original = remote.RemoteFolder.upload_files

        def cut_off(self: remote.RemoteFolder, local: Path, name: str, version: str, files: Any) -> None:
            for file in files:
                key = self.key(f"{name}/{version}/{file}")
                self.fs.pipe_file(key, (local / file).read_bytes()[:100])
            raise ConnectionResetError("connection reset by peer")

        remote.RemoteFolder.upload_files = cut_off  # type: ignore[method-assign]
        assert original is not cut_off
    fitkit.seed_everything(0)
    model = Blocky()
    saver = ModelCheckpoint(
        url + "/e{epoch:02d}", monitor=None, save_top_k=1, storage_options=options, async_save=async_save
    )
    backup = BackupAndRestore(url + "-backup", save_freq=2, storage_options=options, async_save=async_save)
    trainer = fitkit.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "cross_entropy",
        callbacks=[saver, backup], device="cpu", verbose=0, strategy="fsdp",
    )  # fmt: skip
    train = DataLoader(make_data(), batch_size=16, shuffle=True)
    try:
        trainer.fit(train, epochs=epochs, resume="auto")
    except CheckpointError as exc:
        return {"error": str(exc)}
    return {"weights": trainer.model_state_dict(), "resumed": str(trainer.resumed_from), "step": trainer.global_step}


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_sharded_checkpoints_go_to_s3_from_every_rank_and_a_fresh_machine_resumes_exactly(
    s3: dict[str, Any], tmp_path: Path
) -> None:
    from dist_utils import run_ranks

    url, bucket = "s3://fitkit-test/fsdp", "fitkit-test/fsdp"
    whole = run_ranks(_fsdp_remote_job, tmp_path / "whole", s3, "s3://fitkit-test/fsdp-whole", 3, tmp_path / "m0")
    reference = whole.check()[0]["weights"]
    run_ranks(_fsdp_remote_job, tmp_path / "first", s3, url, 2, tmp_path / "m1").check()
    folder = remote.RemoteFolder(url, s3)
    entries = folder.read_manifest()["files"]
    assert sorted(entries) == ["e02"]  # top 1: e01's version went with it
    record = entries["e02"]["versions"][0]
    assert sorted(record["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "fitkit-state.pt"]
    keys = sorted(k[len(bucket) + 1 :] for k in fs(s3).find(bucket))
    assert keys == ["e02/" + record["version"] + "/" + f for f in sorted(record["files"])] + ["fitkit-manifest.json"]
    assert folder.verify("e02")["global_step"] == 6
    # The sharded backup (written every 2 steps, each version replacing the last) left with the finished fit:
    # its every key, listed by the remote manifest, and nothing else.
    assert [k.rsplit("/", 1)[1] for k in fs(s3).find(bucket + "-backup")] == ["fitkit-manifest.json"]
    assert remote.RemoteFolder(url + "-backup", s3).read_manifest()["files"] == {}
    # A fresh machine (an empty staging folder): resume="auto" fetches e02's every shard and continues exactly;
    # its save of e03 (and e02's removal) goes up from the background (async_save).
    second = run_ranks(_fsdp_remote_job, tmp_path / "second", s3, url, 3, tmp_path / "m2", async_save=True)
    resumed = second.check()
    assert resumed[0]["resumed"] == str(tmp_path / "m2" / remote.staging_folder(url).name / "e02")
    assert all(torch.equal(resumed[0]["weights"][k], reference[k]) for k in reference)
    assert sorted(folder.read_manifest()["files"]) == ["e03"]
    # Rank 1's shard upload cut off midway: the save fails on every rank, e03 stays the checkpoint in force,
    # and the partial version is gone (no manifest lists it).
    before = folder.read_manifest()
    failed = run_ranks(_fsdp_remote_job, tmp_path / "cut", s3, url, 4, tmp_path / "m3", fail_on_rank=1).check()
    assert all("connection reset by peer" in result["error"] for result in failed)
    assert folder.read_manifest() == before and folder.verify("e03")["global_step"] == 9
    version = before["files"]["e03"]["versions"][0]["version"]
    assert all(k.startswith((f"{bucket}/e03/{version}/", f"{bucket}/fitkit-manifest")) for k in fs(s3).find(bucket))


def _fsdp_write_job(rank: int, out: Path, options: dict[str, Any], url: str, staging: Path) -> dict[str, Any]:
    import os

    from test_distributed import make_data
    from test_fsdp import Blocky
    from torch.utils.data import DataLoader

    os.environ["FITKIT_STAGING"] = str(staging)
    fitkit.seed_everything(0)
    model = Blocky()
    trainer = fitkit.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "cross_entropy",
        callbacks=[ModelCheckpoint(url + "/e{epoch:02d}", monitor=None, storage_options=options)],
        device="cpu", verbose=0, strategy="fsdp",
    )  # fmt: skip
    trainer.fit(DataLoader(make_data(), batch_size=16, shuffle=True), epochs=1)
    return {"weights": trainer.model_state_dict(), "step": trainer.global_step}


@pytest.mark.slow
@pytest.mark.distributed
def test_load_verify_and_trust_take_the_url_of_a_sharded_checkpoint_and_refuse_a_tampered_or_missing_shard(
    s3: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dist_utils import run_ranks

    url, bucket, store = "s3://fitkit-test/fsdp-load", "fitkit-test/fsdp-load", fs(s3)
    ranks = run_ranks(_fsdp_write_job, tmp_path / "ranks", s3, url, tmp_path / "writer").check()
    monkeypatch.setenv("FITKIT_STAGING", str(tmp_path / "reader"))  # a fresh machine: nothing local
    record = checkpoint.verify(url + "/e01", storage_options=s3)  # every file read back and hashed
    assert record["global_step"] == ranks[0]["step"] == 3
    assert sorted(record["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "fitkit-state.pt"]
    state = checkpoint.load(url + "/e01", storage_options=s3)  # every shard fetched, checked, read whole
    assert state["trainer"]["global_step"] == 3 and state["fitkit"]["kind"] == "full"
    reference = ranks[0]["weights"]
    assert sorted(state["model"]) == sorted(reference)
    assert all(torch.equal(state["model"][k], reference[k]) for k in reference)
    # A shard altered in the bucket, then one missing: refused on a fresh machine, naming the file.
    version_key = f"{bucket}/e01/{record['version']}"
    shard = store.cat_file(f"{version_key}/__1_0.distcp")
    store.pipe_file(f"{version_key}/__1_0.distcp", shard[:-8] + b"tampered")
    monkeypatch.setenv("FITKIT_STAGING", str(tmp_path / "reader2"))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: .*SHA-256"):
        checkpoint.verify(url + "/e01", storage_options=s3)
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp has .* the remote manifest says .* nothing was loaded"):
        checkpoint.load(url + "/e01", storage_options=s3)
    store.rm_file(f"{version_key}/__1_0.distcp")
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is missing"):
        checkpoint.verify(url + "/e01", storage_options=s3)
    with pytest.raises(CheckpointError, match=r"incomplete: __1_0\.distcp is missing"):
        checkpoint.load(url + "/e01", storage_options=s3)
    # A sharded checkpoint copied into the bucket by hand: refused until trusted; trust checks it first.
    local = tmp_path / "writer" / remote.staging_folder(url).name / "e01"
    for file in sorted(p for p in local.iterdir()):
        store.put_file(str(file), f"{bucket}/hand/{file.name}")
    with pytest.raises(CheckpointError, match="does not vouch"):
        checkpoint.load(url + "/hand", storage_options=s3)
    trusted = checkpoint.trust(url + "/hand", storage_options=s3)
    assert trusted["kind"] == "full" and trusted["trusted"] and trusted["sha256"] == record["sha256"]
    assert checkpoint.verify(url + "/hand", storage_options=s3)["sha256"] == record["sha256"]
    again = checkpoint.load(url + "/hand", storage_options=s3)
    assert all(torch.equal(again["model"][k], reference[k]) for k in reference)
    store.pipe_file(f"{bucket}/crafted/.metadata", b"not DCP metadata")
    store.put_file(str(local / "fitkit-state.pt"), f"{bucket}/crafted/fitkit-state.pt")
    with pytest.raises(CheckpointError, match=r"\.metadata is not DCP metadata that fitkit can read safely"):
        checkpoint.trust(url + "/crafted", storage_options=s3)
    assert "crafted" not in remote.RemoteFolder(url, s3).read_manifest()["files"]
