"""Which files a checkpoint callback may write and delete: its path templates as patterns.

A template such as ``"ckpt/{epoch:02d}-{val_loss:.3f}.pt"`` is filled from numbers only (the epoch, the
step, epoch-log values), so each placeholder matches a number. Two callbacks whose patterns can name the
same file are refused when the Trainer is built (one would overwrite or delete the other's files), and a
callback deletes only files that match its own pattern, inside its own folder, that a manifest lists.
"""

from __future__ import annotations

import errno
import os
import re
import string
import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fitkit import distributed
from fitkit._safe_files import open_own
from fitkit._warn import FitkitWarning, user_stacklevel
from fitkit.checkpoint import read_manifest

if TYPE_CHECKING:
    from fitkit.callbacks.base import TrainerLike

# What a placeholder renders to: an int or a float in any format (nan/inf included).
_NUMBER = r"(?:[-+]?(?:[0-9][0-9_,.]*(?:[eE][-+]?[0-9]+)?|\.[0-9]+|nan|inf|NaN|Infinity)%?)"


@runtime_checkable
class FileWriter(Protocol):
    """A callback that writes files from path templates (ModelCheckpoint, BackupAndRestore)."""

    def file_templates(self) -> list[str]: ...


def template_regex(template: str) -> re.Pattern[str]:
    """A regex matching every path ``template`` can render to (placeholders render numbers)."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(_NUMBER)
    return re.compile("".join(parts))


def _sample(template: str) -> str:
    return "".join(
        literal + ("1" if field is not None else "") for literal, field, _, _ in string.Formatter().parse(template)
    )


def absolute_template(template: str) -> str:
    """The template with its folder made absolute (placeholders kept), in POSIX form."""
    path = Path(template)
    static = []
    for part in path.parts:
        if "{" in part:
            break
        static.append(part)
    root = Path(*static).resolve() if static else Path.cwd()
    rest = path.parts[len(static) :]
    return str(root.joinpath(*rest)) if rest else str(root)


def collide(a: str, b: str) -> bool:
    """True when the templates ``a`` and ``b`` can render the same path."""
    a, b = absolute_template(a), absolute_template(b)
    return bool(template_regex(a).fullmatch(_sample(b)) or template_regex(b).fullmatch(_sample(a)))


def check_file_collisions(callbacks: Sequence[Any]) -> None:
    """Raises a ``ValueError`` naming two callbacks whose path templates can name the same file."""
    owners = [(cb, t) for cb in callbacks if isinstance(cb, FileWriter) for t in cb.file_templates()]
    for i, (cb_a, a) in enumerate(owners):
        for cb_b, b in owners[i + 1 :]:
            if cb_a is cb_b or not collide(a, b):
                continue
            raise ValueError(
                f"{type(cb_a).__name__} writes {a!r} and {type(cb_b).__name__} writes {b!r}: both can name the same "
                "file, so one would overwrite or delete the other's checkpoints. Give each callback its own folder "
                "or file names (e.g. ModelCheckpoint('ckpt/{epoch:02d}.pt') with BackupAndRestore('ckpt/backup'))"
            )


def owns(template: str, folder: Path, path: str | Path, listed: Collection[str] = ()) -> bool:
    """True when ``path`` lies inside ``folder``, matches ``template`` and its folder's manifest lists it (or
    ``listed`` names it: an object store's manifest, for a staging folder): the only files a callback may
    delete (a loaded checkpoint's list of files is data from outside)."""
    path = Path(path)
    try:
        target = path.resolve()
        root = folder.resolve()
    except OSError:
        return False
    if root not in target.parents:
        return False
    if not template_regex(absolute_template(template)).fullmatch(str(target)):
        return False
    return target.name in read_manifest(target.parent)["files"] or target.name in listed


def inside(folder: Path, path: str | Path) -> bool:
    """True when ``path`` resolves to a location strictly inside ``folder``."""
    try:
        return folder.resolve() in Path(path).resolve().parents
    except OSError:
        return False


def template_values(template: str, path: str | Path) -> dict[str, str] | None:
    """The placeholder values a rendered ``path`` took (``{"epoch": "03"}``), or None when ``template``
    cannot render it; the first occurrence of a repeated field wins."""
    parts, names = [], []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"({_NUMBER})")
            names.append(re.split(r"[.\[]", field, maxsplit=1)[0])
    match = re.fullmatch("".join(parts), str(path))
    if match is None:
        return None
    values: dict[str, str] = {}
    for name, value in zip(names, match.groups()):
        values.setdefault(name, value)
    return values


def check_writable(path: str | Path, who: str, kind: str = "folder") -> None:
    """Raises before training when ``path`` cannot be written: a folder (``kind="folder"``) whose nearest
    existing ancestor is a file or not writable (a read-only mount, no permission), or a file
    (``kind="file"``) that is a directory or sits in such a folder. Nothing is created."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise ValueError(f"{who}: {path} is a directory, not a file; name a file in it, e.g. {path / 'log.csv'}")
    folder = path.parent if kind == "file" else path
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(
            f"{who}: {existing} is a file, so the folder {folder} cannot be created there; rename or remove "
            f"{existing}, or choose another path (nothing has been trained yet)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{who}: cannot write into {existing} (read-only, or no write permission for this user); checked "
            "before training, so nothing is lost: choose a writable folder or fix its permissions"
        )


class _LinkRefused(Exception):
    pass


#: The file a checkpoint callback locks for the length of a ``fit``, in its folder (hidden: never a checkpoint).
RUN_LOCK = ".fitkit-run.lock"
_held: dict[str, list[int]] = {}  # resolved folder -> [file descriptor, callbacks of this process holding it]


def acquire_run_lock(folder: str | Path, who: str) -> None:
    """Marks ``folder`` as written by this process's ``fit`` until `release_run_lock`: a second job
    (another process) that starts writing checkpoints into it gets a ``ValueError`` naming the first one,
    before it trains, instead of both overwriting and deleting each other's files. A POSIX record lock
    (``lockf``): the kernel drops it when the process dies, SIGKILL included, and DataLoader workers forked
    meanwhile do not inherit it. Callbacks of one process share it."""
    import fcntl
    import socket
    import time

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        _held[key][1] += 1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = open_own(folder / RUN_LOCK, os.O_RDWR | os.O_CREAT, _LinkRefused)  # a planted link is refused
    except _LinkRefused as exc:
        raise PermissionError(f"{who}: {exc}") from None
    except OSError as exc:  # permissions the access check could not see (ACLs, root squash on NFS)
        raise PermissionError(
            f"{who}: cannot create {folder / RUN_LOCK} ({exc.strerror}); checked before training, so nothing is "
            "lost: choose a writable folder or fix its permissions"
        ) from exc
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):  # no lock support here (ENOLCK): do not block training
            os.close(fd)
            warnings.warn(
                f"{who}: cannot lock {folder} ({exc.strerror}; a file system without locks?): a second job "
                "writing checkpoints into it at the same time would not be detected",
                FitkitWarning,
                stacklevel=user_stacklevel(),
            )
            return
        holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(
            f"{who}: another fit is writing checkpoints into {folder} right now ({holder}); two runs in one folder "
            "would overwrite and delete each other's files. Wait for that run to end (or stop it), or give this "
            "run its own folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(
        fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0
    )
    _held[key] = [fd, 1]


def release_run_lock(folder: str | Path) -> None:
    """Ends this process's claim on ``folder`` once every callback that took it has released it."""
    key = str(Path(folder).resolve())
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])  # closing the descriptor releases the lock


def claim_folders(callbacks: Sequence[Any]) -> None:
    """The first thing ``fit`` does: each checkpoint callback (a ``claim_folder`` method) checks that its folder
    is writable and takes its run lock, so a second job writing into the same folder is refused before it prints,
    loads a checkpoint or trains."""
    for callback in callbacks:
        if callable(getattr(callback, "claim_folder", None)):
            callback.claim_folder()


def start_over(trainer: TrainerLike, callbacks: Sequence[Any]) -> None:
    """``fit(resume="restart")``: each callback with a ``start_over`` method (ModelCheckpoint, BackupAndRestore)
    deletes, on rank 0, the files of its folder that fitkit vouched for; an error is raised on every rank."""
    for callback in callbacks:
        if callable(getattr(callback, "start_over", None)):
            checked_on_rank_zero(trainer, callback.start_over)


def saved_on_interrupt(callbacks: Sequence[Any]) -> str:
    """What a Ctrl-C's ``KeyboardInterrupt`` says was saved: the files the checkpoint callbacks write on an
    interrupt (``last.pt``, the backup) that exist now, and how to continue; or that nothing was saved."""
    saved = []
    for callback in callbacks:
        path = getattr(callback, "path", None)  # BackupAndRestore's backup
        if path is None and getattr(callback, "checkpoint_dir", None) is not None:
            path = Path(callback.checkpoint_dir) / "last.pt"  # ModelCheckpoint: last.pt on an interrupt
        if isinstance(path, Path) and path.exists():
            saved.append(str(path))
    if not saved:
        return "; no checkpoint callback saved the state (add ModelCheckpoint(..., save_last=True) to keep it)"
    shown = ", ".join(saved)
    return f"; the state at this batch boundary was saved to {shown}: run again with resume='auto' to continue"


def checked_on_rank_zero(trainer: TrainerLike, check: Callable[[], None]) -> None:
    """Runs ``check`` (a look at files that rank 0 alone writes) on rank 0 only, and raises its error on every
    rank: a rank that raised alone would leave the others waiting in their next collective, and a rank that
    looked itself could see a file rank 0 has just written. The others raise the same type and message."""
    error: Exception | None = None
    if trainer.is_global_zero:
        try:
            check()
        except Exception as exc:
            error = exc
    info = trainer.dist
    if info.world_size == 1:
        if error is not None:
            raise error
        return
    told = distributed.broadcast_object(None if error is None else (type(error), str(error)), info)
    if error is not None:
        raise distributed.on_every_rank(error)
    if told is not None:
        kind, message = told
        try:
            raised = kind(message)
        except Exception:  # an exception class that takes other arguments
            raised = RuntimeError(message)
        raise distributed.on_every_rank(raised)
