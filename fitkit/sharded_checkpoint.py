"""Sharded checkpoints under FSDP: ``torch.distributed.checkpoint`` (DCP), one directory per checkpoint.

Every rank writes its own shard of the model and optimizer states (nothing is gathered on one rank), and a
resume reads only each rank's part (DCP reshards when the world size differs). The directory holds:

* ``__<rank>_0.distcp``: each rank's tensors (DCP's files), and ``.metadata``: DCP's index of them;
* ``fitkit-state.pt``: everything else, from rank 0 (written with ``torch.save``, loaded with
  ``weights_only=True``): the trainer state, callbacks, each rank's random and running state
  (``per_rank``), the optimizers' hyper-parameters (``param_groups``) and non-tensor state values.

The guarantees of single-file checkpoints hold for the directory ([fitkit.checkpoint][]): the ranks
write into a temporary directory; rank 0 hashes it (each rank hashes the shard it wrote) and commits it
with every file's size and SHA-256 in the folder's manifest, so a checkpoint counts only once every shard
and the metadata are in place. A load verifies the directory first, then reads DCP's ``.metadata`` with an
unpickler that accepts DCP's own metadata classes only, and refuses a directory whose metadata asks DCP to
unpickle objects (fitkit writes tensors only): DCP's own reader uses plain ``pickle`` and
``torch.load(weights_only=False)`` for those.

The collectives here go through `fitkit.distributed`; DCP runs its own on the default group.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fitkit import checkpoint, distributed
from fitkit._loaders import data_signature
from fitkit._safe_files import open_new
from fitkit._warn import FitkitWarning, user_stacklevel

if TYPE_CHECKING:
    from fitkit.trainer import Trainer

STATE, METADATA, LAYOUT = checkpoint.SHARDED_STATE, checkpoint.SHARDED_METADATA, checkpoint.SHARDED_LAYOUT


# -- save -----------------------------------------------------------------------------------------
def save(trainer: Trainer, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Writes ``trainer``'s full state as a DCP directory at ``path`` (every rank must call it).

    Each rank writes its own shard into a temporary directory next to ``path``; rank 0 adds the rest of
    the state and commits the directory (see the module docstring). An error on any rank is raised on
    every rank, and leaves the previous checkpoint at ``path`` (if any) untouched.

    Inside an asynchronous save (``async_save=True``: `fitkit.checkpoint.deferred_writes`), the call returns
    once DCP's stager (what ``torch.distributed.checkpoint.async_save`` stages with) has copied this rank's
    shard to host memory, and the rest of the state is copied; DCP's write and everything after it (hashes,
    upload, commit) run on one background worker, their collectives on a gloo group of their own
    (`fitkit.distributed.background`), with the same guarantees. Not ``async_save`` itself: it starts its
    collectives at once in a thread of its own, and two callbacks' saves in flight would then interleave
    theirs differently on different ranks.
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    path = Path(path)
    info = trainer.dist
    state = trainer.state_dict(weights=False)
    state["per_rank"] = distributed.gather_object({key: state[key] for key in trainer.PER_RANK}, info)
    state["fitkit"] = {**checkpoint.header("full"), "layout": LAYOUT}
    tensors, state["optimizer_rest"], state["model_rest"] = _weights(trainer)
    position = {
        "kind": "full",
        "layout": LAYOUT,
        "world_size": trainer.world_size,
        "epoch": trainer.state.epoch,
        "global_step": trainer.state.global_step,
        "batch_in_epoch": trainer.state.batch_in_epoch,
        **(meta or {}),
    }
    job = _start(info, state, path, position)
    writer = FileSystemWriter(job.tmp, single_file_per_rank=True, sync_files=True)
    no_dist = info.world_size == 1
    queue = checkpoint.deferred_queue()
    if queue is None:
        job.finish(lambda: _quiet(no_dist, lambda: dcp_save(tensors, storage_writer=writer, no_dist=no_dist)))
        return path
    # Asynchronous: DCP's stager copies this rank's tensors to host memory now (the loop's only pause); DCP's
    # write and the rest follow on the one background worker, whose collectives use a group of their own.
    staged = writer.stage(tensors)
    job.state, job.info = checkpoint.to_host(state), distributed.background(info)
    group = job.info.control_group
    done = _background_worker().submit(
        job.finish,
        lambda: _quiet(no_dist, lambda: dcp_save(staged, storage_writer=writer, process_group=group, no_dist=no_dist)),
    )
    queue.append(done.result)  # the callback's background save: waits for it, raises its error
    return path


_worker: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None  # (the process id, its worker)


def _background_worker() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that finishes asynchronous sharded saves, in the order the loop made them (the same on
    every rank): two callbacks' saves in flight never run their collectives at once on the background group.
    Its threads are joined at exit: an interpreter exiting waits for the write to end."""
    global _worker
    if _worker is None or _worker[0] != os.getpid():  # a forked child inherits the object, not the thread
        _worker = (os.getpid(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fitkit-sharded-save"))
    return _worker[1]


def _quiet(no_dist: bool, write: Callable[[], object]) -> None:
    if not no_dist:
        write()
        return
    with warnings.catch_warnings():  # DCP warns that no_dist means one process: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        write()


@dataclasses.dataclass
class _Save:
    """One sharded save after its snapshot: where it goes, and what rank 0 writes besides the shards."""

    info: distributed.DistInfo
    state: dict[str, Any]
    tmp: Path
    path: Path
    position: dict[str, Any]
    remote_folder: Any
    version: str | None

    def finish(self, write: Callable[[], object]) -> None:
        """``write`` (DCP's, or waiting for the asynchronous one), each rank's hash and upload of its shard,
        rank 0's commit; the outcome agreed on every rank."""
        info, path, error = self.info, self.path, None
        try:
            write()
            # Each rank hashes the shard it wrote (in parallel), so that the commit reads none of them again.
            mine = checkpoint.hash_files(self.tmp, sorted(self.tmp.glob(f"__{info.rank}_*.distcp")))
            if self.remote_folder is not None:  # and uploads it (checked), so that no rank sends another's bytes
                self.remote_folder.upload_files(self.tmp, path.name, self.version, mine)
        except Exception as exc:  # DCP raises on every rank when one fails
            error = f"could not write the sharded checkpoint {path}: {type(exc).__name__}: {exc}"
            mine = {}
        hashes = distributed.gather_object((mine, error), info)
        error = next((e for _, e in hashes if e is not None), None)
        if info.rank == 0:
            try:
                if error is None:
                    error = self.commit({name: record for files, _ in hashes for name, record in files.items()})
            except (OSError, checkpoint.CheckpointError) as exc:
                error = str(exc)
            finally:
                if self.tmp.exists():  # not committed: the partial directory goes
                    shutil.rmtree(self.tmp, ignore_errors=True)
                if error is not None and self.version is not None:  # and the uploaded part no manifest lists
                    self.remote_folder.discard_version(path.name, self.version)
        error = distributed.broadcast_object(error, info)
        if self.remote_folder is not None and info.world_size > 1:
            self._drop_other_machine_copy(info)
        if error is not None:  # the same error on every rank, at the same point: raised as it is, not as one rank's
            raise distributed.on_every_rank(
                checkpoint.CheckpointError(
                    f"{error}. Nothing was replaced: the previous {path.name} (if any) and every other checkpoint "
                    f"in {path.parent} are intact."
                    if "Nothing was replaced" not in error
                    else error
                )
            )

    def _drop_other_machine_copy(self, info: distributed.DistInfo) -> None:
        """On a machine other than rank 0's (no shared filesystem), the ranks wrote their shards into a
        temporary directory of that machine's staging folder that no commit there moves into place: committed
        or not, the remote folder holds the checkpoint, so it goes now (where rank 0's is, it is already gone).
        Then the ranks wait for each other: no rank's next save makes that directory while another removes it."""
        if info.rank != 0 and self.tmp.is_dir() and not self.tmp.is_symlink():
            shutil.rmtree(self.tmp, ignore_errors=True)
        distributed.barrier(info)

    def commit(self, known: dict[str, dict[str, Any]]) -> str | None:
        """Rank 0: the state file, the local commit, then (to an object store) the rest of the files' upload
        and the remote commit. Returns an error message (None: committed)."""
        path, remote_folder = self.path, self.remote_folder
        _save_state_file(self.state, self.tmp / STATE)
        record = checkpoint.commit_directory(self.tmp, path, self.position, known)
        if remote_folder is None:
            return None
        assert self.version is not None
        # Every rank's shard (uploaded by its rank; on several machines not all are in this one's folder), and
        # the files rank 0 wrote besides, uploaded now: the remote record lists every one.
        files = {**known, **record["files"]}
        remote_record = {**record, "files": files, "size": sum(f["size"] for f in files.values())}
        remote_record["sha256"] = checkpoint.listing_digest(files)
        rest = {n: r for n, r in record["files"].items() if n not in known}
        try:
            remote_folder.upload_files(path, path.name, self.version, rest)
            remote_folder.commit_directory(path.name, self.version, remote_record)
        except Exception as exc:
            return (
                f"could not upload the sharded checkpoint {path.name} to {remote_folder.url}: "
                f"{type(exc).__name__}: {exc}. Nothing was replaced there: its manifest vouches for the previous "
                f"checkpoints only (the local copy in {path.parent} is complete)"
            )
        return None


def _start(info: distributed.DistInfo, state: dict[str, Any], path: Path, position: dict[str, Any]) -> _Save:
    """Rank 0 makes the temporary directory (and, to an object store, picks the version id); every rank gets
    them, or the error on every rank."""
    remote_folder = checkpoint.mirrored(path.parent)  # an object store's staging folder (`fitkit.remote`)
    tmp, version, error = None, None, None
    if info.rank == 0:
        try:
            tmp = checkpoint.temporary_directory(path)
            version = None if remote_folder is None else remote_folder.new_version(path.name)
        except (OSError, checkpoint.CheckpointError) as exc:
            error = f"could not write the checkpoint {path}: {exc}. Nothing was replaced."
    tmp, version, error = distributed.broadcast_object((tmp, version, error), info)
    if error is not None:
        raise distributed.on_every_rank(checkpoint.CheckpointError(error))
    assert tmp is not None
    return _Save(info, state, tmp, path, position, remote_folder, version)


def _weights(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The tensors DCP writes (flat keys ``model.<fqn>`` and ``optimizers.<name>.<fqn>.<key>``; sharded
    DTensors under FSDP), each optimizer's other parts, and the model state's non-tensor values."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tensors: dict[str, torch.Tensor] = {}
    model_rest: dict[str, Any] = {}
    for fqn, value in get_model_state_dict(trainer.model).items():
        if isinstance(value, torch.Tensor):
            tensors[f"model.{fqn}"] = value
        else:
            model_rest[fqn] = value
    optimizer_rest: dict[str, Any] = {}
    for name, optimizer in trainer.optimizers.items():
        if not optimizer.state:
            # No state yet: DCP's get_optimizer_state_dict would create it with a zero step (Adam's
            # step count would change); the hyper-parameters by parameter position are all there is.
            optimizer_rest[name] = {"param_groups": optimizer.state_dict()["param_groups"], "by_position": True}
            continue
        full: Any = get_optimizer_state_dict(trainer.model, optimizer)
        keys: dict[str, list[str]] = {}
        values: dict[str, dict[str, Any]] = {}
        for fqn, entry in full["state"].items():
            keys[fqn] = []
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[_optimizer_key(name, fqn, key)] = value
                    keys[fqn].append(key)
                else:
                    values.setdefault(fqn, {})[key] = value
        optimizer_rest[name] = {"param_groups": full["param_groups"], "tensors": keys, "values": values}
    return tensors, optimizer_rest, model_rest


def _optimizer_key(name: str, fqn: str, key: str) -> str:
    return f"optimizers.{name}.{fqn}.{key}"


def _save_state_file(state: dict[str, Any], path: Path) -> None:
    with open_new(path) as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


# -- load -----------------------------------------------------------------------------------------
def load(trainer: Trainer, path: str | Path, strict: bool = True) -> None:
    """Loads the DCP checkpoint directory ``path`` into ``trainer`` (every rank must call it).

    Rank 0 verifies the directory against its manifest and checks its metadata; then every rank reads
    its own part of each tensor. Another world size than the one that wrote it is allowed (DCP reshards)
    with a warning: the run continues, but not bit for bit as an uninterrupted one would.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    path = Path(path)
    _verify_on_rank_zero(trainer, path)
    state = checkpoint.upgrade(checkpoint.load(path / STATE, verify_file=False))  # verified with the directory
    shapes = _saved_shapes(checkpoint.read_sharded_metadata(path))
    if strict:
        _check_fits(trainer, path, state, shapes)
    targets = {
        f"model.{fqn}": value
        for fqn, value in get_model_state_dict(trainer.model).items()
        if isinstance(value, torch.Tensor) and tuple(shapes.get(f"model.{fqn}", ())) == tuple(value.shape)
    }
    optimizer_states = _optimizer_targets(trainer, state, targets, strict)
    try:
        # Each rank reads its own part, in place; one process (not a DCP job) reads without collectives.
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp_load(targets, storage_reader=FileSystemReader(path), no_dist=trainer.world_size == 1)
    except Exception as exc:
        raise checkpoint.CheckpointError(
            f"cannot read the sharded checkpoint {path}: {type(exc).__name__}: {exc}"
        ) from exc
    loaded_model: dict[str, Any] = {k[len("model.") :]: v for k, v in targets.items() if k.startswith("model.")}
    loaded_model.update(state.get("model_rest") or {})
    set_model_state_dict(trainer.model, loaded_model, options=StateDictOptions(strict=strict))
    _load_optimizers(trainer, state, optimizer_states, strict)
    trainer.load_state_dict(state, strict=strict, weights=False)


def _verify_on_rank_zero(trainer: Trainer, path: Path) -> None:
    """Rank 0 verifies the directory against its manifest; its verdict is raised on every rank."""
    error = None
    if trainer.is_global_zero:
        try:
            checkpoint.verify(path)
            checkpoint.read_sharded_metadata(path)
        except checkpoint.CheckpointError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error, trainer.dist)
    if error is not None:
        raise checkpoint.CheckpointError(error)


def _check_fits(trainer: Trainer, path: Path, state: dict[str, Any], shapes: dict[str, torch.Size]) -> None:
    """The checkpoint fits ``trainer`` (shapes from DCP's metadata); another world size warns instead."""
    saved_world = state.get("world_size", 1)
    same_world = saved_world == trainer.world_size
    if not same_world:
        warnings.warn(
            f"resuming {path}, written by {saved_world} process(es), on {trainer.world_size}: DCP reshards the "
            "model and optimizer states, but the run is not bit-exact (other batches per rank, another reduction "
            "order, other random streams per rank; an interrupted epoch goes on with the samples no rank had "
            "read). Resume with the same world size for an exact continuation.",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )
    model = {k[len("model.") :]: torch.empty(v, device="meta") for k, v in shapes.items() if k.startswith("model.")}
    checkpoint.check_fits(
        {**state, "model": model},
        model=trainer.model,
        optimizers=trainer.optimizers,
        world_size=trainer.world_size if same_world else saved_world,
        data=data_signature(trainer.train_loader) if same_world else {},
    )


def _optimizer_targets(
    trainer: Trainer, state: dict[str, Any], targets: dict[str, Any], strict: bool
) -> dict[str, dict[str, Any]]:
    """Each optimizer's state to load, its tensors added to ``targets`` (DCP reads into them in place)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optimizer_states = {}
    for name, optimizer in trainer.optimizers.items():
        saved = state["optimizer_rest"].get(name)
        if saved is None or saved.get("by_position"):
            continue
        current: Any = get_optimizer_state_dict(trainer.model, optimizer)  # creates the state to load into
        loaded: dict[str, dict[str, Any]] = {}
        for fqn, keys in saved["tensors"].items():
            entry = dict(saved["values"].get(fqn, {}))
            for key in keys:
                target = current["state"].get(fqn, {}).get(key)
                if not isinstance(target, torch.Tensor):
                    if strict:
                        raise checkpoint.CheckpointError(
                            f"checkpoint state of optimizer {name!r} does not fit this optimizer: it holds "
                            f"{key!r} for {fqn!r}, which this optimizer has no tensor for"
                        )
                    continue
                targets[_optimizer_key(name, fqn, key)] = target
                entry[key] = target
            loaded[fqn] = entry
        for fqn, entry in saved["values"].items():
            loaded.setdefault(fqn, dict(entry))
        optimizer_states[name] = {"state": loaded, "param_groups": saved["param_groups"]}
    return optimizer_states


def _load_optimizers(
    trainer: Trainer, state: dict[str, Any], optimizer_states: dict[str, dict[str, Any]], strict: bool
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    for name, optimizer in trainer.optimizers.items():
        saved = state["optimizer_rest"].get(name)
        try:
            if name in optimizer_states:
                set_optimizer_state_dict(trainer.model, optimizer, optimizer_states[name])
            elif saved is not None:  # saved before its first step: no state, its hyper-parameters by position
                optimizer.load_state_dict({"state": {}, "param_groups": saved["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            if strict:
                raise checkpoint.CheckpointError(
                    f"checkpoint state of optimizer {name!r} does not fit this optimizer: {exc}"
                ) from exc


def _saved_shapes(metadata: Any) -> dict[str, torch.Size]:
    return {key: value.size for key, value in metadata.state_dict_metadata.items() if hasattr(value, "size")}


__all__ = ["load", "save"]
