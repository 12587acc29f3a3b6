"""k-NN search against a brute-force NumPy distance matrix (the independent oracle)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import lcc.engine.knn as knn_module
from lcc.engine.knn import Neighbors, choose_index, knn, knn_recall, search
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture

BACKENDS = ["faiss", "torch"]


def brute_distances(base: np.ndarray, queries: np.ndarray, metric: str = "l2") -> np.ndarray:
    """All pairwise Euclidean distances in float64, by explicit differences."""
    base = base.astype(np.float64)
    queries = queries.astype(np.float64)
    if metric == "cosine":
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = np.empty((len(queries), len(base)))
    for i, query in enumerate(queries):
        out[i] = np.sqrt(((base - query) ** 2).sum(axis=1))
    return out


def self_distances(z: np.ndarray, metric: str = "l2") -> np.ndarray:
    distances = brute_distances(z, z, metric)
    np.fill_diagonal(distances, np.inf)
    return distances


def assert_exact_neighbours(
    indices: np.ndarray, distances: np.ndarray, oracle: np.ndarray, k: int, *, scale: float = 1.0
) -> None:
    """Tie-robust check: the listed rows sit at the true k smallest distances, nearest first.

    Squared distances are compared with a tolerance proportional to ``scale`` (the largest
    squared norm of the centred rows): float32 distance expansions are that accurate, so exact
    duplicates may come back at a distance of about 1e-3 instead of 0.
    """
    n = oracle.shape[0]
    assert indices.shape == distances.shape == (n, k)
    assert indices.dtype == np.int64 and distances.dtype == np.float32
    expected = np.sort(oracle, axis=1)[:, :k] ** 2
    atol = 1e-5 * max(scale, 1.0)
    np.testing.assert_allclose(distances.astype(np.float64) ** 2, expected, rtol=1e-4, atol=atol)
    at_listed = np.take_along_axis(oracle, indices, axis=1) ** 2
    np.testing.assert_allclose(at_listed, expected, rtol=1e-4, atol=atol)
    for row in indices:
        assert len(set(row.tolist())) == k


def spread(z: np.ndarray) -> float:
    """Largest squared norm of the centred rows."""
    centred = z.reshape(len(z), -1) - z.reshape(len(z), -1).mean(axis=0)
    return float((centred.astype(np.float64) ** 2).sum(axis=1).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 7])
def test_exact_knn_matches_brute_force(backend: str, metric: str, k: int) -> None:
    rng = np.random.default_rng(1)
    z = (rng.normal(size=(300, 12)) * 3 + 5).astype(np.float32)
    nb = knn(z, k, metric=metric, backend=backend)
    oracle = self_distances(z, metric)
    assert_exact_neighbours(nb.indices, nb.distances, oracle, k, scale=spread(z))
    assert not (nb.indices == np.arange(300)[:, None]).any()
    assert (np.diff(nb.distances, axis=1) >= 0).all()


def duplicated_points(n_distinct: int, seed: int) -> np.ndarray:
    """Every point 3 times (fewer copies than k+1) and one point 9 times (more than k+1)."""
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=(n_distinct, 6)).astype(np.float32)
    z = np.concatenate([np.repeat(distinct, 3, axis=0), np.repeat(distinct[:1] + 10, 9, axis=0)])
    return z[rng.permutation(len(z))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_with_duplicates_never_lists_the_sample_itself(backend: str) -> None:
    z = duplicated_points(40, seed=2)
    nb = knn(z, 4, backend=backend)
    assert not (nb.indices == np.arange(len(z))[:, None]).any()
    assert_exact_neighbours(nb.indices, nb.distances, self_distances(z), 4, scale=spread(z))


@pytest.mark.parametrize("backend", BACKENDS)
def test_approximate_with_duplicates_finds_the_copies(backend: str) -> None:
    z = duplicated_points(700, seed=3)  # above the size where approximate mode kicks in
    nb = knn(z, 4, mode="approximate", backend=backend)
    rows = np.arange(len(z))
    assert not (nb.indices == rows[:, None]).any()
    assert all(len(set(row.tolist())) == 4 for row in nb.indices)
    copies = (z[nb.indices[:, :2]] == z[:, None, :]).all(axis=-1)
    assert copies.all()  # the two nearest are the other copies of the point
    assert nb.distances[:, :2].max() ** 2 < 1e-5 * spread(z)


def test_all_identical_points() -> None:
    z = np.ones((10, 4), dtype=np.float32)
    for backend in BACKENDS:
        nb = knn(z, 9, backend=backend)
        assert nb.distances.max() < 1e-3
        assert (
            np.sort(nb.indices, axis=1) == [[j for j in range(10) if j != i] for i in range(10)]
        ).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_trailing_dimensions_and_tensors_are_flattened(backend: str) -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(size=(50, 2, 3)).astype(np.float32)
    from_array = knn(z, 3, backend=backend)
    from_tensor = knn(torch.from_numpy(z), 3, backend=backend)
    assert_exact_neighbours(
        from_array.indices, from_array.distances, self_distances(z.reshape(50, 6)), 3
    )
    np.testing.assert_array_equal(from_tensor.indices, from_array.indices)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [5, 30])
@pytest.mark.parametrize("separation", [2.0, 1.5])
def test_approximate_recall_on_clustered_latents(backend: str, k: int, separation: float) -> None:
    # separation 1.5: overlapping blobs, where the first search budget misses the recall target
    # and approximate mode has to widen its search
    z, _, _ = gaussian_mixture(4_000, 64, 10, 3, intrinsic_dim=24, separation=separation, seed=4)
    exact = knn(z, k, backend=backend)
    approximate = knn(z, k, mode="approximate", backend=backend, seed=0)
    recall = knn_recall(approximate, exact)
    assert recall >= 0.95
    assert abs(approximate.recall - recall) <= 0.03  # the sampled estimate it reports
    assert exact.recall == 1.0
    # every returned distance is the true distance of the returned pair, sorted, self excluded
    rows = np.arange(len(z))[:, None]
    true = np.linalg.norm(z[rows] - z[approximate.indices], axis=-1)
    np.testing.assert_allclose(approximate.distances, true, rtol=1e-3, atol=1e-3)
    assert (np.diff(approximate.distances, axis=1) >= 0).all()
    assert not (approximate.indices == rows).any()


INDEX_KINDS = ["ivf-flat", "ivf-pq", "hnsw"]


@pytest.mark.parametrize("index", INDEX_KINDS)
def test_approximate_is_deterministic_under_a_seed(index: str) -> None:
    z, _, _ = gaussian_mixture(3_000, 32, 10, 2, seed=5)
    a = knn(z, 5, mode="approximate", seed=7, index=index)
    b = knn(z, 5, mode="approximate", seed=7, index=index)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.distances, b.distances)
    assert a.recall == b.recall


def clustered_with_copies(seed: int) -> np.ndarray:
    """Overlapping blobs plus exact copies of some rows (ties the search must not trip on)."""
    z, _, _ = gaussian_mixture(2_400, 16, 6, 2, separation=1.5, seed=seed)
    rng = np.random.default_rng(seed)
    return np.concatenate([z, z[rng.choice(len(z), 100, replace=False)]])


def test_ivf_flat_probing_every_list_is_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    # the first search width already covers every inverted list: the faiss IVF path itself
    # (not the exact fallback) must then return the brute-force neighbours
    monkeypatch.setattr(knn_module, "_FIRST_PROBES", 10**6)
    monkeypatch.setattr(knn_module, "_IVF_EXACT_SHARE", 1.0)  # no switch to brute force
    z = clustered_with_copies(seed=11)
    nb = knn(z, 5, mode="approximate", index="ivf-flat")
    assert nb.recall == 1.0
    assert not (nb.indices == np.arange(len(z))[:, None]).any()
    assert_exact_neighbours(nb.indices, nb.distances, self_distances(z), 5, scale=spread(z))


@pytest.mark.parametrize("index", INDEX_KINDS)
def test_approximate_with_an_unreachable_target_is_exact(
    monkeypatch: pytest.MonkeyPatch, index: str
) -> None:
    # no width reaches the target: the rows are searched exactly and the recall says so
    monkeypatch.setattr(knn_module, "_TARGET_RECALL", 1.01)
    z = clustered_with_copies(seed=12)
    nb = knn(z, 5, mode="approximate", index=index)
    assert nb.recall == 1.0
    assert not (nb.indices == np.arange(len(z))[:, None]).any()
    assert_exact_neighbours(nb.indices, nb.distances, self_distances(z), 5, scale=spread(z))


@pytest.mark.parametrize("index", INDEX_KINDS)
@pytest.mark.parametrize("k", [3, 20])
def test_every_index_keeps_the_recall_guarantee_on_overlapping_clusters(
    monkeypatch: pytest.MonkeyPatch, index: str, k: int
) -> None:
    # overlapping blobs in 24 intrinsic dimensions: the first width misses 0.97 for IVF; the
    # switch to brute force is off, so that the index itself has to reach the target
    monkeypatch.setattr(knn_module, "_IVF_EXACT_SHARE", 1.0)
    z, _, _ = gaussian_mixture(4_000, 48, 20, 3, intrinsic_dim=24, separation=1.2, seed=13)
    exact = knn(z, k)
    nb = knn(z, k, mode="approximate", index=index, seed=1)
    recall = knn_recall(nb, exact)
    assert recall >= 0.95
    assert abs(nb.recall - recall) <= 0.03
    rows = np.arange(len(z))[:, None]
    squared = nb.distances.astype(np.float64) ** 2
    true = ((z[rows].astype(np.float64) - z[nb.indices]) ** 2).sum(axis=-1)
    np.testing.assert_allclose(squared, true, rtol=1e-4, atol=1e-5 * spread(z))
    assert (np.diff(nb.distances, axis=1) >= 0).all()
    assert not (nb.indices == rows).any()
    assert all(len(set(row.tolist())) == k for row in nb.indices)


def test_the_recall_target_drives_the_search_width(monkeypatch: pytest.MonkeyPatch) -> None:
    # with no target the first (narrow) width is kept: recall drops well below the guarantee,
    # so the widening is what keeps it (brute-force switch off: the IVF search answers)
    monkeypatch.setattr(knn_module, "_IVF_EXACT_SHARE", 1.0)
    z, _, _ = gaussian_mixture(4_000, 48, 20, 3, intrinsic_dim=24, separation=1.2, seed=13)
    exact = knn(z, 10)
    guarded = knn_recall(knn(z, 10, mode="approximate", index="ivf-flat"), exact)
    monkeypatch.setattr(knn_module, "_TARGET_RECALL", 0.0)
    narrow = knn(z, 10, mode="approximate", index="ivf-flat")
    assert knn_recall(narrow, exact) < 0.95 <= guarded < 1.0
    assert narrow.recall < 0.95


def test_ivf_switches_to_brute_force_when_it_would_scan_too_many_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # unclustered data: the recall target needs many lists; once the width passes the share
    # where brute force is as cheap, the result is the exact one (recall 1.0) ...
    z = np.random.default_rng(15).normal(size=(3_000, 24)).astype(np.float32)
    nb = knn(z, 5, mode="approximate", index="ivf-flat")
    assert nb.recall == 1.0
    assert_exact_neighbours(nb.indices, nb.distances, self_distances(z), 5, scale=spread(z))
    # ... while without the switch the IVF search itself answers, approximately
    monkeypatch.setattr(knn_module, "_IVF_EXACT_SHARE", 1.0)
    ivf = knn(z, 5, mode="approximate", index="ivf-flat")
    assert 0.97 <= ivf.recall < 1.0
    assert knn_recall(ivf, knn(z, 5)) >= 0.95


def test_choose_index_by_size() -> None:
    assert choose_index(50_000, 64) == "ivf-flat"
    assert choose_index(1_280_000, 64) == "ivf-flat"
    assert choose_index(1_280_000, 512) == "ivf-pq"
    assert choose_index(2**30 // (4 * 64), 64) == "ivf-flat"
    assert choose_index(2**30 // (4 * 64) + 1, 64) == "ivf-pq"


def test_approximate_below_the_size_threshold_is_exact() -> None:
    z = clustered_with_copies(seed=14)[:1_500]
    nb = knn(z, 4, mode="approximate")
    assert nb.recall == 1.0
    assert_exact_neighbours(nb.indices, nb.distances, self_distances(z), 4, scale=spread(z))


def test_backends_agree_on_distances() -> None:
    z, _, _ = gaussian_mixture(500, 16, 5, 2, seed=6)
    a, b = knn(z, 10, backend="faiss"), knn(z, 10, backend="torch")
    np.testing.assert_allclose(a.distances, b.distances, rtol=1e-4, atol=1e-4)


def test_auto_falls_back_to_torch_without_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    rng = np.random.default_rng(7)
    z = rng.normal(size=(2_500, 8)).astype(np.float32)
    nb = knn(z[:200], 4)
    oracle = self_distances(z[:200])
    assert_exact_neighbours(nb.indices, nb.distances, oracle, 4, scale=spread(z[:200]))
    approx = knn(z, 4, mode="approximate")  # the torch fallback is exact
    assert approx.recall == 1.0
    assert_exact_neighbours(approx.indices, approx.distances, self_distances(z), 4, scale=spread(z))
    with pytest.raises(LCCInputError, match="faiss"):
        knn(z[:10], 2, backend="faiss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_search_matches_brute_force(metric: str, backend: str) -> None:
    rng = np.random.default_rng(8)
    base = rng.normal(size=(50, 8)).astype(np.float32) + 1
    queries = rng.normal(size=(20, 8)).astype(np.float32) + 1
    oracle = brute_distances(base, queries, metric)
    for k in (1, 6, 50):
        indices, distances = search(base, queries, k, metric=metric, backend=backend)
        assert_exact_neighbours(indices, distances, oracle, k, scale=spread(base))


def test_search_queries_in_base_find_themselves_and_accept_edge_shapes() -> None:
    rng = np.random.default_rng(9)
    base = rng.normal(size=(30, 5)).astype(np.float32)
    indices, distances = search(base, base, 1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(30))
    assert distances.max() < 1e-3
    one_idx, _ = search(torch.from_numpy(base), base[3:4], 2)
    assert one_idx[0, 0] == 3
    empty_idx, empty_dist = search(base, np.zeros((0, 5)), 2)
    assert empty_idx.shape == empty_dist.shape == (0, 2)


def test_knn_recall_matches_a_set_loop() -> None:
    rng = np.random.default_rng(10)
    n, k = 200, 6
    exact = np.stack([rng.choice(50, k, replace=False) for _ in range(n)])
    found = np.stack([rng.choice(50, k, replace=False) for _ in range(n)])
    loop = np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact, strict=True)])
    value = knn_recall(Neighbors(found, np.zeros((n, k))), Neighbors(exact, np.zeros((n, k))))
    assert value == pytest.approx(loop)
    assert knn_recall(Neighbors(exact, np.zeros((n, k))), Neighbors(exact, np.zeros((n, k)))) == 1.0


@pytest.mark.parametrize(
    ("z", "kwargs", "match"),
    [
        (np.array([[0.0, 1.0], [np.nan, 1.0], [2.0, 2.0]]), {"k": 1}, "NaN"),
        (np.array([[0.0, 1.0], [1.0, np.inf], [2.0, 2.0]]), {"k": 1}, "NaN or inf"),
        (np.zeros((5, 3)), {"k": 5}, "smaller than the number of samples"),
        (np.zeros((5, 3)), {"k": 0}, "at least 1"),
        (np.zeros((5, 3)), {"k": 2.0}, "integer"),
        (np.zeros(5), {"k": 1}, "shape"),
        (np.zeros((1, 3)), {"k": 1}, "at least 2"),
        (np.zeros((5, 3)), {"k": 1, "metric": "manhattan"}, "metric"),
        (np.zeros((5, 3)), {"k": 1, "mode": "fast"}, "mode"),
        (np.zeros((5, 3)), {"k": 1, "backend": "annoy"}, "backend"),
        (np.zeros((5, 3)), {"k": 1, "index": "lsh"}, "index"),
        (np.zeros((5, 3)), {"k": 1, "metric": "cosine"}, "all-zero rows"),
        (np.array([["a", "b"], ["c", "d"]]), {"k": 1}, "numeric"),
    ],
)
def test_knn_rejects_bad_input(z: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(LCCInputError, match=match):
        knn(z, **kwargs)


def test_search_rejects_bad_input() -> None:
    base = np.zeros((4, 3))
    with pytest.raises(LCCInputError, match="exceeds"):
        search(base, base, 5)
    with pytest.raises(LCCInputError, match="dimension"):
        search(base, np.zeros((2, 4)), 1)
    with pytest.raises(LCCInputError, match="NaN"):
        search(base, np.array([[np.nan, 0.0, 0.0]]), 1)
    with pytest.raises(LCCInputError, match="positive integer"):
        search(base, base, 0)


def test_neighbors_validates_shapes() -> None:
    with pytest.raises(LCCInputError, match="same"):
        Neighbors(np.zeros((3, 2), dtype=int), np.zeros((3, 3)))
    with pytest.raises(LCCInputError, match="integers"):
        Neighbors(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(LCCInputError, match="rows"):
        knn_recall(
            Neighbors(np.zeros((3, 1), dtype=int), np.zeros((3, 1))),
            Neighbors(np.zeros((2, 1), dtype=int), np.zeros((2, 1))),
        )


def test_cells_step_aside_for_faiss_when_their_budget_grows():
    from lcc.engine import cells
    from lcc.synthetic import planted_latents

    # many small sub-clusters, mixed within each k-means cell: the cells budget must grow
    data = planted_latents(6_000, 16, 300, 3, separation=3.0, intrinsic_dim=None, seed=1)
    z = np.asarray(data.z, dtype=np.float32)
    assert cells.cells_self_search(z, 5, seed=0, use_faiss=True, max_growth=1.0) is None
    found = cells.cells_self_search(z, 5, seed=0, use_faiss=True)
    assert found is not None and found[2] >= 0.97
    auto = knn(z, 5, mode="approximate")
    exact = knn(z, 5)
    assert auto.recall >= 0.97 and knn_recall(auto, exact) >= 0.95
