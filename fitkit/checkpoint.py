"""Checkpoint files: atomic writes, a manifest of verified files, safe loading, and the checks that a
full checkpoint fits the trainer it is loaded into (the trainer assembles its state: ``Trainer.state_dict``).

A write goes to a temporary file in the same folder, is flushed and fsynced, and renamed into place; the
folder's manifest (``fitkit-manifest.json``, itself replaced atomically) then records the file's size and
SHA-256. The manifest is updated in two phases around the rename, so at every instant it vouches for the
bytes under the final name, old or new: a crash never leaves a readable name without a good file, and a
reader never trusts bytes the manifest does not vouch for. Everything is saved as tensors and plain
Python values, so every file loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import IO, Any, cast

import torch

MANIFEST = "fitkit-manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or does not fit the trainer it is loaded into."""


# -- atomic files -------------------------------------------------------------------------------
class _HashingWriter:
    """A write-only file wrapper that hashes what passes through, so a save reads nothing back."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

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


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.exists():
        return {"version": 1, "files": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring unreadable checkpoint manifest {path}: {exc}", stacklevel=2)
        return {"version": 1, "files": {}}
    manifest.setdefault("files", {})
    return manifest


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
        # Phase 1: vouch for both the old and the new bytes, then rename; phase 2: only the new ones.
        manifest = read_manifest(folder)
        old = manifest["files"].get(path.name)
        versions = [record] + (old["versions"][:1] if old else [])
        manifest["files"][path.name] = {"versions": versions}
        _write_manifest(folder, manifest)
        os.replace(tmp, path)
        _fsync_dir(folder)
        manifest["files"][path.name] = {"versions": [record]}
        _write_manifest(folder, manifest)
        for stale in folder.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
    finally:
        if tmp.exists():
            tmp.unlink()
    return record


def remove_checkpoint(path: str | Path) -> None:
    """Forgets ``path`` in its manifest first, then deletes it (a crash leaves at most an orphan file)."""
    path = Path(path)
    manifest = read_manifest(path.parent)
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
    entry = read_manifest(path.parent)["files"].get(path.name)
    if entry is None:
        raise CheckpointError(
            f"{path} is not listed in {path.parent / MANIFEST}: fitkit did not finish writing it "
            "(a crash during the write?) or it was copied without its manifest. Copy the folder's "
            f"{MANIFEST} along, or load it with fitkit.checkpoint.load(path, verify_file=False) if you trust it."
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


def check_fits(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world_size: int,
    data: dict[str, Any],
) -> None:
    """Raises a :class:`CheckpointError` naming the first way a full checkpoint's ``state`` does not fit
    a trainer with this ``model``, ``optimizer``, ``world_size`` and training ``data`` signature."""
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
    if state.get("optimizer_class") != type(optimizer).__name__:
        raise _mismatch(
            "optimizer type",
            state.get("optimizer_class"),
            type(optimizer).__name__,
            "Resume with the same optimizer class.",
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


def candidates(folders: list[Path]) -> list[Path]:
    """Full checkpoints listed in the folders' manifests, newest first."""
    found = []
    for folder in folders:
        for name, entry in read_manifest(folder)["files"].items():
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
    """The newest full checkpoint in ``folders`` that verifies; each bad newer one is reported with ``warning``."""
    for path in candidates(folders):
        try:
            verify(path)
        except CheckpointError as exc:
            warnings.warn(f"{warning}: {exc}", stacklevel=4)
            continue
        return path
    return None
