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
from typing import TYPE_CHECKING

import numpy as np

from lcc.engine.choices import CLUSTER_METHODS, ClusterMethod
from lcc.engine.graph import EdgeList, as_adjacency, compact_labels, relabel
from lcc.engine.peer_pressure import run_peer_pressure
from lcc.errors import LCCInputError, check_choice, check_count

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

# Leiden stops once a pass gains less modularity than this.
_LEIDEN_TOLERANCE = 1e-3
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
    gamma = check_resolution(resolution)
    return EdgeList.from_adjacency(matrix).modularity(compact, n_clusters, gamma)


def check_resolution(resolution: float) -> float:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, float, np.number)):
        raise LCCInputError(f"resolution must be a number, got {resolution!r}")
    if not (math.isfinite(resolution) and resolution > 0):
        raise LCCInputError(f"resolution={resolution} must be a positive finite number")
    return float(resolution)


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


def _igraph_graph(edges: EdgeList) -> tuple[igraph.Graph, str | None]:
    """The igraph graph of ``edges`` and its weight attribute: weights are attached unless the
    graph is unweighted (all ones), which igraph does faster."""
    import igraph

    graph = igraph.Graph(n=edges.n_nodes, directed=False)
    graph.add_edges(np.column_stack([edges.source, edges.target]))
    if edges.weight.size == 0 or np.all(edges.weight == 1.0):
        return graph, None
    graph.es["weight"] = edges.weight
    return graph, "weight"


def _leiden(edges: EdgeList, resolution: float, seed: int, max_iterations: int) -> np.ndarray:
    graph, weights = _igraph_graph(edges)
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
    graph, weights = _igraph_graph(edges)
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
    gamma = check_resolution(resolution)
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
        raw = run_peer_pressure(matrix, seed, max_iterations, patience).labels
    labels = relabel(raw)
    return Clustering(labels, edges.modularity(labels, int(labels.max()) + 1))
