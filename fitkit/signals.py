"""SIGINT/SIGTERM (and SLURM's requeue signal) during ``fit``: stop at the next batch boundary, let
checkpoints save, then exit (or requeue the job, `fitkit.slurm`)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any


class TrainingInterrupted(Exception):
    """Raised inside ``fit`` at the batch boundary after SIGINT, SIGTERM or the requeue signal arrived.

    Checkpoint callbacks see it in ``on_exception``: the state is consistent (a batch boundary), so it is
    safe to save. ``fit`` turns it into ``KeyboardInterrupt`` (SIGINT), ``SystemExit(0)`` (the requeue
    signal, after ``scontrol requeue``) or ``SystemExit(128 + signum)``.

    Args:
        signum: the signal's number (``signal.SIGINT``, ``signal.SIGTERM``, ...), kept as ``signum``.
        requeue: the signal is the Trainer's ``requeue_signal``: the job is requeued, and ``fit`` exits with 0.
    """

    def __init__(self, signum: int, requeue: bool = False) -> None:
        super().__init__(f"training interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.requeue = requeue

    def exit_exception(self, saved: str = "") -> BaseException:
        """What ``fit`` raises in the end: the conventional outcome of the signal.

        Args:
            saved: appended to a ``KeyboardInterrupt``'s message: where the state went, and how to continue.
        """
        if self.requeue:
            return SystemExit(0)  # the job goes on, requeued: nothing failed
        if self.signum == signal.SIGINT:
            return KeyboardInterrupt(f"{self}{saved}")
        return SystemExit(128 + self.signum)


class SignalGuard:
    """A context that turns SIGINT/SIGTERM (and ``requeue_signal``) into a recorded ``signum`` and a call
    to ``on_signal``.

    Installed in the main thread only (Python delivers signals there); the previous handlers are put
    back on exit, and after the first signal, so that a second one is not graceful.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(
        self, on_signal: Callable[[int], None], enabled: bool = True, requeue_signal: int | None = None
    ) -> None:
        self.on_signal = on_signal
        self.enabled = enabled
        self.requeue_signal = requeue_signal
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def interrupted(self, signum: int) -> TrainingInterrupted:
        """The exception ``fit`` raises at the batch boundary for ``signum``."""
        return TrainingInterrupted(signum, requeue=signum == self.requeue_signal)

    def __enter__(self) -> SignalGuard:
        self.signum = None
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        handled = self.SIGNALS if self.requeue_signal is None else (*self.SIGNALS, self.requeue_signal)
        self._previous = {sig: signal.getsignal(sig) for sig in handled}
        for sig in handled:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._put_back()
        self.on_signal(signum)

    def _put_back(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._put_back()
        self._previous = {}
        self.signum = None  # handled by this fit: a later evaluate() or predict() runs


__all__ = ["TrainingInterrupted", "SignalGuard"]
