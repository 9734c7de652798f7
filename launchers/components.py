"""torchx components for torchrec-compress jobs.

The components are scheduler-agnostic: the scheduler is chosen at launch time, e.g.

    torchx run -s local_cwd launchers/components.py:train -j 1x2 -- --dataset synthetic --epochs 1
    torchx run --dryrun -s slurm launchers/components.py:train -j 4x8 --gpu 8 -- --dataset criteo ...
    torchx run --dryrun -s kubernetes -cfg queue=default,namespace=recsys \
        launchers/components.py:train --image ghcr.io/you/torchrec-compress:latest -j 2x8 --gpu 8 -- ...

(``local_cwd`` needs the virtual environment's ``bin/`` on ``PATH`` so that ``torchrun`` is found.)
"""

from typing import Dict, Optional

import torchx
import torchx.specs as specs
from torchx.components.dist import ddp


def train(
    *script_args: str,
    j: str = "1x2",
    image: str = torchx.IMAGE,
    cpu: int = 1,
    gpu: int = 0,
    memMB: int = 4096,  # noqa: N803 - torchx's resource naming
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    name: str = "dlrm/train",
) -> specs.AppDef:
    """Train / compress / evaluate a DLRM with ``examples.dlrm.main`` on ``j`` = NODESxPROCS processes.

    Everything after ``--`` goes to ``examples.dlrm.main`` (see its ``--help``).

    Args:
        script_args: arguments of ``python -m examples.dlrm.main``
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2`` (two processes on this host) or ``8x8``
        image: container image (``local_cwd`` ignores it and runs in the current directory)
        cpu: CPUs per replica
        gpu: GPUs per replica (nccl when > 0, gloo otherwise)
        memMB: memory per replica in MB
        h: named resource (overrides cpu/gpu/memMB), e.g. an AWS instance type
        env: extra environment variables, e.g. ``OMP_NUM_THREADS=1``
        max_retries: scheduler-level retries of the whole job
        name: job name
    """
    return ddp(
        *script_args,
        m="examples.dlrm.main",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
    )
