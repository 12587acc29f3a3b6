"""Options of the ``smoothness`` regulariser, declared without torch (``--help-reg`` reads them).

>>> SmoothnessOptions(layers=["act1", "fc1"], k="4").k
4
>>> SmoothnessOptions(layers=["act1"])
Traceback (most recent call last):
...
lcc.errors.LCCInputError: smoothness compares consecutive layers and needs at least 2, got ['act1']; pass layers=A,B[,...] in the order the data flows
"""  # noqa: E501

from __future__ import annotations

from dataclasses import dataclass

from lcc.errors import LCCInputError
from lcc.regularisers.label_variation_options import LGGOptions

__all__ = ["SmoothnessOptions", "check_layers"]


def check_layers(layers: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`LCCInputError` unless at least two layers are listed."""
    if len(layers) < 2:
        raise LCCInputError(
            f"smoothness compares consecutive layers and needs at least 2, got {list(layers)}; "
            "pass layers=A,B[,...] in the order the data flows"
        )


@dataclass
class SmoothnessOptions(LGGOptions):
    """Smoothness of label variation across consecutive layers (sec. 4.3, eq. 8; weight = gamma).

    The options of :class:`lcc.regularisers.smoothness.Smoothness`: those of
    :class:`lcc.regularisers.label_variation_options.LGGOptions`, with ``layers`` in forward
    order (at least two). The first paragraph above is the summary ``--help-reg`` prints.
    """

    def check(self) -> None:
        super().check()
        if self.layers:  # empty: the trainer's layers, checked at the first batch
            check_layers(self.layers)
