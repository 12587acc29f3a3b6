"""Orthogonal correction (LCC paper sec. V.C) against a numpy oracle written here, and on two
planted crossing lines where it must leave the wrong one faster than the plain pull."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcc.engine.loss import lcc_loss
from lcc.engine.orthogonal import check_tangent, orthogonal_targets
from lcc.engine.refresh import RefreshConfig, refresh
from lcc.engine.targets import Targets, exact_targets
from lcc.errors import LCCInputError


def oracle(
    z: np.ndarray, clusters: np.ndarray, targets: Targets, k: int, dim: int | float
) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """The paper's V.C by hand: per correctible sample, its k nearest members of its own cluster
    (itself excluded), centred at their mean, SVD, and the pull's orthogonal part."""
    out = targets.vectors.astype(np.float64).copy()
    bases, ratios = [], []
    for row, i in enumerate(targets.indices):
        others = np.flatnonzero((clusters == clusters[i]) & (np.arange(len(z)) != i))
        if len(others) < k:
            bases.append(np.zeros((0, z.shape[1])))
            continue
        distances = np.linalg.norm(z[others] - z[i], axis=1)
        near = z[others[np.argsort(distances)[:k]]].astype(np.float64)
        _, s, vt = np.linalg.svd(near - near.mean(axis=0), full_matrices=False)
        if isinstance(dim, float):
            explained = np.cumsum(s**2) / np.sum(s**2)
            m = int(np.searchsorted(explained, dim - 1e-12) + 1)
        else:
            m = dim
        basis = vt[:m]
        v = z[i] - targets.vectors[row].astype(np.float64)
        perp = v - basis.T @ (basis @ v)
        out[row] = z[i] - perp
        bases.append(basis)
        ratios.append(float(np.linalg.norm(perp) / np.linalg.norm(v)))
    return out, bases, ratios


def case(seed: int, n: int = 160, d: int = 12):
    """Latents in 4 clusters with random labels for a fifth of them: misclustered samples."""
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, 4, n)
    centres = rng.normal(scale=6.0, size=(4, d))
    spread = rng.normal(size=(4, d, d)) * np.linspace(1.0, 0.1, d)  # anisotropic clusters
    z = centres[clusters] + np.einsum("nd,nde->ne", rng.normal(size=(n, d)), spread[clusters])
    y = clusters.copy()
    flip = rng.random(n) < 0.2
    y[flip] = rng.integers(0, 4, int(flip.sum()))
    return z.astype(np.float32), y, clusters, y == clusters


@pytest.mark.parametrize(("seed", "k", "dim"), [(0, 10, 3), (1, 15, 1), (2, 12, 0.8)])
def test_matches_the_numpy_oracle(seed: int, k: int, dim: int | float) -> None:
    z, y, clusters, cc = case(seed)
    plain = exact_targets(z, y, cc, k=5)
    result = orthogonal_targets(z, clusters, plain, tangent_k=k, tangent_dim=dim)
    expected, _, ratios = oracle(z, clusters, plain, k, dim)
    assert plain.n_correctible > 10
    np.testing.assert_array_equal(result.targets.indices, plain.indices)
    np.testing.assert_allclose(result.targets.vectors, expected, atol=2e-4, rtol=1e-4)
    assert result.stats.projected == plain.n_correctible and result.stats.fallback == 0
    assert result.stats.mean_ratio == pytest.approx(np.mean(ratios), rel=1e-4)
    # the projection removed something but not everything
    assert 0.0 < result.stats.mean_ratio < 1.0


def test_the_pull_is_orthogonal_to_the_tangent_basis() -> None:
    z, y, clusters, cc = case(3)
    plain = exact_targets(z, y, cc, k=5)
    result = orthogonal_targets(z, clusters, plain, tangent_k=10, tangent_dim=4)
    _, bases, _ = oracle(z, clusters, plain, 10, 4)
    for row, i in enumerate(plain.indices):
        pull = z[i].astype(np.float64) - result.targets.vectors[row]
        plain_pull = z[i].astype(np.float64) - plain.vectors[row]
        assert np.abs(bases[row] @ pull).max() <= 1e-5 * np.linalg.norm(plain_pull)
        # and what is left of the plain pull is exactly that orthogonal part
        assert np.linalg.norm(pull) <= np.linalg.norm(plain_pull) * (1 + 1e-6)


def test_small_clusters_keep_the_plain_target_and_are_counted() -> None:
    z, y, clusters, cc = case(4, n=120)
    small = np.flatnonzero(clusters == 2)
    clusters = clusters.copy()
    clusters[small[6:]] = 1  # cluster 2 keeps 6 members: 5 others < tangent_k
    cc = y == clusters
    plain = exact_targets(z, y, cc, k=3)
    result = orthogonal_targets(z, clusters, plain, tangent_k=8, tangent_dim=2)
    in_small = clusters[plain.indices] == 2
    assert in_small.any() and (~in_small).any()
    np.testing.assert_array_equal(result.targets.vectors[in_small], plain.vectors[in_small])
    assert not np.allclose(result.targets.vectors[~in_small], plain.vectors[~in_small])
    assert result.stats.fallback == int(in_small.sum())
    assert result.stats.projected == int((~in_small).sum())


def crossing_lines(seed: int = 0, n: int = 400, d: int = 10, angle: float = 40.0):
    """Class 0 on line A (direction a), class 1 on line B crossing A at the origin; a few class-1
    samples lie on A (planted misclustered samples). Noise 0.02 in every dimension."""
    rng = np.random.default_rng(seed)
    a = np.zeros(d)
    a[0] = 1.0
    b = np.zeros(d)
    b[0], b[1] = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    t = rng.uniform(-4, 4, n)
    on_b = np.arange(n) >= n // 2
    z = np.where(on_b[:, None], t[:, None] * b, t[:, None] * a) + rng.normal(0, 0.02, (n, d))
    clusters = on_b.astype(np.int64)  # the manifolds are the clusters
    y = clusters.copy()
    wrong = np.flatnonzero(~on_b & (np.abs(t) > 1.5) & (np.abs(t) < 3.0))[:6]
    y[wrong] = 1  # class 1, sitting on A
    return z.astype(np.float32), y, clusters, wrong, a


def steps_to_leave(z0: np.ndarray, target: np.ndarray, a: np.ndarray, lr: float) -> int:
    """Gradient steps on the LCC loss until the point is 0.5 away from line A (span a)."""
    z = torch.tensor(z0, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(target, dtype=torch.float64)
    for step in range(1, 10_000):
        loss = lcc_loss(z[None], t[None])
        (grad,) = torch.autograd.grad(loss, z)
        with torch.no_grad():
            z -= lr * grad
        point = z.detach().numpy()
        if np.linalg.norm(point - (point @ a) * a) > 0.5:
            return step
    return 10_000


def test_orthogonal_leaves_the_wrong_manifold_in_fewer_steps() -> None:
    z, y, clusters, wrong, a = crossing_lines()
    plain = exact_targets(z, y, y == clusters, k=5)
    assert set(plain.indices.tolist()) == set(wrong.tolist())
    result = orthogonal_targets(z, clusters, plain, tangent_k=20, tangent_dim=1)
    for row, i in enumerate(plain.indices):
        slow = steps_to_leave(z[i], plain.vectors[row], a, lr=0.05)
        fast = steps_to_leave(z[i], result.targets.vectors[row], a, lr=0.05)
        # the plain pull leaves A at the sine of its angle to A; the orthogonal one head-on
        assert fast < 0.8 * slow, (i, fast, slow)
    assert result.stats.mean_ratio < 0.8


def test_refresh_applies_it_and_reports_it() -> None:
    z, y, _, _ = case(5, n=300)
    config = RefreshConfig(k=5, knn="exact", correction="orthogonal", tangent_k=12, tangent_dim=3)
    corrected = refresh(z, y, config)
    plain = refresh(z, y, RefreshConfig(k=5, knn="exact"))
    np.testing.assert_array_equal(corrected.clusters, plain.clusters)
    again = orthogonal_targets(z, plain.clusters, plain.targets, tangent_k=12, tangent_dim=3)
    np.testing.assert_allclose(corrected.targets.vectors, again.targets.vectors, atol=1e-5)
    summary = corrected.summary()
    assert summary["correction"] == "orthogonal"
    assert summary["orthogonal_mean_ratio"] == pytest.approx(again.stats.mean_ratio)
    assert summary["orthogonal_fallback"] == again.stats.fallback
    assert "orthogonal" in corrected.seconds and "orthogonal" not in plain.seconds
    assert plain.orthogonal is None and "orthogonal_mean_ratio" not in plain.summary()


@pytest.mark.parametrize(
    ("k", "dim", "words"),
    [
        (1, 1, "at least 2"),
        (10, 0, "at least 1"),
        (10, 10, "below tangent_k"),
        (10, 1.5, "(0, 1)"),
        (10, "two", "fraction"),
    ],
)
def test_bad_tangent_settings_are_one_line(k: object, dim: object, words: str) -> None:
    with pytest.raises(LCCInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_tangent(k, dim)


def test_tangent_dim_must_leave_part_of_the_space() -> None:
    z, y, _, _ = case(6, n=100, d=6)
    with pytest.raises(LCCInputError, match="latent dimension 6"):
        refresh(z, y, k=5, correction="orthogonal", tangent_k=20, tangent_dim=6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    z, y, clusters, cc = case(7, n=400, d=32)
    plain = exact_targets(z, y, cc, k=5)
    cpu = orthogonal_targets(z, clusters, plain, tangent_k=12, tangent_dim=0.8)
    gpu = orthogonal_targets(
        torch.from_numpy(z).cuda(), clusters, plain, tangent_k=12, tangent_dim=0.8
    )
    np.testing.assert_allclose(gpu.targets.vectors, cpu.targets.vectors, atol=1e-4, rtol=1e-4)
    assert gpu.stats.projected == cpu.stats.projected
    corrected = refresh(
        z, y, k=5, knn="exact", correction="orthogonal", tangent_k=12, device="cuda"
    )
    assert corrected.summary()["orthogonal_projected"] == corrected.targets.n_correctible
