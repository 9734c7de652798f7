"""The ``"fisher"`` objective: a second-order estimate of the loss each option adds, per example.

For a table whose pooled output of example ``x`` moves by ``e_x``, the loss moves by about
``g_x^T e_x + (g_x^T e_x)^2 / 2`` with Fisher's approximation of the Hessian (``g_x``: the
per-example gradient of the loss with respect to that pooled output).  The first term averages
out on data the model fits and only adds noise on a few batches; the second is what
:func:`fisher_deltas` returns: ``mean_x (g_x^T e_x)^2 / 2`` over held-out calibration
batches, with ``e_x`` pooled from the option's reconstruction of the rows (the estimates' own
fits) and ``g_x`` from one backward pass per batch.  Unlike the squared-error objective it
weighs each lookup by how much the loss depends on that example's output, in that direction;
unlike ``"loss_delta"`` it needs no forward pass per option and is never negative.

Example::

    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> from torchrec_compress.budget.options import Option
    >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=4, feature_names=["f"])
    >>> ebc = EmbeddingBagCollection([cfg])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(
    ...     keys=["f"], values=torch.arange(4), lengths=torch.ones(4, dtype=torch.long))
    >>> loss = lambda m, b: m(b)["f"][:, 0].mean()  # g_x = (1, 0) for every example
    >>> shift = lambda option, rows: rows + torch.tensor([1.0, 5.0])  # e_x = (1, 5)
    >>> ds = fisher_deltas(nn.Sequential(ebc), [kjt], loss, {"t": (ebc, shift, [Option("x", 1)])})
    >>> ds["t"][Option("x", 1)]  # (g_x^T e_x)^2 / 2
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_compress.budget.loss_delta import Candidates
from torchrec_compress.budget.options import Option
from torchrec_compress.budget.sensitivity import loss_of
from torchrec_compress.calibration import ForwardFn

#: per batch: per feature of the priced tables, (its ids, offsets, weights, per-example grads)
_Captured = list[dict[str, tuple[Tensor, Tensor, Tensor | None, Tensor]]]


def _capture(
    model: nn.Module,
    batches: Sequence[Any],
    forward_fn: ForwardFn,
    ebcs: set[EmbeddingBagCollection],
) -> _Captured:
    """Each batch's lookups and per-example gradients of the loss on every pooled output."""
    result: _Captured = []
    seen: list[tuple[KeyedJaggedTensor, KeyedTensor]] = []
    hooks = [e.register_forward_hook(lambda _m, i, o: seen.append((i[0], o))) for e in ebcs]
    try:
        for batch in batches:
            seen.clear()
            with torch.enable_grad():
                loss = loss_of(forward_fn(model, batch))
                grads = torch.autograd.grad(loss, [o.values() for _, o in seen], allow_unused=True)
            found: dict[str, tuple[Tensor, Tensor, Tensor | None, Tensor]] = {}
            for (kjt, out), grad in zip(seen, grads, strict=True):
                if grad is None:
                    continue
                size = grad.shape[0]  # the loss is a mean over the batch: per-example grads
                parts = grad.split(out.length_per_key(), 1)
                for key, part in zip(out.keys(), parts, strict=True):
                    feature = kjt[key]
                    found[key] = (
                        feature.values(),
                        feature.offsets(),
                        feature.weights_or_none(),
                        part * size,
                    )
            result.append(found)
    finally:
        for hook in hooks:
            hook.remove()
    return result


def _price(diff: Tensor, features: Sequence[str], captured: _Captured, mode: str) -> float:
    """``mean_x (g_x^T e_x)^2 / 2`` over the captured examples of ``features``."""
    total, examples = 0.0, 0
    for found in captured:
        for feature in features:
            if feature not in found:
                continue
            ids, offsets, weights, grad = found[feature]
            pooled = nn.functional.embedding_bag(
                ids, diff.to(ids.device), offsets[:-1], mode=mode, per_sample_weights=weights
            )
            total += float((pooled * grad.to(pooled)).sum(1).pow(2).sum()) / 2
            examples += grad.shape[0]
    return total / max(examples, 1)


def fisher_deltas(
    model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn, tables: Candidates
) -> dict[str, dict[Option, float]]:
    """Per table and option, ``mean_x (g_x^T e_x)^2 / 2`` (see the module notes; the loss must
    be a mean over the batch's examples); the model in eval mode and left as it was.  Arguments as for
    :func:`~torchrec_compress.budget.loss_delta.loss_deltas`."""
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        captured = _capture(model, batches, forward_fn, {ebc for ebc, _, _ in tables.values()})
    finally:
        for module, flag in training.items():
            module.train(flag)
    result: dict[str, dict[Option, float]] = {}
    with torch.no_grad():
        for name, (ebc, reconstruct, options) in tables.items():
            config = next(t for t in ebc.embedding_bag_configs() if t.name == name)
            mode = "mean" if config.pooling == PoolingType.MEAN else "sum"
            rows = ebc.embedding_bags[name].weight.detach().float().cpu()
            result[name] = {}
            for option in options:
                diff = reconstruct(option, rows) - rows
                result[name][option] = _price(diff, config.feature_names, captured, mode)
    return result
