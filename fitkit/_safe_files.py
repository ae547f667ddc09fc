"""Creating the files fitkit writes without following links (issue 19).

A link planted where fitkit creates a file (a temporary, a lock, a manifest, a checkpoint, a prediction, a log)
would otherwise redirect the write to its target, outside the folder. Every such file is opened here:

* `create_new`: a file that must not exist yet (a temporary, renamed into place afterwards). Whatever sits at
  its name (a killed writer's leftover, or a planted link) is unlinked first, which never touches a link's
  target, then the file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a link planted in between fails
  the open instead of being followed.
* `open_own`: a file that persists between runs (a lock, a CSV log). ``O_NOFOLLOW`` refuses a symbolic link
  at its name, and a file with other hard links (another name for a victim file) is refused before a byte
  of it changes, with `link_refused`'s message.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def link_refused(path: Path, error: Callable[[str], Exception] = PermissionError) -> Exception:
    """The error for a link found where fitkit creates ``path``: what it is, why it is refused, the fix."""
    return error(
        f"{path} is a link; fitkit creates files only where no link (symbolic or hard) can redirect the write "
        f"to a file outside {path.parent}. Nothing was written through it: remove {path.name} (it may have been "
        "planted there), or choose another folder"
    )


def create_new(path: str | os.PathLike[str]) -> int:
    """A descriptor open for writing on a new, empty file at ``path`` (see the module's docstring)."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
        if path.is_symlink() or path.exists():
            os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)


def open_new(path: str | os.PathLike[str]) -> IO[bytes]:
    """`create_new` as a binary file object."""
    return os.fdopen(create_new(path), "wb")


def open_own(path: str | os.PathLike[str], flags: int, error: Callable[[str], Exception] = PermissionError) -> int:
    """A descriptor on the regular file ``path``, opened with ``flags`` (``O_CREAT`` creates it) but never
    through a link: a symbolic link, or a file with more than one name, raises `link_refused` with ``error``.
    ``O_TRUNC`` is refused: truncate with ``os.ftruncate`` once the file is known to be fitkit's own."""
    path = Path(path)
    if flags & os.O_TRUNC:
        raise ValueError("open_own: truncate after the check (os.ftruncate), not with O_TRUNC")
    try:
        fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and path.is_symlink()):
            raise link_refused(path, error) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise link_refused(path, error)
    return fd


def open_own_text(path: str | os.PathLike[str], mode: str, error: Callable[[str], Exception] = PermissionError) -> Any:
    """`open_own` as a text file object for ``mode`` ``"w"`` (emptied), ``"a"`` or ``"r+"``, ``newline=""``
    (the csv module's convention)."""
    flags = {"w": os.O_WRONLY | os.O_CREAT, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "r+": os.O_RDWR}[mode]
    fd = open_own(path, flags, error)
    if mode == "w":
        os.ftruncate(fd, 0)
    return os.fdopen(fd, mode, newline="")
