"""ProgressBar: a tqdm bar per epoch on a terminal or in a notebook, a plain line per epoch anywhere else."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from fitkit.callbacks.base import Callback, Logs


def format_logs(logs: Logs) -> str:
    parts = []
    for key, value in logs.items():
        parts.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return " - ".join(parts)


class ProgressBar(Callback):
    """Shows training progress.

    On a terminal or in a notebook, one tqdm bar per epoch whose postfix holds the running loss and
    metrics, refreshed at most every ``refresh_interval`` seconds (each refresh reads the running
    values back from the device once), and the validation results at the end of the epoch. In Jupyter
    the bar is a widget when ipywidgets is installed (``pip install "fitkit[notebook]"``), and otherwise
    one text line per epoch updated in place, so that a saved notebook holds one output per epoch, not
    one per refresh. Anywhere
    else (a pipe, a log file, CI) it never redraws: it prints one line per epoch, plus a progress line
    every ``log_every_seconds`` if set.

    Args:
        mode: ``"bar"`` (default; falls back to lines off a terminal) or ``"epoch"`` (a line per epoch
            only, Keras's ``verbose=2``).
        refresh_interval: seconds between bar refreshes (default 0.25).
        log_every_seconds: off a terminal, seconds between progress lines within an epoch (default None:
            only the end-of-epoch line).
        file: the stream to write to (default ``sys.stderr``, as tqdm).

    Runs on rank 0 only in a distributed run.
    """

    rank_zero_only = True

    def __init__(
        self,
        mode: str = "bar",
        refresh_interval: float = 0.25,
        log_every_seconds: float | None = None,
        file: IO[str] | None = None,
    ) -> None:
        if mode not in ("bar", "epoch"):
            raise ValueError(f"mode must be 'bar' or 'epoch', got {mode!r}")
        if refresh_interval <= 0:
            raise ValueError(f"refresh_interval must be > 0 seconds, got {refresh_interval!r}")
        if log_every_seconds is not None and log_every_seconds <= 0:
            raise ValueError(f"log_every_seconds must be None or > 0 seconds, got {log_every_seconds!r}")
        self.mode = mode
        self.refresh_interval = refresh_interval
        self.log_every_seconds = log_every_seconds
        self.file = file
        self._bar: Any = None
        self._val_bar: Any = None  # set here too: on_train_end runs even when on_train_begin never did

    # -- helpers --------------------------------------------------------------------------------
    def _stream(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def _interactive(self) -> bool:
        if self.mode != "bar":
            return False
        if _in_notebook():  # tqdm.auto draws a widget (or, without ipywidgets, a line updated in place)
            return True
        stream = self._stream()
        return bool(getattr(stream, "isatty", lambda: False)())

    def _open_bar(self, epoch: int) -> None:
        total = self.trainer.num_train_batches
        if self._notebook_text:
            self._bar = _NotebookLine(total=total, desc=f"Epoch {epoch + 1}/{self._epochs}")
            self._shown = 0
            return
        self._bar = self._tqdm(total, f"Epoch {epoch + 1}/{self._epochs}", leave=True)
        self._shown = 0

    def _tqdm(self, total: int | None, desc: str, leave: bool) -> Any:
        """A tqdm bar in batches on this callback's stream (the epoch's, kept; validation's, cleared)."""
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=desc,
            file=self._stream(),
            leave=leave,
            dynamic_ncols=True,
            unit="batch",
            mininterval=self.refresh_interval,
        )

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_begin(self, logs: Logs | None = None) -> None:
        planned = self.trainer.epochs_planned
        self._epochs = "?" if planned is None else planned  # None: until max_steps/max_time ends the run
        self._val_bar = None
        self._is_bar = self._interactive()
        # In Jupyter without ipywidgets tqdm would print every refresh as a new output: a line updated in place.
        self._notebook_text = self._is_bar and _in_notebook() and not _has_ipywidgets()
        self._bar = None
        # A run resumed mid-epoch gets no on_epoch_begin: the first batch then opens the epoch's display.
        self.__dict__.pop("_epoch_start", None)
        self._next = float("-inf")

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None:
        self._epoch_start = time.monotonic()
        self._next = self._epoch_start + (
            self.refresh_interval if self._is_bar else (self.log_every_seconds or float("inf"))
        )
        if self._is_bar:
            self._open_bar(epoch)

    stops_mid_epoch = False  # on_batch_end only draws: under torchrun, no per-batch stop vote for it

    def on_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        now = time.monotonic()
        if now < self._next:  # the common case: a clock read and a comparison
            return
        if not hasattr(self, "_epoch_start"):  # resumed mid-epoch: on_epoch_begin ran before the restart
            self.on_epoch_begin(self.trainer.epoch)
            return
        with self.trainer.allow_sync():  # reads the running values back, a few times a second at most
            running = self.trainer.running_logs()
        if self._is_bar:
            if self._bar is None:
                self._open_bar(self.trainer.epoch)
            self._bar.update(batch + 1 - self._shown)
            self._shown = batch + 1
            self._bar.set_postfix_str(format_logs(running), refresh=True)
            self._next = now + self.refresh_interval
        else:
            total = self.trainer.num_train_batches
            where = f"{batch + 1}/{total}" if total else f"{batch + 1}"
            print(
                f"Epoch {self.trainer.epoch + 1}/{self._epochs} - batch {where} - {format_logs(running)}",
                file=self._stream(),
                flush=True,
            )
            self._next = now + (self.log_every_seconds or float("inf"))

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None:
        logs = logs or {}
        start = self.__dict__.pop("_epoch_start", None)  # None: resumed at the end of an epoch
        elapsed = "" if start is None else f"{time.monotonic() - start:.1f}s - "
        line = f"Epoch {epoch + 1}/{self._epochs} - {elapsed}{format_logs(logs)}"
        if self._bar is not None:
            self._bar.update(max(0, (self._bar.total or self._shown) - self._shown))
            if not self._close_bar(format_logs(logs)):
                return
        print(line, file=self._stream(), flush=True)

    def _close_bar(self, postfix: str) -> bool:
        """Closes the epoch's bar with the epoch's logs as its postfix when the whole line fits the terminal;
        otherwise (tqdm would cut the line at the terminal's width, hiding the ``val_*`` values at its end)
        closes it with the counts only and returns True: the caller prints the logs whole, on their own line."""
        bar = self._bar
        self._bar = None
        cut = False
        if not self._notebook_text:  # a notebook's line wraps: never cut
            width = bar.dynamic_ncols(bar.fp)[0] if bar.dynamic_ncols else bar.ncols
            cut = (
                bool(width) and len(bar.format_meter(**{**bar.format_dict, "ncols": None, "postfix": postfix})) > width
            )
        bar.set_postfix_str("" if cut else postfix, refresh=True)
        bar.close()
        return cut

    # -- validation: a transient bar on a terminal (it disappears when done), nothing off a terminal --
    def on_validation_begin(self, logs: Logs | None = None) -> None:
        if not self._is_bar or self._notebook_text:  # a notebook's text display keeps one output per epoch
            return
        counts = list(self.trainer.num_val_batches.values())
        known = [n for n in counts if n is not None]
        total = sum(known) if counts and len(known) == len(counts) else None
        self._val_bar = self._tqdm(total, f"Validation (step {self.trainer.global_step})", leave=False)
        self._val_seen = 0
        self._val_next = time.monotonic() + self.refresh_interval

    def on_validation_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if self._val_bar is None:
            return
        self._val_seen += 1
        now = time.monotonic()
        if now >= self._val_next:  # a clock read per batch; tqdm is asked only a few times a second
            self._val_bar.update(self._val_seen - self._val_bar.n)
            self._val_next = now + self.refresh_interval

    def on_validation_end(self, logs: Logs | None = None) -> None:
        if self._val_bar is not None:
            self._val_bar.close()
            self._val_bar = None

    def on_train_end(self, logs: Logs | None = None) -> None:
        self.on_validation_end()  # a validation ended by an exception leaves no bar behind
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (not merely with ipykernel imported, as a test process may have it)."""
    if "ipykernel" not in sys.modules:
        return False
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython() if get_ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _has_ipywidgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class _NotebookLine:
    """A progress line in a notebook without ipywidgets: one display output per epoch, redrawn in place
    (``display(..., display_id=True)`` and ``update``), with the few methods of tqdm that ProgressBar uses."""

    def __init__(self, total: int | None, desc: str) -> None:
        from IPython.display import display

        self.total, self.n, self.desc, self.postfix = total, 0, desc, ""
        self._start = time.monotonic()
        self._handle = display(self._text(), display_id=True)

    def _text(self) -> Any:
        from IPython.display import Pretty

        elapsed = time.monotonic() - self._start
        if self.total:
            done = min(self.n, self.total)
            bar = "#" * int(20 * done / self.total)
            where = f"[{bar:<20}] {done}/{self.total}"
        else:
            where = f"{self.n} batches"
        return Pretty(f"{self.desc} {where} {elapsed:.1f}s" + (f" - {self.postfix}" if self.postfix else ""))

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text
        if refresh and self._handle is not None:
            self._handle.update(self._text())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.update(self._text())
            self._handle = None


__all__ = ["ProgressBar", "format_logs"]
