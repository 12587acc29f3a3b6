"""The LCC refresh pipeline: latents and labels in, clusters, masks and correction targets out.

One refresh runs, in order: optional PCA (:func:`lcc.engine.projection.fit_pca`), the k-NN search
(:func:`lcc.engine.knn.knn`) and graph (:func:`lcc.engine.graph.knn_graph`), clustering
(:func:`lcc.engine.cluster.cluster_graph`), cluster-to-class matching
(:func:`lcc.engine.match.match_clusters`) and the targets of the correctible samples
(:func:`lcc.engine.targets.exact_targets` or :func:`lcc.engine.targets.approximate_targets`).
Every input is validated before any work starts, and every stage is timed.

Latents may be a read-only memory map (``np.load(path, mmap_mode="r")``) in float16, float32 or
float64: they are checked for NaN/inf in row chunks (stage ``"check"``), PCA is fitted on a sample
and applied in chunks, so with ``pca`` set the full-dimensional latents are never converted to
float32 in memory; without PCA they are converted once, for the k-NN search.

>>> from lcc.synthetic import gaussian_mixture
>>> z, y, _ = gaussian_mixture(n_samples=300, dim=8, n_classes=3, clusters_per_class=2, seed=0)
>>> r = refresh(z, y, k=5, seed=0)
>>> r.n, r.d, r.clusters.shape, r.targets.dense().shape
(300, 8, (300,), (300, 8))
>>> sorted(r.seconds) == sorted(
...     ["check", "pca", "knn", "graph", "cluster", "match", "targets", "total"]
... )
True
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lcc.engine.choices import (
    CLUSTER_METHODS,
    KNN_MODES,
    METRICS,
    TARGET_MODES,
    WEIGHTS,
    ClusterMethod,
    KnnMode,
    Metric,
    TargetMode,
    Weights,
)
from lcc.engine.cluster import check_resolution, cluster_graph
from lcc.engine.device import empty_rows, iterate_rows, place_rows, resolve_device
from lcc.engine.graph import knn_graph
from lcc.engine.knn import BACKENDS, check_rows, knn
from lcc.engine.loss import LCCLoss
from lcc.engine.match import Matching, as_class_subset, match_clusters
from lcc.engine.orthogonal import CORRECTIONS, OrthogonalStats, check_tangent, orthogonal_targets
from lcc.engine.projection import Projection, fit_pca
from lcc.engine.targets import Targets, approximate_targets, exact_targets
from lcc.errors import (
    LCCInputError,
    as_label_vector,
    as_latent_matrix,
    check_choice,
    check_finite,
    check_k,
)

__all__ = [
    "BACKENDS",
    "CLUSTER_METHODS",
    "KNN_MODES",
    "METRICS",
    "STAGES",
    "TARGET_MODES",
    "WEIGHTS",
    "Refresh",
    "RefreshConfig",
    "refresh",
]


#: Stage names reported to a ``progress`` callback, in order ("pca" only when PCA is on).
STAGES: tuple[str, ...] = ("check", "pca", "knn", "graph", "cluster", "match", "targets")
#: Latent entries converted to float32 at once by the NaN/inf check.
CHECK_CHUNK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class RefreshConfig:
    """Settings of one refresh; :meth:`validated` checks them against the data size.

    >>> RefreshConfig(k=10, method="louvain").k
    10
    """

    k: int = 5
    method: ClusterMethod = "leiden"
    targets: TargetMode = "exact"
    knn: KnnMode = "exact"
    metric: Metric = "l2"
    pca: int | None = None
    weights: Weights = "unweighted"
    resolution: float = 1.0
    seed: int = 0
    bandwidth: str | float = "median"
    correction: str = "plain"
    tangent_k: int = 50
    tangent_dim: int | float = 8

    def validated(self, n_samples: int, dim: int) -> RefreshConfig:
        """Return a normalised copy, or raise :class:`LCCInputError` naming the bad setting.

        >>> RefreshConfig(pca=8).validated(n_samples=100, dim=8)
        Traceback (most recent call last):
        ...
        lcc.errors.LCCInputError: pca=8 must be smaller than min(N, D) = 8; choose pca <= 7
        """
        if self.method == "peer-pressure" and check_resolution(self.resolution) != 1.0:
            raise LCCInputError(
                f"resolution={self.resolution} applies to leiden and louvain only; "
                "peer-pressure has no resolution, leave it at 1.0"
            )
        correction = check_choice(self.correction, CORRECTIONS, name="correction")
        tangent_dim = self.tangent_dim
        if correction == "orthogonal":
            pca = _check_pca(self.pca, n_samples, dim)
            space = dim if pca is None else pca
            tangent_dim = check_tangent(self.tangent_k, self.tangent_dim, space)
        return RefreshConfig(
            k=check_k(self.k, n_samples),
            method=check_choice(self.method, CLUSTER_METHODS, name="method"),  # type: ignore[arg-type]
            targets=check_choice(self.targets, TARGET_MODES, name="targets"),  # type: ignore[arg-type]
            knn=check_choice(self.knn, KNN_MODES, name="knn"),  # type: ignore[arg-type]
            metric=check_choice(self.metric, METRICS, name="metric"),  # type: ignore[arg-type]
            pca=_check_pca(self.pca, n_samples, dim),
            weights=check_choice(self.weights, WEIGHTS, name="weights"),  # type: ignore[arg-type]
            resolution=check_resolution(self.resolution),
            seed=_check_seed(self.seed),
            bandwidth=_check_bandwidth(self.bandwidth, self.weights),
            correction=correction,
            tangent_k=int(self.tangent_k),
            tangent_dim=tangent_dim,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the settings (JSON-ready)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Refresh:
    """Result of :func:`refresh`: clusters, matching, targets and per-stage timings.

    ``d`` is the dimension the targets live in (the PCA dimension when ``config.pca`` is set;
    then apply ``projection`` to latents before comparing them with targets, as
    :meth:`loss` does). ``seconds`` has keys ``"check"`` (the chunked NaN/inf scan),
    ``"knn"`` (PCA, k-NN search and graph construction together), ``"cluster"``, ``"match"``,
    ``"targets"``, ``"total"``, and the parts of ``"knn"``: ``"pca"`` and ``"graph"``; with
    ``config.correction="orthogonal"`` also ``"orthogonal"`` (the projection of the targets,
    after ``"targets"``), and ``orthogonal`` holds what it did (else None).
    """

    config: RefreshConfig
    clusters: np.ndarray
    matching: Matching
    targets: Targets
    projection: Projection | None
    modularity: float
    seconds: dict[str, float]
    n: int
    d: int
    input_dim: int = field(default=0)
    orthogonal: OrthogonalStats | None = None

    @property
    def cluster_class(self) -> np.ndarray:
        """(K,) int64: the class matched to each cluster."""
        return self.matching.cluster_class

    @property
    def misclustered(self) -> np.ndarray:
        """(N,) bool: samples whose cluster is matched to another class."""
        return self.matching.misclustered

    @property
    def correctible(self) -> np.ndarray:
        """(N,) bool: samples that have a correction target."""
        return self.targets.correctible

    @property
    def n_clusters(self) -> int:
        """Number of clusters K."""
        return int(self.matching.cluster_class.shape[0])

    @property
    def misclustered_fraction(self) -> float:
        """Fraction of samples that are misclustered."""
        return float(np.count_nonzero(self.misclustered)) / self.n

    @property
    def correctible_fraction(self) -> float:
        """Fraction of samples that are correctible (have a target)."""
        return self.targets.n_correctible / self.n

    def summary(self) -> dict[str, Any]:
        """JSON-ready statistics of this refresh (plain Python types only)."""
        return {
            "n": int(self.n),
            "d": int(self.d),
            "input_dim": int(self.input_dim or self.d),
            "k": int(self.config.k),
            "n_clusters": self.n_clusters,
            "misclustered": int(np.count_nonzero(self.misclustered)),
            "correctible": int(self.targets.n_correctible),
            "misclustered_fraction": self.misclustered_fraction,
            "correctible_fraction": self.correctible_fraction,
            "modularity": float(self.modularity),
            "seconds": {key: float(value) for key, value in self.seconds.items()},
            **self.config.to_dict(),
            **(self.orthogonal.to_dict() if self.orthogonal is not None else {}),
        }

    def loss(self, *, squared: bool = False) -> LCCLoss:
        """An :class:`lcc.engine.loss.LCCLoss` holding these targets (and the PCA projection)."""
        return LCCLoss(self.targets, projection=self.projection, squared=squared)


def refresh(
    z: object,
    y: object,
    config: RefreshConfig | None = None,
    *,
    classes: Sequence[int] | np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
    stage_done: Callable[[str, float], None] | None = None,
    device: str | None = None,
    backend: str = "auto",
    name: str = "z",
    **overrides: Any,
) -> Refresh:
    """Cluster latents ``z`` (N, ...) and build correction targets for labels ``y`` (N,).

    ``config`` defaults to :class:`RefreshConfig`; keyword ``overrides`` replace its fields
    (``refresh(z, y, k=10, method="louvain")``). ``classes`` restricts correctible samples to
    those classes. ``progress``, if given, is called with each stage name of :data:`STAGES`
    as the stage starts, and ``stage_done`` with the stage name and its seconds as it ends.
    Raises :class:`LCCInputError` before any work on bad input; ``name`` names the latents in
    its messages (e.g. ``"latents of layer 'fc'"``).

    ``device`` says where the k-NN search, PCA and targets run (graph clustering always runs on
    the CPU): ``None``/``"auto"`` where the latents are (a CUDA tensor: on its GPU; else the
    CPU path), ``"cpu"``, or ``"cuda"``/``"cuda:N"`` (see :mod:`lcc.engine.device`: latents
    too large for the GPU are streamed from pinned host memory, with one line on stderr).
    There the search is exact whatever ``config.knn`` says: faiss's GPU brute force when a
    faiss GPU build is installed, else the chunked torch search. ``backend``:
    ``"auto"`` (faiss on the CPU path when installed), ``"faiss"``, or ``"torch"``, which runs
    the GPU path's torch code on the CPU too. The latents are checked for NaN/inf once, here
    (stage ``"check"``); the stages after it do not scan them again.
    """
    start = time.perf_counter()
    check_choice(backend, BACKENDS, name="backend")
    target = resolve_device(device, z, backend=backend)
    z, y, config, classes = _validate(z, y, config, classes, overrides, keep=target is not None)
    seconds: dict[str, float] = {}

    with _timed(seconds, "check", progress, stage_done):
        if target is not None:
            z = place_rows(z, target).rows
        check_finite(z, name=name, chunk_entries=CHECK_CHUNK_ENTRIES)
    with _timed(seconds, "pca", progress, stage_done, shown=config.pca is not None):
        projection, z = _project(z, config, target)
    with _timed(seconds, "knn", progress, stage_done):
        neighbors = knn(
            z,
            config.k,
            mode=config.knn,
            metric=config.metric,
            seed=config.seed,
            backend=backend,
            device=target,
            checked=True,
        )
    with _timed(seconds, "graph", progress, stage_done):
        adjacency = knn_graph(
            neighbors,
            weights=config.weights,
            bandwidth=None if config.bandwidth == "median" else float(config.bandwidth),
        )
        del neighbors
    with _timed(seconds, "cluster", progress, stage_done):
        clustering = cluster_graph(
            adjacency, config.method, resolution=config.resolution, seed=config.seed
        )
        del adjacency
    with _timed(seconds, "match", progress, stage_done):
        matching = match_clusters(clustering.labels, y)
    with _timed(seconds, "targets", progress, stage_done):
        targets = _targets(z, y, clustering.labels, matching, config, classes, target)
    orthogonal = None
    if config.correction == "orthogonal":
        with _timed(seconds, "orthogonal", progress, stage_done):
            corrected = orthogonal_targets(
                z,
                clustering.labels,
                targets,
                tangent_k=config.tangent_k,
                tangent_dim=config.tangent_dim,
                metric=config.metric,
                device=target,
                checked=True,
            )
            targets, orthogonal = corrected.targets, corrected.stats

    seconds["knn"] += seconds["pca"] + seconds["graph"]
    seconds["total"] = time.perf_counter() - start
    return Refresh(
        config=config,
        clusters=np.asarray(clustering.labels, dtype=np.int64),
        matching=matching,
        targets=targets,
        projection=projection,
        modularity=float(clustering.modularity),
        seconds=seconds,
        n=int(z.shape[0]),
        d=int(z.shape[1]),
        input_dim=int(projection.components.shape[0]) if projection is not None else z.shape[1],
        orthogonal=orthogonal,
    )


def _validate(
    z: object,
    y: object,
    config: RefreshConfig | None,
    classes: object,
    overrides: dict[str, Any],
    *,
    keep: bool = False,
) -> tuple[Any, np.ndarray, RefreshConfig, np.ndarray | None]:
    matrix = _latent_rows(z, keep=keep)
    labels = as_label_vector(y, matrix.shape[0])
    if config is None:
        config = RefreshConfig()
    elif not isinstance(config, RefreshConfig):
        raise LCCInputError(
            f"config must be a RefreshConfig, got {type(config).__name__}; "
            "pass RefreshConfig(...) or keyword options"
        )
    names = {f.name for f in dataclasses.fields(RefreshConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise LCCInputError(
            f"unknown refresh option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )
    config = dataclasses.replace(config, **overrides).validated(*matrix.shape)
    return matrix, labels, config, as_class_subset(classes)


def _latent_rows(z: object, *, keep: bool = False) -> Any:
    """Latents as an ``(N, D)`` float array; a float NumPy array (or memory map) keeps its dtype
    and is not copied, nor (``keep``: for the device path) is a float tensor. Their values are
    checked later, in chunks, by :func:`lcc.errors.check_finite`."""
    if keep and isinstance(z, torch.Tensor) and z.is_floating_point() and z.ndim >= 2:
        z = z.detach()
    elif not (isinstance(z, np.ndarray) and z.dtype.kind == "f" and z.ndim >= 2):
        return as_latent_matrix(z, checked=True)
    check_rows(z)
    return z.reshape(z.shape[0], -1)


def _project(
    z: Any, config: RefreshConfig, device: torch.device | None
) -> tuple[Projection | None, Any]:
    """PCA (when set) of checked latents: float32 NumPy rows on the CPU path, else a tensor on
    ``device`` (or pinned, when it does not fit), projected chunk by chunk."""
    if config.pca is None:
        return None, z if device is not None else np.ascontiguousarray(z, dtype=np.float32)
    projection = fit_pca(
        z, config.pca, seed=config.seed, device=device, backend="auto", checked=True
    )
    if device is None:
        return projection, np.ascontiguousarray(projection.apply(z), dtype=np.float32)
    out = empty_rows(z.shape[0], config.pca, device, what="projected latents")
    with torch.no_grad():
        for start, part in iterate_rows(z, CHECK_CHUNK_ENTRIES):
            rows = projection.apply(part.to(device, torch.float32))
            out[start : start + rows.shape[0]] = rows.to(out.device)
    return projection, out


def _targets(
    z: np.ndarray,
    y: np.ndarray,
    clusters: np.ndarray,
    matching: Matching,
    config: RefreshConfig,
    classes: np.ndarray | None,
    device: torch.device | None,
) -> Targets:
    common: dict[str, Any] = {"classes": classes, "device": device, "checked": True}
    common["backend"] = "auto" if device is None else "torch"
    if config.targets == "exact":
        cc = matching.correctly_clustered
        return exact_targets(z, y, cc, config.k, metric=config.metric, **common)
    return approximate_targets(z, y, clusters, matching, seed=config.seed, **common)


@contextmanager
def _timed(
    seconds: dict[str, float],
    stage: str,
    notify: Callable[[str], None] | None,
    done: Callable[[str, float], None] | None,
    *,
    shown: bool = True,
) -> Iterator[None]:
    if shown and notify is not None:
        notify(stage)
    start = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - start
    if shown and done is not None:
        done(stage, seconds[stage])


def _check_pca(pca: object, n_samples: int, dim: int) -> int | None:
    if pca is None:
        return None
    if isinstance(pca, bool) or not isinstance(pca, (int, np.integer)):
        raise LCCInputError(f"pca must be an integer dimension or None, got {pca!r}")
    if pca < 1:
        raise LCCInputError(f"pca={pca} must be at least 1 (or None to skip PCA)")
    limit = min(n_samples, dim)
    if pca >= limit:
        raise LCCInputError(
            f"pca={pca} must be smaller than min(N, D) = {limit}; "
            + (f"choose pca <= {limit - 1}" if limit > 1 else "drop the PCA option")
        )
    return int(pca)


def _check_bandwidth(bandwidth: object, weights: str) -> str | float:
    """``"median"`` or a positive number; a number only with RBF weights."""
    if isinstance(bandwidth, str):
        if bandwidth.strip() == "median":
            return "median"
        with suppress(ValueError):
            bandwidth = float(bandwidth)
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.number)):
        raise LCCInputError(
            f"bandwidth must be 'median' or a positive number (1: the paper's unscaled "
            f"exp(-||zi - zj||^2)), got {bandwidth!r}"
        )
    value = float(bandwidth)
    if not (math.isfinite(value) and value > 0):
        raise LCCInputError(f"bandwidth={bandwidth} must be a positive finite number or 'median'")
    if weights != "rbf":
        raise LCCInputError(
            f"bandwidth={bandwidth} applies to weights=rbf only; add weights=rbf or drop it"
        )
    return value


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LCCInputError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
