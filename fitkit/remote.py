"""Checkpoints in an object store: any fsspec URL (``s3://``, ``gs://``, ``az://``, ``memory://``, ...).

A checkpoint callback given a URL writes as it does on disk, into a local staging folder (the same atomic
write, manifest and checks), and mirrors every committed file to the remote folder with the same promises:

- the bytes go to a temporary key first, and are read back and checked (size and SHA-256) before the file's
  key is written from it; the folder's remote manifest (``fitkit-manifest.json``) is written last, so a cut-off
  upload leaves the previous good checkpoint in force (and a temporary key behind, named ``.<name>.<id>.tmp``);
- a key fitkit did not write (one the remote manifest does not list) is never overwritten nor deleted;
- before training, the newest good remote checkpoint is fetched (verified) into the staging folder, so that
  ``resume="auto"`` and ``BackupAndRestore`` resume from it on a fresh machine.

A sharded checkpoint (FSDP: a DCP directory) goes up as one version: every rank uploads the shard it wrote (and
checks it), global rank 0 the metadata and the state file, each under ``<name>/<version>/`` (a fresh version id:
nothing is overwritten); the remote manifest's entry for ``<name>``, written last, lists every file's size and
SHA-256 and its version, so the checkpoint counts only once all of them are there. The previous version's
keys go after that commit.

Credentials and endpoints go in ``storage_options`` (fsspec's keyword arguments for the filesystem, such as
``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}`` for s3fs); without them the
filesystem's own defaults apply (environment variables, instance roles).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fitkit import checkpoint
from fitkit.checkpoint import MANIFEST, CheckpointError


def is_url(path: object) -> bool:
    """True for an fsspec URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def split_template(template: str) -> tuple[str, str]:
    """``"s3://b/run/{epoch}.pt"`` -> (``"s3://b/run"``, ``"{epoch}.pt"``): the folder URL before the first
    template field, and the rest (which may hold sub-folders)."""
    static = template.split("{", 1)[0]
    folder = static.rsplit("/", 1)[0]
    return folder, template[len(folder) + 1 :]


def staging_folder(url: str) -> Path:
    """The local folder that stages ``url``'s checkpoints (``$FITKIT_STAGING`` or the temporary folder, then a
    digest of the URL): the same path for every process of a machine."""
    root = Path(os.environ.get("FITKIT_STAGING", Path(tempfile.gettempdir()) / "fitkit-staging"))
    return root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def _record(entry: Mapping[str, Any]) -> dict[str, Any]:
    return dict(entry["versions"][0])


class RemoteFolder:
    """One remote folder of checkpoints and its manifest (see the module's docstring).

    Args:
        url: the folder's fsspec URL, ``s3://bucket/runs/42``.
        storage_options: keyword arguments for the fsspec filesystem (credentials, endpoint, ...).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec  # type: ignore[import-untyped]  # a dependency of torch

        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(f"storage_options must be a dict of fsspec options or None, got {storage_options!r}")
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = str(root).rstrip("/")
        self.staging = staging_folder(self.url)

    def key(self, name: str) -> str:
        """The key (path within the filesystem) of ``name`` in this folder.

        Args:
            name: a file name in the folder.
        """
        return f"{self.root}/{name}"

    # -- the manifest ------------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        """The remote manifest (an empty one when there is none); an unreadable one is an error, never
        rewritten (it vouches for every checkpoint there)."""
        try:
            text = self.fs.cat_file(self.key(MANIFEST))
        except FileNotFoundError:
            return {"version": 1, "files": {}}
        try:
            manifest = json.loads(text)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                raise ValueError("no 'files' object")
        except ValueError as exc:
            raise CheckpointError(
                f"the remote checkpoint manifest {self.url}/{MANIFEST} is unreadable ({exc}); fitkit will not "
                "rewrite it. Move it aside, or write to another folder"
            ) from None
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        tmp = self.key(f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.copy(tmp, self.key(MANIFEST))  # one PUT/copy: a reader sees the old manifest or the new one
        finally:
            self.fs.rm_file(tmp)

    # -- files -------------------------------------------------------------------------------------------
    def _digest(self, key: str) -> tuple[int, str]:
        sha, size = hashlib.sha256(), 0
        with self.fs.open(key, "rb", block_size=1 << 22) as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                sha.update(chunk)
                size += len(chunk)
        return size, sha.hexdigest()

    def _check(self, key: str, record: Mapping[str, Any]) -> None:
        size, digest = self._digest(key)
        if size != record["size"] or digest != record["sha256"]:
            raise CheckpointError(
                f"{self.fs.unstrip_protocol(key)}: {size} bytes with SHA-256 {digest[:12]}..., expected "
                f"{record['size']} bytes with {record['sha256'][:12]}... (an upload cut off, or altered)"
            )

    def upload(self, local: Path, entry: Mapping[str, Any]) -> None:
        """Mirrors the committed local file ``local`` (its local manifest ``entry``): temporary key, checked,
        then the file's key; the remote manifest vouches for the old and new bytes during the copy, then for
        the new ones only.

        Args:
            local: the committed local file; its name is the key's name in this folder.
            entry: its local manifest entry (``{"versions": [record]}``).
        """
        name = local.name
        record = _record(entry)
        manifest = self.read_manifest()
        old = manifest["files"].get(name)
        if old is None and self.fs.exists(self.key(name)):
            raise CheckpointError(
                f"{self.url}/{name} exists and the remote manifest does not vouch for it: fitkit never overwrites "
                "a key it did not write. Move it away, or write to another folder"
            )
        tmp = self.key(f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.put_file(str(local), tmp)
            self._check(tmp, record)
            manifest["files"][name] = {"versions": [record] + ([_record(old)] if old else [])}
            self._write_manifest(manifest)
            self.fs.copy(tmp, self.key(name))
            if self.fs.info(self.key(name))["size"] != record["size"]:
                raise CheckpointError(f"{self.url}/{name}: the copy from the checked upload has another size")
            manifest["files"][name] = {"versions": [record]}
            self._write_manifest(manifest)  # last: only now is the new checkpoint the one in force
        finally:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)

    def remove(self, name: str) -> None:
        """Forgets ``name`` in the remote manifest, then deletes its key; a key the manifest does not list is
        not fitkit's, and stays.

        Args:
            name: the file's name in this folder.
        """
        manifest = self.read_manifest()
        entry = manifest["files"].pop(name, None)
        if entry is None:
            return
        self._write_manifest(manifest)
        for record in entry["versions"]:
            if "files" in record:
                self._remove_version(name, record)
            elif self.fs.exists(self.key(name)):
                self.fs.rm_file(self.key(name))

    def verify(self, name: str) -> dict[str, Any]:
        """The remote manifest's record that vouches for ``name``'s bytes (read back in full and hashed).

        Args:
            name: the file's name in this folder.

        Raises:
            CheckpointError: no manifest entry, a missing key, or another size or SHA-256.
        """
        entry = self.read_manifest()["files"].get(name)
        if entry is None:
            raise CheckpointError(f"{self.url}/{name}: the remote manifest does not vouch for it")
        if "files" in _record(entry):
            return self._verify_directory(name, entry)
        try:
            size, digest = self._digest(self.key(name))
        except FileNotFoundError:
            raise CheckpointError(f"{self.url}/{name}: listed in the remote manifest, but missing") from None
        for record in entry["versions"]:
            if record["size"] == size and record["sha256"] == digest:
                return dict(record)
        raise CheckpointError(f"{self.url}/{name}: its size or SHA-256 differs from the remote manifest's")

    def newest_good(self) -> str | None:
        """The name of the newest remote checkpoint (by step, then time) that verifies; None without one."""
        files = self.read_manifest()["files"]
        order = sorted(files, key=lambda n: (_record(files[n]).get("global_step", -1), _record(files[n])["time"]))
        for name in reversed(order):
            if _record(files[name]).get("kind") == "weights":
                continue  # a weights-only file cannot resume
            try:
                self.verify(name)
            except CheckpointError:
                continue
            return name
        return None

    def trust(self, name: str) -> dict[str, Any]:
        """`fitkit.checkpoint.trust` for the remote key ``name``: downloaded, loaded weights-only and recorded
        in the staging folder's manifest, then in the remote one (for the same bytes). Returns the record.

        A sharded checkpoint directory (the keys under ``name/``: DCP's ``.metadata``, the shards, the state
        file) is downloaded whole into a temporary directory and checked as `fitkit.checkpoint.trust` checks a
        local one; the remote manifest then lists every file's size and SHA-256 as downloaded, at its key.

        Args:
            name: the file's (or sharded checkpoint directory's) name in this folder.
        """
        if self.fs.isdir(self.key(name)):
            return self._trust_directory(name)
        self.staging.mkdir(parents=True, exist_ok=True)
        local = self.staging / name
        self.fs.get_file(self.key(name), str(local))
        record = checkpoint.trust(local)
        manifest = self.read_manifest()
        manifest["files"][name] = {"versions": [record]}
        self._write_manifest(manifest)
        return record

    def fetch(self, name: str, folder: Path | None = None) -> Path:
        """Downloads ``name`` into ``folder`` (the staging folder by default), checked against the remote
        manifest, and vouches for it in the local manifest; returns its local path. A local copy with the
        same bytes is kept as it is.

        Args:
            name: the file's name in this folder.
            folder: the local folder to fetch into (default: the staging folder).
        """
        folder = self.staging if folder is None else folder
        entry = self.read_manifest()["files"].get(name)
        if entry is not None and "files" in _record(entry):
            return self._fetch_directory(name, _record(entry), folder)
        record = self.verify(name)
        local = folder / name
        if local.is_file() and _already_here(local, record):
            return local
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{uuid.uuid4().hex}.download"
        try:
            self.fs.get_file(self.key(name), str(tmp))
            checkpoint.adopt(tmp, local, record)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    # -- sharded checkpoint directories (DCP) ----------------------------------------------------------
    def new_version(self, name: str) -> str:
        """A fresh version id for the sharded checkpoint ``name`` (its files go under ``<name>/<version>/``);
        a key ``name`` that the remote manifest does not list is another writer's: an error.

        Args:
            name: the checkpoint directory's name in this folder.
        """
        if name not in self.read_manifest()["files"] and self.fs.exists(self.key(name)):
            raise CheckpointError(
                f"{self.url}/{name} exists and the remote manifest does not vouch for it: fitkit never writes "
                "over a key it did not write. Move it away, or write to another folder"
            )
        return uuid.uuid4().hex[:16]

    def _version_key(self, name: str, record: Mapping[str, Any], file: str) -> str:
        if record.get("version") is None:  # a directory copied in by hand and trusted: its files at their keys
            return self.key(f"{name}/{file}")
        return self.key(f"{name}/{record['version']}/{file}")

    def _trust_directory(self, name: str) -> dict[str, Any]:
        entry = self.read_manifest()["files"].get(name)
        if entry is not None and "files" in _record(entry):
            return self.verify(name)  # fitkit's own (a version of it): vouched for already, checked here
        prefix = self.key(name)
        # Its files, without hidden names (temporaries) but for DCP's own .metadata.
        keys = [k for k in sorted(self.fs.find(prefix)) if k.rsplit("/", 1)[1] == checkpoint.SHARDED_METADATA
                or not k.rsplit("/", 1)[1].startswith(".")]  # fmt: skip
        tmp = checkpoint.temporary_directory(self.staging / name)
        try:
            for key in keys:
                target = tmp / key[len(prefix) + 1 :]
                if tmp.resolve() not in target.resolve().parents:
                    raise CheckpointError(f"{self.url}/{name}: the key {key!r} is not inside it")
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(key, str(target))
            record = checkpoint.trusted_record(tmp)  # refused unless it loads safely; hashes what came down
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest = self.read_manifest()
        manifest["files"][name] = {"versions": [record]}
        self._write_manifest(manifest)
        return record

    def upload_files(self, local: Path, name: str, version: str, files: Mapping[str, Mapping[str, Any]]) -> None:
        """Uploads the files of ``local`` that ``files`` names (their records: size and SHA-256) into version
        ``version`` of the sharded checkpoint ``name``, each read back and checked. Every rank uploads the
        files it wrote; nothing is in force until `commit_directory`.

        Args:
            local: the local directory the files are in.
            name: the checkpoint directory's name in this folder.
            version: from `new_version`.
            files: the records (``hash_files``) of the files to upload, by their path relative to ``local``.
        """
        for file, record in sorted(files.items()):
            key = self._version_key(name, {"version": version}, file)
            self.fs.put_file(str(local / file), key)
            self._check(key, record)

    def commit_directory(self, name: str, version: str, record: Mapping[str, Any]) -> None:
        """Puts version ``version`` of the sharded checkpoint ``name`` (every file uploaded and checked) in
        force: the remote manifest lists it (``record``: every file's size and SHA-256), then the previous
        version's keys go, then the manifest forgets that version.

        Args:
            name: the checkpoint directory's name in this folder.
            version: from `new_version`.
            record: the directory's record (``files``, ``sha256``, ``size`` and the checkpoint's position).
        """
        manifest = self.read_manifest()
        old = manifest["files"].get(name)
        new = {**record, "version": version}
        manifest["files"][name] = {"versions": [new] + ([_record(old)] if old else [])}
        self._write_manifest(manifest)  # the commit: from now on this version is the one in force
        if old is not None:
            with contextlib.suppress(Exception):  # committed: a key left behind is the old version's, listed still
                previous = _record(old)
                if "files" in previous:
                    self._remove_version(name, previous)
                manifest["files"][name] = {"versions": [new]}
                self._write_manifest(manifest)

    def discard_version(self, name: str, version: str) -> None:
        """Deletes what an uncommitted version of ``name`` uploaded (its id is fresh: every key under it is this
        save's); best effort: a key left behind is listed by no manifest, so nothing trusts it.

        Args:
            name: the checkpoint directory's name in this folder.
            version: from `new_version`, never committed.
        """
        prefix = self.key(f"{name}/{version}")
        with contextlib.suppress(Exception):
            if version not in str(self.read_manifest()["files"].get(name)) and self.fs.exists(prefix):
                self.fs.rm(prefix, recursive=True)

    def _remove_version(self, name: str, record: Mapping[str, Any]) -> None:
        for file in record["files"]:
            key = self._version_key(name, record, file)
            if self.fs.exists(key):
                self.fs.rm_file(key)

    def _verify_directory(self, name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
        problem = "no version"
        for record in entry["versions"]:
            try:
                for file, want in sorted(record["files"].items()):
                    self._check(self._version_key(name, record, file), want)
            except (CheckpointError, FileNotFoundError) as exc:
                problem = str(exc) if isinstance(exc, CheckpointError) else f"{file} is missing"
                continue
            return dict(record)
        raise CheckpointError(f"{self.url}/{name}: the sharded checkpoint is incomplete or altered ({problem})")

    def _fetch_directory(self, name: str, record: Mapping[str, Any], folder: Path) -> Path:
        """`fetch` of a sharded checkpoint: every file downloaded into a temporary directory, checked against
        the remote record, and committed as the local directory ``folder/name``."""
        local = folder / name
        if local.is_dir() and _already_here(local, record):
            return local
        tmp = checkpoint.temporary_directory(local)
        try:
            for file in record["files"]:
                target = tmp / file
                if tmp.resolve() not in target.resolve().parents:  # a manifest is data from outside
                    raise CheckpointError(f"{self.url}/{name}: the remote manifest names {file!r}, outside it")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(self._version_key(name, record, file), str(target))
                except FileNotFoundError:
                    raise CheckpointError(
                        f"{self.url}/{name} is incomplete: {file} is missing, though the remote manifest lists it; "
                        "nothing was loaded. Resume from an earlier checkpoint (resume='auto' picks the newest good one)"
                    ) from None
            got = checkpoint.hash_files(tmp, [tmp / file for file in record["files"]])
            for file, want in sorted(record["files"].items()):
                if got[file] != {"size": want["size"], "sha256": want["sha256"]}:
                    raise CheckpointError(
                        f"{self.url}/{name}: {file} has {got[file]['size']} bytes with SHA-256 "
                        f"{got[file]['sha256'][:12]}..., the remote manifest says {want['size']} bytes with "
                        f"{want['sha256'][:12]}... (altered, or cut off); nothing was loaded"
                    )
            position = {k: v for k, v in record.items() if k not in ("sha256", "size", "files", "time", "version")}
            checkpoint.commit_directory(tmp, local, position, got)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return local

    def prune_staging(self) -> None:
        """Forgets the staging folder's files that the remote manifest does not list (a write whose upload
        failed, a remote folder emptied since): the remote folder is the truth, the staging folder its cache."""
        listed = self.read_manifest()["files"]
        for name in checkpoint.read_manifest(self.staging)["files"]:
            if name not in listed:
                checkpoint.remove_checkpoint(self.staging / name)  # not mirrored yet: a local removal only

    def fetch_newest(self) -> Path | None:
        """`fetch` of `newest_good` (None when the remote folder holds no good checkpoint), after
        `prune_staging`."""
        self.prune_staging()
        name = self.newest_good()
        return None if name is None else self.fetch(name)


def for_callback(path: str | Path, storage_options: Mapping[str, Any] | None, who: str) -> RemoteFolder | None:
    """The remote folder of a checkpoint callback's ``path`` when it is a URL (a flat template: its fields in
    the file name), else None; ``storage_options`` without a URL is an error."""
    if not is_url(path):
        if storage_options is not None:
            raise ValueError(
                f"{who}: storage_options is for an fsspec URL (s3://bucket/run), got the local path {path!r}"
            )
        return None
    folder, rest = split_template(str(path))
    if "/" in rest:
        raise ValueError(f"{who}: in a URL, template fields belong in the file name, not in folders: {path!r}")
    return RemoteFolder(folder, storage_options)


def attach(trainer: Any, folder: Path, remote_folder: RemoteFolder | None) -> None:
    """At the start of a fit: fetches the newest good remote checkpoint into ``folder`` (the staging folder;
    on each machine's local rank 0, so that every rank can load what rank 0 chooses), then mirrors what is
    committed there (`fitkit.checkpoint.mirror`: global rank 0's files, every rank's shards of a sharded
    checkpoint). A collective: every rank calls it."""
    if remote_folder is None:
        return
    _on_each_machine(trainer, remote_folder.fetch_newest)
    checkpoint.mirror(folder, remote_folder)  # every rank: each uploads its shards of a sharded checkpoint


def _on_each_machine(trainer: Any, fetch: Callable[[], object]) -> None:
    """Runs ``fetch`` on global rank 0 (its error raised on every rank), then on the local rank 0 of every
    other machine, and waits for all: each machine's staging folder then holds what rank 0 chooses."""
    from fitkit import distributed
    from fitkit.callbacks._files import checked_on_rank_zero

    checked_on_rank_zero(trainer, lambda: None if fetch() else None)
    if not trainer.is_global_zero and trainer.dist.local_rank == 0:
        fetch()
    if trainer.dist.world_size > 1:
        distributed.barrier(trainer.dist)


def _already_here(local: Path, record: Mapping[str, Any]) -> bool:
    """Whether ``local`` (a file or a sharded directory) is vouched for by its folder's manifest and holds the
    bytes the remote ``record`` names: then a fetch has nothing to download."""
    if local.name not in checkpoint.read_manifest(local.parent)["files"]:
        return False
    try:
        return bool(checkpoint.verify(local)["sha256"] == record["sha256"])
    except CheckpointError:
        return False


def resolve_resume(trainer: Any, resume: Any, storage_options: Mapping[str, Any] | None) -> Any:
    """``fit(resume=...)`` as a local path: an fsspec URL is fetched (checked against its remote manifest) into
    its staging folder on every machine; anything else is returned as it is."""
    if not is_url(resume):
        if storage_options is not None:
            raise ValueError(
                f"fit: storage_options is for a resume from an fsspec URL (resume='s3://bucket/run/last.pt'), "
                f"got resume={resume!r}; the checkpoint callbacks take their own storage_options"
            )
        return resume
    folder, name = str(resume).rstrip("/").rsplit("/", 1)
    remote_folder = RemoteFolder(folder, storage_options)
    _on_each_machine(trainer, lambda: remote_folder.fetch(name))
    return remote_folder.staging / name


def detach(folder: Path, remote_folder: RemoteFolder | None) -> None:
    """At the end of a fit: stops mirroring ``folder``."""
    if remote_folder is not None:
        checkpoint.mirror(folder, None)


def fetch_url(url: str, storage_options: Mapping[str, Any] | None = None) -> Path:
    """The local, verified copy of the remote checkpoint file ``url`` (`RemoteFolder.fetch`)."""
    folder, name = url.rstrip("/").rsplit("/", 1)
    return RemoteFolder(folder, storage_options).fetch(name)


__all__ = [
    "RemoteFolder",
    "attach",
    "detach",
    "fetch_url",
    "for_callback",
    "is_url",
    "resolve_resume",
    "split_template",
    "staging_folder",
]
