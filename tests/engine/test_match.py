"""Cluster-to-class matching against a min-cost-flow oracle and brute force; masks; bad input."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcc.engine.match import Matching, correctible_mask, match_clusters
from lcc.errors import LCCInputError


def eq3_objective(clusters: np.ndarray, y: np.ndarray, alpha: dict[int, int]) -> int:
    """Eq. 3 computed literally: sum over classes t of |{y_i = t} ∩ {alpha(c_i) = t}|."""
    total = 0
    for t in set(y.tolist()):
        in_class = {i for i in range(len(y)) if y[i] == t}
        matched = {i for i in range(len(y)) if alpha[int(clusters[i])] == t}
        total += len(in_class & matched)
    return total


def flow_oracle(clusters: np.ndarray, y: np.ndarray) -> tuple[int, dict[int, int]]:
    """The paper's flow network (eq. 4-6) solved by networkx; returns (objective, alpha)."""
    graph = nx.DiGraph()
    source, sink = ("top",), ("bottom",)
    classes = sorted(set(y.tolist()))
    cluster_ids = sorted(set(clusters.tolist()))
    for t in classes:
        graph.add_edge(source, ("class", t), weight=0)  # no capacity attribute: infinite
        for c in cluster_ids:
            overlap = int(np.sum((y == t) & (clusters == c)))
            graph.add_edge(("class", t), ("cluster", c), capacity=1, weight=-overlap)
    for c in cluster_ids:
        graph.add_edge(("cluster", c), sink, capacity=1, weight=0)
    flow = nx.max_flow_min_cost(graph, source, sink)
    alpha = {}
    for t in classes:
        for c in cluster_ids:
            if flow[("class", t)][("cluster", c)] > 0:
                alpha[c] = t
    assert len(alpha) == len(cluster_ids)  # the paper's proposition: one class per cluster
    return -nx.cost_of_flow(graph, flow), alpha


labelled_samples = st.integers(min_value=1, max_value=40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 6), min_size=n, max_size=n),
        st.lists(st.sampled_from([0, 3, 7, 42, 1000]), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None)
@given(labelled_samples)
def test_objective_equals_min_cost_flow_oracle(data: tuple[list[int], list[int]]) -> None:
    clusters = np.unique(np.array(data[0]), return_inverse=True)[1]  # contiguous 0..K-1
    y = np.array(data[1])
    matching = match_clusters(clusters, y)
    oracle_value, oracle_alpha = flow_oracle(clusters, y)
    assert matching.objective == oracle_value
    alpha = dict(enumerate(matching.cluster_class.tolist()))
    assert eq3_objective(clusters, y, alpha) == oracle_value
    assert eq3_objective(clusters, y, oracle_alpha) == oracle_value


def test_objective_equals_exhaustive_search_on_small_cases() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 15))
        clusters = np.unique(rng.integers(0, 4, n), return_inverse=True)[1]
        y = rng.choice([2, 5, 9], n)
        classes = sorted(set(y.tolist()))
        k = int(clusters.max()) + 1
        best = max(
            eq3_objective(clusters, y, dict(enumerate(choice)))
            for choice in itertools.product(classes, repeat=k)
        )
        assert match_clusters(clusters, y).objective == best


def test_masks_follow_the_assignment_on_random_data() -> None:
    rng = np.random.default_rng(1)
    clusters = rng.integers(0, 20, 500)
    y = rng.integers(0, 5, 500) * 3 + 1
    m = match_clusters(clusters, y)
    assert m.cluster_class.dtype == np.int64 and m.cluster_class.shape == (20,)
    assert set(m.cluster_class.tolist()) <= set(y.tolist())
    expected = np.array([m.cluster_class[c] == t for c, t in zip(clusters, y, strict=True)])
    np.testing.assert_array_equal(m.correctly_clustered, expected)
    np.testing.assert_array_equal(m.misclustered, ~expected)
    assert m.n_clusters == 20 and m.objective == int(expected.sum())


def test_ties_go_to_the_smallest_class_and_empty_ids_get_the_smallest_class() -> None:
    m = match_clusters([0, 0, 2, 2, 2], [7, 3, 42, 42, 7])
    assert m.cluster_class.tolist() == [3, 3, 42]
    assert isinstance(m, Matching)
    assert m.correctly_clustered.tolist() == [False, True, True, True, False]


def test_non_contiguous_labels_are_reported_as_given() -> None:
    m = match_clusters([0, 0, 1, 1, 2], [42, 42, 7, 7, 3])
    assert m.cluster_class.tolist() == [42, 7, 3]
    assert m.objective == 5 and not m.misclustered.any()


def test_correctible_mask_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    for trial in range(40):
        n = int(rng.integers(2, 60))
        y = rng.choice([1, 4, 8, 30], n)
        cc = rng.random(n) < rng.random()
        k = int(rng.integers(1, 6))
        classes = None if trial % 2 else rng.choice([1, 4, 8, 30], 2, replace=False)
        got = correctible_mask(y, cc, k, classes=classes)
        expected = np.array(
            [
                (not cc[i])
                and sum(1 for j in range(n) if cc[j] and y[j] == y[i]) >= k
                and (classes is None or y[i] in set(classes.tolist()))
                for i in range(n)
            ]
        )
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("clusters", "y", "message"),
    [
        ([0, 1], [0, 1, 1], "labels but there are"),
        ([0, -1, 1], [0, 1, 1], "non-negative"),
        ([0, 1, 1], [0, -3, 1], "non-negative"),
        ([0, 1, 1], [0.5, 1, 1], "integer"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([], [], "0 samples"),
        ([0, 1], ["a", "b"], "integer"),
    ],
)
def test_match_clusters_rejects_bad_input(clusters: list, y: list, message: str) -> None:
    with pytest.raises(LCCInputError, match=message):
        match_clusters(clusters, y)


@pytest.mark.parametrize(
    ("y", "cc", "k", "classes", "message"),
    [
        ([0, 1], np.array([True]), 1, None, "shape"),
        ([0, 1], np.array([1, 0]), 1, None, "boolean"),
        ([0, 1], np.array([True, False]), 0, None, "at least 1"),
        ([0, 1], np.array([True, False]), 1.5, None, "integer"),
        ([0, 1], np.array([True, False]), 1, [[0]], "1-D"),
        ([0, 1], np.array([True, False]), 1, [-1], "non-negative"),
    ],
)
def test_correctible_mask_rejects_bad_input(
    y: list, cc: np.ndarray, k: object, classes: object, message: str
) -> None:
    with pytest.raises(LCCInputError, match=message):
        correctible_mask(y, cc, k, classes=classes)  # type: ignore[arg-type]
