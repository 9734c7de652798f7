"""The torchx component renders for the schedulers users need (dry runs: nothing is submitted)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ["--", "--dataset", "criteo", "--data-path", "/data/criteo", "--compress", "afm"]


def _dryrun(scheduler_args: list) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchx.cli.main",
            "run",
            "--workspace",
            "",
            "--dryrun",
            *scheduler_args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_slurm_dryrun_runs_torchrun_on_every_node() -> None:
    out = _dryrun(
        ["-s", "slurm", "launchers/components.py:train", "-j", "4x8", "--gpu", "8", *SCRIPT]
    )
    # The application printout names torchrun once, then each of the 4 srun steps runs it.
    assert out.count("torchrun") == 5 and "--nnodes 4 --nproc_per_node 8" in out
    assert "-m examples.dlrm.main --dataset criteo" in out


@pytest.mark.parametrize("queue", ["default"])
def test_kubernetes_dryrun_renders_a_volcano_job(queue: str) -> None:
    out = _dryrun(
        [
            "-s",
            "kubernetes",
            "-cfg",
            f"queue={queue}",
            "launchers/components.py:train",
            "--image",
            "example.org/torchrec-compress:1",
            "-j",
            "2x8",
            "--gpu",
            "8",
            *SCRIPT,
        ]
    )
    assert "kind: Job" in out and f"queue: {queue}" in out
    assert "nvidia.com/gpu: '8'" in out
    assert "--nnodes 2 --nproc_per_node 8" in out
