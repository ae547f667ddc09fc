"""BackupAndRestore: Keras's name for "restart the same script and it resumes"."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fitkit import remote
from fitkit._async_save import BackgroundSaves, check_strategy
from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.callbacks._files import acquire_run_lock, check_writable, checked_on_rank_zero, release_run_lock
from fitkit.callbacks.base import Callback, Logs
from fitkit.callbacks.model_checkpoint import weights_are_finite
from fitkit.callbacks.optuna_pruning import PRUNED
from fitkit.checkpoint import (
    CheckpointError,
    is_partial_copy,
    newest_good,
    read_manifest,
    remove_checkpoint,
    verify,
)
from fitkit.signals import TrainingInterrupted


class BackupAndRestore(Callback):
    """Backs the full training state up to ``backup_dir`` and resumes from it when the script restarts.

    Unlike Keras, which restarts the interrupted epoch, fitkit resumes at the exact batch: the backup
    holds the RNG states and the position in the epoch (see the README's "Resuming" section).

    Args:
        backup_dir: the folder holding ``backup.pt`` and its manifest.
        save_freq: ``"epoch"`` (after every epoch) or an int N (every N training batches).
        delete_checkpoint: delete the backup when training ends without an exception, so the next run
            starts fresh (Keras's default).
        storage_options: with an fsspec URL ``backup_dir`` (``"s3://bucket/run/backup"``), the filesystem's
            options (credentials, endpoint; see `fitkit.remote`): the backup is written to a local staging
            folder, then uploaded (temporary key, checked, manifest last), and fetched back before a fit
            resumes. None: the filesystem's defaults; an error with a local ``backup_dir``.
        async_save: pause training only to copy the state to host memory; write (and upload) the backup in a
            background thread, one at a time; a failure there is raised at the next batch. Under FSDP, each
            rank's shard is copied by DCP's ``async_save`` and written in the background too.

    ``fit(..., resume=None)`` with this callback resumes from a good backup if one exists; a corrupted
    backup is reported and training starts from scratch. SIGINT/SIGTERM write a backup before exiting.
    """

    def __init__(
        self,
        backup_dir: str | Path,
        save_freq: str | int = "epoch",
        delete_checkpoint: bool = True,
        *,
        storage_options: dict[str, Any] | None = None,
        async_save: bool = False,
    ) -> None:
        if save_freq != "epoch" and (not isinstance(save_freq, int) or isinstance(save_freq, bool) or save_freq < 1):
            raise ValueError(f"save_freq must be 'epoch' or an int >= 1 (training batches), got {save_freq!r}")
        if not isinstance(delete_checkpoint, bool):
            raise TypeError(f"delete_checkpoint must be True or False, got {delete_checkpoint!r}")
        self.remote_folder = remote.for_callback(
            f"{str(backup_dir).rstrip('/')}/backup.pt", storage_options, "BackupAndRestore"
        )
        self.checkpoint_dir = Path(backup_dir) if self.remote_folder is None else self.remote_folder.staging
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be True or False, got {async_save!r}")
        self._background = BackgroundSaves("BackupAndRestore") if async_save else None
        self._claimed = self._wrote = self._failed = False  # on_train_end runs even when on_train_begin did not
        self._batches_since_save = 0
        self._failed = False
        self._wrote = False  # this fit wrote (or resumed from) the backup: only then may it delete it

    def file_templates(self) -> list[str]:
        """The one file this callback writes (and deletes after a successful fit)."""
        return [str(self.path)]

    @property
    def path(self) -> Path:
        """The backup file: ``<checkpoint_dir>/backup.pt``."""
        return self.checkpoint_dir / "backup.pt"

    def resume_path(self) -> Path | None:
        """The backup to resume from, or None (none yet, or it cannot be trusted: reported)."""
        return newest_good([self.checkpoint_dir], "BackupAndRestore: ignoring a bad backup")

    def start_over(self) -> None:
        """``fit(resume="restart")``: deletes the backup, when its folder's manifest vouches for it (a file
        fitkit cannot vouch for is an error, never deleted)."""
        if not (self.path.exists() or self.path.is_symlink()):
            return
        try:
            verify(self.path)
        except CheckpointError as exc:
            if is_partial_copy(self.path):  # one machine's part of a sharded backup it wrote: its own
                remove_checkpoint(self.path)
                return
            raise ValueError(
                f"BackupAndRestore: resume='restart' deletes only backups fitkit vouched for, and {self.path} is not "
                f"one ({exc}). Move it away, or give this run another backup_dir"
            ) from None
        remove_checkpoint(self.path)

    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.claim_folder()  # fit has claimed it already; a trainer that calls the hooks itself claims it now
        remote.attach(self.trainer, self.checkpoint_dir, self.remote_folder)
        if self._background is not None:
            check_strategy(self.trainer, "BackupAndRestore")
        self._batches_since_save = 0
        self._failed = False
        self._wrote = False

    def claim_folder(self) -> None:
        """Checks the folder is writable and takes its run lock, on rank 0, raising on every rank; once per fit
        (``fit`` calls it before anything else)."""
        if not self._claimed:
            checked_on_rank_zero(self.trainer, self._claim_folder)
            self._claimed = True  # on every rank: each asks rank 0 the same number of times

    def _claim_folder(self) -> None:
        check_writable(self.checkpoint_dir, f"BackupAndRestore({str(self.checkpoint_dir)!r})")
        acquire_run_lock(self.checkpoint_dir, f"BackupAndRestore({str(self.checkpoint_dir)!r})")  # one job
        self._locked = True

    def _backup(self) -> None:
        if weights_are_finite(self.model):
            self.trainer.save_checkpoint(self.path)
            self._wrote = True
        else:
            warnings.warn(
                "BackupAndRestore: not backing up non-finite weights", FitkitWarning, stacklevel=user_stacklevel()
            )

    stops_mid_epoch = False  # on_batch_end only writes backups: under torchrun, no per-batch stop vote for it

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self._background is not None:
            self._background.check()  # a failed background save stops training here
        if not isinstance(self.save_freq, int):  # "epoch"
            return
        self._batches_since_save += 1
        if self._batches_since_save >= self.save_freq:
            self._batches_since_save = 0
            self.trainer.after_callbacks(self._saving())

    def _saving(self) -> Callable[[], None]:
        return self._backup if self._background is None else self._background.in_background(self._backup)

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.save_freq == "epoch":
            self.trainer.after_callbacks(self._saving())

    def on_exception(self, exception: BaseException) -> None:
        if (self.trainer.state.stop_reason or "").startswith(PRUNED):
            return  # an Optuna trial pruned (TrialPruned): over, not failed; the next trial must not resume it
        self._failed = True
        if not self._claimed:
            return  # refused before claiming the folder (another job's, perhaps): never a file written into it
        if isinstance(exception, TrainingInterrupted):  # a batch boundary: a consistent state
            if self._background is not None:
                self._background.wait()  # the backup in flight first; then this one, in the loop
            self._backup()

    def on_train_end(self, logs: Logs | None = None) -> None:
        try:
            if self._background is not None:
                self._background.wait()
            resumed = self.trainer.resumed_from
            ours = self._wrote or (resumed is not None and Path(resumed).resolve() == self.path.resolve())
            vouched = self.path.name in read_manifest(self.checkpoint_dir)["files"]  # never a file fitkit did not write
            if self.delete_checkpoint and not self._failed and ours and vouched and self.trainer.is_global_zero:
                remove_checkpoint(self.path)
        finally:
            remote.detach(self.checkpoint_dir, self.remote_folder)
            self._claimed = False
            if getattr(self, "_locked", False):
                self._locked = False
                release_run_lock(self.checkpoint_dir)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_since_save": self._batches_since_save}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches_since_save = int(state["batches_since_save"])


__all__ = ["BackupAndRestore"]
