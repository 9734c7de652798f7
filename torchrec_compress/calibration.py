"""One calibration pass over a model: lookup counts of its tables and output moments of its
Linear layers, for plain and sharded models alike (hooks see each module's local input)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_compress.moments import Moments
from torchrec_compress.statistics import LinearOutputCollector, LookupCounter

ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Batch | KeyedJaggedTensor) -> Any:
    """Runs ``model`` on one calibration batch the way torchrec's models take it.

    A ``Batch`` goes whole to a model whose ``forward`` takes one argument (torchrec's
    ``DLRMTrain``), else as ``model(dense, sparse)`` (torchrec's ``DLRM``); anything else (a
    ``KeyedJaggedTensor``) as ``model(batch)``.  A wrapper whose ``forward`` takes ``*args``
    (``DistributedModelParallel``, DDP) is judged by the module it wraps.  Models that take
    their input otherwise need ``compress_(..., forward_fn=...)``.

    Example::

        >>> class TakesBatch(nn.Module):
        ...     def forward(self, batch: Batch) -> str:
        ...         return "whole batch"
        >>> batch = Batch(torch.zeros(1, 1), KeyedJaggedTensor.empty(), torch.zeros(1))
        >>> default_forward(TakesBatch(), batch)
        'whole batch'
    """
    if isinstance(batch, Batch):
        if _required_positional_args(model) == 1:
            return model(batch)
        return model(batch.dense_features, batch.sparse_features)
    return model(batch)


def _required_positional_args(model: nn.Module) -> int | None:
    """How many positional arguments ``model.forward`` requires; ``None`` when it takes
    ``*args`` and wraps no module that says."""
    while True:
        try:
            parameters = inspect.signature(model.forward).parameters.values()
        except (TypeError, ValueError):  # a builtin or scripted forward: no signature
            return None
        if all(p.kind is not inspect.Parameter.VAR_POSITIONAL for p in parameters):
            positional = (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            )
            return sum(p.kind in positional and p.default is p.empty for p in parameters)
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return None
        model = inner


def calibration_pass(
    model: nn.Module,
    calibration: Iterable[Any],
    forward_fn: ForwardFn,
    counters: Mapping[nn.Module, Any],
    linears: Mapping[str, nn.Linear] | None = None,
) -> dict[str, Moments]:
    """One pass over ``calibration`` in eval mode without gradients.

    A forward pre-hook on each module of ``counters`` feeds the KJT it receives to its counter's
    ``update`` (sharded collections see the local batch with global ids); forward hooks
    accumulate the output moments of ``linears``.  The training flags of all modules are
    restored and hooks removed, even on error.

    Raises:
        ValueError: when ``calibration`` yields no batch (e.g. an exhausted iterator).

    Returns:
        Dict[str, Moments]: Linear fqn -> output moments (of this process's batches).
    """
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, kwargs, c=counter: c.update(args[0] if args else kwargs["features"]),
            with_kwargs=True,
        )
        for module, counter in counters.items()
    ]
    training = {m: m.training for m in model.modules()}
    collector = LinearOutputCollector(linears or {})
    num_batches = 0
    try:
        model.eval()
        with collector, torch.no_grad():
            for batch in calibration:
                _run(forward_fn, model, batch)
                num_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.train(flag)
    if num_batches == 0:
        raise ValueError(
            f"calibration data {type(calibration).__name__} yielded no batch (an empty list, or "
            "an iterator already exhausted, e.g. by an earlier call); it is iterated once: "
            "pass a list or a fresh iterator"
        )
    return collector.moments


def _run(forward_fn: ForwardFn, model: nn.Module, batch: Any) -> None:
    if forward_fn is not default_forward:
        forward_fn(model, batch)
        return
    try:
        forward_fn(model, batch)
    except TypeError as e:
        raise TypeError(
            f"calibration ran {type(model).__name__} on a {type(batch).__name__} as "
            f"default_forward does and it failed ({e}); if the model takes its input "
            "otherwise, say how: compress_(..., forward_fn=lambda model, batch: model(...))"
        ) from e


def calibrate(
    model: nn.Module,
    calibration: Iterable[Any],
    forward_fn: ForwardFn = default_forward,
    ebcs: Mapping[str, EmbeddingBagCollection] | None = None,
    linears: Mapping[str, nn.Linear] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Moments]]:
    """Lookup counts of ``ebcs`` and output moments of ``linears`` in one
    :func:`calibration_pass`.

    Returns:
        tuple: (EBC fqn -> table name -> per-row counts, Linear fqn -> output moments).
    """
    ebcs = dict(ebcs or {})
    counters = {
        fqn: LookupCounter(ebc.embedding_bag_configs(), ebc.is_weighted(), ebc.device)
        for fqn, ebc in ebcs.items()
    }
    moments = calibration_pass(
        model, calibration, forward_fn, {ebcs[f]: c for f, c in counters.items()}, linears
    )
    return {fqn: c.counts() for fqn, c in counters.items()}, moments
