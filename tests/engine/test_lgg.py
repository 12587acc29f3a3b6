"""Latent geometry graphs and label variation against loops over the paper's formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from oracles import (
    oracle_graph,
    oracle_similarity,
    oracle_variation,
    planted,
    random_case,
    stable_point,
    t,
    three_layers,
    trace_variation,
)

from lcc.engine.lgg import (
    batch_graph,
    distinct_classes_mask,
    gkd_distance,
    label_variation,
    label_variation_measure,
    latent_graph,
    normalize_adjacency,
    similarity_matrix,
    smoothness,
)
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture

# ---------------------------------------------------------- similarity, masks, normalisation


@pytest.mark.parametrize("kind", ["cosine", "rbf"])
@pytest.mark.parametrize("bandwidth", [None, 0.7])
def test_similarity_matches_the_formula(kind: str, bandwidth: float | None) -> None:
    z, _ = random_case(0, signed=kind == "rbf")
    got = similarity_matrix(t(z), similarity=kind, bandwidth=bandwidth).numpy()
    expected = oracle_similarity(z, kind, None if kind == "cosine" else bandwidth)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_forced_cosine_clamps_negative_similarity_and_zero_rows() -> None:
    z = t(np.array([[1.0, 0.0], [-1.0, 0.1], [0.0, 0.0], [1.0, 1.0]]))
    sim = similarity_matrix(z, similarity="cosine").numpy()
    assert sim.min() >= 0.0 and sim[0, 1] == 0.0
    assert np.all(sim[2] == 0.0)
    np.testing.assert_allclose(sim, oracle_similarity(z.numpy(), "cosine"))


def test_default_bandwidth_makes_rbf_scale_free_and_a_fixed_one_does_not() -> None:
    z, _ = random_case(2)
    base = similarity_matrix(t(z), similarity="rbf")
    torch.testing.assert_close(similarity_matrix(t(3.5 * z), similarity="rbf"), base)
    fixed = similarity_matrix(t(z), similarity="rbf", bandwidth=2.0)
    assert not torch.allclose(similarity_matrix(t(3.5 * z), similarity="rbf", bandwidth=2.0), fixed)


@pytest.mark.parametrize("normalized", [False, True])
def test_label_variation_of_the_edge_list_matches_the_pair_sum(normalized: bool) -> None:
    z, y = random_case(6, n=30)
    y[[2, 7]] = -1  # unlabelled samples stay in the graph but out of the sums
    graph = batch_graph(t(z), 4, normalize=True)
    expected = oracle_variation(oracle_graph(z, 4, "rbf", normalize=True), y, normalized)
    got = float(label_variation(graph, torch.as_tensor(y), normalized=normalized))
    assert got == pytest.approx(expected, rel=1e-10)
    labelled = np.where(y < 0, 0, y)  # the all-labelled shortcut gives the oracle's value too
    expected = oracle_variation(oracle_graph(z, 4, "rbf", normalize=True), labelled, normalized)
    got = float(label_variation(graph, torch.as_tensor(labelled), normalized=normalized))
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("normalized", [False, True])
def test_label_variation_of_several_layers_is_one_value_per_layer(normalized: bool) -> None:
    layers = three_layers(31)
    _, y = random_case(31, n=24)
    y[[0, 3]] = -1
    got = label_variation(
        batch_graph(layers, 4, normalize=True), torch.as_tensor(y), normalized=normalized
    )
    assert got.shape == (3,)
    for index, z in enumerate(layers):
        kind = "cosine" if index != 1 else "rbf"
        expected = oracle_variation(oracle_graph(z.numpy(), 4, kind, normalize=True), y, normalized)
        assert float(got[index]) == pytest.approx(expected, rel=1e-10)
    assert float(smoothness(got)) == pytest.approx(float(smoothness(list(got))))


def test_distinct_classes_mask_leaves_unlabelled_out() -> None:
    y = np.array([0, 1, -1, 1, 2])
    mask = distinct_classes_mask(torch.as_tensor(y)).numpy()
    for i in range(5):
        for j in range(5):
            assert mask[i, j] == (y[i] >= 0 and y[j] >= 0 and y[i] != y[j])


def test_normalize_adjacency_matches_the_loop_and_keeps_isolated_vertices() -> None:
    a = np.array([[0, 2.0, 0, 0], [2.0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]])
    expected = np.zeros_like(a)
    degree = a.sum(axis=1)
    for i in range(4):
        for j in range(4):
            if a[i, j]:
                expected[i, j] = a[i, j] / math.sqrt(degree[i] * degree[j])
    np.testing.assert_allclose(normalize_adjacency(t(a)).numpy(), expected)


# ------------------------------------------------------------------------- label variation


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("normalized", [False, True])
def test_label_variation_matches_the_pair_sum(seed: int, normalized: bool) -> None:
    z, y = random_case(seed)
    adjacency = latent_graph(t(z), 4)
    got = float(label_variation(adjacency, torch.as_tensor(y), normalized=normalized))
    assert got == pytest.approx(oracle_variation(adjacency.numpy(), y, normalized), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trace_form_equals_pair_sum(seed: int) -> None:
    """Eq. 4/5: tr(V^T L V) = sum over ordered distinct-class pairs = 1/2 sum A_ij |v_i-v_j|^2."""
    z, y = random_case(seed, signed=False)
    y[seed] = -1
    adjacency = latent_graph(t(z), 3, normalize=bool(seed % 2)).numpy()
    got = float(label_variation(t(adjacency), torch.as_tensor(y)))
    assert got == pytest.approx(trace_variation(adjacency, y), rel=1e-12)
    keep = y >= 0
    v = (y[keep][:, None] == np.unique(y[keep])[None, :]).astype(float)
    sub = adjacency[np.ix_(keep, keep)]
    half_eq4 = 0.5 * sum(
        sub[i, j] * np.sum((v[i] - v[j]) ** 2) for i in range(len(v)) for j in range(len(v))
    )
    assert got == pytest.approx(half_eq4, rel=1e-12)


def test_unlabelled_samples_are_ignored() -> None:
    z, y = random_case(4)
    adjacency = latent_graph(t(z), 4)
    y_partial = y.copy()
    y_partial[[0, 5, 9]] = -1
    keep = y_partial >= 0
    sub = adjacency[keep][:, keep]
    for normalized in (False, True):
        got = label_variation(adjacency, torch.as_tensor(y_partial), normalized=normalized)
        expected = label_variation(sub, torch.as_tensor(y_partial[keep]), normalized=normalized)
        assert float(got) == pytest.approx(float(expected), rel=1e-12)
    assert float(label_variation(adjacency, torch.as_tensor(y))) != pytest.approx(
        float(label_variation(adjacency, torch.as_tensor(y_partial)))
    )


def test_normalized_variation_is_zero_on_separated_classes() -> None:
    rng = np.random.default_rng(0)
    z = np.vstack([rng.normal(size=(10, 3)) - 20.0, rng.normal(size=(10, 3)) + 20.0])
    y = np.repeat([0, 1], 10)
    adjacency = latent_graph(t(z), 5)
    assert float(label_variation(adjacency, torch.as_tensor(y), normalized=True)) == 0.0
    assert float(label_variation(adjacency, torch.as_tensor(y))) == 0.0


def test_normalized_variation_is_one_on_a_bipartite_graph() -> None:
    y = np.repeat([0, 1], 6)
    rng = np.random.default_rng(1)
    weights = rng.uniform(0.2, 1.0, size=(6, 6))
    adjacency = np.zeros((12, 12))
    adjacency[:6, 6:] = weights
    adjacency[6:, :6] = weights.T
    got = label_variation(t(adjacency), torch.as_tensor(y), normalized=True)
    assert float(got) == pytest.approx(1.0, rel=1e-12)
    # points on a circle with alternating classes: both nearest neighbours are of the other class
    angles = np.arange(16) * 2 * np.pi / 16
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    alternating = np.arange(16) % 2
    graph = latent_graph(t(circle), 2)
    assert float(label_variation(graph, torch.as_tensor(alternating), normalized=True)) == (
        pytest.approx(1.0)
    )


def test_planted_separation_orders_label_variation() -> None:
    values = []
    for separation in (0.5, 2.0, 6.0):
        z, y = planted(separation, seed=3)
        adjacency = latent_graph(t(z), 5)
        got = float(label_variation(adjacency, torch.as_tensor(y), normalized=True))
        assert got == pytest.approx(oracle_variation(adjacency.numpy(), y, True), rel=1e-12)
        values.append(got)
    assert values[0] > values[1] > values[2]
    assert values[0] < 1.0


def test_smoothness_is_eq_8() -> None:
    sigmas = [0.9, 0.4, 0.6, 0.1]
    expected = sum(abs(b - a) for a, b in itertools.pairwise(sigmas))
    got = smoothness([torch.tensor(s, dtype=torch.float64) for s in sigmas])
    assert float(got) == pytest.approx(expected)


# ------------------------------------------------------------------------------------- GKD


def test_gkd_is_zero_for_identical_latents_and_positive_for_a_shuffled_student() -> None:
    z, _ = random_case(5)
    teacher = latent_graph(t(z), 4, normalize=True)
    assert float(gkd_distance(teacher, latent_graph(t(z), 4, normalize=True))) == 0.0
    shuffled = z[np.random.default_rng(0).permutation(len(z))]
    assert float(gkd_distance(teacher, latent_graph(t(shuffled), 4, normalize=True))) > 0.1


def test_gkd_matches_frobenius_loop_across_dimensions() -> None:
    rng = np.random.default_rng(6)
    zt, zs = rng.normal(size=(20, 12)), rng.normal(size=(20, 3))
    at, as_ = oracle_graph(zt, 4, "rbf", normalize=True), oracle_graph(zs, 4, "rbf", normalize=True)
    expected = math.sqrt(sum((at[i, j] - as_[i, j]) ** 2 for i in range(20) for j in range(20)))
    got = gkd_distance(
        latent_graph(t(zt), 4, normalize=True), latent_graph(t(zs), 4, normalize=True)
    )
    assert float(got) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("signed", [False, True])
def test_gkd_is_invariant_to_rescaling_either_latent_space(signed: bool) -> None:
    zt, _ = random_case(7, signed=signed)
    zs, _ = random_case(8, signed=signed)
    base = float(
        gkd_distance(latent_graph(t(zt), 4, normalize=True), latent_graph(t(zs), 4, normalize=True))
    )
    for ct, cs in ((5.0, 1.0), (1.0, 0.2), (3.0, 7.0)):
        got = gkd_distance(
            latent_graph(t(ct * zt), 4, normalize=True), latent_graph(t(cs * zs), 4, normalize=True)
        )
        assert float(got) == pytest.approx(base, rel=1e-10)


def test_degree_normalisation_removes_a_global_weight_scale() -> None:
    zt, _ = random_case(9)
    zs, _ = random_case(10)
    at, as_ = latent_graph(t(zt), 4), latent_graph(t(zs), 4)
    normalised = float(gkd_distance(normalize_adjacency(at), normalize_adjacency(as_)))
    scaled = float(gkd_distance(normalize_adjacency(4.0 * at), normalize_adjacency(as_)))
    assert scaled == pytest.approx(normalised, rel=1e-10)
    assert float(gkd_distance(4.0 * at, as_)) != pytest.approx(float(gkd_distance(at, as_)))


def test_gkd_mask_restricts_the_sum() -> None:
    zt, y = random_case(11)
    zs, _ = random_case(12)
    at, as_ = latent_graph(t(zt), 4, normalize=True), latent_graph(t(zs), 4, normalize=True)
    mask = distinct_classes_mask(torch.as_tensor(y))
    m = mask.numpy()
    diff = (at - as_).numpy()
    expected = math.sqrt(sum(diff[i, j] ** 2 for i in range(24) for j in range(24) if m[i, j]))
    assert float(gkd_distance(at, as_, mask=mask)) == pytest.approx(expected, rel=1e-10)
    assert float(gkd_distance(at, as_)) > expected


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("kind", "bandwidth", "normalize", "normalized"),
    [
        ("cosine", None, False, False),
        ("cosine", None, True, True),
        ("rbf", None, False, False),
        ("rbf", None, True, True),
        ("rbf", 1.3, False, True),
    ],
)
def test_label_variation_gradients(kind, bandwidth, normalize, normalized) -> None:
    z = stable_point(20, signed=kind == "rbf")
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -1, 2])

    def loss(latents: torch.Tensor) -> torch.Tensor:
        adjacency = latent_graph(
            latents, 3, similarity=kind, bandwidth=bandwidth, normalize=normalize
        )
        return label_variation(adjacency, y, normalized=normalized)

    assert torch.autograd.gradcheck(loss, (z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("kind", "normalized"), [("cosine", True), ("rbf", False)])
def test_label_variation_of_the_edge_list_gradients(kind: str, normalized: bool) -> None:
    z = stable_point(24, signed=kind == "rbf")
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -1, 2])

    def loss(latents: torch.Tensor) -> torch.Tensor:
        graph = batch_graph(latents, 3, similarity=kind, normalize=True)
        return label_variation(graph, y, normalized=normalized)

    assert torch.autograd.gradcheck(loss, (z,), eps=1e-6, atol=1e-6)


def test_smoothness_gradients() -> None:
    layers = [stable_point(s, d=3 + s % 3) for s in (30, 31, 32)]
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 1, 2])

    def loss(*latents: torch.Tensor) -> torch.Tensor:
        return smoothness(
            [label_variation(latent_graph(z, 3), y, normalized=True) for z in latents]
        )

    assert torch.autograd.gradcheck(loss, tuple(layers), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("distinct", [False, True])
def test_gkd_gradients(distinct: bool) -> None:
    teacher = stable_point(40, d=6).detach()
    student = stable_point(41, d=3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 1, 2])
    mask = distinct_classes_mask(y) if distinct else None
    target = latent_graph(teacher, 3, normalize=True, mask=mask)

    def loss(latents: torch.Tensor) -> torch.Tensor:
        return gkd_distance(target, latent_graph(latents, 3, normalize=True, mask=mask))

    assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-6)


def test_gkd_gradient_is_zero_not_nan_at_a_perfect_match() -> None:
    z = stable_point(42)
    target = latent_graph(z.detach(), 3, normalize=True)
    gkd_distance(target, latent_graph(z, 3, normalize=True)).backward()
    assert z.grad is not None and torch.all(z.grad == 0)


# --------------------------------------------------------------------------------- measure


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bandwidth", [None, 2.0])
def test_measure_equals_the_dense_computation(signed, normalize, bandwidth) -> None:
    z, y = random_case(50, n=80, d=6, signed=signed)
    y[[3, 17]] = -1
    out = label_variation_measure(z, y, k=5, bandwidth=bandwidth, normalize=normalize)
    adjacency = latent_graph(t(z), 5, bandwidth=bandwidth, normalize=normalize)
    labels = torch.as_tensor(y)
    assert out["label_variation"] == pytest.approx(float(label_variation(adjacency, labels)))
    assert out["label_variation_normalized"] == pytest.approx(
        float(label_variation(adjacency, labels, normalized=True))
    )
    assert out["n"] == 80 and out["k"] == 5 and out["labeled"] == 78 and out["classes"] == 3
    assert out["similarity"] == ("rbf" if signed else "cosine")
    assert out["edges"] == int((adjacency > 0).sum()) // 2
    if signed:
        sq = oracle_similarity(z, "rbf", 1.0)
        mean_sq = -np.log(sq)[~np.eye(80, dtype=bool)].mean()
        assert out["bandwidth"] == pytest.approx(bandwidth or math.sqrt(mean_sq))
    else:
        assert out["bandwidth"] is None


def test_measure_on_planted_float32_data_and_forced_similarity() -> None:
    z, y, _ = gaussian_mixture(300, 16, 4, 2, separation=3.0, seed=1)
    for kind in ("cosine", "rbf"):
        out = label_variation_measure(z, y, k=8, similarity=kind)
        dense = latent_graph(t(z.astype(np.float64)), 8, similarity=kind)
        expected = float(label_variation(dense, torch.as_tensor(y), normalized=True))
        assert out["similarity"] == kind
        assert out["label_variation_normalized"] == pytest.approx(expected, rel=1e-9)


def test_measure_with_an_all_zero_row_matches_dense() -> None:
    z, y = random_case(51, n=30, signed=False)
    z[4] = 0.0
    out = label_variation_measure(z, y, k=4, normalize=True)
    dense = latent_graph(t(z), 4, normalize=True)
    assert out["label_variation"] == pytest.approx(
        float(label_variation(dense, torch.as_tensor(y)))
    )


def test_measure_never_builds_an_n_by_n_matrix() -> None:
    import tracemalloc

    z, y, _ = gaussian_mixture(6000, 8, 5, 2, separation=2.0, seed=2)
    tracemalloc.start()
    try:
        out = label_variation_measure(z, y, k=10, normalize=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30e6  # numpy/scipy memory: an N x N matrix would take 36 MB (int8) or more
    assert 0.0 < out["label_variation_normalized"] < 1.0


def test_measure_options_change_the_result() -> None:
    z, y = planted(1.5, seed=5, n=120)
    base = label_variation_measure(z, y, k=5)
    assert base["label_variation"] != label_variation_measure(z, y, k=9)["label_variation"]
    assert (
        base["label_variation"]
        != (label_variation_measure(z, y, k=5, normalize=True)["label_variation"])
    )
    assert (
        base["label_variation"]
        != (label_variation_measure(z, y, k=5, bandwidth=0.3)["label_variation"])
    )
    shifted = z - z.min() + 0.1  # non-negative: auto switches to cosine
    assert label_variation_measure(shifted, y, k=5)["similarity"] == "cosine"


# --------------------------------------------------------------------------- dtype, device


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    z, y = random_case(61)
    cpu = label_variation(latent_graph(t(z), 4, normalize=True), torch.as_tensor(y))
    gpu = label_variation(latent_graph(t(z).cuda(), 4, normalize=True), torch.as_tensor(y).cuda())
    assert gpu.device.type == "cuda"
    assert float(gpu) == pytest.approx(float(cpu), rel=1e-10)


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_lcc_input_error() -> None:
    z, y = random_case(70, n=6)
    zt = t(z)
    bad = zt.clone()
    bad[1, 1] = float("nan")
    cases = [
        lambda: latent_graph(bad, 2),
        lambda: latent_graph(zt, 6),
        lambda: latent_graph(zt, 0),
        lambda: latent_graph(zt, 2, similarity="euclid"),
        lambda: latent_graph(zt, 2, bandwidth=0.0),
        lambda: latent_graph(zt, 2, bandwidth=float("nan")),
        lambda: latent_graph(zt, 2, mask=torch.ones(3, 3, dtype=torch.bool)),
        lambda: latent_graph(zt[:1], 1),
        lambda: latent_graph(torch.arange(12).reshape(6, 2), 2),
        lambda: similarity_matrix(np.ones((4, 2))),
        lambda: label_variation(torch.ones(3, 4), torch.zeros(3, dtype=torch.long)),
        lambda: label_variation(torch.ones(6, 6), torch.zeros(5, dtype=torch.long)),
        lambda: label_variation(torch.ones(6, 6), torch.zeros(6)),
        lambda: label_variation(torch.ones(6, 6), torch.full((6,), -2)),
        lambda: smoothness([torch.tensor(1.0)]),
        lambda: gkd_distance(torch.ones(3, 3), torch.ones(4, 4)),
        lambda: gkd_distance(torch.ones(3, 3), torch.ones(3, 3), mask=torch.ones(2, 2)),
        lambda: label_variation_measure(z, y, k=6),
        lambda: label_variation_measure(z, y[:5]),
        lambda: label_variation_measure(z, y, k=2, similarity="l2"),
        lambda: label_variation_measure(np.where(z > 0, np.nan, z), y, k=2),
        lambda: label_variation_measure(z, y.astype(float) + 0.5, k=2),
    ]
    for case in cases:
        with pytest.raises(LCCInputError):
            case()


def test_similarity_and_gkd_stay_in_float32_under_autocast() -> None:
    # a bfloat16 Gram matrix moves similarities by ~1e-2; the guard keeps float32 (~1e-6)
    z = torch.tensor(gaussian_mixture(48, 64, 3, 2, seed=9)[0], dtype=torch.float32) + 5.0
    for kind in ("cosine", "rbf"):
        expected = torch.tensor(oracle_similarity(z.double().numpy(), kind), dtype=torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = similarity_matrix(z, similarity=kind)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    teacher = torch.rand(30, 30).bfloat16()
    student = torch.rand(30, 30).bfloat16()
    expected_gkd = float(torch.linalg.vector_norm((student.double() - teacher.double()).ravel()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = gkd_distance(teacher, student)
    assert distance.dtype == torch.float32
    assert float(distance) == pytest.approx(expected_gkd, rel=1e-6)
