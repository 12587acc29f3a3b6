"""Generated latents with a planted cluster structure, for examples, tests and benchmarks.

>>> z, y, sub = gaussian_mixture(n_samples=60, dim=8, n_classes=3, clusters_per_class=2, seed=0)
>>> z.shape, y.shape, sorted(set(y.tolist())), int(sub.max()) + 1
((60, 8), (60,), [0, 1, 2], 6)
"""

from __future__ import annotations

import numpy as np


def gaussian_mixture(
    n_samples: int = 2_000,
    dim: int = 32,
    n_classes: int = 10,
    clusters_per_class: int = 2,
    *,
    separation: float = 10.0,
    noise: float = 1.0,
    intrinsic_dim: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample latents from ``n_classes * clusters_per_class`` isotropic Gaussian blobs.

    Centres are scaled so that two blob centres are ``separation`` apart on average and each
    sample lies about ``noise`` from its centre (both in Euclidean norm). With
    ``intrinsic_dim`` set, blobs live in a random subspace of that dimension embedded in
    ``dim`` dimensions (plus a little full-dimensional noise), as latents of trained
    networks do.

    Returns ``(z, y, subcluster)``: float32 latents (N, dim), int64 class labels (N,), and
    int64 planted sub-cluster ids (N,), where sub-cluster ``s`` belongs to class
    ``s // clusters_per_class``. Samples are spread evenly across sub-clusters.
    """
    if n_samples < 1 or dim < 1 or n_classes < 1 or clusters_per_class < 1:
        raise ValueError("n_samples, dim, n_classes and clusters_per_class must be positive")
    rng = np.random.default_rng(seed)
    n_blobs = n_classes * clusters_per_class
    subcluster = np.arange(n_samples, dtype=np.int64) % n_blobs
    rng.shuffle(subcluster)
    space = dim if intrinsic_dim is None else min(intrinsic_dim, dim)
    centres = rng.normal(size=(n_blobs, space)) * (separation / np.sqrt(2 * space))
    points = centres[subcluster] + rng.normal(size=(n_samples, space)) * (noise / np.sqrt(space))
    if space < dim:
        basis, _ = np.linalg.qr(rng.normal(size=(dim, space)))
        points = points @ basis.T + rng.normal(size=(n_samples, dim)) * (
            0.05 * noise / np.sqrt(dim)
        )
    labels = subcluster // clusters_per_class
    return points.astype(np.float32), labels.astype(np.int64), subcluster
