"""Runs a function in N forked processes that form a gloo process group, as torchrun's workers would.

Each child gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its own environment before
the function builds a Trainer, so the Trainer sets the group up itself (``strategy="auto"``). Forking
from the test process (torch already imported) makes a 2-rank run cost a fraction of a second. Results
travel back as files: the function returns a picklable value, saved as ``rank<r>.pt``; an exception's
traceback goes to ``rank<r>.err``. Children are joined with a deadline and SIGKILLed after it, so a hang
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # DistributedDataParallel imports it (3 s): once here, not in every child

CTX = mp.get_context("fork")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(
    target: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out: Path,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    # A forked child must not enter the OpenMP pool the parent already started (it can deadlock there).
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    code = 0
    try:
        result = target(rank, out, *args, **kwargs)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException as exc:
        (out / f"rank{rank}.err").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        code = 3
    # Skip the group's teardown and atexit handlers: a peer may be gone, and the parent only reads files.
    os._exit(code)


@dataclass
class RankRun:
    exitcodes: list[int | None]
    seconds: list[float]
    results: list[Any] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)

    def check(self) -> list[Any]:
        """The results, after asserting that every rank succeeded (showing their errors otherwise)."""
        assert all(code == 0 for code in self.exitcodes), f"exit codes {self.exitcodes}; errors: {self.errors}"
        return self.results


def run_ranks(
    target: Callable[..., Any],
    out: Path,
    *args: Any,
    world_size: int = 2,
    timeout: float = 60.0,
    on_start: Callable[[list[Any]], None] | None = None,
    start_method: str = "fork",
    **kwargs: Any,
) -> RankRun:
    """Runs ``target(rank, out, *args, **kwargs)`` in ``world_size`` forked ranks; returns what they left.

    ``on_start(processes)`` runs in the parent once they started (to signal or kill one, say).
    ``start_method="spawn"`` starts fresh interpreters instead (seconds each): for a target that a fork of this test
    process cannot run, e.g. a compiled backward after an earlier test's (autograd's threads do not survive a fork).
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("rank*.pt")) + list(out.glob("rank*.err")):
        stale.unlink()
    port = free_port()
    start = time.monotonic()
    processes = [
        mp.get_context(start_method).Process(target=_child, args=(target, r, world_size, port, out, args, kwargs))
        for r in range(world_size)
    ]
    for process in processes:
        process.start()
    if on_start is not None:
        on_start(processes)
    seconds: list[float] = [float("nan")] * world_size
    deadline = start + timeout
    pending = set(range(world_size))
    while pending and time.monotonic() < deadline:
        for r in list(pending):
            processes[r].join(0.01)
            if processes[r].exitcode is not None:
                seconds[r] = time.monotonic() - start
                pending.discard(r)
    for r in pending:  # hung: kill, so that the test fails instead of the suite hanging
        os.kill(processes[r].pid, signal.SIGKILL)
        processes[r].join()
    exitcodes = [None if r in pending else processes[r].exitcode for r in range(world_size)]
    results = [
        torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else None
        for r in range(world_size)
    ]
    errors = [
        (out / f"rank{r}.err").read_text() if (out / f"rank{r}.err").exists() else None for r in range(world_size)
    ]
    return RankRun(exitcodes, seconds, results, errors)


def run_single(target: Callable[..., Any], out: Path, *args: Any, **kwargs: Any) -> Any:
    """``target(0, out, ...)`` in one forked process without any distributed environment."""

    def body(rank: int, folder: Path) -> Any:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
        return target(rank, folder, *args, **kwargs)

    return run_ranks(body, out, world_size=1).check()[0]
