"""Correction targets of misclustered samples (paper sec. III.D eq. 7, and sec. VI.B eq. 13-14).

*Exact* targets: a misclustered (MC) sample of class ``t`` is correctible when class ``t`` has at
least ``k`` correctly clustered (CC) samples; its target is the mean of its ``k`` nearest CC
samples of class ``t``. *Approximate* targets: one random CC representative per cluster; a MC
sample is correctible when some cluster matched to its class has a representative, and its
target is the nearest such representative. Both are computed class by class with exact searches
(:func:`lcc.engine.knn.search`: one faiss brute-force search per class for the exact targets, the
torch search for the approximate ones), in query chunks so memory stays bounded.

>>> import numpy as np
>>> z = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [1.5]], dtype=np.float32)
>>> y = np.array([0, 0, 0, 1, 1, 0])
>>> cc = np.array([True, True, True, True, True, False])
>>> t = exact_targets(z, y, cc, k=2)
>>> t.indices.tolist(), t.vectors.tolist()
([5], [[1.5]])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lcc.engine.device import Placed, block_entries, place_rows, resolve_device
from lcc.engine.knn import search, search_tensors
from lcc.engine.match import Matching, as_class_subset, as_cluster_vector, as_mask, correctible_mask
from lcc.errors import (
    LCCInputError,
    as_label_vector,
    as_latent_matrix,
    check_choice,
    check_finite,
    check_k,
)

__all__ = ["Targets", "approximate_targets", "choose_representatives", "exact_targets"]

_BACKENDS = ("auto", "torch")

#: Upper bound (bytes) on the temporary blocks of one query chunk (distances, gathered rows).
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Targets:
    """Targets of the correctible samples of a dataset of ``n_samples`` latents.

    ``indices`` (M,) int64 are the sorted ids of the correctible samples, ``vectors`` (M, D)
    float32 their targets (row ``j`` is the target of sample ``indices[j]``).

    >>> t = Targets(np.array([2]), np.ones((1, 3), np.float32), n_samples=4)
    >>> t.correctible.tolist(), t.dense()[1:3].tolist()
    ([False, False, True, False], [[nan, nan, nan], [1.0, 1.0, 1.0]])
    """

    indices: np.ndarray
    vectors: np.ndarray
    n_samples: int

    def __post_init__(self) -> None:
        indices = np.asarray(self.indices)
        vectors = np.asarray(self.vectors)
        if indices.ndim != 1 or vectors.ndim != 2 or vectors.shape[0] != indices.shape[0]:
            raise LCCInputError(
                f"Targets need indices (M,) and vectors (M, D), got {indices.shape} and "
                f"{vectors.shape}"
            )
        if indices.size and (
            indices[0] < 0 or indices[-1] >= self.n_samples or np.any(np.diff(indices) <= 0)
        ):
            raise LCCInputError(
                f"Targets indices must be sorted, distinct and in [0, {self.n_samples})"
            )
        object.__setattr__(self, "indices", indices.astype(np.int64, copy=False))
        object.__setattr__(self, "vectors", np.ascontiguousarray(vectors, dtype=np.float32))
        object.__setattr__(self, "n_samples", int(self.n_samples))

    @property
    def dim(self) -> int:
        """Latent dimension D of the targets."""
        return int(self.vectors.shape[1])

    @property
    def n_correctible(self) -> int:
        """Number M of correctible samples."""
        return int(self.indices.shape[0])

    @property
    def correctible(self) -> np.ndarray:
        """(N,) bool: which samples have a target."""
        mask = np.zeros(self.n_samples, dtype=bool)
        mask[self.indices] = True
        return mask

    def dense(self) -> np.ndarray:
        """(N, D) float32: the target of every sample, NaN rows for non-correctible ones."""
        out = np.full((self.n_samples, self.dim), np.nan, dtype=np.float32)
        out[self.indices] = self.vectors
        return out


def exact_targets(
    z: object,
    y: Sequence[int] | np.ndarray,
    correctly_clustered: np.ndarray,
    k: int,
    *,
    classes: Sequence[int] | np.ndarray | None = None,
    metric: str = "l2",
    backend: str = "auto",
    device: str | None = None,
    checked: bool = False,
) -> Targets:
    """Eq. 7: each correctible sample's target is the mean of its k nearest CC same-class samples.

    Neighbours are found with ``metric`` (``"l2"``: Euclidean, as in the paper; ``"cosine"``:
    on L2-normalised rows); the target is always the mean of the raw latents. Restricted to
    samples whose class is in ``classes`` when given. One exact search per class (all its
    correctible samples against its CC samples; query chunks only bound memory), by faiss
    (``backend="auto"``, when importable) or torch. Ties between equidistant neighbours are
    broken as :func:`lcc.engine.knn.search` breaks them. ``device`` (``"auto"``, ``"cpu"``,
    ``"cuda"``; see :func:`lcc.engine.device.resolve_device`) runs the searches and means with
    torch on that device (``backend="torch"``: the same code on CPU tensors); ``checked=True``:
    the caller has already checked ``z`` for NaN/inf (a refresh does, once).
    """
    target = resolve_device(device, z, backend=backend)
    z = _latents(z, target, checked)
    n = z.shape[0]
    y = as_label_vector(y, n)
    cc = as_mask(correctly_clustered, n)
    k = check_k(k, n)
    metric = check_choice(metric, ("l2", "cosine"), name="metric")
    correctible = correctible_mask(y, cc, k, classes=classes)
    indices = np.flatnonzero(correctible)
    if target is not None:
        vectors = _torch_targets(z, y, cc, correctible, indices, k, metric, target)
        return Targets(indices=indices, vectors=vectors, n_samples=n)
    vectors = np.empty((indices.shape[0], z.shape[1]), dtype=np.float32)
    for members in _members_by_class(y, correctible):
        base = z[members[cc[members]]]
        queries = members[correctible[members]]
        rows = np.searchsorted(indices, queries)
        for chunk in _chunks(queries.shape[0], base.shape[0], k, z.shape[1]):
            found, _ = search(
                base, z[queries[chunk]], k, metric=metric, backend=backend, checked=True
            )
            vectors[rows[chunk]] = base[found].mean(axis=1)
    return Targets(indices=indices, vectors=vectors, n_samples=n)


def choose_representatives(
    clusters: Sequence[int] | np.ndarray,
    correctly_clustered: np.ndarray,
    *,
    seed: int = 0,
    n_clusters: int | None = None,
) -> np.ndarray:
    """(K,) int64: one uniformly random CC sample of each cluster (seeded), -1 where none.

    >>> choose_representatives([0, 0, 1, 2], np.array([True, False, False, True])).tolist()
    [0, -1, 3]
    """
    cc = np.asarray(correctly_clustered)
    clusters = as_cluster_vector(clusters, cc.shape[0])
    cc = as_mask(cc, clusters.shape[0])
    n_clusters = max(int(clusters.max(initial=-1)) + 1, n_clusters or 0)
    candidates = np.random.default_rng(seed).permutation(np.flatnonzero(cc))
    present, first = np.unique(clusters[candidates], return_index=True)
    representatives = np.full(n_clusters, -1, dtype=np.int64)
    representatives[present] = candidates[first]
    return representatives


def approximate_targets(
    z: object,
    y: Sequence[int] | np.ndarray,
    clusters: Sequence[int] | np.ndarray,
    matching: Matching,
    *,
    classes: Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
    backend: str = "auto",
    device: str | None = None,
    checked: bool = False,
) -> Targets:
    """Eq. 13-14: target = nearest random CC representative among clusters matched to y_i.

    Representatives come from :func:`choose_representatives` with ``seed``. A sample is
    correctible when it is misclustered, some cluster matched to its class has a representative
    and (if ``classes`` is given) its class is in ``classes``. ``device`` and ``checked`` as in
    :func:`exact_targets`; ``backend="torch"`` runs the device code on CPU tensors (``"auto"``:
    one NumPy-fed torch search per class, as the CPU path always did).
    """
    target = resolve_device(device, z, backend=check_choice(backend, _BACKENDS, name="backend"))
    z = _latents(z, target, checked)
    n = z.shape[0]
    y = as_label_vector(y, n)
    clusters = as_cluster_vector(clusters, n)
    cc = as_mask(matching.correctly_clustered, n, name="matching.correctly_clustered")
    cluster_class = np.asarray(matching.cluster_class, dtype=np.int64)
    if cluster_class.ndim != 1 or clusters.max() >= cluster_class.shape[0]:
        raise LCCInputError(
            f"matching has {cluster_class.shape[0]} clusters but clusters has ids up to "
            f"{clusters.max()}; pass the matching computed from these clusters"
        )
    representatives = choose_representatives(
        clusters, cc, seed=seed, n_clusters=cluster_class.shape[0]
    )
    has_rep = representatives >= 0
    correctible = ~cc & np.isin(y, cluster_class[has_rep])
    subset = as_class_subset(classes)
    if subset is not None:
        correctible &= np.isin(y, subset)
    indices = np.flatnonzero(correctible)
    vectors = np.empty((indices.shape[0], z.shape[1]), dtype=np.float32)
    rep_order = np.argsort(cluster_class[has_rep], kind="stable")
    rep_ids = representatives[has_rep][rep_order]
    rep_classes = cluster_class[has_rep][rep_order]
    for members in _members_by_class(y, correctible):
        t = y[members[0]]
        lo, hi = np.searchsorted(rep_classes, [t, t + 1])
        queries = members[correctible[members]]
        rows = np.searchsorted(indices, queries)
        if target is not None:
            vectors[rows] = _torch_nearest(z, rep_ids[lo:hi], queries, target)
            continue
        base = z[rep_ids[lo:hi]]
        for chunk in _chunks(queries.shape[0], base.shape[0], 1, z.shape[1]):
            found, _ = search(base, z[queries[chunk]], 1, backend="torch", checked=True)
            vectors[rows[chunk]] = base[found[:, 0]]
    return Targets(indices=indices, vectors=vectors, n_samples=n)


def _latents(z: object, target: torch.device | None, checked: bool) -> np.ndarray | Placed:
    """The latents as a float32 matrix (CPU path) or as rows placed on ``target``."""
    if target is None:
        return as_latent_matrix(z, checked=checked)
    if not isinstance(z, (np.ndarray, torch.Tensor)):
        z = as_latent_matrix(z, checked=checked)
    elif not checked:
        as_latent_matrix(z[:2])  # shape and dtype checks on two rows
        check_finite(z)
    return place_rows(z, target, copy=False)


def _gather(z: Placed, ids: np.ndarray) -> torch.Tensor:
    """Rows ``ids`` of placed latents, on their device."""
    index = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(z.rows.device)
    return z.rows.index_select(0, index).to(z.device, non_blocking=True)


def _torch_targets(
    z: Placed,
    y: np.ndarray,
    cc: np.ndarray,
    correctible: np.ndarray,
    indices: np.ndarray,
    k: int,
    metric: str,
    device: torch.device,
) -> np.ndarray:
    """:func:`exact_targets`' vectors computed by torch on ``device``."""
    vectors = torch.empty((indices.shape[0], z.rows.shape[1]), dtype=torch.float32, device=device)
    entries = block_entries(device)
    with torch.no_grad():
        for members in _members_by_class(y, correctible):
            base = _gather(z, members[cc[members]])
            queries = members[correctible[members]]
            rows = torch.from_numpy(np.searchsorted(indices, queries)).to(device)
            step = max(1, entries // max(1, base.shape[0], k * base.shape[1]))
            for start in range(0, queries.shape[0], step):
                q = _gather(z, queries[start : start + step])
                found, _ = search_tensors(base, q, k, device, metric=metric)
                vectors[rows[start : start + step]] = base[found].mean(dim=1)
    return vectors.cpu().numpy()


def _torch_nearest(
    z: Placed, base_ids: np.ndarray, queries: np.ndarray, device: torch.device
) -> np.ndarray:
    """Rows of ``base_ids`` nearest to each row of ``queries`` (torch on ``device``)."""
    with torch.no_grad():
        base = _gather(z, base_ids)
        step = max(1, block_entries(device) // max(1, base.shape[0], base.shape[1]))
        parts = []
        for start in range(0, queries.shape[0], step):
            found, _ = search_tensors(base, _gather(z, queries[start : start + step]), 1, device)
            parts.append(base[found[:, 0]].cpu())
    return torch.cat(parts).numpy()


def _members_by_class(y: np.ndarray, wanted: np.ndarray) -> Iterator[np.ndarray]:
    """Yield, for each class with a ``wanted`` sample, the sorted ids of all its samples."""
    order = np.argsort(y, kind="stable")
    sorted_y = y[order]
    starts = np.flatnonzero(np.r_[True, sorted_y[1:] != sorted_y[:-1]])
    ends = np.r_[starts[1:], sorted_y.shape[0]]
    has_wanted = np.logical_or.reduceat(wanted[order], starts) if starts.size else starts
    for start, end, keep in zip(starts, ends, has_wanted, strict=True):
        if keep:
            yield order[start:end]


def _chunks(n_queries: int, n_base: int, k: int, dim: int) -> Iterator[slice]:
    """Query slices whose distance block (Q x n_base) and gathered rows (Q x k x D) fit."""
    per_query = 4 * max(n_base, k * dim, 1)
    step = max(1, CHUNK_BYTES // per_query)
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))
