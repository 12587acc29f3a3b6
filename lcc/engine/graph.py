"""Graphs of latents: the symmetric k-NN graph as a sparse adjacency matrix, the checks of a
weighted undirected graph (:func:`as_adjacency`), its edge list (:class:`EdgeList`) and label
renumbering, shared by :mod:`lcc.engine.cluster` and :mod:`lcc.engine.peer_pressure`.

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
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lcc.engine.choices import WEIGHTS, Weights
from lcc.engine.knn import Neighbors
from lcc.errors import LCCInputError, as_label_vector, check_choice

__all__ = [
    "WEIGHTS",
    "EdgeList",
    "as_adjacency",
    "compact_labels",
    "knn_graph",
    "median_bandwidth",
    "relabel",
]

# Relative tolerance of the symmetry check (weights are floats).
_SYMMETRY_RTOL = 1e-5


def knn_graph(
    neighbors: Neighbors, *, weights: Weights = "unweighted", bandwidth: float | None = None
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


@dataclass(frozen=True)
class EdgeList:
    """Upper-triangle view of a validated adjacency: each undirected edge once.

    ``source < target`` elementwise; ``degree`` is the weighted degree of every node and
    ``volume`` their sum (twice the total edge weight).
    """

    n_nodes: int
    source: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    degree: np.ndarray

    @property
    def volume(self) -> float:
        """vol(V): the sum of all weighted degrees."""
        return float(self.degree.sum())

    @classmethod
    def from_adjacency(cls, adjacency: sp.csr_matrix) -> EdgeList:
        """Build from a matrix already checked by :func:`as_adjacency`."""
        n = adjacency.shape[0]
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(adjacency.indptr))
        upper = adjacency.indices > rows
        return cls(
            n_nodes=n,
            source=rows[upper],
            target=adjacency.indices[upper].astype(np.int64),
            weight=adjacency.data[upper],
            degree=np.asarray(adjacency.sum(axis=1), dtype=np.float64).ravel(),
        )

    def cluster_volumes(self, labels: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
        """Per cluster: (vol(C), total weight of the edges inside C, each edge once)."""
        volume = np.bincount(labels, weights=self.degree, minlength=n_clusters)
        source_label = labels[self.source]
        inside = source_label == labels[self.target]
        return volume, np.bincount(
            source_label[inside], weights=self.weight[inside], minlength=n_clusters
        )

    def modularity(self, labels: np.ndarray, n_clusters: int, resolution: float = 1.0) -> float:
        """Modularity of contiguous ``labels`` (values < ``n_clusters``)."""
        total = self.volume
        if total <= 0:
            return 0.0
        volume, internal = self.cluster_volumes(labels, n_clusters)
        fraction = volume / total
        return float(2.0 * internal.sum() / total - resolution * np.dot(fraction, fraction))


def as_adjacency(adjacency: object, *, name: str = "adjacency") -> sp.csr_matrix:
    """Validate a weighted undirected graph and return it as a canonical float64 CSR matrix.

    Accepts any scipy sparse matrix or a dense 2-D array. It must be square, finite,
    non-negative, symmetric, with a zero diagonal; explicit zeros are dropped. The input is
    never modified.

    >>> as_adjacency(np.array([[0, 1], [1, 0]])).nnz
    2
    >>> as_adjacency(np.array([[0, 1], [0, 0]]))
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: adjacency is not symmetric: entry (0, 1) is 1 but (1, 0) is 0; \
pass A.maximum(A.T) or (A + A.T) / 2
    """
    matrix = _to_csr(adjacency, name)
    if matrix.shape[0] != matrix.shape[1]:
        raise LCCInputError(
            f"{name} must be a square (N, N) matrix, got shape {matrix.shape}; "
            "pass the graph's adjacency matrix"
        )
    if matrix.shape[0] < 1:
        raise LCCInputError(f"{name} has no nodes; pass a graph with at least one node")
    if not np.isfinite(matrix.data).all():
        raise LCCInputError(f"{name} contains NaN or inf weights; pass finite edge weights")
    if matrix.data.size and matrix.data.min() < 0:
        raise LCCInputError(
            f"{name} has negative weight {matrix.data.min():g}; edge weights must be >= 0"
        )
    if matrix.diagonal().any():
        raise LCCInputError(
            f"{name} has a non-zero diagonal (self-loops); remove them with "
            "A.setdiag(0); A.eliminate_zeros()"
        )
    _check_symmetric(matrix, name)
    return matrix


def _to_csr(adjacency: object, name: str) -> sp.csr_matrix:
    """Convert to a canonical float64 CSR matrix without touching the caller's arrays."""
    source = adjacency if sp.issparse(adjacency) else np.asarray(adjacency)
    if not sp.issparse(source) and (source.dtype == object or source.ndim != 2):
        raise LCCInputError(
            f"{name} must be a 2-D scipy.sparse matrix or array, got "
            f"{type(adjacency).__name__} with shape {source.shape}"
        )
    if not (
        np.issubdtype(source.dtype, np.floating)
        or np.issubdtype(source.dtype, np.integer)
        or source.dtype == bool
    ):
        raise LCCInputError(f"{name} must hold real edge weights, got dtype {source.dtype}")
    if source.ndim != 2:
        raise LCCInputError(f"{name} must be 2-D, got shape {source.shape}")
    matrix = sp.csr_matrix(source, dtype=np.float64, copy=True)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return matrix


def _check_symmetric(matrix: sp.csr_matrix, name: str) -> None:
    transpose = matrix.T.tocsr()
    transpose.sort_indices()
    if (
        np.array_equal(matrix.indptr, transpose.indptr)
        and np.array_equal(matrix.indices, transpose.indices)
        and np.allclose(matrix.data, transpose.data, rtol=_SYMMETRY_RTOL, atol=0.0)
    ):
        return
    difference = (matrix - transpose).tocoo()
    worst = int(np.argmax(np.abs(difference.data)))
    i, j = int(difference.row[worst]), int(difference.col[worst])
    raise LCCInputError(
        f"{name} is not symmetric: entry ({i}, {j}) is {matrix[i, j]:g} but ({j}, {i}) is "
        f"{matrix[j, i]:g}; pass A.maximum(A.T) or (A + A.T) / 2"
    )


def relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber labels to ``0..K-1`` in order of first occurrence (int64).

    >>> relabel(np.array([7, 3, 7, 9, 3])).tolist()
    [0, 1, 0, 2, 1]
    """
    values = np.asarray(labels).ravel()
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size, dtype=np.int64)
    return rank[inverse.ravel()]


def compact_labels(labels: object, n_nodes: int) -> tuple[np.ndarray, int]:
    """Validate labels for an ``n_nodes`` graph; return them renumbered 0..K-1 (sorted) and K.

    >>> compact_labels([9, 4, 9], 3)[0].tolist()
    [1, 0, 1]
    """
    vector = as_label_vector(labels, n_nodes, name="labels")
    if vector.size == 0:
        return vector, 0
    _, inverse = np.unique(vector, return_inverse=True)
    inverse = inverse.ravel().astype(np.int64)
    return inverse, int(inverse.max()) + 1
