"""Test AUC of the synthetic default's hidden teacher (its noiseless logit, the Bayes-optimal
score): the ceiling a CTR model can reach on that split.

Example::

    python benchmarks/synthetic_bayes.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples/

from examples.dlrm.metrics import auc  # noqa: E402
from torchrec_compress.data import get_dataset  # noqa: E402


def main() -> None:
    data = get_dataset("synthetic")
    scores, labels = [], []
    for batch in data.batches("test", 8192):
        scores.append(data.teacher_logits(batch))
        labels.append(batch.labels)
    labels_t = torch.cat(labels)
    print(
        f"synthetic default, test split ({labels_t.numel()} rows, positive rate {labels_t.mean():.3f})"
    )
    print(f"teacher (Bayes-optimal) test AUC: {auc(torch.cat(scores), labels_t):.4f}")


if __name__ == "__main__":
    main()
