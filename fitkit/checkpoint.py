"""Checkpoints: atomic writes, a manifest of verified files, safe loading, the trainer's full state.

A write goes to a temporary file in the same folder, is flushed and fsynced, and renamed into place; the
folder's manifest (``fitkit-manifest.json``, itself replaced atomically) then records the file's size and
SHA-256. The manifest is updated in two phases around the rename, so at every instant it vouches for the
bytes under the final name, old or new: a crash never leaves a readable name without a good file, and a
reader never trusts bytes the manifest does not vouch for. Everything is saved as tensors and plain
Python values, so every file loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fitkit import distributed, rng

if TYPE_CHECKING:
    from fitkit.trainer import Trainer

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
            torch.save(obj, writer)
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
            f"{MANIFEST} along, or load it with fitkit.checkpoint.load(path, verify=False) if you trust it."
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


# -- the trainer's state ------------------------------------------------------------------------
def _callback_states(trainer: Trainer) -> dict[str, Any]:
    return {key: cb.state_dict() for key, cb in trainer._callback_keys()}


def _data_signature(loader: Any) -> dict[str, Any]:
    signature: dict[str, Any] = {"num_batches": None, "num_samples": None}
    with contextlib.suppress(TypeError):
        signature["num_batches"] = len(loader)
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        with contextlib.suppress(TypeError):
            signature["num_samples"] = len(dataset)
    elif hasattr(loader, "num_samples"):
        signature["num_samples"] = loader.num_samples
    elif hasattr(loader, "loader"):
        signature["num_samples"] = getattr(loader.loader, "num_samples", None)
    return signature


# What differs between the ranks of a distributed run: each rank's generators (dropout, its DataLoader
# workers' seeds), its share of the epoch's running sums, and its not yet all-reduced gradients.
_PER_RANK = ("rng", "epoch_rng", "train_tracker", "accumulation")


def trainer_state_dict(trainer: Trainer) -> dict[str, Any]:
    """The full training state of ``trainer``: plain values and tensors only.

    Under FSDP the model and optimizer states are gathered unsharded (a collective: every rank calls
    this) and only rank 0, which writes checkpoints, receives them.
    """
    state = trainer.state
    mid_epoch = state.batch_in_epoch > 0
    grads = None
    if trainer._grads_pending:  # mid accumulation group: the partial sums decide the next step
        if distributed.is_fsdp(trainer._dist):
            raise NotImplementedError(
                "saving a checkpoint in the middle of an accumulation group is not supported "
                "with strategy='fsdp' (the partial gradients are sharded); save at group "
                "ends: ModelCheckpoint/BackupAndRestore(save_freq=a multiple of "
                "accumulate_grad_batches) or 'epoch'"
            )
        grads = [None if p.grad is None else p.grad.detach().cpu() for p in trainer.model.parameters()]
    return {
        "fitkit": {"format": FORMAT_VERSION, "torch": str(torch.__version__), "kind": "full"},
        "model": distributed.full_model_state_dict(trainer.model, trainer._dist),  # unsharded under FSDP
        "model_class": type(trainer.model).__name__,
        "optimizer": distributed.full_optimizer_state_dict(trainer.model, trainer.optimizer, trainer._dist),
        "optimizer_class": type(trainer.optimizer).__name__,
        "scaler": trainer._scaler.state_dict() if trainer._scaler is not None else None,
        "trainer": state.state_dict(),
        "callbacks": _callback_states(trainer),
        "rng": rng.capture(trainer._train_loader),
        "epoch_rng": trainer._epoch_rng if mid_epoch else None,
        "train_tracker": trainer._train_tracker.state_dict(),
        "accumulation": {"grads": grads, "units": trainer._group_units, "first_n": trainer._group_first_n},
        "data": _data_signature(trainer._train_loader),
        "world_size": trainer.world_size,
        "precision": trainer.precision,
    }


def _mismatch(kind: str, saved: Any, now: Any, hint: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {kind} mismatch: the checkpoint has {saved}, this trainer has {now}. {hint}")


def load_trainer_state_dict(trainer: Trainer, state: dict[str, Any], strict: bool = True) -> None:
    """Restores what :func:`trainer_state_dict` returned, naming any mismatch before changing anything."""
    if not isinstance(state, dict) or state.get("fitkit", {}).get("kind") != "full":
        raise CheckpointError(
            "not a full fitkit checkpoint (a weights-only file?): load weights with "
            "model.load_state_dict(torch.load(path, weights_only=True))"
        )
    if per_rank := state.get("per_rank"):  # this rank's own part (with strict=False, the world size may differ)
        state = {**state, **per_rank[trainer._dist.rank % len(per_rank)]}
    model_state = state["model"]
    current = trainer.model.state_dict()
    if strict:
        # First: another world size also changes the per-rank batch count, which would be reported instead.
        if state.get("world_size", 1) != trainer.world_size:
            raise _mismatch(
                "world size",
                state.get("world_size"),
                trainer.world_size,
                "Resume with the same number of processes, or pass strict=False to continue with "
                "another (the data order then differs from an uninterrupted run).",
            )
        missing = sorted(set(current) - set(model_state))
        unexpected = sorted(set(model_state) - set(current))
        if missing or unexpected:
            raise _mismatch(
                "model architecture",
                f"{state.get('model_class')} with unexpected keys {unexpected[:5]}",
                f"{type(trainer.model).__name__} with missing keys {missing[:5]}",
                "Build the same model as the run that wrote it, or pass strict=False to load what fits.",
            )
        shapes = [
            f"{k}: {tuple(model_state[k].shape)} vs {tuple(v.shape)}"
            for k, v in current.items()
            if tuple(model_state[k].shape) != tuple(v.shape)
        ]
        if shapes:
            raise _mismatch("model architecture", "other parameter shapes", "these", f"Differences: {shapes[:5]}")
        if state.get("optimizer_class") != type(trainer.optimizer).__name__:
            raise _mismatch(
                "optimizer type",
                state.get("optimizer_class"),
                type(trainer.optimizer).__name__,
                "Resume with the same optimizer class.",
            )
        data_now = _data_signature(trainer._train_loader)
        data_then = state.get("data", {})
        for key in ("num_samples", "num_batches"):
            if data_then.get(key) is not None and data_now.get(key) is not None and data_then[key] != data_now[key]:
                raise _mismatch(
                    f"training data size ({key})",
                    data_then[key],
                    data_now[key],
                    "Resume with the same dataset and batch size, or pass strict=False.",
                )
    if strict:
        distributed.load_full_model_state_dict(trainer.model, model_state, trainer._dist, strict=True)
    else:
        fitting = {k: v for k, v in model_state.items() if k in current and tuple(v.shape) == tuple(current[k].shape)}
        distributed.load_full_model_state_dict(trainer.model, fitting, trainer._dist, strict=False)
    try:
        distributed.load_full_optimizer_state_dict(trainer.model, trainer.optimizer, state["optimizer"], trainer._dist)
    except (ValueError, KeyError) as exc:
        if strict:
            raise CheckpointError(f"checkpoint optimizer state does not fit this optimizer: {exc}") from exc
    if trainer._scaler is not None and state.get("scaler"):
        trainer._scaler.load_state_dict(state["scaler"])
    trainer.state.load_state_dict(state["trainer"])
    trainer.state.should_stop, trainer.state.stop_reason = False, None
    saved_callbacks = state.get("callbacks", {})
    for key, callback in trainer._callback_keys():
        if key in saved_callbacks:
            callback.load_state_dict(saved_callbacks[key])
        elif strict and callback.state_dict():
            warnings.warn(f"the checkpoint holds no state for callback {key}; it starts fresh", stacklevel=3)
    trainer._train_tracker.load_state_dict(state["train_tracker"], trainer.device)
    acc = state.get("accumulation") or {}
    if acc.get("grads") is not None:
        for p, g in zip(trainer.model.parameters(), acc["grads"]):
            p.grad = None if g is None else g.to(p.device)
        trainer._grads_pending = True
        trainer._group_units, trainer._group_first_n = acc["units"], acc["first_n"]
    trainer._epoch_rng = state.get("epoch_rng")
    rng.restore(state["rng"], trainer._train_loader)


def save_trainer_checkpoint(trainer: Trainer, path: Path, meta: dict[str, Any] | None = None) -> Path:
    """Writes the full state atomically; in a distributed run every rank's own part goes in, rank 0 writes."""
    state = trainer_state_dict(trainer)
    everyone = distributed.gather_object({key: state[key] for key in _PER_RANK}, trainer._dist)
    if trainer.world_size > 1:
        state["per_rank"] = everyone
    if trainer.is_global_zero:
        info = {
            "kind": "full",
            "epoch": trainer.state.epoch,
            "global_step": trainer.state.global_step,
            "batch_in_epoch": trainer.state.batch_in_epoch,
            **(meta or {}),
        }
        atomic_save(state, path, info)
    distributed.barrier(trainer._dist)
    return path


def load_trainer_checkpoint(trainer: Trainer, path: Path, strict: bool = True) -> None:
    state = load(path, map_location="cpu")
    load_trainer_state_dict(trainer, state, strict=strict)


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


def resolve_resume(trainer: Trainer, resume: str | Path) -> Path | None:
    """The checkpoint to resume from: an explicit (verified) path, or for ``"auto"`` the newest good one
    in the folders of the trainer's checkpoint callbacks (None when there is none yet)."""
    if str(resume) != "auto":
        path = Path(resume)
        verify(path)
        return path
    folders = []
    for _, callback in trainer._callback_keys():
        folder = getattr(callback, "checkpoint_dir", None)
        if folder is not None:
            folders.append(Path(folder))
    if not folders:
        raise ValueError(
            "resume='auto' looks in the folders of the trainer's checkpoint callbacks "
            "(ModelCheckpoint, BackupAndRestore), and this trainer has none; pass a path instead"
        )
    return newest_good(folders, "resume='auto': skipping bad checkpoint")


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
