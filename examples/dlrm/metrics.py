"""AUC, logloss and normalized entropy (NE) of a whole evaluation split.

AUC is torchmetrics' ``binary_auroc`` without thresholds: one ROC point per distinct score, so
tied scores count one half (Mann-Whitney U).  NE is TorchRec's normalized entropy
(``torchrec.metrics.ne.compute_ne``): the cross-entropy of the predictions divided by that of
always predicting the split's base rate, so 1.0 is a model that learned only the click rate
and lower is better.  Both come from streamable states (torchmetrics keeps the scores, TorchRec
four sums); here they see a whole split at once.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.metrics.ne import compute_logloss, compute_ne

# TorchRec's NEMetric default: its clamps act only on an empty or single-label split
NE_ETA = 1e-12


@contextmanager
def _float64_default() -> Iterator[None]:
    """torchmetrics 1.0.3 divides its integer ROC counts in the default dtype: in float32 the AUC
    is off by ~3e-8, in float64 by ~1e-16."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _binary_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` as a flat int64 tensor of 0s and 1s; a ValueError names any other value."""
    flat = labels.flatten()
    other = flat[(flat != 0) & (flat != 1)]
    if other.numel():
        raise ValueError(f"labels must be 0 or 1, got {other[0].item()!r}")
    return flat.long()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (logits or probabilities) against 0/1 ``labels``.

    Scores outside [0, 1] are ranked by their float64 sigmoid (torchmetrics applies it), which
    merges logits less than about ``2e-16 * (1 + exp(x))`` apart (all of them above ~37): such
    logits count as ties, where a ranking of the logits themselves would order them.

    Raises:
        ValueError: all labels are equal (AUC is undefined), or a label is not 0 or 1.

    Example::

        >>> auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
        0.75
    """
    target = _binary_labels(labels)
    positives = int(target.sum())
    if positives in (0, target.numel()):
        raise ValueError("AUC needs both positive and negative labels")
    with _float64_default():
        return float(binary_auroc(scores.flatten().double(), target))


def _cross_entropy_states(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TorchRec's NE states, unweighted: the summed cross-entropy (nats) of ``sigmoid(logits)``
    and the counts of positive and negative labels.

    The cross-entropy comes from the logits, unclamped (TorchRec clamps probabilities to
    [eta, 1 - eta], which changes nothing for logits within ±27).
    """
    target = labels.flatten().double()
    ce_sum = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.flatten().double(), target, reduction="sum"
    )
    positives = target.sum()
    return ce_sum, positives, target.numel() - positives


def _logloss(ce_sum: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> float:
    return float(compute_logloss(ce_sum, positives, negatives, NE_ETA))


def _ne(ce_sum: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> float:
    # TorchRec's normaliser is in bits (log2): so must the cross-entropy be
    ce_bits = ce_sum / math.log(2)
    return float(compute_ne(ce_bits, positives + negatives, positives, negatives, NE_ETA))


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy (nats) of ``sigmoid(logits)`` against ``labels``.

    Example::

        >>> round(logloss(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0])), 6)  # ln 2
        0.693147
    """
    return _logloss(*_cross_entropy_states(logits, labels))


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """TorchRec's NE: the logloss of ``sigmoid(logits)`` over the entropy of the labels' mean.

    Example::

        >>> normalized_entropy(torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0]))  # base rate
        1.0
    """
    return _ne(*_cross_entropy_states(logits, labels))


def ctr_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``auc``, ``logloss`` and ``ne`` of the predictions ``sigmoid(logits)`` (see :func:`auc`).

    Example::

        >>> ctr_metrics(torch.tensor([-1.0, 1.0]), torch.tensor([0.0, 1.0]))["auc"]
        1.0
    """
    states = _cross_entropy_states(logits, labels)
    return {"auc": auc(logits, labels), "logloss": _logloss(*states), "ne": _ne(*states)}
