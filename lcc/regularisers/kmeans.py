"""Latent k-means: learnable centroids per layer pull labelled and unlabelled latents together.

The semi-supervised centroid loss of Karakulak et al. (sec. 2.1-2.2) as a regulariser. For each
layer ``i`` it holds ``J_i`` centroids ``C_ij`` (parameters, trained by the model's optimiser);
per sample ``l_c(x) = sum_i min_j ||f_i(x) - C_ij||^2`` (:mod:`lcc.engine.centroids`).

The term of a batch is ``mean_{labelled} l_c + mean_{unlabelled} l_c`` (an empty group adds 0),
so the trainer's ``CE (mean over the labelled samples) + weight_at(epoch) * term`` equals the
paper's ``(1/N) sum_L (CE + beta l_c) + (1/M) sum_U beta l_c``. ``weight`` is the paper's beta.

Schedule: beta is 0 during the first ``warmup`` epochs, then rises over ``ramp`` epochs
(``ramp_shape``: ``linear``, or ``sigmoid`` = ``exp(-5 (1 - t)^2)``, the Gaussian ramp-up of
Laine & Aila; the paper says only "increased gradually") and stays at ``weight``.
At the start of each of the first ``reinit`` epochs the centroids are drawn again from the
latents of real training samples, spread evenly over the classes (labelled samples decide the
spread). Later, a centroid that won no sample during an epoch is re-seeded at the start of the
next one from a small reservoir of recent latents; ``epoch_stats`` counts both.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> reg = KMeansCentroids(layers=["1"], weight=0.5, warmup=1, ramp=1)
>>> reg.bind(model, num_classes=2, sample=torch.randn(8, 3))
>>> [tuple(c.shape) for c in reg.centroids], [reg.weight_at(e) for e in range(3)]
([(4, 4)], [0.0, 0.25, 0.5])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lcc.engine.centroids import centroid_term, nearest_centroids, spread_indices
from lcc.errors import LCCInputError
from lcc.regularisers.base import (
    OUTPUT,
    Batch,
    Regulariser,
    RegulariserOptions,
    TrainingLatents,
)
from lcc.regularisers.kmeans_options import KMeansOptions

__all__ = ["KMeansCentroids", "KMeansOptions", "ramp_factor"]

#: centroids per class when ``centroids=0``
PER_CLASS = 2
#: the counters kept in the extra state (attributes ``_NAME``)
_EXTRA_STATE = ("epoch", "written", "reseeded", "reinitialised")


def ramp_factor(epoch: int, start: int, length: int, shape: str = "linear") -> float:
    """Fraction of beta during ``epoch``: 0 before ``start``, then ``length`` partial epochs, 1.

    Linear: ``t = (epoch - start + 1) / (length + 1)`` (capped at 1); sigmoid:
    ``exp(-5 (1 - t)^2)``. ``length=0``: full weight from ``start`` on.

    >>> [ramp_factor(e, 1, 3) for e in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    >>> round(ramp_factor(1, 1, 3, "sigmoid"), 4)
    0.0601
    """
    if epoch < start:
        return 0.0
    t = min(1.0, (epoch - start + 1) / (length + 1))
    return t if shape == "linear" else math.exp(-5.0 * (1.0 - t) ** 2)


class KMeansCentroids(Regulariser):
    """The ``kmeans`` regulariser (summary and options: :class:`KMeansOptions`).

    Parameters ``centroids[i]`` (J_i, D_i) are created by :meth:`bind`; buffers
    ``counts_i`` (assignments per centroid this epoch) and ``reservoir_i`` (recent latents for
    re-seeding) and the extra state make resume exact.
    """

    name = "kmeans"
    Options = KMeansOptions
    labeled_only = False

    def __init__(self, options: RegulariserOptions | None = None, **overrides: Any) -> None:
        super().__init__(options, **overrides)
        #: pooling of the latents; the trainer sets it to its own ``pool`` before ``bind``
        self.pool = "flatten"
        self.centroids = nn.ParameterList()
        self._epoch = -1  # the epoch whose start_epoch ran
        self._written = 0  # rows written into the reservoirs so far
        self._reseeded = 0
        self._reinitialised = 0

    # --- set-up ---------------------------------------------------------------------------

    @property
    def bound(self) -> bool:
        return len(self.centroids) > 0

    def centroid_counts(self, num_classes: int) -> list[int]:
        """``J_i`` of each layer."""
        value = self.options.centroids
        if isinstance(value, list):
            if len(value) != len(self.layers):
                raise LCCInputError(
                    f"centroids lists {len(value)} numbers for {len(self.layers)} layers "
                    f"{list(self.layers)}; give one number or one per layer"
                )
            return list(value)
        return [value or PER_CLASS * num_classes] * len(self.layers)

    def bind(self, model: nn.Module, *, num_classes: int, sample: Any = None) -> None:
        """Probe the layers' dimensions on ``sample`` and create the centroid parameters."""
        from lcc.zoo.latents import probe_latents

        if not self.layers:
            raise LCCInputError(
                "kmeans needs layers: pass layers=NAME,... or the trainer's --layers"
            )
        if OUTPUT in self.layers:
            raise LCCInputError(
                "kmeans clusters hidden layers, not the logits; name layers from `lcc layers`"
            )
        if sample is None:
            raise LCCInputError("kmeans needs a sample input in bind() to size its centroids")
        counts = self.centroid_counts(num_classes)
        outputs, _ = probe_latents(model, sample, list(self.layers), pool=self.pool)
        probes = [outputs[name].float() for name in self.layers]
        if self.bound:
            shapes = [tuple(c.shape) for c in self.centroids]
            if shapes == [(j, z.shape[1]) for j, z in zip(counts, probes, strict=True)]:
                return
            raise LCCInputError(f"kmeans is already bound with centroids of shapes {shapes}")
        rng = np.random.default_rng([self.options.seed, 2**31])
        values = []
        for j, z in zip(counts, probes, strict=True):
            rows = np.resize(rng.permutation(z.shape[0]), j)  # placeholders until compute()
            values.append(z[torch.as_tensor(rows, device=z.device)].clone())
        self._create(values)

    def _create(self, values: list[Tensor]) -> None:
        capacity = max(value.shape[0] for value in values)  # enough to re-seed every centroid
        for i, value in enumerate(values):
            self.centroids.append(nn.Parameter(value.detach().clone().float()))
            j, dim = value.shape
            device = value.device
            self.register_buffer(f"counts_{i}", torch.zeros(j, dtype=torch.int64, device=device))
            self.register_buffer(
                f"reservoir_{i}", torch.zeros(capacity, dim, dtype=torch.float32, device=device)
            )

    def _buffer(self, kind: str, i: int) -> Tensor:
        return getattr(self, f"{kind}_{i}")

    def _require_bound(self) -> None:
        if not self.bound:
            raise LCCInputError("kmeans has no centroids yet; the trainer must call bind() first")

    # --- schedule -------------------------------------------------------------------------

    def weight_at(self, epoch: int) -> float:
        """beta during ``epoch``: 0 during warmup, ramped, then ``weight``."""
        factor = ramp_factor(epoch, self.warmup, self.options.ramp, self.options.ramp_shape)
        return self.weight * factor

    def needs_training_latents(self, epoch: int) -> bool:
        return epoch < self.options.reinit

    # --- epoch hooks ----------------------------------------------------------------------

    def start_epoch(self, epoch: int) -> None:
        """Re-seed the centroids that won no sample last epoch (unless all are re-drawn now).

        Runs once per epoch: a second call for the same epoch (resume mid-epoch) does nothing.
        Under torch.distributed the counts are summed over processes and rank 0's centroids
        are broadcast, so every process holds the same ones.
        """
        self._require_bound()
        if epoch == self._epoch:
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        counts = [self._buffer("counts", i) for i in range(len(self.centroids))]
        if distributed:
            for count in counts:
                torch.distributed.all_reduce(count)
        seen = sum(int(count.sum()) for count in counts) > 0
        reseeded = 0
        if seen and not self.needs_training_latents(epoch):
            with torch.no_grad():
                for i, count in enumerate(counts):
                    reseeded += self._reseed(i, torch.nonzero(count == 0).flatten(), epoch)
            if distributed:
                for parameter in self.centroids:
                    torch.distributed.broadcast(parameter.data, src=0)
        for count in counts:
            count.zero_()
        self._epoch, self._reseeded, self._reinitialised = epoch, reseeded, 0

    def _reseed(self, i: int, empty: Tensor, epoch: int) -> int:
        filled = min(self._written, self._buffer("reservoir", i).shape[0])
        if empty.numel() == 0 or filled == 0:
            return 0
        rng = np.random.default_rng([self.options.seed, epoch, i, 1])
        rows = rng.choice(filled, empty.numel(), replace=empty.numel() > filled)
        reservoir = self._buffer("reservoir", i)
        self.centroids[i][empty] = reservoir[torch.as_tensor(rows, device=reservoir.device)]
        return int(empty.numel())

    def compute(self, latents: TrainingLatents, epoch: int) -> dict[str, Any]:
        """New centroids drawn from the training latents, spread evenly over the classes."""
        self._require_bound()
        values = []
        for i, (name, parameter) in enumerate(zip(self.layers, self.centroids, strict=True)):
            if name not in latents.latents:
                raise LCCInputError(f"the training latents hold no layer {name!r}")
            z = latents.latents[name]
            if z.ndim != 2 or z.shape[1] != parameter.shape[1]:
                raise LCCInputError(
                    f"training latents of {name!r} have shape {z.shape}, the centroids "
                    f"dimension {parameter.shape[1]}; collect them with the same pool"
                )
            rng = np.random.default_rng([self.options.seed, epoch, i])
            rows = spread_indices(np.asarray(latents.y), parameter.shape[0], rng)
            chosen = np.asarray(z[rows], dtype=np.float32)
            if not np.isfinite(chosen).all():
                raise LCCInputError(f"training latents of {name!r} contain NaN or inf")
            values.append(chosen)
        return {"centroids": values, "epoch": int(epoch)}

    def install(self, state: dict[str, Any]) -> None:
        """Copy the centroids :meth:`compute` drew into the parameters."""
        self._require_bound()
        with torch.no_grad():
            for parameter, value in zip(self.centroids, state["centroids"], strict=True):
                parameter.copy_(torch.as_tensor(value, device=parameter.device))
        self._reinitialised = 1

    # --- per batch ------------------------------------------------------------------------

    def forward(self, batch: Batch) -> Tensor:
        """``mean_labelled l_c + mean_unlabelled l_c`` of the batch (see the module docstring).

        In training mode it also counts the assignments and keeps recent latents for
        re-seeding.
        """
        self._require_bound()
        total: Tensor | None = None
        winners = []
        for name, parameter in zip(self.layers, self.centroids, strict=True):
            distance, index = nearest_centroids(batch.layer(name), parameter)
            total = distance if total is None else total + distance
            winners.append(index)
        assert total is not None
        if self.training:
            self._record(batch, winners)
        return centroid_term(total, batch.labeled.to(total.device))

    @torch.no_grad()
    def _record(self, batch: Batch, winners: list[Tensor]) -> None:
        # each batch writes its first K/4 rows into the ring of capacity K (max J_i) per layer
        capacity = self._buffer("reservoir", 0).shape[0]
        rows = min(int(winners[0].shape[0]), max(1, capacity // 4))
        for i, (name, index) in enumerate(zip(self.layers, winners, strict=True)):
            count = self._buffer("counts", i)
            count += torch.bincount(index, minlength=count.shape[0]).to(count.device)
            reservoir = self._buffer("reservoir", i)
            slots = (self._written + torch.arange(rows, device=reservoir.device)) % capacity
            reservoir[slots] = batch.layer(name)[:rows].detach().to(reservoir.device, torch.float32)
        self._written += rows

    def epoch_stats(self) -> dict[str, Any]:
        """``empty``: centroids that won no sample so far this epoch (re-seeded at the next
        start); ``reseeded``: centroids re-seeded at the start of this epoch; ``reinitialised``:
        1 if all were drawn again from the training latents at its start."""
        if not self.bound:
            return {}
        counts = [self._buffer("counts", i) for i in range(len(self.centroids))]
        seen = sum(int(count.sum()) for count in counts) > 0
        empty = sum(int((count == 0).sum()) for count in counts) if seen else 0
        return {"empty": empty, "reseeded": self._reseeded, "reinitialised": self._reinitialised}

    # --- state ----------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {name: getattr(self, f"_{name}") for name in _EXTRA_STATE}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for name in _EXTRA_STATE:
            setattr(self, f"_{name}", int(state[name]))

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # An unbound regulariser takes its shapes from the checkpoint (bound ones must match).
        if not self.bound:
            values = []
            while f"{prefix}centroids.{len(values)}" in state_dict:
                values.append(state_dict[f"{prefix}centroids.{len(values)}"])
            if values:
                self._create([torch.zeros_like(value) for value in values])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
