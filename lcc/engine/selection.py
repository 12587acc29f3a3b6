"""Class-selection policies: which classes LCC corrects, chosen from the confusion graph.

The confusion graph has one node per class; the weight of edge ``(a, b)`` counts the samples of
class ``a`` predicted as ``b`` plus those of ``b`` predicted as ``a``. A policy turns it into the
set of classes whose misclustered samples get correction targets (``classes=`` of
:func:`lcc.engine.refresh.refresh`).

>>> y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3])
>>> y_pred = np.array([1, 0, 0, 1, 2, 3, 3, 3])
>>> graph = confusion_graph(y_true, y_pred, n_classes=4)
>>> graph[[0, 2, 0], [1, 3, 2]].tolist()
[2.0, 1.0, 0.0]
>>> select_classes(graph, "top-pairs", size=1).tolist()
[0, 1]
>>> select_classes(graph, "all") is None
True
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from lcc.engine.choices import CLASS_POLICIES
from lcc.errors import LCCInputError, as_label_vector, check_choice, check_count

ClassPolicy = Literal["all", "top-pairs", "heaviest-set", "largest-component"]


def confusion_graph(y_true: object, y_pred: object, n_classes: int) -> np.ndarray:
    """Return the symmetric (C, C) float64 confusion graph with a zero diagonal.

    Entry ``(a, b)`` is the number of samples of class ``a`` predicted ``b`` plus the number of
    samples of class ``b`` predicted ``a``.

    >>> confusion_graph([0, 1, 1], [1, 0, 2], n_classes=3).tolist()
    [[0.0, 2.0, 0.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    check_count(n_classes, name="n_classes", minimum=1)
    n_samples = np.shape(y_true)[0] if np.ndim(y_true) >= 1 else 0
    truth = as_label_vector(y_true, n_samples, name="y_true")
    pred = as_label_vector(y_pred, truth.shape[0], name="y_pred")
    for name, labels in (("y_true", truth), ("y_pred", pred)):
        if labels.size and labels.max() >= n_classes:
            raise LCCInputError(
                f"{name} holds class {labels.max()} but n_classes={n_classes}; "
                f"pass n_classes > {labels.max()}"
            )
    counts = np.bincount(truth * n_classes + pred, minlength=n_classes * n_classes)
    counts = counts.reshape(n_classes, n_classes).astype(np.float64)
    graph = counts + counts.T
    np.fill_diagonal(graph, 0.0)
    return graph


def _as_confusion(confusion: object) -> np.ndarray:
    graph = np.array(confusion, dtype=np.float64)
    if graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
        raise LCCInputError(f"confusion must be a square (C, C) matrix, got shape {graph.shape}")
    if not np.isfinite(graph).all() or (graph < 0).any():
        raise LCCInputError("confusion must hold finite, non-negative weights")
    if not np.allclose(graph, graph.T):
        raise LCCInputError("confusion must be symmetric; build it with confusion_graph()")
    np.fill_diagonal(graph, 0.0)
    return graph


def _check_size(size: object, policy: str, low: int, high: int, what: str) -> int:
    if size is None:
        raise LCCInputError(f"class policy {policy!r} needs a size (the number of {what})")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise LCCInputError(f"size must be an integer, got {size!r}")
    if not low <= size <= high:
        raise LCCInputError(
            f"size={size} for class policy {policy!r} must be between {low} and {high} "
            f"(the number of {what} available)"
        )
    return int(size)


def top_pairs(confusion: object, n_pairs: int) -> np.ndarray:
    """Return the (P, 2) class pairs ``a < b`` with the heaviest confusion, heaviest first.

    Only pairs with positive confusion count, so ``P <= n_pairs``; ties go to the smaller
    class ids.

    >>> top_pairs([[0, 3, 1], [3, 0, 0], [1, 0, 0]], 3).tolist()
    [[0, 1], [0, 2]]
    """
    graph = _as_confusion(confusion)
    n = graph.shape[0]
    n_pairs = _check_size(n_pairs, "top-pairs", 1, max(1, n * (n - 1) // 2), "class pairs")
    a, b = np.triu_indices(n, k=1)
    weights = graph[a, b]
    order = np.lexsort((b, a, -weights))  # heaviest first, then by (a, b)
    order = order[weights[order] > 0][:n_pairs]
    return np.stack([a[order], b[order]], axis=1).astype(np.int64)


def heaviest_set(confusion: object, size: int) -> np.ndarray:
    """Return a connected set of ``size`` classes with large total internal confusion (greedy).

    Greedy growth, not an exact optimum (that problem is NP-hard): start from the heaviest
    confused pair, then repeatedly add the class with the largest total confusion to the
    current set (ties to the smaller id). The set stays connected, so it stops early, with fewer
    than ``size`` classes, when no other class is confused with it; no confusion at all gives an
    empty set. Returns the sorted class ids.

    >>> graph = np.zeros((4, 4)); graph[0, 1] = graph[1, 0] = 5; graph[1, 3] = graph[3, 1] = 2
    >>> heaviest_set(graph, 3).tolist()
    [0, 1, 3]
    """
    graph = _as_confusion(confusion)
    n = graph.shape[0]
    size = _check_size(size, "heaviest-set", 2, max(2, n), "classes")
    pairs = top_pairs(graph, 1)
    if pairs.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    chosen = [int(pairs[0, 0]), int(pairs[0, 1])]
    inside = np.zeros(n, dtype=bool)
    inside[chosen] = True
    gain = graph[chosen].sum(axis=0)  # confusion of every class with the current set
    while len(chosen) < size:
        candidates = np.where(inside, -1.0, gain)
        best = int(np.argmax(candidates))  # first maximum: the smallest id among ties
        if candidates[best] <= 0:
            break
        chosen.append(best)
        inside[best] = True
        gain += graph[best]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def largest_component(confusion: object) -> np.ndarray:
    """Return the sorted classes of the largest connected component of the confusion graph.

    Edges are the pairs with positive confusion. Ties in size go to the component with the larger
    total internal confusion, then to the one holding the smallest class id. A graph without
    any confusion gives an empty set.

    >>> graph = np.zeros((5, 5)); graph[0, 4] = graph[4, 0] = 1
    >>> graph[1, 2] = graph[2, 1] = 3
    >>> largest_component(graph).tolist()
    [1, 2]
    """
    graph = _as_confusion(confusion)
    if not (graph > 0).any():
        return np.zeros(0, dtype=np.int64)
    n_components, component = connected_components(csr_matrix(graph > 0), directed=False)
    sizes = np.bincount(component, minlength=n_components)
    weight = np.bincount(component, weights=graph.sum(axis=1), minlength=n_components) / 2
    first = np.full(n_components, graph.shape[0], dtype=np.int64)
    np.minimum.at(first, component, np.arange(graph.shape[0]))
    best = np.lexsort((first, -weight, -sizes))[0]
    return np.flatnonzero(component == best).astype(np.int64)


def select_classes(
    confusion: object, policy: ClassPolicy | str, size: int | None = None
) -> np.ndarray | None:
    """Return the sorted class ids a policy selects, or ``None`` for ``"all"`` classes.

    - ``"all"``: ``None`` (no restriction; ``size`` must be ``None``);
    - ``"top-pairs"``: the classes of the ``size`` most confused pairs (:func:`top_pairs`);
    - ``"heaviest-set"``: a connected set of ``size`` classes grown greedily from the heaviest
      pair (:func:`heaviest_set`);
    - ``"largest-component"``: the largest connected component (:func:`largest_component`;
      ``size`` must be ``None``).

    Policies return an empty array when nothing is confused (nothing to correct).

    >>> graph = confusion_graph([0, 1, 2, 3], [1, 0, 3, 3], n_classes=4)
    >>> select_classes(graph, "largest-component").tolist()
    [0, 1]
    """
    check_choice(policy, CLASS_POLICIES, name="class policy")
    if policy in ("all", "largest-component") and size is not None:
        raise LCCInputError(f"class policy {policy!r} takes no size; got size={size}")
    if policy == "all":
        _as_confusion(confusion)
        return None
    if policy == "top-pairs":
        return np.unique(top_pairs(confusion, size)).astype(np.int64)  # type: ignore[arg-type]
    if policy == "heaviest-set":
        return heaviest_set(confusion, size)  # type: ignore[arg-type]
    return largest_component(confusion)
