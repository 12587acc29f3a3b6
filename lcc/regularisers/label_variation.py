"""Label variation of the batch's latent geometry graph as a loss (LGG paper, sec. 4.2).

The term is the mean over the chosen layers of the label variation (def. 6, eq. 5) of the LGG
that the batch's *labelled* samples form at that layer (:mod:`lcc.engine.lgg`): small when
samples of distinct classes are not neighbours. The trainer adds ``weight * term`` to the
cross-entropy; the paper's sec. 4.2 also trains on it alone (output layer, ``layers=output``):
call ``reg(batch)`` as the loss in a custom loop for that.

Shared here by the LGG regularisers: :func:`layer_variations` (label variation of each layer's
latents, for any batch size); their options (:class:`GraphOptions`, :class:`LGGOptions`) are
declared without torch in :mod:`lcc.regularisers.label_variation_options`.

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

import torch
from torch import Tensor

from lcc.engine.lgg import batch_graph, label_variation
from lcc.errors import LCCInputError
from lcc.regularisers.base import Batch, Regulariser
from lcc.regularisers.label_variation_options import (
    GraphOptions,
    LabelVariationOptions,
    LGGOptions,
)

__all__ = [
    "GraphOptions",
    "LGGOptions",
    "LabelVariation",
    "LabelVariationOptions",
    "attached_zero",
    "layer_variations",
]


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


class LabelVariation(Regulariser):
    """The ``label-variation`` regulariser (summary and options: :class:`LabelVariationOptions`).

    Per layer: LGG of the labelled samples of the batch (k-NN by cosine or RBF similarity,
    union-symmetrised, optionally degree-normalised), then the summed (``normalized=false``)
    or normalised weight of its edges between distinct classes. ``layers=output`` reads the
    logits, as the paper's objective does.
    """

    name = "label-variation"
    Options = LabelVariationOptions

    def forward(self, batch: Batch) -> Tensor:
        return layer_variations(batch, self.layers, self.options).mean()
