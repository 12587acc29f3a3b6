"""The batch's latent geometry graph (edge lists, dense, several layers) against loops over
the paper's formulas (sec. 3.3) and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import (
    oracle_graph,
    oracle_similarity,
    planted,
    random_case,
    stable_point,
    t,
    three_layers,
)

from lcc.engine.lgg import distinct_classes_mask, label_variation, similarity_matrix
from lcc.engine.lgg_graph import BatchGraph, batch_graph, latent_graph, resolve_similarity
from lcc.errors import LCCInputError


def test_auto_picks_cosine_for_non_negative_latents_and_rbf_otherwise() -> None:
    z, _ = random_case(1, signed=False)
    assert resolve_similarity(t(z)) == "cosine"
    np.testing.assert_allclose(similarity_matrix(t(z)).numpy(), oracle_similarity(z, "cosine"))
    z[3, 2] = -0.01
    assert resolve_similarity(t(z)) == "rbf"
    np.testing.assert_allclose(similarity_matrix(t(z)).numpy(), oracle_similarity(z, "rbf"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["cosine", "rbf"])
@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("normalize", [False, True])
def test_graph_matches_the_loop(seed: int, kind: str, k: int, normalize: bool) -> None:
    z, _ = random_case(seed, signed=kind == "rbf")
    got = latent_graph(t(z), k, similarity=kind, normalize=normalize).numpy()
    expected = oracle_graph(z, k, kind, normalize=normalize)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)
    assert np.all(np.diag(got) == 0)
    assert np.all((got > 0).sum(axis=1) >= k)  # union: at least k edges per vertex


def test_graph_on_planted_data_matches_the_loop_with_a_fixed_bandwidth() -> None:
    z, _ = planted(2.0)
    got = latent_graph(t(z), 5, bandwidth=1.5).numpy()
    np.testing.assert_allclose(got, oracle_graph(z, 5, "rbf", h=1.5), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["cosine", "rbf"])
@pytest.mark.parametrize("normalize", [False, True])
def test_edge_list_is_the_union_graph_in_row_order(kind: str, normalize: bool) -> None:
    z, _ = random_case(5, n=30, signed=kind == "rbf")
    graph = batch_graph(t(z), 4, similarity=kind, normalize=normalize)
    expected = oracle_graph(z, 4, kind, normalize=normalize)
    pairs = list(zip(graph.rows.tolist(), graph.cols.tolist(), strict=True))
    # every ordered pair of the union k-NN sets once, sorted, whatever its weight (cosine
    # edges may weigh 0 after clamping, so the pattern comes from the oracle's k-NN sets)
    sim = oracle_similarity(z, kind)
    nearest = [
        set(sorted((j for j in range(30) if j != i), key=lambda j: -sim[i, j])[:4])
        for i in range(30)
    ]
    union = sorted(
        (i, j) for i in range(30) for j in range(30) if j in nearest[i] or i in nearest[j]
    )
    assert pairs == union
    np.testing.assert_allclose(
        graph.weights.numpy(), expected[graph.rows.numpy(), graph.cols.numpy()], rtol=1e-10
    )
    np.testing.assert_array_equal(
        graph.dense().numpy(), latent_graph(t(z), 4, similarity=kind, normalize=normalize).numpy()
    )


@pytest.mark.parametrize("normalize", [False, True])
def test_graphs_of_several_layers_equal_the_graphs_of_each(normalize: bool) -> None:
    layers = three_layers(30)
    stacked = batch_graph(layers, 4, normalize=normalize)
    assert stacked.layers == 3 and stacked.count == 3
    dense = stacked.dense()
    assert dense.shape == (3, 24, 24)
    for index, z in enumerate(layers):
        kind = "cosine" if index != 1 else "rbf"
        expected = oracle_graph(z.numpy(), 4, kind, normalize=normalize)
        np.testing.assert_allclose(dense[index].numpy(), expected, rtol=1e-10, atol=1e-12)
        single = batch_graph(z, 4, normalize=normalize)
        mine = stacked.edge_layers() == index
        np.testing.assert_array_equal(stacked.rows[mine].numpy() - index * 24, single.rows.numpy())
        np.testing.assert_array_equal(stacked.cols[mine].numpy() - index * 24, single.cols.numpy())


def test_several_layers_gradients_reach_each_layer() -> None:
    layers = [
        stable_point(50, signed=False).detach(),
        stable_point(51, d=3).detach(),
        stable_point(52, signed=False).detach(),  # same shape as the first: no mix-up
    ]
    pattern = batch_graph(layers, 3)
    coefficients = torch.rand(pattern.rows.numel(), generator=torch.Generator().manual_seed(1))

    def loss(*latents: torch.Tensor) -> torch.Tensor:
        graph = batch_graph(list(latents), 3, normalize=True)
        assert torch.equal(graph.rows, pattern.rows) and torch.equal(graph.cols, pattern.cols)
        return (graph.weights * coefficients.double()).sum()

    inputs = tuple(z.clone().requires_grad_(True) for z in layers)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)
    # a layer without gradient (a teacher's) gets none, the others theirs
    inputs = (layers[0], layers[1].clone().requires_grad_(True), layers[2])
    loss(*inputs).backward()
    assert inputs[1].grad is not None and inputs[0].grad is None


def test_layers_of_different_batches_are_refused() -> None:
    layers = three_layers(32)
    with pytest.raises(LCCInputError, match="one batch"):
        batch_graph([layers[0], layers[1][:20]], 3)
    with pytest.raises(LCCInputError, match="at least one layer"):
        batch_graph([], 3)


def test_non_finite_latents_name_their_layer() -> None:
    layers = three_layers(33)
    layers[2] = layers[2].clone()
    layers[2][4, 1] = float("nan")
    with pytest.raises(LCCInputError, match=r"z\[2\] contains NaN"):
        batch_graph(layers, 3)
    with pytest.raises(LCCInputError, match=r"^z contains NaN"):
        batch_graph(layers[2], 3)


def test_a_mask_without_allowed_pairs_gives_an_empty_graph_and_zero_gradient() -> None:
    z = stable_point(12)
    none = torch.zeros(10, 10, dtype=torch.bool)
    graph = batch_graph(z, 3, mask=none)
    assert isinstance(graph, BatchGraph) and graph.rows.numel() == 0
    loss = label_variation(graph, torch.arange(10) % 3, normalized=True)
    loss.backward()
    assert float(loss.detach()) == 0.0 and z.grad is not None and torch.all(z.grad == 0)


def test_mask_restricts_edges_to_allowed_pairs() -> None:
    z, y = random_case(3)
    mask = distinct_classes_mask(torch.as_tensor(y))
    allowed = np.array([[y[i] != y[j] for j in range(len(y))] for i in range(len(y))])
    np.testing.assert_array_equal(mask.numpy(), allowed)
    got = latent_graph(t(z), 3, mask=mask).numpy()
    np.testing.assert_allclose(got, oracle_graph(z, 3, "rbf", allowed=allowed), rtol=1e-10)
    assert not np.any(got[~allowed])
    assert not np.allclose(got, latent_graph(t(z), 3).numpy())  # the mask changes the graph


@pytest.mark.parametrize(
    ("kind", "bandwidth", "normalize"),
    [("cosine", None, False), ("cosine", None, True), ("rbf", None, False), ("rbf", 0.8, True)],
)
def test_edge_weight_gradients_for_any_weighting_of_the_edges(kind, bandwidth, normalize) -> None:
    """The sparse backward against finite differences, with a weighting that differs between
    (i, j) and (j, i): a backward that used one direction only would fail."""
    z = stable_point(23, signed=kind == "rbf")
    pattern = batch_graph(z.detach(), 3, similarity=kind)  # fixed near the stable point
    coefficients = torch.rand(pattern.rows.numel(), generator=torch.Generator().manual_seed(0))

    def loss(latents: torch.Tensor) -> torch.Tensor:
        graph = batch_graph(latents, 3, similarity=kind, bandwidth=bandwidth, normalize=normalize)
        assert torch.equal(graph.rows, pattern.rows) and torch.equal(graph.cols, pattern.cols)
        return (graph.weights * coefficients.double()).sum()

    assert torch.autograd.gradcheck(loss, (z,), eps=1e-6, atol=1e-6)


def test_half_precision_is_computed_in_float32() -> None:
    z, _ = random_case(60)
    half = torch.as_tensor(z, dtype=torch.float16)
    adjacency = latent_graph(half, 4)
    assert adjacency.dtype == torch.float32
    reference = latent_graph(half.float(), 4)
    torch.testing.assert_close(adjacency, reference)


@pytest.mark.parametrize("signed", [False, True])
def test_autocast_does_not_lower_the_graphs_precision(signed: bool) -> None:
    """Under mixed precision the Gram matrix would be bfloat16 and pick other neighbours."""
    z = torch.as_tensor(planted(0.5, seed=8, n=200)[0], dtype=torch.float32)
    z = z if signed else z.abs()
    reference = batch_graph(z, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = batch_graph(z, 10)
    assert torch.equal(mixed.rows, reference.rows) and torch.equal(mixed.cols, reference.cols)
    assert mixed.weights.dtype == torch.float32
    torch.testing.assert_close(mixed.weights, reference.weights)
