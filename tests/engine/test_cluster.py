"""Graph clustering against independent oracles: networkx modularity, planted partitions."""

from __future__ import annotations

import random

import igraph
import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import brute_force_knn_graph
from sklearn.metrics import adjusted_rand_score

from lcc.engine.cluster import (
    CLUSTER_METHODS,
    Clustering,
    as_adjacency,
    cluster_graph,
    modularity,
    relabel,
)
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture


def random_graph(seed: int, n: int, density: float, weighted: bool) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)) < density, 1)
    weights = rng.uniform(0.1, 3.0, size=(n, n)) if weighted else np.ones((n, n))
    dense = np.where(upper, weights, 0.0)
    return sp.csr_matrix(dense + dense.T)


def hierarchical_graph(seed: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """4 groups x 3 blocks x 30 nodes: dense blocks, looser groups, sparse in between."""
    rng = np.random.default_rng(seed)
    block = np.repeat(np.arange(12), 30)
    group = block // 3
    same_block = block[:, None] == block[None, :]
    same_group = group[:, None] == group[None, :]
    p = np.where(same_block, 0.5, np.where(same_group, 0.08, 0.003))
    upper = np.triu(rng.random(p.shape) < p, 1)
    return sp.csr_matrix((upper | upper.T).astype(np.float64)), block, group


def networkx_modularity(adjacency: sp.csr_matrix, labels: np.ndarray, gamma: float) -> float:
    graph = nx.from_scipy_sparse_array(adjacency)
    communities = [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
    return nx.community.modularity(graph, communities, weight="weight", resolution=gamma)


@pytest.fixture(scope="module")
def planted() -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """k-NN graph of 12 well-separated blobs (4 classes x 3 sub-clusters)."""
    z, y, sub = gaussian_mixture(1_200, 16, 4, 3, seed=0)
    return brute_force_knn_graph(z, 15), y, sub


# --- modularity -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 25),
    density=st.floats(0.05, 0.9),
    weighted=st.booleans(),
    n_labels=st.integers(1, 6),
    gamma=st.sampled_from([0.3, 1.0, 2.5]),
)
def test_modularity_matches_networkx(seed, n, density, weighted, n_labels, gamma):
    adjacency = random_graph(seed, n, density, weighted)
    labels = np.random.default_rng(seed + 1).integers(0, n_labels, size=n) * 7  # not contiguous
    if adjacency.nnz == 0:
        assert modularity(adjacency, labels, gamma) == 0.0
        return
    expected = networkx_modularity(adjacency, labels, gamma)
    assert modularity(adjacency, labels, gamma) == pytest.approx(expected, abs=1e-12)


def test_modularity_of_a_known_partition():
    # two disjoint edges, one cluster each: Q = 2 * (1/2 - (2/4)^2) = 0.5
    a = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]))
    assert modularity(a, [0, 0, 1, 1]) == pytest.approx(0.5)
    assert modularity(a, [0, 0, 0, 0]) == pytest.approx(0.0)


# --- planted partitions -----------------------------------------------------------------


@pytest.mark.parametrize("method", CLUSTER_METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_subclusters(planted, method, seed):
    adjacency, _, sub = planted
    clustering = cluster_graph(adjacency, method, seed=seed)
    assert adjusted_rand_score(sub, clustering.labels) >= 0.95


@pytest.mark.parametrize("method", CLUSTER_METHODS)
def test_result_is_contiguous_by_first_occurrence_with_its_modularity(planted, method):
    adjacency, _, _ = planted
    clustering = cluster_graph(adjacency, method, seed=0)
    labels = clustering.labels
    assert isinstance(clustering, Clustering)
    assert labels.dtype == np.int64 and labels.shape == (adjacency.shape[0],)
    values, first = np.unique(labels, return_index=True)
    assert values.tolist() == list(range(clustering.n_clusters))
    assert np.all(np.diff(first) > 0)  # cluster c first appears before cluster c + 1
    expected = networkx_modularity(adjacency, labels, 1.0)
    assert clustering.modularity == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("method", ["leiden", "louvain"])
def test_resolution_selects_the_level_of_a_hierarchy(method):
    adjacency, block, group = hierarchical_graph(0)
    coarse = cluster_graph(adjacency, method, resolution=0.5, seed=0)
    fine = cluster_graph(adjacency, method, resolution=3.0, seed=0)
    assert adjusted_rand_score(group, coarse.labels) >= 0.95
    assert adjusted_rand_score(block, fine.labels) >= 0.95
    # each result is the better one under its own resolution (networkx as the judge)
    for gamma, own, other in [(0.5, coarse, fine), (3.0, fine, coarse)]:
        own_q = networkx_modularity(adjacency, own.labels, gamma)
        assert own_q > networkx_modularity(adjacency, other.labels, gamma)


def test_leiden_reaches_the_modularity_of_an_unbounded_run():
    # our tolerance-stopped Leiden vs igraph iterating until no pass improves
    adjacency, _, _ = hierarchical_graph(1)
    ours = cluster_graph(adjacency, "leiden", seed=0).modularity
    upper = sp.triu(adjacency, 1).tocoo()
    graph = igraph.Graph(n=adjacency.shape[0], edges=np.column_stack([upper.row, upper.col]))
    reference = graph.community_leiden(objective_function="modularity", n_iterations=-1)
    assert ours >= networkx_modularity(adjacency, np.array(reference.membership), 1.0) - 1e-3


# --- determinism and random state -------------------------------------------------------


@pytest.mark.parametrize("method", CLUSTER_METHODS)
def test_same_seed_same_labels_and_seed_is_used(method):
    adjacency = random_graph(3, 150, 0.05, weighted=False)  # no clear structure: seed matters
    first = cluster_graph(adjacency, method, seed=11).labels
    np.testing.assert_array_equal(first, cluster_graph(adjacency, method, seed=11).labels)
    others = {tuple(cluster_graph(adjacency, method, seed=s).labels) for s in range(6)}
    assert len(others) > 1


@pytest.mark.parametrize("method", ["leiden", "louvain"])
def test_global_random_state_untouched_and_igraph_generator_restored(method, planted):
    adjacency, _, _ = planted
    random.seed(123)
    state = random.getstate()
    cluster_graph(adjacency, method, seed=5)
    assert random.getstate() == state
    # igraph draws from the `random` module again: reseeding it reproduces igraph's draws
    random.seed(7)
    one = igraph.Graph.Erdos_Renyi(n=30, p=0.2).get_edgelist()
    random.seed(7)
    assert igraph.Graph.Erdos_Renyi(n=30, p=0.2).get_edgelist() == one


# --- edge cases -------------------------------------------------------------------------


@pytest.mark.parametrize("method", CLUSTER_METHODS)
def test_graph_without_edges_and_isolated_nodes(method):
    empty = sp.csr_matrix((5, 5))
    clustering = cluster_graph(empty, method)
    assert clustering.labels.tolist() == [0, 1, 2, 3, 4]
    assert clustering.modularity == 0.0
    single = cluster_graph(sp.csr_matrix((1, 1)), method)
    assert single.labels.tolist() == [0] and single.n_clusters == 1
    # two triangles plus two isolated nodes: the isolated nodes are singletons
    triangle = np.ones((3, 3)) - np.eye(3)
    dense = np.zeros((8, 8))
    dense[:3, :3] = triangle
    dense[4:7, 4:7] = triangle
    for seed in range(5):
        labels = cluster_graph(dense, method, seed=seed).labels
        assert np.count_nonzero(labels == labels[3]) == 1
        assert np.count_nonzero(labels == labels[7]) == 1
        if method != "peer-pressure":  # synchronous moves may leave a triangle split
            assert labels.tolist() == [0, 0, 0, 1, 2, 2, 2, 3]


def test_accepts_dense_coo_and_weighted_input_without_modifying_it():
    dense = np.array([[0, 2.0, 0], [2.0, 0, 0.5], [0, 0.5, 0]])
    coo = sp.coo_matrix(dense)
    data_before = coo.data.copy()
    for form in (dense, coo, sp.csr_array(dense), dense > 0):
        assert cluster_graph(form, "leiden").labels.shape == (3,)
    np.testing.assert_array_equal(coo.data, data_before)
    canonical = as_adjacency(sp.csr_matrix(([1.0, 0.0, 1.0], ([0, 0, 1], [1, 1, 0])), (2, 2)))
    assert canonical.nnz == 2 and canonical[0, 1] == 1.0  # duplicates summed, zeros dropped


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=40))
def test_relabel_matches_a_first_occurrence_loop(values):
    mapping: dict[int, int] = {}
    expected = [mapping.setdefault(v, len(mapping)) for v in values]
    assert relabel(np.array(values, dtype=np.int64)).tolist() == expected


# --- bad input --------------------------------------------------------------------------

SYMMETRIC = np.array([[0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize(
    ("adjacency", "message"),
    [
        (np.ones((2, 3)), "square"),
        (np.array([[0.0, 1.0], [0.0, 0.0]]), "not symmetric"),
        (np.array([[0.0, 1.0], [2.0, 0.0]]), "not symmetric"),
        (np.array([[0.0, -1.0], [-1.0, 0.0]]), "negative"),
        (np.array([[0.0, np.nan], [np.nan, 0.0]]), "NaN"),
        (np.array([[1.0, 1.0], [1.0, 0.0]]), "diagonal"),
        (np.ones(3), "2-D"),
        ("graph", "2-D"),
        (SYMMETRIC.astype(complex), "real"),
        (np.zeros((0, 0)), "no nodes"),
    ],
)
def test_bad_adjacency_is_rejected_with_a_clear_message(adjacency, message):
    for call in (
        lambda: cluster_graph(adjacency),
        lambda: modularity(adjacency, np.zeros(2, dtype=int)),
    ):
        with pytest.raises(LCCInputError, match=message):
            call()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "kmeans"}, "method='kmeans' is not one of"),
        ({"resolution": 0.0}, "resolution"),
        ({"resolution": float("nan")}, "resolution"),
        ({"resolution": "1"}, "resolution"),
        ({"method": "peer-pressure", "resolution": 2.0}, "peer-pressure has no resolution"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"patience": 0}, "patience"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(LCCInputError, match=message):
        cluster_graph(SYMMETRIC, **kwargs)


@pytest.mark.parametrize(
    ("labels", "message"),
    [([0, 1, 2], "2 samples"), ([0, -1], "non-negative"), ([0.5, 1], "integer")],
)
def test_bad_labels_are_rejected(labels, message):
    with pytest.raises(LCCInputError, match=message):
        modularity(SYMMETRIC, labels)
