"""How much the loss depends on each table: mean squared gradient of the loss with respect to
the table's pooled output, per dimension, over the calibration batches.

A second-order estimate of what an output error ``delta`` costs in loss is
``E[(g^T delta)^2] / 2`` (``g``: the loss's gradient, Fisher's approximation of the Hessian);
for an error independent of the gradient and spread over the ``d`` dimensions that is
``E||g||^2 / d * E||delta||^2 / 2``.  So a table's squared output error, weighted by its
``E||g||^2 / d``, estimates the loss the option adds, in the same units for every table.

Example::

    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> tables = [EmbeddingBagConfig(name=n, embedding_dim=4, num_embeddings=10, feature_names=[n])
    ...           for n in ("a", "b")]
    >>> ebc = EmbeddingBagCollection(tables)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(
    ...     keys=["a", "b"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1]))
    >>> loss = lambda m, b: (10 * m(b)["a"]).sum() + m(b)["b"].sum()  # a counts 10x more
    >>> s = loss_sensitivity(nn.Sequential(ebc), [kjt], loss, {"0": ebc})
    >>> round(s["a"] / s["b"])
    100
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.distributed.types import LazyAwaitable
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_compress.calibration import ForwardFn


def loss_of(output: Any) -> Tensor:
    """The loss in what ``forward_fn`` returned: the output itself when it is a scalar tensor,
    else its first element when that is one (torchrec's ``DLRMTrain`` returns
    ``(loss, (loss, logits, labels))``).

    Raises:
        ValueError: when neither is a scalar tensor.
    """
    for value in (output, output[0] if isinstance(output, (tuple, list)) and output else None):
        if isinstance(value, Tensor) and value.dim() == 0:
            return value
    raise ValueError(
        "BudgetConfig(loss_sensitivity=True or objective='loss_delta') needs forward_fn to return the loss (a scalar "
        f"tensor, or a tuple that starts with it), got {type(output).__name__}; pass "
        "compress_(..., forward_fn=lambda model, batch: loss_fn(model(batch), batch))"
    )


def _feature_tables(ebcs: Mapping[str, EmbeddingBagCollection]) -> dict[str, dict[str, str]]:
    return {
        fqn: {f: t.name for t in ebc.embedding_bag_configs() for f in t.feature_names}
        for fqn, ebc in ebcs.items()
    }


def loss_sensitivity(
    model: nn.Module,
    calibration: Sequence[Any],
    forward_fn: ForwardFn,
    ebcs: Mapping[str, EmbeddingBagCollection],
    outputs: Mapping[str, nn.Module] | None = None,
) -> dict[str, float]:
    """Per table of ``ebcs``, the mean over the batches of ``||dL/d(pooled output)||^2 / d``
    (see the module notes), the model in eval mode; no parameter's ``.grad`` is touched.

    Args:
        model (nn.Module): the model (unsharded, or a DMP model with ``outputs``).
        calibration (Sequence[Any]): batches.
        forward_fn (ForwardFn): runs the model on a batch and returns the loss (see
            :func:`loss_of`).
        ebcs (Mapping[str, EmbeddingBagCollection]): the collections, by fully qualified name
            (a DMP model's: those of its unsharded skeleton).
        outputs (Optional[Mapping[str, nn.Module]]): per fqn of ``ebcs``, the module whose
            output is the collection's pooled ``KeyedTensor`` (a sharded collection's output
            is waited for, as its consumer waits); default the collections themselves.
    """
    features = _feature_tables(ebcs)
    sums = {t: 0.0 for tables in features.values() for t in tables.values()}
    captured: list[tuple[str, Any]] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, out, fqn=fqn: captured.append((fqn, out)))
        for fqn, module in (outputs if outputs is not None else ebcs).items()
    ]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for batch in calibration:
            captured.clear()
            with torch.enable_grad():
                loss = loss_of(forward_fn(model, batch))
                pooled = [(fqn, LazyAwaitable._wait_async(out)) for fqn, out in captured]
                values = [out.values() for _, out in pooled]
                grads = torch.autograd.grad(loss, values, allow_unused=True)
            for (fqn, out), grad in zip(pooled, grads, strict=True):
                if grad is None:
                    continue
                for key, part in zip(out.keys(), grad.split(out.length_per_key(), 1), strict=True):
                    if key in features[fqn]:
                        sums[features[fqn][key]] += float(part.pow(2).sum()) / part.shape[1]
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.train(flag)
    return {t: total / max(len(calibration), 1) for t, total in sums.items()}
