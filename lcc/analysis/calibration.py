"""Clean test metrics of a classifier from its logits: top-1/top-5, per-class accuracy,
expected calibration error (torchmetrics) and negative log-likelihood.

ECE is the L1 calibration error of the top-1 confidence over ``n_bins`` equal-width bins of
[0, 1] (Guo et al. 2017; torchmetrics ``multiclass_calibration_error``, 15 bins by default):
``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``. NLL is the mean cross-entropy.

>>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
>>> m = classification_metrics(logits, torch.tensor([0, 1, 0, 0]))
>>> m["top1"], m["per_class"]
(0.75, [0.6666666666666666, 1.0, None])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lcc.errors import LCCInputError

__all__ = ["ECE_BINS", "classification_metrics", "expected_calibration_error", "top_k_accuracy"]

#: bins of the expected calibration error (torchmetrics' default, Guo et al. use 15)
ECE_BINS = 15


def _checked(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = torch.as_tensor(logits)
    y = torch.as_tensor(y).to(torch.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != y.shape[0] or logits.shape[0] == 0:
        raise LCCInputError(
            f"logits must be (N, C) with one row per label, got {tuple(logits.shape)} for "
            f"{tuple(y.shape)} labels"
        )
    if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
        raise LCCInputError(f"labels must lie in 0..{logits.shape[1] - 1}")
    return logits.detach().float().cpu(), y.cpu()


def top_k_accuracy(logits: Tensor, y: Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits (ties: torch.topk's).

    >>> top_k_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    0.5
    """
    logits, y = _checked(logits, y)
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == y[:, None]).any(1).double().mean())


def expected_calibration_error(logits: Tensor, y: Tensor, n_bins: int = ECE_BINS) -> float:
    """L1 expected calibration error of the softmax of ``logits`` (torchmetrics).

    >>> round(expected_calibration_error(torch.tensor([[0.0, 0.0]]), torch.tensor([0])), 6)
    0.5
    """
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits, y = _checked(logits, y)
    probabilities = logits.softmax(dim=1)
    value = multiclass_calibration_error(
        probabilities, y, num_classes=logits.shape[1], n_bins=n_bins, norm="l1"
    )
    return float(value)


def classification_metrics(
    logits: Tensor, y: Tensor, *, num_classes: int | None = None, n_bins: int = ECE_BINS
) -> dict[str, Any]:
    """``top1``, ``top5``, ``per_class`` (accuracy per class, None for a class without test
    samples), ``ece`` and ``nll`` of ``logits`` (N, C) against labels ``y`` (N,)."""
    logits, y = _checked(logits, y)
    classes = int(num_classes or logits.shape[1])
    hits = (logits.argmax(1) == y).numpy()
    labels = y.numpy()
    per_class: list[float | None] = []
    for c in range(classes):
        rows = labels == c
        per_class.append(float(hits[rows].mean()) if rows.any() else None)
    return {
        "top1": float(np.mean(hits)),
        "top5": top_k_accuracy(logits, y, 5),
        "per_class": per_class,
        "ece": expected_calibration_error(logits, y, n_bins),
        "nll": float(F.cross_entropy(logits.double(), y)),
    }
