"""Warnings that point at the user's line.

``warnings.warn(..., stacklevel=N)`` with a hand-counted ``N`` points at the wrong line as soon as the call chain
inside fitkit changes (a helper split out, a phase added). `user_stacklevel` counts instead: the warning is
attributed to the first frame outside the fitkit package, the user's ``fit(...)`` call or their callback's line.
"""

from __future__ import annotations

import inspect
import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class FitkitWarning(UserWarning):
    """The category of fitkit's own warnings (a ``UserWarning``).

    Under torchrun they print on rank 0 only (the same advice from every rank would repeat N times);
    ``warnings.filterwarnings("default", category=fitkit.FitkitWarning)`` after the Trainer is built shows them on
    every rank, ``"ignore"`` silences them.
    """


def only_on_rank_zero(rank: int) -> None:
    """Called once the process knows its rank: on the other ranks, fitkit's warnings are not shown."""
    import warnings

    if rank != 0:
        warnings.filterwarnings("ignore", category=FitkitWarning)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller: one past every fitkit frame above it."""
    frame = inspect.currentframe()
    frame = frame.f_back if frame is not None else None  # the caller: warn's stacklevel=1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level += 1
        frame = frame.f_back
    return level


__all__ = ["FitkitWarning"]
