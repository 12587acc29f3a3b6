"""Class-selection policies against brute force and networkx."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcc.engine.selection import (
    confusion_graph,
    heaviest_set,
    largest_component,
    select_classes,
    top_pairs,
)
from lcc.errors import LCCInputError


def random_graph(rng: np.random.Generator, n: int, density: float = 0.5) -> np.ndarray:
    weights = rng.integers(1, 20, size=(n, n)).astype(np.float64)
    weights *= rng.random((n, n)) < density
    graph = np.triu(weights, 1)
    return graph + graph.T


def to_nx(graph: np.ndarray) -> nx.Graph:
    g = nx.Graph()
    g.add_nodes_from(range(graph.shape[0]))
    for a, b in zip(*np.nonzero(np.triu(graph, 1)), strict=True):
        g.add_edge(int(a), int(b), weight=float(graph[a, b]))
    return g


def internal_weight(graph: np.ndarray, nodes) -> float:
    nodes = list(nodes)
    return float(graph[np.ix_(nodes, nodes)].sum() / 2)


# --- confusion_graph ---------------------------------------------------------------------------


@given(
    st.integers(1, 6).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.lists(st.tuples(st.integers(0, c - 1), st.integers(0, c - 1)), max_size=40),
        )
    )
)
@settings(max_examples=60, deadline=None)
def test_confusion_graph_counts_pairs_by_loop(case):
    n_classes, pairs = case
    y_true = np.array([p[0] for p in pairs], dtype=np.int64)
    y_pred = np.array([p[1] for p in pairs], dtype=np.int64)
    expected = np.zeros((n_classes, n_classes))
    for a in range(n_classes):
        for b in range(n_classes):
            if a != b:
                expected[a, b] = sum(
                    1 for t, p in pairs if (t == a and p == b) or (t == b and p == a)
                )
    graph = confusion_graph(y_true, y_pred, n_classes)
    assert graph.dtype == np.float64
    np.testing.assert_array_equal(graph, expected)


def test_confusion_graph_rejects_bad_input():
    with pytest.raises(LCCInputError, match="n_classes"):
        confusion_graph([0, 3], [0, 1], n_classes=3)
    with pytest.raises(LCCInputError, match="y_pred"):
        confusion_graph([0, 1], [0, 1, 1], n_classes=3)
    with pytest.raises(LCCInputError, match="non-negative"):
        confusion_graph([0, -1], [0, 1], n_classes=3)
    with pytest.raises(LCCInputError, match="at least 1"):
        confusion_graph([], [], n_classes=0)


# --- top-pairs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(15))
def test_top_pairs_are_the_heaviest_pairs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 8))
    graph = random_graph(rng, n)
    all_pairs = list(itertools.combinations(range(n), 2))
    n_pairs = int(rng.integers(1, len(all_pairs) + 1))
    pairs = top_pairs(graph, n_pairs)
    positive = sorted((graph[a, b] for a, b in all_pairs if graph[a, b] > 0), reverse=True)
    # exhaustive oracle: no other choice of the same number of pairs weighs more
    assert len(pairs) == min(n_pairs, len(positive))
    chosen = [graph[a, b] for a, b in pairs]
    assert chosen == positive[: len(pairs)]
    assert all(a < b for a, b in pairs)
    classes = select_classes(graph, "top-pairs", size=n_pairs)
    assert classes.tolist() == sorted({int(c) for pair in pairs for c in pair})


def test_top_pairs_with_distinct_weights_matches_sorted_enumeration():
    rng = np.random.default_rng(3)
    n = 6
    graph = np.triu(rng.permutation(np.arange(1, n * n + 1)).reshape(n, n).astype(float), 1)
    graph = graph + graph.T
    best = sorted(itertools.combinations(range(n), 2), key=lambda p: -graph[p])[:4]
    assert [tuple(p) for p in top_pairs(graph, 4).tolist()] == best


# --- heaviest-set ------------------------------------------------------------------------------


def connected_optimum(graph: np.ndarray, size: int) -> float:
    g = to_nx(graph)
    best = 0.0
    for nodes in itertools.combinations(range(graph.shape[0]), size):
        if nx.is_connected(g.subgraph(nodes)):
            best = max(best, internal_weight(graph, nodes))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_heaviest_set_is_connected_and_bounded_by_exhaustive_optimum(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 8))
    graph = random_graph(rng, n, density=0.6)
    size = int(rng.integers(2, n + 1))
    chosen = heaviest_set(graph, size)
    g = to_nx(graph)
    if not (graph > 0).any():
        assert chosen.size == 0
        return
    component = nx.node_connected_component(g, int(top_pairs(graph, 1)[0, 0]))
    assert len(chosen) == min(size, len(component))
    assert nx.is_connected(g.subgraph(chosen.tolist()))
    weight = internal_weight(graph, chosen)
    heaviest_pair = graph.max()
    assert heaviest_pair <= weight <= connected_optimum(graph, len(chosen)) + 1e-9
    if size == 2:  # greedy is exact for a single pair
        assert weight == heaviest_pair


@pytest.mark.parametrize("seed", range(8))
def test_heaviest_set_finds_a_planted_heavy_clique(seed):
    # a clique whose edges outweigh all other edges together: greedy is optimal there
    rng = np.random.default_rng(seed)
    n, size = 9, 4
    graph = random_graph(rng, n, density=0.7)
    clique = rng.choice(n, size=size, replace=False)
    for a, b in itertools.combinations(clique, 2):
        graph[a, b] = graph[b, a] = 1000 + rng.integers(0, 50)
    chosen = heaviest_set(graph, size)
    assert sorted(chosen.tolist()) == sorted(clique.tolist())
    assert internal_weight(graph, chosen) == connected_optimum(graph, size)


def test_heaviest_set_stops_at_the_component_and_handles_no_confusion():
    graph = np.zeros((5, 5))
    graph[0, 1] = graph[1, 0] = 4
    graph[2, 3] = graph[3, 2] = 1
    assert heaviest_set(graph, 4).tolist() == [0, 1]
    assert heaviest_set(np.zeros((3, 3)), 2).size == 0


# --- largest-component -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_largest_component_matches_networkx(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    graph = random_graph(rng, n, density=0.15)
    chosen = largest_component(graph)
    if not (graph > 0).any():
        assert chosen.size == 0
        return
    components = [sorted(c) for c in nx.connected_components(to_nx(graph))]
    best = max(
        components,
        key=lambda c: (len(c), internal_weight(graph, c), -min(c)),
    )
    assert chosen.tolist() == best
    assert select_classes(graph, "largest-component").tolist() == best


def test_largest_component_ties_go_to_the_heavier_component():
    graph = np.zeros((4, 4))
    graph[0, 1] = graph[1, 0] = 1
    graph[2, 3] = graph[3, 2] = 5
    assert largest_component(graph).tolist() == [2, 3]
    graph[0, 1] = graph[1, 0] = 5
    assert largest_component(graph).tolist() == [0, 1]


# --- select_classes validation -----------------------------------------------------------------


def test_select_classes_all_and_validation():
    graph = confusion_graph([0, 1, 2], [1, 2, 0], n_classes=3)
    assert select_classes(graph, "all") is None
    with pytest.raises(LCCInputError, match="not one of"):
        select_classes(graph, "everything")
    with pytest.raises(LCCInputError, match="needs a size"):
        select_classes(graph, "top-pairs")
    with pytest.raises(LCCInputError, match="between 1 and 3"):
        select_classes(graph, "top-pairs", size=4)
    with pytest.raises(LCCInputError, match="between 2 and 3"):
        select_classes(graph, "heaviest-set", size=1)
    with pytest.raises(LCCInputError, match="integer"):
        select_classes(graph, "heaviest-set", size=2.5)
    with pytest.raises(LCCInputError, match="takes no size"):
        select_classes(graph, "all", size=2)
    with pytest.raises(LCCInputError, match="symmetric"):
        select_classes(np.triu(np.ones((3, 3)), 1), "top-pairs", size=1)
    with pytest.raises(LCCInputError, match="square"):
        select_classes(np.ones((2, 3)), "largest-component")
    with pytest.raises(LCCInputError, match="non-negative"):
        select_classes(-np.ones((2, 2)), "all")
