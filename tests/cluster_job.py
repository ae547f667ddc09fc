"""The training script the cluster tests launch: the same file under python, torchrun (one or several
agents, with restarts) and a stand-in srun; it never looks at how it was launched.

    python tests/cluster_job.py --out OUT --epochs 4 [--resume auto] [--kill-at-step K [--hold S]]
        [--signal-at-step K] [--ckpt FOLDER] [--fsdp] [--url s3://bucket/run --endpoint http://127.0.0.1:PORT]

Checkpoints go to ``./ckpt`` in the working folder (each torchrun agent runs in its own folder, as on
separate nodes), or with ``--url`` to an S3 server (the ModelCheckpoint to the URL, the backup to URL-backup). Global rank 0 writes the final weights to ``OUT/weights.pt`` and, to ``OUT/steps.txt``, the
step count, fit's seconds, the world size, torchrun's restart count and whether the fit resumed; every rank
writes its own restart count to ``OUT/restarts/rank<r>.txt`` (the agents' counts can differ). 96 samples in batches of 32 over all ranks (32 // world size per rank); one process
draws the order a DistributedSampler(seed=0) draws, so that every launch trains the same updates.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import fitkit
from fitkit.callbacks import BackupAndRestore, Callback, ModelCheckpoint

N = 96


class EpochPermutations(Sampler[int]):
    """The order DistributedSampler(seed=0) gives one process: torch.randperm seeded with seed + epoch."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator()
        g.manual_seed(self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class SelfSignal(Callback):
    """Sends ``signum`` to this process at global step ``step`` on rank ``rank``, once: a SIGKILL marks the
    shared ``marker`` file first (with several agents, a restart can give rank ``rank`` to a node whose agent
    counted no restart); other signals in the first attempt only (torchrun's restart count 0; the requeued
    SLURM job has a marker file). With ``hold``, the other ranks sleep that long at that step, so that their
    agent sees the failed node rejoin (a membership change: no restart counted there) before they fail."""

    def __init__(self, step: int, signum: int, rank: int, marker: Path, hold: float = 0.0) -> None:
        super().__init__()
        self.step, self.signum, self.rank, self.marker, self.hold = step, signum, rank, marker, hold

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:  # type: ignore[type-arg]
        if self.trainer.global_step != self.step:
            return
        if self.signum == signal.SIGKILL:
            if self.marker.exists():
                return
            if self.trainer.dist.rank != self.rank:
                time.sleep(self.hold)
                return
            time.sleep(0.2)  # let the backup of this batch land first; the kill is still mid-epoch
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
            os.kill(os.getpid(), self.signum)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and not Path("requeued").exists()
        if first_attempt and self.trainer.dist.rank == self.rank:
            os.kill(os.getpid(), self.signum)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--ckpt", default="ckpt", help="the checkpoint folder (relative: in the working folder)")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--hold", type=float, default=0.0, help="seconds the other ranks wait at the kill")
    parser.add_argument("--signal-at-step", type=int, default=None)
    parser.add_argument("--fsdp", action="store_true", help='strategy="fsdp" (sharded checkpoints)')
    parser.add_argument("--url", default=None, help="checkpoints to this S3 folder instead of --ckpt")
    parser.add_argument("--endpoint", default=None, help="the S3 server's URL (moto's, in the tests)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fitkit.seed_everything(0)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N, 8, generator=g)
    data = TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    callbacks: list[Callback] = [
        BackupAndRestore(f"{args.ckpt}/backup", save_freq=1),
        ModelCheckpoint(args.ckpt + "/epoch{epoch:02d}.pt", monitor=None),
    ]
    if args.url is not None:
        store = {
            "key": "testing", "secret": "testing", "skip_instance_cache": True, "use_listings_cache": False,
            "client_kwargs": {"endpoint_url": args.endpoint, "region_name": "us-east-1"},
        }  # fmt: skip
        callbacks = [
            BackupAndRestore(args.url + "-backup", save_freq=1, storage_options=store),
            ModelCheckpoint(args.url + "/epoch{epoch:02d}", monitor=None, save_top_k=2, storage_options=store),
        ]
    if args.kill_at_step is not None:
        marker = Path(args.out) / "killed"
        callbacks.append(SelfSignal(args.kill_at_step, signal.SIGKILL, rank=1, marker=marker, hold=args.hold))
    if args.signal_at_step is not None:
        callbacks.append(SelfSignal(args.signal_at_step, signal.SIGUSR1, rank=0, marker=Path(args.out) / "signalled"))
    trainer = fitkit.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "cross_entropy",
        callbacks=callbacks,
        device="cpu",
        verbose=0,
        strategy="fsdp" if args.fsdp else "auto",
    )
    per_rank = 32 // trainer.world_size
    if trainer.world_size == 1:
        train = DataLoader(data, batch_size=per_rank, sampler=EpochPermutations(N))
    else:
        train = DataLoader(data, batch_size=per_rank, shuffle=True)
    start = time.perf_counter()
    trainer.fit(train, epochs=args.epochs, resume=args.resume)
    seconds = time.perf_counter() - start
    if args.fsdp:  # a collective: every rank gathers, rank 0 keeps the whole weights
        weights = trainer.model_state_dict()
    else:
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "-")
    (Path(args.out) / "restarts").mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "restarts" / f"rank{trainer.dist.rank}.txt").write_text(restarts)
    if trainer.is_global_zero:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(weights, out / "weights.pt")
        (out / "rank0_node.txt").write_text(Path.cwd().name)  # which agent's folder global rank 0 ran in
        resumed = "resumed" if trainer.resumed_from is not None else "fresh"
        (out / "steps.txt").write_text(
            f"{trainer.global_step} {seconds:.4f} {trainer.world_size} {restarts} {resumed}\n"
        )


if __name__ == "__main__":
    main()
