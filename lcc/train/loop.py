"""Latent regularisers in any PyTorch training loop: hooks, latent sources, schedule, state.

:class:`Regularisation` drives a list of regularisers (:mod:`lcc.regularisers`) for one model:
it owns the forward hooks on every layer they read, collects the latents of the whole training
set when one of them refreshes (an eval pass, ``source="fresh"``, or the latents recorded
during the previous epoch, ``source="recorded"``), and adds their weighted terms to your loss.
Three lines in your own loop (the loader yields ``(x, y, index)``, e.g. via
:class:`lcc.zoo.datasets.IndexedDataset`):

>>> from collections import OrderedDict
>>> import torch
>>> from torch import nn
>>> from torch.utils.data import DataLoader, TensorDataset
>>> from lcc.regularisers import build_regulariser
>>> from lcc.synthetic import gaussian_mixture
>>> x, y, _ = gaussian_mixture(n_samples=200, dim=16, n_classes=4, seed=0)
>>> data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y), torch.arange(len(y)))
>>> loader = DataLoader(data, batch_size=50, shuffle=True)
>>> model = nn.Sequential(
...     OrderedDict(hidden=nn.Linear(16, 32), act=nn.ReLU(), head=nn.Linear(32, 4))
... )
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> regs = Regularisation(model, [build_regulariser("lcc:layers=act,k=5,w=0.01")])  # 1
>>> for epoch in range(2):
...     stats = regs.start_epoch(epoch, loader)  # 2: refreshes when due (not in warmup)
...     for xb, yb, index in loader:
...         logits = model(xb)
...         loss = nn.functional.cross_entropy(logits, yb) + regs.loss(index, y=yb, logits=logits)
...         optimizer.zero_grad()
...         loss.backward()
...         optimizer.step()
>>> stats is not None and stats["lcc"]["act"]["n_clusters"] >= 1
True
>>> regs.close()  # remove the hooks (or use ``with Regularisation(...) as regs:``)

:func:`LatentClusterCorrection` builds the same object with LCC alone from LCC's options as
keywords (``LatentClusterCorrection(model, layers=["act"], k=5, weight=0.01)``; ``loss(index)``).
With ``source="recorded"`` there is no extra pass: call ``observe(index, logits, yb)`` after
each training forward and the next refresh uses the latents recorded during the epoch before.
Under ``torch.distributed`` pass ``exchange=`` (:mod:`lcc.train.exchange`) to
:meth:`~Regularisation.start_epoch`: every rank collects its shard, the main rank computes the
refresh once and every rank installs the broadcast states; the same lines run for one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lcc.engine.choices import LATENT_DTYPES, POOLS, REFRESH_BN, SOURCES
from lcc.errors import LCCInputError, check_choice
from lcc.regularisers.base import (
    OUTPUT,
    Batch,
    Regulariser,
    TrainingLatents,
    check_regularisers,
    unique_keys,
    zero_term,
)
from lcc.regularisers.lcc import LCC, LayerState, LCCOptions, RefreshState, check_class_sizes
from lcc.train.collect import RecordedLatents, collect_fresh, dataset_labels
from lcc.train.exchange import Exchange, SingleProcess, check_identical, compute_on_main
from lcc.zoo.latents import LatentRecorder, model_device

__all__ = [
    "LATENT_DTYPES",
    "POOLS",
    "SOURCES",
    "LatentClusterCorrection",
    "LayerState",
    "RefreshState",
    "Refreshed",
    "Regularisation",
    "check_class_sizes",
]


@dataclass
class Refreshed:
    """The last refresh of a :class:`Regularisation`: its epoch, the training-set latents it
    read (None on the ranks other than the main one) and each regulariser's state."""

    epoch: int
    collected: TrainingLatents | None
    states: dict[str, Any]


class Regularisation:
    """A list of latent regularisers applied to ``model`` (see the module example).

    ``source``/``pool``: how latents of the whole training set are obtained and how conv maps
    become vectors; ``n_samples``: the training-set size (needed by :meth:`observe` before the
    first :meth:`start_epoch`); ``device``: where the fresh pass runs (default: the model's);
    ``default_layers``: layers of regularisers that name none; ``num_classes``/``sample`` (a few
    training inputs): when given, :meth:`bind` runs now, so regulariser parameters exist before
    you build the optimiser (add :meth:`parameters` to it). ``latents_dir``: keep the latents
    of the whole training set (fresh pass and recorded buffers) in memory-mapped ``.npy``
    files there instead of RAM, as ``latents_dtype`` (``float32`` or ``float16``): for
    training sets whose latents do not fit in memory.
    """

    def __init__(
        self,
        model: nn.Module,
        regularisers: Sequence[Regulariser],
        *,
        source: str = "fresh",
        pool: str = "flatten",
        n_samples: int | None = None,
        device: str | torch.device | None = None,
        default_layers: Sequence[str] | None = None,
        num_classes: int | None = None,
        sample: Any = None,
        latents_dir: str | os.PathLike[str] | None = None,
        latents_dtype: str = "float32",
        refresh_bn: str = "running",
    ) -> None:
        regularisers = list(regularisers)
        check_regularisers(regularisers, default_layers)
        self.model = model
        self.source = check_choice(source, SOURCES, name="source")
        self.pool = check_choice(pool, POOLS, name="pool")
        self.refresh_bn = check_choice(refresh_bn, REFRESH_BN, name="refresh_bn")
        self.regularisers = nn.ModuleList(regularisers)
        self.keys = unique_keys(regularisers)
        self.device = None if device is None else torch.device(device)
        self.latents_dir = None if latents_dir is None else Path(latents_dir)
        self.latents_dtype = check_choice(latents_dtype, LATENT_DTYPES, name="latents_dtype")
        if self.latents_dir is not None:
            self.latents_dir.mkdir(parents=True, exist_ok=True)
        hooked = dict.fromkeys(name for reg in regularisers for name in reg.layers)
        hooked.pop(OUTPUT, None)
        # no hooked layer when every regulariser reads the logits ('output') only
        self.recorder = LatentRecorder(model, list(hooked), pool=self.pool, allow_empty=True)  # type: ignore[arg-type]
        self.layers: tuple[str, ...] = tuple(self.recorder.layers)
        self.recorder.attach()
        self.buffers = RecordedLatents(latents_dir=self.latents_dir, dtype=self.latents_dtype)
        self.epoch: int | None = None
        self.terms: dict[str, float] = {}
        self.bound = False
        self.last_refresh: Refreshed | None = None
        self._checked_labels = False
        if n_samples is not None:
            self.buffers.set_size(n_samples)
        if num_classes is not None or sample is not None:
            self.bind(num_classes=num_classes, sample=sample)

    # --- setup -------------------------------------------------------------------------------

    def items(self) -> Iterator[tuple[str, Regulariser]]:
        """``(key, regulariser)`` pairs in order."""
        yield from zip(self.keys, self.regularisers, strict=True)  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Regulariser:
        """The regulariser of ``key`` (``regs["lcc"]``)."""
        regs = dict(self.items())
        if key not in regs:
            raise LCCInputError(f"no regulariser {key!r} in this run; it has {self.keys}")
        return regs[key]

    def bind(self, *, num_classes: int | None = None, sample: Any = None) -> None:
        """Let each regulariser create its parameters or load its teacher (once)."""
        if self.bound:
            return
        for reg in self.regularisers:
            reg.pool = self.pool  # type: ignore[assignment]
            reg.bind(self.model, num_classes=num_classes, sample=sample)
        self.bound = True

    def parameters(self) -> Iterator[nn.Parameter]:
        """The regularisers' own trainable parameters (give them to the optimiser)."""
        return self.regularisers.parameters()

    def to(self, device: str | torch.device) -> Regularisation:
        """Move the regularisers' parameters and buffers to ``device``."""
        self.regularisers.to(device)
        return self

    def check_labels(self, y: np.ndarray) -> None:
        """Let each regulariser check the training labels (``-1`` unlabelled)."""
        for reg in self.regularisers:
            reg.check_labels(np.asarray(y))
        self._checked_labels = True

    def close(self) -> None:
        """Remove the forward hooks from the model."""
        self.recorder.detach()

    def __enter__(self) -> Regularisation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schedule ----------------------------------------------------------------------------

    def due(self, epoch: int) -> list[str]:
        """Keys of the regularisers that refresh from the training set at ``epoch``."""
        return [key for key, reg in self.items() if reg.needs_training_latents(epoch)]

    def training_layers(self, keys: Sequence[str]) -> list[str]:
        """Layers the regularisers ``keys`` need in :class:`TrainingLatents`."""
        return list(dict.fromkeys(name for key in keys for name in self[key].training_layers))

    def start_epoch(
        self, epoch: int, loader: Any = None, *, exchange: Exchange | None = None
    ) -> dict[str, Any] | None:
        """Call at the start of each epoch: refreshes what is due; returns {key: stats} or None.

        ``loader`` yields ``(x, y, index)`` over the training set; for ``source="fresh"`` it is
        iterated once in eval mode (give it the non-augmented training set; under an
        ``exchange`` of several ranks each rank passes over its shard of it). Returns ``None``
        when nothing refreshed. The whole refresh is kept in :attr:`last_refresh`.
        """
        exchange = SingleProcess() if exchange is None else exchange
        self.epoch = int(epoch)
        if loader is not None and hasattr(loader, "dataset"):
            self.buffers.set_size(len(loader.dataset))
            if not self._checked_labels:
                labels = dataset_labels(loader)
                if labels is not None and labels.size:
                    self.check_labels(labels)
                self._checked_labels = True
        for reg in self.regularisers:
            reg.start_epoch(self.epoch)
        due = self.due(self.epoch)
        if not due:
            return None
        collected = self.collect(loader, keys=due, exchange=exchange)
        states = compute_on_main(
            lambda: self.compute(collected, epoch=self.epoch, keys=due),
            exchange,  # type: ignore[arg-type]
        )
        self.install(states)
        check_identical(states, exchange)
        self.last_refresh = Refreshed(self.epoch, collected, states)
        return self.refresh_stats(states)

    # --- the three refresh steps -------------------------------------------------------------

    def collect(
        self,
        loader: Any = None,
        *,
        keys: Sequence[str] | None = None,
        exchange: Exchange | None = None,
    ) -> TrainingLatents | None:
        """Latents of the whole training set: the recorded buffers, or an eval pass (fresh;
        sharded over ``exchange``'s ranks). None on ranks other than the main one."""
        exchange = SingleProcess() if exchange is None else exchange
        layers = self.training_layers(self.due(self.epoch or 0) if keys is None else keys)
        reason = None
        if self.source == "recorded":
            reason = self.buffers.gap(layers)
            if reason is None:
                if not exchange.is_main:
                    return None
                collected = self.buffers.collected(layers, self.epoch)
                collected.device = str(model_device(self.model))
                return collected
        try:
            return collect_fresh(
                self.model,
                loader,
                layers,
                exchange=exchange,
                pool=self.pool,
                device=self.device,
                latents_dir=self.latents_dir,
                latents_dtype=self.latents_dtype,
                reason=reason,
                refresh_bn=self.refresh_bn,
                seed=self.epoch or 0,
                train_accuracy=self.buffers.accuracy(
                    None if not self.epoch else self.epoch - 1, exchange
                ),
            )
        finally:  # collect_latents restores every submodule's train/eval mode itself
            self.recorder.clear()  # our hooks saw the eval pass too: drop those outputs

    def compute(
        self, collected: TrainingLatents, *, epoch: int | None = None, keys: Sequence[str]
    ) -> dict[str, Any]:
        """Each due regulariser's state computed from ``collected`` (picklable): {key: state}."""
        return {key: self[key].compute(collected, epoch) for key in keys}

    def install(self, states: Mapping[str, Any]) -> None:
        """Hand each regulariser the state :meth:`compute` gave it."""
        for key, state in states.items():
            if key not in self.keys:
                raise LCCInputError(f"a refresh state names regulariser {key!r}, not in this run")
            self[key].install(state)

    @staticmethod
    def refresh_stats(states: Mapping[str, Any]) -> dict[str, Any]:
        """Per-regulariser statistics of a refresh (LCC: per layer)."""
        return {key: getattr(state, "stats", {}) for key, state in states.items()}

    # --- during training ---------------------------------------------------------------------

    def batch(
        self,
        indices: Tensor | np.ndarray | Sequence[int],
        *,
        y: Tensor | None = None,
        logits: Tensor | None = None,
        x: Any = None,
    ) -> Batch:
        """The :class:`Batch` of the last forward (latents from the hooks)."""
        latents = {name: self.recorder.output(name) for name in self.layers}
        index = torch.as_tensor(indices, dtype=torch.long)
        return Batch(latents=latents, y=y, indices=index, logits=logits, epoch=self.epoch or 0, x=x)

    def loss(
        self,
        indices: Tensor | np.ndarray | Sequence[int],
        *,
        y: Tensor | None = None,
        logits: Tensor | None = None,
        x: Any = None,
    ) -> Tensor:
        """Sum over regularisers of ``weight_at(epoch) * term`` for the last forward's latents.

        ``indices`` are the batch's dataset indices; ``y`` (``-1`` unlabelled), ``logits`` and
        ``x`` are needed by the regularisers that read them. Terms of zero weight are not
        computed; with none left, returns a zero that still backpropagates. The unweighted
        terms are kept in :attr:`terms` for logging.
        """
        batch = self.batch(indices, y=y, logits=logits, x=x)
        total: Tensor | None = None
        self.terms = {}
        for key, reg in self.items():
            weight = reg.weight_at(batch.epoch)
            if weight == 0:
                self.terms[key] = 0.0
                continue
            term = reg(batch)
            self.terms[key] = float(term.detach())
            total = weight * term if total is None else total + weight * term
        return zero_term(batch) if total is None else total

    def observe(
        self,
        indices: Tensor | np.ndarray | Sequence[int],
        logits: Tensor | None = None,
        y: Tensor | np.ndarray | Sequence[int] | None = None,
    ) -> None:
        """Record the batch's predictions and labels (and, for ``source="recorded"``, latents).

        Call right after the training forward of the batch. Latents are stored detached as
        float32 on the CPU in per-layer (N, D) buffers, allocated at the first call; they are
        only recorded in epochs followed by a refresh (all epochs before the first call to
        :meth:`start_epoch`).
        """
        index = torch.as_tensor(indices, dtype=torch.long).detach().cpu().reshape(-1)
        if index.numel() == 0:
            return
        layers = self.recording_layers() if self.source == "recorded" else []
        self.buffers.observe(
            index,
            logits=logits,
            y=y,
            outputs={name: self.recorder.output(name) for name in layers},
            epoch=-1 if self.epoch is None else self.epoch,
        )

    def recording_layers(self, epoch: int | None = None) -> list[str]:
        """Layers whose latents :meth:`observe` records during ``epoch`` (default: the current):
        those of the regularisers that refresh at the next epoch (all of them before the first
        :meth:`start_epoch`)."""
        epoch = self.epoch if epoch is None else epoch
        if epoch is None:
            keys = [key for key, reg in self.items() if reg.refreshes]
        else:
            keys = self.due(epoch + 1)
        return self.training_layers(keys)

    def share_recorded(self, epoch: int, rows: np.ndarray, exchange: Exchange) -> None:
        """End of ``epoch`` under several ranks (``source="recorded"``): every rank gets the
        rows the others recorded, so all hold the same buffers (``rows``: this rank's)."""
        layers = self.recording_layers(epoch)
        if exchange.world > 1 and self.source == "recorded" and layers:
            self.buffers.share(epoch, layers, np.asarray(rows, dtype=np.int64), exchange)

    # --- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as tensors and plain values (``torch.save``-able):
        each regulariser's ``state_dict`` (parameters, buffers, refresh state), the per-sample
        buffers of :meth:`observe` and the epoch counter."""
        return {
            "version": 2,
            "epoch": self.epoch,
            "n_samples": self.buffers.n,
            "buffers": self.buffers.state_dict(),
            "regularisers": {key: dict(reg.state_dict()) for key, reg in self.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s content (the same regularisers, in the same order)."""
        saved = state_dict.get("regularisers", {})
        if list(saved) != self.keys:
            raise LCCInputError(
                f"the checkpoint holds regularisers {list(saved)}, this run has {self.keys}; "
                "resume with the same --reg options"
            )
        self.epoch = state_dict["epoch"]
        self.buffers.n = state_dict["n_samples"]
        self.buffers.load_state_dict(state_dict["buffers"])
        for key, reg in self.items():
            reg.load_state_dict(saved[key])

    @property
    def recorded(self) -> dict[str, Any]:
        """The per-sample buffers of :meth:`observe` (:meth:`RecordedLatents.as_dict`)."""
        return self.buffers.as_dict()


def LatentClusterCorrection(
    model: nn.Module,
    options: LCCOptions | None = None,
    *,
    source: str = "fresh",
    pool: str = "flatten",
    n_samples: int | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> Regularisation:
    """A :class:`Regularisation` with Latent Cluster Correction alone, configured by LCC's
    options (:class:`lcc.regularisers.lcc.LCCOptions` and/or keywords); ``regs["lcc"]`` is
    the :class:`lcc.regularisers.lcc.LCC` regulariser.

    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> regs = LatentClusterCorrection(model, layers=["0"], warmup=2, interval=3)
    >>> [e for e in range(10) if regs["lcc"].is_refresh_epoch(e)]
    [2, 5, 8]
    """
    regs = [LCC(options, **overrides)]
    return Regularisation(model, regs, source=source, pool=pool, n_samples=n_samples, device=device)
