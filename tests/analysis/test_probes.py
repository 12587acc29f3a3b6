"""Probes: scikit-learn called directly, and a brute-force k-NN vote."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from lcc.analysis.probes import probe_accuracies
from lcc.errors import LCCInputError


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, (4, 5))
    y_train, y_test = rng.integers(0, 4, 300), rng.integers(0, 4, 120)
    scale = np.array([1.0, 10.0, 0.1, 1.0, 3.0])
    z_train = (centres[y_train] + rng.normal(0, 1.5, (300, 5))) * scale
    z_test = (centres[y_test] + rng.normal(0, 1.5, (120, 5))) * scale
    return z_train, y_train, z_test, y_test


def brute_knn(train: np.ndarray, y: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """Majority vote of the k nearest (Euclidean) training rows; ties: the smallest label."""
    out = []
    for row in test:
        nearest = np.argsort(((train - row) ** 2).sum(1), kind="stable")[:k]
        votes = np.bincount(y[nearest], minlength=y.max() + 1)
        out.append(int(np.argmax(votes)))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 7])
def test_probes_equal_sklearn_directly_and_a_brute_force_vote(k: int) -> None:
    z_train, y_train, z_test, y_test = data()
    result = probe_accuracies(z_train, y_train, z_test, y_test, k=k, seed=0)
    scaler = StandardScaler().fit(z_train)
    train, test = scaler.transform(z_train), scaler.transform(z_test)
    linear = LogisticRegression(max_iter=1000, random_state=0).fit(train, y_train)
    assert result["linear"] == pytest.approx(np.mean(linear.predict(test) == y_test))
    knn = KNeighborsClassifier(n_neighbors=k).fit(train, y_train)
    assert result["knn"] == pytest.approx(np.mean(knn.predict(test) == y_test))
    assert result["knn"] == pytest.approx(
        np.mean(brute_knn(train, y_train, test, k) == y_test), abs=2 / 120
    )


def test_k_changes_the_knn_probe() -> None:
    z_train, y_train, z_test, y_test = data(3)
    scores = {probe_accuracies(z_train, y_train, z_test, y_test, k=k)["knn"] for k in (1, 25)}
    assert len(scores) == 2


def test_bad_input() -> None:
    z_train, y_train, z_test, y_test = data()
    with pytest.raises(LCCInputError, match="dimensions"):
        probe_accuracies(z_train, y_train, z_test[:, :3], y_test)
    with pytest.raises(LCCInputError, match="at least 2 classes"):
        probe_accuracies(z_train, np.zeros(300, int), z_test, y_test)
    with pytest.raises(LCCInputError, match="k=301"):
        probe_accuracies(z_train, y_train, z_test, y_test, k=301)
