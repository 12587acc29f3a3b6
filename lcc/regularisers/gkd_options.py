"""Options of the ``gkd`` regulariser, declared without torch (``--help-reg`` reads them).

>>> options = GraphDistillationOptions(teacher=" small-cnn ", teacher_layers="act1,fc1",
...                                    layers=["a", "b"])
>>> options.teacher, options.teacher_layers, options.normalize
('small-cnn', ['act1', 'fc1'], True)
>>> GraphDistillationOptions(teacher="small-cnn", teacher_layers=["act1"], layers=["a", "b"])
Traceback (most recent call last):
...
lcc.errors.LCCInputError: teacher_layers ['act1'] and layers ['a', 'b'] pair up in order and need the same count; list one teacher layer per student layer
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lcc.engine.choices import POOLS
from lcc.errors import LCCInputError
from lcc.regularisers.label_variation_options import GraphOptions
from lcc.regularisers.options import RegulariserOptions, option

__all__ = ["GraphDistillationOptions", "TeacherOptions", "check_pairs"]


def check_pairs(teacher_layers: Sequence[str], layers: Sequence[str]) -> None:
    """Raise :class:`LCCInputError` unless each student layer has one teacher layer."""
    if len(teacher_layers) != len(layers):
        raise LCCInputError(
            f"teacher_layers {list(teacher_layers)} and layers {list(layers)} pair up in order "
            "and need the same count; list one teacher layer per student layer"
        )


@dataclass
class TeacherOptions(RegulariserOptions):
    """The frozen teacher of a distillation regulariser (``gkd``, ``rkd``) and its layers.

    >>> TeacherOptions(teacher="small-cnn", teacher_checkpoint=" ", teacher_layers="act1").teacher_layers
    ['act1']
    """  # noqa: E501

    teacher: str = option(
        "", "teacher: model spec (small-resnet, hf:NAME, ...) or a checkpoint naming its model"
    )
    teacher_checkpoint: str | None = option(None, "weights of the teacher spec (a checkpoint)")
    teacher_layers: list[str] = option(  # noqa: RUF009 - copied per instance
        [], "teacher layers, paired in order with `layers` (default: the same names)"
    )
    teacher_pool: str = option("flatten", "pooling of the teacher's layer outputs", choices=POOLS)

    def check(self) -> None:
        super().check()  # the fields' kinds and choices are already checked (coerce)
        self.teacher = self.teacher.strip()
        checkpoint = self.teacher_checkpoint
        self.teacher_checkpoint = (checkpoint.strip() or None) if checkpoint else None
        if self.layers and self.teacher_layers:
            check_pairs(self.teacher_layers, self.layers)


@dataclass
class GraphDistillationOptions(GraphOptions, TeacherOptions):
    """Graph knowledge distillation from a frozen teacher (sec. 4.1, eq. 7).

    The options of :class:`lcc.regularisers.gkd.GraphDistillation`: the graph options of
    :class:`lcc.regularisers.label_variation_options.GraphOptions`, the teacher and its layers
    (:class:`TeacherOptions`). The first paragraph above is the summary ``lcc train
    --help-reg`` prints.
    """

    distinct_classes: bool = option(
        False, "build both graphs between labelled samples of distinct classes only"
    )
    normalize: bool = option(True, "degree-normalise both graphs (the paper's GKD)")
