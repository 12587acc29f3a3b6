"""Distance-wise relational knowledge distillation, RKD-D (Park et al. 2019; LGG paper Table 1).

For a batch, the teacher's and the student's latents each give the matrix of pairwise Euclidean
distances, divided by its mean over the pairs of distinct samples (so the two spaces may have
different dimensions and scales); the term is the Huber (smooth L1) loss between the two
normalised matrices, averaged over the ``B (B - 1)`` ordered pairs of distinct samples, and
averaged over the pairs (teacher layer, student layer). Park et al. write the sum over pairs;
the mean keeps the weight's meaning independent of the batch size.

The teacher options are those of ``gkd`` (:mod:`lcc.regularisers.gkd`, whose teacher loading
this reuses): a model spec with ``teacher_checkpoint``, a checkpoint naming its model, or an
``nn.Module`` in Python. The teacher is frozen and kept out of ``state_dict``.

>>> import torch
>>> from lcc.regularisers.base import Batch
>>> teacher = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
>>> x = torch.randn(6, 3)
>>> reg = RelationalDistillation(teacher=teacher, teacher_layers=["1"], layers=["z"])
>>> with torch.no_grad():
...     same = teacher[1](teacher[0](x))
>>> batch = Batch(latents={"z": 3.0 * same}, y=None, indices=torch.arange(6), logits=None, x=x)
>>> round(float(reg(batch)), 9)  # a scaled copy of the teacher's geometry costs nothing
0.0
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcc.errors import LCCInputError
from lcc.regularisers.base import Batch
from lcc.regularisers.gkd import Distillation, GraphDistillation
from lcc.regularisers.label_variation import attached_zero
from lcc.regularisers.rkd_options import RelationalDistillationOptions

__all__ = ["RelationalDistillation", "RelationalDistillationOptions", "rkd_distance"]


def normalised_distances(z: Tensor) -> Tensor:
    """(B, B) pairwise Euclidean distances of the rows of ``z`` divided by their mean over the
    ``B (B - 1)`` pairs of distinct rows (Park et al.'s ``psi_D`` with ``mu``).

    >>> normalised_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]])).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """
    z = z.reshape(z.shape[0], -1)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    n = z.shape[0]
    squared = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    # the root of 0 has no derivative: the diagonal stays an exact 0, duplicates a tiny floor
    distances = torch.zeros_like(squared)
    distances[off] = squared[off].clamp_min(1e-12).sqrt()
    mean = distances[off].mean().clamp_min(1e-12)
    return distances / mean


def rkd_distance(teacher_z: Tensor, student_z: Tensor, delta: float = 1.0) -> Tensor:
    """RKD-D between two latent sets of the same batch (rows paired; dimensions may differ):
    mean over ordered pairs ``i != j`` of ``huber_delta(psi_S(i, j) - psi_T(i, j))``.

    >>> t = torch.tensor([[0.0], [1.0], [3.0]])
    >>> float(rkd_distance(t, 2 * t)), float(rkd_distance(t, t.flip(0))) > 0
    (0.0, True)
    """
    if teacher_z.shape[0] != student_z.shape[0]:
        raise LCCInputError(
            f"teacher and student latents have {teacher_z.shape[0]} and {student_z.shape[0]} "
            "rows; pass the same batch to both"
        )
    n = int(student_z.shape[0])
    if n < 2:
        return attached_zero(student_z)
    student = normalised_distances(student_z)
    target = normalised_distances(teacher_z.detach().to(student.device, student.dtype))
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    return F.huber_loss(student[off], target[off], delta=delta)


class RelationalDistillation(Distillation):
    """The ``rkd`` regulariser (summary and options: :class:`RelationalDistillationOptions`).

    Mean over the pairs (``teacher_layers[i]``, ``layers[i]``); dimensions may differ; needs the
    batch's inputs (``Batch.x``). Teacher options as ``gkd``.
    """

    name = "rkd"
    Options = RelationalDistillationOptions

    def _adopt(self, module: nn.Module | None) -> None:
        # gkd's teacher handling (building, freezing, hooks, devices), held outside the
        # submodules so that neither the teacher nor its runner enters state_dict()
        self._runner = [
            GraphDistillation(
                teacher=module if module is not None else self.options.teacher,
                teacher_checkpoint=self.options.teacher_checkpoint,
                teacher_layers=list(self.options.teacher_layers),
                teacher_pool=self.options.teacher_pool,
                layers=list(self.options.layers),
            )
        ]

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (None before :meth:`bind` builds it from a spec)."""
        return self._runner[0].teacher

    def set_default_layers(self, layers: Any) -> None:
        super().set_default_layers(layers)
        self._runner[0].set_default_layers(layers)

    def bind(self, model: nn.Module, *, num_classes: int, sample: Any = None) -> None:
        """Build (or adopt) the frozen teacher and validate its layers (as ``gkd``)."""
        self._runner[0].bind(model, num_classes=num_classes, sample=sample)

    def forward(self, batch: Batch) -> Tensor:
        teacher = self._runner[0]._teacher_latents(batch.x)
        terms = []
        for teacher_name, student_name in zip(self.teacher_layers, self.layers, strict=True):
            terms.append(
                rkd_distance(teacher[teacher_name], batch.layer(student_name), self.options.delta)
            )
        return torch.stack(terms).mean()
