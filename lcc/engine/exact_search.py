"""Exact nearest-row search shared by :mod:`lcc.engine.knn`, :mod:`lcc.engine.cells` and the
device path (:mod:`lcc.engine.device`): blocked matrix products + ``topk`` in torch, faiss brute
force, the thread-count guards and the small helpers both k-NN searches use.

:func:`torch_search_tensors` runs on any torch device: the rows of ``base`` may live on the
device or in (pinned) host memory, in which case they are streamed to the device in chunks and
the best ``k`` of every chunk are merged. The arithmetic of a block (``|b|^2 - 2 q.b`` by
``addmm``, then ``+ |q|^2``, then ``topk``) is the same everywhere, so on CPU tensors it gives
the results of :func:`torch_search`, the NumPy front end that the CPU path has always used.

>>> import numpy as np
>>> base = np.array([[0.0], [2.0], [10.0]], np.float32)
>>> idx, sq = torch_search(base, np.array([[1.5]], np.float32), 2)
>>> idx.tolist(), sq.tolist()
([[1, 0]], [[0.25, 2.25]])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import numpy as np
import torch

__all__ = [
    "BLOCK_ENTRIES",
    "RECALL_SAMPLE",
    "SMALL_WORK",
    "TARGET_RECALL",
    "drop_self",
    "faiss_gpu_module",
    "faiss_kmeans",
    "faiss_module",
    "faiss_search",
    "faiss_threads",
    "squared_norms",
    "to_distance",
    "torch_search",
    "torch_search_tensors",
    "torch_threads",
]

#: Largest distance block (in float32 entries) the CPU torch search materialises at once: 64 MiB.
BLOCK_ENTRIES = 1 << 24
#: Searches with fewer multiply-adds than this run single-threaded.
SMALL_WORK = 1 << 28
#: Approximate searches widen until the recall measured on this many rows reaches the target
#: (the margin above 0.95 covers the sampling error).
RECALL_SAMPLE = 300
TARGET_RECALL = 0.97


def faiss_module() -> ModuleType | None:
    """The ``faiss`` module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_gpu_module() -> ModuleType | None:
    """The ``faiss`` module if it is a GPU build that sees a GPU (``faiss.knn_gpu``), else None."""
    faiss = faiss_module()
    if faiss is None or not hasattr(faiss, "knn_gpu") or not hasattr(faiss, "get_num_gpus"):
        return None
    try:
        return faiss if faiss.get_num_gpus() > 0 else None
    except RuntimeError:  # a GPU build on a machine whose driver it cannot use
        return None


def faiss_kmeans(
    sample: np.ndarray, n_centroids: int, *, seed: int, iterations: int, points: int
) -> np.ndarray:
    """Centroids of a seeded faiss k-means on the rows of ``sample`` (at most ``points`` of them
    per centroid)."""
    kmeans = faiss_module().Kmeans(
        sample.shape[1],
        n_centroids,
        niter=iterations,
        seed=seed,
        max_points_per_centroid=points,
        min_points_per_centroid=1,
    )
    kmeans.train(np.ascontiguousarray(sample))
    return kmeans.centroids


def to_distance(squared: np.ndarray) -> np.ndarray:
    """Euclidean distances (float32) from squared ones, negatives from rounding clipped to 0."""
    return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)


def drop_self(
    indices: np.ndarray, squared: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its k+1 results, or the last result if it is absent.

    The own index may be missing (several exact duplicates) or not first (ties); both are fine.

    >>> i, s = drop_self(np.array([[0, 1], [0, 1]]), np.zeros((2, 2)), np.arange(2))
    >>> i.tolist()
    [[1], [0]]
    """
    own = indices == rows[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    shape = (indices.shape[0], indices.shape[1] - 1)
    return indices[keep].reshape(shape), squared[keep].reshape(shape)


def squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of every row (a batched dot product: no ``rows * rows`` temporary)."""
    return torch.einsum("ij,ij->i", rows, rows)


def faiss_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest ``base`` rows of each query (faiss brute force; ``base`` is not copied)."""
    faiss = faiss_module()
    squared, indices = faiss.knn(np.ascontiguousarray(queries), base, k)
    return indices.astype(np.int64, copy=False), squared


def torch_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest ``base`` rows of each query (NumPy in and out), in row blocks of bounded
    size: indices ``(Q, k)`` int64 and squared distances ``(Q, k)`` float32, nearest first."""
    base_t = torch.from_numpy(np.ascontiguousarray(base))
    query_t = torch.from_numpy(np.ascontiguousarray(queries))
    indices, squared = torch_search_tensors(base_t, query_t, k)
    return indices.numpy(), squared.numpy()


def torch_search_tensors(
    base: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    *,
    device: torch.device | None = None,
    block_entries: int = BLOCK_ENTRIES,
    base_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest ``base`` rows of each query row, on ``device`` (default: ``queries``').

    ``base`` and ``queries`` are float32 ``(M, D)`` and ``(Q, D)`` tensors on ``device`` or on the
    host (then copied to ``device`` a block at a time). ``block_entries`` bounds the distance
    block (queries x base rows) computed at once; ``base_rows`` (default: all) is how many base
    rows are on the device at once -- with fewer than ``M``, the best ``k`` of each base chunk
    are merged, which gives the same neighbours. Returns int64 indices and float32 squared
    distances ``(Q, k)`` on ``device``, nearest first.
    """
    device = queries.device if device is None else torch.device(device)
    n_base = base.shape[0]
    chunk = n_base if base_rows is None else max(k, min(n_base, int(base_rows)))
    block = max(1, block_entries // max(1, chunk))
    indices = torch.empty((queries.shape[0], k), dtype=torch.int64, device=device)
    squared = torch.empty((queries.shape[0], k), dtype=torch.float32, device=device)
    with torch.no_grad():
        resident = chunk >= n_base
        base_d = base.to(device, non_blocking=True) if resident else None
        norms_d = squared_norms(base_d) if base_d is not None else None
        for start in range(0, queries.shape[0], block):
            q = queries[start : start + block].to(device, non_blocking=True)
            q_norms = squared_norms(q)[:, None]
            if base_d is not None:
                values, positions = _block_topk(q, q_norms, base_d, norms_d, k)
            else:
                values, positions = _streamed_topk(q, q_norms, base, chunk, k, device)
            indices[start : start + q.shape[0]] = positions
            squared[start : start + q.shape[0]] = values
    return indices, squared


def _block_topk(
    q: torch.Tensor, q_norms: torch.Tensor, base: torch.Tensor, norms: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    squared = torch.addmm(norms[None, :], q, base.T, alpha=-2.0)
    squared += q_norms
    return torch.topk(squared, k, dim=1, largest=False, sorted=True)


def _streamed_topk(
    q: torch.Tensor,
    q_norms: torch.Tensor,
    base: torch.Tensor,
    chunk: int,
    k: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` over base chunks copied to ``device`` one after the other, merged as they come."""
    best_values = best_positions = None
    for first in range(0, base.shape[0], chunk):
        part = base[first : first + chunk].to(device, non_blocking=True)
        width = min(k, part.shape[0])
        values, positions = _block_topk(q, q_norms, part, squared_norms(part), width)
        positions += first
        if best_values is None:
            best_values, best_positions = values, positions
            continue
        values = torch.cat([best_values, values], dim=1)
        positions = torch.cat([best_positions, positions], dim=1)
        best_values, order = torch.topk(values, k, dim=1, largest=False, sorted=True)
        best_positions = torch.gather(positions, 1, order)
    assert best_values is not None and best_positions is not None
    return best_values, best_positions


@contextmanager
def faiss_threads(threads: int | None = None) -> Iterator[None]:
    """Run faiss with ``threads`` OpenMP threads (default: torch's count), then restore it."""
    faiss = faiss_module()
    if faiss is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads or torch.get_num_threads()))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None``: leave it), then restore it."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
