"""The k-means-cells approximate k-NN: exact products of each cell against its nearest cells.

Faster than a faiss IVF index on latents of up to 100,000 rows (measured on 2 cores,
``gaussian_mixture(N, 512, 100, 3, separation=2, intrinsic_dim=48)``, ``index="cells"`` vs
``"ivf-flat"``: N = 50,000: 1.2 s vs 3.6 s at k = 5, 1.2 s vs 9.4 s at k = 50; N = 100,000:
2.6 s vs 11.2 s and 2.5 s vs 19.5 s), where one padded batched product per group of similar
cells beats the index's per-list scans; its cost grows about quadratically, and at 250,000
PCA-64 rows it took 86 s against faiss IVF's 5 s (issue 10). :func:`lcc.engine.knn.knn` uses
it up to :data:`MAX_ROWS` rows unless its recall budget grows past :data:`MAX_GROWTH` (many
small, mixed clusters), faiss otherwise. The search widens the rows scanned per cell
until the recall measured on a sample of 300 rows reaches 0.97, as the faiss path does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from lcc.engine.exact_search import (
    BLOCK_ENTRIES,
    RECALL_SAMPLE,
    TARGET_RECALL,
    drop_self,
    faiss_kmeans,
    squared_norms,
    torch_search,
    torch_threads,
)

__all__ = ["MAX_ROWS", "cells_self_search"]

#: largest number of rows :func:`lcc.engine.knn.knn` searches with cells (faiss above)
MAX_ROWS = 100_000
#: ``index="auto"`` leaves cells for faiss when the recall target needs more than this many
#: times the first budget: 1x on the 100-class latents above, 56x on 1,000 classes x 3
#: sub-clusters at 50,000 rows (PCA 64), where cells took 6.5 s and faiss IVF 1.2 s
MAX_GROWTH = 4
# Cells probed per cell, k-means iterations and training points per cell.
_PROBES = 8
_CELLS_PER_ROOT = 2.0
_KMEANS_ITERATIONS = 4
_POINTS_PER_CELL = 16
# Factor by which the rows scanned per cell grow while the measured recall is below target.
_GROWTH = 2
# Floats (queries, candidates and scores) one batch of cells handles at once.
_GROUP_ENTRIES = 1 << 21
# torch.topk keeps a heap (fast) when the row is at least this many times longer than k.
_HEAP_RATIO = 64


def _kmeans(
    matrix: np.ndarray, n_cells: int, *, rng: np.random.Generator, seed: int, use_faiss: bool
) -> np.ndarray:
    """Seeded k-means centroids ``(n_cells, D)`` trained on a subsample of the rows."""
    n_train = min(matrix.shape[0], _POINTS_PER_CELL * n_cells)
    sample = matrix[np.sort(rng.choice(matrix.shape[0], n_train, replace=False))]
    if use_faiss:
        centroids = faiss_kmeans(
            sample, n_cells, seed=seed, iterations=_KMEANS_ITERATIONS, points=_POINTS_PER_CELL
        )
        return np.asarray(centroids, dtype=np.float32)
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
    norms = squared_norms(centroids)
    block = max(1, BLOCK_ENTRIES // max(1, centroids.shape[0]))
    parts = [
        torch.addmm(norms[None, :], points[s : s + block], centroids.T, alpha=-2.0).argmin(dim=1)
        for s in range(0, points.shape[0], block)
    ]
    return torch.cat(parts)


def cells_self_search(
    matrix: np.ndarray, k: int, *, seed: int, use_faiss: bool, max_growth: float | None = None
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Approximate self k-NN: exact search of each k-means cell against its nearest cells.

    Returns indices, squared distances and the recall estimated on a random sample of rows;
    None (before the expensive scan) when reaching the recall target needs more than
    ``max_growth`` times the first budget -- many small, mixed clusters, where a faiss index is
    the faster choice.
    """
    n = matrix.shape[0]
    n_cells = max(1, min(n // (2 * (k + 1)), round(_CELLS_PER_ROOT * math.sqrt(n))))
    rng = np.random.default_rng(seed)
    centroids = _kmeans(matrix, n_cells, rng=rng, seed=seed, use_faiss=use_faiss)
    points = torch.from_numpy(matrix)
    with torch.no_grad():
        assign = _nearest_centroid(points, torch.from_numpy(centroids)).numpy()
    cells = _Cells.build(assign, centroids)
    start = _PROBES * n / n_cells
    need, recall = _choose_budget(matrix, k, cells, assign, rng, start=start)
    if max_growth is not None and need > max_growth * max(start, k + 1):
        return None
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
        self.norms = squared_norms(points)
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
    sample = np.sort(rng.choice(n, min(n, RECALL_SAMPLE), replace=False))
    exact, squared = torch_search(matrix, matrix[sample], k + 1)
    neighbour_cells = assign[drop_self(exact, squared, sample)[0]]
    sample_cells = assign[sample]
    # rank[a, b]: position of cell b in the ranking of cell a
    rank = np.empty_like(cells.ranked)
    np.put_along_axis(rank, cells.ranked, np.arange(cells.ranked.shape[1])[None, :], axis=1)
    neighbour_rank = rank[sample_cells[:, None], neighbour_cells]
    need = max(int(start), k + 1)
    while True:
        recall = float((neighbour_rank < cells.n_used(need)[sample_cells, None]).mean())
        if recall >= TARGET_RECALL or need >= n:
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
        ranked = torch_search(centroids, centroids, n_cells)[0]
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
    with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, items):
            pass
