"""Options of the ``rkd`` regulariser, declared without torch (``--help-reg`` reads them).

>>> RelationalDistillationOptions(teacher="small-cnn", delta="0.5").delta
0.5
>>> RelationalDistillationOptions(teacher="small-cnn", delta=0)
Traceback (most recent call last):
...
lcc.errors.LCCInputError: delta must be a positive number, got 0.0
"""

from __future__ import annotations

from dataclasses import dataclass

from lcc.engine.choices import POOLS
from lcc.errors import LCCInputError, check_choice, check_number
from lcc.regularisers.options import RegulariserOptions, option

__all__ = ["RelationalDistillationOptions"]


@dataclass
class RelationalDistillationOptions(RegulariserOptions):
    """Distance-wise relational knowledge distillation, RKD-D (Park et al. 2019), from a frozen
    teacher: pairwise distances of the batch in teacher and student, each divided by its mean,
    compared with the Huber loss (mean over pairs); the LGG paper's Table 1 baseline to GKD.

    The options of :class:`lcc.regularisers.rkd.RelationalDistillation`: the teacher (as
    ``gkd``) and Huber's delta. The first paragraph above is the summary ``lcc train
    --help-reg`` prints.
    """

    teacher: str = option(
        "", "teacher: model spec (small-resnet, hf:NAME, ...) or a checkpoint naming its model"
    )
    teacher_checkpoint: str | None = option(None, "weights of the teacher spec (a checkpoint)")
    teacher_layers: list[str] = option(  # noqa: RUF009 - copied per instance
        [], "teacher layers, paired in order with `layers` (default: the same names)"
    )
    teacher_pool: str = option("flatten", "pooling of the teacher's layer outputs", choices=POOLS)
    delta: float = option(1.0, "Huber loss threshold (Park et al.: 1, i.e. smooth L1)")

    def check(self) -> None:
        super().check()
        check_choice(self.teacher_pool, POOLS, name="teacher_pool")
        self.delta = check_number(self.delta, "delta")
        if not self.delta > 0:
            raise LCCInputError(f"delta must be a positive number, got {self.delta!r}")
