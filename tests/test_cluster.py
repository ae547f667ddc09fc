"""Beyond one machine, with real launchers: two torchrun agents over loopback (two "nodes", each in its own
working folder), torchrun's restarts after a SIGKILLed worker, and srun's environment with a stand-in
``scontrol``. Every test runs ``tests/cluster_job.py`` in subprocesses, bounded in time.
"""

from __future__ import annotations

import os
import socket
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


def run_agents(folder: Path, *args: str, nodes: int = 2, nproc: int = 1, torchrun: tuple[str, ...] = ()) -> list[Path]:
    """``nodes`` torchrun agents of ``nproc`` workers each, rendezvous over loopback (c10d), each in its own
    working folder ``folder/node<i>``; the final weights in ``folder/out``. Returns the node folders."""
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={nproc}",
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


def test_a_worker_killed_mid_epoch_under_torchrun_restarts_resumes_by_itself_bit_exactly(tmp_path: Path) -> None:
    # torchrun's defaults (the agent's store shared with the workers, pytorch/pytorch#135712): the restarted
    # workers build their group under keys of their own attempt (fitkit prefixes them by the restart count).
    run_agents(tmp_path / "whole", "--epochs", "3", nodes=1, nproc=2)
    whole = dict(torch.load(tmp_path / "whole" / "out" / "weights.pt"))
    run_agents(tmp_path / "killed", "--epochs", "3", "--kill-at-step", "5", nodes=1, nproc=2,
               torchrun=("--max-restarts=2",))  # fmt: skip
    steps, _, world_size, restarts, resumed = (tmp_path / "killed" / "out" / "steps.txt").read_text().split()
    assert (steps, world_size, restarts, resumed) == ("9", "2", "1", "resumed")  # SIGKILL in epoch 2 of 3
    killed = dict(torch.load(tmp_path / "killed" / "out" / "weights.pt"))
    assert all(torch.equal(killed[k], whole[k]) for k in whole)


def test_a_worker_killed_on_one_of_two_nodes_restarts_both_with_their_own_restart_counts_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    # Two agents, torchrun's defaults (the rendezvous store shared between attempts): rank 1 is SIGKILLed while
    # rank 0 waits, so rank 0's agent restarts its worker for the membership change without counting a restart,
    # while rank 1's agent counts one: the two nodes' TORCHELASTIC_RESTART_COUNT differ (1 and 0), and cannot
    # key the restarted group's store. fitkit agrees on a fresh key prefix through the store instead.
    shared = ("--ckpt", str(tmp_path / "shared_ckpt"))  # on real nodes: a shared filesystem
    run_agents(tmp_path / "whole", "--epochs", "3", *shared)
    whole = dict(torch.load(tmp_path / "whole" / "out" / "weights.pt"))
    shared = ("--ckpt", str(tmp_path / "shared_ckpt_killed"))
    run_agents(tmp_path / "killed", "--epochs", "3", "--kill-at-step", "5", "--hold", "4", *shared,
               torchrun=("--max-restarts=2",))  # fmt: skip
    out = tmp_path / "killed" / "out"
    assert (out / "killed").exists()
    counts = sorted((out / "restarts" / f"rank{r}.txt").read_text() for r in range(2))
    assert counts == ["0", "1"], counts  # the agents' counts differ
    steps, _, world_size, _, resumed = (out / "steps.txt").read_text().split()
    assert (steps, world_size, resumed) == ("9", "2", "resumed")
    killed = dict(torch.load(out / "weights.pt"))
    assert all(torch.equal(killed[k], whole[k]) for k in whole)


# -- SLURM: srun's environment, a stand-in scontrol ------------------------------------------------------
def slurm_port() -> int:
    """A free port of the form fitkit.slurm derives from a job id (15000 + id % 5000)."""
    for port in range(15000 + os.getpid() % 4000, 20000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 15000-19999")


def srun(folder: Path, job_id: int, bin_dir: Path, *args: str, tasks: int = 2) -> None:
    """What ``srun --ntasks=2 python cluster_job.py ...`` starts: one process per task, each with srun's
    variables (no RANK, no MASTER_PORT), all in the job's folder; ``bin_dir`` first on PATH."""
    processes = []
    for task in range(tasks):
        env = clean_env(
            SLURM_JOB_ID=str(job_id), SLURM_PROCID=str(task), SLURM_NTASKS=str(tasks), SLURM_LOCALID=str(task),
            SLURM_NODELIST="localhost", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        )  # fmt: skip
        log = (folder / f"task{task}.log").open("a")
        command = [sys.executable, str(JOB), "--out", str(folder / "out"), *args]
        processes.append(subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [process.wait(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    logs = "\n".join((folder / f"task{t}.log").read_text()[-3000:] for t in range(tasks))
    assert codes == [0] * tasks, logs


def test_under_srun_fitkit_forms_the_group_and_the_requeue_signal_saves_requeues_exits_0_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    # A stand-in for SLURM's scontrol (SLURM cannot run here): it records its arguments and marks the job
    # folder requeued, as the requeued job would find it (the job's second start signals nothing).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> scontrol.calls\ntouch requeued\n')
    scontrol.chmod(0o755)
    job_id = slurm_port() - 15000 + 5000 * 7  # rank 0 listens on 15000 + job_id % 5000
    whole, job = tmp_path / "whole", tmp_path / "job"
    whole.mkdir()
    job.mkdir()
    srun(whole, job_id, bin_dir, "--epochs", "3", "--signal-at-step", "99")
    reference = dict(torch.load(whole / "out" / "weights.pt"))
    srun(job, job_id, bin_dir, "--epochs", "3", "--signal-at-step", "5")  # SIGUSR1 on rank 0 in epoch 2
    assert (job / "scontrol.calls").read_text() == f"requeue {job_id}\n"  # once, from global rank 0
    assert not (job / "out").exists()  # fit ended early: the script's code after fit did not run
    assert (job / "ckpt" / "backup" / "backup.pt").exists()
    srun(job, job_id, bin_dir, "--epochs", "3", "--signal-at-step", "5")  # the requeued job
    steps, _, world_size, _, resumed = (job / "out" / "steps.txt").read_text().split()
    assert (steps, world_size, resumed) == ("9", "2", "resumed")
    requeued = dict(torch.load(job / "out" / "weights.pt"))
    assert all(torch.equal(requeued[k], reference[k]) for k in reference)
    assert (job / "scontrol.calls").read_text() == f"requeue {job_id}\n"
