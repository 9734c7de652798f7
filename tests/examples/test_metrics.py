"""examples.dlrm.metrics: torchmetrics' AUC and TorchRec's NE against the definitions they replaced."""

import doctest
import math

import pytest
import torch
from torchrec.metrics.ne import compute_ne, get_ne_states

from examples.dlrm import metrics
from examples.dlrm.metrics import NE_ETA, auc, ctr_metrics, logloss, normalized_entropy


def mann_whitney_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The example's hand-written AUC before torchmetrics: Mann-Whitney U from average ranks, so
    tied scores count one half."""
    scores = scores.double().flatten()
    labels = labels.double().flatten()
    positives = labels.sum()
    negatives = labels.numel() - positives
    order = torch.argsort(scores)
    _, inverse, counts = torch.unique_consecutive(
        scores[order], return_inverse=True, return_counts=True
    )
    mean_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    u = ranks[labels > 0.5].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def bce_logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The example's logloss before TorchRec's states: torch's mean BCE with logits, float64."""
    return float(
        torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double())
    )


def _tied_predictions(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits on a grid of 1/8 (most rows share their score with others) and labels drawn
    from them, as the model's predictions are handed to the metrics."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, generator=gen) * 2 * 8).round() / 8
    labels = (torch.rand(rows, generator=gen) < torch.sigmoid(logits)).float()
    return logits.float(), labels


CASES = [(rows, seed) for rows in (2, 17, 1000, 200_000) for seed in range(3)]


@pytest.mark.parametrize(("rows", "seed"), CASES)
def test_auc_and_logloss_equal_the_old_definitions_with_ties(rows: int, seed: int) -> None:
    logits, labels = _tied_predictions(rows, seed)
    labels[:2] = torch.tensor([0.0, 1.0])  # both labels, however few rows
    assert logits.unique().numel() < rows or rows == 2
    result = ctr_metrics(logits, labels)
    # measured: at most 1.1e-16 (float64 rounding); torchmetrics' float32 ROC was up to 8.5e-8 off
    assert abs(result["auc"] - mann_whitney_auc(logits, labels)) <= 1e-12
    assert result["logloss"] == pytest.approx(bce_logloss(logits, labels), rel=1e-12)
    # scores already in [0, 1] are ranked as they are (no sigmoid): probabilities with ties
    probabilities = (logits.double().sigmoid() * 64).round() / 64
    assert abs(auc(probabilities, labels) - mann_whitney_auc(probabilities, labels)) <= 1e-12


def test_ne_is_logloss_over_the_base_rate_entropy_as_torchrec_computes_it() -> None:
    logits, labels = _tied_predictions(50_000, seed=7)
    result = ctr_metrics(logits, labels)
    base_rate = float(labels.double().mean())
    entropy = -(base_rate * math.log(base_rate) + (1 - base_rate) * math.log(1 - base_rate))
    # 1e-10: the float64 sums' order depends on the intra-op thread count (1.2e-11 seen when
    # an earlier test left another thread count)
    assert result["ne"] == pytest.approx(result["logloss"] / entropy, rel=1e-10)
    # TorchRec's own pipeline (NEMetric's states from clamped probabilities, in bits): the same
    # for logits well inside the clamp (|logit| < 27)
    assert logits.abs().max() < 20
    states = get_ne_states(
        labels.double(), logits.double().sigmoid(), torch.ones(labels.numel()).double(), NE_ETA
    )
    torchrec_ne = compute_ne(
        states["cross_entropy_sum"],
        states["weighted_num_samples"],
        states["pos_labels"],
        states["neg_labels"],
        NE_ETA,
    )
    assert result["ne"] == pytest.approx(float(torchrec_ne), rel=1e-9)
    assert normalized_entropy(logits, labels) == result["ne"]
    assert logloss(logits, labels) == result["logloss"]
    # predicting the base rate everywhere is NE 1; a better model is below 1
    constant = torch.full_like(logits, math.log(base_rate / (1 - base_rate)))
    assert normalized_entropy(constant, labels) == pytest.approx(1.0, rel=1e-12)
    assert result["ne"] < 1.0


def test_metrics_do_not_depend_on_the_row_order_gathered_from_processes() -> None:
    """``evaluate`` concatenates every process's predictions in rank order; any order gives the
    same AUC, and the same logloss and NE up to float64 summation order."""
    logits, labels = _tied_predictions(10_000, seed=3)
    whole = ctr_metrics(logits, labels)
    order = torch.randperm(logits.numel(), generator=torch.Generator().manual_seed(0))
    permuted = ctr_metrics(logits[order], labels[order])
    assert permuted["auc"] == whole["auc"]
    assert permuted["logloss"] == pytest.approx(whole["logloss"], rel=1e-12)
    assert permuted["ne"] == pytest.approx(whole["ne"], rel=1e-12)


def test_sigmoid_merged_logits_count_as_ties() -> None:
    """The one departure from ranking the logits themselves: float64 sigmoid is 1.0 for both 40
    and 50, so a positive at 50 and a negative at 40 tie (one half) instead of ordering."""
    logits, labels = torch.tensor([-1.0, 40.0, 50.0]), torch.tensor([0.0, 0.0, 1.0])
    assert mann_whitney_auc(logits, labels) == 1.0
    assert auc(logits, labels) == 0.75
    # ... where the float64 sigmoid still separates them, nothing changes
    logits = torch.tensor([-30.0, 20.0, 20.5, 1e-15, 2e-15])
    labels = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0])
    assert auc(logits, labels) == pytest.approx(mann_whitney_auc(logits, labels), abs=1e-12)


def test_auc_refuses_one_label_and_non_binary_labels_and_keeps_the_default_dtype() -> None:
    with pytest.raises(ValueError, match="both positive and negative"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="labels must be 0 or 1, got 0.5"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.5]))
    assert torch.get_default_dtype() == torch.float32
    auc(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 1.0]))
    assert torch.get_default_dtype() == torch.float32


def test_docstring_examples_run() -> None:
    assert doctest.testmod(metrics).failed == 0
