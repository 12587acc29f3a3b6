"""Linear and k-NN probes: how well a layer's features classify, read with scikit-learn.

Both probes are fitted on training-set features and scored on test-set features of the same
layer. Features are standardised with the training set's mean and standard deviation
(``StandardScaler``), then:

- ``linear``: multinomial logistic regression (``LogisticRegression``, L2, C = 1, lbfgs);
- ``knn``: majority vote of the ``k`` nearest training samples (``KNeighborsClassifier``,
  Euclidean distance on the standardised features, uniform weights).

This is how a network trained without a classifier head objective (label variation of its
output as the loss, ``lcc train --ce-weight 0``, LGG paper sec. 4.2) is read.

>>> rng = np.random.default_rng(0)
>>> z = np.concatenate([rng.normal(0, 1, (20, 3)), rng.normal(6, 1, (20, 3))])
>>> y = np.repeat([0, 1], 20)
>>> probe_accuracies(z, y, z, y, k=3)
{'linear': 1.0, 'knn': 1.0}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lcc.errors import LCCInputError, as_label_vector, as_latent_matrix

__all__ = ["PROBE_K", "knn_probe", "linear_probe", "probe_accuracies"]

#: neighbours of the k-NN probe
PROBE_K = 10


def linear_probe(seed: int = 0, max_iter: int = 1000) -> Any:
    """The linear probe: standardisation then multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))


def knn_probe(k: int = PROBE_K) -> Any:
    """The k-NN probe: standardisation then a k-nearest-neighbour majority vote."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k))


def probe_accuracies(
    train_z: Any,
    train_y: Any,
    test_z: Any,
    test_y: Any,
    *,
    k: int = PROBE_K,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Test accuracy (fraction) of the ``linear`` and ``knn`` probes fitted on the training
    features ``train_z`` (N, ...) with labels ``train_y``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    train = as_latent_matrix(train_z, name="training features")
    test = as_latent_matrix(test_z, name="test features")
    if train.shape[1] != test.shape[1]:
        raise LCCInputError(
            f"training and test features have {train.shape[1]} and {test.shape[1]} dimensions"
        )
    y_train = as_label_vector(train_y, train.shape[0], name="training labels")
    y_test = as_label_vector(test_y, test.shape[0], name="test labels")
    if np.unique(y_train).size < 2:
        raise LCCInputError("a probe needs training samples of at least 2 classes")
    if not 1 <= k <= train.shape[0]:
        raise LCCInputError(f"probe k={k} must lie in 1..{train.shape[0]} (training samples)")
    linear = linear_probe(seed, max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        linear.fit(train, y_train)
    knn = knn_probe(k).fit(train, y_train)
    return {
        "linear": float(np.mean(linear.predict(test) == y_test)),
        "knn": float(np.mean(knn.predict(test) == y_test)),
    }
