"""Factorisation functions: AFM/SVD bases, sign convention, chunking and the variance identity."""

import torch

from torchrec_compress.methods.lowrank.factors import (
    afm_basis,
    factor_table,
    projection,
    svd_basis,
    table_moments,
)


def _table() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    weight = torch.randn(300, 4) @ torch.randn(4, 10) + torch.randn(10)
    counts = torch.randint(0, 20, (300,)).double()
    return weight, counts


def test_afm_reconstruction_error_equals_dropped_eigenvalues() -> None:
    weight, counts = _table()
    basis = afm_basis(table_moments(weight, counts, "t"), "table 't'")
    for k in (1, 3, 10):
        rebuilt = (
            factor_table(weight, basis, k).double() @ projection(basis, k).double() + basis.mean
        )
        err = ((weight.double() - rebuilt).pow(2).sum(1) * counts).sum() / counts.sum()
        torch.testing.assert_close(err, basis.eigenvalues[k:].sum(), rtol=1e-4, atol=1e-5)
    assert torch.all(basis.eigenvalues[:-1] >= basis.eigenvalues[1:])


def test_sign_convention_and_chunking() -> None:
    weight, counts = _table()
    basis = afm_basis(table_moments(weight, counts, "t"), "table 't'")
    vectors = basis.eigenvectors
    largest = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    assert torch.all(largest > 0)
    torch.testing.assert_close(
        factor_table(weight, basis, 3, chunk_rows=7), factor_table(weight, basis, 3)
    )


def test_svd_basis_matches_torch_svd() -> None:
    weight, _ = _table()
    basis = svd_basis(table_moments(weight, None, "t"), "table 't'")
    u, s, _ = torch.linalg.svd(weight.double(), full_matrices=False)
    factors = factor_table(weight, basis, 3).double()  # = U_k S_k up to column signs
    torch.testing.assert_close(factors.abs(), (u[:, :3] * s[:3]).abs(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(basis.eigenvalues[:3], s[:3] ** 2 / weight.shape[0])
    assert torch.count_nonzero(basis.mean) == 0
