"""The device-generic torch paths (issue 17): chosen for every tensor the C++ kernels do not
take, and ``benchmarks/gpu_check.py`` runs them where only torch is installed (the GPU image
has no torchrec or fbgemm).  The kernels themselves are checked against these paths on CPU in
``tests/pq/test_ops.py`` (lookup and its backward, encoding, low-rank lookup: <= 1e-6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchrec_compress.methods.pq import ProductQuantizer
from torchrec_compress.methods.pq import kernels as pq_kernels

ROOT = Path(__file__).resolve().parents[1]

BLOCK = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('torchrec', 'fbgemm_gpu'):
            raise ImportError('not installed here: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['gpu_check.py', '--device', 'cpu', '--quick', '--repeats', '1']
runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')
"""


def test_kernels_decline_tensors_off_the_cpu() -> None:
    """Any tensor not on the CPU (CUDA, or here meta) takes the torch path."""
    meta = torch.device("meta")
    codes = torch.zeros(10, 2, dtype=torch.uint8, device=meta)
    books = torch.zeros(2, 4, 2, device=meta)
    ids, offsets = torch.zeros(3, dtype=torch.long), torch.tensor([0, 3])
    assert not pq_kernels.lookup_kernel_applies(codes, books, ids, offsets, None)
    assert not pq_kernels.encode_kernel_applies(torch.zeros(3, 4, device=meta), books, torch.uint8)


def test_kmeans_torch_path_matches_the_kernel_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """k-means assigns with the fused encoder on the CPU and with batched matmuls elsewhere:
    from the same seed both reach the same codebooks (up to rows at near-ties)."""
    gen = torch.Generator().manual_seed(0)
    x, weights = torch.randn(3000, 16, generator=gen), torch.rand(3000, generator=gen) + 0.1
    runs = []
    for kernels in (True, False):
        monkeypatch.setattr(pq_kernels, "HAS_KERNELS", kernels)
        pq = ProductQuantizer(16, 4, 32)
        pq.train(x, weights, generator=torch.Generator().manual_seed(1), chunk_size=500)
        runs.append(pq)
    kernel, torch_path = runs
    assert abs(len(kernel.iteration_errors) - len(torch_path.iteration_errors)) <= 2
    gap = abs(kernel.iteration_errors[-1] - torch_path.iteration_errors[-1])
    assert gap <= 1e-3 * kernel.iteration_errors[-1]


def test_gpu_check_runs_with_torch_alone() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [
        line
        for line in proc.stdout.splitlines()
        if line.endswith(("PASS", "FAIL")) or " PASS " in line
    ]
    names = {line.split()[0] for line in lines}
    assert {
        "pq_lookup_forward",
        "pq_encode",
        "kmeans_relative_mse_gap",
        "afm_pca_eigenvalues",
    } <= names
    assert all(" PASS" in line for line in lines), lines
    assert "torchrec / fbgemm-gpu not installed" in proc.stdout
