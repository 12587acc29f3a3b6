"""The k-means centroid loss against loops of the paper's formulas, finite differences and
scikit-learn's KMeans; the centroid initialisation's class spread."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from lcc.engine.centroids import (
    assignments,
    centroid_distances,
    centroid_loss,
    centroid_term,
    init_centroids,
    semi_supervised_loss,
    spread_indices,
)
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread avoids contention on the shared 2-core machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loop_lc(latents: list[np.ndarray], centroids: list[np.ndarray]) -> np.ndarray:
    """l_c(x) = sum_i min_j ||f_i(x) - C_ij||^2, one sample, layer and centroid at a time."""
    out = np.zeros(latents[0].shape[0])
    for b in range(latents[0].shape[0]):
        for z, c in zip(latents, centroids, strict=True):
            best = np.inf
            for j in range(c.shape[0]):
                best = min(best, float(np.sum((z[b].astype(np.float64) - c[j]) ** 2)))
            out[b] += best
    return out


def loop_loss(ce: np.ndarray, lc: np.ndarray, labeled: np.ndarray, beta: float) -> float:
    """(1/N) sum_L (CE + beta l_c) + (1/M) sum_U beta l_c with N, M the group sizes."""
    n, m = int(labeled.sum()), int((~labeled).sum())
    total = 0.0
    for b in range(lc.size):
        if labeled[b]:
            total += (ce[b] + beta * lc[b]) / n
        else:
            total += beta * lc[b] / m
    return total


def layers(seed: int = 0, batch: int = 12) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    latents = [rng.normal(size=(batch, 5)), rng.normal(size=(batch, 3)) * 2]
    centroids = [rng.normal(size=(4, 5)), rng.normal(size=(7, 3))]
    return latents, centroids


def tensors(arrays: list[np.ndarray], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [torch.tensor(a, dtype=dtype) for a in arrays]


def test_distances_equal_brute_force_and_are_never_negative() -> None:
    (z, _), (c, _) = layers()
    got = centroid_distances(torch.tensor(z), torch.tensor(c)).numpy()
    expected = ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    same = torch.full((3, 64), 1e3) + torch.arange(64.0)
    assert (centroid_distances(same, same[:1]) >= 0).all()
    assert centroid_loss([same], [same[:1] + 1e-3]).max().item() < 1e-3  # no cancellation
    assert assignments(torch.tensor(z), torch.tensor(c)).tolist() == expected.argmin(1).tolist()


def test_centroid_loss_equals_the_formula_loop() -> None:
    latents, centroids = layers()
    got = centroid_loss(tensors(latents), tensors(centroids)).numpy()
    np.testing.assert_allclose(got, loop_lc(latents, centroids), rtol=1e-12)
    one = centroid_loss(tensors(latents[:1]), tensors(centroids[:1])).numpy()
    np.testing.assert_allclose(one, loop_lc(latents[:1], centroids[:1]), rtol=1e-12)


@pytest.mark.parametrize("n_labeled", [0, 1, 5, 12])
def test_semi_supervised_loss_equals_the_formula_loop(n_labeled: int) -> None:
    latents, centroids = layers(seed=n_labeled)
    rng = np.random.default_rng(3)
    ce = rng.uniform(0.1, 3.0, size=12)
    labeled = np.zeros(12, dtype=bool)
    labeled[rng.choice(12, n_labeled, replace=False)] = True
    lc = loop_lc(latents, centroids)
    got = semi_supervised_loss(
        torch.tensor(ce),
        centroid_loss(tensors(latents), tensors(centroids)),
        torch.tensor(labeled),
        beta=0.7,
    )
    assert got.item() == pytest.approx(loop_loss(ce, lc, labeled, 0.7), rel=1e-12)
    term = centroid_term(torch.tensor(lc), torch.tensor(labeled)).item()
    assert term == pytest.approx(loop_loss(np.zeros(12), lc, labeled, 1.0), rel=1e-12)


def test_gradients_to_network_and_centroids_match_finite_differences() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=generator)
    labeled = torch.tensor([True, False] * 3)

    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    w1, w2, head, c1, c2 = make(3, 4), make(4, 3), make(3, 3), make(3, 4), make(2, 3)

    def loss(w1, w2, head, c1, c2):  # a two-layer network with centroids on both layers
        z1 = torch.tanh(x @ w1)
        z2 = torch.tanh(z1 @ w2)
        ce = F.cross_entropy(z2 @ head, y, reduction="none")
        return semi_supervised_loss(ce, centroid_loss([z1, z2], [c1, c2]), labeled, beta=0.3)

    assert torch.autograd.gradcheck(loss, (w1, w2, head, c1, c2))


def test_unlabelled_samples_never_influence_the_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 5, generator=generator, requires_grad=True)
    labeled = torch.arange(16) % 3 == 0
    y = torch.randint(0, 5, (16,), generator=generator)
    flipped = torch.where(labeled, y, (y + 1 + torch.arange(16) % 4) % 5)
    lc = torch.zeros(16)
    grads = []
    for labels in (y, flipped):
        ce = F.cross_entropy(logits, labels, reduction="none")
        (grad,) = torch.autograd.grad(semi_supervised_loss(ce, lc, labeled, 1.0), logits)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # the flip matters for a loss that reads every sample (so the check above can fail)
    plain = [torch.autograd.grad(F.cross_entropy(logits, t), logits)[0] for t in (y, flipped)]
    assert not torch.equal(plain[0], plain[1])
    # unlabelled CE values are never read, not even NaN
    ce = F.cross_entropy(logits, y, reduction="none").masked_fill(~labeled, float("nan"))
    total = semi_supervised_loss(ce, lc, labeled, 1.0)
    (grad,) = torch.autograd.grad(total, logits)
    assert torch.isfinite(total) and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grads[0])


def kmeans_objective(z: np.ndarray, centroids: np.ndarray) -> float:
    return float(((z[:, None, :] - centroids[None]) ** 2).sum(-1).min(1).mean())


def test_gradient_steps_on_centroids_reach_the_kmeans_optimum_of_sklearn() -> None:
    # 6 overlapping blobs in 3 classes; 9 centroids spread over the classes
    z, y, _ = gaussian_mixture(1500, 8, 3, 2, separation=3.0, noise=1.0, seed=4)
    z = z.astype(np.float64)
    start = init_centroids(z, y, 9, np.random.default_rng(0))
    reference = KMeans(9, init=start, n_init=1, tol=0.0, max_iter=500).fit(z)
    optimum = kmeans_objective(z, reference.cluster_centers_)

    centroids = torch.tensor(start, requires_grad=True)
    data = torch.tensor(z)
    optimiser = torch.optim.SGD([centroids], lr=1.0)
    for _ in range(300):
        optimiser.zero_grad()
        centroid_loss([data], [centroids]).mean().backward()
        optimiser.step()
    reached = kmeans_objective(z, centroids.detach().numpy())
    assert reached <= optimum * 1.01
    assert kmeans_objective(z, start) > optimum * 1.2  # the start was far from the optimum


def test_init_centroids_spread_evenly_over_labelled_classes() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2, 3], [40, 25, 30, 5])
    y[rng.choice(100, 50, replace=False)] = -1  # half of them unlabelled
    z = rng.normal(size=(100, 3))
    for n in (2, 4, 9, 16):
        rows = spread_indices(y, n, np.random.default_rng(n))
        assert rows.size == n and np.unique(rows).size == n
        shares = np.bincount(y[rows][y[rows] >= 0], minlength=4)
        available = np.bincount(y[y >= 0], minlength=4)
        even = np.minimum(available, n // 4 + 1)
        if (available >= n // 4 + 1).all():  # enough per class: an even spread, labelled only
            assert (y[rows] >= 0).all()
            assert shares.max() - shares.min() <= 1
        else:
            assert (shares <= even).all()
    centroids = init_centroids(z, y, 8, np.random.default_rng(5))
    again = init_centroids(torch.tensor(z), torch.tensor(y), 8, np.random.default_rng(5))
    np.testing.assert_array_equal(centroids, again.numpy())
    assert all(any(np.array_equal(c, row) for row in z) for c in centroids)
    other = init_centroids(z, y, 8, np.random.default_rng(6))
    assert not np.array_equal(centroids, other)


def test_init_falls_back_to_unlabelled_rows_and_to_uniform_draws() -> None:
    y = np.array([0, 0, 1, -1, -1, -1])
    rows = spread_indices(y, 5, 0)
    assert sorted(y[rows].tolist()) == [-1, -1, 0, 0, 1]
    rows = spread_indices(np.full(6, -1), 4, 0)
    assert np.unique(rows).size == 4


def test_bad_input_is_one_clear_error() -> None:
    z = torch.zeros(4, 3)
    with pytest.raises(LCCInputError, match="same D"):
        centroid_distances(z, torch.zeros(2, 4))
    with pytest.raises(LCCInputError, match="no centroids"):
        centroid_distances(z, torch.zeros(0, 3))
    with pytest.raises(LCCInputError, match="one centroid set per layer"):
        centroid_loss([z, z], [torch.zeros(2, 3)])
    with pytest.raises(LCCInputError, match="bool mask"):
        centroid_term(torch.zeros(4), torch.zeros(4))
    with pytest.raises(LCCInputError, match="reduction='none'"):
        semi_supervised_loss(torch.zeros(()), torch.zeros(4), torch.ones(4, dtype=bool), 1.0)
    with pytest.raises(LCCInputError, match="use fewer centroids"):
        spread_indices(np.array([0, 1]), 3)
    with pytest.raises(LCCInputError, match="at least 1"):
        spread_indices(np.array([0, 1]), 0)


def test_half_precision_latents_are_computed_in_float32() -> None:
    (z, _), (c, _) = layers()
    half, full = torch.tensor(z).bfloat16(), torch.tensor(c).float()
    got = centroid_distances(half, full)
    assert got.dtype == torch.float32
    expected = centroid_distances(half.double(), full.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lc = centroid_loss([half.requires_grad_()], [full.requires_grad_()])
    assert lc.dtype == torch.float32
    torch.testing.assert_close(lc.double(), expected.min(1).values, rtol=1e-5, atol=1e-5)
