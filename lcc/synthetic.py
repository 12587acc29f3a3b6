"""Generated latents with a planted cluster structure, for examples, tests and benchmarks.

:func:`gaussian_mixture` makes small in-memory examples; :func:`planted_latents` makes the
ImageNet-scale benchmark data (1,000 classes x 3 sub-clusters, 10% label noise) block by block,
straight into a memory map if asked, in float16 or float32.

>>> z, y, sub = gaussian_mixture(n_samples=60, dim=8, n_classes=3, clusters_per_class=2, seed=0)
>>> z.shape, y.shape, sorted(set(y.tolist())), int(sub.max()) + 1
((60, 8), (60,), [0, 1, 2], 6)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


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


#: Rows generated per block by :func:`planted_latents`; each block has its own seeded stream,
#: so the values do not depend on how the output is chunked.
BLOCK_ROWS = 16_384


@dataclass(frozen=True)
class PlantedLatents:
    """Output of :func:`planted_latents`: latents ``z`` (N, dim), noisy labels ``y`` (N,) int64,
    planted sub-cluster ids ``subcluster`` (N,) int64 and the ``clean`` labels (N,) int64
    (``subcluster // clusters_per_class``; ``y`` differs from them on the mislabelled samples).
    """

    z: np.ndarray
    y: np.ndarray
    subcluster: np.ndarray
    clean: np.ndarray


def planted_latents(
    n_samples: int,
    dim: int = 512,
    n_classes: int = 1_000,
    clusters_per_class: int = 3,
    *,
    separation: float = 2.0,
    noise: float = 1.0,
    intrinsic_dim: int | None = 48,
    label_noise: float = 0.1,
    seed: int = 0,
    dtype: npt.DTypeLike = np.float32,
    out: np.ndarray | None = None,
) -> PlantedLatents:
    """ImageNet-scale planted latents, generated block by block (1.28M x 512 in a memory map).

    The mixture of :func:`gaussian_mixture` (``n_classes * clusters_per_class`` blobs, two blob
    centres ``separation`` apart on average, samples about ``noise`` from their centre, in a
    random ``intrinsic_dim``-dimensional subspace plus a little full-dimensional noise), then a
    fraction ``label_noise`` of the samples relabelled to another class uniformly at random (the
    hard samples LCC corrects). Rows are generated in blocks of :data:`BLOCK_ROWS` in float32
    and written into ``out`` (any writable ``(n_samples, dim)`` array, such as a memory map from
    :func:`lcc.io.npy_memmap_atomic`; its dtype wins) or a new array of ``dtype``; no
    float64 copy of the whole matrix is ever made. The same seed gives the same values for any
    ``out``.

    >>> a = planted_latents(1_000, 16, n_classes=10, seed=0)
    >>> a.z.shape, a.z.dtype.name, round(float((a.y != a.clean).mean()), 2)
    ((1000, 16), 'float32', 0.1)
    >>> half = np.empty((1_000, 16), np.float16)
    >>> b = planted_latents(1_000, 16, n_classes=10, seed=0, out=half)
    >>> bool(np.array_equal(b.z, a.z.astype(np.float16))), bool(np.array_equal(b.y, a.y))
    (True, True)
    """
    if n_samples < 1 or dim < 1 or n_classes < 1 or clusters_per_class < 1:
        raise ValueError("n_samples, dim, n_classes and clusters_per_class must be positive")
    if not 0.0 <= label_noise <= 1.0 or (label_noise > 0 and n_classes < 2):
        raise ValueError("label_noise must lie in [0, 1] and needs at least 2 classes")
    if out is None:
        out = np.empty((n_samples, dim), dtype=dtype)
    elif out.shape != (n_samples, dim):
        raise ValueError(f"out has shape {out.shape}, expected {(n_samples, dim)}")
    rng = np.random.default_rng(seed)
    n_blobs = n_classes * clusters_per_class
    subcluster = np.arange(n_samples, dtype=np.int64) % n_blobs
    rng.shuffle(subcluster)
    space = dim if intrinsic_dim is None else min(intrinsic_dim, dim)
    centres = rng.normal(size=(n_blobs, space)) * (separation / np.sqrt(2 * space))
    basis = np.linalg.qr(rng.normal(size=(dim, space)))[0].T if space < dim else None
    centres32 = centres.astype(np.float32)
    basis32 = None if basis is None else basis.astype(np.float32)
    for block, start in enumerate(range(0, n_samples, BLOCK_ROWS)):
        stop = min(start + BLOCK_ROWS, n_samples)
        stream = np.random.default_rng([seed, block])
        points = centres32[subcluster[start:stop]]
        points += stream.standard_normal((stop - start, space), dtype=np.float32) * np.float32(
            noise / np.sqrt(space)
        )
        if basis32 is not None:
            points = points @ basis32
            points += stream.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(
                0.05 * noise / np.sqrt(dim)
            )
        out[start:stop] = points
    clean = subcluster // clusters_per_class
    y = clean.copy()
    hard = rng.choice(n_samples, round(label_noise * n_samples), replace=False)
    if hard.size:
        y[hard] = (y[hard] + rng.integers(1, n_classes, hard.size)) % n_classes
    return PlantedLatents(z=out, y=y, subcluster=subcluster, clean=clean)
