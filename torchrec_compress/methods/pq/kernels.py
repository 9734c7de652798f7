"""Python side of the C++ product-quantization kernels (``torchrec_compress._C``).

Loading the extension (:mod:`torchrec_compress.extension`) registers, in the ``torchrec_compress`` operator namespace:

- ``pq_pooled_lookup(codes, codebooks, ids, offsets, per_sample_weights=None) -> [B, M * dsub]``:
  fused gather-decode-sum of ``B`` bags (ids concatenated, ``offsets`` ``[B + 1]``), one pass over
  the ids with the partial sums in registers; empty bags give zeros.
- ``pq_pooled_lookup_backward(grad, codes, ids, offsets, per_sample_weights, ksub)``: its
  codebook gradient, ``gC[m, codes[i, m]] += w * grad[b, m]``, threads owning disjoint subspaces.
- ``pq_encode(x, codebooks, dtype) -> [n, M]``: fused distance + argmin per subspace.
- ``pq_kernel_isa()`` / ``pq_set_kernel_isa(name)``: the instruction set in use (``"avx512"``,
  ``"avx2"`` or ``"generic"``, picked at load time; ``"auto"`` restores that choice).
  ``"avx512"`` only changes the encoder (the other kernels run their AVX2 copy).

This module registers their autograd formula and fake (meta) implementations, so the ops trace
under ``torch.fx`` / ``torch.compile`` and train, and says when they apply.  When the extension
was not built, ``HAS_KERNELS`` is ``False`` and callers keep their pure-torch paths.
"""

from typing import Any

import torch
from torch import Tensor

from torchrec_compress.extension import HAS_KERNELS

_CODE_DTYPES = (torch.uint8, torch.int16, torch.int32)


def lookup_kernel_applies(
    codes: Tensor,
    codebooks: Tensor,
    ids: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
) -> bool:
    """Whether ``pq_pooled_lookup`` can run these (CPU) tensors; the torch path handles the rest.

    Written for TorchScript as well (a scripted model keeps the kernel).

    Args:
        codes (Tensor): ``[N, M]`` codes.
        codebooks (Tensor): ``[M, K, dsub]``.
        ids (Tensor): ``[n]`` ids.
        offsets (Tensor): ``[B + 1]`` bag boundaries.
        per_sample_weights (Optional[Tensor]): ``[n]`` weights.

    Example::

        >>> books, codes = torch.zeros(2, 4, 3), torch.zeros(5, 2, dtype=torch.uint8)
        >>> lookup_kernel_applies(codes, books, torch.tensor([1]), torch.tensor([0, 1]), None) == HAS_KERNELS
        True
    """
    if not kernels_built():
        return False
    if per_sample_weights is not None and (
        per_sample_weights.dtype != torch.float32 or per_sample_weights.device.type != "cpu"
    ):
        return False
    return (
        codes.device.type == "cpu"
        and codebooks.device.type == "cpu"
        and ids.device.type == "cpu"
        and offsets.device.type == "cpu"
        and (codes.dtype == torch.uint8 or codes.dtype == torch.int16 or codes.dtype == torch.int32)
        and codebooks.dtype == torch.float32
        and (ids.dtype == torch.int32 or ids.dtype == torch.int64)
        and (offsets.dtype == torch.int32 or offsets.dtype == torch.int64)
    )


# The two definitions below depend on HAS_KERNELS at import; TorchScript cannot read a global
# flag, but it compiles whichever function the name is bound to.
if HAS_KERNELS:

    def kernels_built() -> bool:
        """Whether the C++ extension was loaded (``HAS_KERNELS``), readable from TorchScript."""
        return True

    def kernel_pooled_lookup(
        codes: Tensor,
        codebooks: Tensor,
        ids: Tensor,
        offsets: Tensor,
        per_sample_weights: Tensor | None,
    ) -> Tensor:
        """``torch.ops.torchrec_compress.pq_pooled_lookup`` (see the module docstring)."""
        return torch.ops.torchrec_compress.pq_pooled_lookup(
            codes, codebooks, ids, offsets, per_sample_weights
        )

else:

    def kernels_built() -> bool:
        """Whether the C++ extension was loaded (``HAS_KERNELS``), readable from TorchScript."""
        return False

    def kernel_pooled_lookup(
        codes: Tensor,
        codebooks: Tensor,
        ids: Tensor,
        offsets: Tensor,
        per_sample_weights: Tensor | None,
    ) -> Tensor:
        """Stand-in when the extension was not built (never called: see ``lookup_kernel_applies``)."""
        raise RuntimeError("torchrec_compress._C was not built: pq_pooled_lookup is unavailable")


def encode_kernel_applies(x: Tensor, codebooks: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``pq_encode`` can encode ``x`` (CPU, float32 codebooks, 8 to 32-bit codes).

    Args:
        x (Tensor): ``[n, d]`` rows (any floating dtype: callers convert chunks to float32).
        codebooks (Tensor): ``[M, K, dsub]``.
        dtype (torch.dtype): dtype of the codes.

    Example::

        >>> encode_kernel_applies(torch.zeros(3, 4), torch.zeros(2, 4, 2), torch.uint8) == HAS_KERNELS
        True
    """
    return (
        HAS_KERNELS
        and x.device.type == "cpu"
        and x.dtype.is_floating_point
        and codebooks.device.type == "cpu"
        and codebooks.dtype == torch.float32
        and dtype in _CODE_DTYPES
    )


def _per_id_bags(offsets: Tensor, num_ids: int) -> Tensor:
    """Bag index of every id position (``[n]``)."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=num_ids)


def _setup_lookup_context(ctx: Any, inputs: tuple, output: Tensor):
    codes, codebooks, ids, offsets, per_sample_weights = inputs
    ctx.ksub = codebooks.shape[1]
    saved = [codes, ids, offsets, per_sample_weights]
    # Codebooks are needed only for the (rare) gradient of trainable per-id weights.
    if per_sample_weights is not None and ctx.needs_input_grad[4]:
        saved.append(codebooks)
    ctx.save_for_backward(*saved)


def _lookup_backward(
    ctx: Any, grad: Tensor
) -> tuple[None, Tensor | None, None, None, Tensor | None]:
    codes, ids, offsets, per_sample_weights, *codebooks = ctx.saved_tensors
    grad_books = None
    if ctx.needs_input_grad[1]:
        grad_books = torch.ops.torchrec_compress.pq_pooled_lookup_backward(
            grad, codes, ids, offsets, per_sample_weights, ctx.ksub
        )
    grad_weights = None
    if per_sample_weights is not None and ctx.needs_input_grad[4]:
        # d out[b] / d w_j = decode(codes[ids[j]]): the looked-up rows dotted with their bag's grad.
        books = codebooks[0]
        num_subspaces, ksub, dsub = books.shape
        flat = codes.index_select(0, ids).long() + torch.arange(num_subspaces) * ksub
        rows = books.reshape(-1, dsub)[flat].reshape(ids.numel(), -1)
        grad_weights = (rows * grad[_per_id_bags(offsets, ids.numel())]).sum(1)
    return None, grad_books, None, None, grad_weights


if HAS_KERNELS:

    @torch.library.register_fake("torchrec_compress::pq_pooled_lookup")
    def _pooled_lookup_fake(
        codes: Tensor,
        codebooks: Tensor,
        ids: Tensor,
        offsets: Tensor,
        per_sample_weights: Tensor | None = None,
    ) -> Tensor:
        return codebooks.new_empty(offsets.shape[0] - 1, codebooks.shape[0] * codebooks.shape[2])

    @torch.library.register_fake("torchrec_compress::pq_pooled_lookup_backward")
    def _pooled_lookup_backward_fake(
        grad: Tensor,
        codes: Tensor,
        ids: Tensor,
        offsets: Tensor,
        per_sample_weights: Tensor | None,
        ksub: int,
    ) -> Tensor:
        num_subspaces = codes.shape[1]
        return grad.new_empty(num_subspaces, ksub, grad.shape[1] // num_subspaces)

    @torch.library.register_fake("torchrec_compress::pq_encode")
    def _encode_fake(x: Tensor, codebooks: Tensor, dtype: torch.dtype) -> Tensor:
        return x.new_empty(x.shape[0], codebooks.shape[0], dtype=dtype)

    torch.library.register_autograd(
        "torchrec_compress::pq_pooled_lookup",
        _lookup_backward,
        setup_context=_setup_lookup_context,
    )
