"""Label variation of the batch's latent geometry graph as a loss (LGG paper, sec. 4.2).

The term is the mean over the chosen layers of the label variation (def. 6, eq. 5) of the LGG
that the batch's *labelled* samples form at that layer (:mod:`lcc.engine.lgg`): small when
samples of distinct classes are not neighbours. The trainer adds ``weight * term`` to the
cross-entropy; the paper's sec. 4.2 also trains on it alone (output layer, ``layers=output``):
call ``reg(batch)`` as the loss in a custom loop for that.

Shared here by the LGG regularisers: :class:`GraphOptions` / :class:`LGGOptions` and
:func:`layer_variations` (label variation of each layer's latents, for any batch size).

>>> import torch
>>> from lcc.regularisers.base import Batch
>>> z = torch.tensor([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.1]], requires_grad=True)
>>> batch = Batch(latents={"fc": z}, y=torch.tensor([0, 0, 1, 1]), indices=torch.arange(4),
...               logits=torch.zeros(4, 2))
>>> float(LabelVariation(layers=["fc"], k=1)(batch).detach())
0.0
>>> float(LabelVariation(layers=["fc"], k=2)(batch).detach()) > 0
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lcc.engine.lgg import SIMILARITIES, batch_graph, label_variation
from lcc.errors import LCCInputError, check_choice, check_integer, check_number
from lcc.regularisers.base import (
    Batch,
    Regulariser,
    RegulariserOptions,
    option,
)

__all__ = [
    "GraphOptions",
    "LGGOptions",
    "LabelVariation",
    "LabelVariationOptions",
    "attached_zero",
    "layer_variations",
]

_NONE = ("", "none", "auto", "null")


@dataclass
class GraphOptions(RegulariserOptions):
    """Options of the batch latent geometry graph (sec. 3.3), shared by the LGG regularisers."""

    k: int = option(10, "neighbours per sample in the batch's latent geometry graph")
    similarity: str = option(
        "auto",
        "edge similarity: cosine, rbf (of the L2 distance), auto = cosine if latents >= 0",
        choices=SIMILARITIES,
    )
    bandwidth: float | None = option(
        None, "RBF h in exp(-d^2/h^2); default: RMS distance between the batch's samples"
    )
    normalize: bool = option(
        False,
        "degree-normalise the graph (D^-1/2 A D^-1/2). Departs from the LGG paper, whose "
        "experiments normalise (sec. 3.3.2): measured within the seed spread of the paper's "
        "graph (README, Table 3 in miniature); true is the paper's graph",
    )

    def check(self) -> None:
        super().check()
        self.k = check_integer(self.k, "k", 1)
        check_choice(self.similarity, SIMILARITIES, name="similarity")
        if self.bandwidth is None or (
            isinstance(self.bandwidth, str) and self.bandwidth.strip().lower() in _NONE
        ):
            self.bandwidth = None
        else:
            value = check_number(self.bandwidth, "bandwidth")
            if not value > 0:
                raise LCCInputError(f"bandwidth must be a positive number, got {self.bandwidth!r}")
            self.bandwidth = value


@dataclass
class LGGOptions(GraphOptions):
    """Graph options plus the form of label variation (label-variation and smoothness)."""

    normalized: bool = option(
        True,
        "normalised label variation (share of edge weight between distinct classes, 0..1); "
        "false: the raw sum of eq. 5, which grows with batch size and k",
    )


def attached_zero(z: Tensor) -> Tensor:
    """An exact zero attached to ``z`` (float32 for half precision, as the graph is)."""
    zero = z.reshape(-1)[:0].sum()
    return zero.float() if zero.dtype in (torch.float16, torch.bfloat16) else zero


def layer_variations(batch: Batch, layers: tuple[str, ...], options: LGGOptions) -> Tensor:
    """(layers,) label variation of each layer's LGG on the batch's labelled samples.

    The graphs of all layers are built together (:func:`lcc.engine.lgg.batch_graph` on the
    list). Batches with at most ``k`` labelled rows use ``k = rows - 1`` (complete graphs);
    with fewer than two rows the terms are exact zeros attached to the latents.
    """
    if not layers:
        raise LCCInputError("no layer to read; pass layers=NAME[,NAME...] (or the trainer's)")
    labeled = batch.labeled
    latents = [batch.layer(name) for name in layers]
    y = batch.labels
    if not bool(labeled.all()):  # the usual case keeps every row: no copy of the latents
        latents = [z[labeled] for z in latents]
        y = y[labeled]
    n = int(y.shape[0])
    if n < 2:
        return torch.stack([attached_zero(z) for z in latents])
    graph = batch_graph(
        latents,
        min(options.k, n - 1),
        similarity=options.similarity,
        bandwidth=options.bandwidth,
        normalize=options.normalize,
    )
    return label_variation(graph, y, normalized=options.normalized)


@dataclass
class LabelVariationOptions(LGGOptions):
    """Options of :class:`LabelVariation` (the graph options of :class:`LGGOptions`)."""


class LabelVariation(Regulariser):
    """Label variation of the batch's latent geometry graph, mean over its layers (sec. 4.2).

    Per layer: LGG of the labelled samples of the batch (k-NN by cosine or RBF similarity,
    union-symmetrised, optionally degree-normalised), then the summed (``normalized=false``)
    or normalised weight of its edges between distinct classes. ``layers=output`` reads the
    logits, as the paper's objective does.
    """

    name = "label-variation"
    Options = LabelVariationOptions

    def forward(self, batch: Batch) -> Tensor:
        return layer_variations(batch, self.layers, self.options).mean()
