"""The ``"loss_delta"`` objective: what each option costs in the model's loss, measured.

For every table and every candidate option (those on the Pareto front of (bytes, estimated
squared error) in some collection family, which holds every table's lower convex hull), the
table's rows are replaced by the option's reconstruction (the fits of the error estimates,
:mod:`~torchrec_compress.budget.cost`), every other table exact, and the model's mean loss on
held-out calibration batches is measured; the option's cost is the increase over the exact
model's loss (0 where it does not increase).  Tables are priced one at a time, so the total is
an additive approximation of what the plan adds to the loss.  Forward passes only: ``tables x
candidates x batches`` of them.

Example::

    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> from torchrec_compress.budget.options import Option
    >>> cfg = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])
    >>> ebc = EmbeddingBagCollection([cfg])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(
    ...     keys=["f"], values=torch.arange(10), lengths=torch.ones(10, dtype=torch.long))
    >>> loss = lambda m, b: m(b)["f"].pow(2).sum()
    >>> zero = lambda option, rows: torch.zeros_like(rows)  # an option storing nothing
    >>> ds = loss_deltas(nn.Sequential(ebc), [kjt], loss, {"t": (ebc, zero, [Option("x", 1)])})
    >>> ds["t"][Option("x", 1)] == 0.0  # zero rows lower this loss: no increase
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_compress.budget.allocate import FAMILY_CHOICES, TableChoices
from torchrec_compress.budget.options import Option
from torchrec_compress.budget.sensitivity import loss_of
from torchrec_compress.calibration import ForwardFn

#: per table: its collection, how an option stores rows, the options to price
Candidates = Mapping[
    str, tuple[EmbeddingBagCollection, Callable[[Option, Tensor], Tensor], Sequence[Option]]
]


def candidates(table: TableChoices) -> list[int]:
    """Indices of the options worth pricing: those on the Pareto front of (bytes, cost) among
    the options some collection family allows (fp32 always; sorted).

    Example::

        >>> options = [Option("fp32", 100), Option("int8", 30), Option("int4", 20),
        ...            Option("fp16", 50), Option("afm", 60, rank=4), Option("afm", 80, rank=8)]
        >>> candidates(TableChoices("t", "c", options, [0.0, 1.0, 9.0, 0.9, 2.0, 3.0]))
        [0, 1, 2, 3, 4]
    """
    chosen = {0}
    for family in FAMILY_CHOICES:
        allowed = sorted(
            table.allowed(family), key=lambda i: (table.options[i].bytes, table.costs[i])
        )
        best = float("inf")
        for i in allowed:
            if table.costs[i] < best:
                chosen.add(i)
                best = table.costs[i]
    return sorted(chosen)


def _mean_loss(model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn) -> float:
    return sum(float(loss_of(forward_fn(model, b))) for b in batches) / max(len(batches), 1)


def loss_deltas(
    model: nn.Module, batches: Sequence[Any], forward_fn: ForwardFn, tables: Candidates
) -> dict[str, dict[Option, float]]:
    """Per table and option, the increase of the mean loss over ``batches`` when only that
    table's rows are replaced by the option's (see the module notes); the model in eval mode,
    without gradients, and left as it was.

    Args:
        model (nn.Module): the (unsharded) model.
        batches (Sequence[Any]): held-out batches.
        forward_fn (ForwardFn): runs the model on a batch and returns the loss
            (:func:`~torchrec_compress.budget.sensitivity.loss_of`).
        tables (Candidates): per table name, its collection, a function of an option and
            ``(n, d)`` rows that returns the rows as the option stores them, and the options.
    """
    training = {m: m.training for m in model.modules()}
    result: dict[str, dict[Option, float]] = {}
    try:
        model.eval()
        with torch.no_grad():
            exact = _mean_loss(model, batches, forward_fn)
            for name, (ebc, reconstruct, options) in tables.items():
                weight = ebc.embedding_bags[name].weight
                original = weight.data
                result[name] = {}
                try:
                    for option in options:
                        rows = reconstruct(option, original.float().cpu())
                        weight.data = rows.to(original.device, original.dtype)
                        delta = _mean_loss(model, batches, forward_fn) - exact
                        result[name][option] = max(delta, 0.0)
                finally:
                    weight.data = original
    finally:
        for module, flag in training.items():
            module.train(flag)
    return result
