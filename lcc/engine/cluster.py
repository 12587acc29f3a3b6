"""Community detection on the k-NN graph: Leiden, Louvain, k-NN peer pressure (paper III, VI.A).

:func:`cluster_graph` takes the symmetric sparse adjacency matrix built by
:func:`lcc.engine.graph.knn_graph` and returns a :class:`Clustering`: labels relabelled to
``0..K-1``
in order of first occurrence, and their modularity (eq. 2, resolution 1).

- ``"leiden"``: igraph's Leiden with the modularity objective, run one pass at a time from the
  previous partition until a pass improves the modularity by less than ``1e-3`` (or
  ``max_iterations`` passes): iteration to convergence up to a tolerance, without the long tail
  of passes that each move a handful of nodes. Measured on 10,000 training latents (128-d, k=5):
  3-4 passes instead of 6-8 at ``1e-4``, half the time, modularity 0.001 lower, partitions at
  ARI 0.93-0.99 to the ``1e-4`` ones -- closer than two seeds at ``1e-4`` are (ARI 0.73-0.84).
- ``"louvain"``: igraph's multilevel algorithm, which runs until no move improves modularity.
- ``"peer-pressure"``: :func:`lcc.engine.peer_pressure.peer_pressure`, vectorised with scipy.sparse.

igraph draws its random numbers from a Python generator; every call here installs a
``random.Random(seed)`` for the duration of the call (under a lock) and puts igraph's default
generator, the ``random`` module, back afterwards, so the global ``random`` state is untouched
and the same seed gives the same labels.

>>> import numpy as np, scipy.sparse as sp
>>> edges = [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)]
>>> rows, cols = np.array(edges).T
>>> a = sp.coo_matrix((np.ones(7), (rows, cols)), shape=(6, 6))
>>> a = (a + a.T).tocsr()
>>> c = cluster_graph(a, "leiden", seed=0)
>>> c.labels.tolist(), c.n_clusters, round(c.modularity, 4)
([0, 0, 0, 1, 1, 1], 2, 0.3571)
>>> round(modularity(a, [0, 0, 0, 0, 0, 0]), 4)
0.0
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp

from lcc.errors import LCCInputError, as_label_vector, check_choice

if TYPE_CHECKING:
    import igraph

__all__ = [
    "CLUSTER_METHODS",
    "ClusterMethod",
    "Clustering",
    "EdgeList",
    "as_adjacency",
    "check_count",
    "cluster_graph",
    "compact_labels",
    "modularity",
    "relabel",
]

ClusterMethod = Literal["leiden", "louvain", "peer-pressure"]
CLUSTER_METHODS: tuple[str, ...] = ("leiden", "louvain", "peer-pressure")

# Leiden stops once a pass gains less modularity than this.
_LEIDEN_TOLERANCE = 1e-3
# Relative tolerance of the symmetry check (weights are floats).
_SYMMETRY_RTOL = 1e-5
# igraph's random generator is process-global: serialise the calls that swap it.
_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class Clustering:
    """Result of :func:`cluster_graph`.

    ``labels`` is ``(N,)`` int64 with values ``0..K-1`` numbered by first occurrence;
    ``modularity`` is the modularity (eq. 2, resolution 1) of ``labels`` on the graph.
    """

    labels: np.ndarray
    modularity: float

    @property
    def n_clusters(self) -> int:
        """Number of clusters K."""
        return int(self.labels.max()) + 1 if self.labels.size else 0


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
        degree = np.asarray(adjacency.sum(axis=1), dtype=np.float64).ravel()
        return cls(
            n_nodes=n,
            source=rows[upper],
            target=adjacency.indices[upper].astype(np.int64),
            weight=adjacency.data[upper],
            degree=degree,
        )

    def cluster_volumes(self, labels: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
        """Per cluster: (vol(C), total weight of the edges inside C, each edge once)."""
        volume = np.bincount(labels, weights=self.degree, minlength=n_clusters)
        source_label = labels[self.source]
        inside = source_label == labels[self.target]
        internal = np.bincount(
            source_label[inside], weights=self.weight[inside], minlength=n_clusters
        )
        return volume, internal

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
    if sp.issparse(adjacency):
        source = adjacency
    else:
        array = np.asarray(adjacency)
        if array.dtype == object or array.ndim != 2:
            raise LCCInputError(
                f"{name} must be a 2-D scipy.sparse matrix or array, got "
                f"{type(adjacency).__name__} with shape {array.shape}"
            )
        source = array
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


def modularity(adjacency: object, labels: object, resolution: float = 1.0) -> float:
    """Modularity (eq. 2) of a partition, generalised with a resolution ``gamma``.

    ``Q = sum_c [ w_in(c) / m - gamma * (vol(c) / 2m)^2 ]`` with ``w_in(c)`` the weight of the
    edges inside ``c``, ``vol(c)`` the sum of its weighted degrees and ``m`` the total edge
    weight. Labels may be any non-negative integers. A graph without edges has modularity 0.
    Vectorised: O(N + E).

    >>> import scipy.sparse as sp
    >>> a = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]))
    >>> modularity(a, [5, 5, 2, 2])
    0.5
    """
    matrix = as_adjacency(adjacency)
    compact, n_clusters = compact_labels(labels, matrix.shape[0])
    gamma = _check_resolution(resolution)
    return EdgeList.from_adjacency(matrix).modularity(compact, n_clusters, gamma)


def _check_resolution(resolution: float) -> float:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float, np.number)):
        raise LCCInputError(f"resolution must be a number, got {resolution!r}")
    if not (math.isfinite(resolution) and resolution > 0):
        raise LCCInputError(f"resolution={resolution} must be a positive finite number")
    return float(resolution)


def check_count(value: int, *, name: str, minimum: int) -> int:
    """Validate an integer option such as ``seed``, ``max_iterations`` or ``patience``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LCCInputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise LCCInputError(f"{name}={value} must be at least {minimum}")
    return int(value)


@contextmanager
def _seeded_igraph(seed: int) -> Iterator[None]:
    """Install a ``random.Random(seed)`` as igraph's generator for the duration of the block."""
    import igraph

    with _RNG_LOCK:
        igraph.set_random_number_generator(random.Random(seed))
        try:
            yield
        finally:
            igraph.set_random_number_generator(random)


def _igraph_graph(edges: EdgeList) -> igraph.Graph:
    import igraph

    graph = igraph.Graph(n=edges.n_nodes, directed=False)
    graph.add_edges(np.column_stack([edges.source, edges.target]))
    return graph


def _igraph_weights(edges: EdgeList, graph: igraph.Graph) -> str | None:
    """Attach weights unless the graph is unweighted (all ones), which igraph does faster."""
    if edges.weight.size == 0 or np.all(edges.weight == 1.0):
        return None
    graph.es["weight"] = edges.weight
    return "weight"


def _leiden(edges: EdgeList, resolution: float, seed: int, max_iterations: int) -> np.ndarray:
    graph = _igraph_graph(edges)
    weights = _igraph_weights(edges, graph)
    membership: list[int] | None = None
    quality = -math.inf
    with _seeded_igraph(seed):
        for _ in range(max_iterations):
            partition = graph.community_leiden(
                objective_function="modularity",
                weights=weights,
                resolution=resolution,
                n_iterations=1,
                initial_membership=membership,
            )
            membership = partition.membership
            labels = np.asarray(membership, dtype=np.int64)
            previous, quality = quality, edges.modularity(labels, int(labels.max()) + 1, resolution)
            if quality - previous < _LEIDEN_TOLERANCE:
                break
    return np.asarray(membership, dtype=np.int64)


def _louvain(edges: EdgeList, resolution: float, seed: int) -> np.ndarray:
    graph = _igraph_graph(edges)
    weights = _igraph_weights(edges, graph)
    with _seeded_igraph(seed):
        partition = graph.community_multilevel(weights=weights, resolution=resolution)
    return np.asarray(partition.membership, dtype=np.int64)


def cluster_graph(
    adjacency: object,
    method: ClusterMethod = "leiden",
    *,
    resolution: float = 1.0,
    seed: int = 0,
    max_iterations: int = 100,
    patience: int = 3,
) -> Clustering:
    """Cluster a weighted undirected graph; the same ``seed`` gives the same labels.

    ``resolution`` (gamma of the modularity) applies to ``"leiden"`` and ``"louvain"``: larger
    values give more, smaller clusters. Peer pressure has no resolution and rejects any value
    other than 1. ``max_iterations`` caps the Leiden passes and the peer-pressure moves;
    ``patience`` is the number of non-improving peer-pressure moves tolerated before stopping.
    The reported ``modularity`` is always at resolution 1.
    """
    check_choice(method, CLUSTER_METHODS, name="method")
    gamma = _check_resolution(resolution)
    seed = check_count(seed, name="seed", minimum=0)
    max_iterations = check_count(max_iterations, name="max_iterations", minimum=1)
    patience = check_count(patience, name="patience", minimum=1)
    if method == "peer-pressure" and gamma != 1.0:
        raise LCCInputError(
            f"resolution={resolution} applies to leiden and louvain only; "
            "peer-pressure has no resolution, leave it at 1.0"
        )
    matrix = as_adjacency(adjacency)
    edges = EdgeList.from_adjacency(matrix)
    if method == "leiden":
        raw = _leiden(edges, gamma, seed, max_iterations)
    elif method == "louvain":
        raw = _louvain(edges, gamma, seed)
    else:
        from lcc.engine.peer_pressure import run_peer_pressure

        raw = run_peer_pressure(matrix, seed, max_iterations, patience).labels
    labels = relabel(raw)
    n_clusters = int(labels.max()) + 1
    return Clustering(labels=labels, modularity=edges.modularity(labels, n_clusters))
