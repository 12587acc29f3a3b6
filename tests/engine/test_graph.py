"""The k-NN graph against a networkx graph built by a plain loop over brute-force neighbours."""

from __future__ import annotations

import tracemalloc

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from lcc.engine.graph import knn_graph, median_bandwidth
from lcc.engine.knn import Neighbors, knn
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture


def brute_neighbours(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Distance matrix (float64, inf diagonal) and each row's k nearest others by full sort."""
    z = z.astype(np.float64)
    distances = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(axis=-1))
    np.fill_diagonal(distances, np.inf)
    return distances, np.argsort(distances, axis=1, kind="stable")[:, :k]


def networkx_graph(z: np.ndarray, k: int, bandwidth: float | None) -> nx.Graph:
    """i ~ j when either is among the other's k nearest; weight exp(-d^2/s^2) or 1."""
    distances, nearest = brute_neighbours(z, k)
    graph = nx.Graph()
    graph.add_nodes_from(range(len(z)))
    for i in range(len(z)):
        for j in nearest[i]:
            weight = 1.0 if bandwidth is None else np.exp(-(distances[i, j] ** 2) / bandwidth**2)
            graph.add_edge(i, int(j), weight=weight)
    return graph


def assert_well_formed(graph: sp.csr_matrix, n: int) -> None:
    assert sp.issparse(graph) and graph.format == "csr"
    assert graph.shape == (n, n) and graph.dtype in (np.float32, np.float64)
    assert graph.diagonal().sum() == 0
    assert (graph.data > 0).all()  # no explicit zeros
    assert abs(graph - graph.T).max() == 0  # exactly symmetric


@pytest.mark.parametrize("k", [1, 4, 10])
def test_unweighted_graph_matches_networkx(k: int) -> None:
    z, _, _ = gaussian_mixture(150, 8, 3, 2, seed=k)
    graph = knn_graph(knn(z, k))
    assert_well_formed(graph, 150)
    oracle = nx.to_scipy_sparse_array(networkx_graph(z, k, None), nodelist=range(150))
    assert (graph != oracle).nnz == 0
    assert set(np.unique(graph.data)) == {1.0}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_rbf_weights_follow_the_formula_with_median_bandwidth(metric: str) -> None:
    z, _, _ = gaussian_mixture(120, 6, 3, 2, seed=9)
    space = z / np.linalg.norm(z, axis=1, keepdims=True) if metric == "cosine" else z
    neighbors = knn(z, 5, metric=metric)
    distances, nearest = brute_neighbours(space, 5)
    bandwidth = float(np.median(np.take_along_axis(distances, nearest, axis=1)))
    assert median_bandwidth(neighbors) == pytest.approx(bandwidth, rel=1e-4)
    graph = knn_graph(neighbors, weights="rbf")
    assert_well_formed(graph, 120)
    oracle = nx.to_scipy_sparse_array(networkx_graph(space, 5, bandwidth), nodelist=range(120))
    assert ((graph != 0) != (oracle != 0)).nnz == 0
    np.testing.assert_allclose(graph.toarray(), oracle.toarray(), rtol=1e-3, atol=1e-7)


def test_explicit_bandwidth_and_underflow_keep_every_edge() -> None:
    z, _, _ = gaussian_mixture(100, 16, 2, 2, seed=3)
    neighbors = knn(z, 3)
    unweighted = knn_graph(neighbors)
    tiny = knn_graph(neighbors, weights="rbf", bandwidth=1e-6)  # exp(-huge) underflows to 0
    assert_well_formed(tiny, 100)
    assert ((tiny != 0) != (unweighted != 0)).nnz == 0
    wide = knn_graph(neighbors, weights="rbf", bandwidth=2.0).tocoo()
    d = np.linalg.norm(z[wide.row].astype(np.float64) - z[wide.col], axis=1)
    np.testing.assert_allclose(wide.data, np.exp(-(d**2) / 4.0), rtol=1e-4)


def test_directed_weights_symmetrise_to_the_larger_one() -> None:
    # 0 -> 1 at distance 1, 1 -> 0 at distance 2 (inconsistent, as approximate distances can be)
    neighbors = Neighbors(np.array([[1], [0], [1]]), np.array([[1.0], [2.0], [3.0]]))
    graph = knn_graph(neighbors, weights="rbf", bandwidth=1.0).toarray()
    assert graph[0, 1] == graph[1, 0] == pytest.approx(np.exp(-1.0))
    assert graph[1, 2] == graph[2, 1] == pytest.approx(np.exp(-9.0))


def test_self_neighbours_are_dropped() -> None:
    neighbors = Neighbors(np.array([[0, 1], [1, 0], [2, 0]]), np.zeros((3, 2)))
    graph = knn_graph(neighbors)
    assert_well_formed(graph, 3)
    assert graph.toarray().tolist() == [[0, 1, 1], [1, 0, 0], [1, 0, 0]]


def test_median_bandwidth_guards_zero() -> None:
    duplicates = Neighbors(np.array([[1], [0], [0], [0]]), np.array([[0.0], [0.0], [0.0], [4.0]]))
    assert median_bandwidth(duplicates) == 4.0
    assert median_bandwidth(Neighbors(np.array([[1], [0]]), np.zeros((2, 1)))) == 1.0
    graph = knn_graph(Neighbors(np.array([[1], [0]]), np.zeros((2, 1))), weights="rbf")
    assert graph.toarray().tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_graph_memory_stays_linear_in_edges() -> None:
    n, k = 20_000, 10
    rng = np.random.default_rng(0)
    offsets = rng.choice(np.arange(1, n), size=k, replace=False)
    indices = (np.arange(n)[:, None] + offsets[None, :]) % n
    neighbors = Neighbors(indices, rng.random((n, k)))
    tracemalloc.start()
    graph = knn_graph(neighbors, weights="rbf")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert graph.nnz <= 2 * n * k
    assert peak < 100 * 2**20  # an N x N float64 matrix would be 3 GB


@pytest.mark.parametrize(
    ("neighbors", "kwargs", "match"),
    [
        (np.zeros((3, 1), dtype=int), {}, "Neighbors"),
        (Neighbors(np.array([[1], [3], [0]]), np.ones((3, 1))), {}, r"\[0, 3\)"),
        (Neighbors(np.array([[1], [-1], [0]]), np.ones((3, 1))), {}, r"\[0, 3\)"),
        (Neighbors(np.array([[1, 1], [0, 2], [0, 1]]), np.ones((3, 2))), {}, "twice"),
        (Neighbors(np.array([[1], [0], [0]]), -np.ones((3, 1))), {}, "non-negative"),
        (Neighbors(np.array([[1], [0], [0]]), np.full((3, 1), np.nan)), {}, "finite"),
        (Neighbors(np.array([[1], [0], [0]]), np.ones((3, 1))), {"weights": "gauss"}, "weights"),
        (
            Neighbors(np.array([[1], [0], [0]]), np.ones((3, 1))),
            {"weights": "rbf", "bandwidth": 0.0},
            "positive",
        ),
        (
            Neighbors(np.array([[1], [0], [0]]), np.ones((3, 1))),
            {"weights": "rbf", "bandwidth": float("nan")},
            "positive",
        ),
    ],
)
def test_knn_graph_rejects_bad_input(neighbors: object, kwargs: dict, match: str) -> None:
    with pytest.raises(LCCInputError, match=match):
        knn_graph(neighbors, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bandwidth", [1.0, 0.5])
def test_refresh_weighs_its_graph_with_the_chosen_bandwidth(bandwidth: float) -> None:
    """refresh(weights=rbf, bandwidth=s): the modularity it reports is that of its clusters on
    the oracle graph exp(-||zi - zj||^2 / s^2) (s = 1: the paper's unscaled kernel, sec. III.B),
    and not on the median-scaled one."""
    from oracles import brute_force_knn_graph

    from lcc.engine.refresh import refresh

    z, y, _ = gaussian_mixture(n_samples=150, dim=4, n_classes=3, seed=2)
    z = (z * 0.3).astype(np.float32)
    result = refresh(z, y, k=5, knn="exact", weights="rbf", bandwidth=bandwidth)
    links = brute_force_knn_graph(z, 5).tocoo()
    graph = nx.Graph()
    graph.add_nodes_from(range(len(z)))
    for i, j in zip(links.row, links.col, strict=True):
        distance = np.linalg.norm(z[i].astype(np.float64) - z[j])
        graph.add_edge(int(i), int(j), weight=float(np.exp(-(distance**2) / bandwidth**2)))
    communities = [set(np.flatnonzero(result.clusters == c)) for c in np.unique(result.clusters)]
    expected = nx.algorithms.community.modularity(graph, communities, weight="weight")
    assert result.modularity == pytest.approx(expected, abs=1e-6)
    median = refresh(z, y, k=5, knn="exact", weights="rbf")
    assert median.summary()["bandwidth"] == "median"
    assert result.summary()["bandwidth"] == bandwidth


def test_a_bandwidth_without_rbf_weights_is_refused() -> None:
    from lcc.engine.refresh import refresh

    z, y, _ = gaussian_mixture(n_samples=60, dim=4, n_classes=3, seed=2)
    with pytest.raises(LCCInputError, match="weights=rbf only"):
        refresh(z, y, k=5, bandwidth=1.0)
