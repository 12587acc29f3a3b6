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

:class:`LatentClusterCorrection` is the same object with LCC alone and LCC's options as keywords
(``LatentClusterCorrection(model, layers=["act"], k=5, weight=0.01)``; ``loss(index)``).
With ``source="recorded"`` there is no extra pass: call ``observe(index, logits, yb)`` after
each training forward and the next refresh uses the latents recorded during the epoch before.
A refresh is split into :meth:`~Regularisation.collect`, :meth:`~Regularisation.compute` and
:meth:`~Regularisation.install` so that distributed training can compute it once and
broadcast the picklable states.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lcc.errors import LCCInputError, check_choice
from lcc.regularisers.base import (
    OUTPUT,
    Batch,
    Regulariser,
    TrainingLatents,
    check_integer,
    option,
)
from lcc.regularisers.lcc import (
    LCC,
    LayerState,
    LCCOptions,
    RefreshState,
    check_class_sizes,
    to_numpy,
    to_torch,
)
from lcc.zoo.latents import POOLS, LatentRecorder, check_layer_names, collect_latents

SOURCES: tuple[str, ...] = ("fresh", "recorded")
#: dtypes of latents kept on disk (``latents_dir``)
LATENT_DTYPES: tuple[str, ...] = ("float32", "float16")

#: the latents of the whole training set handed to a refresh (its historical name)
Collected = TrainingLatents

__all__ = [
    "POOLS",
    "SOURCES",
    "Collected",
    "LCCConfig",
    "LatentClusterCorrection",
    "LayerState",
    "RefreshState",
    "Regularisation",
    "check_class_sizes",
]


@dataclass
class LCCConfig(LCCOptions):
    """LCC's options plus the two latent-capture settings of :class:`LatentClusterCorrection`.

    ``source``: ``"fresh"`` (an eval pass over the training set, the paper) or ``"recorded"``
    (latents of the previous epoch's training forwards); ``pool``: how conv maps become
    vectors. Everything else: :class:`lcc.regularisers.lcc.LCCOptions`.

    >>> LCCConfig(layers=["fc"], k=10).k
    10
    >>> LCCConfig(layers=["fc"], interval=0)
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: interval must be an integer >= 1, got 0
    """

    source: str = option(
        "fresh", "latents of a refresh: fresh eval pass or recorded", choices=SOURCES
    )
    pool: str = option("flatten", "how conv feature maps become vectors", choices=POOLS)

    def check(self) -> None:
        if isinstance(self.layers, (list, tuple, str)) and not self.layers:
            raise LCCInputError(
                f"layers must be a non-empty list of layer names, got {self.layers!r}; "
                "run `lcc layers MODEL` to see them"
            )
        super().check()
        check_choice(self.source, SOURCES, name="source")
        check_choice(self.pool, POOLS, name="pool")

    def options(self) -> LCCOptions:
        """The regulariser's options (without ``source`` and ``pool``)."""
        names = {item.name for item in dataclasses.fields(LCCOptions)}
        return LCCOptions(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def _dataset_labels(loader: Any) -> np.ndarray | None:
    """Training labels exposed by the loader's dataset (``targets`` attribute), if any."""
    dataset = getattr(loader, "dataset", None)
    for _ in range(3):
        labels = getattr(dataset, "targets", None)
        if labels is not None:
            try:
                return np.asarray(labels).astype(np.int64).reshape(-1)
            except (TypeError, ValueError):
                return None
        dataset = getattr(dataset, "dataset", None)
    return None


def unique_keys(regularisers: Sequence[Regulariser]) -> list[str]:
    """Names that tell the regularisers apart in logs and checkpoints (``name``, ``name#2``).

    >>> from lcc.regularisers.lcc import LCC
    >>> unique_keys([LCC(layers=["a"]), LCC(layers=["b"])])
    ['lcc', 'lcc#2']
    """
    keys: list[str] = []
    for reg in regularisers:
        key, count = reg.name, 1
        while key in keys:
            count += 1
            key = f"{reg.name}#{count}"
        keys.append(key)
    return keys


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
    ) -> None:
        regularisers = list(regularisers)
        for reg in regularisers:
            if not isinstance(reg, Regulariser):
                raise LCCInputError(
                    f"regularisers must be lcc.regularisers.Regulariser objects, got "
                    f"{type(reg).__name__}; build them with lcc.regularisers.build_regulariser"
                )
            if default_layers:
                reg.set_default_layers(list(default_layers))
            if not reg.layers:
                raise LCCInputError(
                    f"regulariser {reg.name!r} names no layers; pass layers=... (names from "
                    "`lcc layers MODEL`)"
                )
        self.model = model
        self.source = check_choice(source, SOURCES, name="source")
        self.pool = check_choice(pool, POOLS, name="pool")
        self.regularisers = nn.ModuleList(regularisers)
        self.keys = unique_keys(regularisers)
        self.device = None if device is None else torch.device(device)
        self.latents_dir = None if latents_dir is None else Path(latents_dir)
        self.latents_dtype = check_choice(latents_dtype, LATENT_DTYPES, name="latents_dtype")
        if self.latents_dir is not None:
            self.latents_dir.mkdir(parents=True, exist_ok=True)
        hooked: list[str] = []
        for reg in regularisers:
            hooked.extend(name for name in reg.layers if name != OUTPUT and name not in hooked)
        self.layers: tuple[str, ...] = tuple(check_layer_names(model, hooked)) if hooked else ()
        # no hooked layer when every regulariser reads the logits ('output') only
        self.recorder: Any = (
            LatentRecorder(model, list(self.layers), pool=self.pool)  # type: ignore[arg-type]
            if self.layers
            else _NoHooks()
        )
        self.recorder.attach()
        self.epoch: int | None = None
        self.terms: dict[str, float] = {}
        self.bound = False
        self._n_samples: int | None = None
        self._checked_labels = False
        self._predictions: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._recorded_at: np.ndarray | None = None
        self._latents: dict[str, np.ndarray] = {}
        if n_samples is not None:
            self._set_n_samples(n_samples)
        if num_classes is not None or sample is not None:
            self.bind(num_classes=num_classes, sample=sample)

    # --- setup -------------------------------------------------------------------------------

    def items(self) -> Iterator[tuple[str, Regulariser]]:
        """``(key, regulariser)`` pairs in order."""
        yield from zip(self.keys, self.regularisers, strict=True)  # type: ignore[arg-type]

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
        regs = dict(self.items())
        layers: list[str] = []
        for key in keys:
            layers.extend(name for name in regs[key].training_layers if name not in layers)
        return layers

    def start_epoch(self, epoch: int, loader: Any = None) -> dict[str, Any] | None:
        """Call at the start of each epoch: refreshes what is due; returns {key: stats} or None.

        ``loader`` yields ``(x, y, index)`` over the training set; for ``source="fresh"`` it is
        iterated once in eval mode (give it the non-augmented training set). Returns ``None``
        when nothing refreshed (also when this epoch's refresh is already installed: resume).
        """
        self.epoch = int(epoch)
        if loader is not None and hasattr(loader, "dataset"):
            self._set_n_samples(len(loader.dataset))
            if not self._checked_labels:
                labels = _dataset_labels(loader)
                if labels is not None and labels.size:
                    self.check_labels(labels)
                self._checked_labels = True
        for reg in self.regularisers:
            reg.start_epoch(self.epoch)
        due = self.due(self.epoch)
        if not due:
            return None
        collected = Regularisation.collect(self, loader, keys=due)
        states = Regularisation.compute(self, collected, epoch=self.epoch, keys=due)
        Regularisation.install(self, states)
        return self.refresh_stats(states)

    # --- the three refresh steps -------------------------------------------------------------

    def collect(self, loader: Any = None, *, keys: Sequence[str] | None = None) -> TrainingLatents:
        """Latents of the whole training set: an eval pass (fresh) or the recorded buffers."""
        start = time.perf_counter()
        layers = self.training_layers(self.due(self.epoch or 0) if keys is None else keys)
        reason = None
        if self.source == "recorded":
            reason = self.recorded_gap(layers)
            if reason is None:
                n = self._n_samples
                assert n is not None and self._labels is not None and self._recorded_at is not None
                previous = -1 if self.epoch is None else self.epoch - 1
                stale = int(np.sum(self._recorded_at[:n] < previous)) if previous >= 0 else 0
                return TrainingLatents(
                    latents={name: self._latents[name][:n] for name in layers},
                    y=self._labels[:n].copy(),
                    predictions=self._predictions[:n].copy()
                    if self._predictions is not None
                    else None,
                    source="recorded",
                    seconds=time.perf_counter() - start,
                    stale=stale,
                )
        if loader is None:
            raise LCCInputError(
                "a refresh needs the training loader (yielding (x, y, index)) for the latent pass"
            )
        try:
            latents, y, predictions = collect_latents(
                self.model,
                loader,
                layers,
                pool=self.pool,
                device=self.device,
                memmap_dir=self.latents_dir,
                memmap_dtype=np.dtype(self.latents_dtype),
            )
        finally:  # collect_latents restores every submodule's train/eval mode itself
            self.recorder.clear()  # our hooks saw the eval pass too: drop those outputs
        source = "fresh" if reason is None else f"fresh (fallback: {reason})"
        return TrainingLatents(
            latents=latents,
            y=np.asarray(y, dtype=np.int64),
            predictions=np.asarray(predictions, dtype=np.int64),
            source=source,
            seconds=time.perf_counter() - start,
        )

    def compute(
        self, collected: TrainingLatents, *, epoch: int | None = None, keys: Sequence[str]
    ) -> dict[str, Any]:
        """Each due regulariser's state computed from ``collected`` (picklable): {key: state}."""
        regs = dict(self.items())
        return {key: regs[key].compute(collected, epoch) for key in keys}

    def install(self, states: Mapping[str, Any]) -> None:
        """Hand each regulariser the state :meth:`compute` gave it."""
        regs = dict(self.items())
        for key, state in states.items():
            if key not in regs:
                raise LCCInputError(f"a refresh state names regulariser {key!r}, not in this run")
            regs[key].install(state)

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
        latents = {name: self._output(name) for name in self.layers}
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
        if total is None:
            from lcc.regularisers.base import zero_term

            return zero_term(batch)
        return total

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
        n = self._require_n_samples()
        if int(index.min()) < 0 or int(index.max()) >= n:
            raise LCCInputError(
                f"observe got dataset index {int(index.max())} outside 0..{n - 1}; "
                "pass the dataset indices of the batch"
            )
        self._allocate_common(n)
        if logits is not None:
            predicted = logits.detach().argmax(dim=-1).reshape(-1).cpu()
            self._check_rows(predicted.shape[0], index, "logits")
            torch.from_numpy(self._predictions)[index] = predicted  # type: ignore[arg-type]
        if y is not None:
            labels = torch.as_tensor(y).detach().reshape(-1).cpu().long()
            self._check_rows(labels.shape[0], index, "y")
            torch.from_numpy(self._labels)[index] = labels  # type: ignore[arg-type]
        layers = self.recording_layers()
        if self.source != "recorded" or not layers:
            return
        for name in layers:
            out = self._output(name).detach().to("cpu", torch.float32)
            out = out.reshape(out.shape[0], -1)
            self._check_rows(out.shape[0], index, f"the output of layer {name!r}")
            if name not in self._latents or self._latents[name].shape[1] != out.shape[1]:
                self._latents[name] = self._recorded_buffer(name, (n, out.shape[1]))
            torch.from_numpy(self._latents[name])[index] = out
        stamp = -1 if self.epoch is None else self.epoch
        torch.from_numpy(self._recorded_at)[index] = max(stamp, 0)  # type: ignore[arg-type]

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

    # --- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as tensors and plain values (``torch.save``-able):
        each regulariser's ``state_dict`` (parameters, buffers, refresh state), the per-sample
        buffers of :meth:`observe` and the epoch counter."""
        buffers = {
            "predictions": self._predictions,
            "labels": self._labels,
            "recorded_at": self._recorded_at,
            "latents": dict(self._latents),
        }
        return {
            "version": 2,
            "epoch": self.epoch,
            "n_samples": self._n_samples,
            "buffers": to_torch(buffers),
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
        self._n_samples = state_dict["n_samples"]
        buffers = to_numpy(state_dict["buffers"])
        self._predictions = buffers["predictions"]
        self._labels = buffers["labels"]
        self._recorded_at = buffers["recorded_at"]
        self._latents = dict(buffers["latents"])
        for key, reg in self.items():
            reg.load_state_dict(saved[key])

    @property
    def recorded(self) -> dict[str, Any]:
        """The per-sample buffers of :meth:`observe` (numpy views, e.g. to merge across ranks):
        ``predictions``/``labels`` (N,) int64 (-1 unknown), ``recorded_at`` (N,) int64 epoch of
        each recorded latent row (-1 never), ``latents`` {layer: (N, D) float32}."""
        return {
            "predictions": self._predictions,
            "labels": self._labels,
            "recorded_at": self._recorded_at,
            "latents": self._latents,
        }

    def recorded_gap(self, layers: Sequence[str]) -> str | None:
        """Why the recorded buffers cannot serve a refresh of ``layers``, or None when they can."""
        n = self._n_samples
        if n is None or self._recorded_at is None or self._labels is None:
            return "no latents recorded yet"
        if any(name not in self._latents for name in layers):
            return "no latents recorded yet"
        never = int(np.sum(self._recorded_at[:n] < 0))
        if never:
            return f"{never} samples never recorded"
        if not (self._labels[:n] >= 0).any():
            return "labels missing: pass y to observe()"
        return None

    # --- internals ---------------------------------------------------------------------------

    def _output(self, name: str) -> Tensor:
        out = self.recorder.outputs.get(name)
        if out is None:
            raise LCCInputError(
                f"layer {name!r} has not produced an output yet; run the model forward on the "
                "batch before calling loss() or observe()"
            )
        return out

    def _set_n_samples(self, n: int) -> None:
        n = check_integer(n, "n_samples", 1)
        if self._n_samples is not None and self._n_samples != n and self._predictions is not None:
            raise LCCInputError(
                f"the training set has {n} samples but the recorded buffers hold "
                f"{self._n_samples}; use the same training set for every epoch"
            )
        self._n_samples = n

    def _require_n_samples(self) -> int:
        if self._n_samples is None:
            raise LCCInputError(
                "the training-set size is not known yet: pass n_samples= or call "
                "start_epoch(epoch, loader) before observe()"
            )
        return self._n_samples

    def _allocate_common(self, n: int) -> None:
        if self._predictions is None or self._predictions.shape[0] != n:
            self._predictions = np.full(n, -1, dtype=np.int64)
            self._labels = np.full(n, -1, dtype=np.int64)
            self._recorded_at = np.full(n, -1, dtype=np.int64)
            self._latents = {}

    def _recorded_buffer(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A zeroed (N, D) buffer for recorded latents: in RAM, or a memory-mapped
        ``recorded-<layer>.npy`` in ``latents_dir``."""
        if self.latents_dir is None:
            return np.zeros(shape, dtype=np.float32)
        path = self.latents_dir / f"recorded-{name}.npy"
        dtype = np.dtype(self.latents_dtype)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    @staticmethod
    def _check_rows(rows: int, index: Tensor, what: str) -> None:
        if rows != index.shape[0]:
            raise LCCInputError(
                f"{what} has {rows} rows but the batch has {index.shape[0]} indices; call "
                "observe() right after the forward of the same batch"
            )


class _NoHooks:
    """The recorder of a run that hooks no layer."""

    outputs: dict[str, Tensor] = {}  # noqa: RUF012 - always empty

    def attach(self) -> _NoHooks:
        return self

    def detach(self) -> None:
        pass

    def clear(self) -> None:
        pass


class LatentClusterCorrection(Regularisation):
    """Latent Cluster Correction alone in a plain PyTorch loop: :class:`Regularisation` with one
    :class:`lcc.regularisers.lcc.LCC`, configured by an :class:`LCCConfig` and/or keywords.

    ``loss(indices)`` returns ``weight *`` mean over layers of the LCC loss; ``compute`` and
    ``install`` take and give the LCC :class:`RefreshState` itself.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LCCConfig | None = None,
        *,
        n_samples: int | None = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> None:
        known = {f.name for f in dataclasses.fields(LCCConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise LCCInputError(
                f"unknown LCC option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        if config is None:
            config = LCCConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.correction = LCC(config.options())
        super().__init__(
            model,
            [self.correction],
            source=config.source,
            pool=config.pool,
            n_samples=n_samples,
            device=device,
        )

    @property
    def state(self) -> RefreshState | None:
        return self.correction.state

    @property
    def history(self) -> list[dict[str, dict[str, Any]]]:
        return self.correction.history

    @property
    def last_refresh_epoch(self) -> int | None:
        return self.correction.last_refresh_epoch

    @property
    def losses(self) -> dict[str, Any]:
        return self.correction.losses

    def is_refresh_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) starts with a refresh: after warmup, every ``interval``.

        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> lcc = LatentClusterCorrection(model, layers=["0"], warmup=2, interval=3)
        >>> [e for e in range(10) if lcc.is_refresh_epoch(e)]
        [2, 5, 8]
        """
        return self.correction.is_refresh_epoch(epoch)

    def start_epoch(self, epoch: int, loader: Any = None) -> dict[str, dict[str, Any]] | None:
        """Refresh when due; returns per-layer stats (None when no refresh ran)."""
        stats = super().start_epoch(epoch, loader)
        return None if stats is None else stats["lcc"]

    def refresh(self, loader: Any = None, *, epoch: int | None = None) -> dict[str, dict[str, Any]]:
        """Collect latents, compute the targets and install them now; returns per-layer stats."""
        state = self.compute(self.collect(loader, keys=["lcc"]), epoch=epoch)
        self.install(state)
        return state.stats

    def compute(  # type: ignore[override]
        self, collected: TrainingLatents, *, epoch: int | None = None, keys: Any = None
    ) -> RefreshState:
        """Run :func:`lcc.engine.refresh.refresh` on every layer (class policy applied)."""
        return self.correction.compute(collected, epoch)

    def install(self, state: RefreshState | Mapping[str, Any]) -> None:  # type: ignore[override]
        """Put a refresh's targets (and projections) into the per-layer losses."""
        if isinstance(state, Mapping):
            super().install(state)
        else:
            self.correction.install(state)

    def collect(self, loader: Any = None, *, keys: Sequence[str] | None = None) -> TrainingLatents:
        return super().collect(loader, keys=["lcc"] if keys is None else keys)

    def loss(  # type: ignore[override]
        self, indices: Tensor | np.ndarray | Sequence[int], **batch: Any
    ) -> Tensor:
        """``weight *`` mean over layers of the LCC loss of the last forward's latents.

        Before the first refresh, or with ``weight == 0``, returns a zero that still
        backpropagates.
        """
        return super().loss(indices, **batch)
