"""fitkit.slurm without SLURM: srun's environment mapped to torchrun's, the requeue signal's argument, and
``scontrol requeue`` through a stand-in script on PATH. The real processes run in test_cluster.py (slow)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

import fitkit
from fitkit import distributed, slurm

SRUN = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in list(os.environ):
        if var.startswith(("SLURM_", "TORCHELASTIC_")) or var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(var)
    return monkeypatch


@pytest.mark.parametrize(
    "nodelist, host",
    [("gpu3", "gpu3"), ("node[07-09,12],gpu3", "node07"), ("rack1-[2-3]-a", "rack1-2-a"), ("a[1,4],b", "a1")],
)
def test_first_host_reads_slurms_compressed_node_lists(nodelist: str, host: str) -> None:
    assert slurm.first_host(nodelist) == host


def test_srun_environment_maps_to_torchruns(no_launcher: pytest.MonkeyPatch) -> None:
    assert slurm.launch_environment() is None
    for var, value in {**SRUN, "SLURM_NODELIST": "node[07-08]", "SLURM_NTASKS_PER_NODE": "4"}.items():
        no_launcher.setenv(var, value)
    assert slurm.launch_environment() == {
        "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node07",
        "MASTER_PORT": str(15000 + 4242 % 5000), "LOCAL_WORLD_SIZE": "4",
    }  # fmt: skip
    assert distributed._launched()
    no_launcher.setenv("MASTER_PORT", "29500")
    assert slurm.launch_environment()["MASTER_PORT"] == "29500"  # type: ignore[index]
    no_launcher.setenv("SLURM_NTASKS", "1")  # one task: no process group
    assert slurm.launch_environment() is None and not distributed._launched()


def test_the_requeue_signal_is_sigusr1_under_slurm_and_none_elsewhere(no_launcher: pytest.MonkeyPatch) -> None:
    assert slurm.resolve_requeue_signal("auto") is None
    no_launcher.setenv("SLURM_JOB_ID", "1")
    assert slurm.resolve_requeue_signal("auto") == signal.SIGUSR1
    assert slurm.resolve_requeue_signal(None) is None
    assert slurm.resolve_requeue_signal(signal.SIGUSR2) == signal.SIGUSR2


@pytest.mark.parametrize("value", ["USR1", 1.5, True, signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_wrong_requeue_signal_is_an_error_at_construction(value: object) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="requeue_signal"):
        fitkit.Trainer(model, "sgd", "mse", device="cpu", requeue_signal=value)  # type: ignore[arg-type]


def test_requeue_runs_scontrol_and_warns_when_it_fails(tmp_path: Path, no_launcher: pytest.MonkeyPatch) -> None:
    scontrol = tmp_path / "scontrol"  # a stand-in for SLURM's scontrol, on PATH
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\nexit ${{FAIL:-0}}\n')
    scontrol.chmod(0o755)
    no_launcher.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.warns(UserWarning, match="outside a SLURM job"):
        assert not slurm.requeue()
    no_launcher.setenv("SLURM_JOB_ID", "77")
    assert slurm.requeue()
    no_launcher.setenv("FAIL", "1")
    with pytest.warns(UserWarning, match=r"scontrol requeue 77 failed \(exit 1\)"):
        assert not slurm.requeue()
    assert (tmp_path / "calls").read_text() == "requeue 77\nrequeue 77\n"


def test_the_requeue_signal_in_one_process_saves_requeues_and_exits_0(
    tmp_path: Path, no_launcher: pytest.MonkeyPatch
) -> None:
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    scontrol.chmod(0o755)
    no_launcher.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    no_launcher.setenv("SLURM_JOB_ID", "9")
    from fitkit.callbacks import BackupAndRestore, LambdaCallback

    fitkit.seed_everything(0)
    model = nn.Linear(4, 2)
    kill = LambdaCallback(on_batch_end=lambda batch, logs: batch == 1 and os.kill(os.getpid(), signal.SIGUSR1))
    trainer = fitkit.Trainer(
        model, "sgd", "cross_entropy", device="cpu", verbose=0,
        callbacks=[BackupAndRestore(tmp_path / "backup"), kill],
    )  # fmt: skip
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    with pytest.raises(SystemExit) as exit_:
        trainer.fit((x, y), epochs=2, batch_size=16)
    assert exit_.value.code == 0
    assert trainer.global_step == 2  # the batch in flight finished, then fit stopped
    assert (tmp_path / "calls").read_text() == "requeue 9\n"
    assert (tmp_path / "backup" / "backup.pt").exists()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler is put back
