"""SLURM: the process group from ``srun``'s environment, and requeueing a preempted job.

Under ``srun`` every task gets SLURM_PROCID (its global rank), SLURM_NTASKS (the world size), SLURM_LOCALID
(its rank on its node), SLURM_NODELIST and SLURM_JOB_ID, but none of torchrun's variables. fitkit maps
them (`launch_environment`) and sets the process group up itself, so the same script runs under
``srun python train.py`` without torchrun. A torchrun started by srun sets RANK itself and wins.

Preemption: SLURM sends a signal some time before it ends a job (``#SBATCH --signal=USR1@90``). The
Trainer's ``requeue_signal`` (SIGUSR1 under SLURM by default) stops at the next batch boundary, lets the
checkpoint callbacks save as for SIGTERM, then global rank 0 runs ``scontrol requeue $SLURM_JOB_ID``
(`requeue`) and ``fit`` exits with status 0; the requeued job resumes from the newest checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import warnings

from fitkit._warn import FitkitWarning, user_stacklevel

#: The port rank 0 listens on when the environment gives none (MASTER_PORT): derived from the job id, so that
#: every task of the job computes the same one and two jobs on one node rarely collide.
PORT_BASE = 15000


def in_slurm() -> bool:
    """True inside a SLURM job (SLURM_JOB_ID is set)."""
    return "SLURM_JOB_ID" in os.environ


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list, in SLURM's compressed form or not.

    ``"node[07-09,12],gpu3"`` -> ``"node07"``; ``"gpu3"`` -> ``"gpu3"``; ``"rack1-[2-3]-a"`` -> ``"rack1-2-a"``.
    """
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]*)(?:\[([^\]]+)\]([^,]*))?", nodelist)
    if not nodelist or match is None or not match.group(0):
        raise ValueError(f"cannot read a host from SLURM_NODELIST={nodelist!r}")
    prefix, ranges, suffix = match.group(1), match.group(2), match.group(3) or ""
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def launch_environment() -> dict[str, str] | None:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from srun's, or None
    outside an srun step of several tasks.

    The world size is the step's task count (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS); rank 0 listens on
    the first node of SLURM_NODELIST (SLURM_STEP_NODELIST first), on MASTER_PORT when set, else on
    ``PORT_BASE + SLURM_JOB_ID % 5000``; MASTER_ADDR, when set, is kept too.
    """
    env = os.environ
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if "SLURM_PROCID" not in env or tasks is None or int(tasks) < 2:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    mapped = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": tasks,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % 5000),
    }
    per_node = env.get("SLURM_NTASKS_PER_NODE", "")
    if per_node.isdigit():
        mapped["LOCAL_WORLD_SIZE"] = per_node
    return mapped


def resolve_requeue_signal(requeue_signal: int | str | None) -> int | None:
    """The Trainer's ``requeue_signal`` as a signal number or None: ``"auto"`` is SIGUSR1 inside a SLURM job
    and None outside one."""
    if requeue_signal == "auto":
        return int(signal.SIGUSR1) if in_slurm() else None
    if requeue_signal is None:
        return None
    valid = {int(s) for s in signal.valid_signals()} - {int(signal.SIGKILL), int(signal.SIGSTOP)}
    if isinstance(requeue_signal, bool) or not isinstance(requeue_signal, int) or int(requeue_signal) not in valid:
        raise ValueError(
            f"requeue_signal must be 'auto' (SIGUSR1 under SLURM), None (off) or a signal such as "
            f"signal.SIGUSR1, got {requeue_signal!r}"
        )
    if int(requeue_signal) in (signal.SIGINT, signal.SIGTERM):
        raise ValueError(
            f"requeue_signal={signal.Signals(requeue_signal).name} would requeue on every interrupt and on SLURM's "
            "own SIGTERM at the end of the job; use the signal sbatch --signal sends (signal.SIGUSR1)"
        )
    return int(requeue_signal)


def requeue() -> bool:
    """Runs ``scontrol requeue $SLURM_JOB_ID``; True when it succeeded. A failure (no scontrol, no job id,
    a refusal) is a warning: the checkpoint is saved either way, and the job can be resubmitted by hand."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        warnings.warn(
            "requeue signal outside a SLURM job: nothing to requeue", FitkitWarning, stacklevel=user_stacklevel()
        )
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        warnings.warn(f"scontrol requeue {job_id} failed: {exc}", FitkitWarning, stacklevel=user_stacklevel())
        return False
    if done.returncode != 0:
        warnings.warn(
            f"scontrol requeue {job_id} failed (exit {done.returncode}): {done.stderr.strip()}",
            FitkitWarning,
            stacklevel=user_stacklevel(),
        )
        return False
    return True


__all__ = ["PORT_BASE", "first_host", "in_slurm", "launch_environment", "requeue", "resolve_requeue_signal"]
