"""fitkit under Ray Train, with the real ``ray[train]`` package on a local Ray cluster the test starts.

``train_func`` is one training function for every launcher: Ray Train's ``TorchTrainer`` runs it in two
workers whose process group Ray has already initialised (fitkit uses that group as is and adds its own gloo
control group on top), and a plain process runs it alone. The two end on the same weights (within 1e-6 on the
CPU, where only the order of the gradient sums differs), fitkit's files come from rank 0 only, and a worker
killed mid-epoch under ``FailureConfig(max_failures=1)`` makes Ray restart the group, which resumes from
fitkit's backup by itself and ends bit for bit on the uninterrupted Ray run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import fitkit.checkpoint

ROOT = Path(__file__).resolve().parents[1]
N = 96

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


class EpochPermutations(Sampler[int]):
    """The order DistributedSampler(seed=0) draws, for one process: torch.randperm seeded with the epoch."""

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


def train_func(config: dict[str, Any]) -> None:
    """The training function, as a user would hand it to ``TorchTrainer``; it never looks at Ray.

    ``config``: ``root`` (a folder: rank r keeps checkpoints in ``root/rank<r>/ckpt``, as on a node's own
    disk, and rank 0 writes the final weights to ``root/weights.pt``), ``epochs``, and ``kill_at_step``
    (rank 1 SIGKILLs itself at that global step in the first attempt only, marked by ``root/killed``).
    """
    import signal

    import torch.distributed as dist

    import fitkit
    from fitkit.callbacks import BackupAndRestore, Callback, ModelCheckpoint

    class KillOnce(Callback):
        def __init__(self, step: int, marker: Path) -> None:
            super().__init__()
            self.step, self.marker = step, marker

        def on_batch_end(self, batch: int, logs: dict | None = None) -> None:  # type: ignore[type-arg]
            trainer = self.trainer
            if trainer.dist.rank == 1 and trainer.global_step == self.step and not self.marker.exists():
                self.marker.touch()
                time.sleep(0.2)  # let rank 0's backup of this batch land; the kill is still mid-epoch
                os.kill(os.getpid(), signal.SIGKILL)

    root = Path(config["root"])
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    ckpt = root / f"rank{rank}" / "ckpt"
    torch.set_num_threads(1)
    fitkit.seed_everything(0)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N, 8, generator=g)
    data = TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    callbacks: list[Callback] = [
        BackupAndRestore(str(ckpt / "backup"), save_freq=1),
        ModelCheckpoint(str(ckpt / "epoch{epoch:02d}.pt"), monitor=None),
    ]
    if config.get("kill_at_step") is not None:
        callbacks.append(KillOnce(config["kill_at_step"], root / "killed"))
    trainer = fitkit.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "cross_entropy",
        callbacks=callbacks,
        device="cpu",
        verbose=0,
    )
    per_rank = 32 // trainer.world_size
    if trainer.world_size == 1:
        train = DataLoader(data, batch_size=per_rank, sampler=EpochPermutations(N))
    else:
        train = DataLoader(data, batch_size=per_rank, shuffle=True)  # fitkit shards it (DistributedSampler)
    trainer.fit(train, epochs=config["epochs"])
    if config.get("report_to_ray"):  # the docs' recipe: every rank reports, rank 0 with fitkit's newest file
        import shutil
        import tempfile

        import ray.train

        saver = callbacks[1]
        assert isinstance(saver, ModelCheckpoint)
        with tempfile.TemporaryDirectory() as folder:  # Ray copies the folder to its storage_path
            checkpoint = None
            if trainer.is_global_zero and saver.best_model_path is not None:
                shutil.copy(saver.best_model_path, folder)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"steps": trainer.global_step}, checkpoint=checkpoint)
    if trainer.is_global_zero:
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        torch.save({"weights": weights, "steps": trainer.global_step, "world_size": trainer.world_size,
                    "resumed": trainer.resumed_from is not None}, root / "weights.pt")  # fmt: skip


def run_alone(root: Path, epochs: int) -> dict[str, Any]:
    """``train_func`` in one plain process (no Ray, no process group)."""
    root.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    code = f"from test_ray import train_func; train_func({{'root': {str(root)!r}, 'epochs': {epochs}}})"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(torch.load(root / "weights.pt"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def fitkit_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.timeout(300)
def test_ray_train_torchtrainer_trains_as_one_process_writes_on_rank_zero_and_restarts_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    alone = run_alone(tmp_path / "alone", epochs=4)
    # Ray's raylet and workers inherit the driver's environment: the test's module on the path (the workers
    # unpickle train_func by reference), and a light cluster on a small shared machine.
    for name, value in {
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",  # no usage report
        "RAY_DEDUP_LOGS": "0",
        "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",  # no state actor polling the controller
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no preemption watcher actor (one local node)
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # Ray's files go under tmp_path, through a short link: its sockets' paths must stay under 108 bytes.
    (tmp_path / "ray").mkdir()
    link = Path(tempfile.gettempdir()) / f"fitkit-ray-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(tmp_path / "ray")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(link), object_store_memory=100 * 1024**2,
                 log_to_driver=False)  # fmt: skip

        def fit_with_ray(root: Path, **config: Any) -> dict[str, Any]:
            root.mkdir(parents=True)
            trainer = TorchTrainer(
                train_func,
                train_loop_config={"root": str(root), **config},
                scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                run_config=RunConfig(
                    name=root.name, storage_path=str(tmp_path / "ray_results"), failure_config=FailureConfig(1)
                ),
            )
            result = trainer.fit()
            return {**torch.load(root / "weights.pt"), "ray_checkpoint": result.checkpoint}

        whole = fit_with_ray(tmp_path / "whole", epochs=4, report_to_ray=True)
        assert (whole["steps"], whole["world_size"], whole["resumed"]) == (12, 2, False)
        # Ray's copy of the last reported file is fitkit's epoch-4 checkpoint, without the manifest that vouches
        # for it: fitkit refuses it until trusted (fitkit's own folder stays the source of truth).
        with whole["ray_checkpoint"].as_directory() as folder:
            assert sorted(os.listdir(folder)) == ["epoch04.pt"]
            copy = Path(folder) / "epoch04.pt"
            with pytest.raises(fitkit.checkpoint.CheckpointError):
                fitkit.checkpoint.load(copy)
            assert fitkit.checkpoint.trust(copy)["global_step"] == 12
            fitkit.checkpoint.load(copy)
        difference = max_difference(whole["weights"], alone["weights"])
        print(f"Ray (2 workers) vs one process: max |difference| {difference:.3g}")
        assert difference < 1e-6
        # fitkit's files come from rank 0 only: rank 1's folder was never made.
        assert fitkit_files(tmp_path / "whole" / "rank1") == []
        written = fitkit_files(tmp_path / "whole" / "rank0" / "ckpt")
        # (the backup is removed when fit completes; its folder's manifest stays)
        assert [f for f in written if f.endswith((".pt", ".json"))] == [
            "backup/fitkit-manifest.json", "epoch01.pt", "epoch02.pt", "epoch03.pt", "epoch04.pt",
            "fitkit-manifest.json",
        ], written  # fmt: skip

        # FailureConfig(max_failures=1): rank 1 SIGKILLed mid-epoch 2; Ray restarts both workers, which resume
        # from fitkit's backup by themselves and end bit for bit on the uninterrupted Ray run.
        killed = fit_with_ray(tmp_path / "killed", epochs=4, kill_at_step=5)
        assert (tmp_path / "killed" / "killed").exists()
        assert (killed["steps"], killed["world_size"], killed["resumed"]) == (12, 2, True)
        assert all(torch.equal(killed["weights"][k], whole["weights"][k]) for k in whole["weights"])
        assert fitkit_files(tmp_path / "killed" / "rank1") == []
    finally:
        ray.shutdown()
        link.unlink()
        for sig, handler in handlers.items():  # Ray's TorchTrainer leaves its own SIGINT handler in this process
            signal.signal(sig, handler)
    print(f"test time {time.perf_counter() - started:.1f} s")
