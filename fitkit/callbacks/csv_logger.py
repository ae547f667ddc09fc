"""CSVLogger: one row per epoch in a CSV file, as Keras writes it, and safe to resume."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import IO, Any

from fitkit._safe_files import open_own_text
from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.callbacks._files import check_writable
from fitkit.callbacks.base import Logs
from fitkit.callbacks.logger import ExperimentLogger


class CSVLogger(ExperimentLogger):
    """Streams the epoch logs to a CSV file, as Keras's CSVLogger (an
    [ExperimentLogger][fitkit.callbacks.ExperimentLogger] that writes the epoch logs only).

    The columns are ``epoch`` (0-based, as Keras writes it), ``step`` (the global step at the epoch's end: the x
    axis TensorBoard and MLflowLogger use for the same point) and the epoch-log keys of the first epoch, sorted; with validation data the ``val_`` columns are there from the start, also when
    ``validation_freq`` skips the first epoch. A key missing on an epoch is written ``NA``; a key that only
    appears later is not written. The file is flushed after every row.

    Args:
        filename: the CSV file (its folder is created if needed).
        separator: the field separator (one character, default ``","``).
        append: keep the rows already in the file and add to them (the header is written only into an
            empty file); False overwrites the file when the first row is written.

    When ``fit`` validates by steps (``validate_every_n_steps``), every validation is also a row of
    ``<name>_validations.csv`` beside ``filename`` (columns ``epoch``, ``step`` and the ``val_`` keys), kept
    and resumed the same way.

    Resuming: the callback's state records how many rows (and bytes) of the file this run had written. A
    run resumed from a checkpoint reopens the file in append mode and first cuts off the rows that the
    crashed run wrote after that checkpoint, so every epoch appears once. The file is opened at the
    first row, not in ``on_train_begin``, so that a resumed run never truncates it before its state is
    loaded.

    Runs on rank 0 only in a distributed run.
    """

    def __init__(self, filename: str | os.PathLike[str], separator: str = ",", append: bool = False) -> None:
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"separator must be a single character such as ',' or '\\t', got {separator!r}")
        if not isinstance(append, bool):
            raise TypeError(f"append must be True or False, got {append!r}")
        super().__init__(log_every_n_steps=None)
        self.filename = Path(filename)
        self.sep = separator
        self.append = append
        self.keys: list[str] | None = None
        self.rows = 0
        self._bytes = 0
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._resumed = False
        self._validations: CSVLogger | None = None  # the step-level validations' file, once there is one
        self._validations_state: dict[str, Any] | None = None

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        check_writable(self.filename, f"CSVLogger({str(self.filename)!r})", kind="file")  # not after an epoch
        self._close()
        self.keys = None
        self.rows = 0
        self._resumed = False
        # The part of the file that is ours to keep: with append, whatever is there already.
        self._bytes = self.filename.stat().st_size if self.append and self.filename.exists() else 0
        if self._validations is not None:
            self._validations.end_run("FINISHED")
        self._validations, self._validations_state = None, None
        super().on_train_begin(logs)

    def log_validation(self, step: int, metrics: dict[str, float]) -> None:
        if self._validations is None:
            name = self.filename.with_name(f"{self.filename.stem}_validations{self.filename.suffix}")
            self._validations = CSVLogger(name, self.sep, self.append)
            self._validations.set_trainer(self.trainer)
            self._validations.on_train_begin()
            if self._validations_state is not None:  # resumed: cut what the crashed run wrote after its checkpoint
                self._validations.load_state_dict(self._validations_state)
        self._validations.log_epoch(self.trainer.epoch, {"step": step, **metrics})

    def log_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        if self.keys is None:
            keys = set(logs) - {"step"}
            if self.trainer.has_validation:
                # Keras adds the validation columns it expects, for an epoch that validation_freq skipped.
                metrics = [*self.trainer.metrics, *self.trainer.weighted_metrics]
                names = ["loss"] + [m.name for m in metrics]
                keys.update(f"val_{name}" for name in names)
            self.keys = sorted(keys)
        if self._writer is None:
            self._open()
        row: dict[str, Any] = {"epoch": epoch, "step": int(logs.get("step", self.trainer.global_step))}
        row.update((key, logs.get(key, "NA")) for key in self.keys)
        self._writer.writerow(row)
        assert self._file is not None
        self._file.flush()
        self._bytes = os.fstat(self._file.fileno()).st_size  # a byte count (a text file's tell() is opaque)
        self.rows += 1

    def end_run(self, status: str) -> None:
        self._close()
        if self._validations is not None:
            self._validations_state = self._validations.state_dict()
            self._validations.end_run(status)
            self._validations = None

    # -- file -----------------------------------------------------------------------------------
    def _open(self) -> None:
        self.filename.parent.mkdir(parents=True, exist_ok=True)
        keep = self._bytes
        if self._resumed or self.append:
            size = self.filename.stat().st_size if self.filename.exists() else 0
            if size < keep:
                warnings.warn(
                    f"CSVLogger: {self.filename} holds {size} bytes but this run had written {keep}; "
                    "rows are missing from it (was the file replaced?). Appending after what is there.",
                    FitkitWarning,
                    stacklevel=user_stacklevel(),
                )
                keep = size
            elif size > keep:
                # Rows written after the checkpoint by the run that crashed: that run's future was discarded.
                with open_own_text(self.filename, "r+") as f:
                    f.truncate(keep)
            self._file = open_own_text(self.filename, "a")  # never through a planted link; open until the end
        else:
            self._file = open_own_text(self.filename, "w")  # never through a planted link; open until the end
            keep = 0

        class Dialect(csv.excel):
            delimiter = self.sep

        self._writer = csv.DictWriter(self._file, fieldnames=["epoch", "step", *(self.keys or [])], dialect=Dialect)
        if keep == 0:
            self._writer.writeheader()

    def _close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        self._file, self._writer = None, None

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # no step-level points: no seen_step to keep
        state: dict[str, Any] = {
            "rows": self.rows,
            "bytes": self._bytes,
            "keys": None if self.keys is None else list(self.keys),
        }
        validations = self._validations.state_dict() if self._validations is not None else self._validations_state
        if validations is not None:  # only runs that validate by steps have the second file
            state["validations"] = validations
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._close()
        self.rows = int(state["rows"])
        self._bytes = int(state["bytes"])
        self.keys = None if state["keys"] is None else list(state["keys"])
        self._resumed = True
        if self._validations is not None:
            self._validations.end_run("FINISHED")
            self._validations = None
        self._validations_state = state.get("validations")


__all__ = ["CSVLogger"]
