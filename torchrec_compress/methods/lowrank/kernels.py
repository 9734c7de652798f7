"""Python side of the C++ low-rank kernel (``torchrec_compress._C``).

``lowrank_pooled_lookup(table, ids, offsets, per_sample_weights=None, mean=False) -> [B, k + 1]``:
inference pooling of float factor rows (``[N, k]``) plus, in the last column, each bag's
coefficient of the mean row (sum of weights, over the bag length for MEAN), so that one GEMM with
``[projection; mean]`` finishes a low-rank lookup (no autograd: inference only).  Its fake (meta)
implementation is registered here, so it traces.  Without the extension ``HAS_KERNELS`` is false
and the collection keeps its pure-torch path.

Example::

    >>> isinstance(HAS_KERNELS, bool)
    True
"""

import torch
from torch import Tensor

from torchrec_compress.extension import HAS_KERNELS

if HAS_KERNELS:

    @torch.library.register_fake("torchrec_compress::lowrank_pooled_lookup")
    def _lowrank_pooled_lookup_fake(
        table: Tensor,
        ids: Tensor,
        offsets: Tensor,
        per_sample_weights: Tensor | None = None,
        mean: bool = False,
    ) -> Tensor:
        return table.new_empty(offsets.shape[0] - 1, table.shape[1] + 1)
