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

A new regulariser is one file: an options dataclass built with :func:`option` (its help texts
feed ``lcc train --help-reg NAME``) and a subclass that sets ``name`` and ``Options``; then one
line in :mod:`lcc.regularisers` registers it.

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
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lcc.errors import LCCInputError, check_integer, check_number

__all__ = [
    "OUTPUT",
    "Batch",
    "Regulariser",
    "RegulariserOptions",
    "TrainingLatents",
    "option",
]

#: Pseudo layer name of the model's output (the logits), accepted wherever layers are named.
OUTPUT = "output"


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field of a regulariser's options, with the help text ``--help-reg`` shows."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RegulariserOptions:
    """Options every regulariser has; subclasses add their own fields after these.

    ``layers``: the submodules it reads (names from ``lcc layers MODEL``; ``output`` is the
    model's logits; empty: the trainer's default layer); ``weight``: factor of its term in the
    loss; ``warmup``: epochs (from 0) during which the term is off.
    """

    layers: list[str] = option(  # noqa: RUF009 - copied per instance
        [], "layers it reads (`lcc layers MODEL`; 'output' = the logits)"
    )
    weight: float = option(0.1, "weight of its term in CE + sum of weighted terms")
    warmup: int = option(0, "epochs without this term at the start")

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, str):
                setattr(self, item.name, _from_text(value, str(item.type), item.name))
        self.check()

    def check(self) -> None:
        """Validate values; subclasses extend it (call ``super().check()``)."""
        layers = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        names: list[str] = []
        for entry in layers:
            if not isinstance(entry, str):
                raise LCCInputError(f"layers must be layer names, got {entry!r}")
            names.extend(part.strip() for part in entry.split(",") if part.strip())
        if len(set(names)) != len(names):
            raise LCCInputError(f"layers lists a layer twice: {names}")
        self.layers = names
        self.weight = check_number(self.weight, "weight", low=0.0)
        self.warmup = check_integer(self.warmup, "warmup", low=0)


def _from_text(text: str, annotation: str, name: str) -> Any:
    """A value given as text (``--reg NAME:key=value``) converted to the field's annotated type.

    >>> _from_text("3", "int | None", "k"), _from_text("none", "int | None", "k")
    (3, None)
    >>> _from_text("yes", "bool", "squared"), _from_text("0.5", "float", "weight")
    (True, 0.5)
    """
    kinds = {part.strip() for part in annotation.split("|")}
    value = text.strip()
    if "None" in kinds and value.lower() in ("none", "null", ""):
        return None
    if "bool" in kinds:
        lowered = value.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise LCCInputError(f"{name} must be true or false, got {text!r}")
    try:
        if "int" in kinds and value.lstrip("-").isdigit():
            return int(value)
        if "float" in kinds:
            return float(value)
    except ValueError:
        raise LCCInputError(f"{name} must be a number, got {text!r}") from None
    if kinds & {"list[str]", "Sequence[str]"}:
        return [part.strip() for part in value.split(",") if part.strip()]
    return text


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
        if self.y is None:
            raise LCCInputError("this regulariser needs the batch's labels: pass y")
        return self.y >= 0

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
    older than the previous epoch.
    """

    latents: dict[str, np.ndarray]
    y: np.ndarray
    predictions: np.ndarray | None
    source: str
    seconds: float
    stale: int = 0


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


def make_options(
    cls: type[RegulariserOptions],
    options: RegulariserOptions | None,
    overrides: Mapping[str, Any],
    owner: str = "",
) -> Any:
    """``options`` (or the defaults) with ``overrides`` applied, validated.

    >>> make_options(RegulariserOptions, None, {"weight": "0.5"}).weight
    0.5
    >>> make_options(RegulariserOptions, None, {"wieght": 1}, "lcc")
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: unknown option 'wieght' of lcc (did you mean 'weight'?); valid: layers, warmup, weight
    """  # noqa: E501
    import difflib

    known = [item.name for item in dataclasses.fields(cls)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LCCInputError(
                f"unknown option {key!r} of {owner or cls.__name__}{hint}; "
                f"valid: {', '.join(sorted(known))}"
            )
        changes[name] = value
    if options is None:
        return cls(**changes)
    if not isinstance(options, cls):
        raise LCCInputError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    return dataclasses.replace(options, **changes) if changes else options


def zero_term(batch: Batch) -> Tensor:
    """An exact zero attached to the batch's graph (so backward works before any state)."""
    parts = [z.reshape(-1)[:0].sum() for z in batch.latents.values()]
    if batch.logits is not None:
        parts.append(batch.logits.reshape(-1)[:0].sum())
    if not parts:
        return torch.zeros(())
    return torch.stack(parts).sum()
