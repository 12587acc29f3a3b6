"""Smooth label variation across layers, for robustness (LGG paper, sec. 4.3, eq. 8).

The term is ``sum_l |sigma(l+1) - sigma(l)|`` over consecutive chosen layers, ``sigma(l)`` the
label variation of the batch's LGG at layer ``l`` (labelled samples only; graph options as in
:class:`lcc.regularisers.label_variation_options.LGGOptions`). List the layers in the order the data
flows through them; ``weight`` is the paper's gamma.

>>> import torch
>>> from lcc.regularisers.base import Batch
>>> y = torch.tensor([0, 0, 1, 1])
>>> mixed = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.1, 1.0], [1.0, 0.1]])
>>> apart = torch.tensor([[0.0, 1.0], [0.1, 1.0], [1.0, 0.0], [1.0, 0.1]])
>>> batch = Batch(latents={"a": mixed, "b": apart}, y=y, indices=torch.arange(4),
...               logits=torch.zeros(4, 2))
>>> float(Smoothness(layers=["a", "b"], k=1)(batch))
1.0
"""

from __future__ import annotations

from torch import Tensor

from lcc.engine.lgg import smoothness
from lcc.regularisers.base import Batch, Regulariser
from lcc.regularisers.label_variation import layer_variations
from lcc.regularisers.smoothness_options import SmoothnessOptions, check_layers

__all__ = ["Smoothness", "SmoothnessOptions"]


class Smoothness(Regulariser):
    """The ``smoothness`` regulariser (summary and options: :class:`SmoothnessOptions`).

    ``sum_l |sigma(l+1) - sigma(l)|`` with ``sigma(l)`` the label variation of the batch's latent
    geometry graph at the l-th listed layer; layers in forward order, at least two.
    """

    name = "smoothness"
    Options = SmoothnessOptions

    def forward(self, batch: Batch) -> Tensor:
        check_layers(self.layers)
        return smoothness(layer_variations(batch, self.layers, self.options))
