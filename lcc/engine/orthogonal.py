"""Orthogonal correction (LCC paper sec. V.C): pull a misclustered latent off the manifold it
wrongly sits in, not along it.

A misclustered sample ``z`` with target ``t`` is pulled along ``v = z - t``. Its own (wrong)
cluster is taken as the manifold ``M`` it sits in; the tangent space ``T_z M`` is estimated by
PCA of the ``tangent_k`` nearest neighbours of ``z`` within that cluster (``z`` excluded,
centred at their mean): the top right singular vectors of the centred neighbours span it. The
pull keeps only its part orthogonal to that space, ``P_perp v = v - V V^T v`` (``V``: the
orthonormal tangent basis, ``d x m``), and the *effective target* is ``z - P_perp v``: stored
like any other target, so :mod:`lcc.engine.loss` is unchanged, and the loss pulls ``z`` along
``P_perp v`` only.

``tangent_dim`` is the tangent dimension ``m``: an integer, or a fraction in ``(0, 1)``: per
sample, the smallest ``m`` whose top components explain at least that fraction of the
neighbours' variance (the eigenvalues of their covariance, as in PCA's explained variance).
Samples whose cluster has fewer than ``tangent_k`` other members keep their plain target
(counted in :attr:`OrthogonalStats.fallback`).

The SVD of each centred ``(k', d)`` neighbour matrix ``X`` is taken through the eigenvalues of
its ``(k', k')`` Gram matrix ``X X^T = U diag(s^2) U^T`` (``V = X^T U / s``), batched over
samples: ``V V^T v = X^T U_m diag(1/s_m^2) U_m^T X v``, which never forms ``V``.

>>> import numpy as np
>>> from lcc.engine.targets import Targets
>>> rng = np.random.default_rng(0)
>>> line = np.c_[np.linspace(-1, 1, 9), np.zeros(9)].astype(np.float32)  # cluster 0: the x axis
>>> z = np.r_[line, [[0.0, 5.0]]].astype(np.float32)                    # cluster 1: far away
>>> clusters = np.r_[np.zeros(9, int), [1]]
>>> plain = Targets(np.array([4]), np.array([[1.0, 5.0]], np.float32), n_samples=10)
>>> result = orthogonal_targets(z, clusters, plain, tangent_k=4, tangent_dim=1)
>>> result.targets.vectors.round(6).tolist()  # the pull along the x axis is removed
[[0.0, 5.0]]
>>> round(result.stats.mean_ratio, 4), result.stats.fallback  # 5 / sqrt(26): the y part kept
(0.9806, 0)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lcc.engine.choices import CORRECTIONS
from lcc.engine.device import block_entries
from lcc.engine.exact_search import drop_self, torch_threads
from lcc.engine.knn import search_tensors
from lcc.engine.targets import Targets
from lcc.errors import LCCInputError, as_latent_matrix, check_choice

__all__ = [
    "CORRECTIONS",
    "Orthogonal",
    "OrthogonalStats",
    "check_tangent",
    "orthogonal_targets",
    "tangent_sizes",
]

#: Relative size below which a Gram eigenvalue counts as zero (rank-deficient neighbours).
_RANK_TOL = 1e-6
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class OrthogonalStats:
    """What the projection did: ``projected`` samples got an orthogonal target, ``fallback``
    kept the plain one (cluster too small); ``mean_ratio`` is the mean over projected samples
    of ``||P_perp v|| / ||v||`` (1: nothing removed; 0: the whole pull lay in the tangent
    space); ``mean_tangent_dim``: the mean tangent dimension used (NaN when none projected)."""

    projected: int
    fallback: int
    mean_ratio: float
    mean_tangent_dim: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, keys prefixed ``orthogonal_``."""
        return {
            "orthogonal_projected": int(self.projected),
            "orthogonal_fallback": int(self.fallback),
            "orthogonal_mean_ratio": float(self.mean_ratio),
            "orthogonal_mean_tangent_dim": float(self.mean_tangent_dim),
        }


@dataclass(frozen=True)
class Orthogonal:
    """Result of :func:`orthogonal_targets`: the effective targets and their statistics."""

    targets: Targets
    stats: OrthogonalStats


def check_tangent(tangent_k: object, tangent_dim: object, dim: int | None = None) -> int | float:
    """``tangent_dim`` (text read as a number) if ``tangent_k`` >= 2 and ``tangent_dim`` is an
    integer in ``[1, tangent_k - 1]`` (and below ``dim``) or a fraction in ``(0, 1)``, else
    :class:`LCCInputError`.

    >>> check_tangent(10, "0.9"), check_tangent(10, 3, dim=8)
    (0.9, 3)
    >>> check_tangent(5, 5)
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: tangent_dim=5 must be below tangent_k=5 (k' centred neighbours \
span at most k'-1 dimensions); choose tangent_dim <= 4 or a larger tangent_k
    """
    if isinstance(tangent_k, bool) or not isinstance(tangent_k, (int, np.integer)):
        raise LCCInputError(f"tangent_k must be an integer >= 2, got {tangent_k!r}")
    if tangent_k < 2:
        raise LCCInputError(f"tangent_k={tangent_k} must be at least 2 (a PCA needs 2 points)")
    if isinstance(tangent_dim, str):
        tangent_dim = _number(tangent_dim)
    if isinstance(tangent_dim, bool) or not isinstance(tangent_dim, (int, float, np.number)):
        raise LCCInputError(
            f"tangent_dim must be an integer dimension or a fraction of explained variance in "
            f"(0, 1), got {tangent_dim!r}"
        )
    if isinstance(tangent_dim, (int, np.integer)):
        if tangent_dim < 1:
            raise LCCInputError(f"tangent_dim={tangent_dim} must be at least 1")
        if tangent_dim >= tangent_k:
            raise LCCInputError(
                f"tangent_dim={tangent_dim} must be below tangent_k={tangent_k} (k' centred "
                f"neighbours span at most k'-1 dimensions); choose tangent_dim <= "
                f"{tangent_k - 1} or a larger tangent_k"
            )
        if dim is not None and tangent_dim >= dim:
            raise LCCInputError(
                f"tangent_dim={tangent_dim} must be below the latent dimension {dim} (else "
                "nothing of the pull is left); choose a smaller tangent_dim"
            )
        return int(tangent_dim)
    if not (math.isfinite(float(tangent_dim)) and 0.0 < float(tangent_dim) < 1.0):
        raise LCCInputError(
            f"tangent_dim={tangent_dim} as a number that is not an integer is a fraction of "
            "explained variance and must lie in (0, 1); pass e.g. 0.9, or an integer dimension"
        )
    return float(tangent_dim)


def _number(text: str) -> int | float | str:
    """Text as an int or a float where it reads as one (else unchanged, for the message)."""
    for convert in (int, float):
        with suppress(ValueError):
            return convert(text.strip())
    return text


def tangent_sizes(eigenvalues: torch.Tensor, tangent_dim: int | float) -> torch.Tensor:
    """(B,) int64: the tangent dimension of each row of ``eigenvalues`` (B, k') sorted in
    descending order: ``tangent_dim`` when it is an integer (at most the positive ones), else
    the fewest leading ones whose sum reaches that fraction of the row's total.

    >>> tangent_sizes(torch.tensor([[6.0, 3.0, 1.0], [5.0, 0.0, 0.0]]), 0.85).tolist()
    [2, 1]
    >>> tangent_sizes(torch.tensor([[6.0, 3.0, 1.0], [5.0, 0.0, 0.0]]), 2).tolist()
    [2, 1]
    """
    positive = eigenvalues > _RANK_TOL * eigenvalues[:, :1].clamp(min=_TINY)
    rank = positive.sum(dim=1)
    if isinstance(tangent_dim, (int, np.integer)) and not isinstance(tangent_dim, bool):
        return rank.clamp(max=int(tangent_dim))
    share = torch.cumsum(eigenvalues.clamp(min=0), dim=1)
    total = share[:, -1:].clamp(min=_TINY)
    # the first m with share/total >= fraction (tiny slack: the last share is exactly 1)
    reached = share / total >= float(tangent_dim) - 1e-12
    first = torch.argmax(reached.to(torch.int8), dim=1) + 1
    return torch.minimum(first, rank)


def orthogonal_targets(
    z: object,
    clusters: object,
    targets: Targets,
    *,
    tangent_k: int,
    tangent_dim: int | float,
    metric: str = "l2",
    device: str | torch.device | None = None,
    checked: bool = False,
) -> Orthogonal:
    """The effective targets ``z - P_perp(z - t)`` of ``targets``, and their statistics.

    ``z`` (N, D) are the latents the targets were computed in (NumPy, or a tensor on the
    device the work should run on), ``clusters`` (N,) their cluster ids. Neighbours are found
    by an exact search within each cluster (``metric``: ``"l2"`` or ``"cosine"``, as the
    refresh's graph); the PCA runs in float32. ``device`` defaults to where ``z`` is (CPU for
    NumPy); ``checked=True``: ``z`` was already checked for NaN/inf.
    """
    metric = check_choice(metric, ("l2", "cosine"), name="metric")
    rows = _rows(z, device, checked)
    n, dim = rows.shape
    tangent_dim = check_tangent(tangent_k, tangent_dim, dim)
    labels = np.asarray(clusters).reshape(-1).astype(np.int64)
    if labels.shape[0] != n:
        raise LCCInputError(f"clusters has {labels.shape[0]} entries but z has {n} rows")
    if targets.n_samples != n or (targets.n_correctible and targets.dim != dim):
        raise LCCInputError(
            f"targets are for {targets.n_samples} samples of dimension {targets.dim}, z is "
            f"({n}, {dim}); pass the targets computed from these latents"
        )
    vectors = targets.vectors.copy()
    ratios = np.full(targets.n_correctible, np.nan)
    sizes = np.zeros(targets.n_correctible, dtype=np.int64)
    # many small products: one thread (on a busy machine a second one is often descheduled)
    with torch.no_grad(), torch_threads(1 if rows.device.type == "cpu" else None):
        fallback = _project_targets(
            rows, labels, targets.indices, vectors, ratios, sizes, tangent_k, tangent_dim, metric
        )
    done = sizes > 0
    stats = OrthogonalStats(
        projected=targets.n_correctible - fallback,
        fallback=fallback,
        mean_ratio=float(np.nanmean(ratios)) if np.isfinite(ratios).any() else float("nan"),
        mean_tangent_dim=float(sizes[done].mean()) if done.any() else float("nan"),
    )
    return Orthogonal(Targets(targets.indices, vectors, n_samples=n), stats)


def _project_targets(
    rows: torch.Tensor,
    labels: np.ndarray,
    indices: np.ndarray,
    vectors: np.ndarray,
    ratios: np.ndarray,
    sizes: np.ndarray,
    tangent_k: int,
    tangent_dim: int | float,
    metric: str,
) -> int:
    """Replace ``vectors`` (rows of ``indices``) by the effective targets in place, filling
    ``ratios`` and ``sizes``; returns the number of samples that kept their plain target."""
    fallback = 0
    for queries, members in _by_cluster(labels, indices):
        rows_of_queries = np.searchsorted(indices, queries)
        if members.shape[0] - 1 < tangent_k:
            fallback += int(queries.shape[0])
            continue
        found = _cluster_neighbours(rows, members, queries, tangent_k, metric)
        for part in _chunks(queries.shape[0], tangent_k, rows.shape[1], rows.device):
            at = rows_of_queries[part]
            z_q = rows[torch.from_numpy(queries[part]).to(rows.device)]
            target = torch.from_numpy(vectors[at]).to(rows.device)
            neighbours = rows[found[part].to(rows.device)]
            perp, size = _perpendicular(neighbours, z_q - target, tangent_dim)
            pull = torch.linalg.vector_norm(z_q - target, dim=1)
            ratio = torch.linalg.vector_norm(perp, dim=1) / pull
            vectors[at] = (z_q - perp).cpu().numpy()
            ratios[at] = torch.where(pull > 0, ratio, torch.nan).cpu().numpy()
            sizes[at] = size.cpu().numpy()
    return fallback


def _rows(z: object, device: str | torch.device | None, checked: bool) -> torch.Tensor:
    """``z`` as an (N, D) float32 tensor on ``device`` (no copy for float32 NumPy on the CPU)."""
    if isinstance(z, torch.Tensor) and z.is_floating_point():
        target = torch.device(device) if device is not None else z.device
        rows = z.detach().reshape(z.shape[0], -1).to(target, torch.float32)
        if not checked and not bool(torch.isfinite(rows).all()):
            raise LCCInputError("z contains NaN or inf values; pass finite latents")
        return rows
    matrix = as_latent_matrix(z, checked=checked)
    rows = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
    return rows if device is None else rows.to(device)


def _by_cluster(labels: np.ndarray, indices: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each cluster holding a correctible sample: (its correctible ids, all its ids)."""
    if indices.size == 0:
        return
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    for cluster in np.unique(labels[indices]):
        lo, hi = np.searchsorted(sorted_labels, [cluster, cluster + 1])
        members = np.sort(order[lo:hi])
        yield indices[labels[indices] == cluster], members


def _cluster_neighbours(
    rows: torch.Tensor, members: np.ndarray, queries: np.ndarray, k: int, metric: str
) -> torch.Tensor:
    """(Q, k) dataset ids: the k nearest members of each query's cluster, the query excluded."""
    base = rows[torch.from_numpy(members).to(rows.device)]
    position = np.searchsorted(members, queries)
    queries_rows = base[torch.from_numpy(position).to(rows.device)]
    found, squared = search_tensors(base, queries_rows, k + 1, rows.device, metric=metric)
    kept, _ = drop_self(found.cpu().numpy(), squared.cpu().numpy(), position)
    return torch.from_numpy(members[kept])


def _chunks(n: int, k: int, dim: int, device: torch.device) -> Iterator[slice]:
    """Query slices whose gathered (Q, k, D) float32 neighbours fit one block."""
    step = max(1, block_entries(device) // max(1, k * dim))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _perpendicular(
    neighbours: torch.Tensor, pull: torch.Tensor, tangent_dim: int | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_perp v, m)`` for neighbours (B, k', D) and pulls ``v`` (B, D), in float32 (the
    Gram's eigenvalues are relative to its largest: float32 keeps the top ones to 1e-6)."""
    centred = neighbours - neighbours.mean(dim=1, keepdim=True)
    gram = centred @ centred.transpose(1, 2)  # (B, k', k') = U diag(s^2) U^T
    eigenvalues, vectors = torch.linalg.eigh(gram)  # ascending
    eigenvalues, vectors = eigenvalues.flip(1), vectors.flip(2)
    size = tangent_sizes(eigenvalues, tangent_dim)
    keep = torch.arange(eigenvalues.shape[1], device=size.device)[None, :] < size[:, None]
    inverse = torch.where(keep, 1.0 / eigenvalues.clamp(min=_TINY), 0.0)
    along = torch.bmm(centred, pull.unsqueeze(2))  # X v: (B, k', 1)
    coefficients = torch.bmm(vectors.transpose(1, 2), along) * inverse.unsqueeze(2)
    tangent = torch.bmm(centred.transpose(1, 2), torch.bmm(vectors, coefficients)).squeeze(2)
    return pull - tangent, size
