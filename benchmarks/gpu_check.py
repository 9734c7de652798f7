"""One-command GPU check (issue 17): the device-generic torch paths on a GPU, against the CPU.

Part 1 needs torch only (the GPU image has no fbgemm or torchrec): the PQ pooled lookup and its
backward (the per-subspace ``embedding_bag`` path every non-CPU tensor takes), PQ encoding,
weighted k-means and AFM's PCA (moments and eigenbasis), each run on ``--device`` and compared
with the same computation on the CPU (the C++ kernels where built), with the device's median
time.  Part 2, where torchrec and fbgemm-gpu are installed: the low-rank collection (packed
factor slots included) and the PQ collection on the device against the CPU, then DLRM trained,
compressed (AFM, and AFM then MEC) and fine-tuned on every local GPU over nccl
(``torch.distributed.run`` of ``examples.dlrm.main``), its RESULT lines printed.

    python benchmarks/gpu_check.py                    # cuda; part 2 when torchrec is installed
    python benchmarks/gpu_check.py --device cpu --quick --skip-dlrm   # the same checks on CPU

One line per check (``name  max_error  limit  device_ms  PASS|FAIL``); exit status 1 if any
check failed.  ``--json PATH`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics as stats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchrec_compress.methods.lowrank.factors import afm_basis  # noqa: E402
from torchrec_compress.methods.pq.lookup import pq_pooled_lookup  # noqa: E402
from torchrec_compress.methods.pq.quantizer import ProductQuantizer, decode  # noqa: E402
from torchrec_compress.moments import moments_from_counts  # noqa: E402

CPU = torch.device("cpu")


@dataclass
class Check:
    name: str
    max_error: float
    limit: float
    device_ms: float | None
    passed: bool
    note: str = ""


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` on ``device`` (synchronised), after one warm-up call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return stats.median(times)


def _bags(rows: int, bags: int, pooling: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    lengths = torch.randint(0, 2 * pooling + 1, (bags,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.randint(rows, (int(offsets[-1]),), generator=gen)
    return ids, offsets


def check_pq_lookup(device: torch.device, quick: bool, repeats: int) -> list[Check]:
    """Forward and codebook / weight gradients of the pooled lookup vs a float64 CPU reference
    (the decoded table through ``embedding_bag``)."""
    rows, bags, pooling = (20_000, 256, 20) if quick else (1_000_000, 4096, 20)
    m, k, dsub = 16, 256, 8
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(k, (rows, m), generator=gen).to(torch.uint8)
    books = torch.randn(m, k, dsub, generator=gen)
    ids, offsets = _bags(rows, bags, pooling, gen)
    weights = torch.rand(ids.numel(), generator=gen)
    upstream = torch.randn(bags, m * dsub, generator=gen)
    checks = []
    for weighted in (False, True):
        ref_books = books.double().clone().requires_grad_()
        ref_w = weights.double().clone().requires_grad_() if weighted else None
        ref = F.embedding_bag(
            ids, decode(codes, ref_books), offsets, mode="sum", include_last_offset=True,
            per_sample_weights=ref_w,
        )  # fmt: skip
        (ref * upstream.double()).sum().backward()
        dev_books = books.to(device, copy=True).requires_grad_()
        dev_w = weights.to(device, copy=True).requires_grad_() if weighted else None
        args = (codes.to(device), dev_books, ids.to(device), offsets.to(device), dev_w)
        out = pq_pooled_lookup(*args)
        (out * upstream.to(device)).sum().backward()
        errors = {
            "forward": (out.double().cpu() - ref).abs().max(),
            "codebook_grad": (dev_books.grad.double().cpu() - ref_books.grad).abs().max(),
        }
        if weighted:
            assert dev_w is not None and dev_w.grad is not None and ref_w is not None
            errors["weight_grad"] = (dev_w.grad.double().cpu() - ref_w.grad).abs().max().detach()
        scale = float(ref.detach().abs().max())
        ms = _timed(lambda args=args: pq_pooled_lookup(*args), device, repeats)
        for what, error in errors.items():
            error = error.detach()
            limit = 1e-5 * max(1.0, scale)
            checks.append(
                Check(
                    f"pq_lookup_{what}{'_weighted' if weighted else ''}",
                    float(error),
                    limit,
                    ms if what == "forward" else None,
                    float(error) <= limit,
                    f"{rows} rows, M={m}, K={k}, {ids.numel()} ids in {bags} bags",
                )
            )
    return checks


def check_encoding(device: torch.device, quick: bool, repeats: int) -> list[Check]:
    """Codes of rows near known codewords: the device must find exactly the CPU's codes."""
    rows = 20_000 if quick else 500_000
    gen = torch.Generator().manual_seed(1)
    pq = ProductQuantizer(128, 16, 256)
    pq.codebooks = torch.randn(16, 256, 8, generator=gen)
    want = torch.randint(256, (rows, 16), generator=gen)
    x = decode(want, pq.codebooks) + 1e-3 * torch.randn(rows, 128, generator=gen)
    cpu_codes = pq.compute_codes(x)
    on_device = ProductQuantizer(128, 16, 256)
    on_device.codebooks = pq.codebooks.to(device)
    x_device = x.to(device)
    codes = on_device.compute_codes(x_device, chunk_size=4096)
    mismatched = float((codes.cpu().long() != cpu_codes.long()).any(1).float().mean())
    ms = _timed(lambda: on_device.compute_codes(x_device, chunk_size=4096), device, repeats)
    return [Check("pq_encode", mismatched, 0.0, ms, mismatched == 0.0, f"{rows} x 128, M=16")]


def check_kmeans(device: torch.device, quick: bool, repeats: int) -> list[Check]:
    """Weighted k-means from the same seed on the device and the CPU: the reconstruction MSEs
    (float32 sums in another order may move a few boundary rows)."""
    rows, niter = (20_000, 5) if quick else (200_000, 10)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, 64, generator=gen)
    weights = torch.rand(rows, generator=gen) + 0.1
    mses = []
    for where in (CPU, device):
        pq = ProductQuantizer(64, 8, 256)
        pq.train(
            x.to(where), weights.to(where), niter=niter, generator=torch.Generator().manual_seed(3)
        )
        recon = pq.decode(pq.compute_codes(x.to(where)))
        mses.append(float((recon.cpu() - x).pow(2).mean()))
    error = abs(mses[1] - mses[0]) / mses[0]
    pq = ProductQuantizer(64, 8, 256)

    def train() -> None:
        pq.train(
            x.to(device),
            weights.to(device),
            niter=niter,
            generator=torch.Generator().manual_seed(3),
        )

    ms = _timed(train, device, max(1, repeats // 5))
    note = f"MSE cpu {mses[0]:.6f}, {device.type} {mses[1]:.6f}; {rows} x 64, M=8, K=256"
    return [Check("kmeans_relative_mse_gap", error, 0.02, ms, error <= 0.02, note)]


def check_pca(device: torch.device, quick: bool, repeats: int) -> list[Check]:
    """AFM's lookup-weighted moments and principal basis, float64, on the device vs the CPU."""
    rows = 50_000 if quick else 1_000_000
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(rows, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    counts = torch.randint(0, 50, (rows,), generator=gen).double()
    results = []
    for where in (CPU, device):
        moments = moments_from_counts(weight.to(where), counts.to(where))
        results.append(afm_basis(moments, "t"))
    eig = (results[1].eigenvalues.cpu() - results[0].eigenvalues).abs().max()
    limit = 1e-9 * float(results[0].eigenvalues.abs().max())
    w, c = weight.to(device), counts.to(device)
    ms = _timed(lambda: afm_basis(moments_from_counts(w, c), "t"), device, repeats)
    return [
        Check("afm_pca_eigenvalues", float(eig), limit, ms, float(eig) <= limit, f"{rows} x 64")
    ]


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_modules(device: torch.device) -> list[Check]:
    """The low-rank collection (packed slots: ranks 2 and 6) and the PQ collection, forward on
    the device vs the CPU (needs torchrec)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

    from torchrec_compress import PQConfig, SVDConfig, compress_

    gen = torch.Generator().manual_seed(5)
    tables = [
        EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=16, num_embeddings=500, feature_names=[f"f{i}"]
        )
        for i in range(3)
    ]
    lengths = torch.randint(0, 5, (3 * 32,), generator=gen)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f1", "f2"], torch.randint(500, (int(lengths.sum()),), generator=gen), lengths
    )
    checks = []
    configs = {
        "lowrank_packed": SVDConfig(rank=2),  # an explicit rank 2 is stored packed
        "pq": PQConfig(num_subspaces=4, num_centroids=16),
    }
    for name, config in configs.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(EmbeddingBagCollection(tables))
        compress_(model, config, calibration=[kjt])
        with torch.no_grad():
            ref = model[0](kjt).values()
            out = model.to(device)[0](kjt.to(device)).values().cpu()
        error = float((out - ref).abs().max())
        checks.append(Check(f"module_{name}", error, 1e-5, None, error <= 1e-5))
    return checks


def run_dlrm(out_dir: str, quick: bool) -> list[Check]:
    """DLRM over nccl on every local GPU: train, compress, fine-tune (examples.dlrm.main)."""
    gpus = torch.cuda.device_count()
    checks = []
    for method in ("afm", "afm+mec"):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={gpus}", "-m", "examples.dlrm.main", "--dataset", "synthetic",
            "--epochs", "1" if quick else "2", "--compress", method, "--budget-ratio", "4",
            "--finetune-epochs", "1", "--out", os.path.join(out_dir, method.replace("+", "_")),
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3000)
        seconds = time.perf_counter() - start
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
        print("\n".join(result) or proc.stderr[-3000:])
        note = f"{gpus} GPUs, nccl, {seconds:.0f} s" + (f"; {result[-1]}" if result else "")
        checks.append(
            Check(f"dlrm_{method}", float(proc.returncode), 0.0, None, proc.returncode == 0, note)
        )
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds on a CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-dlrm", action="store_true")
    parser.add_argument("--json", help="also write the checks here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --device cpu to run the same checks on the CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}")
    checks: list[Check] = []
    for check in (check_pq_lookup, check_encoding, check_kmeans, check_pca):
        checks += check(device, args.quick, args.repeats)
    if _has("torchrec") and _has("fbgemm_gpu"):
        checks += check_modules(device)
        if device.type == "cuda" and not args.skip_dlrm:
            with tempfile.TemporaryDirectory() as out:
                checks += run_dlrm(out, args.quick)
    else:
        print("torchrec / fbgemm-gpu not installed: module and DLRM checks skipped")
    for c in checks:
        ms = f"{c.device_ms:9.3f} ms" if c.device_ms is not None else " " * 12
        verdict = "PASS" if c.passed else "FAIL"
        print(f"{c.name:34s} {c.max_error:11.3e} <= {c.limit:9.2e} {ms} {verdict}  {c.note}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(c) for c in checks], indent=1))
    sys.exit(0 if all(c.passed for c in checks) else 1)


if __name__ == "__main__":
    main()
