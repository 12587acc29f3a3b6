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

from lcc.regularisers.gkd_options import TeacherOptions
from lcc.regularisers.options import check_positive, option

__all__ = ["RelationalDistillationOptions"]


@dataclass
class RelationalDistillationOptions(TeacherOptions):
    """Distance-wise relational knowledge distillation, RKD-D (Park et al. 2019), from a frozen
    teacher: pairwise distances of the batch in teacher and student, each divided by its mean,
    compared with the Huber loss (mean over pairs); the LGG paper's Table 1 baseline to GKD.

    The options of :class:`lcc.regularisers.rkd.RelationalDistillation`: the teacher
    (:class:`lcc.regularisers.gkd_options.TeacherOptions`, as ``gkd``) and Huber's delta.
    The first paragraph above is the summary ``lcc train --help-reg`` prints.
    """

    delta: float = option(1.0, "Huber loss threshold (Park et al.: 1, i.e. smooth L1)")

    def check(self) -> None:
        super().check()
        self.delta = check_positive(self.delta, "delta")
