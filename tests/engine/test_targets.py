"""Exact and approximate correction targets against brute-force loops; the Targets container."""

from __future__ import annotations

import numpy as np
import pytest

import lcc.engine.targets as targets_module
from lcc.engine.match import Matching, match_clusters
from lcc.engine.targets import Targets, approximate_targets, choose_representatives, exact_targets
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture


def planted(n: int = 600, dim: int = 16, n_classes: int = 5, seed: int = 0):
    """Latents, labels, and a noisy clustering (sub-clusters with 15% of ids scrambled)."""
    z, y, sub = gaussian_mixture(n, dim, n_classes, 3, separation=4.0, seed=seed)
    rng = np.random.default_rng(seed)
    clusters = sub.copy()
    scrambled = rng.random(n) < 0.15
    clusters[scrambled] = rng.integers(0, sub.max() + 1, scrambled.sum())
    return z, y, clusters


def brute_force_exact(z, y, cc, k, classes=None, metric="l2"):
    """Per sample: sort distances (float64) to the CC samples of its class, average the k first."""
    z64 = z.astype(np.float64)
    space = z64 / np.linalg.norm(z64, axis=1, keepdims=True) if metric == "cosine" else z64
    expected = {}
    for i in range(len(y)):
        if cc[i] or (classes is not None and y[i] not in classes):
            continue
        pool = [j for j in range(len(y)) if cc[j] and y[j] == y[i]]
        if len(pool) < k:
            continue
        dist = [float(np.linalg.norm(space[i] - space[j])) for j in pool]
        nearest = [pool[p] for p in np.argsort(dist, kind="stable")[:k]]
        expected[i] = z64[nearest].mean(axis=0)
    return expected


def assert_targets_equal(got: Targets, expected: dict[int, np.ndarray], n: int) -> None:
    assert got.n_samples == n
    assert got.indices.tolist() == sorted(expected)
    assert got.vectors.dtype == np.float32 and got.indices.dtype == np.int64
    if expected:
        want = np.stack([expected[i] for i in sorted(expected)])
        np.testing.assert_allclose(got.vectors, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize(("k", "metric", "seed"), [(1, "l2", 0), (5, "l2", 1), (7, "cosine", 2)])
def test_exact_targets_match_brute_force(k: int, metric: str, seed: int, backend: str) -> None:
    z, y, clusters = planted(seed=seed)
    cc = match_clusters(clusters, y).correctly_clustered
    got = exact_targets(z, y, cc, k, metric=metric, backend=backend)
    assert got.n_correctible > 50
    assert_targets_equal(got, brute_force_exact(z, y, cc, k, metric=metric), len(y))


def test_exact_targets_skip_classes_with_too_few_cc_samples_and_honour_classes() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(80, 6)).astype(np.float32)
    y = np.repeat([3, 7, 42, 50], 20)
    cc = rng.random(80) < 0.6
    cc[y == 7] = False
    cc[np.flatnonzero(y == 7)[:4]] = True  # class 7 has 4 CC samples: not enough for k=5
    got = exact_targets(z, y, cc, 5, classes=[7, 42, 50])
    expected = brute_force_exact(z, y, cc, 5, classes={7, 42, 50})
    assert all(y[i] in (42, 50) for i in expected)
    assert_targets_equal(got, expected, 80)


def test_exact_targets_with_tiny_chunks_match_brute_force(monkeypatch) -> None:
    z, y, clusters = planted(n=300, seed=4)
    cc = match_clusters(clusters, y).correctly_clustered
    monkeypatch.setattr(targets_module, "CHUNK_BYTES", 4 * 100)  # a few queries per chunk
    for backend in ("faiss", "torch"):
        got = exact_targets(z, y, cc, 3, backend=backend)
        assert_targets_equal(got, brute_force_exact(z, y, cc, 3), len(y))


def test_exact_targets_of_many_classes_match_brute_force() -> None:
    # 200 classes x 3 sub-clusters: one faiss search per class, with 1-30 CC samples per class
    z, y, sub = gaussian_mixture(3_000, 8, 200, 3, separation=3.0, seed=9)
    rng = np.random.default_rng(9)
    clusters = np.where(rng.random(3_000) < 0.2, rng.integers(0, 600, 3_000), sub)
    cc = match_clusters(clusters, y).correctly_clustered
    got = exact_targets(z, y, cc, 4)
    expected = brute_force_exact(z, y, cc, 4)
    assert len(expected) > 100
    assert_targets_equal(got, expected, len(y))


def test_exact_targets_flatten_trailing_dimensions() -> None:
    z, y, clusters = planted(n=200, dim=12, seed=5)
    cc = match_clusters(clusters, y).correctly_clustered
    flat = exact_targets(z, y, cc, 2)
    shaped = exact_targets(z.reshape(200, 3, 4), y, cc, 2)
    np.testing.assert_array_equal(flat.indices, shaped.indices)
    np.testing.assert_array_equal(flat.vectors, shaped.vectors)


def test_no_correctible_sample_gives_empty_targets() -> None:
    z = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    t = exact_targets(z, np.zeros(10, np.int64), np.ones(10, bool), 2)
    assert t.n_correctible == 0 and t.vectors.shape == (0, 3)
    assert np.isnan(t.dense()).all() and not t.correctible.any()


def test_choose_representatives_picks_one_cc_member_per_cluster_uniformly() -> None:
    clusters = np.array([0, 0, 0, 0, 1, 1, 3, 3, 3])
    cc = np.array([True, True, False, True, False, False, True, True, True])
    seen: dict[int, set[int]] = {0: set(), 3: set()}
    for seed in range(60):
        reps = choose_representatives(clusters, cc, seed=seed)
        assert reps.shape == (4,) and reps.dtype == np.int64
        assert reps[1] == -1 and reps[2] == -1  # no CC member / no member at all
        for c in (0, 3):
            assert clusters[reps[c]] == c and cc[reps[c]]
            seen[c].add(int(reps[c]))
        np.testing.assert_array_equal(reps, choose_representatives(clusters, cc, seed=seed))
    assert seen == {0: {0, 1, 3}, 3: {6, 7, 8}}
    assert choose_representatives(clusters, cc, n_clusters=6).shape == (6,)


def brute_force_approximate(z, y, clusters, matching, reps, classes=None):
    """Per MC sample: nearest representative (float64) among clusters matched to its class."""
    expected = {}
    for i in range(len(y)):
        if matching.correctly_clustered[i] or (classes is not None and y[i] not in classes):
            continue
        pool = [
            int(reps[c])
            for c in range(len(matching.cluster_class))
            if matching.cluster_class[c] == y[i] and reps[c] >= 0
        ]
        if not pool:
            continue
        dist = [float(np.linalg.norm(z[i].astype(np.float64) - z[j])) for j in pool]
        expected[i] = z[pool[int(np.argmin(dist))]].astype(np.float64)
    return expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_approximate_targets_match_brute_force_given_the_representatives(seed: int) -> None:
    z, y, clusters = planted(seed=seed)
    matching = match_clusters(clusters, y)
    reps = choose_representatives(clusters, matching.correctly_clustered, seed=seed)
    got = approximate_targets(z, y, clusters, matching, seed=seed)
    expected = brute_force_approximate(z, y, clusters, matching, reps)
    assert len(expected) > 20
    assert_targets_equal(got, expected, len(y))


def test_approximate_targets_classes_without_representatives_and_subset() -> None:
    rng = np.random.default_rng(7)
    z = rng.normal(size=(12, 4)).astype(np.float32)
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 5, 5, 5])
    clusters = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    # cluster 3 is matched to class 5 but empty: class 5 has no representative
    cluster_class = np.array([0, 1, 2, 5])
    matching = Matching(cluster_class, cluster_class[clusters] == y)
    reps = choose_representatives(clusters, matching.correctly_clustered, seed=3, n_clusters=4)
    for classes in (None, [0, 5]):
        got = approximate_targets(z, y, clusters, matching, classes=classes, seed=3)
        expected = brute_force_approximate(z, y, clusters, matching, reps, classes=classes)
        assert_targets_equal(got, expected, 12)
    assert approximate_targets(z, y, clusters, matching, seed=3).indices.tolist() == [2]


def test_targets_container() -> None:
    t = Targets(np.array([1, 4]), np.arange(6, dtype=np.float64).reshape(2, 3), n_samples=5)
    assert t.vectors.dtype == np.float32 and t.dim == 3 and t.n_correctible == 2
    assert t.correctible.tolist() == [False, True, False, False, True]
    dense = t.dense()
    assert dense.shape == (5, 3) and dense.dtype == np.float32
    assert np.isnan(dense[[0, 2, 3]]).all()
    np.testing.assert_array_equal(dense[[1, 4]], t.vectors)


@pytest.mark.parametrize(
    ("indices", "vectors", "n"),
    [([1, 0], np.zeros((2, 2)), 3), ([0, 5], np.zeros((2, 2)), 3), ([0], np.zeros((2, 2)), 3)],
)
def test_targets_container_rejects_inconsistent_fields(indices, vectors, n) -> None:
    with pytest.raises(LCCInputError):
        Targets(np.array(indices), vectors, n_samples=n)


def test_bad_inputs_are_rejected() -> None:
    z, y, clusters = planted(n=60)
    matching = match_clusters(clusters, y)
    cc = matching.correctly_clustered
    with pytest.raises(LCCInputError, match="labels but there are"):
        exact_targets(z, y[:-1], cc, 2)
    with pytest.raises(LCCInputError, match="shape"):
        exact_targets(z, y, cc[:-1], 2)
    with pytest.raises(LCCInputError, match="k=60"):
        exact_targets(z, y, cc, 60)
    with pytest.raises(LCCInputError, match="metric"):
        exact_targets(z, y, cc, 2, metric="manhattan")
    with pytest.raises(LCCInputError, match="backend"):
        exact_targets(z, y, cc, 2, backend="gpu")
    with pytest.raises(LCCInputError, match="NaN"):
        exact_targets(np.full_like(z, np.nan), y, cc, 2)
    with pytest.raises(LCCInputError, match="matching has"):
        approximate_targets(z, y, clusters, Matching(matching.cluster_class[:2], cc))
    with pytest.raises(LCCInputError, match="clusters"):
        approximate_targets(z, y, clusters[:-1], matching)
