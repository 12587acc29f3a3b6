"""Matching clusters to true classes (paper sec. III.C) and the masks derived from it.

The paper finds an optimal one-to-many assignment ``alpha: clusters -> classes`` maximising

    sum_t | {i : y_i = t} ∩ {i : alpha(cluster_i) = t} |            (eq. 3)

through a max-flow/max-weight problem. That objective is the number of samples whose class is
the class of their cluster, which is a sum over clusters ``c`` of ``|c ∩ alpha(c)|``. Each term
depends on ``alpha(c)`` only, and ``alpha`` is unconstrained (any number of clusters may share a
class), so the maximum is reached by maximising every term on its own: give each cluster its
majority class. One ``bincount`` over ``cluster * C + class`` builds the (K, C) overlap table,
an ``argmax`` per row does the rest: O(N + C·K) time and memory. Ties go to the smallest class
value (``argmax`` returns the first maximum and classes are sorted), so the result is
deterministic.

>>> import numpy as np
>>> m = match_clusters([0, 0, 1, 1, 1, 2], [7, 7, 3, 3, 7, 3])
>>> m.cluster_class.tolist(), m.misclustered.tolist(), m.objective
([7, 3, 3], [False, False, False, False, True, False], 5)
>>> correctible_mask([7, 7, 3, 3, 7, 3], m.correctly_clustered, k=2).tolist()
[False, False, False, False, True, False]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lcc.errors import LCCInputError, as_label_vector, check_k

__all__ = ["Matching", "as_class_subset", "correctible_mask", "match_clusters"]


@dataclass(frozen=True)
class Matching:
    """An optimal cluster-to-class assignment and the resulting correctly clustered mask.

    ``cluster_class[c]`` is the class (a value of ``y``) matched to cluster ``c``;
    ``correctly_clustered[i]`` is ``cluster_class[clusters[i]] == y[i]``.
    """

    cluster_class: np.ndarray
    correctly_clustered: np.ndarray

    @property
    def misclustered(self) -> np.ndarray:
        """(N,) bool: samples whose cluster is matched to another class (MC)."""
        return ~self.correctly_clustered

    @property
    def objective(self) -> int:
        """Value of eq. 3 for this matching: the number of correctly clustered samples."""
        return int(np.count_nonzero(self.correctly_clustered))

    @property
    def n_clusters(self) -> int:
        """Number of clusters K."""
        return int(self.cluster_class.shape[0])


def as_labels(y: object, *, name: str = "y") -> np.ndarray:
    """Validate a 1-D vector of non-negative integer labels of any length (int64)."""
    return as_label_vector(y, int(np.shape(y)[0]) if np.ndim(y) else 0, name=name)


def as_cluster_vector(clusters: object, n_samples: int) -> np.ndarray:
    """Validate cluster ids: ``n_samples`` non-negative integers (int64)."""
    return as_label_vector(clusters, n_samples, name="clusters")


def match_clusters(clusters: Sequence[int] | np.ndarray, y: Sequence[int] | np.ndarray) -> Matching:
    """Match every cluster to its majority class: an optimal assignment for eq. 3.

    ``clusters`` are non-negative cluster ids (normally contiguous ``0..K-1``), ``y`` any
    non-negative class labels (need not be contiguous). ``K = max(clusters) + 1``; an id with no
    sample gets the smallest class (it adds nothing to eq. 3 whichever class it gets).

    >>> match_clusters([1, 1, 0], [42, 42, 3]).cluster_class.tolist()
    [3, 42]
    """
    y = as_labels(y)
    clusters = as_cluster_vector(clusters, y.shape[0])
    if y.shape[0] == 0:
        raise LCCInputError("match_clusters got 0 samples; pass at least one labelled sample")
    classes, class_index = np.unique(y, return_inverse=True)
    n_classes = classes.shape[0]
    n_clusters = int(clusters.max()) + 1
    overlap = np.bincount(clusters * n_classes + class_index, minlength=n_clusters * n_classes)
    best = overlap.reshape(n_clusters, n_classes).argmax(axis=1)
    cluster_class = classes[best].astype(np.int64)
    return Matching(cluster_class=cluster_class, correctly_clustered=cluster_class[clusters] == y)


def as_class_subset(classes: object) -> np.ndarray | None:
    """Validate an optional subset of class values (``None`` means all classes)."""
    if classes is None:
        return None
    values = np.atleast_1d(np.asarray(classes))
    if values.ndim != 1:
        raise LCCInputError(f"classes must be a 1-D list of class labels, got shape {values.shape}")
    return np.unique(as_label_vector(values, values.shape[0], name="classes"))


def correctible_mask(
    y: Sequence[int] | np.ndarray,
    correctly_clustered: np.ndarray,
    k: int,
    *,
    classes: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """(N,) bool: misclustered samples whose class has at least ``k`` correctly clustered ones.

    With ``classes`` given, only samples whose class is in ``classes`` can be correctible.

    >>> cc = np.array([True, False, True, False])
    >>> correctible_mask([0, 0, 1, 1], cc, 1, classes=[1]).tolist()
    [False, False, False, True]
    """
    y = as_labels(y)
    cc = as_mask(correctly_clustered, y.shape[0])
    k = check_k(k)
    classes_present, class_index = np.unique(y, return_inverse=True)
    cc_per_class = np.bincount(class_index[cc], minlength=classes_present.shape[0])
    mask = ~cc & (cc_per_class[class_index] >= k)
    subset = as_class_subset(classes)
    if subset is not None:
        mask &= np.isin(y, subset)
    return mask


def as_mask(mask: object, n_samples: int, *, name: str = "correctly_clustered") -> np.ndarray:
    """Validate a boolean mask with one flag per sample."""
    values = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    if values.shape != (n_samples,):
        raise LCCInputError(
            f"{name} must have shape ({n_samples},) (one flag per sample), got {values.shape}"
        )
    if values.dtype != bool:
        raise LCCInputError(f"{name} must be a boolean mask, got dtype {values.dtype}")
    return values
