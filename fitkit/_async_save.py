"""``async_save=True`` on the checkpoint callbacks: the loop pauses only to copy the state to host memory.

Inside `BackgroundSaves.save`, `fitkit.checkpoint.atomic_save` and `fitkit.checkpoint.remove_checkpoint` do not
write: they copy what they would write to the host (every tensor cloned to the CPU, so that the optimizer's next
step cannot change a checkpoint being written) and queue the write. When the save's code is done, one
background thread runs the queue in order: the write (torch.save, fsync, the manifest, an upload), then the
removals it makes redundant. At most one save is in flight: the next waits for it. A failure in the background
is raised in the training loop at the next batch (``check``) or at the end of the fit (``wait``). A kill during
the background write leaves the previous good checkpoint: the write is the same atomic one as in the loop.

Under FSDP every rank writes its shard of a DCP directory (`fitkit.sharded_checkpoint`): there the snapshot is
DCP's ``async_save`` (each rank's shard copied to host memory) and the queued work is the rest of the save (DCP's
write, each rank's hash and upload, rank 0's commit), whose collectives run on a gloo group of their own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fitkit import checkpoint
from fitkit.checkpoint import CheckpointError


class BackgroundSaves:
    """One callback's background saves (see the module docstring).

    Args:
        who: the callback, as error messages name it.
    """

    def __init__(self, who: str) -> None:
        self.who = who
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @contextlib.contextmanager
    def save(self) -> Iterator[None]:
        """The code of one save: its writes and removals are queued, then run in the background."""
        self.wait()
        queued: list[Callable[[], Any]] = []
        with checkpoint.deferred_writes(queued):
            yield
        if queued:
            self._thread = threading.Thread(target=self._run, args=(queued,), name=f"fitkit-save-{self.who}")
            self._thread.start()  # not a daemon: an interpreter exiting waits for the write to end

    def _run(self, queued: list[Callable[[], Any]]) -> None:
        try:
            for operation in queued:
                operation()
        except BaseException as exc:  # raised in the loop by check() or wait()
            self._error = exc

    def in_background(self, function: Callable[[], Any]) -> Callable[[], None]:
        """``function`` (a save) to run inside `save`."""

        def run() -> None:
            with self.save():
                function()

        return run

    def check(self) -> None:
        """Raises the error of a background save that has ended (cheap: no wait)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Waits for the save in flight, then raises its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"{self.who}: a background save failed: {error}") from error


def check_strategy(trainer: Any, who: str) -> None:
    """async_save defers the saves of the strategies fitkit knows (one process, DDP: rank 0's file; FSDP: every
    rank's shard, through DCP's ``async_save``); another one is refused before training."""
    if trainer.dist.strategy not in ("none", "auto", "ddp", "fsdp"):
        raise ValueError(
            f"{who}: async_save=True is not supported with strategy={trainer.dist.strategy!r}: fitkit can defer the "
            "saves of strategy='none', 'ddp' and 'fsdp' only; use async_save=False"
        )


__all__ = ["BackgroundSaves", "check_strategy"]
