"""The refresh pipeline end to end, checked against planted partitions and brute-force loops."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from lcc.engine.refresh import STAGES, Refresh, RefreshConfig, refresh
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture


def separated(seed: int = 0):
    """Well-separated planted partition: 4 classes x 3 sub-clusters."""
    return gaussian_mixture(900, 24, 4, 3, separation=12.0, intrinsic_dim=12, seed=seed)


def overlapping(seed: int = 0):
    """Overlapping sub-clusters, so that a good share of samples is misclustered."""
    return gaussian_mixture(800, 16, 5, 3, separation=1.5, seed=seed)


def brute_force_masks(clusters: np.ndarray, y: np.ndarray, k: int):
    """Majority class counts per cluster, MC mask and correctible mask, by plain loops."""
    counts: dict[int, Counter] = {}
    for c, t in zip(clusters.tolist(), y.tolist(), strict=True):
        counts.setdefault(c, Counter())[t] += 1
    best = {c: max(counter.values()) for c, counter in counts.items()}
    return counts, best


def check_consistent(r: Refresh, y: np.ndarray) -> None:
    """cluster_class is a majority class of each cluster; MC and correctible follow from it."""
    k = r.config.k
    counts, best = brute_force_masks(r.clusters, y, k)
    assert sorted(counts) == list(range(r.n_clusters))
    for c in range(r.n_clusters):
        assert counts[c][int(r.cluster_class[c])] == best[c]
    mc = [r.cluster_class[c] != t for c, t in zip(r.clusters.tolist(), y.tolist(), strict=True)]
    assert r.misclustered.tolist() == [bool(v) for v in mc]
    cc_per_class = Counter(t for t, bad in zip(y.tolist(), mc, strict=True) if not bad)
    correctible = [
        bool(bad) and cc_per_class[t] >= k for t, bad in zip(y.tolist(), mc, strict=True)
    ]
    assert r.correctible.tolist() == correctible
    assert r.misclustered_fraction == pytest.approx(sum(mc) / len(y))
    assert r.correctible_fraction == pytest.approx(sum(correctible) / len(y))


@pytest.mark.parametrize("method", ["leiden", "louvain", "peer-pressure"])
def test_refresh_recovers_a_planted_partition(method: str) -> None:
    z, y, sub = separated()
    r = refresh(z, y, method=method, k=10)
    assert adjusted_rand_score(sub, r.clusters) >= 0.95
    assert r.clusters.dtype == np.int64 and r.clusters.shape == (900,)
    assert set(r.clusters.tolist()) == set(range(r.n_clusters))
    assert r.misclustered_fraction < 0.02
    check_consistent(r, y)


@pytest.mark.parametrize("method", ["leiden", "louvain", "peer-pressure"])
def test_masks_and_exact_targets_agree_with_brute_force(method: str) -> None:
    z, y, _ = overlapping()
    k = 4
    r = refresh(z, y, k=k, method=method, seed=3)
    check_consistent(r, y)
    assert r.targets.n_correctible > 0
    cc = ~r.misclustered
    z64 = z.astype(np.float64)
    for i in r.targets.indices[:40]:
        pool = np.flatnonzero(cc & (y == y[i]))
        dist = np.linalg.norm(z64[pool] - z64[i], axis=1)
        expected = z64[pool[np.argsort(dist, kind="stable")[:k]]].mean(axis=0)
        row = np.searchsorted(r.targets.indices, i)
        np.testing.assert_allclose(r.targets.vectors[row], expected, rtol=1e-4, atol=1e-4)


def test_same_seed_same_result_and_seed_reaches_the_clustering() -> None:
    z, y, _ = overlapping(seed=1)
    for options in ({}, {"knn": "approximate", "targets": "approximate", "method": "louvain"}):
        a = refresh(z, y, seed=7, **options)
        b = refresh(z, y, seed=7, **options)
        np.testing.assert_array_equal(a.clusters, b.clusters)
        np.testing.assert_array_equal(a.targets.indices, b.targets.indices)
        np.testing.assert_array_equal(a.targets.vectors, b.targets.vectors)
        assert a.modularity == b.modularity
    runs = {tuple(refresh(z, y, seed=s, method="louvain").clusters.tolist()) for s in range(4)}
    assert len(runs) > 1  # overlapping blobs: different seeds explore different partitions


def test_approximate_knn_path_is_seeded_and_close_to_exact() -> None:
    z, y, sub = gaussian_mixture(3000, 16, 5, 3, separation=8.0, intrinsic_dim=8, seed=8)
    a = refresh(z, y, knn="approximate", seed=2)
    b = refresh(z, y, knn="approximate", seed=2)
    np.testing.assert_array_equal(a.clusters, b.clusters)
    np.testing.assert_array_equal(a.targets.vectors, b.targets.vectors)
    assert adjusted_rand_score(sub, a.clusters) >= 0.95
    check_consistent(a, y)


def test_pca_path_targets_live_in_the_projected_space() -> None:
    z, y, _ = overlapping(seed=2)
    k, dim = 3, 6
    r = refresh(z, y, k=k, pca=dim)
    assert r.projection is not None and r.d == dim and r.input_dim == 16
    assert r.targets.vectors.shape == (r.targets.n_correctible, dim)
    projected = r.projection.apply(z).astype(np.float64)
    centred = z.astype(np.float64) - z.mean(axis=0)
    # PCA oracle: the projection keeps the variance of the top singular directions.
    top = np.linalg.svd(centred, compute_uv=False)[:dim] ** 2
    assert np.var(projected, axis=0).sum() * len(z) == pytest.approx(top.sum(), rel=1e-3)
    check_consistent(r, y)
    cc = ~r.misclustered
    for row, i in enumerate(r.targets.indices[:20]):
        pool = np.flatnonzero(cc & (y == y[i]))
        dist = np.linalg.norm(projected[pool] - projected[i], axis=1)
        expected = projected[pool[np.argsort(dist)[:k]]].mean(axis=0)
        np.testing.assert_allclose(r.targets.vectors[row], expected, rtol=1e-3, atol=1e-3)
    # the loss projects raw latents first: ||P(z_i) - t_i|| / sqrt(dim) averaged
    batch = np.array(
        [int(r.targets.indices[0]), int(r.targets.indices[1]), int(np.flatnonzero(cc)[0])]
    )
    zb = torch.tensor(z[batch], requires_grad=True)
    value = r.loss()(zb, torch.tensor(batch))
    expected = np.mean(
        [np.linalg.norm(projected[i] - r.targets.dense()[i]) / np.sqrt(dim) for i in batch[:2]]
    )
    assert float(value.detach()) == pytest.approx(expected, rel=1e-4)
    value.backward()
    assert zb.grad is not None and zb.grad.shape == zb.shape


def test_approximate_targets_are_correctly_clustered_samples_of_the_same_class() -> None:
    z, y, _ = overlapping(seed=4)
    r = refresh(z, y, targets="approximate", seed=5)
    assert r.targets.n_correctible > 0
    assert not (r.correctible & ~r.misclustered).any()
    cc = ~r.misclustered
    for row, i in enumerate(r.targets.indices):
        same = np.flatnonzero((z == r.targets.vectors[row]).all(axis=1))
        assert same.size and cc[same].any() and (y[same] == y[i]).any()
        j = same[cc[same] & (y[same] == y[i])][0]
        assert r.cluster_class[r.clusters[j]] == y[i]


def test_classes_restricts_correctible_samples() -> None:
    z, y, _ = overlapping(seed=5)
    everything = refresh(z, y, k=3)
    subset = refresh(z, y, k=3, classes=[1, 3])
    np.testing.assert_array_equal(subset.clusters, everything.clusters)
    expected = everything.correctible & np.isin(y, [1, 3])
    assert expected.any()
    np.testing.assert_array_equal(subset.correctible, expected)
    assert refresh(z, y, k=3, classes=[]).targets.n_correctible == 0


def test_non_contiguous_labels_trailing_dims_and_torch_input() -> None:
    z, y, _ = separated(seed=1)
    labels = np.array([3, 7, 42, 9])[y]
    r = refresh(torch.from_numpy(z.reshape(900, 4, 6)), torch.from_numpy(labels), k=5)
    assert r.d == 24 and r.input_dim == 24
    assert set(r.cluster_class.tolist()) <= {3, 7, 42, 9}
    check_consistent(r, labels)


def test_summary_is_plain_json_and_timings_cover_every_stage() -> None:
    z, y, _ = overlapping(seed=6)
    stages: list[str] = []
    r = refresh(z, y, RefreshConfig(k=3, method="louvain"), progress=stages.append, weights="rbf")
    assert stages == [stage for stage in STAGES if stage != "pca"]
    stages.clear()
    refresh(z, y, k=3, pca=4, progress=stages.append)
    assert stages == list(STAGES)
    summary = r.summary()

    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(key, str) and plain(item) for key, item in value.items())
        return value is None or type(value) in (int, float, str, bool)

    assert plain(summary)
    assert json.loads(json.dumps(summary)) == summary
    for key in ("n", "d", "k", "n_clusters", "misclustered_fraction", "correctible_fraction"):
        assert key in summary
    assert summary["k"] == 3 and summary["method"] == "louvain" and summary["weights"] == "rbf"
    assert summary["n_clusters"] == r.n_clusters and summary["modularity"] == r.modularity
    seconds = summary["seconds"]
    assert {"knn", "cluster", "match", "targets", "total"} <= set(seconds)
    assert all(value >= 0 for value in seconds.values())
    assert seconds["knn"] >= seconds["pca"] + seconds["graph"]
    staged = seconds["knn"] + seconds["cluster"] + seconds["match"] + seconds["targets"]
    assert staged <= seconds["total"] + 1e-6


def test_loss_module_uses_the_targets() -> None:
    z, y, _ = overlapping(seed=7)
    r = refresh(z, y, k=3)
    loss = r.loss(squared=True)
    i = int(r.targets.indices[0])
    value = loss(torch.tensor(z[[i]]), torch.tensor([i]))
    expected = np.sum((z[i] - r.targets.dense()[i]) ** 2) / np.sqrt(z.shape[1])  # the poster
    assert float(value.detach()) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 40}, "k=40 must be smaller than the number of samples"),
        ({"k": 0}, "k=0 must be at least 1"),
        ({"k": 2.5}, "k must be an integer"),
        ({"method": "kmeans"}, "method='kmeans'"),
        ({"targets": "fuzzy"}, "targets='fuzzy'"),
        ({"knn": "hnsw"}, "knn='hnsw'"),
        ({"metric": "l1"}, "metric='l1'"),
        ({"weights": "gauss"}, "weights='gauss'"),
        ({"pca": 8}, r"pca=8 must be smaller than min\(N, D\) = 8"),
        ({"pca": 0}, "pca=0 must be at least 1"),
        ({"pca": "4"}, "pca must be an integer"),
        ({"resolution": 0.0}, "resolution=0.0 must be a positive"),
        ({"resolution": float("nan")}, "resolution=nan"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"method": "peer-pressure", "resolution": 0.5}, "peer-pressure has no resolution"),
        ({"neighbours": 3}, "unknown refresh option"),
        ({"classes": [[1, 2]]}, "classes must be a 1-D"),
        ({"classes": [-1]}, "non-negative"),
    ],
)
def test_bad_options_are_rejected_before_any_work(options: dict, message: str) -> None:
    z = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    y = np.arange(40) % 3
    with pytest.raises(LCCInputError, match=message):
        refresh(z, y, **options)


@pytest.mark.parametrize(
    ("z", "y", "message"),
    [
        (np.zeros((1, 4)), [0], "at least 2 are needed"),
        (np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]), [0, 1, 0], "NaN or inf"),
        (np.array([[0.0, np.inf], [1.0, 2.0], [3.0, 4.0]]), [0, 1, 0], "NaN or inf"),
        (np.zeros((3, 2)), [0, 1], "2 labels but there are 3 samples"),
        (np.zeros((3, 2)), [0.5, 1, 0], "non-integer"),
        (np.zeros((3, 2)), [0, -1, 0], "non-negative"),
        (np.zeros((3, 2)), ["a", "b", "c"], "integer class labels"),
        (np.zeros(3), [0, 1, 0], "shape"),
    ],
)
def test_bad_data_is_rejected(z: np.ndarray, y: list, message: str) -> None:
    with pytest.raises(LCCInputError, match=message):
        refresh(z, y, k=1)


def test_config_must_be_a_refresh_config() -> None:
    with pytest.raises(LCCInputError, match="RefreshConfig"):
        refresh(np.zeros((4, 2)), [0, 1, 0, 1], {"k": 1})  # type: ignore[arg-type]
