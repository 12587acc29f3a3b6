"""The LCC clustering loss (paper eq. 8): pull correctible latents towards their targets.

For a batch whose correctible rows are ``R`` (with targets ``t_i``) in dimension ``d``:

* default: ``L = mean_{i in R} ||z_i - t_i|| / sqrt(d)`` (eq. 8, the paper's loss);
* ``squared=True``: ``L = mean_{i in R} ||z_i - t_i||^2 / sqrt(d)`` (the poster's Louvain loss,
  ``1 / (N_miss sqrt(d)) sum ||z - T(z)||^2``).

``L`` is an exact zero, still attached to the graph of ``z`` (its gradient is zero), when ``R`` is
empty. Targets are constants: gradients reach ``z`` only.

>>> import torch
>>> z = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)
>>> lcc_loss(z, torch.zeros(2, 2), mask=torch.tensor([True, False]))
tensor(3.5355, grad_fn=<DivBackward0>)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lcc.engine.projection import Projection
from lcc.engine.targets import Targets
from lcc.errors import LCCInputError

__all__ = ["LCCLoss", "lcc_loss"]

_HALF = (torch.float16, torch.bfloat16)


def lcc_loss(
    z: Tensor, targets: Tensor | np.ndarray, *, squared: bool = False, mask: Tensor | None = None
) -> Tensor:
    """Mean over rows of ``||z_i - t_i|| / sqrt(d)`` (``squared``: ``||z_i - t_i||^2 / sqrt(d)``).

    ``z`` (B, ...) is flattened to (B, d); ``targets`` holds B rows of d values (cast to z's dtype
    and device, never differentiated). With ``mask`` (B,) bool, only rows where it is True count
    (the mean is over those rows; an exact, differentiable 0 when there are none). float16 and
    bfloat16 latents (mixed precision) are compared with the float32 targets in float32, with
    autocast off: a half-precision difference of two close vectors loses most of its digits.
    The result has z's dtype.
    """
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise LCCInputError(f"z must be a floating-point torch tensor, got {_describe(z)}")
    flat = _flatten(z)
    batch, dim = flat.shape
    target = torch.as_tensor(targets, device=z.device).detach().to(_working(z.dtype))
    if target.shape[0] != batch or target[0:1].numel() * batch != target.numel():
        raise LCCInputError(
            f"targets have shape {tuple(target.shape)} but z has {batch} rows of {dim} values; "
            "pass one target row per latent row"
        )
    target = target.reshape(batch, -1)
    if target.shape[1] != dim:
        raise LCCInputError(
            f"targets have dimension {target.shape[1]} but z has dimension {dim}; "
            "compute targets in the same latent space"
        )
    if batch == 0 or dim == 0:
        return _zero(z)
    with _full_precision(z):
        return _masked_mean(flat.to(target.dtype), target, mask, squared).to(z.dtype)


def _working(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision latents (mixed precision), else their own dtype."""
    return torch.float32 if dtype in _HALF else dtype


def _full_precision(z: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off: distances to the targets are computed in the working dtype (no context
    when autocast is not on: entering one costs a tenth of the loss's time)."""
    if not torch.is_autocast_enabled(z.device.type):
        return contextlib.nullcontext()
    return torch.autocast(z.device.type, enabled=False)


def _masked_mean(
    flat: Tensor,
    target: Tensor,
    mask: Tensor | None,
    squared: bool,
    reduce_count: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    diff = flat - target
    accumulate = torch.float32 if flat.dtype in _HALF else None
    if squared:
        per_row = diff.square().sum(dim=1, dtype=accumulate)
    else:
        per_row = torch.linalg.vector_norm(diff, dim=1, dtype=accumulate)
    scale = math.sqrt(flat.shape[1])
    if mask is None:
        return (per_row.sum() / (flat.shape[0] * scale)).to(flat.dtype)
    if mask.shape != (flat.shape[0],):
        raise LCCInputError(f"mask must have shape ({flat.shape[0]},), got {tuple(mask.shape)}")
    mask = mask.to(flat.device, torch.bool)
    total = torch.where(mask, per_row, 0).sum()
    count = mask.sum().to(per_row.dtype)
    count = count.clamp(min=1) if reduce_count is None else reduce_count(count)
    return (total / (count * scale)).to(flat.dtype)


def _flatten(z: Tensor) -> Tensor:
    """(B, ...) -> (B, d), also for an empty batch."""
    return z.reshape(z.shape[0], math.prod(z.shape[1:]))


def _zero(z: Tensor) -> Tensor:
    """An exact 0 of z's dtype that backpropagates (a sum over an empty slice of z)."""
    return z.reshape(-1)[:0].sum()


def _describe(value: object) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__


class LCCLoss(torch.nn.Module):
    """Eq. 8 on a batch: ``forward(z, indices)`` with ``indices`` the batch's dataset ids.

    Targets live in buffers, so ``.to(device)`` moves them and ``state_dict`` saves them:
    ``rows`` (N,) int64 maps a dataset id to its row of ``vectors`` (M, D) float32 (-1: not
    correctible). With a :class:`~lcc.engine.projection.Projection`, latents are projected
    (``(z - mean) @ components``) before comparing them with the targets.

    >>> import numpy as np, torch
    >>> from lcc.engine.targets import Targets
    >>> loss = LCCLoss(Targets(np.array([1]), np.zeros((1, 4), np.float32), n_samples=3))
    >>> z = torch.full((2, 2, 2), 2.0, requires_grad=True)
    >>> loss(z, torch.tensor([0, 1]))  # only sample 1 is correctible: ||(2, 2, 2, 2)|| / sqrt(4)
    tensor(2., grad_fn=<DivBackward0>)
    """

    rows: Tensor
    vectors: Tensor
    projection_mean: Tensor
    projection_components: Tensor

    def __init__(
        self,
        targets: Targets | None = None,
        *,
        projection: Projection | None = None,
        squared: bool = False,
    ) -> None:
        super().__init__()
        self.squared = bool(squared)
        self.register_buffer("rows", torch.empty(0, dtype=torch.int64))
        self.register_buffer("vectors", torch.empty(0, 0))
        self.register_buffer("projection_mean", torch.empty(0))
        self.register_buffer("projection_components", torch.empty(0, 0))
        self.set_targets(targets, projection)

    # -- state -----------------------------------------------------------------------------
    def set_targets(self, targets: Targets | None, projection: Projection | None = None) -> None:
        """Replace the targets (and projection); ``None`` clears them (the loss becomes 0)."""
        device = self.rows.device
        if projection is None:
            mean, components = torch.empty(0), torch.empty(0, 0)
        else:
            mean = torch.as_tensor(np.asarray(projection.mean, dtype=np.float32))
            components = torch.as_tensor(np.asarray(projection.components, dtype=np.float32))
            if mean.ndim != 1 or components.ndim != 2 or components.shape[0] != mean.shape[0]:
                raise LCCInputError(
                    f"projection needs mean (D,) and components (D, p), got {tuple(mean.shape)} "
                    f"and {tuple(components.shape)}"
                )
        if targets is None:
            rows, vectors = torch.empty(0, dtype=torch.int64), torch.empty(0, 0)
        else:
            if projection is not None and targets.dim != components.shape[1]:
                raise LCCInputError(
                    f"targets have dimension {targets.dim} but the projection maps to "
                    f"{components.shape[1]}; pass the projection the targets were computed in"
                )
            lookup = np.full(targets.n_samples, -1, dtype=np.int64)
            lookup[targets.indices] = np.arange(targets.n_correctible)
            rows, vectors = torch.from_numpy(lookup), torch.from_numpy(targets.vectors.copy())
        self.rows = rows.to(device)
        self.vectors = vectors.to(device)
        self.projection_mean = mean.to(device)
        self.projection_components = components.to(device)

    @property
    def has_targets(self) -> bool:
        """Whether targets are set (possibly with no correctible sample)."""
        return self.rows.numel() > 0

    @property
    def n_samples(self) -> int:
        """Dataset size N the targets refer to (0 when none are set)."""
        return int(self.rows.shape[0])

    @property
    def dim(self) -> int:
        """Dimension D of the targets (the projected dimension when a projection is set)."""
        return int(self.vectors.shape[1])

    @property
    def projection(self) -> Projection | None:
        """The projection applied to latents before the comparison (rebuilt from the buffers)."""
        if self.projection_components.numel() == 0:
            return None
        return Projection(
            self.projection_mean.detach().cpu().numpy(),
            self.projection_components.detach().cpu().numpy(),
        )

    @property
    def n_correctible(self) -> int:
        """Number of correctible samples M."""
        return int(self.vectors.shape[0])

    def extra_repr(self) -> str:
        projected = self.projection_components.numel() > 0
        return (
            f"n_samples={self.n_samples}, n_correctible={self.n_correctible}, dim={self.dim}, "
            f"squared={self.squared}, projection={projected}"
        )

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Target buffers change shape at every refresh: adopt the saved shapes before copying.
        for name in ("rows", "vectors", "projection_mean", "projection_components"):
            saved = state_dict.get(prefix + name)
            current = self._buffers[name]
            if isinstance(saved, Tensor) and current is not None and saved.shape != current.shape:
                self._buffers[name] = torch.empty(
                    saved.shape, dtype=current.dtype, device=current.device
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- loss ------------------------------------------------------------------------------
    def forward(
        self, z: Tensor, indices: Tensor, *, reduce_count: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """Loss of a batch: z (B, ...) latents, indices (B,) their dataset ids.

        ``reduce_count`` maps the batch's number of correctible rows to the number the mean
        divides by (default: itself, at least 1). Under data parallelism give it the count over
        all processes divided by their number: the averaged gradients are then those of the
        mean over the whole global batch (:func:`lcc.regularisers.lcc.count_over_processes`).
        """
        if not isinstance(z, Tensor) or not z.is_floating_point() or z.ndim < 1:
            raise LCCInputError(f"z must be a floating-point (B, ...) tensor, got {_describe(z)}")
        flat = _flatten(z)
        indices = self._check_indices(indices, flat.shape[0])
        if self.rows.device != flat.device:
            self.to(flat.device)
        with _full_precision(z):
            working = flat.to(_working(flat.dtype))
            return self._loss(z, working, indices, reduce_count).to(z.dtype)

    def _loss(
        self,
        z: Tensor,
        flat: Tensor,
        indices: Tensor,
        reduce_count: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """:meth:`forward` on flattened latents in the working dtype, autocast off."""
        if self.projection_components.numel() > 0:
            if flat.shape[1] != self.projection_mean.shape[0]:
                raise LCCInputError(
                    f"z has dimension {flat.shape[1]} but the projection expects "
                    f"{self.projection_mean.shape[0]}; pass latents of the layer it was fit on"
                )
            mean = self.projection_mean.to(flat.dtype)
            flat = (flat - mean) @ self.projection_components.to(flat.dtype)
        if not self.has_targets:
            return _zero(z)
        if flat.shape[1] != self.vectors.shape[1]:
            raise LCCInputError(
                f"z has dimension {flat.shape[1]} but the targets have {self.vectors.shape[1]}; "
                "refresh the targets on this layer's latents"
            )
        if self.vectors.shape[0] == 0 or flat.shape[0] == 0:
            return _zero(z)
        rows = self.rows[indices.to(flat.device, non_blocking=True)]
        mask = rows >= 0
        target = self.vectors[rows.clamp(min=0)].to(flat.dtype)
        return _masked_mean(flat, target, mask, self.squared, reduce_count)

    def _check_indices(self, indices: object, batch: int) -> Tensor:
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(np.asarray(indices))
        if indices.ndim != 1 or indices.shape[0] != batch:
            raise LCCInputError(
                f"indices must have shape ({batch},) (one dataset id per batch row), "
                f"got {tuple(indices.shape)}"
            )
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise LCCInputError(f"indices must be integer dataset ids, got {indices.dtype}")
        if self.has_targets and batch and indices.device.type == "cpu":
            low, high = torch.aminmax(indices)
            if int(low) < 0 or int(high) >= self.n_samples:
                raise LCCInputError(
                    f"indices must lie in [0, {self.n_samples}) (the dataset the targets were "
                    f"computed on), got values in [{int(low)}, {int(high)}]"
                )
        return indices
