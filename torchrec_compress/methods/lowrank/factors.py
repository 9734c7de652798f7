"""Low-rank factorisation of embedding tables and Linear layers: AFM and its SVD baseline.

Both methods reduce to one recipe, a principal basis ``(mu, eigenvalues, U)`` of d-dim vectors:

* AFM table: ``mu, C`` = frequency-weighted mean and covariance of the looked-up rows
  (:func:`afm_basis` of the table's :class:`~torchrec_compress.statistics.Moments`);
* SVD table: ``mu = 0``, ``C = E^T E / N`` (uniform, uncentred), whose eigenvectors are the right
  singular vectors of E, so ``A = E V_k = U_k S_k`` (:func:`svd_basis`); computed from chunked
  moments, so no N x d SVD is ever formed.

Then ``A = (E - mu) U_k`` (row chunks, :func:`factor_table`), ``B = U_k^T``.  Eigen-decompositions
run in float64; eigenvectors are sorted by descending eigenvalue and signed so that each one's
largest-magnitude component is positive (deterministic across runs and workers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from torchrec_compress.methods.lowrank.linear import LowRankLinear
from torchrec_compress.methods.lowrank.rank import explained_variance_ratio
from torchrec_compress.moments import DEFAULT_CHUNK_ROWS, Moments, moments_from_counts


@dataclass
class PrincipalBasis:
    """Principal directions of d-dim vectors.

    Args:
        mean (torch.Tensor): ``(d,)`` float64 centre (zeros for SVD).
        eigenvalues (torch.Tensor): ``(d,)`` float64, descending, clamped at 0.
        eigenvectors (torch.Tensor): ``(d, d)`` float64, column j for eigenvalue j.
    """

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor

    def explained_variance(self, rank: int) -> float:
        """Fraction of the variance that the top ``rank`` directions keep."""
        return float(explained_variance_ratio(self.eigenvalues)[rank - 1])


def _canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """+1/-1 per column so that each column's largest-magnitude component becomes positive."""
    largest = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors.gather(0, largest[None, :]).squeeze(0))
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def principal_basis(matrix: torch.Tensor, mean: torch.Tensor, name: str) -> PrincipalBasis:
    """Eigen-decomposition of a symmetric PSD ``matrix`` (float64), sorted and signed."""
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name}: covariance contains NaN or Inf")
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.to(torch.float64))
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    eigenvectors = eigenvectors * _canonical_signs(eigenvectors)
    return PrincipalBasis(mean.to(torch.float64), eigenvalues.clamp(min=0), eigenvectors)


def table_moments(
    weight: torch.Tensor,
    counts: torch.Tensor | None,
    name: str,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Moments:
    """AFM moments of one whole table; ``counts=None`` means uniform row weights (SVD).

    Zero-lookup fallback: when the calibration data never looks the table up (all counts 0),
    every row gets weight 1 (plain weight statistics, as if each row were looked up once)
    and a ``UserWarning`` names the table.  Sharded callers must apply the same rule to the
    globally summed counts.
    """
    if counts is not None and counts.sum() <= 0:
        warnings.warn(
            f"table {name!r} has no lookups in the calibration data; AFM falls back to "
            "uniform row weights for it",
            stacklevel=2,
        )
        counts = None
    if counts is None:
        counts = torch.ones(weight.shape[0], dtype=torch.float64, device=weight.device)
    moments = moments_from_counts(weight, counts, chunk_rows=chunk_rows, name=f"table {name!r}")
    moments.check_finite(f"table {name!r}")
    return moments


def afm_basis(moments: Moments, name: str) -> PrincipalBasis:
    """AFM basis: weighted mean and covariance of what the table/layer outputs."""
    moments.check_finite(name)
    if moments.count <= 0:
        raise ValueError(f"{name}: no calibration samples (total weight {moments.count.item()})")
    return principal_basis(moments.covariance(), moments.mean(), name)


def svd_basis(moments: Moments, name: str) -> PrincipalBasis:
    """SVD basis: uncentred second moment of uniformly weighted rows (mean 0)."""
    moments.check_finite(name)
    return principal_basis(moments.second_moment(), torch.zeros_like(moments.sum), name)


def factor_table(
    weight: torch.Tensor,
    basis: PrincipalBasis,
    rank: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A = (E - mu) U_k`` in row chunks, in ``weight``'s dtype (or ``out``'s).

    Also valid per row shard (rows are independent); for column blocks of E, the full A is
    the sum over blocks of ``(E_block - mu_block) U_k[block]``.

    Args:
        weight (torch.Tensor): ``(N, d)`` rows.
        basis (PrincipalBasis): the table's basis.
        rank (int): ``k``.
        chunk_rows (int): rows converted to float64 at a time.
        out (Optional[torch.Tensor]): ``(N, k)`` tensor to write into (e.g. the factor table
            of the new module, so that no second ``N x k`` copy is ever held).

    Returns:
        torch.Tensor: ``(N, k)`` factors (``out`` when given).

    Example::

        >>> basis = principal_basis(torch.diag(torch.tensor([2.0, 1.0])), torch.zeros(2), "t")
        >>> factor_table(torch.tensor([[3.0, 4.0]]), basis, rank=1).tolist()
        [[3.0]]
    """
    directions = basis.eigenvectors[:, :rank]
    if out is None:
        out = torch.empty(weight.shape[0], rank, dtype=weight.dtype, device=weight.device)
    elif out.shape != (weight.shape[0], rank):
        raise ValueError(
            f"out has shape {tuple(out.shape)}, expected {(weight.shape[0], rank)} (rows, rank)"
        )
    with torch.no_grad():  # ``out`` may be a parameter
        for start in range(0, weight.shape[0], chunk_rows):
            rows = weight[start : start + chunk_rows].detach().to(torch.float64)
            out[start : start + chunk_rows] = (rows - basis.mean) @ directions
    return out


def projection(basis: PrincipalBasis, rank: int) -> torch.Tensor:
    """``B = U_k^T`` as float32 ``(k, d)``."""
    return basis.eigenvectors[:, :rank].T.to(torch.float32)


def afm_linear(layer: nn.Linear, basis: PrincipalBasis, rank: int) -> LowRankLinear:
    """AFM factorisation of ``y = W x + b`` from the basis of its outputs (:func:`afm_basis`).

    ``down``: ``W1 = U_k^T W``, ``b1 = U_k^T (b - mu_y)``; ``up``: ``W2 = U_k``, ``b2 = mu_y``.
    Exact at ``rank == out_features``.
    """
    u = basis.eigenvectors[:, :rank]
    weight = layer.weight.detach().to(torch.float64)
    bias = (
        layer.bias.detach().to(torch.float64)
        if layer.bias is not None
        else torch.zeros(layer.out_features, dtype=torch.float64, device=weight.device)
    )
    out = LowRankLinear(layer.in_features, rank, layer.out_features, device=weight.device)
    with torch.no_grad():
        out.down.weight.copy_(u.T @ weight)
        out.down.bias.copy_(u.T @ (bias - basis.mean))
        out.up.weight.copy_(u)
        out.up.bias.copy_(basis.mean)
    return out


def svd_linear(layer: nn.Linear, rank: int) -> tuple[LowRankLinear, float]:
    """Truncated SVD of ``W``: ``down = S_k V_k^T`` (no bias), ``up = U_k`` with bias ``b``.

    Returns:
        tuple[LowRankLinear, float]: the layer and the kept fraction of ``sum sigma^2``.
    """
    weight = layer.weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    signs = _canonical_signs(u)
    u, vh = u * signs, vh * signs[:, None]
    has_bias = layer.bias is not None
    out = LowRankLinear(
        layer.in_features, rank, layer.out_features, bias=has_bias, device=weight.device
    )
    with torch.no_grad():
        out.down.weight.copy_(s[:rank, None] * vh[:rank])
        out.up.weight.copy_(u[:, :rank])
        if has_bias:
            out.down.bias.zero_()
            out.up.bias.copy_(layer.bias.detach())
    return out, float(explained_variance_ratio(s**2)[rank - 1])
