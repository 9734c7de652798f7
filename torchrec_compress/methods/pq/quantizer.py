"""A product quantizer in FAISS's vocabulary, in pure (vectorised, batched) torch.

``ProductQuantizer(d, M, ksub)`` splits a ``d``-dim vector into ``M`` sub-vectors of ``dsub = d / M``
dims; sub-quantizer ``m`` owns ``ksub`` centroids (``codebooks[m]``, shape ``[ksub, dsub]``) and a
vector is stored as the ``M`` indices of its nearest centroids.  All ``M`` sub-quantizers are
handled at once with batched matmuls on ``[M, ., dsub]`` tensors; encoding streams rows in chunks.
"""

import torch
from torch import Tensor

from torchrec_compress.methods.pq import kernels as _ops


def code_dtype(ksub: int) -> torch.dtype:
    """Returns the narrowest integer dtype holding codes in ``[0, ksub)``.

    ``ksub <= 256`` gives ``uint8`` (one byte per subspace, the paper's setting), ``<= 2**15``
    ``int16``, ``<= 2**31`` ``int32``.

    Args:
        ksub (int): number of centroids per subspace.

    Example::

        >>> code_dtype(256), code_dtype(300)
        (torch.uint8, torch.int16)
    """
    if ksub <= 0 or ksub > 2**31:
        raise ValueError(f"ksub must be in [1, 2**31], got {ksub}")
    if ksub <= 256:
        return torch.uint8
    if ksub <= 2**15:
        return torch.int16
    return torch.int32


def assign(subvectors: Tensor, codebooks: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid per subspace: ``argmin_k ||x - c_k||^2`` for ``[M, n, dsub]`` inputs.

    The squared distance is expanded as ``||x||^2 - 2 x.c + ||c||^2`` so that the ``M`` searches
    are one batched matmul (``baddbmm``) instead of an ``[M, n, ksub, dsub]`` difference tensor.

    Args:
        subvectors (Tensor): ``[M, n, dsub]``.
        codebooks (Tensor): ``[M, ksub, dsub]``.

    Returns:
        Tuple[Tensor, Tensor]: ``codes`` ``[M, n]`` (int64) and their squared distances ``[M, n]``.

    Example::

        >>> books = torch.tensor([[[0.0], [1.0]]])
        >>> assign(torch.tensor([[[0.9], [0.2]]]), books)[0]
        tensor([[1, 0]])
    """
    centroid_norms = codebooks.pow(2).sum(-1).unsqueeze(1)  # [M, 1, ksub]
    distances = torch.baddbmm(centroid_norms, subvectors, codebooks.transpose(1, 2), alpha=-2.0)
    min_distances, codes = distances.min(dim=-1)
    # ||x||^2 is constant per row: leave it out of the argmin, add it back for the distances.
    return codes, (min_distances + subvectors.pow(2).sum(-1)).clamp_(min=0.0)


class ProductQuantizer:
    """Product quantizer with FAISS's fields: ``d``, ``M``, ``ksub``, ``dsub``, ``codebooks``.

    ``train`` runs (optionally weighted) k-means independently in every subspace, batched over
    subspaces; ``compute_codes`` encodes rows chunk by chunk (memory bounded by ``chunk_size``,
    independent of the number of rows); ``decode`` concatenates the selected centroids.

    Args:
        d (int): vector dimension.
        M (int): number of subspaces; must divide ``d``.
        ksub (int): centroids per subspace; codes are ``code_dtype(ksub)`` (``uint8`` up to 256).

    Example::

        >>> pq = ProductQuantizer(d=4, M=2, ksub=2)
        >>> x = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
        >>> pq.train(x, niter=5)
        >>> bool(torch.equal(pq.decode(pq.compute_codes(x)), x))
        True
    """

    def __init__(self, d: int, M: int, ksub: int = 256) -> None:
        if M <= 0 or d % M != 0:
            raise ValueError(f"M={M} must be a positive divisor of d={d}")
        self.d = d
        self.M = M
        self.ksub = ksub
        self.dsub: int = d // M
        self.code_dtype: torch.dtype = code_dtype(ksub)
        self.codebooks: Tensor = torch.zeros(M, ksub, self.dsub)

    def _split(self, x: Tensor) -> Tensor:
        """``[n, d]`` -> ``[M, n, dsub]``."""
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected rows of shape [n, {self.d}], got {list(x.shape)}")
        return x.view(x.shape[0], self.M, self.dsub).transpose(0, 1)

    def train(
        self,
        x: Tensor,
        weights: Tensor | None = None,
        niter: int = 20,
        generator: torch.Generator | None = None,
        chunk_size: int = 1024,
    ) -> None:
        """Weighted k-means (Lloyd) per subspace, all subspaces at once.

        Centroids start at ``ksub`` distinct rows drawn with probability proportional to
        ``weights``; a centroid that loses all its rows is re-seeded at a row drawn the same way,
        so no codeword is wasted.

        Args:
            x (Tensor): ``[n, d]`` training rows, ``n >= 1``.
            weights (Optional[Tensor]): ``[n]`` non-negative row weights (default: all 1).
            niter (int): Lloyd iterations.
            generator (Optional[torch.Generator]): source of randomness.
            chunk_size (int): rows assigned at once (bounds the ``[M, chunk, ksub]`` distances).
        """
        x = x.detach().float()
        n, device = x.shape[0], x.device
        w = torch.ones(n, device=device) if weights is None else weights.detach().float().clone()
        w = w.to(device)
        if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be [n={n}] non-negative with a positive sum")
        sub = self._split(x)
        # Draws with replacement only when there are fewer rows than centroids.
        seed_rows = _draw(w, self.ksub, n < self.ksub, generator)
        books = sub[:, seed_rows].clone()
        for _ in range(niter):
            codes = self._assign_chunked(sub, books, chunk_size)  # [M, n]
            flat = (codes + torch.arange(self.M, device=device).unsqueeze(1) * self.ksub).reshape(
                -1
            )
            mass = torch.zeros(self.M * self.ksub, device=device).index_add_(
                0, flat, w.repeat(self.M)
            )
            sums = torch.zeros(self.M * self.ksub, self.dsub, device=device).index_add_(
                0, flat, (sub * w.view(1, n, 1)).reshape(-1, self.dsub)
            )
            empty = mass == 0
            books = (sums / mass.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)).view(
                self.M, self.ksub, self.dsub
            )
            if bool(empty.any()):
                empty_at = empty.nonzero().squeeze(1)
                rows = _draw(w, empty_at.numel(), True, generator)
                books.view(-1, self.dsub)[empty_at] = sub[empty_at // self.ksub, rows]
        self.codebooks = books.contiguous()

    def _assign_chunked(self, sub: Tensor, books: Tensor, chunk_size: int) -> Tensor:
        # Written into one preallocated tensor: small per-chunk results kept alive between the
        # chunks' large distance buffers would fragment the heap (glibc then holds on to
        # hundreds of MB of freed distances).
        codes = torch.empty(sub.shape[:2], dtype=torch.long, device=sub.device)
        for start in range(0, sub.shape[1], chunk_size):
            part = sub[:, start : start + chunk_size]
            codes[:, start : start + part.shape[1]] = assign(part, books)[0]
        return codes

    def compute_codes(self, x: Tensor, chunk_size: int = 1024) -> Tensor:
        """Encodes rows: the nearest centroid per subspace, ``chunk_size`` rows at a time.

        Args:
            x (Tensor): ``[n, d]`` rows.
            chunk_size (int): rows per chunk; peak extra memory is ``~M * chunk_size * ksub``
                floats whatever ``n`` is.

        Returns:
            Tensor: ``[n, M]`` codes of dtype ``self.code_dtype``.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self._split(x[:0])  # validates the shape before any work
        books = self.codebooks.float().to(x.device)
        use_kernel = _ops.encode_kernel_applies(x, books, self.code_dtype)
        if use_kernel and x.dtype == torch.float32 and x.stride(1) == 1:
            # The fused C++ encoder needs no scratch memory: one call, threaded over all rows.
            return torch.ops.torchrec_compress.pq_encode(x.detach(), books, self.code_dtype)
        codes = torch.empty(x.shape[0], self.M, dtype=self.code_dtype, device=x.device)
        for start in range(0, x.shape[0], chunk_size):
            part = x[start : start + chunk_size].detach().float()
            codes[start : start + part.shape[0]] = (
                torch.ops.torchrec_compress.pq_encode(part.contiguous(), books, self.code_dtype)
                if use_kernel
                else assign(self._split(part), books)[0].t()
            )
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        """Rows from codes: the concatenation over subspaces of ``codebooks[m][codes[:, m]]``.

        Args:
            codes (Tensor): ``[n, M]`` integer codes.

        Returns:
            Tensor: ``[n, d]`` float rows.
        """
        return decode(codes, self.codebooks)


def _draw(
    weights: Tensor, count: int, replacement: bool, generator: torch.Generator | None
) -> Tensor:
    """``count`` row ids drawn with probability ``∝ weights``, on the weights' device.

    The draw itself runs where ``generator`` lives (the CPU's by default), so one seed gives the
    same rows whatever device the rows are on."""
    where = generator.device if generator is not None else torch.device("cpu")
    rows = torch.multinomial(weights.to(where), count, replacement=replacement, generator=generator)
    return rows.to(weights.device)


def decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """``[n, M]`` codes and ``[M, ksub, dsub]`` codebooks -> ``[n, M * dsub]`` rows.

    Differentiable in ``codebooks``; one flat gather with the codes offset by ``m * ksub``.

    Args:
        codes (Tensor): ``[n, M]`` integer codes.
        codebooks (Tensor): ``[M, ksub, dsub]``.

    Example::

        >>> decode(torch.tensor([[1, 0]]), torch.arange(4.0).view(2, 2, 1))
        tensor([[1., 2.]])
    """
    num_subspaces, ksub, dsub = codebooks.shape
    if codes.dim() != 2 or codes.shape[1] != num_subspaces:
        raise ValueError(f"codes must be [n, {num_subspaces}], got {list(codes.shape)}")
    flat = codes.long() + torch.arange(num_subspaces, device=codes.device) * ksub
    return codebooks.reshape(-1, dsub)[flat].reshape(codes.shape[0], num_subspaces * dsub)


def balanced_subspaces(variances: Tensor, num_subspaces: int) -> Tensor:
    """A column order that spreads variance evenly over the ``M`` subspaces (OPQ's allocation).

    Product quantization cuts a row into ``M`` contiguous blocks and gives each block the same
    ``K`` codewords.  When column variances are very unequal (principal components, e.g. the
    factor tables of a :class:`~torchrec_compress.LowRankEmbeddingBagCollection`), the
    block holding the leading components would carry most of the error.  Greedy eigenvalue
    allocation (Ge et al., "Optimized Product Quantization", 2013): columns in decreasing
    variance, each one to the block with room whose product of variances is smallest, so the
    per-block products, which set the quantization error at fixed ``K``, end up balanced.

    Args:
        variances (Tensor): ``[d]`` per-column variances (non-negative).
        num_subspaces (int): ``M``; must divide ``d``.

    Returns:
        Tensor: ``[d]`` int64 permutation ``order``; block ``m`` is ``x[:, order][:, m*dsub:(m+1)*dsub]``.

    Example::

        >>> balanced_subspaces(torch.tensor([8.0, 4.0, 2.0, 1.0]), 2).tolist()
        [0, 3, 1, 2]
    """
    dim = variances.numel()
    if num_subspaces <= 0 or dim % num_subspaces:
        raise ValueError(f"num_subspaces must divide {dim}, got {num_subspaces}")
    dsub = dim // num_subspaces
    floor = float(variances.max().clamp(min=1e-30)) * 1e-12  # log(0) would tie every empty block
    # Relative to the smallest: every column then grows a block's product, and the allocation is
    # unchanged by rescaling all variances.
    log_var = variances.double().clamp(min=floor).log()
    log_var -= log_var.min()
    blocks: list[list[int]] = [[] for _ in range(num_subspaces)]
    products = [0.0] * num_subspaces
    for column in torch.argsort(variances, descending=True, stable=True).tolist():
        open_blocks = [m for m in range(num_subspaces) if len(blocks[m]) < dsub]
        # an empty block has no product yet: fill every block once before doubling up
        target = min(open_blocks, key=lambda m: (len(blocks[m]) > 0, products[m]))
        blocks[target].append(column)
        products[target] += float(log_var[column])
    return torch.tensor([c for block in blocks for c in block], dtype=torch.int64)
