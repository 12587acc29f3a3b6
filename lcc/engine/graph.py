"""The symmetric k-NN graph of latents, as a sparse adjacency matrix.

Samples ``i`` and ``j`` are linked when either is among the other's ``k`` nearest neighbours; no
sample is linked to itself. Edges weigh 1 (``"unweighted"``, the default) or
``exp(-||zi - zj||^2 / s^2)`` (``"rbf"``), where the bandwidth ``s`` defaults to the median k-NN
distance: the paper's raw ``exp(-||zi - zj||^2)`` underflows to 0 in high dimension.

>>> import numpy as np
>>> from lcc.engine.knn import knn
>>> graph = knn_graph(knn(np.array([[0.0], [1.0], [5.0]]), 1))
>>> graph.toarray().tolist()
[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import scipy.sparse as sp

from lcc.engine.knn import Neighbors
from lcc.errors import LCCInputError, check_choice

Weights = Literal["unweighted", "rbf"]
WEIGHTS: tuple[str, ...] = ("unweighted", "rbf")


def knn_graph(
    neighbors: Neighbors,
    *,
    weights: Weights = "unweighted",
    bandwidth: float | None = None,
) -> sp.csr_matrix:
    """Symmetric ``(N, N)`` float64 CSR adjacency of the k-NN graph, zero diagonal.

    An edge found in both directions keeps the larger of its two weights. RBF weights are
    clipped below at the smallest positive float64, so every k-NN link stays an edge (the
    matrix holds no explicit zeros). ``bandwidth`` overrides the median k-NN distance.

    >>> from lcc.engine.knn import knn
    >>> g = knn_graph(knn(np.array([[0.0], [1.0], [3.0]]), 1), weights="rbf", bandwidth=1.0)
    >>> np.round(g.toarray(), 4).tolist()
    [[0.0, 0.3679, 0.0], [0.3679, 0.0, 0.0183], [0.0, 0.0183, 0.0]]
    """
    check_choice(weights, WEIGHTS, name="weights")
    n, k = _check_neighbors(neighbors)
    if weights == "rbf":
        scale = median_bandwidth(neighbors) if bandwidth is None else _check_bandwidth(bandwidth)
        ratio = neighbors.distances.astype(np.float64) / scale
        with np.errstate(over="ignore", under="ignore"):
            data = np.maximum(np.exp(-(ratio**2)), np.finfo(np.float64).tiny)
    else:
        data = np.ones((n, k), dtype=np.float64)
    directed = _directed(neighbors.indices, data)
    if weights == "unweighted":
        graph = (directed + directed.T).tocsr()
        graph.data[:] = 1.0
    else:
        graph = directed.maximum(directed.T.tocsr()).tocsr()
    graph.sort_indices()
    return graph


def _directed(indices: np.ndarray, data: np.ndarray) -> sp.csr_matrix:
    """CSR matrix with row ``i`` holding ``data[i]`` at columns ``indices[i]``, diagonal dropped."""
    n, k = indices.shape
    order = np.argsort(indices, axis=1, kind="stable")
    cols = np.take_along_axis(indices, order, axis=1)
    if k > 1 and (cols[:, 1:] == cols[:, :-1]).any():
        row = int(np.flatnonzero((cols[:, 1:] == cols[:, :-1]).any(axis=1))[0])
        raise LCCInputError(
            f"row {row} of the neighbour indices lists a sample twice; each row must hold "
            "distinct neighbours"
        )
    keep = cols != np.arange(n)[:, None]
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    values = np.take_along_axis(data, order, axis=1)[keep]
    matrix = sp.csr_matrix((values, cols[keep], indptr), shape=(n, n))
    matrix.has_sorted_indices = True
    return matrix


def median_bandwidth(neighbors: Neighbors) -> float:
    """Median k-NN distance: the default RBF bandwidth.

    Zero distances (duplicate samples) are skipped when they would make the median 0; with no
    positive distance at all the bandwidth is 1.

    >>> median_bandwidth(Neighbors(np.array([[1], [0], [1]]), np.array([[0.0], [0.0], [3.0]])))
    3.0
    """
    distances = np.asarray(neighbors.distances, dtype=np.float64).ravel()
    median = float(np.median(distances)) if distances.size else 0.0
    if median > 0 and math.isfinite(median):
        return median
    positive = distances[distances > 0]
    return float(np.median(positive)) if positive.size else 1.0


def _check_neighbors(neighbors: Neighbors) -> tuple[int, int]:
    if not isinstance(neighbors, Neighbors):
        raise LCCInputError(
            "knn_graph needs a lcc.engine.knn.Neighbors (from lcc.engine.knn.knn), got "
            f"{type(neighbors).__name__}"
        )
    n, k = neighbors.indices.shape
    if n and (neighbors.indices.min() < 0 or neighbors.indices.max() >= n):
        raise LCCInputError(
            f"neighbour indices must lie in [0, {n}) for {n} samples; pass the k-NN of the "
            "samples themselves"
        )
    distances = neighbors.distances
    if distances.size and (not np.isfinite(distances).all() or distances.min() < 0):
        raise LCCInputError("neighbour distances must be finite and non-negative")
    return n, k


def _check_bandwidth(bandwidth: float) -> float:
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.floating)):
        raise LCCInputError(f"bandwidth must be a positive number, got {bandwidth!r}")
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise LCCInputError(f"bandwidth must be positive and finite, got {bandwidth}")
    return float(bandwidth)
