"""Options of the latent geometry graph regularisers, declared without torch.

:class:`GraphOptions` (the batch's latent geometry graph, shared with ``gkd``),
:class:`LGGOptions` (plus the form of label variation, shared with ``smoothness``) and
:class:`LabelVariationOptions`; :mod:`lcc.regularisers.label_variation` computes the term.
Nothing here imports torch, so ``lcc train --help-reg label-variation`` starts fast.

>>> options = LabelVariationOptions(k="6", similarity="rbf", bandwidth="none")
>>> options.k, options.similarity, options.bandwidth, options.normalized
(6, 'rbf', None, True)
>>> LabelVariationOptions(bandwidth=0)
Traceback (most recent call last):
...
lcc.errors.LCCInputError: bandwidth must be a positive number, got 0.0
"""

from __future__ import annotations

from dataclasses import dataclass

from lcc.engine.choices import SIMILARITIES
from lcc.errors import check_integer
from lcc.regularisers.options import RegulariserOptions, check_positive, option

__all__ = ["GraphOptions", "LGGOptions", "LabelVariationOptions"]


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
        if self.bandwidth is not None:  # "none" and "" read as None by coerce
            self.bandwidth = check_positive(self.bandwidth, "bandwidth")


@dataclass
class LGGOptions(GraphOptions):
    """Graph options plus the form of label variation (label-variation and smoothness)."""

    normalized: bool = option(
        True,
        "normalised label variation (share of edge weight between distinct classes, 0..1); "
        "false: the raw sum of eq. 5, which grows with batch size and k",
    )


@dataclass
class LabelVariationOptions(LGGOptions):
    """Label variation of the batch's latent geometry graph, mean over its layers (sec. 4.2).

    The options of :class:`lcc.regularisers.label_variation.LabelVariation`: those of
    :class:`LGGOptions`. The first paragraph above is the summary ``lcc train --help-reg``
    prints.
    """
