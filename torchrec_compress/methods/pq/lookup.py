"""The PQ pooled lookup, on any device: the C++ kernel where it applies (CPU, float32), else
one ``embedding_bag`` over the stacked codewords (every device: CUDA, bf16, fp16).  Pure torch.

A pooled lookup of one feature is a single ``embedding_bag`` over the ``M * K`` stacked codewords
(``[M * K, dsub]``) with ``B * M`` bags laid out subspace-major ``(m, b)``: the flat indices are
``codes[ids, m] + m * K``, bag ``(m, b)`` holds the ids of bag ``b`` and the result
``[M, B, dsub]`` is one transpose away from ``[B, d]``.  Its backward is ``embedding_bag``'s.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from torchrec_compress.methods.pq import kernels as _ops


def pq_pooled_lookup(
    codes: Tensor,
    codebooks: Tensor,
    ids: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
) -> Tensor:
    """Sum-pooled PQ lookup of ``B`` bags: ``[B, M * dsub]``, differentiable in ``codebooks``.

    Args:
        codes (Tensor): ``[N, M]`` integer codes of the table.
        codebooks (Tensor): ``[M, K, dsub]``.
        ids (Tensor): ``[n]`` row ids of all bags, concatenated.
        offsets (Tensor): ``[B + 1]`` bag boundaries in ``ids`` (``include_last_offset`` style).
        per_sample_weights (Optional[Tensor]): ``[n]`` weight of each id.

    Example::

        >>> books = torch.arange(8.0).view(2, 2, 2)  # M=2, K=2, dsub=2
        >>> codes = torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)
        >>> pq_pooled_lookup(codes, books, torch.tensor([0, 1, 1]), torch.tensor([0, 2, 2, 3]))
        tensor([[ 2.,  4., 10., 12.],
                [ 0.,  0.,  0.,  0.],
                [ 2.,  3.,  4.,  5.]])
    """
    # The C++ kernel (when built) fuses gather, decode and sum in one pass with no [M, n] index
    # buffer; the torch path below is the fallback and handles every other device and dtype.
    # (Written for TorchScript too: a scripted model keeps both paths.)
    if _ops.lookup_kernel_applies(codes, codebooks, ids, offsets, per_sample_weights):
        return _ops.kernel_pooled_lookup(codes, codebooks, ids, offsets, per_sample_weights)
    num_subspaces, ksub, dsub = codebooks.shape[0], codebooks.shape[1], codebooks.shape[2]
    num_ids = ids.numel()
    num_bags = offsets.numel() - 1
    # int32 indices halve the index traffic; fall back to int64 only when they could overflow.
    int32_max = 2147483647  # a literal: TorchScript reads no module-level constants
    index_dtype = torch.int32 if num_subspaces * max(ksub, num_ids) <= int32_max else torch.int64
    # [n, M]: the only random access into the big table.  Gathering whole rows as 8-byte words
    # is faster than byte-wise index_select when the row length allows it.
    if (
        codes.is_contiguous()
        and num_subspaces * codes.element_size() % 8 == 0
        and codes.storage_offset() * codes.element_size() % 8 == 0
    ):
        gathered = codes.view(torch.int64).index_select(0, ids).view(codes.dtype)
    else:
        gathered = codes.index_select(0, ids)
    # copy_ into a contiguous [M, n] buffer transposes and widens in one pass (much faster than
    # .t().contiguous() on uint8 followed by a cast).
    indices = torch.empty(num_subspaces, num_ids, dtype=index_dtype, device=ids.device)
    indices.copy_(gathered.t())
    indices.add_(
        torch.arange(0, num_subspaces * ksub, ksub, dtype=index_dtype, device=ids.device)[:, None]
    )
    bag_offsets = torch.empty(num_subspaces * num_bags + 1, dtype=index_dtype, device=ids.device)
    torch.add(
        offsets[:-1].unsqueeze(0),
        (torch.arange(num_subspaces, device=ids.device) * num_ids).unsqueeze(1),
        out=bag_offsets[:-1].view(num_subspaces, num_bags),
    )
    bag_offsets[-1] = num_subspaces * num_ids
    pooled = F.embedding_bag(
        indices.view(-1),
        codebooks.reshape(num_subspaces * ksub, dsub),
        bag_offsets,
        mode="sum",
        include_last_offset=True,
        # embedding_bag takes weights of the codebooks' type (a bf16 / fp16 collection)
        per_sample_weights=None
        if per_sample_weights is None
        else per_sample_weights.to(codebooks.dtype).repeat(num_subspaces),
    )
    return pooled.view(num_subspaces, num_bags, dsub).transpose(0, 1).reshape(num_bags, -1)
