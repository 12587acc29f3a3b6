"""Exact and approximate k-nearest-neighbour search over latent rows.

:func:`knn` returns, for every row of ``z``, its ``k`` nearest *other* rows (the sample itself is
never its own neighbour, even when it has exact duplicates). :func:`search` answers queries against
a separate base set. Both return Euclidean distances; with ``metric="cosine"`` rows are
L2-normalised first, so the distance is ``sqrt(2 - 2 cos)`` and the order is the cosine order.

Exact mode: faiss brute force (``faiss.knn``, blocked matrix products, no copy of the data) when
faiss is importable, otherwise a pure-torch search that walks the rows in blocks (matrix product +
``topk``), so memory stays bounded and an ``N x N`` matrix is never built.

Approximate mode (faiss; below 2,000 rows, or without faiss, it searches exactly): an index chosen
by size (see :func:`choose_index`) -- ``"ivf-flat"`` (k-means inverted lists, about
``8 sqrt(N)`` of them, rows stored as they are), ``"ivf-pq"`` for data whose copy would exceed
1 GiB (rows stored as product-quantised codes, candidates re-ranked with exact distances), or
``"hnsw"`` on request (a graph index, built single-threaded so that it is deterministic). The
search width (``nprobe`` lists, or ``efSearch``) starts small and doubles until the recall measured
on a seeded sample of 300 rows against their exact neighbours reaches 0.97; if even the widest
search misses it, or IVF needs more than a sixteenth of its lists (then brute force costs no
more), the rows are searched exactly. Unclustered data therefore costs more time
rather than silently losing recall; the recall reached is reported in ``Neighbors.recall``.
k-means is trained on a seeded sample with a seeded faiss k-means, and faiss runs with torch's
thread count, so a seed gives the same neighbours every time.

>>> z = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 1.0]])
>>> nb = knn(z, 1)
>>> nb.indices[:, 0].tolist(), nb.distances[:, 0].tolist()
([1, 0, 3, 2], [1.0, 1.0, 1.0, 1.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from lcc.engine import cells
from lcc.engine.choices import KNN_MODES, METRICS, KnnMode, Metric
from lcc.engine.device import (
    Placed,
    block_entries,
    full_precision,
    place_rows,
    resolve_device,
    rows_of,
    shrinking_blocks,
)
from lcc.engine.exact_search import (
    BLOCK_ENTRIES,
    RECALL_SAMPLE,
    SMALL_WORK,
    TARGET_RECALL,
    drop_self,
    faiss_gpu_module,
    faiss_kmeans,
    faiss_module,
    faiss_search,
    faiss_threads,
    to_distance,
    torch_search,
    torch_search_tensors,
    torch_threads,
)
from lcc.errors import LCCInputError, as_latent_matrix, check_choice, check_finite, check_k

__all__ = [
    "BACKENDS",
    "INDEXES",
    "METRICS",
    "MODES",
    "Neighbors",
    "choose_index",
    "knn",
    "knn_recall",
    "search",
    "search_tensors",
]

Backend = Literal["auto", "faiss", "torch"]
IndexKind = Literal["auto", "cells", "ivf-flat", "ivf-pq", "hnsw"]

MODES: tuple[str, ...] = KNN_MODES
BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")
INDEXES: tuple[str, ...] = ("auto", "cells", "ivf-flat", "ivf-pq", "hnsw")

# Approximate mode widens its search until the recall measured on this many rows reaches the
# target (module globals: the tests lower and raise the target).
_RECALL_SAMPLE = RECALL_SAMPLE
_TARGET_RECALL = TARGET_RECALL
# Below this many rows the approximate mode is not faster than the exact one; it searches exactly.
_APPROXIMATE_MIN_ROWS = 2_000
# IVF: lists per square root of N, training rows per list and k-means iterations; first nprobe.
# Measured on 250,000 planted latents (3,000 sub-clusters, PCA 64): 4,000 lists reach recall
# 0.99 with 2-4 probes, 2,000 lists need 16-32 (many small lists beat few large ones: a list
# scan costs about 25 times more per distance than a matrix product).
_LISTS_PER_ROOT = 8.0
_TRAIN_PER_LIST = 16
_KMEANS_ITERATIONS = 4
# First nprobe 4, not less: IVF misses are biased (a row near the edge of its list gets list-mates
# from another cluster instead of its true neighbours in the next list), and on 100,000 planted
# latents in 3,000 small sub-clusters 2 probes (recall 0.991) let Leiden merge 200 sub-clusters
# (ARI 0.84 to the planted ones) where 4 probes (recall 0.998) keep them (ARI 0.96).
_FIRST_PROBES = 4
# An IVF search that needs more than this share of the lists to reach the recall target costs
# about as much as brute force (faiss scans lists about 25 times slower per distance than its
# blocked matrix products): the rows are then searched exactly.
_IVF_EXACT_SHARE = 1 / 16
# "auto" stores rows as they are (IVF-Flat) while the copy stays under this many bytes, else as
# product-quantised codes (IVF-PQ) of about this many dimensions per byte, re-ranking this many
# candidates per neighbour (the factor doubles with nprobe while the recall is short).
_FLAT_INDEX_BYTES = 1 << 30
_PQ_DIMS_PER_CODE = 8
_PQ_CANDIDATES = 4
# HNSW: links per node, construction beam, first and widest search beam.
_HNSW_LINKS = 32
_HNSW_CONSTRUCTION = 40
_HNSW_FIRST_EF = 32
_HNSW_MAX_EF = 4_096


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
    index: IndexKind = "auto",
    device: str | None = None,
    checked: bool = False,
) -> Neighbors:
    """The ``k`` nearest other rows of every row of ``z`` (shape ``(N, ...)``, flattened).

    ``mode="approximate"`` trades a little recall for speed: up to 100,000 rows it searches
    k-means cells against their nearest cells (:mod:`lcc.engine.cells`, faster there), above
    that a faiss index (``index``: ``"auto"`` picks with :func:`choose_index`; or ``"cells"``,
    ``"ivf-flat"``, ``"ivf-pq"``, ``"hnsw"``), widening the search until the recall measured on
    a sample of 300 rows reaches 0.97 (reported as ``Neighbors.recall``), exact if no width
    reaches it; ``seed`` drives its random choices. Below 2,000 rows, or on the torch backend,
    it searches exactly. ``backend`` picks faiss or the torch search ("auto": faiss when
    importable). ``device`` (:func:`lcc.engine.device.resolve_device`: ``"auto"``, ``"cpu"``,
    ``"cuda"``) runs the exact torch search on a GPU, chunked to its free memory (there the
    approximate mode searches exactly too: a GPU's exact search is faster than an index).
    ``checked=True``: the caller has already checked ``z`` for NaN/inf (a refresh does, once).

    >>> nb = knn(np.array([[0.0], [1.0], [3.0], [7.0]]), 2, backend="torch")
    >>> nb.indices.tolist(), nb.distances.tolist()
    ([[1, 2], [0, 2], [1, 0], [2, 1]], [[1.0, 3.0], [1.0, 2.0], [2.0, 3.0], [4.0, 6.0]])
    """
    check_choice(metric, METRICS, name="metric")
    check_choice(mode, MODES, name="mode")
    check_choice(index, INDEXES, name="index")
    use_faiss = _use_faiss(backend)
    target = resolve_device(device, z, backend="auto" if use_faiss else "torch")
    if target is not None:
        return _torch_knn(z, k, metric, target, checked=checked, allow_faiss=use_faiss)
    matrix = as_latent_matrix(z, checked=checked)
    k = check_k(k, matrix.shape[0])
    matrix = _prepare(matrix, metric)
    approximate = mode == "approximate" and matrix.shape[0] >= _APPROXIMATE_MIN_ROWS
    if approximate and (
        index == "cells" or (index == "auto" and matrix.shape[0] <= cells.MAX_ROWS)
    ):
        growth = None if index == "cells" else cells.MAX_GROWTH
        found = cells.cells_self_search(matrix, k, seed=seed, use_faiss=True, max_growth=growth)
        if found is not None:  # else: many small clusters, faiss is the faster choice
            return Neighbors(found[0], to_distance(found[1]), recall=found[2])
    with faiss_threads():
        if approximate:
            kind = choose_index(*matrix.shape) if index == "auto" else index
            indices, squared, recall = _approximate_self_search(matrix, k, kind, seed)
            return Neighbors(indices, to_distance(squared), recall=recall)
        indices, squared = faiss_search(matrix, matrix, k + 1)
    return _without_self(indices, squared)


def _torch_knn(
    z: object, k: int, metric: str, device: torch.device, *, checked: bool, allow_faiss: bool
) -> Neighbors:
    """Exact self k-NN by the torch search on ``device`` (rows streamed when they do not fit),
    or by faiss's GPU brute force when ``allow_faiss`` and a faiss GPU build is installed."""
    if not isinstance(z, (np.ndarray, torch.Tensor)):
        z = as_latent_matrix(z, checked=checked)
        checked = True
    check_rows(z)
    k = check_k(k, rows_of(z))
    if not checked:
        check_finite(z)
    placed = place_rows(z, device)
    prepare_rows(placed, metric)
    gpu_faiss = faiss_gpu_module() if allow_faiss and device.type == "cuda" else None
    if gpu_faiss is not None:
        rows = placed.rows.cpu().numpy()
        squared_np, indices_np = gpu_faiss.knn_gpu(
            gpu_faiss.StandardGpuResources(), rows, rows, k + 1, device=device.index or 0
        )
        return _without_self(indices_np.astype(np.int64), squared_np)

    def run(entries: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_search_tensors(
            placed.rows,
            placed.rows,
            k + 1,
            device=device,
            block_entries=entries,
            base_rows=placed.base_rows(),
        )

    with full_precision():
        indices, squared = shrinking_blocks(run, block_entries(device), device)
    return _without_self(indices.cpu().numpy(), squared.cpu().numpy())


def prepare_rows(placed: Placed, metric: str) -> None:
    """In place: L2-normalise the rows (cosine), then centre them on their float64 mean, chunk by
    chunk (:func:`_prepare` for rows placed by :func:`lcc.engine.device.place_rows`)."""
    rows = placed.rows
    step = max(1, placed.chunk_rows)
    with torch.no_grad():
        if metric == "cosine":
            for start in range(0, rows.shape[0], step):
                part = rows[start : start + step]
                norms = torch.linalg.vector_norm(part, dim=1, keepdim=True)
                zero = torch.nonzero(norms[:, 0] == 0)[:, 0]
                if zero.numel():
                    bad = (zero + start).cpu().numpy()
                    raise LCCInputError(
                        f"metric='cosine' is undefined for all-zero rows (first: "
                        f"{bad[:5].tolist()}); drop them or use metric='l2'"
                    )
                part /= norms
        total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
        for start in range(0, rows.shape[0], step):
            total += rows[start : start + step].sum(dim=0, dtype=torch.float64)
        centre = (total / rows.shape[0]).to(torch.float32)
        for start in range(0, rows.shape[0], step):
            rows[start : start + step] -= centre


def check_rows(z: np.ndarray | torch.Tensor) -> None:
    """Shape checks of :func:`lcc.errors.as_latent_matrix`, without converting ``z``."""
    if z.ndim < 2:
        raise LCCInputError(
            f"z must have shape (N, d, ...) with one row per sample, got shape {tuple(z.shape)}"
        )
    if z.shape[0] < 2:
        raise LCCInputError(f"z has {z.shape[0]} sample(s); at least 2 are needed")
    if int(np.prod(z.shape[1:])) == 0:
        raise LCCInputError("z has latent dimension 0; pass non-empty latents")
    floating = z.is_floating_point() if isinstance(z, torch.Tensor) else z.dtype.kind in "fiu"
    if not floating:
        raise LCCInputError(f"z must be a numeric array, got dtype {z.dtype}")


def choose_index(n_samples: int, dim: int) -> str:
    """The approximate index ``knn(..., index="auto")`` uses for ``n_samples`` rows of ``dim``.

    ``"ivf-flat"`` while a float32 copy of the rows fits in 1 GiB (1.28M rows up to 209
    dimensions), else ``"ivf-pq"``, which stores about one byte per 8 dimensions. HNSW is never
    chosen automatically: on the measured data IVF-Flat reaches the same recall sooner and
    deterministically with all threads.

    >>> choose_index(1_280_000, 64), choose_index(1_280_000, 512)
    ('ivf-flat', 'ivf-pq')
    """
    return "ivf-flat" if n_samples * dim * 4 <= _FLAT_INDEX_BYTES else "ivf-pq"


def search(
    base: object,
    queries: object,
    k: int,
    *,
    metric: Metric = "l2",
    backend: Backend = "auto",
    device: str | None = None,
    checked: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest rows of ``base`` for each row of ``queries``.

    Returns ``(indices, distances)``: ``(Q, k)`` int64 row numbers of ``base``, nearest first, and
    ``(Q, k)`` float32 Euclidean distances. Builds no index (faiss brute force, or on the torch
    backend a blocked matrix product + ``topk``), so it is cheap to call many times on small
    sets; small ones run single-threaded (with two threads on a busy machine, every small
    product waits for a descheduled thread). Rows are centred on the base mean first, which
    leaves distances unchanged and shrinks the rounding error of the distance expansion.
    ``device="cuda"`` searches on the GPU (:func:`search_tensors`); ``checked=True``: the
    caller has already checked both for NaN/inf.

    >>> idx, dist = search(np.array([[0.0], [2.0], [10.0]]), np.array([[1.5], [9.0]]), 2)
    >>> idx.tolist(), dist.tolist()
    ([[1, 0], [2, 1]], [[0.5, 1.5], [1.0, 7.0]])
    """
    check_choice(metric, METRICS, name="metric")
    use_faiss = _use_faiss(backend)
    target = resolve_device(device, queries)
    base_matrix = _as_matrix(base, "base", checked)
    query_matrix = _as_matrix(queries, "queries", checked)
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
    if target is not None:
        found, squared_t = search_tensors(
            torch.from_numpy(base_matrix), torch.from_numpy(query_matrix), int(k), target
        )
        return found.cpu().numpy(), to_distance(squared_t.cpu().numpy())
    centre = base_matrix.mean(axis=0, dtype=np.float64).astype(np.float32)
    small = base_matrix.size * query_matrix.shape[0] < SMALL_WORK
    threads, run = (faiss_threads, faiss_search) if use_faiss else (torch_threads, torch_search)
    with threads(1 if small else None):
        indices, squared = run(base_matrix - centre, query_matrix - centre, int(k))
    return indices, to_distance(squared)


def search_tensors(
    base: torch.Tensor, queries: torch.Tensor, k: int, device: torch.device, *, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`search` on float32 tensors, on ``device``: int64 indices and squared distances.

    Rows are L2-normalised (cosine) and centred on the base mean, in full float32 precision;
    the inputs are not modified. No checks: the caller validates.

    >>> i, sq = search_tensors(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.8]]), 1, "cpu")
    >>> i.tolist()
    [[1]]
    """
    device = torch.device(device)
    with torch.no_grad(), full_precision():
        base = base.to(device, torch.float32)
        queries = queries.to(device, torch.float32)
        if metric == "cosine":
            base = base / torch.linalg.vector_norm(base, dim=1, keepdim=True)
            queries = queries / torch.linalg.vector_norm(queries, dim=1, keepdim=True)
        centre = base.mean(dim=0, dtype=torch.float64).to(torch.float32)
        base, queries = base - centre, queries - centre
        return shrinking_blocks(
            lambda entries: torch_search_tensors(base, queries, k, block_entries=entries),
            block_entries(device),
            device,
        )


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
    available = faiss_module() is not None
    if backend == "faiss" and not available:
        raise LCCInputError(
            "backend='faiss' but faiss is not importable; install faiss-cpu or use backend='torch'"
        )
    return available and backend != "torch"


def _as_matrix(x: object, name: str, checked: bool = False) -> np.ndarray:
    """Float32 (M, D) matrix, allowing M in {0, 1} (unlike ``as_latent_matrix``)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(x)
    if array.ndim < 2:
        raise LCCInputError(
            f"{name} must have shape (M, d, ...) with one row per sample, got shape {array.shape}"
        )
    if array.shape[0] >= 2:
        return as_latent_matrix(array, name=name, checked=checked)
    width = int(np.prod(array.shape[1:]))
    matrix = np.ascontiguousarray(array.reshape(array.shape[0], width), dtype=np.float32)
    if not checked and not np.isfinite(matrix).all():
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


def _without_self(indices: np.ndarray, squared: np.ndarray) -> Neighbors:
    """Neighbors of every row from its ``k + 1`` nearest rows, the row itself dropped."""
    found, squared = drop_self(indices, squared, np.arange(indices.shape[0]))
    return Neighbors(found, to_distance(squared))


def _approximate_self_search(
    matrix: np.ndarray, k: int, kind: str, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Self k-NN through a faiss index, widened until the sampled recall reaches the target.

    Returns indices, squared distances and the recall measured on the sample at the chosen
    width; 1.0 when the rows were searched exactly instead (the widest search missed the
    target, or IVF needed more lists than brute force costs).
    """
    n = matrix.shape[0]
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, min(n, _RECALL_SAMPLE), replace=False))
    _, exact_sq = drop_self(*faiss_search(matrix, matrix[sample], k + 1), sample)
    index = _build_index(kind, matrix, k, rng, seed)
    width = index.first_width
    while True:
        with faiss_threads(1):  # a few hundred queries: one thread, no waiting on a busy core
            _, found_sq = drop_self(*index.search(matrix[sample], k + 1, width), sample)
        recall = _sample_recall(found_sq, exact_sq, matrix)
        if recall >= _TARGET_RECALL or width >= index.max_width:
            break
        width = min(2 * width, index.max_width)
    if recall < _TARGET_RECALL or width > index.exact_width:
        # the widest search misses the target, or the width it needs costs as much as brute
        # force (little cluster structure): search exactly
        del index
        indices, squared = faiss_search(matrix, matrix, k + 1)
        return (*drop_self(indices, squared, np.arange(n)), 1.0)
    indices, squared = index.search_all(k + 1, width)
    del index
    short = np.flatnonzero((indices < 0).any(axis=1))  # lists probed held fewer than k + 1 rows
    if short.size:
        indices[short], squared[short] = faiss_search(matrix, matrix[short], k + 1)
    return (*drop_self(indices, squared, np.arange(n)), recall)


def _sample_recall(found_sq: np.ndarray, exact_sq: np.ndarray, matrix: np.ndarray) -> float:
    """Fraction of the sample's k neighbour slots filled by a true k nearest neighbour.

    A found neighbour counts when its distance is within the exact k-th distance (up to float32
    rounding of the distance expansion), so ties between equidistant rows are never misses.
    """
    if exact_sq.size == 0:
        return 1.0
    scale = float(np.einsum("ij,ij->i", matrix[:1024], matrix[:1024]).max(initial=1.0))
    tolerance = 1e-5 * max(scale, 1.0)
    hits = found_sq <= exact_sq[:, -1:] + tolerance
    return float(hits.mean())


def _build_index(
    kind: str, matrix: np.ndarray, k: int, rng: np.random.Generator, seed: int
) -> _Ivf | _Hnsw:
    """A faiss index over all rows with a width knob (``first_width`` to ``max_width``; widths
    above ``exact_width`` cost as much as an exact search): ``search`` (sample), ``search_all``."""
    return _Hnsw(matrix) if kind == "hnsw" else _Ivf(matrix, k, rng, seed, pq=kind == "ivf-pq")


class _Ivf:
    """IVF-Flat or IVF-PQ over ``matrix``, lists assigned once for adding and searching all rows.

    Width: ``nprobe``. The coarse assignment of every row (the ``nprobe`` nearest centroids) is
    computed once, used both to add the rows (first centroid) and to search them (faiss
    ``search_preassigned``). IVF-PQ searches ``_PQ_CANDIDATES * width / first_width * k``
    candidates and keeps the ``k`` nearest by exact distance.
    """

    def __init__(
        self, matrix: np.ndarray, k: int, rng: np.random.Generator, seed: int, *, pq: bool
    ) -> None:
        faiss = faiss_module()
        n, d = matrix.shape
        self.matrix, self.pq = matrix, pq
        n_lists = max(1, min(round(_LISTS_PER_ROOT * math.sqrt(n)), n // (4 * (k + 1))))
        self.first_width = min(_FIRST_PROBES, n_lists)
        self.max_width = n_lists
        self.exact_width = max(self.first_width, int(_IVF_EXACT_SHARE * n_lists))
        train = matrix[np.sort(rng.choice(n, min(n, _TRAIN_PER_LIST * n_lists), replace=False))]
        centroids = faiss_kmeans(
            train, n_lists, seed=seed, iterations=_KMEANS_ITERATIONS, points=_TRAIN_PER_LIST
        )
        self.quantizer = faiss.IndexFlatL2(d)
        self.quantizer.add(centroids)
        if pq:
            bits = int(min(8, max(1, math.log2(max(2, train.shape[0] // 16)))))
            self.index = faiss.IndexIVFPQ(self.quantizer, d, n_lists, _pq_codes(d), bits)
            self.index.do_polysemous_training = False  # slow, and unused by this search
            self.index.pq.cp.seed = seed
            self.index.pq.cp.niter = _KMEANS_ITERATIONS
            self.index.pq.cp.min_points_per_centroid = 1  # small data: no faiss warning
            with faiss_threads(1):  # many tiny k-means: threads only wait on each other
                self.index.train(np.ascontiguousarray(train))
        else:
            self.index = faiss.IndexIVFFlat(self.quantizer, d, n_lists)
            self.index.is_trained = True
        # one coarse assignment for adding (first column) and for searching up to twice the
        # first width (the usual case): a quantizer pass costs as much as the list scans
        self.probes, self.probe_distances = self._assign(min(2 * self.first_width, n_lists))
        first = np.ascontiguousarray(self.probes[:, 0])
        self.index.add_core(n, faiss.swig_ptr(matrix), None, faiss.swig_ptr(first))
        del first

    def _assign(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        distances, lists = self.quantizer.search(self.matrix, width)
        return lists, distances

    def _candidates(self, k: int, width: int) -> int:
        if not self.pq:
            return k
        factor = _PQ_CANDIDATES * max(1, width // self.first_width)
        return min(self.matrix.shape[0], factor * k)

    def search(self, queries: np.ndarray, k: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.nprobe = width
        distances, indices = self.index.search(
            np.ascontiguousarray(queries), self._candidates(k, width)
        )
        return self._refine(queries, indices, distances, k)

    def search_all(self, k: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        if width > self.probes.shape[1]:
            self.probes, self.probe_distances = self._assign(width)
        lists = np.ascontiguousarray(self.probes[:, :width])
        distances_q = np.ascontiguousarray(self.probe_distances[:, :width])
        self.probes = self.probe_distances = np.empty((0, 0))
        self.index.nprobe = width
        distances, indices = self.index.search_preassigned(
            self.matrix, self._candidates(k, width), lists, distances_q
        )
        del lists, distances_q
        return self._refine(self.matrix, indices, distances, k)

    def _refine(
        self, queries: np.ndarray, indices: np.ndarray, distances: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if not self.pq:
            return indices.astype(np.int64, copy=False), distances
        return _rerank(self.matrix, queries, indices, k)


def _pq_codes(dim: int) -> int:
    """Sub-quantisers of the PQ codes: a divisor of ``dim`` near ``dim / _PQ_DIMS_PER_CODE``."""
    wanted = max(1, dim // _PQ_DIMS_PER_CODE)
    return max(m for m in range(1, wanted + 1) if dim % m == 0)


def _rerank(
    base: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` candidates of each query nearest by exact distance (``-1`` candidates: skipped)."""
    n, c = candidates.shape
    indices = np.empty((n, k), np.int64)
    squared = np.empty((n, k), np.float32)
    rows = max(1, BLOCK_ENTRIES // max(1, c * base.shape[1]))
    base_t = torch.from_numpy(base)
    with torch.no_grad():
        for start in range(0, n, rows):
            block = torch.from_numpy(np.ascontiguousarray(candidates[start : start + rows]))
            valid = block >= 0
            gathered = base_t.index_select(0, block.clamp(min=0).reshape(-1)).view(*block.shape, -1)
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + rows]))
            values = (gathered - q[:, None, :]).square_().sum(dim=-1)
            values.masked_fill_(~valid, math.inf)
            best, order = torch.topk(values, k, dim=1, largest=False, sorted=True)
            indices[start : start + rows] = torch.gather(block, 1, order).numpy()
            squared[start : start + rows] = best.numpy()
    return indices, squared


class _Hnsw:
    """HNSW-Flat (built on one thread: a multi-threaded build is not deterministic). Width:
    ``efSearch``."""

    first_width = _HNSW_FIRST_EF
    max_width = exact_width = _HNSW_MAX_EF

    def __init__(self, matrix: np.ndarray) -> None:
        faiss = faiss_module()
        self.matrix = matrix
        self.index = faiss.IndexHNSWFlat(matrix.shape[1], _HNSW_LINKS)
        self.index.hnsw.efConstruction = _HNSW_CONSTRUCTION
        with faiss_threads(1):
            self.index.add(matrix)

    def search(self, queries: np.ndarray, k: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.hnsw.efSearch = max(width, k)
        distances, indices = self.index.search(np.ascontiguousarray(queries), k)
        return indices.astype(np.int64, copy=False), distances

    def search_all(self, k: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        return self.search(self.matrix, k, width)
