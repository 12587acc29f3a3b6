"""k-NN peer pressure clustering and the conductance that stops it (paper sec. VI.A, eq. 10-12).

Every node starts in its own community. At each move *all* nodes at once join the community
with the largest total edge weight among their neighbours, ties broken uniformly at random
(seeded). Moves repeat while the volume-weighted mean conductance (:func:`conductance`)
decreases: a move that does not improve on the best conductance seen so far is tolerated
``patience`` times in a row, then the best labelling seen is returned.

One move is three sparse-matrix operations, no Python loop over nodes: the votes
``A @ B`` (``B`` the N x C membership matrix) are ``A`` with every column index replaced by that
node's community, duplicates summed; a segmented maximum over the CSR rows finds each row's
best weight; a segmented maximum of random priorities among the entries equal to it picks the
winner. Isolated nodes have no votes and keep their own community.

>>> import itertools, numpy as np, scipy.sparse as sp
>>> pairs = [(i, j) for i, j in itertools.combinations(range(10), 2) if (i < 5) == (j < 5)]
>>> rows, cols = np.array([*pairs, (4, 5)]).T  # two 5-cliques joined by the edge 4-5
>>> a = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(10, 10))
>>> a = (a + a.T).tocsr()
>>> peer_pressure(a, seed=0).tolist()
[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
>>> round(conductance(a, [0] * 5 + [1] * 5), 4)  # each side: cut 1, volume 21
0.0476

Synchronous moves can oscillate (two neighbours swapping communities); the best labelling seen
is kept, so an oscillation only costs ``patience`` moves. On very small or clique-like graphs
that can stop the merging early (a triangle may stay split); on k-NN graphs of a thousand nodes
and more it recovers well-separated planted clusters (``bench/bench_cluster.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lcc.engine.graph import EdgeList, as_adjacency, compact_labels, relabel
from lcc.errors import check_count

__all__ = [
    "PeerPressureTrace",
    "conductance",
    "peer_pressure",
    "peer_pressure_trace",
    "run_peer_pressure",
]

# Vote totals within this relative distance of a row's maximum count as tied (float sums).
_TIE_RTOL = 1e-9
# A cluster whose min(vol(C), vol(V \ C)) is below this fraction of vol(V) has phi = 1.
_EMPTY_RTOL = 1e-12


@dataclass(frozen=True)
class PeerPressureTrace:
    """What :func:`peer_pressure_trace` did.

    ``labels``: the returned (best) labelling, ``0..K-1`` by first occurrence.
    ``conductances``: conductance of the starting singletons, then after each move.
    ``best_iteration``: index into ``conductances`` of ``labels``.
    """

    labels: np.ndarray
    conductances: np.ndarray
    best_iteration: int

    @property
    def accepted(self) -> np.ndarray:
        """Indices into ``conductances`` of the start and of each move that beat the best so far."""
        best_so_far = np.minimum.accumulate(self.conductances)
        improved = np.ones(self.conductances.shape, dtype=bool)
        improved[1:] = self.conductances[1:] < best_so_far[:-1]
        return np.flatnonzero(improved)


def conductance(adjacency: object, labels: object) -> float:
    """Volume-weighted mean conductance of a partition, in [0, 1] (0 is a perfect clustering).

    ``phi(C) = cut(C, V \\ C) / min(vol(C), vol(V \\ C))`` (eq. 10), with ``phi(C) = 1`` when the
    denominator is 0 (a cluster holding every edge, or none). The mean weighs each cluster by
    ``vol(C) / vol(V)``. The paper's eq. 11 divides ``sum_C vol(C) phi(C)`` by ``|V|`` instead;
    since ``sum_C vol(C) = vol(V)``, that is this value times the mean degree ``vol(V) / |V|``,
    a constant of the graph, so both rank partitions (and stop peer pressure) identically, and
    only this normalisation keeps the stated range [0, 1]. A graph without edges scores 1.
    Labels may be any non-negative integers. Vectorised: O(N + E).

    >>> import scipy.sparse as sp
    >>> path = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]]))
    >>> conductance(path, [0, 0, 1])  # cut 1; vols 3 and 1: (3 * 1/1 + 1 * 1/1) / 4
    1.0
    >>> conductance(path, [0, 0, 0])  # one cluster holding every edge: phi = 1 by convention
    1.0
    """
    matrix = as_adjacency(adjacency)
    compact, n_clusters = compact_labels(labels, matrix.shape[0])
    return _conductance(EdgeList.from_adjacency(matrix), compact, n_clusters)


def _conductance(edges: EdgeList, labels: np.ndarray, n_clusters: int) -> float:
    total = edges.volume
    if total <= 0:
        return 1.0
    volume, internal = edges.cluster_volumes(labels, n_clusters)
    cut = np.maximum(volume - 2.0 * internal, 0.0)
    denominator = np.minimum(volume, total - volume)
    phi = np.ones(n_clusters)
    defined = denominator > _EMPTY_RTOL * total
    phi[defined] = np.minimum(cut[defined] / denominator[defined], 1.0)
    return float(min(np.dot(volume, phi) / total, 1.0))


def peer_pressure(
    adjacency: object, *, seed: int = 0, max_iterations: int = 100, patience: int = 3
) -> np.ndarray:
    """Cluster a graph by k-NN peer pressure; return (N,) int64 labels ``0..K-1``.

    ``max_iterations`` caps the number of moves; ``patience`` is how many moves in a row may
    fail to lower the best conductance before stopping. The same ``seed`` gives the same labels.
    """
    return peer_pressure_trace(
        adjacency, seed=seed, max_iterations=max_iterations, patience=patience
    ).labels


def peer_pressure_trace(
    adjacency: object, *, seed: int = 0, max_iterations: int = 100, patience: int = 3
) -> PeerPressureTrace:
    """Run :func:`peer_pressure` and also return the conductance after every move."""
    seed = check_count(seed, name="seed", minimum=0)
    max_iterations = check_count(max_iterations, name="max_iterations", minimum=1)
    patience = check_count(patience, name="patience", minimum=1)
    return run_peer_pressure(as_adjacency(adjacency), seed, max_iterations, patience)


def run_peer_pressure(
    matrix: sp.csr_matrix, seed: int, max_iterations: int, patience: int
) -> PeerPressureTrace:
    """:func:`peer_pressure_trace` on a matrix already validated by ``as_adjacency``."""
    n = matrix.shape[0]
    edges = EdgeList.from_adjacency(matrix)
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64)
    best_labels, best_iteration = labels, 0
    history = [_conductance(edges, labels, n)]
    best, stale = history[0], 0
    for iteration in range(1, max_iterations + 1):
        if best <= 0.0 or stale >= patience:
            break
        labels = _move(matrix, labels, rng)
        history.append(_conductance(edges, labels, int(labels.max()) + 1))
        if history[-1] < best:
            best_labels, best_iteration, best, stale = labels, iteration, history[-1], 0
        else:
            stale += 1
    return PeerPressureTrace(
        labels=relabel(best_labels),
        conductances=np.asarray(history, dtype=np.float64),
        best_iteration=best_iteration,
    )


def _move(matrix: sp.csr_matrix, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One synchronous move: every node joins its neighbours' heaviest community."""
    n = matrix.shape[0]
    n_clusters = int(labels.max()) + 1
    votes = sp.csr_matrix(
        (matrix.data.copy(), labels[matrix.indices], matrix.indptr.copy()), shape=(n, n_clusters)
    )
    votes.sum_duplicates()  # now votes == A @ B, one entry per (node, neighbouring community)
    counts = np.diff(votes.indptr)
    voting = counts > 0
    starts = votes.indptr[:-1][voting]
    row = np.repeat(np.arange(n, dtype=np.int64), counts)

    heaviest = np.zeros(n)
    heaviest[voting] = np.maximum.reduceat(votes.data, starts)
    tied = votes.data >= heaviest[row] * (1.0 - _TIE_RTOL)
    priority = np.full(votes.data.shape, -1.0)
    priority[tied] = rng.random(int(np.count_nonzero(tied)))
    top = np.full(n, -1.0)
    top[voting] = np.maximum.reduceat(priority, starts)
    winners = np.flatnonzero(priority == top[row])
    first = np.ones(winners.shape, dtype=bool)
    first[1:] = row[winners[1:]] != row[winners[:-1]]
    winners = winners[first]

    moved = labels.copy()
    moved[row[winners]] = votes.indices[winners]
    present = np.zeros(n_clusters, dtype=bool)
    present[moved] = True
    return (np.cumsum(present) - 1)[moved]
