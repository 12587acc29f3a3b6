"""c1-c4 and the cluster measure against loops written from the paper's equations.

Oracles: eq. (1) and (3) as explicit loops over (sub)classes and neurons, eq. (2) with
scikit-learn's ``silhouette_samples(metric="cosine")`` per superclass, eq. (4) with
scikit-learn's dense ``cosine_distances`` and the standardisation of sec. 2.3.2 written out.
Planted data: overlapping Gaussian sub-clusters inside each class.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import silhouette_samples
from sklearn.metrics.pairwise import cosine_distances

from lcc.analysis import intraclass
from lcc.analysis.intraclass import (
    ClassValues,
    c1,
    c2,
    c3,
    c4,
    cluster_measure,
    combine_layers,
    combine_neurons,
    cosine_distance_std,
    intraclass_distance_ratio,
    intraclass_variance_ratio,
    neurons,
    standardize_activations,
    subclass_selectivity,
    subclass_silhouette,
    top_k_mean,
)
from lcc.engine.refresh import refresh
from lcc.errors import LCCInputError

# --------------------------------------------------------------------------- data


def hierarchical(
    n: int = 480,
    dim: int = 12,
    supers: int = 3,
    subs: int = 3,
    *,
    planted: bool = True,
    spread: float = 0.7,
    seed: int = 0,
):
    """Pre-activations with superclasses of ``subs`` overlapping sub-clusters each.

    ``planted=False`` keeps every superclass a single Gaussian of the same total variance,
    with the subclass labels drawn the same way (so subclasses carry no structure).
    """
    rng = np.random.default_rng(seed)
    sub = np.arange(n) % (supers * subs)
    rng.shuffle(sub)
    sup = sub // subs
    centres = rng.normal(size=(supers, dim)) * 1.5
    offsets = rng.normal(size=(supers * subs, dim)) * spread
    if planted:
        z = centres[sup] + offsets[sub] + rng.normal(size=(n, dim))
    else:
        z = centres[sup] + rng.normal(size=(n, dim)) * np.sqrt(1 + spread**2)
    return z, sub.astype(np.int64), sup.astype(np.int64)


def top_mean(values, k):
    """Mean of the k largest, by sorting (the paper's mean^k)."""
    ordered = sorted(values, reverse=True)
    return float(np.mean(ordered[: min(k, len(ordered))]))


# --------------------------------------------------------------------------- oracles


def oracle_selectivity(z, sub, sup):
    """eq. (1) inner terms, {subclass: [value per neuron]} by loops."""
    out = {}
    for i in np.unique(sub):
        s = sup[sub == i][0]
        inside = z[sub == i]
        rest = z[(sup == s) & (sub != i)]
        if rest.shape[0] == 0:
            continue
        values = []
        for neuron in range(z.shape[1]):
            a, b = inside[:, neuron], rest[:, neuron]
            values.append((a.mean() - b.mean()) / (a.std() + b.std()))
        out[int(i)] = values
    return out


def oracle_c1(layers, sub, sup, k):
    per_layer = [oracle_selectivity(z, sub, sup) for z in layers]
    scores = [top_mean([v for p in per_layer for v in p[i]], k) for i in per_layer[0]]
    return float(np.median(scores))


def oracle_silhouette(z, sub, sup, relu=True):
    """{subclass: mean silhouette within its superclass}, scikit-learn cosine silhouettes."""
    a = np.maximum(z, 0) if relu else z
    out = {}
    for s in np.unique(sup):
        rows = sup == s
        if np.unique(sub[rows]).size < 2:
            continue
        samples = silhouette_samples(a[rows], sub[rows], metric="cosine")
        for i in np.unique(sub[rows]):
            out[int(i)] = samples[sub[rows] == i].mean()
    return out


def oracle_c2(layers, sub, sup, k, relu=True):
    per_layer = [oracle_silhouette(z, sub, sup, relu) for z in layers]
    scores = [top_mean([p[i] for p in per_layer], k) for i in per_layer[0]]
    return float(np.median(scores))


def oracle_c3(layers, y, k):
    scores = []
    for c in np.unique(y):
        ratios = []
        for z in layers:
            for neuron in range(z.shape[1]):
                ratios.append(z[y == c, neuron].std() / z[:, neuron].std())
        scores.append(top_mean(ratios, k))
    return float(np.mean(scores))


def oracle_activations(z, active=0.25):
    """Sec. 2.3.2: zero mean, unit variance, bias so that ``active`` are positive, ReLU."""
    out = np.zeros_like(z, dtype=np.float64)
    for neuron in range(z.shape[1]):
        x = z[:, neuron].astype(np.float64)
        x = (x - x.mean()) / x.std()
        out[:, neuron] = np.maximum(x - np.quantile(x, 1 - active), 0)
    return out


def dense_std(a):
    """Std of the cosine distances over pairs i < j, from the dense N x N matrix."""
    d = cosine_distances(a.astype(np.float64))
    return d[np.triu_indices(a.shape[0], k=1)].std()


def oracle_c4(layers, y, k, active=0.25):
    per_layer = []
    for z in layers:
        a = oracle_activations(z, active)
        whole = dense_std(a)
        per_layer.append({int(c): dense_std(a[y == c]) / whole for c in np.unique(y)})
    return float(np.mean([top_mean([p[c] for p in per_layer], k) for c in np.unique(y)]))


# --------------------------------------------------------------------------- neurons


def test_neurons_max_pools_feature_maps_and_keeps_vectors():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, 3, 4, 6))
    expected = np.array([[maps[i, c].max() for c in range(3)] for i in range(5)])
    np.testing.assert_array_equal(neurons(maps), expected)
    assert neurons(maps).dtype == np.float64
    tokens = rng.normal(size=(5, 7, 3)).astype(np.float32)  # (N, T, C): max over tokens
    np.testing.assert_array_equal(neurons(tokens), tokens.max(axis=1))
    flat = rng.normal(size=(5, 4)).astype(np.float32)
    assert neurons(flat).dtype == np.float32
    np.testing.assert_array_equal(neurons(flat), flat)


def test_measures_read_conv_layers_through_max_pooling():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(90, 6, 3, 3))
    sub = np.arange(90) % 6
    sup = sub // 3
    pooled = maps.max(axis=(2, 3))
    assert c1(maps, sub, sup, top_k=2) == pytest.approx(oracle_c1([pooled], sub, sup, 2))
    assert c3(maps, sup, top_k=2) == pytest.approx(oracle_c3([pooled], sup, 2))
    assert c4(maps, sup) == pytest.approx(oracle_c4([pooled], sup, 1))


@pytest.mark.parametrize(
    "z, message",
    [
        (np.ones(5), "shape"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
        (np.array([["a", "b"], ["c", "d"]]), "numeric"),
        (np.ones((1, 3)), "at least 2"),
    ],
)
def test_neurons_rejects_bad_latents(z, message):
    with pytest.raises(LCCInputError, match=message):
        neurons(z)


# --------------------------------------------------------------------------- c1, c3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subclass_selectivity_matches_eq1_loops(dtype):
    z, sub, sup = hierarchical(n=150, dim=5, seed=2)
    z = z.astype(dtype)
    result = subclass_selectivity(z, sub, sup)
    expected = oracle_selectivity(z.astype(np.float64), sub, sup)
    assert result.labels.tolist() == sorted(expected)
    tolerance = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(
        result.values, np.array([expected[i] for i in sorted(expected)]), rtol=tolerance
    )


@pytest.mark.parametrize("k", [1, 4, 100])
def test_c1_matches_eq1_over_several_layers(k):
    z, sub, sup = hierarchical(seed=3)
    other = np.tanh(z[:, :7] * 2) + np.random.default_rng(3).normal(size=(z.shape[0], 7))
    assert c1([z, other], sub, sup, top_k=k) == pytest.approx(oracle_c1([z, other], sub, sup, k))
    assert c1({"a": z}, sub, sup, top_k=k) == pytest.approx(oracle_c1([z], sub, sup, k))


def test_c1_top_k_changes_the_value():
    z, sub, sup = hierarchical(seed=4)
    values = {k: c1(z, sub, sup, top_k=k) for k in (1, 3, 12)}
    assert values[1] > values[3] > values[12]  # the best neuron first, then fewer selective
    assert values[12] == pytest.approx(oracle_c1([z], sub, sup, 12))


def test_c1_skips_subclasses_alone_in_their_superclass():
    z, sub, sup = hierarchical(n=200, seed=5)
    sub = sub.copy()
    sup = sup.copy()
    lonely = sup == 2
    sub[lonely] = 99  # superclass 2 now holds one subclass only
    result = subclass_selectivity(z, sub, sup)
    assert 99 not in result.labels.tolist()
    assert c1(z, sub, sup, top_k=3) == pytest.approx(oracle_c1([z], sub, sup, 3))


def test_c1_rejects_inconsistent_or_flat_hierarchies():
    z, sub, sup = hierarchical(n=90, seed=6)
    broken = sup.copy()
    broken[np.flatnonzero(sub == 0)[0]] = 1
    with pytest.raises(LCCInputError, match="subclass 0 appears under superclasses"):
        c1(z, sub, broken)
    with pytest.raises(LCCInputError, match="no superclass holds two or more subclasses"):
        c1(z, sup, sup)
    with pytest.raises(LCCInputError, match="y_super has 50 labels"):
        c2(z, sub, sup[:50])


def test_c3_matches_eq3_loops_and_handles_dead_neurons():
    z, _, sup = hierarchical(seed=7)
    z[:, 3] = 2.0  # a dead (constant) neuron scores 0, not NaN
    ratios = intraclass_variance_ratio(z, sup)
    assert np.isfinite(ratios.values).all() and (ratios.values[:, 3] == 0).all()
    alive = np.delete(z, 3, axis=1)
    for k in (1, 5, 11):  # the 11 live neurons; the dead one never reaches the top 11
        assert c3(z, sup, top_k=k) == pytest.approx(oracle_c3([alive], sup, k))
    other = z[:, :4] ** 2 + 1
    expected = oracle_c3([alive, np.delete(other, 3, axis=1)], sup, 6)
    assert c3([z, other], sup, top_k=6) == pytest.approx(expected)


def test_c3_top_k_picks_the_highest_ratios():
    z, _, sup = hierarchical(seed=8)
    one, all_ = c3(z, sup, top_k=1), c3(z, sup, top_k=z.shape[1])
    assert one > all_
    assert all_ == pytest.approx(oracle_c3([z], sup, z.shape[1]))


# --------------------------------------------------------------------------- c2


@pytest.mark.parametrize("relu", [True, False])
def test_subclass_silhouette_matches_scikit_learn(relu):
    z, sub, sup = hierarchical(seed=9)
    z = z + 0.5  # keep every ReLU row non-zero
    result = subclass_silhouette(z, sub, sup, relu=relu)
    expected = oracle_silhouette(z, sub, sup, relu)
    assert result.labels.tolist() == sorted(expected)
    np.testing.assert_allclose(result.values, [expected[i] for i in sorted(expected)], atol=1e-9)


def test_subclass_silhouette_float32_and_singletons_match_scikit_learn():
    z, sub, sup = hierarchical(n=121, seed=10)
    z = (np.abs(z) + 0.1).astype(np.float32)
    sub = sub.copy()
    sub[0] = 50  # a singleton subclass: silhouette 0 (scikit-learn's convention)
    result = subclass_silhouette(z, sub, sup)
    expected = oracle_silhouette(z, sub, sup)
    assert result.values[result.labels.tolist().index(50)] == 0.0
    np.testing.assert_allclose(result.values, [expected[i] for i in sorted(expected)], atol=2e-5)


def test_subclass_silhouette_zero_rows_are_at_distance_one():
    """Dead samples (all-zero activations): distance 1 to every other row, 0 to themselves."""
    rng = np.random.default_rng(11)
    z = np.abs(rng.normal(size=(30, 4)))
    z[[0, 5, 17]] = -1.0  # ReLU makes these rows zero
    sub = np.arange(30) % 3
    sup = np.zeros(30, dtype=np.int64)
    a = np.maximum(z, 0)
    norms = np.linalg.norm(a, axis=1)
    distance = np.ones((30, 30))
    for i in range(30):
        for j in range(30):
            if i == j:
                distance[i, j] = 0.0
            elif norms[i] > 0 and norms[j] > 0:
                distance[i, j] = 1 - a[i] @ a[j] / (norms[i] * norms[j])
    expected = silhouette_samples(distance, sub, metric="precomputed")
    result = subclass_silhouette(z, sub, sup)
    np.testing.assert_allclose(result.values, [expected[sub == i].mean() for i in range(3)])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_c2_takes_the_top_k_layers_per_subclass(k):
    z, sub, sup = hierarchical(seed=12)
    rng = np.random.default_rng(12)
    layers = [z, z[:, ::-1] * 0.5 + rng.normal(size=z.shape), rng.normal(size=(z.shape[0], 6))]
    assert c2(layers, sub, sup, top_k=k) == pytest.approx(oracle_c2(layers, sub, sup, k))
    # one layer: that layer's median silhouette, whatever k
    assert c2(layers[1], sub, sup, top_k=k) == pytest.approx(oracle_c2(layers[1:2], sub, sup, 1))


def test_c2_relu_option_is_used():
    z, sub, sup = hierarchical(seed=13)
    with_relu, without = c2(z, sub, sup, relu=True), c2(z, sub, sup, relu=False)
    assert with_relu != pytest.approx(without)
    assert without == pytest.approx(oracle_c2([z], sub, sup, 1, relu=False))


# --------------------------------------------------------------------------- c4


def test_standardize_activations_matches_sec_2_3_2():
    rng = np.random.default_rng(14)
    z = rng.normal(size=(200, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -3, 1, 100]
    z[:, 4] = 7.0  # constant neuron: all zeros
    for active in (0.25, 0.5):
        a = standardize_activations(z, active=active)
        np.testing.assert_allclose(a[:, :4], oracle_activations(z[:, :4], active)[:, :4])
        assert (a[:, 4] == 0).all()
        assert (a[:, :4] > 0).mean(axis=0) == pytest.approx([active] * 4, abs=0.01)
    # invariant to rescaling and translating each neuron (the point of the standardisation)
    np.testing.assert_allclose(
        standardize_activations(z * [2, 3, 4, 5, 6] - 9), standardize_activations(z), atol=1e-9
    )


@pytest.mark.parametrize("method", ["gram", "pairs", "auto"])
def test_cosine_distance_std_streamed_equals_dense(method, monkeypatch):
    rng = np.random.default_rng(15)
    a = np.maximum(rng.normal(size=(157, 9)), 0)
    a[[3, 40]] = 0.0  # zero rows: distance 1 to everything else
    expected = dense_std(a)
    assert cosine_distance_std(a, method=method) == pytest.approx(expected, rel=1e-10)
    monkeypatch.setattr(intraclass, "BLOCK", 64)  # many small chunks and blocks
    assert cosine_distance_std(a, method=method) == pytest.approx(expected, rel=1e-10)
    assert cosine_distance_std(a.astype(np.float32), method=method) == pytest.approx(
        dense_std(a.astype(np.float32)), rel=1e-5
    )


def test_cosine_distance_std_pairs_handles_wide_layers():
    rng = np.random.default_rng(16)
    a = rng.normal(size=(40, 300)) + 0.3  # D > N: "auto" streams the pairs
    assert cosine_distance_std(a) == pytest.approx(dense_std(a), rel=1e-10)


@pytest.mark.parametrize("k", [1, 2])
def test_c4_matches_eq4_with_the_standardisation(k):
    z, _, sup = hierarchical(seed=17)
    other = np.exp(z[:, :5] / 3)
    assert c4(z, sup) == pytest.approx(oracle_c4([z], sup, 1))
    assert c4([z, other], sup, top_k=k) == pytest.approx(oracle_c4([z, other], sup, k))


def test_c4_active_fraction_option_is_used():
    z, _, sup = hierarchical(seed=18)
    quarter, half = c4(z, sup, active=0.25), c4(z, sup, active=0.5)
    assert quarter != pytest.approx(half)
    assert half == pytest.approx(oracle_c4([z], sup, 1, active=0.5))
    with pytest.raises(LCCInputError, match="strictly between 0 and 1"):
        c4(z, sup, active=1.0)


def test_intraclass_distance_ratio_without_standardisation():
    z, _, sup = hierarchical(seed=19)
    a = np.abs(z)
    values = intraclass_distance_ratio(a, sup, standardize=False).values
    np.testing.assert_allclose(values, [dense_std(a[sup == c]) / dense_std(a) for c in range(3)])


def test_c4_rejects_single_sample_classes():
    z, _, sup = hierarchical(n=60, seed=20)
    sup = sup.copy()
    sup[0] = 7
    with pytest.raises(LCCInputError, match="class 7 has a single sample"):
        c4(z, sup)


# --------------------------------------------------------------------------- combiners


def test_top_k_mean_and_combiners():
    values = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    np.testing.assert_allclose(top_k_mean(values, 2), [2.5, 2.5])
    np.testing.assert_allclose(top_k_mean(values, 9), values.mean(axis=1))
    np.testing.assert_allclose(top_k_mean(values, 1, axis=0), [3.0, 5.0, 2.0])
    a = ClassValues(np.array([0, 1, 2]), np.array([0.1, 0.9, 0.4]))
    b = ClassValues(np.array([0, 1, 2]), np.array([0.5, 0.2, 0.3]))
    assert combine_layers([a, b], 1, "median") == pytest.approx(0.5)  # median(.5, .9, .4)
    assert combine_layers([a, b], 2, "mean") == pytest.approx(np.mean([0.3, 0.55, 0.35]))
    assert combine_neurons([a, b], 1, "mean") == pytest.approx(np.mean([0.5, 0.9, 0.4]))
    with pytest.raises(LCCInputError, match="different classes"):
        combine_layers([a, ClassValues(np.array([0, 1, 3]), b.values)], 1, "mean")
    with pytest.raises(LCCInputError, match="top_k must be a positive integer"):
        top_k_mean(values, 0)


def test_layers_must_share_samples():
    z, _, sup = hierarchical(n=90, seed=21)
    with pytest.raises(LCCInputError, match="same samples"):
        c3([z, z[:80]], sup)
    with pytest.raises(LCCInputError, match="at least 2"):
        c3(z, np.zeros(90, dtype=np.int64))


# --------------------------------------------------------------------------- planted order


def test_planted_subclusters_score_higher_on_c1_and_c2():
    """Same total variance per superclass; only the planted layer has subclass clusters."""
    scores = {}
    for planted in (True, False):
        z, sub, sup = hierarchical(n=900, dim=16, planted=planted, seed=22)
        scores[planted] = (c1(z, sub, sup, top_k=3), c2(z, sub, sup))
    assert scores[True][0] > scores[False][0] + 0.2
    assert scores[True][1] > scores[False][1] + 0.02
    # overlapping, not separated: silhouettes stay far from 1
    assert scores[True][1] < 0.5


def test_planted_subclusters_score_higher_on_c3_and_c4():
    """Same noise; sub-clusters spread each class, a collapsed layer scores lowest."""
    scores = []
    for spread, noise in ((1.2, 1.0), (0.0, 1.0), (0.0, 0.3)):
        rng = np.random.default_rng(23)
        n, dim = 900, 16
        sub = np.arange(n) % 15
        y = sub // 3
        centres = rng.normal(size=(5, dim)) * 2.0
        offsets = rng.normal(size=(15, dim)) * spread
        z = centres[y] + offsets[sub] + rng.normal(size=(n, dim)) * noise
        scores.append((c3(z, y, top_k=3), c4(z, y)))
    planted, plain, collapsed = scores
    assert planted[0] > plain[0] > collapsed[0]
    assert planted[1] > plain[1] > collapsed[1]


# --------------------------------------------------------------------------- memory


def test_measures_never_hold_n_by_n_values():
    """12,000 samples: one N x N float64 matrix would take 1.15 GB; the peak stays tiny."""
    rng = np.random.default_rng(24)
    n = 12_000
    z = rng.normal(size=(n, 8)).astype(np.float32)
    sub = np.arange(n) % 4
    sup = sub // 2
    tracemalloc.start()
    try:
        c2(z, sub, sup)
        c4(z, sup)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20e6, peak


# --------------------------------------------------------------------------- clusters


def test_cluster_measure_reports_cc_and_mc_accuracy():
    from lcc.synthetic import gaussian_mixture

    z, y, _ = gaussian_mixture(600, 16, 4, 2, separation=1.6, seed=25)
    rng = np.random.default_rng(25)
    predictions = np.where(rng.random(600) < 0.8, y, (y + 1) % 4)
    out = cluster_measure(z, y, predictions, k=7, method="louvain", seed=3)
    reference = refresh(z, y, k=7, method="louvain", seed=3, targets="approximate")
    mc = reference.misclustered
    assert 0 < mc.sum() < 600  # overlapping: some samples are misclustered
    assert out["n"] == 600 and out["k"] == 7 and out["method"] == "louvain"
    assert out["n_clusters"] == reference.n_clusters
    assert out["misclustered"] == int(mc.sum())
    assert out["misclustered_fraction"] == pytest.approx(mc.mean())
    correct = [p == t for p, t in zip(predictions, y, strict=True)]
    cc_hits = [c for c, m in zip(correct, mc, strict=True) if not m]
    mc_hits = [c for c, m in zip(correct, mc, strict=True) if m]
    assert out["accuracy"] == pytest.approx(sum(correct) / 600)
    assert out["accuracy_cc"] == pytest.approx(sum(cc_hits) / len(cc_hits))
    assert out["accuracy_mc"] == pytest.approx(sum(mc_hits) / len(mc_hits))


def test_cluster_measure_without_predictions_and_bad_options():
    from lcc.synthetic import gaussian_mixture

    z, y, _ = gaussian_mixture(200, 8, 2, 2, separation=3.0, seed=26)
    out = cluster_measure(z, y)
    assert out["accuracy"] is None and out["accuracy_cc"] is None and out["accuracy_mc"] is None
    with pytest.raises(LCCInputError, match="k=200"):
        cluster_measure(z, y, k=200)
    with pytest.raises(LCCInputError, match="predictions has 5 labels"):
        cluster_measure(z, y, y[:5])
    with pytest.raises(LCCInputError, match="unknown refresh option"):
        cluster_measure(z, y, colour="red")
