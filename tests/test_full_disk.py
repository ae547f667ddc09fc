"""A checkpoint written to a disk that fills up, on a real, small file system (issue 19).

A tmpfs of a few hundred KiB is mounted for the test (root only; skipped otherwise), a file fills it to every level
around a checkpoint's size, one 4 KiB page at a time, and the save is tried at each: the write, phase 1 of the
manifest, the rename and phase 2 each fail in turn with a real ENOSPC from the kernel. At every level the folder
must stay consistent: the error names the disk (never torch's "[enforce fail at inline_container.cc]"), no
temporary file is left, and the file at the path is either the previous good version or the new one, vouched for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import make_classification

import fitkit
from fitkit import checkpoint
from fitkit.callbacks import ModelCheckpoint

SIZE_KIB = 640


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_KIB}k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _trainer(hidden: int = 200) -> fitkit.Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, hidden), torch.nn.Linear(hidden, 3))
    return fitkit.Trainer(model, "adam", "cross_entropy", verbose=0)


def _fill(folder: Path, size: int) -> bool:
    """Writes a filler file of ``size`` bytes; False when the disk cannot hold it."""
    try:
        with open(folder / f"filler-{uuid.uuid4().hex}", "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return False
    return True


@pytest.mark.parametrize("previous", [True, False])
def test_every_fill_level_leaves_the_previous_or_the_new_checkpoint_vouched_for(
    tmp_path: Path, small_disk: Path, previous: bool
):
    reference = tmp_path / "reference"
    trainer = _trainer()
    trainer.save_checkpoint(reference / "a.pt")  # version A: step 0
    x, y = make_classification(n=8, features=100)
    trainer.fit((x, y), epochs=1, batch_size=8)  # version B: step 1, with Adam's state (a larger file)
    seen = {"kept A": 0, "wrote B": 0, "saved": 0}
    for fill in range(0, SIZE_KIB * 1024, 4096):
        for entry in small_disk.iterdir():
            entry.unlink()
        for name in ("a.pt", checkpoint.MANIFEST) if previous else ():
            shutil.copy(reference / name, small_disk / name)
        if not _fill(small_disk, fill):
            break
        try:
            trainer.save_checkpoint(small_disk / "a.pt")
            outcome = "saved"
        except checkpoint.CheckpointError as error:
            message = str(error)
            assert "No space left on device (ENOSPC)" in message and "inline_container" not in message, message
            assert "free disk space" in message and "resume='auto'" in message
            outcome = "wrote B" if message.startswith("wrote the checkpoint") else "kept A"
            assert outcome == "wrote B" or "Nothing was replaced" in message, message
        seen[outcome] += 1
        leftovers = [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == [], (fill, leftovers)
        if outcome == "kept A" and not previous:
            assert not (small_disk / "a.pt").exists(), fill  # nothing half-written at the path
            continue
        step = checkpoint.load(small_disk / "a.pt")["trainer"]["global_step"]  # verified against the manifest
        assert step == (0 if outcome == "kept A" else 1), (fill, outcome)
    # The levels covered each outcome: room enough; a failure before the rename; (with no earlier file, whose
    # removal frees room) one after it, in the manifest's tidy-up.
    assert seen["saved"] > 0 and seen["kept A"] > 0, seen
    assert seen["wrote B"] > 0 or previous, seen


def test_a_fit_on_a_filling_disk_stops_with_the_disk_named_and_resumes_once_there_is_room(
    tmp_path: Path, small_disk: Path
):
    x, y = make_classification(n=64, features=100)

    def fit(epochs: int, resume: str | None = None) -> fitkit.Trainer:
        trainer = _trainer(hidden=16)
        trainer.callbacks.append(ModelCheckpoint(small_disk / "ckpt" / "e{epoch}.pt", monitor=None, save_last=True))
        trainer.fit((x, y), epochs=epochs, batch_size=16, resume=resume)
        return trainer

    one = _trainer(hidden=16)
    one.fit((x, y), epochs=1, batch_size=16)
    size = one.save_checkpoint(tmp_path / "one.pt").stat().st_size  # a checkpoint's size, optimizer state included
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    assert _fill(small_disk, free - int(2.5 * size) - 8192)  # room for e1.pt and last.pt, not for e2.pt too
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(checkpoint.CheckpointError, match=r"could not write the checkpoint .*: No space left on "
                           r"device \(ENOSPC\)\. Nothing was replaced"):  # fmt: skip
            fit(epochs=6)
    assert not [w for w in seen if "crash.pt" in str(w.message)]  # no second write tried on the full disk
    assert not [p for p in (small_disk / "ckpt").iterdir() if p.name.endswith(".tmp")]
    good = checkpoint.newest_good([small_disk / "ckpt"], "skipping")
    assert good is not None and good.name == "last.pt"
    assert checkpoint.load(good)["trainer"]["global_step"] == 4  # epoch 1's state
    for filler in small_disk.glob("filler-*"):
        filler.unlink()  # room again: the run continues from its newest good checkpoint
    resumed = fit(epochs=6, resume="auto")
    assert resumed.epoch == 6 and resumed.global_step == 24
    uninterrupted = _trainer(hidden=16)
    uninterrupted.fit((x, y), epochs=6, batch_size=16)
    for mine, reference in zip(resumed.model.parameters(), uninterrupted.model.parameters()):
        assert torch.equal(mine, reference)  # the disk's failure cost nothing but the time: exact resume
