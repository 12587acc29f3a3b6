"""Latent Cluster Correction as a regulariser: refresh targets from the training set, pull
misclustered latents towards them.

At the start of every post-warmup epoch that fits the interval, :meth:`LCC.compute` runs
:func:`lcc.engine.refresh.refresh` on each layer's latents of the whole (labelled) training set
(k-NN graph, clustering, cluster-class matching, targets); :meth:`LCC.install` hands the targets
to one :class:`lcc.engine.loss.LCCLoss` per layer; per batch the term is the mean over layers of
that loss (eq. 8; the squared variant with ``squared``). Under data parallelism (an initialised
``torch.distributed`` group of several processes) the mean is over the correctible samples of
the global batch (:func:`count_over_processes`), so DDP trains as one process would.

>>> import numpy as np, torch
>>> from lcc.regularisers.base import Batch, TrainingLatents
>>> from lcc.synthetic import gaussian_mixture
>>> z, y, _ = gaussian_mixture(n_samples=120, dim=8, n_classes=3, seed=0)
>>> reg = LCC(layers=["fc"], k=3, warmup=0)
>>> reg.needs_training_latents(0)
True
>>> state = reg.compute(TrainingLatents({"fc": z}, y, None, "fresh", 0.0), epoch=0)
>>> reg.install(state)
>>> batch = Batch(latents={"fc": torch.from_numpy(z)}, y=torch.from_numpy(y),
...               indices=torch.arange(120), logits=None)
>>> bool(reg(batch) >= 0), reg.needs_training_latents(0)
(True, False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lcc.engine.loss import LCCLoss
from lcc.engine.refresh import Refresh, refresh
from lcc.engine.selection import confusion_graph, select_classes
from lcc.engine.targets import Targets
from lcc.errors import LCCInputError, as_label_vector
from lcc.regularisers.base import (
    Batch,
    Regulariser,
    TrainingLatents,
    zero_term,
)
from lcc.regularisers.lcc_options import LCCOptions

if TYPE_CHECKING:
    from lcc.engine.projection import Projection

__all__ = [
    "LCC",
    "LCCOptions",
    "LayerState",
    "RefreshState",
    "check_class_sizes",
    "count_over_processes",
]


def _processes() -> int:
    """The number of processes of the initialised ``torch.distributed`` group (1 without)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def count_over_processes(count: Tensor) -> Tensor:
    """The batch's count of correctible samples summed over the processes (at least 1),
    divided by their number: each process's mean then divides by it, and the gradients DDP
    averages are those of the mean over the global batch. Every process calls it once per
    layer and batch (a collective)."""
    total = count.detach().clone()
    torch.distributed.all_reduce(total)
    return total.clamp(min=1) / torch.distributed.get_world_size()


@dataclass
class LayerState:
    """One layer's refresh result: its targets (numpy only), projection, clusters and stats."""

    target_indices: np.ndarray  # (M,) int64
    target_vectors: np.ndarray  # (M, D) float32
    n_samples: int
    projection_mean: np.ndarray | None
    projection_components: np.ndarray | None
    clusters: np.ndarray  # (N,) int64, -1 for unlabelled samples
    stats: dict[str, Any]

    def to_targets(self) -> Targets:
        return Targets(
            indices=self.target_indices, vectors=self.target_vectors, n_samples=self.n_samples
        )

    def to_projection(self) -> Projection | None:
        if self.projection_mean is None or self.projection_components is None:
            return None
        from lcc.engine.projection import Projection

        return Projection(mean=self.projection_mean, components=self.projection_components)


@dataclass
class RefreshState:
    """Everything one refresh produced; picklable (numpy arrays and plain values only)."""

    epoch: int | None
    layers: dict[str, LayerState]
    classes: np.ndarray | None = None

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-layer statistics of this refresh."""
        return {name: layer.stats for name, layer in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        """Nested dict of plain values and numpy arrays (inverse: :meth:`from_dict`)."""
        fields = [f.name for f in dataclasses.fields(LayerState)]
        return {
            "epoch": self.epoch,
            "classes": self.classes,
            "layers": {
                name: {key: getattr(layer, key) for key in fields}
                for name, layer in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RefreshState:
        layers = {name: LayerState(**layer) for name, layer in values["layers"].items()}
        return cls(epoch=values["epoch"], layers=layers, classes=values["classes"])


def check_class_sizes(y: np.ndarray, k: int) -> None:
    """Raise :class:`LCCInputError` when ``k`` exceeds the number of samples of some class.

    Unlabelled samples (``-1``) are ignored.

    >>> check_class_sizes(np.array([0, 0, 0, 1, 1]), k=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: k=3 is larger than class 1, which has only 2 training samples; ...
    """
    y = np.asarray(y)
    counts = np.bincount(y[y >= 0]) if y.size else np.zeros(0, dtype=np.int64)
    present = np.flatnonzero(counts)
    if present.size == 0:
        raise LCCInputError("the training set is empty; LCC needs labelled samples")
    smallest = int(present[np.argmin(counts[present])])
    if k > counts[smallest]:
        raise LCCInputError(
            f"k={k} is larger than class {smallest}, which has only {counts[smallest]} training "
            f"samples; choose k <= {counts[smallest]}"
        )


def to_torch(value: Any) -> Any:
    """numpy arrays (nested in dicts) -> tensors, which ``torch.load(weights_only=True)`` reads."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {key: to_torch(item) for key, item in value.items()}
    return value


def to_numpy(value: Any) -> Any:
    """Inverse of :func:`to_torch`."""
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {key: to_numpy(item) for key, item in value.items()}
    return value


def _mean_loss(losses: np.ndarray | None, mask: np.ndarray) -> float | None:
    """Mean per-sample cross-entropy over ``mask`` (NaN entries unknown), None when none."""
    if losses is None:
        return None
    mask = mask & np.isfinite(losses)
    return float(np.mean(losses[mask])) if mask.any() else None


def _accuracy(predictions: np.ndarray | None, y: np.ndarray, mask: np.ndarray) -> float:
    if predictions is None:
        return float("nan")
    mask = mask & (predictions >= 0)
    return float(np.mean(predictions[mask] == y[mask])) if mask.any() else float("nan")


class LCC(Regulariser):
    """The ``lcc`` regulariser, Latent Cluster Correction (summary and options:
    :class:`LCCOptions`): refreshes its targets from the training set's latents."""

    name = "lcc"
    Options = LCCOptions

    def __init__(self, options: LCCOptions | None = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        self.losses: dict[str, LCCLoss] = {}  # per layer; not submodules (state via extra state)
        self.state: RefreshState | None = None
        self.history: list[dict[str, dict[str, Any]]] = []
        self.last_refresh_epoch: int | None = None

    @property
    def config(self) -> LCCOptions:
        return self.options  # type: ignore[return-value]

    def _loss(self, name: str) -> LCCLoss:
        if name not in self.losses:
            self.losses[name] = LCCLoss(squared=self.config.squared)
        return self.losses[name]

    # --- schedule ----------------------------------------------------------------------------

    def is_refresh_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) starts with a refresh: after warmup, every ``interval``.

        >>> reg = LCC(layers=["fc"], warmup=2, interval=3)
        >>> [e for e in range(10) if reg.is_refresh_epoch(e)]
        [2, 5, 8]
        """
        warmup, interval = self.config.warmup, self.config.interval
        return epoch >= warmup and (epoch - warmup) % interval == 0

    def needs_training_latents(self, epoch: int) -> bool:
        return self.is_refresh_epoch(epoch) and self.last_refresh_epoch != epoch

    def weight_at(self, epoch: int) -> float:
        """Always ``weight``: the term is zero until a refresh has installed targets."""
        return self.weight

    def check_labels(self, y: np.ndarray) -> None:
        """``k`` must not exceed any class's number of labelled samples."""
        if y.size and (y >= 0).any():
            check_class_sizes(y, self.config.k)

    # --- refresh -----------------------------------------------------------------------------

    def compute(self, latents: TrainingLatents, epoch: int | None = None) -> RefreshState:
        """Run :func:`lcc.engine.refresh.refresh` on every layer (labelled rows, class policy)."""
        n = len(latents.y)
        y_all = np.asarray(latents.y, dtype=np.int64).reshape(-1)
        rows = np.flatnonzero(y_all >= 0)
        labelled_only = rows.size < n
        y = as_label_vector(y_all[rows], rows.size)
        check_class_sizes(y, self.config.k)
        predictions = latents.predictions
        sub_predictions = None if predictions is None else np.asarray(predictions)[rows]
        classes = self._select_classes(y, sub_predictions)
        layers: dict[str, LayerState] = {}
        auto = self.config.refresh_device == "auto"
        device = (latents.device or "cpu") if auto else self.config.refresh_device
        for name in self.layers:
            if name not in latents.latents:
                raise LCCInputError(f"no latents were collected for layer {name!r}")
            z = latents.latents[name]  # checked once, by the refresh (memory maps stay on disk)
            if z.shape[0] != n:
                raise LCCInputError(
                    f"layer {name!r} has {z.shape[0]} latent rows but there are {n} labels"
                )
            if labelled_only:
                z = z[rows]
            result = refresh(
                z,
                y,
                self.config.refresh_config(),
                classes=classes,
                name=f"latents of layer {name!r}",
                device=device,
            )
            subset = rows if labelled_only else None
            layers[name] = self._layer_state(
                name, result, latents, y, sub_predictions, subset, n, epoch, classes
            )
        return RefreshState(epoch=epoch, layers=layers, classes=classes)

    def install(self, state: RefreshState) -> None:
        """Put a refresh's targets (and projections) into the per-layer losses."""
        missing = set(self.layers) - set(state.layers)
        if missing:
            raise LCCInputError(f"refresh state has no targets for layer(s) {sorted(missing)}")
        for name in self.layers:
            layer = state.layers[name]
            self._loss(name).set_targets(layer.to_targets(), layer.to_projection())
        self.state = state
        self.last_refresh_epoch = state.epoch
        self.history.append(state.stats)

    # --- per batch ---------------------------------------------------------------------------

    def forward(self, batch: Batch) -> Tensor:
        """Mean over layers of the LCC loss of the batch (zero before the first refresh)."""
        if self.state is None:
            return zero_term(batch)
        index = torch.as_tensor(batch.indices, dtype=torch.long)
        reduce = count_over_processes if _processes() > 1 else None
        terms = [
            self._loss(name)(batch.layer(name), index, reduce_count=reduce) for name in self.layers
        ]
        return torch.stack(terms).mean()

    def epoch_stats(self) -> dict[str, Any]:
        if self.state is None or self.state.epoch is None:
            return {}
        return {"last_refresh_epoch": self.state.epoch}

    # --- resume ------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """The installed refresh (targets, projections, clusters, stats) and the history."""
        return {
            "version": 2,
            "config": self.config.to_dict(),
            "last_refresh_epoch": self.last_refresh_epoch,
            "history": self.history,
            "state": None if self.state is None else to_torch(self.state.to_dict()),
        }

    def set_extra_state(self, state: Any) -> None:
        saved_layers = tuple(state["config"]["layers"])
        if saved_layers != self.layers:
            raise LCCInputError(
                f"the saved LCC state is for layers {list(saved_layers)}, not {list(self.layers)}"
            )
        saved = state["state"]
        self.history = []
        if saved is None:
            self.state = None
            for loss in self.losses.values():
                loss.set_targets(None)
        else:
            self.install(RefreshState.from_dict(to_numpy(saved)))
        self.history = list(state["history"])
        self.last_refresh_epoch = state["last_refresh_epoch"]

    # --- internals ---------------------------------------------------------------------------

    def _select_classes(self, y: np.ndarray, predictions: np.ndarray | None) -> np.ndarray | None:
        policy = self.config.class_policy
        if policy == "all":
            return None
        known = np.zeros(len(y), dtype=bool) if predictions is None else predictions >= 0
        if not known.any():
            raise LCCInputError(
                f"class_policy={policy!r} needs predictions: call observe(indices, logits, y) "
                "after each training forward"
            )
        assert predictions is not None
        n_classes = int(max(y.max(), predictions[known].max())) + 1
        graph = confusion_graph(y[known], predictions[known], n_classes)
        return select_classes(graph, policy, self.config.policy_size)

    def _layer_state(
        self,
        name: str,
        result: Refresh,
        latents: TrainingLatents,
        y: np.ndarray,
        predictions: np.ndarray | None,
        rows: np.ndarray | None,
        n: int,
        epoch: int | None,
        classes: np.ndarray | None,
    ) -> LayerState:
        cc = np.asarray(result.matching.correctly_clustered, dtype=bool)
        losses = None if latents.losses is None else np.asarray(latents.losses, dtype=np.float64)
        if losses is not None and rows is not None:
            losses = losses[rows]
        stats = dict(result.summary())
        stats.update(
            layer=name,
            epoch=epoch,
            source=latents.source,
            stale_samples=latents.stale,
            n_clusters=int(result.n_clusters),
            misclustered_fraction=float(result.misclustered_fraction),
            correctible_fraction=float(result.correctible_fraction),
            n_correctible=int(np.sum(result.correctible)),
            modularity=float(result.modularity),
            seconds={**result.seconds, "collect": latents.seconds},
            accuracy=_accuracy(predictions, y, np.ones(len(y), dtype=bool)),
            accuracy_cc=_accuracy(predictions, y, cc),
            accuracy_mc=_accuracy(predictions, y, ~cc),
            # the paper's sec. IV.C: ce(CC) < ce < ce(MC), on the pass the refresh read
            cross_entropy=_mean_loss(losses, np.ones(len(y), dtype=bool)),
            cross_entropy_cc=_mean_loss(losses, cc),
            cross_entropy_mc=_mean_loss(losses, ~cc),
            train_accuracy=latents.train_accuracy,
            refresh_bn=latents.refresh_bn,
            classes=None if classes is None else classes.tolist(),
        )
        target_indices = np.asarray(result.targets.indices, dtype=np.int64)
        clusters = np.asarray(result.clusters, dtype=np.int64)
        if rows is not None:  # refresh ran on the labelled rows: back to dataset indices
            target_indices = rows[target_indices]
            full = np.full(n, -1, dtype=np.int64)
            full[rows] = clusters
            clusters = full
            stats["labelled_samples"] = int(rows.size)
        projection = result.projection
        return LayerState(
            target_indices=target_indices,
            target_vectors=np.asarray(result.targets.vectors, dtype=np.float32),
            n_samples=n,
            projection_mean=None if projection is None else np.asarray(projection.mean),
            projection_components=None if projection is None else np.asarray(projection.components),
            clusters=clusters,
            stats=stats,
        )
