"""Independent reference implementations shared by several test files."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from lcc.synthetic import gaussian_mixture


def brute_force_knn_graph(z: np.ndarray, k: int) -> sp.csr_matrix:
    """Unweighted graph linking i and j when either is among the other's k nearest (loops)."""
    z = z.astype(np.float64)
    n = z.shape[0]
    dense = np.zeros((n, n))
    for i in range(n):
        distances = np.linalg.norm(z - z[i], axis=1)
        distances[i] = np.inf
        dense[i, np.argsort(distances, kind="stable")[:k]] = 1.0
    return sp.csr_matrix(np.maximum(dense, dense.T))


# ---------------------------------------------- latent geometry graphs (tests/engine/test_lgg*)


def oracle_similarity(z: np.ndarray, kind: str, h: float | None = None) -> np.ndarray:
    """Sec. 3.3 step 1, one pair at a time: cosine (clamped at 0) or exp(-d^2 / h^2)."""
    n = len(z)
    sim = np.zeros((n, n))
    if kind == "cosine":
        for i in range(n):
            for j in range(n):
                ni, nj = np.linalg.norm(z[i]), np.linalg.norm(z[j])
                cos = float(z[i] @ z[j]) / (ni * nj) if ni > 0 and nj > 0 else 0.0
                sim[i, j] = max(cos, 0.0)
        return sim
    sq = np.array([[float(np.sum((z[i] - z[j]) ** 2)) for j in range(n)] for i in range(n)])
    if h is None:
        h2 = sum(sq[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    else:
        h2 = h * h
    return np.exp(-sq / h2)


def oracle_graph(
    z: np.ndarray,
    k: int,
    kind: str,
    h: float | None = None,
    normalize: bool = False,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Steps 2-4: k most similar others, union with w_ij = S_ij, then D^-1/2 A D^-1/2."""
    sim = oracle_similarity(z, kind, h)
    n = len(z)
    nearest = []
    for i in range(n):
        candidates = [j for j in range(n) if j != i and (allowed is None or allowed[i, j])]
        candidates.sort(key=lambda j: -sim[i, j])
        nearest.append(set(candidates[:k]))
    adjacency = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if j in nearest[i] or i in nearest[j]:
                adjacency[i, j] = sim[i, j]
    if normalize:
        degree = adjacency.sum(axis=1)
        for i in range(n):
            for j in range(n):
                if degree[i] > 0 and degree[j] > 0:
                    adjacency[i, j] /= math.sqrt(degree[i] * degree[j])
    return adjacency


def oracle_variation(adjacency: np.ndarray, y: np.ndarray, normalized: bool = False) -> float:
    """Eq. 5: sum of A_ij over (ordered) pairs of labelled samples of distinct classes."""
    across, total = 0.0, 0.0
    for i in range(len(y)):
        for j in range(len(y)):
            if i == j or y[i] < 0 or y[j] < 0:
                continue
            total += adjacency[i, j]
            if y[i] != y[j]:
                across += adjacency[i, j]
    if normalized:
        return across / total if total > 0 else 0.0
    return across


def trace_variation(adjacency: np.ndarray, y: np.ndarray) -> float:
    """Eq. 5's other side: tr(V^T L V) on the labelled samples, L = D - A."""
    keep = y >= 0
    sub = adjacency[np.ix_(keep, keep)].copy()
    np.fill_diagonal(sub, 0.0)
    labels = y[keep]
    classes = np.unique(labels)
    v = (labels[:, None] == classes[None, :]).astype(float)
    laplacian = np.diag(sub.sum(axis=1)) - sub
    return float(np.trace(v.T @ laplacian @ v))


def random_case(seed: int, n: int = 24, d: int = 5, signed: bool = True):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    if not signed:
        z = np.abs(z)
    y = rng.integers(0, 3, n)
    return z, y


def planted(separation: float, seed: int = 0, n: int = 90):
    """Overlapping blobs: 3 classes x 2 sub-clusters (harder the smaller the separation)."""
    z, y, _ = gaussian_mixture(n, 6, 3, 2, separation=separation, noise=1.0, seed=seed)
    return z.astype(np.float64), y


def t(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(array, dtype=torch.float64)


def stable_point(seed: int, n: int = 10, d: int = 4, signed: bool = True, k: int = 3):
    """Random latents whose k-NN sets survive gradcheck's perturbations: the first seed from
    ``seed`` on whose k-th and (k+1)-th similarities differ by > 1e-4 in every row (the
    similarity ``auto`` picks: RBF for signed latents, cosine otherwise)."""
    while True:
        z, _ = random_case(seed, n=n, d=d, signed=signed)
        if not signed:
            z = z + 0.1
        sim = oracle_similarity(z, "rbf" if signed else "cosine", 1.0)
        np.fill_diagonal(sim, -np.inf)
        ordered = -np.sort(-sim, axis=1)
        if np.min(ordered[:, k - 1] - ordered[:, k]) > 1e-4:  # >> gradcheck's eps = 1e-6
            return t(z).requires_grad_(True)
        seed += 1000


def three_layers(seed: int) -> list[torch.Tensor]:
    """Latents of one batch at three layers: non-negative (cosine), signed (RBF), non-negative
    of another dimension."""
    first, _ = random_case(seed, n=24, d=5, signed=False)
    second, _ = random_case(seed + 1, n=24, d=3)
    third, _ = random_case(seed + 2, n=24, d=7, signed=False)
    return [t(first), t(second), t(third)]
