"""Smooth label variation across layers, for robustness (LGG paper, sec. 4.3, eq. 8).

The term is ``sum_l |sigma(l+1) - sigma(l)|`` over consecutive chosen layers, ``sigma(l)`` the
label variation of the batch's LGG at layer ``l`` (labelled samples only; graph options as in
:class:`lcc.regularisers.label_variation.LGGOptions`). List the layers in the order the data
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

from dataclasses import dataclass

from torch import Tensor

from lcc.engine.lgg import smoothness
from lcc.errors import LCCInputError
from lcc.regularisers.base import Batch, Regulariser
from lcc.regularisers.label_variation import LGGOptions, layer_variations

__all__ = ["Smoothness", "SmoothnessOptions"]


def _check_layers(layers: list[str] | tuple[str, ...]) -> None:
    if len(layers) < 2:
        raise LCCInputError(
            f"smoothness compares consecutive layers and needs at least 2, got {list(layers)}; "
            "pass layers=A,B[,...] in the order the data flows"
        )


@dataclass
class SmoothnessOptions(LGGOptions):
    """Options of :class:`Smoothness`: the LGG options; ``layers`` in forward order (>= 2)."""

    def check(self) -> None:
        super().check()
        if self.layers:  # empty: the trainer's layers, checked at the first batch
            _check_layers(self.layers)


class Smoothness(Regulariser):
    """Smoothness of label variation across consecutive layers (sec. 4.3, eq. 8; weight = gamma).

    ``sum_l |sigma(l+1) - sigma(l)|`` with ``sigma(l)`` the label variation of the batch's latent
    geometry graph at the l-th listed layer; layers in forward order, at least two.
    """

    name = "smoothness"
    Options = SmoothnessOptions

    def forward(self, batch: Batch) -> Tensor:
        _check_layers(self.layers)
        return smoothness(layer_variations(batch, self.layers, self.options))
