"""The latent k-means centroid loss of semi-supervised training (Karakulak et al., sec. 2.1-2.2).

For layers ``i`` with latents ``f_i(x)`` and learnable centroids ``C_ij`` (``J_i`` of them):

* ``l_c(x) = sum_i min_j ||f_i(x) - C_ij||^2`` (:func:`centroid_loss`, per sample);
* ``L = (1/N) sum_{labelled} (CE + beta l_c) + (1/M) sum_{unlabelled} beta l_c`` with ``N``, ``M``
  the labelled and unlabelled counts of the batch (:func:`semi_supervised_loss`).

The gradient of ``min_j`` reaches only the nearest centroid of each sample, so gradient steps on
the centroids alone move each one towards the mean of the latents it wins: k-means by gradient
descent. Centroids start from the latents of real samples, spread evenly over the classes
(:func:`init_centroids`).

>>> import torch
>>> z = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
>>> c = torch.tensor([[0.0, 1.0], [3.0, 3.0]])
>>> centroid_distances(z, c).tolist()
[[1.0, 18.0], [18.0, 1.0]]
>>> centroid_loss([z, z], [c, c]).tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lcc.errors import LCCInputError

__all__ = [
    "assignments",
    "centroid_distances",
    "centroid_loss",
    "centroid_term",
    "init_centroids",
    "nearest_centroids",
    "semi_supervised_loss",
    "spread_indices",
]

_HALF = (torch.float16, torch.bfloat16)


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if hasattr(value, "shape") else type(value).__name__


def _pair(z: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """``z`` and ``centroids``, checked, in their common floating dtype (float32 for half
    precision and integers), on ``z``'s device."""
    if not isinstance(z, Tensor) or not isinstance(centroids, Tensor):
        raise LCCInputError(
            f"z and centroids must be torch tensors, got {type(z).__name__} and "
            f"{type(centroids).__name__}"
        )
    if z.ndim != 2 or centroids.ndim != 2 or z.shape[1] != centroids.shape[1]:
        raise LCCInputError(
            f"z {_shape(z)} and centroids {_shape(centroids)} must be (B, D) and (J, D) with "
            "the same D; pool the latents to one row per sample"
        )
    if centroids.shape[0] == 0:
        raise LCCInputError("there are no centroids; pass at least one (J >= 1)")
    dtype = torch.promote_types(z.dtype, centroids.dtype)
    if dtype in _HALF or not dtype.is_floating_point:
        dtype = torch.float32
    return z.to(dtype), centroids.to(dtype=dtype, device=z.device)


def centroid_distances(z: Tensor, centroids: Tensor) -> Tensor:
    """Squared L2 distances ``(B, J)`` between latents ``z`` (B, D) and ``centroids`` (J, D).

    Computed as ``|z|^2 + |c|^2 - 2 z c^T`` (one matmul), clamped at 0. Half-precision inputs
    (autocast) are computed in float32; autocast is off inside (the expansion needs the
    precision).

    >>> centroid_distances(torch.ones(1, 3), torch.zeros(2, 3)).tolist()
    [[3.0, 3.0]]
    """
    a, c = _pair(z, centroids)
    with _no_autocast(z):
        squares = a.square().sum(1, keepdim=True) + c.square().sum(1)
        return torch.addmm(squares, a, c.T, alpha=-2.0).clamp_min(0.0)


def nearest_centroids(z: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """``(min_j ||z - C_j||^2 (B,), argmin_j (B,))``; the distance keeps the graph.

    The argmin minimises ``|C_j|^2 - 2 z.C_j`` (one matmul, no graph); the distance is then
    computed exactly as ``||z - C_argmin||^2`` with the gradient of ``min_j`` (to ``z`` and to
    the winning centroid only), so it has no cancellation error and costs one matmul in all.

    >>> d, j = nearest_centroids(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    >>> d.tolist(), j.tolist()
    ([1.0], [1])
    """
    a, c = _pair(z, centroids)
    with _no_autocast(z):
        with torch.no_grad():
            index = torch.addmm(c.square().sum(1), a, c.T, alpha=-2.0).argmin(dim=1)
        return _NearestDistance.apply(a, c, index), index


class _NearestDistance(torch.autograd.Function):
    """``||z_b - C_{index_b}||^2`` with the analytic gradients ``2 (z - C)`` and its negation
    summed per centroid (fewer passes over (B, D) than autograd's gather + square)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, centroids: Tensor, index: Tensor) -> Tensor:
        diff = z - centroids[index]
        ctx.save_for_backward(diff, index)
        ctx.n_centroids = centroids.shape[0]
        return torch.linalg.vecdot(diff, diff)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        diff, index = ctx.saved_tensors
        grad_z = diff * (2.0 * grad).unsqueeze(1)
        grad_c = None
        if ctx.needs_input_grad[1]:
            grad_c = grad_z.new_zeros(ctx.n_centroids, diff.shape[1])
            grad_c.index_add_(0, index, grad_z, alpha=-1.0)
        return (grad_z if ctx.needs_input_grad[0] else None), grad_c, None


def _no_autocast(z: Tensor) -> Any:
    if torch.is_autocast_enabled(z.device.type):
        return torch.autocast(device_type=z.device.type, enabled=False)
    return contextlib.nullcontext()


def assignments(z: Tensor, centroids: Tensor) -> Tensor:
    """(B,) int64 index of each row's nearest centroid (no gradient).

    >>> assignments(torch.tensor([[0.0], [5.0]]), torch.tensor([[4.0], [1.0]])).tolist()
    [1, 0]
    """
    with torch.no_grad():
        return nearest_centroids(z, centroids)[1]


def centroid_loss(latents: Sequence[Tensor], centroids: Sequence[Tensor]) -> Tensor:
    """Per-sample ``l_c(x) = sum_i min_j ||f_i(x) - C_ij||^2`` over the layers, shape (B,).

    ``latents[i]`` (B, D_i) and ``centroids[i]`` (J_i, D_i) belong to layer ``i``.

    >>> centroid_loss([torch.zeros(2, 1)], [torch.tensor([[1.0], [3.0]])]).tolist()
    [1.0, 1.0]
    """
    latents, centroids = list(latents), list(centroids)
    if not latents or len(latents) != len(centroids):
        raise LCCInputError(
            f"got {len(latents)} latent layer(s) and {len(centroids)} centroid set(s); "
            "pass one centroid set per layer (at least one layer)"
        )
    sizes = {int(z.shape[0]) if isinstance(z, Tensor) and z.ndim else -1 for z in latents}
    if len(sizes) != 1:
        raise LCCInputError(f"the layers hold different batch sizes {sorted(sizes)}")
    total = nearest_centroids(latents[0], centroids[0])[0]
    for z, c in zip(latents[1:], centroids[1:], strict=True):
        total = total + nearest_centroids(z, c)[0]
    return total


def _check_mask(values: Tensor, labeled: Tensor, name: str) -> Tensor:
    if not isinstance(values, Tensor) or values.ndim != 1:
        raise LCCInputError(f"{name} must be a (B,) tensor, got {_shape(values)}")
    mask = torch.as_tensor(labeled, device=values.device)
    if mask.dtype != torch.bool or mask.shape != values.shape:
        raise LCCInputError(
            f"labeled must be a bool mask of shape {tuple(values.shape)}, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    return mask


def _group_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; an exact 0 (on the graph) when the group is empty."""
    count = mask.sum().clamp_min(1)
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count


def centroid_term(lc: Tensor, labeled: Tensor) -> Tensor:
    """``(1/N) sum_labelled l_c + (1/M) sum_unlabelled l_c``; an empty group adds 0.

    This is the factor of ``beta`` in :func:`semi_supervised_loss`; with it, ``mean over the
    labelled samples of CE + beta * centroid_term`` is the paper's loss.

    >>> centroid_term(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([True, True, False])).item()
    12.0
    """
    mask = _check_mask(lc, labeled, "lc")
    return _group_mean(lc, mask) + _group_mean(lc, ~mask)


def semi_supervised_loss(ce_per_sample: Tensor, lc: Tensor, labeled: Tensor, beta: float) -> Tensor:
    """``(1/N) sum_labelled (CE + beta l_c) + (1/M) sum_unlabelled beta l_c`` (a scalar).

    ``N``, ``M``: labelled / unlabelled counts of the batch; an empty group adds 0. The CE of
    unlabelled rows is never read (it may hold anything, NaN included).

    >>> ce = torch.tensor([2.0, float("nan")])
    >>> semi_supervised_loss(ce, torch.tensor([1.0, 4.0]), torch.tensor([True, False]), 0.5)
    tensor(4.5000)
    """
    mask = _check_mask(lc, labeled, "lc")
    if not isinstance(ce_per_sample, Tensor) or ce_per_sample.shape != lc.shape:
        raise LCCInputError(
            f"ce_per_sample must have the shape of lc {tuple(lc.shape)}, got "
            f"{_shape(ce_per_sample)}; use cross_entropy(..., reduction='none')"
        )
    return _group_mean(ce_per_sample, mask) + beta * centroid_term(lc, mask)


def spread_indices(
    y: np.ndarray, n_centroids: int, generator: np.random.Generator | int | None = None
) -> np.ndarray:
    """Rows for ``n_centroids`` centroids, spread evenly over the labelled classes of ``y``.

    ``y`` (N,) holds class labels, ``-1`` for unlabelled rows. Each class gets
    ``n_centroids // C`` distinct rows and ``n_centroids % C`` random classes one more; a class
    with too few rows leaves its share to other labelled rows, then to unlabelled ones. Without
    labels, rows are drawn uniformly. Fewer rows than centroids -> LCCInputError.

    >>> rows = spread_indices(np.array([0, 0, 0, 1, 1, 1, -1]), 4, 0)
    >>> sorted(np.array([0, 0, 0, 1, 1, 1, -1])[rows].tolist())
    [0, 0, 1, 1]
    """
    labels = np.asarray(y)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise LCCInputError(f"y must be a 1-D integer label vector, got {labels.dtype} {_shape(y)}")
    if isinstance(n_centroids, bool) or not isinstance(n_centroids, (int, np.integer)):
        raise LCCInputError(f"n_centroids must be an integer, got {n_centroids!r}")
    if n_centroids < 1:
        raise LCCInputError(f"n_centroids must be at least 1, got {n_centroids}")
    if labels.size < n_centroids:
        raise LCCInputError(
            f"{n_centroids} centroids need as many samples to start from, but there are "
            f"{labels.size}; use fewer centroids"
        )
    rng = np.random.default_rng(generator)  # a Generator is returned as it is
    labeled = labels >= 0
    classes = np.unique(labels[labeled])
    if classes.size == 0:
        return rng.choice(labels.size, n_centroids, replace=False)
    quota = np.full(classes.size, n_centroids // classes.size)
    quota[rng.choice(classes.size, n_centroids % classes.size, replace=False)] += 1
    chosen: list[np.ndarray] = []
    for label, share in zip(classes, quota, strict=True):
        rows = rng.permutation(np.flatnonzero(labels == label))
        chosen.append(rows[:share])
    picked = np.concatenate(chosen)
    missing = n_centroids - picked.size
    if missing:
        taken = np.zeros(labels.size, dtype=bool)
        taken[picked] = True
        spare = [rng.permutation(np.flatnonzero(~taken & labeled)), np.flatnonzero(~labeled)]
        spare[1] = rng.permutation(spare[1])
        picked = np.concatenate([picked, np.concatenate(spare)[:missing]])
    return picked.astype(np.int64)


def init_centroids(
    latents: np.ndarray | Tensor,
    y: np.ndarray | Tensor,
    n_centroids: int,
    generator: np.random.Generator | int | None = None,
) -> np.ndarray | Tensor:
    """(J, D) centroids: latents of real samples spread evenly over the classes.

    Rows are chosen by :func:`spread_indices`; the result has the type (and, for tensors, the
    dtype and device) of ``latents``.

    >>> z = np.arange(12.0).reshape(6, 2)
    >>> init_centroids(z, np.array([0, 0, 0, 1, 1, 1]), 2, 0)[:, 0] // 6
    array([0., 1.])
    """
    labels = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if latents.ndim != 2 or latents.shape[0] != labels.shape[0]:
        raise LCCInputError(
            f"latents {_shape(latents)} must be (N, D) with one row per label ({labels.shape[0]})"
        )
    rows = spread_indices(labels, n_centroids, generator)
    if isinstance(latents, Tensor):
        return latents[torch.as_tensor(rows, device=latents.device)].clone()
    return np.array(latents[rows])
