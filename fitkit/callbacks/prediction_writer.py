"""PredictionWriter: ``predict``'s outputs written batch by batch, so memory stays flat over any data size."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from fitkit._loaders import concat_outputs, take_rows
from fitkit._safe_files import open_new
from fitkit.callbacks.base import Callback, Logs
from fitkit.data import move_to_device

_NAME = re.compile(r"^predictions-rank\d{5}-batch\d{9}\.pt$")
_DONE = re.compile(r"^predictions-rank\d{5}-done\.pt$")  # written when a rank's predict finished


class PredictionWriter(Callback):
    """Writes each prediction batch's outputs to ``directory`` as it is predicted.

    Use it with ``trainer.predict(data, callbacks=[PredictionWriter("preds")], return_outputs=False)``:
    nothing is kept in memory, however large the data. Each batch goes to its own file,
    ``predictions-rank{rank:05d}-batch{batch:09d}.pt`` (so sorted names are in order), written atomically
    (a temporary file, then a rename) and loadable with ``torch.load(path, weights_only=True)``: a dict of

    * ``"outputs"``: the batch's outputs on the CPU (a tensor, or tuples/lists/dicts of tensors);
    * ``"indices"``: a LongTensor, each output row's position in what ``predict`` would return;
    * ``"batch"``, ``"rank"``, ``"world_size"``: the batch index on this rank, and who wrote it.

    Under torchrun every rank writes its own share (rank r holds rows r, r + world_size, ...; see
    ``"indices"``); when every rank predicts all of the data (FSDP, data that cannot be split), rank 0
    alone writes. [read][fitkit.callbacks.PredictionWriter.read] puts the files of a folder back together, in order.

    Args:
        directory: the folder for the files (created if missing).
        overwrite: a folder that already holds prediction files is an error unless this is True; then
            only those files (this callback's names) are deleted before writing, never anything else.
    """

    def __init__(self, directory: str | os.PathLike[str], overwrite: bool = False) -> None:
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise TypeError(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}")
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
        self.directory = Path(directory)
        self.overwrite = overwrite
        self._writes = True

    def on_predict_begin(self, logs: Logs | None = None) -> None:
        trainer = self.trainer
        sharded = trainer.world_size > 1 and trainer.predicting_sharded
        self._writes = trainer.is_global_zero or sharded
        self._rank = trainer.dist.rank if sharded else 0
        self._world_size = trainer.world_size if sharded else 1
        if not self._writes:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # Each rank looks at its own files (the others may be writing theirs already); rank 0 also at those
        # of ranks this run does not have (a larger earlier run).
        ours = [p for p in self.directory.iterdir() if _NAME.match(p.name) or _DONE.match(p.name)]
        mine = [
            p
            for p in ours
            if int(p.name[16:21]) == self._rank or (self._rank == 0 and int(p.name[16:21]) >= self._world_size)
        ]
        self._batches = 0
        if mine and not self.overwrite:
            raise FileExistsError(
                f"PredictionWriter: {self.directory} already holds {sum(bool(_NAME.match(p.name)) for p in mine)} "
                "prediction file(s) of an earlier "
                "run; pass another directory, or PredictionWriter(..., overwrite=True) to delete them first"
            )
        for path in mine:
            path.unlink()

    def on_predict_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        if not self._writes:
            return
        logs = logs or {}
        record = {
            "outputs": move_to_device(logs["outputs"], torch.device("cpu")),
            "indices": logs["indices"],
            "batch": batch,
            "rank": self._rank,
            "world_size": self._world_size,
        }
        path = self.directory / f"predictions-rank{self._rank:05d}-batch{batch:09d}.pt"
        tmp = path.with_name(path.name + ".tmp")
        try:
            with self.trainer.allow_sync(), open_new(tmp) as f:  # the outputs are copied to the host on purpose
                torch.save(record, f)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no temporary
        self._batches = batch + 1

    def on_predict_end(self, logs: Logs | None = None) -> None:
        if not self._writes:
            return
        # The record that this rank's share is complete: read() refuses a folder without it (a failed predict).
        done = {"batches": self._batches, "rank": self._rank, "world_size": self._world_size}
        path = self.directory / f"predictions-rank{self._rank:05d}-done.pt"
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open_new(tmp) as f:
                torch.save(done, f)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def read(directory: str | os.PathLike[str]) -> Any:
        """The outputs written to ``directory`` (every rank's files), in ``predict``'s order: what
        ``predict`` would have returned.

        Args:
            directory: the folder a ``PredictionWriter`` wrote to (its ``output_dir``).

        Returns:
            The outputs concatenated along dim 0 on the CPU (tuples and dicts element-wise).
        """
        paths = sorted(p for p in Path(directory).iterdir() if _NAME.match(p.name))
        if not paths:
            raise FileNotFoundError(f"PredictionWriter.read: no prediction files in {directory}")
        _check_complete(Path(directory), paths)
        records = [torch.load(p, weights_only=True) for p in paths]
        outputs = concat_outputs([r["outputs"] for r in records])
        order = torch.argsort(torch.cat([r["indices"] for r in records]))
        return take_rows(outputs, order)


def _check_complete(directory: Path, paths: list[Path]) -> None:
    """A ValueError unless every rank's predict finished (its done record is there) and each of its batch
    files is in place: part of the rows would otherwise be returned as if they were all of them."""
    found: dict[int, set[int]] = {}
    for p in paths:
        found.setdefault(int(p.name[16:21]), set()).add(int(p.name[27:36]))
    done = {int(p.name[16:21]): p for p in directory.iterdir() if _DONE.match(p.name)}
    world = max((torch.load(p, weights_only=True)["world_size"] for p in done.values()), default=1)
    for rank in range(max(world, max(found) + 1)):
        if rank not in done:
            raise ValueError(
                f"PredictionWriter.read: the prediction files in {directory} are incomplete: the predict that wrote "
                f"them did not finish on rank {rank} (an error, a full disk, a killed process), so they hold only "
                "part of the rows. Run predict again with PredictionWriter(..., overwrite=True)"
            )
        want = torch.load(done[rank], weights_only=True)["batches"]
        missing = sorted(set(range(want)) - found.get(rank, set()))
        if missing or len(found.get(rank, set())) != want:
            raise ValueError(
                f"PredictionWriter.read: the prediction files in {directory} are incomplete: rank {rank} wrote "
                f"{want} batch file(s) but {len(found.get(rank, set()))} are here (missing: "
                f"{', '.join(map(str, missing[:5])) or 'none; extra ones'}). Run predict again with "
                "PredictionWriter(..., overwrite=True)"
            )


__all__ = ["PredictionWriter"]
