"""Clean metrics: ECE against a numpy loop of its definition, top-k, per class and NLL by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcc.analysis.calibration import (
    classification_metrics,
    expected_calibration_error,
    top_k_accuracy,
)
from lcc.errors import LCCInputError


def oracle_ece(logits: np.ndarray, y: np.ndarray, bins: int) -> float:
    """Guo et al.: bins (b/B, (b+1)/B] of the top-1 confidence, sum |B_b|/N |acc - conf|."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    confidence, prediction = p.max(1), p.argmax(1)
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        rows = [i for i in range(len(y)) if low < confidence[i] <= high]
        if rows:
            accuracy = np.mean([prediction[i] == y[i] for i in rows])
            total += len(rows) / len(y) * abs(accuracy - np.mean(confidence[rows]))
    return total


@pytest.mark.parametrize("bins", [15, 4])
def test_ece_equals_a_numpy_loop(bins: int) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 6)) * 2.5
    y = np.where(rng.random(500) < 0.7, logits.argmax(1), rng.integers(0, 6, 500))
    value = expected_calibration_error(torch.tensor(logits), torch.tensor(y), bins)
    assert value == pytest.approx(oracle_ece(logits, y, bins), abs=1e-6)


def test_top_k_per_class_and_nll_by_hand() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 7))
    y = rng.integers(0, 6, 200)  # class 6 has no test sample
    metrics = classification_metrics(torch.tensor(logits), torch.tensor(y), num_classes=7)
    order = np.argsort(-logits, axis=1)
    assert metrics["top1"] == pytest.approx(np.mean(order[:, 0] == y))
    assert metrics["top5"] == pytest.approx(np.mean([y[i] in order[i, :5] for i in range(200)]))
    for c in range(6):
        assert metrics["per_class"][c] == pytest.approx(np.mean(order[y == c, 0] == c))
    assert metrics["per_class"][6] is None
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert metrics["nll"] == pytest.approx(-np.mean(log_p[np.arange(200), y]), rel=1e-9)
    assert top_k_accuracy(torch.tensor(logits), torch.tensor(y), 7) == 1.0


def test_bad_shapes_and_labels() -> None:
    with pytest.raises(LCCInputError, match="one row per label"):
        classification_metrics(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(LCCInputError, match=r"labels must lie in 0\.\.1"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))
