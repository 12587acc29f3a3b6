"""Exact and approximate k-nearest-neighbour search over latent rows.

:func:`knn` returns, for every row of ``z``, its ``k`` nearest *other* rows (the sample itself is
never its own neighbour, even when it has exact duplicates). :func:`search` answers queries against
a separate base set. Both return Euclidean distances; with ``metric="cosine"`` rows are
L2-normalised first, so the distance is ``sqrt(2 - 2 cos)`` and the order is the cosine order.

Backends: faiss (``IndexFlatL2``) when it is importable, otherwise a pure-torch search that walks
the rows in blocks (``cdist``-style matrix product + ``topk``), so memory stays bounded and an
``N x N`` matrix is never built.

Approximate mode is an inverted-file (IVF) search batched by cell: k-means (faiss, seeded) splits
the rows into about ``2 sqrt(N)`` cells; the rows of each cell are searched exactly against the
members of the cells whose centroids are nearest to that cell's centroid (about 8 cells' worth of
rows), many cells of similar size in one padded batched matrix product. Scanning whole cells with
matrix products is an order of magnitude faster per distance than faiss's per-query IVF scan, so
more can be scanned for the same time. The number of rows scanned per cell doubles until the
recall measured on a random sample of rows against their exact neighbours reaches 0.97, so
unclustered data costs more time rather than silently losing recall.

>>> import numpy as np
>>> z = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 1.0]])
>>> nb = knn(z, 1)
>>> nb.indices[:, 0].tolist(), nb.distances[:, 0].tolist()
([1, 0, 3, 2], [1.0, 1.0, 1.0, 1.0])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Literal

import numpy as np
import torch

from lcc.errors import LCCInputError, as_latent_matrix, check_choice, check_k

Metric = Literal["l2", "cosine"]
KnnMode = Literal["exact", "approximate"]
Backend = Literal["auto", "faiss", "torch"]

METRICS: tuple[str, ...] = ("l2", "cosine")
MODES: tuple[str, ...] = ("exact", "approximate")
BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")

# Largest distance block (in float32 entries) the torch search materialises at once: 64 MiB.
_BLOCK_ENTRIES = 1 << 24
# Searches with fewer multiply-adds than this run single-threaded.
_SMALL_WORK = 1 << 28
# Approximate mode: cells probed per cell, k-means iterations and training points per cell.
_PROBES = 8
_CELLS_PER_ROOT = 2.0
_KMEANS_ITERATIONS = 4
_POINTS_PER_CELL = 16
# Approximate mode widens its search until the recall measured on this many rows reaches the
# target (the margin above 0.95 covers the sampling error).
_RECALL_SAMPLE = 300
_TARGET_RECALL = 0.97
# Factor by which the rows scanned per cell grow while the measured recall is below target.
_GROWTH = 2
# Below this many rows the approximate mode is not faster than the exact one; it searches exactly.
_APPROXIMATE_MIN_ROWS = 2_000
# Approximate mode: floats (queries, candidates and scores) one batch of cells handles at once.
_GROUP_ENTRIES = 1 << 21
# torch.topk keeps a heap (fast) when the row is at least this many times longer than k.
_HEAP_RATIO = 64


@dataclass(frozen=True)
class Neighbors:
    """The ``k`` nearest other samples of every sample, nearest first.

    ``indices`` is ``(N, k)`` int64, ``distances`` is ``(N, k)`` float32 Euclidean distances
    (for cosine: distances between L2-normalised rows), computed by the usual float32 expansion
    ``|a|^2 + |b|^2 - 2ab``: exact duplicates may sit about 1e-3 apart. ``recall`` is 1.0 for
    exact search; approximate search sets it to the recall it measured on a random sample of
    rows against exact search.

    >>> nb = Neighbors(np.array([[1], [0]]), np.array([[2.0], [2.0]]))
    >>> nb.n_samples, nb.k, nb.indices.dtype.name, nb.distances.dtype.name
    (2, 1, 'int64', 'float32')
    """

    indices: np.ndarray
    distances: np.ndarray
    recall: float = 1.0

    def __post_init__(self) -> None:
        indices = np.asarray(self.indices)
        distances = np.asarray(self.distances)
        if indices.ndim != 2 or indices.shape != distances.shape:
            raise LCCInputError(
                f"Neighbors needs indices and distances of the same (N, k) shape, got "
                f"{indices.shape} and {distances.shape}"
            )
        if not np.issubdtype(indices.dtype, np.integer):
            raise LCCInputError(f"Neighbors indices must be integers, got dtype {indices.dtype}")
        object.__setattr__(self, "indices", np.ascontiguousarray(indices, dtype=np.int64))
        object.__setattr__(self, "distances", np.ascontiguousarray(distances, dtype=np.float32))

    @property
    def n_samples(self) -> int:
        """Number of samples ``N``."""
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        """Number of neighbours per sample."""
        return int(self.indices.shape[1])


def knn(
    z: object,
    k: int,
    *,
    mode: KnnMode = "exact",
    metric: Metric = "l2",
    seed: int = 0,
    backend: Backend = "auto",
) -> Neighbors:
    """The ``k`` nearest other rows of every row of ``z`` (shape ``(N, ...)``, flattened).

    ``mode="approximate"`` trades a little recall for speed: it searches each k-means cell
    against its nearest cells, widening the search until the recall measured on a sample of 300
    rows reaches 0.97 (reported as ``Neighbors.recall``); ``seed`` drives its random choices.
    Below 2,000 rows it searches exactly. ``backend`` picks faiss or the torch fallback
    ("auto": faiss when importable).

    >>> nb = knn(np.array([[0.0], [1.0], [3.0], [7.0]]), 2, backend="torch")
    >>> nb.indices.tolist(), nb.distances.tolist()
    ([[1, 2], [0, 2], [1, 0], [2, 1]], [[1.0, 3.0], [1.0, 2.0], [2.0, 3.0], [4.0, 6.0]])
    """
    check_choice(metric, METRICS, name="metric")
    check_choice(mode, MODES, name="mode")
    use_faiss = _use_faiss(backend)
    matrix = as_latent_matrix(z)
    k = check_k(k, matrix.shape[0])
    matrix = _prepare(matrix, metric)
    if mode == "approximate" and matrix.shape[0] >= _APPROXIMATE_MIN_ROWS:
        indices, squared, recall = _ivf_self_search(matrix, k, seed=seed, use_faiss=use_faiss)
        return Neighbors(indices, _to_distance(squared), recall=recall)
    if use_faiss:
        indices, squared = _faiss_search(matrix, matrix, k + 1)
        indices, squared = _drop_self(indices, squared, np.arange(matrix.shape[0]))
    else:
        indices, squared = _torch_search(matrix, matrix, k + 1)
        indices, squared = _drop_self(indices, squared, np.arange(matrix.shape[0]))
    return Neighbors(indices, _to_distance(squared))


def search(
    base: object,
    queries: object,
    k: int,
    *,
    metric: Metric = "l2",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest rows of ``base`` for each row of ``queries``.

    Returns ``(indices, distances)``: ``(Q, k)`` int64 row numbers of ``base``, nearest first, and
    ``(Q, k)`` float32 Euclidean distances. Builds no index (a blocked matrix product + ``topk``),
    so it is cheap to call many times on small sets; small ones run single-threaded (with two
    threads on a busy machine, every small product waits for a descheduled thread).

    >>> idx, dist = search(np.array([[0.0], [2.0], [10.0]]), np.array([[1.5], [9.0]]), 2)
    >>> idx.tolist(), dist.tolist()
    ([[1, 0], [2, 1]], [[0.5, 1.5], [1.0, 7.0]])
    """
    check_choice(metric, METRICS, name="metric")
    base_matrix = _as_matrix(base, "base")
    query_matrix = _as_matrix(queries, "queries")
    if query_matrix.shape[1] != base_matrix.shape[1]:
        raise LCCInputError(
            f"queries have dimension {query_matrix.shape[1]} but base has "
            f"{base_matrix.shape[1]}; pass rows from the same latent space"
        )
    k = check_k(k)
    if k > base_matrix.shape[0]:
        raise LCCInputError(
            f"k={k} exceeds the {base_matrix.shape[0]} base rows; choose k <= "
            f"{base_matrix.shape[0]}"
        )
    if metric == "cosine":
        base_matrix, query_matrix = _normalise(base_matrix), _normalise(query_matrix)
    if query_matrix.shape[0] == 0:
        return np.empty((0, k), np.int64), np.empty((0, k), np.float32)
    centre = base_matrix.mean(axis=0, dtype=np.float64).astype(np.float32)
    small = base_matrix.size * query_matrix.shape[0] < _SMALL_WORK
    with _torch_threads(1 if small else None):
        indices, squared = _torch_search(base_matrix - centre, query_matrix - centre, int(k))
    return indices, _to_distance(squared)


def knn_recall(found: Neighbors, exact: Neighbors) -> float:
    """Mean over rows of the fraction of ``exact``'s neighbours that ``found`` also lists.

    >>> a = Neighbors(np.array([[1, 2], [0, 2]]), np.zeros((2, 2)))
    >>> b = Neighbors(np.array([[2, 3], [2, 0]]), np.zeros((2, 2)))
    >>> knn_recall(a, b)
    0.75
    """
    if found.n_samples != exact.n_samples:
        raise LCCInputError(
            f"found has {found.n_samples} rows but exact has {exact.n_samples}; compare the "
            "neighbours of the same samples"
        )
    if found.n_samples == 0 or exact.k == 0:
        return 1.0
    n = found.n_samples
    width = max(int(found.indices.max(initial=0)), int(exact.indices.max(initial=0))) + 1
    rows_found = np.arange(n, dtype=np.int64)[:, None] * width
    keys_found = np.unique((found.indices + rows_found).ravel())
    keys_exact = (exact.indices + np.arange(n, dtype=np.int64)[:, None] * width).ravel()
    hits = np.isin(keys_exact, keys_found, kind="sort").reshape(n, exact.k)
    return float(hits.mean())


# ----------------------------------------------------------------------------------- helpers


def _use_faiss(backend: str) -> bool:
    check_choice(backend, BACKENDS, name="backend")
    available = _faiss_module() is not None
    if backend == "faiss" and not available:
        raise LCCInputError(
            "backend='faiss' but faiss is not importable; install faiss-cpu or use backend='torch'"
        )
    return available and backend != "torch"


def _faiss_module() -> ModuleType | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _as_matrix(x: object, name: str) -> np.ndarray:
    """Float32 (M, D) matrix, allowing M in {0, 1} (unlike ``as_latent_matrix``)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(x)
    if array.ndim < 2:
        raise LCCInputError(
            f"{name} must have shape (M, d, ...) with one row per sample, got shape {array.shape}"
        )
    if array.shape[0] >= 2:
        return as_latent_matrix(array, name=name)
    width = int(np.prod(array.shape[1:]))
    matrix = np.ascontiguousarray(array.reshape(array.shape[0], width), dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise LCCInputError(f"{name} contains NaN or inf; pass finite values")
    return matrix


def _normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if matrix.shape[0] and not (norms > 0).all():
        bad = np.flatnonzero(norms[:, 0] == 0)
        raise LCCInputError(
            f"metric='cosine' is undefined for all-zero rows ({bad.size} found, first: "
            f"{bad[:5].tolist()}); drop them or use metric='l2'"
        )
    return matrix / norms


def _prepare(matrix: np.ndarray, metric: str) -> np.ndarray:
    """Normalise (cosine) and centre the rows: distances are unchanged, rounding error shrinks."""
    if metric == "cosine":
        matrix = _normalise(matrix)
    centre = matrix.mean(axis=0, dtype=np.float64).astype(np.float32)
    return np.ascontiguousarray(matrix - centre)


def _to_distance(squared: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)


def _drop_self(
    indices: np.ndarray, squared: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from its k+1 results, or the last result if it is absent.

    The own index may be missing (several exact duplicates) or not first (ties); both are fine.
    """
    own = indices == rows[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    shape = (indices.shape[0], indices.shape[1] - 1)
    return indices[keep].reshape(shape), squared[keep].reshape(shape)


def _faiss_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    faiss = _faiss_module()
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    squared, indices = index.search(queries, k)
    return indices.astype(np.int64), squared


def _torch_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest ``base`` rows of each query, in row blocks of bounded size."""
    base_t = torch.from_numpy(np.ascontiguousarray(base))
    query_t = torch.from_numpy(np.ascontiguousarray(queries))
    indices = np.empty((query_t.shape[0], k), np.int64)
    squared = np.empty((query_t.shape[0], k), np.float32)
    _torch_search_into(base_t, query_t, k, indices, squared)
    return indices, squared


def _torch_search_into(
    base: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    indices_out: np.ndarray,
    squared_out: np.ndarray,
) -> None:
    base_norms = _squared_norms(base)
    block = max(1, _BLOCK_ENTRIES // max(1, base.shape[0]))
    with torch.no_grad():
        for start in range(0, queries.shape[0], block):
            q = queries[start : start + block]
            squared = torch.addmm(base_norms[None, :], q, base.T, alpha=-2.0)
            squared += _squared_norms(q)[:, None]
            values, positions = torch.topk(squared, k, dim=1, largest=False, sorted=True)
            indices_out[start : start + q.shape[0]] = positions.numpy()
            squared_out[start : start + q.shape[0]] = values.numpy()


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of every row (a batched dot product: no ``rows * rows`` temporary)."""
    return torch.einsum("ij,ij->i", rows, rows)


def _kmeans(
    matrix: np.ndarray, n_cells: int, *, rng: np.random.Generator, seed: int, use_faiss: bool
) -> np.ndarray:
    """Seeded k-means centroids ``(n_cells, D)`` trained on a subsample of the rows."""
    n_train = min(matrix.shape[0], _POINTS_PER_CELL * n_cells)
    sample = matrix[np.sort(rng.choice(matrix.shape[0], n_train, replace=False))]
    if use_faiss:
        faiss = _faiss_module()
        kmeans = faiss.Kmeans(
            matrix.shape[1],
            n_cells,
            niter=_KMEANS_ITERATIONS,
            seed=seed,
            max_points_per_centroid=_POINTS_PER_CELL,
            min_points_per_centroid=1,
        )
        kmeans.train(np.ascontiguousarray(sample))
        return np.asarray(kmeans.centroids, dtype=np.float32)
    return _torch_kmeans(sample, n_cells, rng)


def _torch_kmeans(sample: np.ndarray, n_cells: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd iterations from a random sample of rows (the fallback when faiss is missing)."""
    points = torch.from_numpy(np.ascontiguousarray(sample))
    centroids = points[torch.from_numpy(rng.choice(points.shape[0], n_cells, replace=False))]
    for _ in range(_KMEANS_ITERATIONS):
        assign = _nearest_centroid(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=n_cells)
        filled = counts > 0
        centroids = centroids.clone()
        centroids[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
    return centroids.numpy()


def _nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    norms = _squared_norms(centroids)
    block = max(1, _BLOCK_ENTRIES // max(1, centroids.shape[0]))
    parts = [
        torch.addmm(norms[None, :], points[s : s + block], centroids.T, alpha=-2.0).argmin(dim=1)
        for s in range(0, points.shape[0], block)
    ]
    return torch.cat(parts)


def _ivf_self_search(
    matrix: np.ndarray, k: int, *, seed: int, use_faiss: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    """Approximate self k-NN: exact search of each k-means cell against its nearest cells.

    Returns indices, squared distances and the recall estimated on a random sample of rows.
    """
    n = matrix.shape[0]
    n_cells = max(1, min(n // (2 * (k + 1)), round(_CELLS_PER_ROOT * math.sqrt(n))))
    rng = np.random.default_rng(seed)
    centroids = _kmeans(matrix, n_cells, rng=rng, seed=seed, use_faiss=use_faiss)
    points = torch.from_numpy(matrix)
    with torch.no_grad():
        assign = _nearest_centroid(points, torch.from_numpy(centroids)).numpy()
    cells = _Cells.build(assign, centroids)
    need, recall = _choose_budget(matrix, k, cells, assign, rng, start=_PROBES * n / n_cells)
    scan = _Scan(cells, cells.n_used(need), torch.from_numpy(matrix), k, _HEAP_RATIO * k <= need)
    groups, large = cells.plan(scan.n_used, matrix.shape[1])
    work = [partial(scan.batch, group) for group in groups]
    work += [partial(scan.large, int(cell)) for cell in large]
    if scan.heap:  # all torch: its threads split each product and selection
        for item in work:
            item()
    else:  # the NumPy selection holds the GIL: overlap it with another item's product
        _run_parallel(lambda item: work[item](), list(range(len(work))))
    return scan.indices, scan.squared, recall


class _Scan:
    """Searches cells against their chosen candidates, writing into ``indices`` and ``squared``."""

    def __init__(
        self, cells: _Cells, n_used: np.ndarray, points: torch.Tensor, k: int, heap: bool
    ) -> None:
        self.cells, self.n_used, self.points, self.k, self.heap = cells, n_used, points, k, heap
        self.norms = _squared_norms(points)
        self.indices = np.empty((points.shape[0], k), np.int64)
        self.squared = np.empty((points.shape[0], k), np.float32)

    def batch(self, group: np.ndarray) -> None:
        """All cells of ``group`` at once, padded to a common size."""
        members, valid, candidates = self.cells.padded(group, self.n_used)
        found, found_sq = self._nearest(members, self._gather(candidates), 0)
        found = np.take_along_axis(candidates[:, None, :], found, axis=2)
        self.indices[members[valid]], self.squared[members[valid]] = found[valid], found_sq[valid]

    def large(self, cell: int) -> None:
        """One cell, its candidates gathered once, its members in blocks of bounded size."""
        members, _, candidates = self.cells.padded(np.array([cell]), self.n_used)
        base = self._gather(candidates)
        rows = max(1, _GROUP_ENTRIES // candidates.shape[1])
        for first in range(0, members.shape[1], rows):
            block = members[:, first : first + rows]
            found, found_sq = self._nearest(block, base, first)
            self.indices[block[0]], self.squared[block[0]] = candidates[0, found[0]], found_sq[0]

    def _gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``(G, m, D)`` and squared norms ``(G, m)`` of row ids ``(G, m)`` (-1: inf norm)."""
        flat = torch.from_numpy(np.maximum(rows, 0).ravel())
        picked = self.points.index_select(0, flat).view(*rows.shape, -1)
        norms = self.norms.index_select(0, flat).view(rows.shape)
        return picked, norms.masked_fill(torch.from_numpy(rows < 0), math.inf)

    def _nearest(
        self, queries: np.ndarray, base: tuple[torch.Tensor, torch.Tensor], first: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions in ``base`` and squared distances of the k nearest of each query row id.

        Batched over the leading axis. Query ``j`` is base row ``first + j`` and is skipped
        (its duplicates are not).
        """
        (q, q_norms), (b, b_norms) = self._gather(queries), base
        with torch.no_grad():
            scores = torch.baddbmm(b_norms[:, None, :], q, b.transpose(1, 2), alpha=-2.0)
            scores.diagonal(offset=first, dim1=1, dim2=2).fill_(math.inf)
        positions, values = _smallest(scores.numpy(), self.k, heap=self.heap)
        return positions, values + q_norms.numpy()[:, :, None]


def _smallest(scores: np.ndarray, k: int, *, heap: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positions and values of the ``k`` smallest scores along the last axis, smallest first.

    ``heap``: ``torch.topk``, fast while ``k`` is small next to the row length (see
    ``_HEAP_RATIO``); otherwise a NumPy partition, then sorting the ``k`` winners, is faster.
    """
    if heap:
        values, positions = torch.topk(torch.from_numpy(scores), k, dim=-1, largest=False)
        return positions.numpy(), values.numpy()
    positions = np.argpartition(scores, k - 1, axis=-1)[..., :k]
    values = np.take_along_axis(scores, positions, axis=-1)
    order = np.argsort(values, axis=-1, kind="stable")
    return np.take_along_axis(positions, order, axis=-1), np.take_along_axis(values, order, axis=-1)


def _choose_budget(
    matrix: np.ndarray,
    k: int,
    cells: _Cells,
    assign: np.ndarray,
    rng: np.random.Generator,
    *,
    start: float,
) -> tuple[int, float]:
    """Smallest candidate count per cell (``start``, grown as needed) reaching the recall target.

    The recall is measured on a random sample of rows against their exact neighbours: an exact
    neighbour is found exactly when its cell is among the cells searched for the row's cell.
    """
    n = matrix.shape[0]
    sample = np.sort(rng.choice(n, min(n, _RECALL_SAMPLE), replace=False))
    exact, squared = _torch_search(matrix, matrix[sample], k + 1)
    neighbour_cells = assign[_drop_self(exact, squared, sample)[0]]
    sample_cells = assign[sample]
    # rank[a, b]: position of cell b in the ranking of cell a
    rank = np.empty_like(cells.ranked)
    np.put_along_axis(rank, cells.ranked, np.arange(cells.ranked.shape[1])[None, :], axis=1)
    neighbour_rank = rank[sample_cells[:, None], neighbour_cells]
    need = max(int(start), k + 1)
    while True:
        recall = float((neighbour_rank < cells.n_used(need)[sample_cells, None]).mean())
        if recall >= _TARGET_RECALL or need >= n:
            return need, recall
        need = min(n, int(_GROWTH * need))


@dataclass(frozen=True)
class _Cells:
    """Inverted file: rows grouped by cell; for each cell, all cells by centroid distance."""

    order: np.ndarray  # row ids sorted by cell
    starts: np.ndarray  # (n_cells + 1,) offsets of each cell in ``order``
    ranked: np.ndarray  # (n_cells, n_cells) cells by increasing centroid distance, own cell first
    reach: np.ndarray  # (n_cells, n_cells) rows in the first j + 1 cells of each ranking

    @classmethod
    def build(cls, assign: np.ndarray, centroids: np.ndarray) -> _Cells:
        n_cells = centroids.shape[0]
        order = np.argsort(assign, kind="stable")
        sizes = np.bincount(assign, minlength=n_cells)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        ranked = _torch_search(centroids, centroids, n_cells)[0]
        own = np.arange(n_cells)
        # Put each cell first in its own ranking, even when another centroid coincides with it.
        others = ranked[ranked != own[:, None]].reshape(n_cells, n_cells - 1)
        ranked = np.concatenate([own[:, None], others], axis=1)
        return cls(order, starts, ranked, np.cumsum(sizes[ranked], axis=1))

    @property
    def sizes(self) -> np.ndarray:
        """Rows per cell."""
        return np.diff(self.starts)

    def n_used(self, need: int) -> np.ndarray:
        """Per cell: how many of its nearest cells (itself first) hold at least ``need`` rows."""
        return np.minimum((self.reach < need).sum(axis=1) + 1, self.ranked.shape[1])

    def plan(self, n_used: np.ndarray, dim: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Batches of non-empty cells of similar size, and the cells too large to batch.

        A batch holds its queries, candidates and scores in about ``_GROUP_ENTRIES`` floats.
        """
        sizes = self.sizes
        widths = self.reach[np.arange(sizes.size), n_used - 1]
        cells = np.flatnonzero(sizes > 0)
        cells = cells[np.lexsort((-widths[cells], -sizes[cells]))]
        cost = sizes[cells] * (dim + widths[cells]) + widths[cells] * dim
        large, cells = cells[cost > _GROUP_ENTRIES], cells[cost <= _GROUP_ENTRIES]
        groups = []
        first = 0
        while first < cells.size:
            rows, width = int(sizes[cells[first]]), int(widths[cells[first]])
            last = first + 1
            while last < cells.size:
                width = max(width, int(widths[cells[last]]))
                if (last + 1 - first) * (rows * (dim + width) + width * dim) > _GROUP_ENTRIES:
                    break
                last += 1
            groups.append(cells[first:last])
            first = last
        return groups, large

    def padded(
        self, group: np.ndarray, n_used: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Members ``(G, m)``, their validity mask and candidates ``(G, c)`` of cells ``group``.

        Padding is ``-1``. Each cell's candidates are the rows of its ``n_used`` nearest cells,
        its own rows first, in the order of its members.
        """
        sizes = self.sizes[group]
        columns = np.arange(sizes.max())
        valid = columns[None, :] < sizes[:, None]
        members = np.where(
            valid,
            self.order[np.minimum(self.starts[group, None] + columns, self.order.size - 1)],
            -1,
        )
        used = n_used[group]
        slots = np.arange(used.max())[None, :] < used[:, None]
        used_cells = self.ranked[group, : used.max()][slots]
        lengths = self.sizes[used_cells]
        total = self.reach[group, used - 1]
        offsets = np.cumsum(lengths) - lengths
        flat = np.arange(lengths.sum()) - np.repeat(offsets - self.starts[used_cells], lengths)
        candidates = np.full((group.size, int(total.max())), -1, np.int64)
        candidates[np.arange(candidates.shape[1])[None, :] < total[:, None]] = self.order[flat]
        return members, valid, candidates


def _run_parallel(work: Callable[[int], None], items: list[int]) -> None:
    """Run ``work`` on every item with one single-threaded worker per torch thread.

    Many small matrix products parallelise better this way than with threads inside each
    product, and a core taken by another process then delays one worker, not every product.
    """
    workers = torch.get_num_threads()
    if workers <= 1 or len(items) <= 1:
        for item in items:
            work(item)
        return
    with _torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, items):
            pass


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
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
