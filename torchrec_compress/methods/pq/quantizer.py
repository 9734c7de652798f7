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
        # What the last ``train`` did: the weighted squared error after each iteration.
        self.iteration_errors: list[float] = []

    def _split(self, x: Tensor) -> Tensor:
        """``[n, d]`` -> ``[M, n, dsub]``."""
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected rows of shape [n, {self.d}], got {list(x.shape)}")
        return x.view(x.shape[0], self.M, self.dsub).transpose(0, 1)

    def train(
        self,
        x: Tensor,
        weights: Tensor | None = None,
        niter: int = 50,
        generator: torch.Generator | None = None,
        chunk_size: int = 1024,
        tol: float = 1e-3,
    ) -> None:
        """Weighted k-means (Lloyd) per subspace, all subspaces at once, until it converges.

        Centroids start by weighted k-means++ seeding (:func:`kmeans_plus_plus`); each
        iteration assigns every row to its nearest centroids (the fused C++ encoder on the CPU,
        batched matmuls elsewhere) and moves every centroid to the weighted mean of its rows.
        It stops after ``niter`` iterations, or earlier once an iteration lowers the weighted
        squared error by less than ``tol`` times that error (or changes no code).  A centroid
        that loses all its rows is re-seeded at a row drawn with probability ``∝ weights``, so
        no codeword is wasted.

        Args:
            x (Tensor): ``[n, d]`` training rows, ``n >= 1``.
            weights (Optional[Tensor]): ``[n]`` non-negative row weights (default: all 1).
            niter (int): at most this many Lloyd iterations.
            generator (Optional[torch.Generator]): source of randomness.
            chunk_size (int): rows assigned at once off the C++ encoder (bounds the
                ``[M, chunk, ksub]`` distances).
            tol (float): relative decrease of the weighted squared error below which the
                iterations stop; 0 stops only when no code changes.

        Example::

            >>> x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
            >>> pq = ProductQuantizer(d=4, M=2, ksub=4)
            >>> pq.train(x, niter=50, tol=1e-6)
            >>> len(pq.iteration_errors) <= 50 and pq.iteration_errors[-1] <= pq.iteration_errors[0]
            True
        """
        if niter < 0 or tol < 0:
            raise ValueError(f"niter and tol must be >= 0, got niter={niter}, tol={tol}")
        x = x.detach().float().contiguous()
        n, device = x.shape[0], x.device
        w = torch.ones(n, device=device) if weights is None else weights.detach().float()
        w = w.to(device)
        if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be [n={n}] non-negative with a positive sum")
        books = kmeans_plus_plus(self._split(x), w, self.ksub, generator)
        lloyd = _Lloyd(x, w, self.M, self.ksub, chunk_size)
        self.iteration_errors = []
        previous: Tensor | None = None
        for _ in range(niter):
            codes = lloyd.assign(books, self.code_dtype)
            books, error = lloyd.update(codes, generator)
            converged = bool(self.iteration_errors) and (
                self.iteration_errors[-1] - error <= tol * error
            )
            self.iteration_errors.append(error)
            if converged or (previous is not None and torch.equal(codes, previous)):
                break
            previous = codes
        self.codebooks = books.contiguous()

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


# k-means++ seeds from at most this many rows per centroid (drawn ∝ weights): the seeding is
# K sequential steps, and more candidates barely change where the seeds land.
_SEEDING_ROWS_PER_CENTROID = 16


def kmeans_plus_plus(
    subvectors: Tensor, weights: Tensor, ksub: int, generator: torch.Generator | None
) -> Tensor:
    """Weighted k-means++ seeds in every subspace (Arthur & Vassilvitskii, 2007), batched.

    The first seed is a row drawn ``∝ weights``; each next one a row drawn ``∝ weights *
    D^2``, ``D`` its distance to the nearest seed so far, so a cluster that already holds a
    seed is seldom seeded again (never, when its rows coincide: a table made of ``K``
    codewords gets one seed on each).  Once every distinct row holds a seed (fewer distinct
    rows than ``ksub``), the rest are drawn ``∝ weights``.  Above
    ``16 * ksub`` rows, seeds are drawn among ``16 * ksub`` rows sampled ``∝ weights``.
    The uniform draws come from ``generator``'s device: one seed, the same seeds on any device.

    Args:
        subvectors (Tensor): ``[M, n, dsub]`` rows.
        weights (Tensor): ``[n]`` non-negative weights with a positive sum.
        ksub (int): seeds per subspace.
        generator (Optional[torch.Generator]): source of randomness.

    Returns:
        Tensor: ``[M, ksub, dsub]`` seeds, each one of the rows.

    Example::

        >>> rows = torch.tensor([[[0.0], [0.0], [0.0], [5.0]]])
        >>> sorted(kmeans_plus_plus(rows, torch.ones(4), 2, None).flatten().tolist())
        [0.0, 5.0]
    """
    num_subspaces, num_rows, dsub = subvectors.shape
    device = subvectors.device
    candidates, weight = subvectors, weights.float()
    if num_rows > _SEEDING_ROWS_PER_CENTROID * ksub:
        picked = _draw(weights, _SEEDING_ROWS_PER_CENTROID * ksub, True, generator)
        candidates = subvectors[:, picked]
        weight = torch.ones(picked.numel(), device=device)
    last = candidates.shape[1] - 1
    where = generator.device if generator is not None else torch.device("cpu")
    uniform = torch.rand(ksub, num_subspaces, 1, generator=generator, device=where).to(device)
    weight_cdf = weight.cumsum(0).expand(num_subspaces, -1)
    subspace = torch.arange(num_subspaces, device=device)
    seeds = torch.empty(num_subspaces, ksub, dsub, device=device)
    nearest = torch.full((num_subspaces, last + 1), float("inf"), device=device)
    for k in range(ksub):
        cdf = weight_cdf if k == 0 else (nearest * weight).cumsum(1)
        # every distinct row holds a seed: the remaining seeds follow the weights
        cdf = torch.where(cdf[:, -1:] > 0, cdf, weight_cdf)
        pick = torch.searchsorted(cdf, uniform[k] * cdf[:, -1:], right=True).clamp_(max=last)
        chosen = candidates[subspace, pick.squeeze(1)]  # [M, dsub]
        seeds[:, k] = chosen
        torch.minimum(nearest, (candidates - chosen.unsqueeze(1)).pow_(2).sum(2), out=nearest)
    return seeds


class _Lloyd:
    """What one weighted k-means run keeps across its iterations: the rows, their weighted
    ``[n * M, dsub]`` sub-vectors in float64 with the weight as a last column (one
    ``index_add_`` then gives every centroid's weighted sum and mass, exact for a table made of
    codewords), the subspaces' code offsets and the rows' weighted energy.  Every tensor lives
    on the rows' device."""

    def __init__(self, x: Tensor, weights: Tensor, num_subspaces: int, ksub: int, chunk: int):
        n, d = x.shape
        self.x, self.weights, self.ksub, self.chunk = x, weights, ksub, chunk
        self.dsub = d // num_subspaces
        # Filled in place: no second [n * M, dsub] float64 copy (the old loop's peak, not more).
        self.weighted = x.new_empty(n * num_subspaces, self.dsub + 1, dtype=torch.float64)
        self.weighted[:, -1] = weights.double().repeat_interleave(num_subspaces)
        torch.mul(x.view(-1, self.dsub), self.weighted[:, -1:], out=self.weighted[:, :-1])
        # sum_i w_i ||x_i||^2, exact products in float64, a block at a time
        self.energy = sum(
            float(block.double().pow(2).sum(1) @ part.double())
            for block, part in zip(x.split(1 << 16), weights.split(1 << 16), strict=True)
        )
        self.offsets = torch.arange(num_subspaces, device=x.device) * ksub
        self.totals = self.weighted.new_empty(num_subspaces * ksub, self.dsub + 1)

    def assign(self, books: Tensor, dtype: torch.dtype) -> Tensor:
        """``[n, M]`` nearest codes: the fused C++ encoder where it applies, else chunks of
        :func:`assign` (batched matmuls, any device)."""
        if _ops.encode_kernel_applies(self.x, books, dtype):
            return torch.ops.torchrec_compress.pq_encode(self.x, books, dtype)
        n, num_subspaces = self.x.shape[0], books.shape[0]
        sub = self.x.view(n, num_subspaces, self.dsub).transpose(0, 1)
        # One preallocated result: small per-chunk tensors kept alive between the chunks'
        # large distance buffers would fragment the heap.
        codes = torch.empty(n, num_subspaces, dtype=torch.long, device=self.x.device)
        for start in range(0, n, self.chunk):
            part = sub[:, start : start + self.chunk]
            codes[start : start + part.shape[1]] = assign(part, books)[0].t()
        return codes

    def update(self, codes: Tensor, generator: torch.Generator | None) -> tuple[Tensor, float]:
        """Centroids at the weighted means of their rows (empty ones re-seeded at rows drawn
        ``∝ weights``) and the weighted squared error of ``codes`` with those means,
        ``sum_i w_i ||x_i||^2 - sum_k ||S_k||^2 / W_k`` (float64)."""
        flat = (codes.long() + self.offsets).view(-1)
        self.totals.zero_().index_add_(0, flat, self.weighted)
        sums, mass = self.totals[:, :-1], self.totals[:, -1:]
        means = sums / mass.clamp(min=torch.finfo(torch.float64).tiny)
        error = self.energy - float((sums * means).sum())
        books = means.float()
        empty_at = (mass.squeeze(1) == 0).nonzero().squeeze(1)
        if empty_at.numel():
            rows = _draw(self.weights, empty_at.numel(), True, generator)
            subvectors = self.x.view(self.x.shape[0], -1, self.dsub)
            books[empty_at] = subvectors[rows, empty_at // self.ksub]
        return books.view(-1, self.ksub, self.dsub), max(error, 0.0)


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
