"""k-NN peer pressure and conductance against brute-force loops and planted partitions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import brute_force_knn_graph
from sklearn.metrics import adjusted_rand_score

from lcc.engine.peer_pressure import _move, conductance, peer_pressure, peer_pressure_trace
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture


def naive_conductance(dense: np.ndarray, labels: list[int]) -> float:
    """Eq. 10 per cluster with plain loops, averaged with weights vol(C) / vol(V)."""
    n = len(labels)
    total = sum(dense[i][j] for i in range(n) for j in range(n))
    if total == 0:
        return 1.0
    weighted = 0.0
    for cluster in set(labels):
        inside = [i for i in range(n) if labels[i] == cluster]
        outside = [j for j in range(n) if labels[j] != cluster]
        cut = sum(dense[i][j] for i in inside for j in outside)
        volume = sum(dense[i][j] for i in inside for j in range(n))
        denominator = min(volume, total - volume)
        phi = 1.0 if denominator == 0 else cut / denominator
        weighted += volume * phi
    return weighted / total


def random_dense(seed: int, n: int, density: float, integer: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < density, 1)
    weights = rng.integers(1, 4, size=(n, n)) if integer else rng.uniform(0.1, 2.0, (n, n))
    dense = np.where(upper, weights, 0).astype(np.float64)
    return dense + dense.T


@pytest.fixture(scope="module")
def planted() -> tuple[sp.csr_matrix, np.ndarray]:
    """k-NN graph of 12 well-separated blobs (4 classes x 3 sub-clusters) and the blob ids."""
    z, _, sub = gaussian_mixture(1_200, 16, 4, 3, seed=1)
    return brute_force_knn_graph(z, 15), sub


# --- conductance ------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 14),
    density=st.floats(0.0, 1.0),
    integer=st.booleans(),
    n_labels=st.integers(1, 5),
)
def test_conductance_matches_a_naive_loop(seed, n, density, integer, n_labels):
    dense = random_dense(seed, n, density, integer)
    labels = (np.random.default_rng(seed + 1).integers(0, n_labels, size=n) * 3).tolist()
    expected = naive_conductance(dense, labels)
    value = conductance(sp.csr_matrix(dense), labels)
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert 0.0 <= value <= 1.0


def test_conductance_known_values():
    path = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=float)
    assert conductance(path, [0, 0, 1]) == 1.0  # cut 1: phi 1/1 for both sides
    assert conductance(path, [0, 0, 0]) == 1.0  # one cluster with every edge: phi = 1
    two_edges = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=float)
    assert conductance(two_edges, [0, 0, 1, 1]) == 0.0
    assert conductance(np.zeros((3, 3)), [0, 1, 2]) == 1.0  # no edges


# --- the move ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 20), n_labels=st.integers(1, 6))
def test_a_move_sends_every_node_to_its_heaviest_neighbouring_community(seed, n, n_labels):
    dense = random_dense(seed, n, 0.4, integer=False)  # continuous weights: no ties
    labels = np.unique(np.random.default_rng(seed).integers(0, n_labels, n), return_inverse=True)[1]
    chosen = []
    for i in range(n):
        totals: dict[int, float] = {}
        for j in range(n):
            if dense[i][j] > 0:
                totals[int(labels[j])] = totals.get(int(labels[j]), 0.0) + dense[i][j]
        chosen.append(max(totals, key=totals.get) if totals else int(labels[i]))
    expected = np.unique(chosen, return_inverse=True)[1]  # same compact numbering as _move
    moved = _move(sp.csr_matrix(dense), labels.astype(np.int64), np.random.default_rng(0))
    np.testing.assert_array_equal(moved, expected)


def test_ties_are_broken_uniformly_at_random():
    # x has one edge to a and one to b; a and b each prefer a heavier partner (a', b'), so after
    # one move from singletons x sits with a' or with b' depending on the tie-break only.
    x, a, a2, b, b2 = range(5)
    dense = np.zeros((5, 5))
    for i, j, w in [(x, a, 1.0), (x, b, 1.0), (a, a2, 5.0), (b, b2, 5.0)]:
        dense[i, j] = dense[j, i] = w
    adjacency = sp.csr_matrix(dense)
    with_a = 0
    for seed in range(400):
        moved = _move(adjacency, np.arange(5, dtype=np.int64), np.random.default_rng(seed))
        assert moved[x] in (moved[a2], moved[b2])
        with_a += int(moved[x] == moved[a2])
    assert 0.4 <= with_a / 400 <= 0.6


# --- the whole procedure ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_recovers_planted_subclusters(planted, seed):
    adjacency, sub = planted
    labels = peer_pressure(adjacency, seed=seed)
    assert adjusted_rand_score(sub, labels) >= 0.95


def test_trace_conductance_decreases_and_the_best_labelling_is_returned(planted):
    adjacency, _ = planted
    patience = 3
    trace = peer_pressure_trace(adjacency, seed=0, max_iterations=100, patience=patience)
    values = trace.conductances
    assert values[0] == 1.0  # singletons
    accepted = values[trace.accepted]
    assert np.all(np.diff(accepted) < 0)
    assert trace.best_iteration == trace.accepted[-1]
    assert values[trace.best_iteration] == values.min()
    dense = adjacency.toarray()
    assert naive_conductance(dense, trace.labels.tolist()) == pytest.approx(values.min())
    moves = values.size - 1
    if moves < 100 and values.min() > 0:  # stopped by patience
        assert moves == trace.best_iteration + patience
        assert np.all(values[-patience:] >= values.min())


def test_max_iterations_caps_the_moves(planted):
    adjacency, _ = planted
    trace = peer_pressure_trace(adjacency, seed=0, max_iterations=2, patience=10)
    assert trace.conductances.size == 3


def test_labels_are_contiguous_and_seeded(planted):
    adjacency, _ = planted
    labels = peer_pressure(adjacency, seed=4)
    assert labels.dtype == np.int64
    values, first = np.unique(labels, return_index=True)
    assert values.tolist() == list(range(values.size)) and np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(labels, peer_pressure(adjacency, seed=4))
    noise = sp.csr_matrix(random_dense(0, 120, 0.06, integer=True))
    assert len({tuple(peer_pressure(noise, seed=s)) for s in range(5)}) > 1


def test_isolated_nodes_keep_their_own_community(planted):
    adjacency, _ = planted
    n = adjacency.shape[0]
    padded = sp.block_diag([adjacency, sp.csr_matrix((3, 3))]).tocsr()
    labels = peer_pressure(padded, seed=0)
    for node in range(n, n + 3):
        assert np.count_nonzero(labels == labels[node]) == 1
    assert peer_pressure(sp.csr_matrix((4, 4))).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adjacency": np.array([[0.0, 1.0], [0.0, 0.0]])}, "not symmetric"),
        ({"adjacency": np.ones((2, 3))}, "square"),
        ({"adjacency": np.array([[0.0, -2.0], [-2.0, 0.0]])}, "negative"),
        ({"seed": -3}, "seed"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"patience": -1}, "patience"),
    ],
)
def test_bad_input_is_rejected(kwargs, message):
    arguments = {"adjacency": np.array([[0.0, 1.0], [1.0, 0.0]]), **kwargs}
    adjacency = arguments.pop("adjacency")
    with pytest.raises(LCCInputError, match=message):
        peer_pressure(adjacency, **arguments)
    if "adjacency" in kwargs:
        with pytest.raises(LCCInputError, match=message):
            conductance(adjacency, [0, 1])


def test_conductance_rejects_bad_labels():
    with pytest.raises(LCCInputError, match="labels"):
        conductance(np.array([[0.0, 1.0], [1.0, 0.0]]), [0, 1, 1])
