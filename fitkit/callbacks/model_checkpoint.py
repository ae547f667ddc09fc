"""ModelCheckpoint: templated, atomic, top-k checkpoints that a run can resume from."""

from __future__ import annotations

import contextlib
import errno
import math
import re
import string
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fitkit import distributed, remote
from fitkit._arguments import check_flags
from fitkit._async_save import BackgroundSaves, check_strategy
from fitkit._checks import weights_are_finite
from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.callbacks import _files
from fitkit.callbacks.base import Logs
from fitkit.callbacks.monitor import MonitorCallback, check_key_can_exist
from fitkit.checkpoint import (
    CheckpointError,
    atomic_save,
    is_partial_copy,
    read_manifest,
    remove_checkpoint,
    verify,
)
from fitkit.data import move_to_device
from fitkit.signals import TrainingInterrupted


def _disk_full(exception: BaseException) -> bool:
    """Whether ``exception`` (or what caused it) is a write that found the disk or the quota full."""
    seen: BaseException | None = exception
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__
    return False


def static_folder(template: str) -> Path:
    """The part of a path template before its first placeholder: the folder every render must stay in."""
    parts = Path(template).parent.parts
    static = []
    for part in parts:
        if "{" in part:
            break
        static.append(part)
    return Path(*static) if static else Path(".")


class ModelCheckpoint(MonitorCallback):
    """Saves the model (or the full training state) as training goes.

    Args:
        filepath: a path template filled from the logs with ``str.format``: ``{epoch}`` (1-based, as in
            Keras), ``{step}`` (optimizer steps), ``{batch}``, and any epoch-log key, e.g.
            ``"ckpt/{epoch:02d}-{val_loss:.3f}.pt"``. A key the template names that the logs lack is an error.
            Rendered names never leave the template's folder (the part before the first placeholder).
        monitor: the key that decides ``save_best_only`` and ``save_top_k``; None with ``save_top_k``
            keeps the newest files.
        mode: ``"auto"``, ``"min"`` or ``"max"`` (see [MonitorCallback][fitkit.callbacks.MonitorCallback]).
        save_best_only: write only when ``monitor`` improves.
        save_weights_only: write ``model.state_dict()`` only (loads with plain
            ``torch.load(path, weights_only=True)``); otherwise the full, resumable training state.
        save_freq: ``"epoch"`` (at each epoch end) or an int N (every N training batches).
        save_top_k: keep only the k best files by ``monitor`` (or the k newest when ``monitor=None``);
            None keeps every file. A file leaves only after its replacement is complete.
        save_last: also keep the full state in ``last.pt`` in the folder, rewritten at every save point
            (every epoch, or every ``save_freq`` batches) whether or not that point's file is kept (as
            Lightning's ``save_last``): ``last.pt`` is always the newest state, the one to resume from.
        verbose: print a line per save.
        storage_options: with an fsspec URL ``filepath`` (``"s3://bucket/run/{epoch:02d}.pt"``, fields in the
            file name only), the filesystem's options (credentials, endpoint; see `fitkit.remote`): files are
            written to a local staging folder, then uploaded (temporary key, checked, manifest last). None: the
            filesystem's defaults; an error with a local ``filepath``.
        async_save: pause training only to copy the state to host memory; write it (and upload it, and remove
            the files it replaces) in a background thread, one save at a time; a failure there is raised at the
            next batch. Under FSDP, each rank's shard is copied by DCP's ``async_save`` and written in the
            background too.

    Every write is atomic (temporary file, fsync, rename, manifest with SHA-256). Non-finite weights are
    never written; a non-finite monitored value is never the best. Only files that this callback wrote
    are deleted (inside its folder, matching its template, listed in the manifest): a resumed checkpoint's
    list of kept files is checked, not trusted. A fit that did not resume from this folder never
    overwrites files it finds there: it raises before the first epoch (resume, or use another folder). On SIGINT/SIGTERM the full state goes to ``last.pt`` (the run can resume from it); on
    any other exception the state goes to ``crash.pt``, never over a good checkpoint, and ``resume="auto"``
    does not pick it (it may be mid-step).
    """

    def __init__(
        self,
        filepath: str | Path,
        monitor: str | None = "val_loss",
        mode: str = "auto",
        save_best_only: bool = False,
        save_weights_only: bool = False,
        save_freq: str | int = "epoch",
        save_top_k: int | None = None,
        save_last: bool = False,
        verbose: bool = False,
        *,
        storage_options: dict[str, Any] | None = None,
        async_save: bool = False,
    ) -> None:
        super().__init__(monitor=monitor or "_unused", mode=mode)
        self.monitor_key = monitor
        if save_freq != "epoch" and (not isinstance(save_freq, int) or isinstance(save_freq, bool) or save_freq < 1):
            raise ValueError(f"save_freq must be 'epoch' or an int >= 1 (training batches), got {save_freq!r}")
        if save_top_k is not None and (not isinstance(save_top_k, int) or save_top_k < 1):
            raise ValueError(f"save_top_k must be None (keep every file) or an int >= 1, got {save_top_k!r}")
        check_flags(save_best_only=save_best_only, save_weights_only=save_weights_only, save_last=save_last,
                    verbose=verbose, async_save=async_save)  # fmt: skip
        self._background = BackgroundSaves("ModelCheckpoint") if async_save else None
        self._claimed = self._trained = False
        if not isinstance(filepath, (str, Path)) or not str(filepath).strip():
            raise TypeError(
                f"filepath must be a path template (str or pathlib.Path) such as 'ckpt/{{epoch:02d}}.pt', got {filepath!r}"
            )
        given = Path(filepath)  # a folder, not a sharded checkpoint (FSDP's best.pt is a directory with .metadata)
        if str(filepath).endswith(("/", "\\")) or (given.is_dir() and not (given / ".metadata").is_file()):
            folder = str(filepath).rstrip("/\\")
            raise ValueError(
                f"ModelCheckpoint(filepath={str(filepath)!r}) names a folder; give the file name template inside it, "
                f"e.g. ModelCheckpoint({folder + '/{epoch:02d}.pt'!r}) (Keras's filepath, Lightning's dirpath + filename)"
            )
        if save_best_only and monitor is None:
            raise ValueError("save_best_only=True needs a monitor key such as 'val_loss'")
        self.remote_folder = remote.for_callback(filepath, storage_options, "ModelCheckpoint")
        if self.remote_folder is not None:  # written locally first, into the staging folder, then mirrored
            filepath = self.remote_folder.staging / remote.split_template(str(filepath))[1]
        self.filepath = str(filepath)
        self._fields = self._template_fields(self.filepath)
        self.checkpoint_dir = static_folder(self.filepath)
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.save_freq = save_freq
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.verbose = verbose
        self.kept: list[tuple[float | None, int, str]] = []  # (score, global_step, path)
        self._batches_since_save = 0
        self.last_saved: Path | None = None
        # Files this callback wrote (this instance, any fit) and top-k removals a kill may have interrupted.
        self._written: set[str] = set()
        self._pending_removal: list[str] = []
        self._folder_checked = False

    def file_templates(self) -> list[str]:
        """The path templates this callback writes, ``last.pt`` included with ``save_last`` (two callbacks that
        both keep it in one folder are refused when the Trainer is built); ``crash.pt`` excepted."""
        return [self.filepath] + ([str(self.checkpoint_dir / "last.pt")] if self.save_last else [])

    @staticmethod
    def _template_fields(template: str) -> list[str]:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        except ValueError as exc:
            raise ValueError(f"filepath {template!r} is not a valid format template: {exc}") from exc
        return [re.split(r"[.\[]", name, maxsplit=1)[0] for name in names]

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        self.reset_monitor()
        self._batches_since_save = 0
        self._folder_checked = False
        self._trained = False  # a failure before this fit's first batch leaves no crash.pt (nothing to inspect)
        self.claim_folder()  # fit has claimed it already; a trainer that calls the hooks itself claims it now
        remote.attach(self.trainer, self.checkpoint_dir, self.remote_folder)
        if self._background is not None:
            check_strategy(self.trainer, "ModelCheckpoint")
        for field in self._fields:  # a typo in the template is an error now, not at the first save
            if field not in ("epoch", "step", "batch"):
                check_key_can_exist(field, self.trainer, f"ModelCheckpoint(filepath={self.filepath!r})")
        if self.monitor_key is not None and (self.save_best_only or self.save_top_k):
            self.check_monitor_key()
            _ = self.resolved_mode  # fail before training when mode='auto' cannot tell the direction

    def claim_folder(self) -> None:
        """Checks the folder is writable (a file there, a read-only folder) and takes its run lock (one job per
        folder), on rank 0, raising on every rank; once per fit (``fit`` calls it before anything else)."""
        if not self._claimed:
            _files.checked_on_rank_zero(self.trainer, self._claim_folder)
            self._claimed = True  # on every rank: each asks rank 0 the same number of times

    def _claim_folder(self) -> None:
        _files.check_writable(self.checkpoint_dir, f"ModelCheckpoint({self.filepath!r})")
        _files.acquire_run_lock(self.checkpoint_dir, f"ModelCheckpoint({self.filepath!r})")  # one job per folder
        self._locked = True

    def on_train_end(self, logs: Logs | None = None) -> None:
        if self._background is not None:
            self._background.wait()  # the last save is complete (or its error raised) when fit returns
        remote.detach(self.checkpoint_dir, self.remote_folder)
        self._claimed = False
        if getattr(self, "_locked", False):
            self._locked = False
            _files.release_run_lock(self.checkpoint_dir)

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        if not self._folder_checked:  # once per fit, after fit's resume has loaded (or not) a checkpoint
            self._folder_checked = True
            _files.checked_on_rank_zero(self.trainer, self._check_folder)
            self._remove_pending()

    stops_mid_epoch = False  # on_batch_end only writes checkpoints: under torchrun, no per-batch stop vote for it

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        self._trained = True
        if self._background is not None:
            self._background.check()  # a failed background save stops training here
        if isinstance(self.save_freq, str):  # "epoch"
            return
        self._batches_since_save += 1
        if self._batches_since_save >= self.save_freq:
            self._batches_since_save = 0
            with self.trainer.allow_sync():  # the batch's values, read back every save_freq batches
                values = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, torch.Tensor) and v.ndim == 0}
            # A batch's values differ between ranks: decide on their mean, so every rank saves (collectively) or none.
            values = distributed.mean_over_ranks(values, self.trainer.dist)
            self._consider(self.trainer.state.epoch, values, batch=batch)

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        if self.save_freq == "epoch" and not self._on_validations():
            self._consider(epoch, dict(logs or {}), batch=None)
        elif self.save_freq == "epoch":  # the validations decide what is kept; last.pt still follows each epoch
            self._save_last_only()

    def on_validation_end(self, logs: Logs | None = None) -> None:
        # validate_every_n_steps with a val_ monitor that decides what is kept: consider every validation.
        if self.save_freq == "epoch" and self._on_validations() and self.decides_on_validations(logs):
            assert logs is not None
            self._consider(int(logs["epoch"]), dict(logs), batch=None)

    def _on_validations(self) -> bool:
        return (
            self.monitor_key is not None
            and bool(self.save_best_only or self.save_top_k)
            and self.decides_on_validations()
        )

    def on_exception(self, exception: BaseException) -> None:
        interrupted = isinstance(exception, TrainingInterrupted)
        if not self._claimed:
            return  # refused before claiming the folder (another job's, perhaps): never a file written into it
        if not interrupted and not self._trained:
            return  # failed before training (a bad argument, an unwritable folder): nothing worth a crash.pt
        if not interrupted and self.trainer.world_size > 1:
            return  # a save is collective, and the other ranks are not here to join it
        if not interrupted and _disk_full(exception):
            return  # a crash.pt would fail the same way: the error already names the disk
        name = "last.pt" if interrupted else "crash.pt"
        if not weights_are_finite(self.model):
            warnings.warn(
                f"ModelCheckpoint: not writing {name}: the model holds non-finite weights",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
            return
        path = self.checkpoint_dir / name
        try:
            if self._background is not None:
                self._background.wait()  # the save in flight first; then this one, in the loop
            self.trainer.save_checkpoint(path, meta=None if interrupted else {"kind": "crash"})
        except Exception as exc:  # the original exception matters more than this one
            warnings.warn(
                f"ModelCheckpoint: could not save {path} after {type(exception).__name__}: {exc}",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
            return
        if self.verbose:
            print(f"ModelCheckpoint: saved {'interrupted' if interrupted else 'crashed'} run to {path}")

    # -- decisions ------------------------------------------------------------------------------
    def _consider(self, epoch: int, logs: dict[str, Any], batch: int | None) -> None:
        score = None
        if self.monitor_key is not None and (self.save_best_only or self.save_top_k):
            score = self.get_monitor_value(logs)
            if score is None:
                return self._save_last_only()  # validation_freq skipped this epoch
            if self.save_best_only:
                if not self.is_improvement(score, self.best):
                    return self._save_last_only()
                self.best = score
        path = self._render(epoch, logs, batch)
        if self.save_top_k is not None and score is not None and len(self.kept) >= self.save_top_k:
            worst = self._worst()
            if worst is not None and not self._better(score, worst[0]):
                return self._save_last_only()  # would not enter the top k
        step = self.trainer.state.global_step
        self.trainer.after_callbacks(self._saving(lambda: self._write(path, score, step)))

    def _save_last_only(self) -> None:
        """A save point whose file is not kept: ``last.pt`` is still the newest state (``save_last``)."""
        if self.save_last:
            self.trainer.after_callbacks(self._saving(self._write_last))

    def _saving(self, save: Callable[[], None]) -> Callable[[], None]:
        """``save``, in the background with ``async_save``."""
        return save if self._background is None else self._background.in_background(save)

    def _write_last(self) -> None:
        last = self.checkpoint_dir / "last.pt"
        if not weights_are_finite(self.model):
            warnings.warn(
                f"ModelCheckpoint: skipped {last}: the model holds non-finite weights",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
            return
        _files.checked_on_rank_zero(self.trainer, lambda: self._check_overwrite(last))
        self._save_last()

    def _render(self, epoch: int, logs: dict[str, Any], batch: int | None) -> Path:
        values = {
            "epoch": epoch + 1,
            "step": self.trainer.state.global_step,
            "batch": batch if batch is not None else 0,
            **logs,
        }
        missing = [f for f in self._fields if f not in values]
        if missing:
            raise KeyError(
                f"ModelCheckpoint(filepath={self.filepath!r}) names {missing} but the logs hold only "
                f"{sorted(values)}; fix the template or log those keys (val_ keys need val_data)"
            )
        try:
            rendered = Path(self.filepath.format(**values))
        except (ValueError, IndexError, KeyError, AttributeError) as exc:
            raise ValueError(f"ModelCheckpoint: cannot render {self.filepath!r} with {values}: {exc}") from exc
        root = self.checkpoint_dir.resolve()
        target = rendered.resolve()
        if root != target.parent and root not in target.parents:
            raise ValueError(
                f"ModelCheckpoint: the rendered path {rendered} leaves the checkpoint folder {root}; "
                "a logged value must not contain path separators or '..'"
            )
        return rendered

    @property
    def best_model_path(self) -> str | None:
        """The best file by ``monitor`` among those this callback keeps (``save_best_only`` and ``save_top_k``
        rank them by it; the newest of equal scores), as Lightning names it; without a ranking (``monitor=None``,
        or neither option) the newest file it keeps. None before the first write. A resumed fit restores it."""
        best = self._best_kept()
        return None if best is None else best[2]

    @property
    def best_model_score(self) -> float | None:
        """The ``monitor`` value of [best_model_path][fitkit.callbacks.ModelCheckpoint.best_model_path]; None
        without a ranking."""
        best = self._best_kept()
        return None if best is None else best[0]

    def _best_kept(self) -> tuple[float | None, int, str] | None:
        scored = [item for item in self.kept if item[0] is not None and math.isfinite(item[0])]
        if not scored:
            return max(self.kept, key=lambda item: item[1], default=None)  # the newest
        sign = 1.0 if self.resolved_mode == "min" else -1.0
        return min(scored, key=lambda item: (sign * float(item[0] or 0.0), -item[1]))

    def _better(self, a: float, b: float | None) -> bool:
        if not math.isfinite(a):
            return False  # NaN/inf never enters a full top k
        if b is None or not math.isfinite(b):
            return True
        return a < b if self.resolved_mode == "min" else a > b

    def _worst(self, kept: list[tuple[float | None, int, str]] | None = None) -> tuple[float | None, int, str] | None:
        kept = self.kept if kept is None else kept
        if not kept:
            return None
        if self.monitor_key is None or all(item[0] is None for item in kept):
            return min(kept, key=lambda item: item[1])  # the oldest
        reverse = self.resolved_mode == "min"
        unscored = math.inf if reverse else -math.inf  # a file without a finite score goes first

        def rank(item: tuple[float | None, int, str]) -> float:
            return unscored if item[0] is None or not math.isfinite(item[0]) else item[0]

        return sorted(kept, key=rank, reverse=reverse)[0]

    # -- files ----------------------------------------------------------------------------------
    def _continues_here(self) -> bool:
        """True when this fit resumed from a checkpoint inside this callback's folder (its own run)."""
        resumed = self.trainer.resumed_from
        return resumed is not None and _files.inside(self.checkpoint_dir, resumed)

    def _check_folder(self) -> None:
        """Refuses to start writing into a folder that holds files of another run (matching this template,
        or ``last.pt``) unless this fit continues that run: they would be overwritten or mixed in."""
        if self.checkpoint_dir.is_dir():
            read_manifest(self.checkpoint_dir, strict=True)  # an unreadable manifest: an error now, not at the save
        if self._continues_here() or not self.checkpoint_dir.is_dir():
            return
        found = [path for path in self._matching_files() if not self._same_run(path)]
        if found:
            raise self._refusal(found)

    def _matching_files(self) -> list[Path]:
        """The files (and sharded directories) in the folder this callback could write: its template's names
        and ``last.pt``, except those this callback wrote (its own: a second ``fit`` writes them again)."""
        pattern = _files.template_regex(_files.absolute_template(self.filepath))
        ours = self._written | {item[2] for item in self.kept}
        found = []
        for path in sorted(self.checkpoint_dir.rglob("*")):
            # A directory is a sharded (FSDP) checkpoint when it matches the template.
            if not (path.is_file() or path.is_dir()) or path.name.startswith(".") or str(path) in ours:
                continue
            last = self.save_last and path.parent == self.checkpoint_dir and path.name == "last.pt"
            if last or pattern.fullmatch(str(path.resolve())):
                found.append(path)
        return found

    def _refusal(self, found: list[Path]) -> ValueError:
        shown = ", ".join(str(f) for f in found[:5]) + (" ..." if len(found) > 5 else "")
        if all(_kind(path) not in ("full", None) for path in found):
            advice = (
                "They hold weights only, so no run can resume from them: pass resume='restart' to start over (it "
                "deletes the checkpoints fitkit vouched for in this folder, nothing else)"
            )
        else:
            advice = (
                "Pass resume='auto' (or a checkpoint path in this folder) to continue that run, resume='restart' "
                "to start over (it deletes the checkpoints fitkit vouched for in this folder, nothing else)"
            )
        return ValueError(
            f"ModelCheckpoint({self.filepath!r}): {self.checkpoint_dir} already holds {len(found)} checkpoint "
            f"file(s) this fit did not write ({shown}); writing here would overwrite or mix with them. {advice}, "
            "or write to another folder, or move those files away."
        )

    def start_over(self) -> None:
        """``fit(resume="restart")``: deletes the files of this callback's folder that it could write and that the
        folder's manifest vouches for (size and SHA-256), so the run starts over; any such file fitkit cannot
        vouch for (another job's, a copy) is an error before anything is deleted."""
        if not self.checkpoint_dir.is_dir():
            return
        read_manifest(self.checkpoint_dir, strict=True)
        found, strangers = self._matching_files(), []
        for path in found:
            try:
                verify(path)
            except CheckpointError:
                if not is_partial_copy(path):  # one machine's part of a sharded checkpoint it wrote: its own
                    strangers.append(path)
        if strangers:
            raise self._refusal(strangers)
        crash = self.checkpoint_dir / "crash.pt"
        for path in found + ([crash] if crash.exists() and crash not in found else []):
            with contextlib.suppress(CheckpointError):
                if not is_partial_copy(path):
                    verify(path)  # crash.pt: deleted only when vouched for
                remove_checkpoint(path)
        self.kept, self._written, self._pending_removal = [], set(), []

    def _same_run(self, path: Path) -> bool:
        """True when this fit resumed a run and that run wrote ``path`` (its manifest record carries the
        run's id): a restart after a crash replays what the crashed process wrote after its last checkpoint
        (an epoch's file, ``last.pt`` saved on SIGTERM), and may write those names again."""
        run = self.trainer.state.run_id
        if run is None or self.trainer.resumed_from is None:
            return False
        entry = read_manifest(path.parent)["files"].get(path.name)
        return entry is not None and any(record.get("run") == run for record in entry.get("versions", [])[:1])

    def _check_overwrite(self, path: Path) -> None:
        """A file at a name this callback is about to write that it did not write itself (in any fit) and that
        no resumed run of it wrote: another job's, appeared after the fit's start-up checks."""
        if path.exists() and str(path) not in self._written and not self._continues_here() and not self._same_run(path):
            raise ValueError(
                f"ModelCheckpoint: {path} exists and was not written by this run; refusing to overwrite it. It "
                f"appeared after this fit started (another job writing into {self.checkpoint_dir}?): give each run "
                "its own folder, or move the file away."
            )

    def _check_writes(self, path: Path) -> None:
        self._check_overwrite(path)
        if self.save_last:
            self._check_overwrite(self.checkpoint_dir / "last.pt")

    def _remove_pending(self) -> None:
        """Completes top-k removals that a killed process did not finish (recorded in the checkpoint)."""
        pending, self._pending_removal = self._pending_removal, []
        if not pending or not self.trainer.is_global_zero:
            return
        # In an object store, files of the top k that this machine never fetched: its manifest vouches for them.
        listed = () if self.remote_folder is None else self.remote_folder.read_manifest()["files"]
        for name in pending:
            if _files.owns(self.filepath, self.checkpoint_dir, name, listed):
                remove_checkpoint(name)

    def _write(self, path: Path, score: float | None, step: int) -> None:
        trainer = self.trainer
        if not weights_are_finite(self.model):
            warnings.warn(
                f"ModelCheckpoint: skipped {path}: the model holds non-finite weights",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
            return
        self._remove_pending()
        # Rank 0 alone writes, and may already have written this very file when another rank would look.
        _files.checked_on_rank_zero(self.trainer, lambda: self._check_writes(path))
        # The checkpoint records the top k as it is after this write, and the files this write makes
        # redundant: a kill before they are removed leaves them to the resumed run (_remove_pending).
        before = self.kept
        kept = [item for item in self.kept if item[2] != str(path)] + [(score, step, str(path))]
        removals = []
        if self.save_top_k is not None:
            while len(kept) > self.save_top_k:
                worst = self._worst(kept)
                assert worst is not None
                kept.remove(worst)
                if worst[2] != str(path):
                    removals.append(worst[2])
        self.kept, self._pending_removal = kept, removals
        try:
            self._save(path, step)
        except BaseException:
            self.kept, self._pending_removal = before, []
            raise
        self.last_saved = path
        self._remove_pending()  # only now that their replacement is complete
        if self.verbose and trainer.is_global_zero:
            shown = "" if score is None or math.isnan(score) else f" ({self.monitor_key}={score:.4g})"
            print(f"ModelCheckpoint: saved {path}{shown}")

    def _save(self, path: Path, step: int) -> None:
        trainer = self.trainer
        if self.save_weights_only:
            # Unsharded (FSDP gathers) and on the CPU, so torch.load(path, weights_only=True) works on a
            # machine without the GPU it was trained on.
            weights = move_to_device(trainer.model_state_dict(), torch.device("cpu"))
            if trainer.is_global_zero:
                run = trainer.state.run_id
                atomic_save(
                    weights, path, {"kind": "weights", "epoch": trainer.state.epoch, "global_step": step, "run": run}
                )
        else:
            trainer.save_checkpoint(path)
        self._written.add(str(path))
        if self.save_last and path.name != "last.pt":
            self._save_last()

    def _save_last(self) -> None:
        last = self.checkpoint_dir / "last.pt"
        self.trainer.save_checkpoint(last)
        self._written.add(str(last))

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "kept": [list(item) for item in self.kept],
            "pending_removal": list(self._pending_removal),
            "batches_since_save": self._batches_since_save,
            "wrote_last": str(self.checkpoint_dir / "last.pt") in self._written,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the best value and the top k. A loaded checkpoint is data from outside: kept files
        outside this callback's folder or template (another run's folder, an absolute path, ``..``) are
        dropped with a warning, never deleted later; files are deleted only if a manifest lists them."""
        best = state["best"]
        self.best = float(best) if isinstance(best, (int, float)) and math.isfinite(best) else None
        kept, dropped = [], []
        for item in state["kept"]:
            score, step, name = item[0], int(item[1]), self._staged_here(str(item[2]))
            if _files.inside(self.checkpoint_dir, name) and _files.template_regex(
                _files.absolute_template(self.filepath)
            ).fullmatch(str(Path(name).resolve())):
                kept.append((None if score is None else float(score), step, name))
            else:
                dropped.append(name)
        if dropped:
            warnings.warn(
                f"ModelCheckpoint({self.filepath!r}): the loaded checkpoint lists {len(dropped)} kept file(s) outside "
                f"this callback's folder or template ({dropped[:3]}); they are ignored and will never be deleted",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
        self.kept = kept
        # The run this fit continues wrote these (a crash-restart from BackupAndRestore's folder, say): its
        # files may be replaced as they would have been without the crash, when the folder's manifest lists them.
        ours = {name for _, _, name in kept if _files.owns(self.filepath, self.checkpoint_dir, name)}
        last = self.checkpoint_dir / "last.pt"
        if state.get("wrote_last") and self.save_last and last.name in read_manifest(self.checkpoint_dir)["files"]:
            ours.add(str(last))
        self._written |= ours
        self._pending_removal = [
            self._staged_here(str(n))
            for n in state.get("pending_removal", [])
            if _files.inside(self.checkpoint_dir, self._staged_here(str(n)))
        ]
        self._batches_since_save = int(state["batches_since_save"])

    def _staged_here(self, name: str) -> str:
        """A file of this callback's object-store folder as another machine's staging folder held it (that
        folder is named by the URL's digest, as this one is) -> its path in this machine's staging folder, so
        that a job resumed elsewhere keeps the remote's top k; any other path as it is."""
        path = Path(name)
        here = self.checkpoint_dir
        if self.remote_folder is not None and path.parent.name == here.name and path.parent != here:
            return str(here / path.name)
        return name


def _kind(path: Path) -> str | None:
    """The kind (``"full"``, ``"weights"``, ...) its folder's manifest records for ``path``; None if unlisted."""
    entry = read_manifest(path.parent)["files"].get(path.name)
    versions = entry.get("versions", []) if entry else []
    return versions[0].get("kind", "full") if versions else None


__all__ = ["ModelCheckpoint", "static_folder", "weights_are_finite"]
