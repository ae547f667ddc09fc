"""Beyond one machine, with real launchers: two torchrun agents over loopback (two "nodes", each in its own
working folder), torchrun's restarts after a SIGKILLed worker, and srun's environment with a stand-in
``scontrol``. Every test runs ``tests/cluster_job.py`` in subprocesses, bounded in time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
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


def run_agents(
    folder: Path, *args: str, nodes: int = 2, nproc: int = 1, torchrun: tuple[str, ...] = (), **env: str
) -> list[Path]:
    """``nodes`` torchrun agents of ``nproc`` workers each, rendezvous over loopback (c10d), each in its own
    working folder ``folder/node<i>`` (``env``: more environment variables); the final weights in
    ``folder/out``. Returns the node folders."""
    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fitkit-test", *torchrun,
        str(JOB), "--out", str(folder / "out"), *args,
    ]  # fmt: skip
    nodes_dirs = [folder / f"node{i}" for i in range(nodes)]
    agents = []
    for node in nodes_dirs:
        node.mkdir(parents=True, exist_ok=True)  # an existing folder: the same node runs again
        log = (node / "agent.log").open("w")
        agents.append(subprocess.Popen(command, cwd=node, env=clean_env(**env), stdout=log, stderr=subprocess.STDOUT))
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


# -- FSDP to an object store, two nodes without a shared filesystem -----------------------------------------
@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free localhost port, with the bucket ``fitkit-test`` (as in test_remote.py)."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import boto3  # moto's dependency

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", aws_access_key_id="testing", aws_secret_access_key="testing", endpoint_url=endpoint,
        region_name="us-east-1",
    ).create_bucket(Bucket="fitkit-test")  # fmt: skip
    try:
        yield endpoint
    finally:
        server.stop()


def test_fsdp_on_two_nodes_without_a_shared_filesystem_checkpoints_every_shard_to_s3_and_resumes_exactly(
    tmp_path: Path, s3_endpoint: str
) -> None:
    from fitkit import checkpoint, remote

    # Each node stages in ./staging of its own folder: the same path on both (as /tmp/fitkit-staging is on
    # real machines), another folder each, so that rank 1 writes its shard on its own "disk" only.
    store = {
        "key": "testing", "secret": "testing", "skip_instance_cache": True, "use_listings_cache": False,
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }  # fmt: skip
    job = ("--fsdp", "--endpoint", s3_endpoint)
    whole_url = "s3://fitkit-test/whole"
    run_agents(tmp_path / "whole", "--epochs", "3", *job, "--url", whole_url, FITKIT_STAGING="staging")
    whole = dict(torch.load(tmp_path / "whole" / "out" / "weights.pt"))
    url = "s3://fitkit-test/run"
    nodes = run_agents(tmp_path / "first", "--epochs", "2", *job, "--url", url, FITKIT_STAGING="staging")
    folder = remote.RemoteFolder(url, store)
    entries = folder.read_manifest()["files"]
    assert sorted(entries) == ["epoch01", "epoch02"]
    for name in entries:  # every rank's shard is in the bucket, checked
        assert sorted(folder.verify(name)["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "fitkit-state.pt"]
    # Each node's staging copy holds its own shards only: nothing there passes for a complete checkpoint (rank
    # 0's manifest lists rank 1's shard, missing here), and rank 1's node keeps no temporary directory behind.
    for node in nodes:  # the ModelCheckpoint's and the backup's staging folders
        assert not sorted(p.relative_to(node) for p in (node / "staging").rglob(".*.tmp")), node
    for copy in [node / "staging" / remote.staging_folder(url).name for node in nodes]:
        for name in checkpoint.read_manifest(copy)["files"]:
            with pytest.raises(checkpoint.CheckpointError, match=r"__\d_0\.distcp is missing"):
                checkpoint.verify(copy / name)
        with pytest.raises(checkpoint.CheckpointError, match="missing|no checkpoint|not listed"):
            checkpoint.verify(copy / "epoch02")
    # Two fresh nodes resume from the bucket (resume="auto" with the URL) and end bit for bit on the
    # uninterrupted run's weights; the bucket then holds every rank's shard of epoch 3.
    run_agents(tmp_path / "again", "--epochs", "3", "--resume", "auto", *job, "--url", url, FITKIT_STAGING="staging")
    steps, _, world_size, _, resumed = (tmp_path / "again" / "out" / "steps.txt").read_text().split()
    assert (steps, world_size, resumed) == ("9", "2", "resumed")
    again = dict(torch.load(tmp_path / "again" / "out" / "weights.pt"))
    assert all(torch.equal(again[k], whole[k]) for k in whole)
    assert sorted(folder.read_manifest()["files"]) == ["epoch02", "epoch03"]
    assert "__1_0.distcp" in folder.verify("epoch03")["files"]
    # The same nodes again, rank 1's shard of the newest checkpoint lost from the bucket: resume="auto" skips it
    # remotely (epoch02 is fetched whole) and locally, where rank 0's node holds a partial epoch03 of its own.
    holder = (tmp_path / "whole" / "out" / "rank0_node.txt").read_text()  # its staging holds partial copies
    whole_folder = remote.RemoteFolder(whole_url, store)
    lost = whole_folder.read_manifest()["files"]["epoch03"]["versions"][0]["version"]
    whole_folder.fs.rm_file(whole_folder.key(f"epoch03/{lost}/__1_0.distcp"))
    run_agents(tmp_path / "whole", "--epochs", "3", "--resume", "auto", *job, "--url", whole_url,
               FITKIT_STAGING="staging")  # fmt: skip
    steps, _, _, _, resumed = (tmp_path / "whole" / "out" / "steps.txt").read_text().split()
    assert (steps, resumed) == ("9", "resumed")
    if (tmp_path / "whole" / "out" / "rank0_node.txt").read_text() == holder:  # torchrun's usual order
        log = (tmp_path / "whole" / holder / "agent.log").read_text()
        assert "skipping bad checkpoint" in log and "__1_0.distcp is missing" in log, log[-3000:]
    rerun = dict(torch.load(tmp_path / "whole" / "out" / "weights.pt"))
    assert all(torch.equal(rerun[k], whole[k]) for k in whole)


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
