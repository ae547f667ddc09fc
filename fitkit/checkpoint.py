"""Checkpoint files: atomic writes, a manifest of verified files, safe loading, and the checks that a
full checkpoint fits the trainer it is loaded into (the trainer assembles its state: ``Trainer.state_dict``).

A write goes to a temporary file in the same folder, is flushed and fsynced, and renamed into place; the
folder's manifest (``fitkit-manifest.json``, itself replaced atomically) then records the file's size and
SHA-256. The manifest is updated in two phases around the rename, so at every instant it vouches for the
bytes under the final name, old or new: a crash never leaves a readable name without a good file, and a
reader never trusts bytes the manifest does not vouch for. Everything is saved as tensors and plain
Python values, so every file loads with ``torch.load(weights_only=True)``.

Several writers may share a folder (two jobs, two callbacks): every read-change-write of a manifest holds
an exclusive ``fcntl.flock`` on ``.fitkit-manifest.lock`` in that folder, so no writer's entry is lost. An
unreadable manifest is never rewritten (that would forget every file it vouches for): writes and
``resume="auto"`` stop with an error, and [trust][fitkit.checkpoint.trust] is the documented way to vouch for a file again.

A sharded checkpoint (FSDP: `fitkit.sharded_checkpoint`) is a directory, and one manifest entry of its
folder: its record lists every file's size and SHA-256, it is written into a temporary directory and
committed (renamed into place, swapped atomically with an older version) only when every file is complete,
and [verify][fitkit.checkpoint.verify], [remove_checkpoint][fitkit.checkpoint.remove_checkpoint], `candidates` and [trust][fitkit.checkpoint.trust] treat it as one checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import errno
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import torch

from fitkit._safe_files import open_new, open_own
from fitkit._warn import FitkitWarning, user_stacklevel

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; one writer per folder there
    fcntl = None  # type: ignore[assignment]

MANIFEST = "fitkit-manifest.json"
LOCK = ".fitkit-manifest.lock"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or does not fit the trainer it is loaded into."""


# -- atomic files -------------------------------------------------------------------------------
class _HashingWriter:
    """A write-only file wrapper that hashes what passes through, so a save reads nothing back."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch.save turns it into "unexpected pos": kept to report it

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += len(data)
        try:
            return self.raw.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.raw.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_new(tmp) as f:  # never through a link planted at the temporary's name
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ManifestError(CheckpointError):
    """A manifest that exists but cannot be read: fitkit neither trusts nor rewrites it."""


def read_manifest(folder: Path, strict: bool = False) -> dict[str, Any]:
    """The folder's manifest (an empty one when there is none).

    Args:
        folder: the folder whose ``fitkit-manifest.json`` to read.
        strict: True raises [ManifestError][fitkit.checkpoint.ManifestError] for an unreadable manifest
            (truncated, not JSON, not a fitkit manifest); False (the default) warns and returns an empty one
            (a reader then trusts nothing in the folder).
    """
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {"version": 1, "files": {}}
    except OSError as exc:
        problem: Exception = exc
    else:
        try:
            manifest = json.loads(text)
            if not isinstance(manifest, dict) or not isinstance(manifest.setdefault("files", {}), dict):
                raise ValueError("not a fitkit manifest (no 'files' object)")
            return manifest
        except ValueError as exc:
            problem = exc
    if strict:
        raise ManifestError(
            f"the checkpoint manifest {path} is unreadable ({problem or 'empty file'}); fitkit will not rewrite "
            "it, since that would forget every checkpoint it vouches for. Move it aside, then vouch again for "
            "the files you trust with fitkit.checkpoint.trust(path) (it checks each loads weights-only), or "
            "write to another folder."
        )
    warnings.warn(
        f"ignoring unreadable checkpoint manifest {path}: {problem or 'empty file'}",
        FitkitWarning,
        stacklevel=user_stacklevel(),
    )
    return {"version": 1, "files": {}}


@contextlib.contextmanager
def manifest_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder's manifest (``flock`` on `LOCK`): one writer at a time
    reads, changes and rewrites it, in this process or another."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = open_own(folder / LOCK, os.O_RDWR | os.O_CREAT, CheckpointError)  # a planted link is refused
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stale_temporaries(folder: Path, name: str) -> None:
    """Deletes temporary files of ``name`` left by a killed writer (held lock: no manifest write is live;
    a checkpoint's temporary is left alone while the process that writes it is alive)."""
    for stale in folder.glob(f".{name}.*.tmp"):
        pid = stale.name[len(name) + 2 : -len(".tmp")]
        if name != MANIFEST and pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():  # a sharded checkpoint's temporary directory
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    _write_bytes_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())


def atomic_save(obj: Any, path: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Saves ``obj`` with ``torch.save`` so that ``path`` always holds a complete, vouched-for file.

    Args:
        obj: what to save: tensors and plain Python values only, so that it loads with
            ``torch.load(weights_only=True)``.
        path: the file to write (its folder is created); replaced atomically, never seen half-written.
        meta: plain values recorded with the file in the folder's manifest (fitkit records the epoch and step).

    Returns:
        The manifest record written for it (size, sha256 and ``meta``).
    """
    if (queue := _deferred.get()) is not None:  # async_save: a host copy now, the write in the background
        queue.append(functools.partial(atomic_save, to_host(obj), path, meta))
        return {}
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    renamed = False  # past the rename, a failure (the manifest's tidy-up) leaves the new file, vouched for
    try:
        with open_new(tmp) as raw:  # never through a link planted at the temporary's name
            writer = _HashingWriter(raw)
            torch.save(obj, cast(IO[bytes], writer))  # it only writes and flushes
            raw.flush()
            os.fsync(raw.fileno())
        record = {"sha256": writer.sha.hexdigest(), "size": writer.size, "time": time.time(), **(meta or {})}
        with manifest_lock(folder):  # another writer's entries survive: read, change, write under the lock
            # Phase 1: vouch for both the old and the new bytes, then rename; phase 2: only the new ones.
            manifest = read_manifest(folder, strict=True)
            old = manifest["files"].get(path.name)
            versions = [record] + (old["versions"][:1] if old else [])
            manifest["files"][path.name] = {"versions": versions}
            _write_manifest(folder, manifest)
            os.replace(tmp, path)
            renamed = True
            _fsync_dir(folder)
            manifest["files"][path.name] = {"versions": [record]}
            _write_manifest(folder, manifest)
            _remove_stale_temporaries(folder, path.name)  # left by a process killed mid-write
            _remove_stale_temporaries(folder, MANIFEST)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _write_failed(path, exc, locals().get("writer"), renamed) from exc
    finally:
        tmp.unlink(missing_ok=True)
    if (remote_folder := _mirrors.get(str(folder.resolve()))) is not None:
        remote_folder.upload(path, {"versions": [record]})  # committed here first: a failed upload loses nothing
    return record


#: The writes and removals of an async save, queued (`deferred_writes`); None: write now.
_deferred: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("fitkit_deferred_writes", default=None)


@contextlib.contextmanager
def deferred_writes(queue: list[Any]) -> Iterator[None]:
    """Inside it, `atomic_save` and `remove_checkpoint` append their work to ``queue`` (to run later, in
    order, in another thread) instead of doing it; `atomic_save` first copies ``obj`` to the host."""
    token = _deferred.set(queue)
    try:
        yield
    finally:
        _deferred.reset(token)


def deferred_queue() -> list[Any] | None:
    """Inside `deferred_writes`, its queue (a sharded save appends the part that follows its snapshot); else None."""
    return _deferred.get()


def to_host(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are detached CPU clones: later training steps cannot change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if type(obj) in (dict, collections.OrderedDict):
        return type(obj)((key, to_host(value)) for key, value in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(to_host(value) for value in obj)
    return copy.deepcopy(obj)


#: Local folders whose committed files are mirrored to a remote folder (`fitkit.remote`), by resolved path.
_mirrors: dict[str, Any] = {}


def mirror(folder: str | Path, remote_folder: Any) -> None:
    """From now on every file committed into (or removed from) ``folder`` by `atomic_save` and
    `remove_checkpoint` is uploaded to (or removed from) ``remote_folder``, a `fitkit.remote.RemoteFolder`;
    None stops mirroring ``folder``."""
    key = str(Path(folder).resolve())
    if remote_folder is None:
        _mirrors.pop(key, None)
    else:
        _mirrors[key] = remote_folder


def mirrored(folder: str | Path) -> Any:
    """The remote folder that ``folder`` is mirrored to (`mirror`), or None."""
    return _mirrors.get(str(Path(folder).resolve()))


def adopt(downloaded: Path, path: Path, record: dict[str, Any]) -> None:
    """Moves the file ``downloaded`` to ``path`` and vouches for it with ``record`` (from another manifest),
    after checking its size and SHA-256 against it: a download is committed as `atomic_save` commits a write."""
    if downloaded.stat().st_size != record["size"] or _sha256(downloaded) != record["sha256"]:
        raise CheckpointError(f"{path.name}: the downloaded bytes differ from the manifest's record (cut off?)")
    folder = path.parent
    with manifest_lock(folder):
        manifest = read_manifest(folder, strict=True)
        old = manifest["files"].get(path.name)
        manifest["files"][path.name] = {"versions": [record] + (old["versions"][:1] if old else [])}
        _write_manifest(folder, manifest)
        os.replace(downloaded, path)
        _fsync_dir(folder)
        manifest["files"][path.name] = {"versions": [record]}
        _write_manifest(folder, manifest)


_DISK_ADVICE = {
    errno.ENOSPC: "free disk space (or write to another disk)",
    errno.EDQUOT: "free space within your disk quota (or write to another disk)",
    errno.EFBIG: "the file system refuses files this large: write to one without that limit",
    errno.EACCES: "make the folder writable for this user, or write to another folder",
    errno.EPERM: "make the folder writable for this user, or write to another folder",
    errno.EROFS: "the file system is read-only: write to another folder",
}


def _write_failed(
    path: Path, exc: BaseException, writer: _HashingWriter | None, renamed: bool = False
) -> CheckpointError:
    """The error for a checkpoint write that failed: which file, what state the folder is in, what to do."""
    cause: BaseException = (writer.error if writer is not None else None) or exc
    code = getattr(cause, "errno", None)
    reason = os.strerror(code) if code else str(cause) or type(cause).__name__
    advice = _DISK_ADVICE.get(code, "check the disk and the folder's permissions") if code else "check the disk"
    failed = f"{reason}{f' ({errno.errorcode.get(code, code)})' if code else ''}"
    if renamed:  # phase 1 vouched for the new bytes before the rename: the file is good, the tidy-up failed
        return CheckpointError(
            f"wrote the checkpoint {path} (complete, and its folder's manifest vouches for it), but updating the "
            f"manifest afterwards failed: {failed}. To continue: {advice}, then run again with resume='auto'."
        )
    return CheckpointError(
        f"could not write the checkpoint {path}: {failed}. Nothing was replaced: the previous {path.name} "
        f"(if any) and every other checkpoint in {path.parent} are intact, and its manifest still vouches for "
        f"them. To continue: {advice}, then run again with resume='auto' (or the path of the newest good file)."
    )


def remove_checkpoint(path: str | Path) -> None:
    """Forgets ``path`` in its manifest first, then deletes it (a crash leaves at most an orphan file).

    Args:
        path: a file (or sharded checkpoint directory) that its folder's manifest lists.
    """
    if (queue := _deferred.get()) is not None:  # after the queued write that makes it redundant
        queue.append(functools.partial(remove_checkpoint, path))
        return
    path = Path(path)
    with manifest_lock(path.parent):
        manifest = read_manifest(path.parent, strict=True)
        entry = manifest["files"].pop(path.name, None)
        if entry is not None:
            _write_manifest(path.parent, manifest)
        if path.is_dir() and not path.is_symlink():
            _remove_directory(path, entry)
        else:
            path.unlink(missing_ok=True)
    if (remote_folder := _mirrors.get(str(path.parent.resolve()))) is not None:
        remote_folder.remove(path.name)  # only a key its remote manifest lists (one fitkit wrote)


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _is_url(path: object) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _remote() -> Any:
    from fitkit import remote  # it builds on this module

    return remote


def _checkpoint_path(path: Any, function: str) -> Path:
    """``path`` as a Path, or a TypeError in fitkit's words (None is the usual mistake: a best-checkpoint
    path read before any checkpoint was written)."""
    if isinstance(path, (str, os.PathLike)) and os.fspath(path) not in ("", b""):
        return Path(os.fsdecode(os.fspath(path)))
    raise TypeError(
        f"fitkit.checkpoint.{function}() takes the path of a checkpoint file or sharded checkpoint directory "
        f"(a str or pathlib.Path), got {path!r}" + (": no checkpoint written yet?" if path is None else "")
    )


def verify(path: str | Path, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Returns the manifest record that vouches for ``path``'s bytes.

    Args:
        path: a checkpoint file (or sharded checkpoint directory) written by fitkit, or an fsspec URL of one
            (``s3://bucket/run/e03.pt``: read back in full and checked against its remote folder's manifest;
            a sharded directory's every file).
        storage_options: the fsspec filesystem's options for a URL (credentials, endpoint); see `fitkit.remote`.

    Raises:
        CheckpointError: no manifest entry, or the size or SHA-256 differs (a truncated or altered file).
    """
    if _is_url(path):
        folder_url, name = str(path).rstrip("/").rsplit("/", 1)
        return _remote().RemoteFolder(folder_url, storage_options).verify(name)
    path = _checkpoint_path(path, "verify")
    if path.is_dir():
        return _verify_directory(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    entry = read_manifest(path.parent, strict=True)["files"].get(path.name)
    if entry is None:
        raise CheckpointError(
            f"{path} is not listed in {path.parent / MANIFEST}: fitkit did not finish writing it "
            "(a crash during the write?) or it was copied without its manifest. Copy the folder's "
            f"{MANIFEST} along, or, if you trust the file, vouch for it with fitkit.checkpoint.trust({str(path)!r}) "
            "(it checks the file loads weights-only and records its SHA-256) and resume again."
        )
    size = path.stat().st_size
    digest = None
    for record in entry.get("versions", []):
        if record.get("size") != size:
            continue
        digest = digest or _sha256(path)
        if record.get("sha256") == digest:
            return record
    raise CheckpointError(
        f"{path} is corrupted or truncated: its size/SHA-256 ({size} bytes) match no record in "
        f"{path.parent / MANIFEST}. Resume from an earlier checkpoint (resume='auto' picks the "
        "newest good one)."
    )


def load(
    path: str | Path,
    map_location: Any = "cpu",
    verify_file: bool = True,
    *,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Loads a fitkit file: verified against its manifest, then ``torch.load(weights_only=True)``.

    A file that would need to unpickle Python objects (and so could run code) is refused with a
    [CheckpointError][fitkit.checkpoint.CheckpointError]; fitkit never loads with ``weights_only=False``.

    A sharded (DCP) checkpoint directory loads as one state: its ``fitkit-state.pt`` (weights-only), with
    ``"model"`` holding the model's whole (unsharded) tensors, read from every rank's shard in this process.

    Args:
        path: the file (or sharded checkpoint directory) to load, or an fsspec URL of one (downloaded to the
            staging folder, every file checked against the remote manifest first; see `fitkit.remote`).
        map_location: where tensors go, as ``torch.load`` takes it (default ``"cpu"``).
        verify_file: False skips the manifest check (only for a file you vouch for; see
            [trust][fitkit.checkpoint.trust] to record one instead).
        storage_options: the fsspec filesystem's options for a URL (credentials, endpoint).
    """
    if _is_url(path):
        path = _remote().fetch_url(str(path), storage_options)
    path = _checkpoint_path(path, "load")
    if verify_file:
        verify(path)
    if path.is_dir():
        return read_sharded(path, map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        detail = next((line.strip() for line in lines if "Unsupported" in line or "global" in line.lower()), lines[0])
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects that a weights-only load does not allow "
            f"(a file not written by fitkit, or crafted to run code when unpickled). {detail}"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


# -- checkpoint directories ---------------------------------------------------------------------
# A sharded checkpoint (torch.distributed.checkpoint: one file per rank plus metadata) is a directory.
# It is a first-class manifest entry of its parent folder: one record whose ``files`` holds every file's
# size and SHA-256, written only once every file is in place. The ranks write into a temporary
# directory, rank 0 commits it (hash, manifest, rename), so the final name never holds a partial one.
def temporary_directory(path: str | Path) -> Path:
    """A fresh, empty temporary directory next to ``path`` for the files of a sharded checkpoint (its
    name marks it as this process's temporary: a later commit in the folder removes it once this
    process is gone)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    tmp.mkdir()
    return tmp


def hash_files(root: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of each file, keyed by its POSIX path relative to ``root`` (ranks hash the files
    they wrote, so that the commit does not read every shard on one rank)."""
    return {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in paths}


def listing_digest(files: dict[str, dict[str, Any]]) -> str:
    """The SHA-256 of a checkpoint directory's record: over its files' names, sizes and SHA-256s."""
    sha = hashlib.sha256()
    for name in sorted(files):
        sha.update(f"{name}\0{files[name]['size']}\0{files[name]['sha256']}\n".encode())
    return sha.hexdigest()


def commit_directory(
    tmp: str | Path,
    path: str | Path,
    meta: dict[str, Any] | None = None,
    hashes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Puts the complete checkpoint directory ``tmp`` (from `temporary_directory`) in place at
    ``path`` and records every file's size and SHA-256 in the folder's manifest, in the same two phases
    as [atomic_save][fitkit.checkpoint.atomic_save]: the manifest vouches for the old and the new version while they swap.

    ``hashes`` are already-computed records (`hash_files`) for some of the files; the others are
    hashed here. A file ``hashes`` names that ``tmp`` lacks (a shard another machine wrote, without a shared
    filesystem) is listed all the same: this copy then does not verify, and never counts as complete. An existing ``path`` (file or directory) is swapped atomically with ``tmp`` where the
    system allows (Linux ``renameat2(RENAME_EXCHANGE)``), then deleted. Returns the manifest record.
    """
    tmp, path = Path(tmp), Path(path)
    folder = path.parent
    try:
        known = hashes or {}
        files: dict[str, dict[str, Any]] = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            name = file.relative_to(tmp).as_posix()
            files[name] = known.get(name) or hash_files(tmp, [file])[name]
        # Another machine's shards (ranks without a shared filesystem) are listed too: the record describes the
        # whole checkpoint, so this machine's partial copy fails verification instead of passing for complete.
        files.update({name: record for name, record in known.items() if name not in files})
        files = dict(sorted(files.items()))
        for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync_dir(sub)
        record = {
            "sha256": listing_digest(files),
            "size": sum(f["size"] for f in files.values()),
            "files": files,
            "time": time.time(),
            **(meta or {}),
        }
        with manifest_lock(folder):
            manifest = read_manifest(folder, strict=True)
            old = manifest["files"].get(path.name)
            manifest["files"][path.name] = {"versions": [record] + (old["versions"][:1] if old else [])}
            _write_manifest(folder, manifest)
            _swap_into_place(tmp, path)
            _fsync_dir(folder)
            manifest["files"][path.name] = {"versions": [record]}
            _write_manifest(folder, manifest)
            _remove_stale_temporaries(folder, path.name)  # the old version now sits at a temporary name
            _remove_stale_temporaries(folder, MANIFEST)
            _remove_dead_temporary_directories(folder)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _write_failed(path, exc, None) from exc
    return record


def _remove_dead_temporary_directories(folder: Path) -> None:
    """Deletes the temporary directories of sharded saves whose process is gone (killed mid-save), whatever
    their name: a template such as ``e{epoch}.pt`` never commits the same name again to clear them."""
    for tmp in folder.glob(".*.tmp"):
        match = re.fullmatch(r"\.(.+)\.(\d+)(\.old)?\.tmp", tmp.name)
        if match is None or not tmp.is_dir() or tmp.is_symlink():
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, path: Path) -> None:
    """``tmp`` becomes ``path``; the previous ``path`` (if any) ends at ``tmp``'s name, to be deleted."""
    if not path.exists() and not path.is_symlink():
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        return
    # No atomic exchange on this system: two renames; a crash between them leaves ``path`` missing (its
    # manifest entry then fails verification and resume="auto" takes the previous checkpoint).
    aside = tmp.with_name(tmp.name[: -len(".tmp")] + ".old.tmp")
    os.rename(path, aside)
    os.rename(tmp, path)
    os.rename(aside, tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps the names ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False when the
    system or the file system cannot."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _inside(root: Path, name: str) -> Path | None:
    """``root / name`` when ``name`` (from a manifest: data from outside) stays inside ``root``."""
    candidate = root / name
    try:
        resolved, base = candidate.resolve(), root.resolve()
    except OSError:
        return None
    return candidate if base in resolved.parents else None


def _remove_directory(path: Path, entry: dict[str, Any] | None) -> None:
    """Deletes the files the manifest ``entry`` listed for the directory ``path``, then the directory if
    that leaves it empty: a file fitkit did not write is left alone (with a warning)."""
    listed = {name for record in (entry or {}).get("versions", []) for name in record.get("files", {})}
    for name in listed:
        target = _inside(path, name)
        if target is not None and target.is_file():
            target.unlink()
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    try:
        path.rmdir()
    except OSError:
        left = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        warnings.warn(
            f"removed the checkpoint {path} but left the directory: it holds files fitkit did not write ({left[:5]})",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )


def _verify_directory(path: Path) -> dict[str, Any]:
    entry = read_manifest(path.parent, strict=True)["files"].get(path.name)
    if entry is None and not (path / SHARDED_METADATA).exists() and not (path / SHARDED_STATE).exists():
        listed = sorted(read_manifest(path, strict=False)["files"]) if (path / MANIFEST).exists() else []
        found = listed or sorted(p.name for p in path.glob("*.pt"))
        example = f"{str(path / found[-1])!r}" if found else "'ckpt/e03.pt'"
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint: give one checkpoint file, e.g. {example}"
            + (f" (it holds {', '.join(found[:5])}{', ...' if len(found) > 5 else ''})" if found else "")
            + ", or resume='auto' to take the newest good one that the trainer's ModelCheckpoint or "
            "BackupAndRestore wrote (a sharded checkpoint directory holds .metadata and fitkit-state.pt)"
        )
    if entry is None:
        raise CheckpointError(
            f"the checkpoint directory {path} is not listed in {path.parent / MANIFEST}: fitkit did not finish "
            "writing it (a rank killed during the save?) or it was copied without its manifest. Copy the "
            f"folder's {MANIFEST} along, or, if you trust it, vouch for it with "
            f"fitkit.checkpoint.trust({str(path)!r}) and resume again."
        )
    digests: dict[str, str] = {}
    problems: list[str] = []  # the newest version's problem is the one reported
    for record in entry.get("versions", []):
        files = record.get("files")
        if not isinstance(files, dict):
            continue
        problem = _directory_problem(path, files, digests)
        if problem is None:
            return record
        problems.append(problem)
    problem = problems[0] if problems else "its manifest entry lists no files"
    raise CheckpointError(
        f"the checkpoint directory {path} is incomplete or corrupted ({problem}): a checkpoint counts only when "
        "every rank's shard and the metadata are in place. Resume from an earlier checkpoint (resume='auto' "
        "picks the newest good one)."
    )


def _directory_problem(path: Path, files: dict[str, Any], digests: dict[str, str]) -> str | None:
    """What is wrong with ``path`` against one manifest record's ``files`` (None: nothing)."""
    for name, want in sorted(files.items()):
        target = _inside(path, str(name))
        if target is None:
            return f"the manifest names {name!r}, outside the directory"
        if not target.is_file():
            return f"{name} is missing"
        if target.stat().st_size != want.get("size"):
            return f"{name} has {target.stat().st_size} bytes, the manifest says {want.get('size')}"
        if name not in digests:
            digests[name] = _sha256(target)
        if digests[name] != want.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def is_partial_copy(path: str | Path) -> bool:
    """True for a sharded checkpoint directory that its folder's manifest lists, whose files here all match its
    newest record while some it lists are missing: one machine's part of a checkpoint whose other shards other
    machines wrote (no shared filesystem; `commit_directory` lists them). fitkit's own, to remove, never to load.

    Args:
        path: a sharded checkpoint directory.
    """
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    entry = read_manifest(path.parent, strict=True)["files"].get(path.name) or {}
    files = (entry.get("versions") or [{}])[0].get("files")
    if not isinstance(files, dict):
        return False
    here = {name: want for name, want in files.items() if (target := _inside(path, str(name))) and target.is_file()}
    return len(here) < len(files) and _directory_problem(path, here, {}) is None


# -- what a full checkpoint holds ---------------------------------------------------------------
def header(kind: str) -> dict[str, Any]:
    """The ``"fitkit"`` entry of a checkpoint: its format version, the torch that wrote it, its kind."""
    return {"format": FORMAT_VERSION, "torch": str(torch.__version__), "kind": kind}


def _mismatch(kind: str, saved: Any, now: Any, hint: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {kind} mismatch: the checkpoint has {saved}, this trainer has {now}. {hint}")


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A full checkpoint in the current layout: files written before several optimizers existed hold
    one ``optimizer`` (and ``optimizer_class``), read as the optimizer named ``"optimizer"``."""
    if "optimizers" not in state and "optimizer" in state:
        state = {
            **state,
            "optimizers": {"optimizer": state["optimizer"]},
            "optimizer_classes": {"optimizer": state.get("optimizer_class")},
        }
    return state


def world_size_mismatch(saved: int, now: int) -> CheckpointError:
    """The error for a checkpoint of ``saved`` ranks resumed on ``now`` whose training data cannot be dealt
    out to another number of ranks (a map-style DataLoader or in-memory data can)."""
    return _mismatch(
        "world size",
        saved,
        now,
        "Resume with the same number of processes, or pass strict=False to continue with another (the data "
        "order then differs from an uninterrupted run). A map-style DataLoader (RandomSampler, SequentialSampler "
        "or DistributedSampler) or in-memory data resumes on any number of processes; an iterable dataset's "
        "saved position belongs to the rank that wrote it, unless the dataset (or loader) deals its unread data "
        "out itself with reshard_state_dict(states, rank, world_size) (docs/checkpoints.md).",
    )


def optimizer_param_names(model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, list[str]]:
    """Each optimizer's parameters by name, in the order its state is saved (matched by position on load)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        key: [names.get(id(p), "?") for group in opt.param_groups for p in group["params"]]
        for key, opt in optimizers.items()
    }


def check_fits(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    world_size: int,
    data: dict[str, Any],
) -> None:
    """Raises a [CheckpointError][fitkit.checkpoint.CheckpointError] naming the first way a full checkpoint's ``state`` (as
    `upgrade` returns it) does not fit a trainer with this ``model``, ``optimizers`` (by name),
    ``world_size`` and training ``data`` signature."""
    # First: another world size also changes the per-rank batch count, which would be reported instead.
    if state.get("world_size", 1) != world_size:
        raise world_size_mismatch(state.get("world_size", 1), world_size)
    model_state, current = state["model"], model.state_dict()
    missing = sorted(set(current) - set(model_state))
    unexpected = sorted(set(model_state) - set(current))
    if missing or unexpected:
        raise _mismatch(
            "model architecture",
            f"{state.get('model_class')} with unexpected keys {unexpected[:5]}",
            f"{type(model).__name__} with missing keys {missing[:5]}",
            "Build the same model as the run that wrote it, or pass strict=False to load what fits.",
        )
    shapes = [
        f"{k}: {tuple(model_state[k].shape)} vs {tuple(v.shape)}"
        for k, v in current.items()
        if tuple(model_state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise _mismatch("model architecture", "other parameter shapes", "these", f"Differences: {shapes[:5]}")
    saved_classes = state.get("optimizer_classes", {})
    now_classes = {name: type(opt).__name__ for name, opt in optimizers.items()}
    if set(saved_classes) != set(now_classes):
        raise _mismatch(
            "optimizers", f"optimizers named {sorted(saved_classes)}", f"{sorted(now_classes)}",
            "Resume with the same optimizers under the same names.",
        )  # fmt: skip
    for name, cls in now_classes.items():
        if saved_classes[name] != cls:
            which = "optimizer type" if len(now_classes) == 1 else f"type of optimizer {name!r}"
            raise _mismatch(which, saved_classes[name], cls, "Resume with the same optimizer class.")
    now_params = optimizer_param_names(model, optimizers)
    for name, order in (state.get("optimizer_params") or {}).items():
        if name in now_params and order != now_params[name]:
            first = next(i for i, (a, b) in enumerate(zip(order, now_params[name])) if a != b)
            raise _mismatch(
                f"parameter order of optimizer {name!r}",
                f"{order[first : first + 3]} at positions {first}..",
                f"{now_params[name][first : first + 3]} there",
                "An optimizer's state (Adam's moments, say) is matched to its parameters by position, so each would "
                "get another's: build the optimizer over the parameters in the order the run that wrote it did "
                "(torch.optim.Adam(model.parameters()) with the modules registered in the same order).",
            )
    saved = state.get("data", {})
    for key in ("num_samples", "num_batches"):
        if saved.get(key) is not None and data.get(key) is not None and saved[key] != data[key]:
            raise _mismatch(
                f"training data size ({key})",
                saved[key],
                data[key],
                "Resume with the same dataset and batch size, or pass strict=False.",
            )


def _manifest_folders(folder: Path) -> list[Path]:
    """``folder`` and every folder below it that holds a manifest (templates such as
    ``"ckpt/epoch{epoch}/model.pt"`` put each file's manifest in its own subfolder)."""
    below = sorted(m.parent for m in folder.rglob(MANIFEST)) if folder.is_dir() else []
    return [folder] + [f for f in below if f != folder]


def candidates(folders: list[Path]) -> list[Path]:
    """Full checkpoints listed in the manifests of the folders (and of their subfolders), newest first.

    An unreadable manifest is a [ManifestError][fitkit.checkpoint.ManifestError]: the files it vouched for cannot be ranked."""
    found = []
    for folder in [f for top in folders for f in _manifest_folders(top)]:
        for name, entry in read_manifest(folder, strict=True)["files"].items():
            for record in entry.get("versions", [])[:1]:
                if record.get("kind") == "full":
                    key = (
                        record.get("global_step", -1),
                        record.get("epoch", -1),
                        record.get("batch_in_epoch", -1),
                        record.get("time", 0.0),
                    )
                    found.append((key, folder / name))
    return [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)]


def newest_good(folders: list[Path], warning: str) -> Path | None:
    """The newest full checkpoint in ``folders`` that verifies; each bad newer one is reported with ``warning``.

    None only when the folders hold no checkpoint at all. Files that fitkit cannot vouch for (no manifest,
    an unreadable one, files it does not list, only corrupted ones) are a [CheckpointError][fitkit.checkpoint.CheckpointError] that
    lists them: starting over would overwrite them.
    """
    for path in candidates(folders):
        try:
            verify(path)
        except CheckpointError as exc:
            warnings.warn(f"{warning}: {exc}", FitkitWarning, stacklevel=user_stacklevel())
            continue
        return path
    unvouched = [f for folder in folders for f in unvouched_files(folder)]
    if unvouched:
        shown = ", ".join(str(f) for f in unvouched[:5]) + (
            f" and {len(unvouched) - 5} more" if len(unvouched) > 5 else ""
        )
        raise CheckpointError(
            f"found {len(unvouched)} file(s) that no fitkit manifest vouches for as a good full checkpoint: {shown}. "
            "fitkit will not start over on top of them. To resume from one you trust, vouch for it with "
            "fitkit.checkpoint.trust(path) (it checks the file loads weights-only and records its SHA-256) and "
            "run again, or pass its path as resume=...; to start over, move the files away or write to another "
            "folder."
        )
    return None


def unvouched_files(folder: Path) -> list[Path]:
    """Files under ``folder`` (recursively) that are not a manifest, a lock or a temporary, and that no
    manifest of their own folder lists as a full checkpoint with matching size and SHA-256, newest first:
    the ones a fresh start could overwrite without fitkit being able to vouch for them."""
    if not folder.is_dir():
        return []
    found = []
    for path in _walk_checkpoints(folder):
        if path.is_dir():  # a checkpoint directory: vouched for as one entry, or reported as one
            try:
                verify(path)
            except CheckpointError:
                found.append(path)
            continue
        if path.name in (MANIFEST, LOCK):
            continue
        try:
            entry = read_manifest(path.parent)["files"].get(path.name)
        except CheckpointError:  # pragma: no cover - read_manifest warns instead when not strict
            entry = None
        if entry is not None and any(r.get("kind") != "full" for r in entry.get("versions", [])[:1]):
            continue  # a weights-only file (or another kind) fitkit wrote: not a resume point, not a stranger
        try:
            if entry is not None:
                verify(path)
                continue
        except CheckpointError:
            pass
        found.append(path)
    return sorted(found, key=lambda f: f.stat().st_mtime, reverse=True)


def _walk_checkpoints(folder: Path) -> Iterator[Path]:
    """The files under ``folder``, except temporaries (hidden names, and everything inside a hidden
    directory), with each checkpoint directory (listed in its folder's manifest, or holding DCP's
    ``.metadata``) given as one path instead of its files."""
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        listed = read_manifest(here)["files"] if (here / MANIFEST).exists() else {}
        for name in sorted(dirs):
            if name.startswith("."):
                dirs.remove(name)
            elif name in listed or (here / name / ".metadata").is_file():
                dirs.remove(name)
                yield here / name
        yield from (here / name for name in sorted(names) if not name.startswith("."))


def trust(path: str | Path, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Vouches for a checkpoint file that has no (or no readable) manifest entry: files copied without
    their folder's manifest, or a folder whose manifest was lost. The documented way to resume from one.

    The file is loaded with ``torch.load(weights_only=True)`` first (a file that needs to unpickle Python
    objects is refused), then its size and SHA-256 are recorded in its folder's manifest, with its
    position (epoch, step) when it is a full fitkit checkpoint. An unreadable manifest is moved aside to
    ``fitkit-manifest.json.unreadable`` (with a warning) and a new one started. Returns the record.

        fitkit.checkpoint.trust("ckpt/e03.pt")
        trainer.fit(train_dl, epochs=10, resume="ckpt/e03.pt")

    Args:
        path: the checkpoint file (or sharded checkpoint directory) to vouch for, or an fsspec URL of one
            (downloaded, a directory's every file, and checked as here, then recorded in its remote folder's
            manifest for the bytes downloaded).
        storage_options: the fsspec filesystem's options for a URL (credentials, endpoint).
    """
    if _is_url(path):
        folder_url, name = str(path).rstrip("/").rsplit("/", 1)
        return _remote().RemoteFolder(folder_url, storage_options).trust(name)
    path = _checkpoint_path(path, "trust")
    record = trusted_record(path)
    folder = path.parent
    with manifest_lock(folder):
        try:
            manifest = read_manifest(folder, strict=True)
        except ManifestError as exc:
            aside = folder / (MANIFEST + ".unreadable")
            os.replace(folder / MANIFEST, aside)
            warnings.warn(
                f"trust: moved the unreadable manifest aside to {aside} ({exc})",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
            manifest = {"version": 1, "files": {}}
        manifest["files"][path.name] = {"versions": [record]}
        _write_manifest(folder, manifest)
    return record


def trusted_record(path: Path) -> dict[str, Any]:
    """[trust][fitkit.checkpoint.trust]'s checks of the local file or sharded directory ``path`` (weights-only
    load; a directory's metadata read safely, no links), and the manifest record it would write (size, SHA-256,
    every file of a directory, position); writes nothing."""
    directory = path.is_dir()
    if not directory and not path.is_file():
        raise CheckpointError(f"trust: no file at {path}")
    if directory:  # a sharded (DCP) checkpoint: its state file loads weights-only, its metadata is checked
        state = read_sharded_state(path)
    else:
        state = load(path, verify_file=False)
    meta: dict[str, Any] = {"kind": "weights", "trusted": True}
    if isinstance(state, dict) and isinstance(state.get("fitkit"), dict):
        meta["kind"] = state["fitkit"].get("kind", "weights")
        trainer_state = state.get("trainer") or {}
        for key in ("epoch", "global_step", "batch_in_epoch"):
            if isinstance(trainer_state.get(key), int):
                meta[key] = trainer_state[key]
    if directory:
        files = hash_files(path, sorted(p for p in path.rglob("*") if p.is_file()))
        size = sum(f["size"] for f in files.values())
        record = {"sha256": listing_digest(files), "size": size, "files": files, "time": path.stat().st_mtime}
    else:
        record = {"sha256": _sha256(path), "size": path.stat().st_size, "time": path.stat().st_mtime}
    return {**record, **meta}


SHARDED_STATE = "fitkit-state.pt"  # a sharded checkpoint's state file (see fitkit.sharded_checkpoint)
SHARDED_METADATA = ".metadata"  # DCP's index of the shards
SHARDED_LAYOUT = "dcp"


# -- reading a sharded (DCP) checkpoint directory safely --------------------------------------------
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
        "BytesStorageMetadata",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "collections": {"OrderedDict"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # a layout by its name, from torch's table of layouts
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # the checkpoint_id
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, ``torch.Size``, dtypes, layouts and paths; refuses any other global (a
    crafted ``.metadata`` could otherwise run code when DCP unpickles it)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, set()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in DCP metadata")


def _refuse_links(path: Path) -> None:
    """A [CheckpointError][fitkit.CheckpointError] for the first symbolic link inside the directory ``path``: a
    sharded checkpoint's files are its own, and a link would make fitkit vouch for (and load) a file elsewhere."""
    for entry in sorted(path.rglob("*")):
        if entry.is_symlink():
            raise CheckpointError(
                f"refused {path}: {entry.relative_to(path).as_posix()} is a link (to {os.readlink(entry)}), and a "
                "sharded checkpoint's files must lie inside its directory, never link outside it. Copy the real "
                "file in its place if you trust it, then call fitkit.checkpoint.trust again"
            )


def read_sharded_metadata(path: str | Path) -> Any:
    """DCP's ``.metadata`` of the directory ``path``, unpickled safely, after checking that it names
    tensors only, stored in files inside the directory; a [CheckpointError][fitkit.CheckpointError]
    otherwise."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    path = Path(path)
    _refuse_links(path)
    try:
        with open(path / SHARDED_METADATA, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is not a sharded checkpoint: it has no {SHARDED_METADATA}") from exc
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"refused to load {path}: its {SHARDED_METADATA} is not DCP metadata that fitkit can read safely ({exc})"
        ) from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"refused to load {path}: its {SHARDED_METADATA} is not DCP metadata")
    objects = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if objects:
        raise CheckpointError(
            f"refused to load {path}: it stores pickled Python objects ({objects[:3]}), which DCP would load "
            "without weights_only; fitkit's sharded checkpoints hold tensors only"
        )
    for stored in (metadata.storage_data or {}).values():
        name = str(getattr(stored, "relative_path", ""))
        if not name or Path(name).name != name or name.startswith("."):
            raise CheckpointError(
                f"refused to load {path}: its {SHARDED_METADATA} points at {name!r}, not a file inside the directory"
            )
    return metadata


def read_sharded_state(path: str | Path) -> dict[str, Any]:
    """The ``fitkit-state.pt`` of a DCP checkpoint directory (weights-only), after checking its metadata;
    used by [trust][fitkit.checkpoint.trust] before it vouches for a directory, and by `fitkit.sharded_checkpoint`."""
    path = Path(path)
    read_sharded_metadata(path)
    state = load(path / SHARDED_STATE, verify_file=False)
    if not isinstance(state, dict) or state.get("fitkit", {}).get("layout") != SHARDED_LAYOUT:
        raise CheckpointError(f"{path / SHARDED_STATE} is not the state file of a fitkit sharded checkpoint")
    return state


def read_sharded(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The whole state of the sharded (DCP) checkpoint directory ``path`` in this process: its state file
    (`read_sharded_state`), with ``"model"`` holding the model's tensors, each read whole from every rank's
    shard (DCP reassembles them), and its non-tensor values. Check the directory first (`verify`)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    state = read_sharded_state(path)
    metadata = read_sharded_metadata(path)  # safely: DCP's reader below unpickles the same (verified) bytes
    model = {
        key: torch.empty(value.size, dtype=value.properties.dtype)
        for key, value in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(value, TensorStorageMetadata)
    }
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp_load(model, storage_reader=FileSystemReader(path), no_dist=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read the sharded checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    whole = {key[len("model.") :]: value.to(map_location) for key, value in model.items()}
    return {**state, "model": {**whole, **(state.get("model_rest") or {})}}


__all__ = [
    "read_sharded",
    "trusted_record",
    "is_partial_copy",
    "world_size_mismatch",
    "MANIFEST",
    "adopt",
    "deferred_writes",
    "deferred_queue",
    "to_host",
    "mirror",
    "mirrored",
    "listing_digest",
    "LOCK",
    "FORMAT_VERSION",
    "CheckpointError",
    "ManifestError",
    "read_manifest",
    "manifest_lock",
    "atomic_save",
    "remove_checkpoint",
    "verify",
    "load",
    "temporary_directory",
    "hash_files",
    "commit_directory",
    "header",
    "upgrade",
    "check_fits",
    "candidates",
    "newest_good",
    "unvouched_files",
    "trust",
    "SHARDED_STATE",
    "SHARDED_METADATA",
    "SHARDED_LAYOUT",
    "read_sharded_metadata",
    "read_sharded_state",
]
