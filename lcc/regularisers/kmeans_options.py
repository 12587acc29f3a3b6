"""Options of the ``kmeans`` regulariser, declared without torch (``--help-reg`` reads them).

>>> options = KMeansOptions(layers=["act1", "fc1"], centroids=["8", "4"], ramp="0")
>>> options.centroids, options.ramp, options.ramp_shape
([8, 4], 0, 'linear')
>>> KMeansOptions(centroids=[8, 0])
Traceback (most recent call last):
...
lcc.errors.LCCInputError: centroids per layer must all be >= 1, got [8, 0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcc.errors import LCCInputError, check_integer
from lcc.regularisers.options import OUTPUT, RegulariserOptions, option

__all__ = ["RAMP_SHAPES", "KMeansOptions"]

#: how beta rises after the warmup (:func:`lcc.regularisers.kmeans.ramp_factor`)
RAMP_SHAPES = ("linear", "sigmoid")


@dataclass
class KMeansOptions(RegulariserOptions):
    """Learnable k-means centroids on latents of labelled and unlabelled samples (beta = weight).

    The options of :class:`lcc.regularisers.kmeans.KMeansCentroids` (``weight`` is the paper's
    beta). The first paragraph above is the summary ``lcc train --help-reg`` prints.
    """

    weight: float = option(0.01, "beta: weight of the centroid term once ramped up")
    warmup: int = option(1, "epochs (from 0) with beta = 0 before the ramp starts")
    centroids: int | list[int] = option(  # noqa: RUF009 - an int, or a list copied per instance
        0, "centroids per layer: one number or one per layer; 0 = 2 x classes"
    )
    ramp: int = option(5, "epochs over which beta rises to weight after warmup (0: at once)")
    ramp_shape: str = option("linear", "shape of the ramp", choices=RAMP_SHAPES)
    reinit: int = option(
        3, "draw the centroids from real training latents at the start of epochs 0..reinit-1"
    )
    seed: int = option(0, "seed of the centroid draws (the trainer passes its --seed)")

    def check(self) -> None:
        super().check()
        if OUTPUT in self.layers:
            raise LCCInputError(
                "kmeans clusters hidden layers, not the logits; name layers from `lcc layers`"
            )
        self.centroids = _centroid_counts(self.centroids)
        self.ramp = check_integer(self.ramp, "ramp", low=0)
        self.reinit = check_integer(self.reinit, "reinit", low=1)
        self.seed = check_integer(self.seed, "seed", low=0)


def _centroid_counts(value: Any) -> int | list[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    counts = [check_integer(v, "centroids", low=0) for v in values]
    if len(counts) > 1 and 0 in counts:
        raise LCCInputError(f"centroids per layer must all be >= 1, got {counts}")
    return counts[0] if len(counts) == 1 else counts
