"""The interface every latent regulariser implements, and what the trainer hands it.

A regulariser is a small :class:`torch.nn.Module` that says only what differs between methods;
the trainer (:class:`lcc.train.loop.Regularisation`, the Lightning module and ``lcc train``)
owns the rest once for all of them: forward hooks on the layers, the ``fresh``/``recorded``
latents of the whole training set, the warmup/interval schedule, logging, checkpoints, DDP.

The trainer calls, in this order:

0. ``bind(model, num_classes=..., sample=...)`` once, before the optimiser is built;
1. ``start_epoch(epoch)`` on every process at the start of each epoch;
2. when ``needs_training_latents(epoch)`` is true: ``compute(latents, epoch)`` on one process
   with :class:`TrainingLatents` of the whole training set (layers ``training_layers``), and
   ``install(state)`` on every process with the picklable state it returned;
3. per batch, ``forward(batch)`` with a :class:`Batch` (latents per layer, labels, dataset
   indices, logits, inputs): the *unweighted* scalar loss term; the trainer adds
   ``weight_at(epoch) * term`` to the cross-entropy;
4. ``state_dict()``/``load_state_dict()`` (parameters, buffers and ``get_extra_state``) for
   exact resume; checkpoints hold plain values and tensors only (``weights_only=True`` loads).

A new regulariser is a subclass that sets ``name`` and ``Options`` (an options dataclass built
with :func:`option`, its help texts feed ``lcc train --help-reg NAME``); one entry in
:mod:`lcc.regularisers` registers it. The package's own keep the options dataclass in a
torch-free ``NAME_options.py`` beside the regulariser (its docstring's first paragraph is the
summary ``--help-reg`` prints), so that the help starts without torch.

>>> import torch
>>> from dataclasses import dataclass
>>> @dataclass
... class NormOptions(RegulariserOptions):
...     pass
>>> class Norm(Regulariser):
...     name = "norm"
...     Options = NormOptions
...     def forward(self, batch: Batch) -> torch.Tensor:
...         return torch.stack([z.pow(2).mean() for z in batch.latents.values()]).mean()
>>> reg = Norm(layers=["fc"], weight=0.5, warmup=1)
>>> z = torch.ones(4, 3, requires_grad=True)
>>> batch = Batch(latents={"fc": z}, y=torch.zeros(4, dtype=torch.long),
...               indices=torch.arange(4), logits=torch.zeros(4, 2), epoch=1)
>>> float(reg(batch).detach()), reg.weight_at(0), reg.weight_at(1)
(1.0, 0.0, 0.5)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lcc.errors import LCCInputError
from lcc.regularisers.options import OUTPUT, RegulariserOptions, make_options, option

__all__ = [
    "OUTPUT",
    "Batch",
    "Regulariser",
    "RegulariserOptions",
    "TrainingLatents",
    "check_regularisers",
    "option",
    "unique_keys",
]


@dataclass
class Batch:
    """One training batch as a regulariser sees it.

    ``latents``: {layer: (B, D) output of the hooked layer, pooled as the trainer's ``pool``
    says, still attached to the graph}; ``y``: (B,) labels, ``-1`` for unlabelled samples;
    ``indices``: (B,) dataset indices; ``logits``: (B, C) model output; ``x``: the inputs (for
    a teacher), or None; ``epoch``: the current epoch (0-based).
    """

    latents: Mapping[str, Tensor]
    y: Tensor | None
    indices: Tensor
    logits: Tensor | None
    epoch: int = 0
    x: Any = None

    @property
    def labeled(self) -> Tensor:
        """(B,) bool mask of the samples that have a label."""
        return self.labels >= 0

    @property
    def labels(self) -> Tensor:
        """(B,) labels (``-1`` unlabelled); raises when the trainer was not given them."""
        if self.y is None:
            raise LCCInputError("this regulariser needs the batch's labels: pass y")
        return self.y

    def layer(self, name: str) -> Tensor:
        """The (B, D) latents of ``name`` (``output``: the logits)."""
        if name == OUTPUT and name not in self.latents:
            if self.logits is None:
                raise LCCInputError("layer 'output' needs the batch's logits: pass logits")
            return self.logits
        try:
            return self.latents[name]
        except KeyError:
            raise LCCInputError(
                f"layer {name!r} was not recorded in this batch; recorded: {sorted(self.latents)}"
            ) from None


@dataclass
class TrainingLatents:
    """Latents of the whole training set for a refresh, rows in dataset-index order.

    ``latents``: {layer: (N, D) float32}; ``y``: (N,) labels (-1 unlabelled); ``predictions``:
    (N,) predicted classes (-1 unknown) or None; ``source``: ``"fresh"``, ``"recorded"`` or
    ``"fresh (fallback: REASON)"``; ``seconds``: time spent collecting; ``stale``: recorded rows
    older than the previous epoch; ``device``: where the model ran (``"cpu"``, ``"cuda:0"``),
    where a refresh on ``"auto"`` runs its k-NN, PCA and targets; ``losses``: (N,) per-sample
    cross-entropy of the pass (NaN unknown) or None; ``train_accuracy``: the accuracy of the
    training forwards of the epoch before (None unknown), to compare with the pass's;
    ``refresh_bn``: the BatchNorm statistics of the fresh pass (None: recorded latents).
    """

    latents: dict[str, np.ndarray]
    y: np.ndarray
    predictions: np.ndarray | None
    source: str
    seconds: float
    stale: int = 0
    device: str | None = None
    losses: np.ndarray | None = None
    train_accuracy: float | None = None
    refresh_bn: str | None = None


class Regulariser(nn.Module):
    """Base class of the latent regularisers (see the module docstring for the contract).

    Construct with an ``Options`` instance and/or keyword options:
    ``LabelVariation(layers=["fc"], weight=0.1)``. ``self.options`` holds the validated values.
    """

    #: registry name (``lcc train --reg NAME``)
    name: ClassVar[str] = ""
    #: the options dataclass (a subclass of :class:`RegulariserOptions`)
    Options: ClassVar[type[RegulariserOptions]] = RegulariserOptions
    #: whether its term is only defined on labelled samples (the trainer says so in the logs)
    labeled_only: ClassVar[bool] = True

    def __init__(self, options: RegulariserOptions | None = None, **overrides: Any) -> None:
        super().__init__()
        self.options = make_options(self.Options, options, overrides, self.name)

    # --- what the trainer reads -----------------------------------------------------------

    @property
    def layers(self) -> tuple[str, ...]:
        """Layers read per batch (``output`` = the logits; not hooked)."""
        return tuple(self.options.layers)

    @property
    def weight(self) -> float:
        return float(self.options.weight)

    @property
    def warmup(self) -> int:
        return int(self.options.warmup)

    @property
    def refreshes(self) -> bool:
        """Whether it ever works on the whole training set (overrides :meth:`compute`)."""
        return type(self).compute is not Regulariser.compute

    def weight_at(self, epoch: int) -> float:
        """Weight of the term during ``epoch``: 0 during warmup, ``weight`` after."""
        return 0.0 if epoch < self.warmup else self.weight

    def set_default_layers(self, layers: Sequence[str]) -> None:
        """Called by the trainer when ``layers`` was left empty."""
        if not self.options.layers:
            self.options.layers = list(layers)

    # --- hooks ----------------------------------------------------------------------------

    def bind(self, model: nn.Module, *, num_classes: int, sample: Any = None) -> None:
        """Called once before the optimiser is built (create parameters, load a teacher).

        ``sample``: a few training inputs (to probe layer shapes), or None. Parameters created
        here are trained by the same optimiser as the model. Default: nothing.
        """

    def check_labels(self, y: np.ndarray) -> None:
        """Check the training labels (``-1`` unlabelled) before training starts; default: ok."""

    def start_epoch(self, epoch: int) -> None:
        """Cheap per-process work at the start of ``epoch`` (default: nothing)."""

    def needs_training_latents(self, epoch: int) -> bool:
        """Whether ``epoch`` starts with :meth:`compute` on the whole training set."""
        return False

    @property
    def training_layers(self) -> tuple[str, ...]:
        """Layers :meth:`compute` needs in :class:`TrainingLatents` (default: :attr:`layers`)."""
        return tuple(name for name in self.layers if name != OUTPUT)

    def compute(self, latents: TrainingLatents, epoch: int) -> Any:
        """Work on the whole training set (one process); returns a picklable state."""
        raise NotImplementedError(f"{type(self).__name__} does not refresh from the training set")

    def install(self, state: Any) -> None:
        """Adopt the state :meth:`compute` returned (every process)."""
        raise NotImplementedError(f"{type(self).__name__} does not refresh from the training set")

    def forward(self, batch: Batch) -> Tensor:
        """The unweighted scalar loss term of ``batch``."""
        raise NotImplementedError

    def epoch_stats(self) -> dict[str, Any]:
        """Numbers to log at the end of an epoch (plain values; default: none)."""
        return {}

    def describe(self) -> str:
        """One line for logs: name and options."""
        values = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.options).items())
        return f"{self.name}({values})"


def zero_term(batch: Batch) -> Tensor:
    """An exact zero attached to the batch's graph (so backward works before any state)."""
    parts = [z.reshape(-1)[:0].sum() for z in batch.latents.values()]
    if batch.logits is not None:
        parts.append(batch.logits.reshape(-1)[:0].sum())
    if not parts:
        return torch.zeros(())
    return torch.stack(parts).sum()


def unique_keys(regularisers: Sequence[Regulariser]) -> list[str]:
    """Names that tell the regularisers apart in logs and checkpoints (``name``, ``name#2``).

    >>> from lcc.regularisers.smoothness import Smoothness
    >>> unique_keys([Smoothness(layers=["a", "b"]), Smoothness(layers=["b", "c"])])
    ['smoothness', 'smoothness#2']
    """
    keys: list[str] = []
    for reg in regularisers:
        key, count = reg.name, 1
        while key in keys:
            count += 1
            key = f"{reg.name}#{count}"
        keys.append(key)
    return keys


def check_regularisers(
    regularisers: Sequence[Regulariser], default_layers: Sequence[str] | None
) -> None:
    """Refuse anything but :class:`Regulariser` objects and regularisers without layers (after
    giving ``default_layers`` to those that name none)."""
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
