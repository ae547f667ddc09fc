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
``resume="auto"`` stop with an error, and :func:`trust` is the documented way to vouch for a file again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import torch

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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ManifestError(CheckpointError):
    """A manifest that exists but cannot be read: fitkit neither trusts nor rewrites it."""


def read_manifest(folder: Path, strict: bool = False) -> dict[str, Any]:
    """The folder's manifest (an empty one when there is none).

    An unreadable one (truncated, not JSON, not a fitkit manifest) is a :class:`ManifestError` with
    ``strict``; otherwise a warning and an empty manifest (a reader then trusts nothing in the folder).
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
    warnings.warn(f"ignoring unreadable checkpoint manifest {path}: {problem or 'empty file'}", stacklevel=2)
    return {"version": 1, "files": {}}


@contextlib.contextmanager
def manifest_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder's manifest (``flock`` on :data:`LOCK`): one writer at a time
    reads, changes and rewrites it, in this process or another."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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

    Returns the manifest record written for it (size, sha256 and ``meta``).
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as raw:
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
            _fsync_dir(folder)
            manifest["files"][path.name] = {"versions": [record]}
            _write_manifest(folder, manifest)
            _remove_stale_temporaries(folder, path.name)  # left by a process killed mid-write
            _remove_stale_temporaries(folder, MANIFEST)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise _write_failed(path, exc, locals().get("writer")) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return record


_DISK_ADVICE = {
    errno.ENOSPC: "free disk space (or write to another disk)",
    errno.EDQUOT: "free space within your disk quota (or write to another disk)",
    errno.EFBIG: "the file system refuses files this large: write to one without that limit",
    errno.EACCES: "make the folder writable for this user, or write to another folder",
    errno.EPERM: "make the folder writable for this user, or write to another folder",
    errno.EROFS: "the file system is read-only: write to another folder",
}


def _write_failed(path: Path, exc: BaseException, writer: _HashingWriter | None) -> CheckpointError:
    """The error for a checkpoint write that failed: which file, that nothing was replaced, what to do."""
    cause: BaseException = (writer.error if writer is not None else None) or exc
    code = getattr(cause, "errno", None)
    reason = os.strerror(code) if code else str(cause) or type(cause).__name__
    advice = _DISK_ADVICE.get(code, "check the disk and the folder's permissions") if code else "check the disk"
    return CheckpointError(
        f"could not write the checkpoint {path}: {reason}"
        f"{f' ({errno.errorcode.get(code, code)})' if code else ''}. Nothing was replaced: the previous {path.name} "
        f"(if any) and every other checkpoint in {path.parent} are intact, and its manifest still vouches for "
        f"them. To continue: {advice}, then run again with resume='auto' (or the path of the newest good file)."
    )


def remove_checkpoint(path: str | Path) -> None:
    """Forgets ``path`` in its manifest first, then deletes it (a crash leaves at most an orphan file)."""
    path = Path(path)
    with manifest_lock(path.parent):
        manifest = read_manifest(path.parent, strict=True)
        if manifest["files"].pop(path.name, None) is not None:
            _write_manifest(path.parent, manifest)
        path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def verify(path: str | Path) -> dict[str, Any]:
    """Returns the manifest record that vouches for ``path``'s bytes, or raises :class:`CheckpointError`."""
    path = Path(path)
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


def load(path: str | Path, map_location: Any = "cpu", verify_file: bool = True) -> Any:
    """Loads a fitkit file: verified against its manifest, then ``torch.load(weights_only=True)``.

    A file that would need to unpickle Python objects (and so could run code) is refused with a
    :class:`CheckpointError`; fitkit never loads with ``weights_only=False``.
    """
    if verify_file:
        verify(path)
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


def check_fits(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    world_size: int,
    data: dict[str, Any],
) -> None:
    """Raises a :class:`CheckpointError` naming the first way a full checkpoint's ``state`` (as
    :func:`upgrade` returns it) does not fit a trainer with this ``model``, ``optimizers`` (by name),
    ``world_size`` and training ``data`` signature."""
    # First: another world size also changes the per-rank batch count, which would be reported instead.
    if state.get("world_size", 1) != world_size:
        raise _mismatch(
            "world size",
            state.get("world_size"),
            world_size,
            "Resume with the same number of processes, or pass strict=False to continue with "
            "another (the data order then differs from an uninterrupted run).",
        )
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

    An unreadable manifest is a :class:`ManifestError`: the files it vouched for cannot be ranked."""
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
    an unreadable one, files it does not list, only corrupted ones) are a :class:`CheckpointError` that
    lists them: starting over would overwrite them.
    """
    for path in candidates(folders):
        try:
            verify(path)
        except CheckpointError as exc:
            warnings.warn(f"{warning}: {exc}", stacklevel=4)
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
    for path in folder.rglob("*"):
        if not path.is_file() or path.name in (MANIFEST, LOCK) or path.name.startswith("."):
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


def trust(path: str | Path) -> dict[str, Any]:
    """Vouches for a checkpoint file that has no (or no readable) manifest entry: files copied without
    their folder's manifest, or a folder whose manifest was lost. The documented way to resume from one.

    The file is loaded with ``torch.load(weights_only=True)`` first (a file that needs to unpickle Python
    objects is refused), then its size and SHA-256 are recorded in its folder's manifest, with its
    position (epoch, step) when it is a full fitkit checkpoint. An unreadable manifest is moved aside to
    ``fitkit-manifest.json.unreadable`` (with a warning) and a new one started. Returns the record.

        fitkit.checkpoint.trust("ckpt/e03.pt")
        trainer.fit(train_dl, epochs=10, resume="ckpt/e03.pt")
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trust: no file at {path}")
    state = load(path, verify_file=False)
    meta: dict[str, Any] = {"kind": "weights", "trusted": True}
    if isinstance(state, dict) and isinstance(state.get("fitkit"), dict):
        meta["kind"] = state["fitkit"].get("kind", "weights")
        trainer_state = state.get("trainer") or {}
        for key in ("epoch", "global_step", "batch_in_epoch"):
            if isinstance(trainer_state.get(key), int):
                meta[key] = trainer_state[key]
    folder = path.parent
    with manifest_lock(folder):
        try:
            manifest = read_manifest(folder, strict=True)
        except ManifestError as exc:
            aside = folder / (MANIFEST + ".unreadable")
            os.replace(folder / MANIFEST, aside)
            warnings.warn(f"trust: moved the unreadable manifest aside to {aside} ({exc})", stacklevel=2)
            manifest = {"version": 1, "files": {}}
        record = {"sha256": _sha256(path), "size": path.stat().st_size, "time": path.stat().st_mtime, **meta}
        manifest["files"][path.name] = {"versions": [record]}
        _write_manifest(folder, manifest)
    return record
