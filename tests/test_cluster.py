"""Beyond one machine, with real launchers: two torchrun agents over loopback (two "nodes", each in its own
working folder), torchrun's restarts after a SIGKILLed worker, and srun's environment with a stand-in
``scontrol``. Every test runs ``tests/cluster_job.py`` in subprocesses, bounded in time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "cluster_job.py"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def run_single(folder: Path, *args: str) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, str(JOB), "--out", str(folder / "out"), *args],
        cwd=folder, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(torch.load(folder / "out" / "weights.pt"))


def run_agents(folder: Path, *args: str, nodes: int = 2, torchrun: tuple[str, ...] = ()) -> list[Path]:
    """``nodes`` torchrun agents of one worker each, rendezvous over loopback (c10d), each in its own
    working folder ``folder/node<i>``; the final weights in ``folder/out``. Returns the node folders."""
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fitkit-test", *torchrun,
        str(JOB), "--out", str(folder / "out"), *args,
    ]  # fmt: skip
    nodes_dirs = [folder / f"node{i}" for i in range(nodes)]
    agents = []
    for node in nodes_dirs:
        node.mkdir(parents=True)
        log = (node / "agent.log").open("w")
        agents.append(subprocess.Popen(command, cwd=node, env=clean_env(), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [agent.wait(timeout=180) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    logs = "\n".join((node / "agent.log").read_text()[-3000:] for node in nodes_dirs)
    assert codes == [0] * nodes, logs
    return nodes_dirs


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_torchrun_agents_over_loopback_train_as_one_process_write_on_rank_zero_and_resume_exactly(
    tmp_path: Path,
) -> None:
    one = run_single(tmp_path / "single", "--epochs", "4")
    nodes = run_agents(tmp_path / "two", "--epochs", "4")
    two = dict(torch.load(tmp_path / "two" / "out" / "weights.pt"))
    assert max_difference(two, one) < 1e-6
    assert (tmp_path / "two" / "out" / "steps.txt").read_text().split()[0] == "12"
    # fitkit's files come from global rank 0 only: one node folder holds them, the other none at all.
    written = [
        sorted(p.name for p in (node / "ckpt").glob("*.pt")) if (node / "ckpt").exists() else [] for node in nodes
    ]
    assert sorted(written) == [[], ["epoch01.pt", "epoch02.pt", "epoch03.pt", "epoch04.pt"]], written
    first = next(node for node, names in zip(nodes, written) if names)
    # A second pair of agents continues from epoch 2 (a fresh rendezvous: global rank 0 may be the other
    # node) and ends bit for bit where the uninterrupted pair ended.
    resume = str(first / "ckpt" / "epoch02.pt")
    run_agents(tmp_path / "again", "--epochs", "4", "--resume", resume)
    again = dict(torch.load(tmp_path / "again" / "out" / "weights.pt"))
    assert all(torch.equal(again[k], two[k]) for k in two)
