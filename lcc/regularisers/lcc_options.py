"""LCC's options, declared once: the ``lcc`` regulariser, ``lcc train``'s LCC flags and config
keys, and ``lcc cluster``'s refresh flags are all generated from :class:`LCCOptions`.

This module imports neither torch nor the engine's algorithms, so the parsers built from it
start fast.

>>> LCCOptions(layers=["fc"], k="7", squared="true").k
7
>>> LCCOptions(layers=["fc"], method="kmeans")
Traceback (most recent call last):
...
lcc.errors.LCCInputError: method='kmeans' is not one of 'leiden', 'louvain', 'peer-pressure'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lcc.engine.choices import (
    CLASS_POLICIES,
    CLUSTER_METHODS,
    CORRECTIONS,
    KNN_MODES,
    METRICS,
    REFRESH_DEVICES,
    TARGET_MODES,
    WEIGHTS,
)
from lcc.errors import LCCInputError, check_integer, check_number
from lcc.regularisers.options import RegulariserOptions, check_positive, option

if TYPE_CHECKING:
    from lcc.engine.refresh import RefreshConfig

__all__ = ["REFRESH_OPTIONS", "LCCOptions"]

#: the options that are settings of one refresh (:class:`lcc.engine.refresh.RefreshConfig`)
REFRESH_OPTIONS: tuple[str, ...] = (
    "k",
    "method",
    "targets",
    "knn",
    "metric",
    "pca",
    "weights",
    "resolution",
    "seed",
    "bandwidth",
    "correction",
    "tangent_k",
    "tangent_dim",
)


@dataclass
class LCCOptions(RegulariserOptions):
    """Latent Cluster Correction: pull each misclustered latent towards the mean of its k nearest
    correctly clustered neighbours of its class (targets refreshed from the training set).

    Its hyperparameters (defaults from the paper where it has them; the first paragraph above
    is the summary ``lcc train --help-reg`` prints). ``k``: neighbours for the graph and the
    targets; ``interval``: refresh every that many epochs after ``warmup``;
    ``method``/``targets``/``knn``/``metric``/``pca``/``weights``/``resolution``/``seed``:
    :class:`lcc.engine.refresh.RefreshConfig`; ``class_policy``/``policy_size``: which classes
    are corrected (:func:`lcc.engine.selection.select_classes`); ``squared``: the poster's
    squared loss; ``bandwidth``: the RBF kernel's scale; ``correction``/``tangent_k``/
    ``tangent_dim``: orthogonal correction (paper sec. V.C, :mod:`lcc.engine.orthogonal`).

    ``knn`` defaults to ``"approximate"`` (unlike :class:`lcc.engine.refresh.RefreshConfig`): on
    the demo's 10,000 x 128 latents it halves the refresh (0.22 s -> 0.11 s), its clusters are
    about as close to the exact graph's (ARI 0.76-0.85) as two Leiden seeds on the exact graph
    are to each other (0.81-0.82); below 2,000 samples the search is exact anyway.
    """

    weight: float = option(0.01, "weight w of the LCC loss in CE + w * LCC")
    warmup: int = option(1, "epochs without correction at the start")
    interval: int = option(1, "refresh the targets every that many epochs after warmup")
    k: int = option(5, "neighbours per sample in the k-NN graph and the targets")
    method: str = option("leiden", "graph clustering method", choices=CLUSTER_METHODS)
    targets: str = option(
        "exact",
        "mean of k nearest correctly clustered same-class neighbours (exact, eq. 7) or a random "
        "correctly clustered representative of a matched cluster (approximate, eq. 13-14)",
        choices=TARGET_MODES,
    )
    knn: str = option(
        "approximate",
        "k-NN search of the graph: approximate (k-means cells or faiss IVF, recall >= 0.97 "
        "measured on a sample; exact below 2,000 samples) or exact (faiss flat)",
        choices=KNN_MODES,
    )
    metric: str = option("l2", "latent distance of the k-NN graph", choices=METRICS)
    pca: int | None = option(
        None, "project latents to this many PCA dimensions first", shown="no PCA"
    )
    weights: str = option(
        "unweighted",
        "edge weights of the k-NN graph; departs from the LCC paper, whose graph is rbf-weighted "
        "(rbf, see bandwidth): unweighted is what the README's LCC tables ran",
        choices=WEIGHTS,
    )
    bandwidth: str | float = option(
        "median",
        "scale s of the rbf weights exp(-||zi - zj||^2 / s^2): 'median' (the median k-NN "
        "distance; departs from the paper, whose unscaled exp(-||zi - zj||^2) underflows to 0 "
        "in high dimension) or a number (1: the paper's kernel)",
        kind="mixed",
    )
    resolution: float = option(1.0, "modularity resolution of Leiden/Louvain")
    class_policy: str = option(
        "all", "which classes are corrected (confusion graph)", choices=CLASS_POLICIES
    )
    policy_size: int | None = option(
        None, "N for the top-pairs / heaviest-set class policies", shown="none"
    )
    squared: bool = option(
        False, "use the poster's squared loss ||z - T(z)||^2 / sqrt(d) instead of eq. 8's norm"
    )
    correction: str = option(
        "plain",
        "pull of a misclustered latent: towards its target (plain, eq. 8) or only its part "
        "orthogonal to the tangent space of its own cluster (orthogonal, paper sec. V.C)",
        choices=CORRECTIONS,
    )
    tangent_k: int = option(
        50, "orthogonal: neighbours within the cluster whose PCA estimates the tangent space"
    )
    tangent_dim: int | float = option(
        8,
        "orthogonal: tangent dimension, an integer < tangent_k, or a fraction in (0, 1): the "
        "fewest principal components explaining that share of the neighbours' variance",
        kind="mixed",
    )
    refresh_device: str = option(
        "auto",
        "where a refresh's k-NN search, PCA and targets run: auto (the training device), cpu, "
        "or cuda (exact chunked search on the GPU; graph clustering stays on the CPU)",
        choices=REFRESH_DEVICES,
    )
    seed: int = option(0, "seed of the clustering")

    def check(self) -> None:
        super().check()
        if "output" in self.layers:
            raise LCCInputError("LCC corrects hidden layers; 'output' (the logits) is not one")
        self.interval = check_integer(self.interval, "interval", 1)
        self.k = check_integer(self.k, "k", 1)
        if self.pca is not None:
            self.pca = check_integer(self.pca, "pca", 1)
        if self.class_policy in ("all", "largest-component"):
            if self.policy_size is not None:
                raise LCCInputError(
                    f"policy_size is only used by the 'top-pairs' and 'heaviest-set' class "
                    f"policies; drop it for class_policy={self.class_policy!r}"
                )
        else:
            low = 1 if self.class_policy == "top-pairs" else 2
            if self.policy_size is None:
                raise LCCInputError(f"class_policy={self.class_policy!r} needs a policy_size")
            self.policy_size = check_integer(self.policy_size, "policy_size", low)
        self.seed = check_integer(self.seed, "seed", 0)
        self.resolution = check_positive(self.resolution, "resolution")
        self.tangent_k = check_integer(self.tangent_k, "tangent_k", 2)
        from lcc.engine.orthogonal import check_tangent  # torch: not needed to build parsers

        self.tangent_dim = check_tangent(self.tangent_k, self.tangent_dim)
        if self.bandwidth != "median":
            bandwidth = check_number(self.bandwidth, "bandwidth")
            if not bandwidth > 0:
                raise LCCInputError(
                    f"bandwidth must be 'median' or a positive number, got {self.bandwidth!r}"
                )
            if self.weights != "rbf":
                raise LCCInputError(
                    f"bandwidth={self.bandwidth} applies to weights=rbf only; add weights=rbf "
                    "or drop it"
                )
            self.bandwidth = bandwidth

    def refresh_config(self) -> RefreshConfig:
        """The :class:`lcc.engine.refresh.RefreshConfig` these settings ask for."""
        from lcc.engine.refresh import RefreshConfig

        return RefreshConfig(**{name: getattr(self, name) for name in REFRESH_OPTIONS})

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-ready values (``layers`` as a list)."""
        values = dataclasses.asdict(self)
        values["layers"] = list(self.layers)
        return values
