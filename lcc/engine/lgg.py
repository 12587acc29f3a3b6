"""Latent geometry graphs (LGG) of a batch, label variation, its smoothness, and the GKD distance.

Functional core of the LGG regularisers (paper *latent geometry graphs*, sec. 3.3 and 4.1-4.3).
Everything on tensors is differentiable, batched (no loop over samples) and runs on the input's
device; float16/bfloat16 inputs are computed in float32.

**Graph** (sec. 3.3) of a batch ``Z`` (B, D) at one layer:

1. similarity ``S``: cosine when every latent is non-negative (``similarity="auto"``), clamped at
   0 when forced on signed latents; otherwise an RBF kernel of the L2 distance
   ``S_ij = exp(-||z_i - z_j||^2 / h^2)``. The paper does not give ``h``; by default ``h^2`` is
   the mean squared distance over the batch's distinct pairs (kept in the autograd graph), so
   rescaling ``Z`` leaves ``S`` unchanged and a typical pair weighs about ``e^-1``; pass
   ``bandwidth=h`` to fix it;
2. each vertex keeps its ``k`` most similar other vertices (no self loops);
3. symmetrised as a union: ``A_ij = A_ji = S_ij`` when ``j`` is among the k nearest of ``i`` or
   ``i`` among those of ``j``, else 0 (``S`` is symmetric, so the weight is the similarity
   itself, never an average of one-sided entries);
4. optionally ``D^-1/2 A D^-1/2`` (``normalize=True``; a vertex of degree 0 stays isolated).

The k-NN selection is piecewise constant: gradients flow through the kept similarities.
:func:`batch_graph` returns the graph as its ``O(B k)`` edge list (what the losses use: one
Gram matrix without gradient for the selection and the values, a sparse backward);
:func:`latent_graph` as the dense (B, B) matrix.

**Label variation** (def. 6, eq. 5) with the one-hot label matrix ``V`` and ``L = D - A``:
``sigma = tr(V^T L V) = sum over ordered pairs (i, j), y_i != y_j, of A_ij``, i.e. every
undirected edge between distinct classes counts twice. (Eq. 4 as printed sums
``A_ij (s_i - s_j)^2`` over ordered pairs, which is twice ``tr(S^T L S)``; we keep the trace.)
The normalised form (appendix B) divides by the total edge weight: 1 when every edge joins
distinct classes, 0 when none does. Unlabelled samples (``y == -1``) are left out: their rows
and columns of ``A`` are dropped before the sums.

>>> z = torch.tensor([[-1.5, 0.0], [-1.4, 0.0], [1.5, 0.0], [1.6, 0.0]])  # signed: RBF
>>> (latent_graph(z, 1) > 0).int().tolist()
[[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
>>> graph = batch_graph(z, 1)
>>> float(label_variation(graph, torch.tensor([0, 0, 1, 1])))
0.0
>>> float(label_variation(graph, torch.tensor([0, 1, 0, 1]), normalized=True))
1.0
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor

from lcc.errors import LCCInputError, as_latent_matrix, check_choice, check_k

__all__ = [
    "SIMILARITIES",
    "BatchGraph",
    "Similarity",
    "batch_graph",
    "distinct_classes_mask",
    "gkd_distance",
    "label_variation",
    "label_variation_measure",
    "latent_graph",
    "normalize_adjacency",
    "resolve_similarity",
    "similarity_matrix",
    "smoothness",
]

Similarity = Literal["auto", "cosine", "rbf"]
SIMILARITIES: tuple[str, ...] = ("auto", "cosine", "rbf")

_HALF = (torch.float16, torch.bfloat16)
_EPS = 1e-12  # F.normalize's: rows shorter than this are scaled by 1 / _EPS
# Rows of the measure's pair list whose weights are computed at once (bounds the memory).
_PAIR_CHUNK = 8192


# ----------------------------------------------------------------------------------- checks


def _latents(z: object, name: str = "z", *, check_finite: bool = True) -> Tensor:
    """(B, D) floating tensor (trailing dims flattened, half precision upcast), validated."""
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise LCCInputError(f"{name} must be a floating-point torch tensor, got {_describe(z)}")
    if z.ndim < 2 or z.shape[0] < 2:
        raise LCCInputError(
            f"{name} must have shape (B, D, ...) with at least 2 rows, got {tuple(z.shape)}"
        )
    flat = z.reshape(z.shape[0], -1)
    if flat.shape[1] == 0:
        raise LCCInputError(f"{name} has latent dimension 0; pass non-empty latents")
    if flat.dtype in _HALF:
        flat = flat.float()
    if check_finite and not bool(torch.isfinite(flat).all()):
        raise _not_finite(name)
    return flat


def _not_finite(name: str) -> LCCInputError:
    return LCCInputError(f"{name} contains NaN or inf; check the model for diverging activations")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _square(adjacency: object, name: str = "adjacency") -> Tensor:
    if not isinstance(adjacency, Tensor) or not adjacency.is_floating_point():
        raise LCCInputError(
            f"{name} must be a floating-point torch tensor, got {_describe(adjacency)}"
        )
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise LCCInputError(f"{name} must be a square (B, B) matrix, got {tuple(adjacency.shape)}")
    return adjacency


def _labels(y: object, n: int | None, device: torch.device) -> Tensor:
    """(n,) int64 labels on ``device`` (any length when ``n`` is None); -1 marks unlabelled."""
    return _checked_labels(y, n, device)[0]


def _checked_labels(y: object, n: int | None, device: torch.device) -> tuple[Tensor, bool]:
    """:func:`_labels` and whether every sample is labelled (one reduction for both)."""
    labels = torch.as_tensor(y, device=device)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise LCCInputError(f"y must hold integer class labels, got dtype {labels.dtype}")
    if labels.ndim != 1:
        raise LCCInputError(f"y must be a 1-D label vector, got shape {tuple(labels.shape)}")
    if n is not None and labels.shape[0] != n:
        raise LCCInputError(
            f"y has shape {tuple(labels.shape)} but there are {n} samples; pass one label per row"
        )
    lowest = int(labels.min()) if labels.numel() else 0
    if lowest < -1:
        raise LCCInputError(f"y must hold labels >= 0 (or -1 for unlabelled), got {lowest}")
    return labels.long(), lowest >= 0


def _bandwidth(bandwidth: float | None) -> float | None:
    if bandwidth is None:
        return None
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.floating)):
        raise LCCInputError(f"bandwidth must be a positive number or None, got {bandwidth!r}")
    value = float(bandwidth)
    if not np.isfinite(value) or value <= 0:
        raise LCCInputError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    return value


# ------------------------------------------------------------------------------- the graph


def resolve_similarity(z: Tensor | np.ndarray, similarity: str = "auto") -> str:
    """``"cosine"`` or ``"rbf"``: ``auto`` picks cosine when every latent is non-negative.

    >>> resolve_similarity(torch.tensor([[0.0, 1.0]])), resolve_similarity(np.array([[-1.0]]))
    ('cosine', 'rbf')
    """
    check_choice(similarity, SIMILARITIES, name="similarity")
    if similarity != "auto":
        return similarity
    size = z.numel() if isinstance(z, Tensor) else z.size
    negative = bool(z.min() < 0) if size else False  # NaN compares False, as in (z < 0).any()
    return "rbf" if negative else "cosine"


def _symmetric(matrix: Tensor) -> Tensor:
    """Exactly symmetric (a matrix product's two triangles may differ in the last bit)."""
    return 0.5 * (matrix + matrix.T)


def _squared_distances(flat: Tensor) -> Tensor:
    """(B, B) squared L2 distances, exact zeros on the diagonal (centred: less rounding)."""
    centred = flat - flat.mean(dim=0, keepdim=True)
    gram = _symmetric(centred @ centred.T)
    norms = gram.diagonal()
    squared = (norms[:, None] + norms[None, :] - 2.0 * gram).clamp_min(0.0)
    eye = torch.eye(flat.shape[0], dtype=torch.bool, device=flat.device)
    return squared.masked_fill(eye, 0.0)


def similarity_matrix(
    z: Tensor, *, similarity: str = "auto", bandwidth: float | None = None
) -> Tensor:
    """(B, B) similarities of the rows of ``z`` (see the module docstring), diagonal included.

    Cosine: ``max(cos(z_i, z_j), 0)`` (an all-zero row has similarity 0 with every row). RBF:
    ``exp(-||z_i - z_j||^2 / h^2)`` with ``h = bandwidth`` or, by default, ``h^2`` = mean
    squared distance over distinct pairs.

    >>> z = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    >>> similarity_matrix(z)[0]
    tensor([1.0000, 0.7071, 0.0000])
    >>> similarity_matrix(z, similarity="rbf", bandwidth=1.0)[0]
    tensor([1.0000, 0.3679, 0.0067])
    """
    flat = _latents(z)
    kind = resolve_similarity(flat, similarity)
    h = _bandwidth(bandwidth)
    if kind == "cosine":
        unit = F.normalize(flat, dim=1, eps=1e-12)
        return _symmetric(unit @ unit.T).clamp_min(0.0)
    squared = _squared_distances(flat)
    return torch.exp(-squared / _rbf_scale(flat, h))


def _rbf_scale(flat: Tensor, h: float | None) -> Tensor:
    """``h^2``: ``bandwidth^2``, or the mean squared distance over distinct ordered pairs,
    ``2 sum_i ||z_i - mean||^2 / (B - 1)`` (closed form of the pair mean; differentiable)."""
    if h is not None:
        return torch.as_tensor(h * h, dtype=flat.dtype, device=flat.device)
    centred = flat - flat.mean(dim=0, keepdim=True)
    mean_sq = 2.0 * centred.square().sum() / (flat.shape[0] - 1)
    return mean_sq.clamp_min(torch.finfo(flat.dtype).tiny)


# ------------------------------------------------------------------ the graph's edges
# The two functions below fuse what autograd would do in many element-wise passes over
# (B, D) and (B, B) tensors: one Gram matrix (no gradient) serves the k-NN selection and the
# edges' values, and the backward is one sparse product over the O(B k) edges.


def _nearest_pairs(scores: Tensor, k: int, masked: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Union of each row's ``k`` best ``scores`` as ordered pairs (``masked``: ``-inf`` marks
    pairs not allowed beyond the diagonal).

    Returns ``rows``, ``cols`` (every pair in both directions, sorted by row) and ``crow``,
    their CSR row offsets.
    """
    n = scores.shape[0]
    nearest = scores.topk(k, dim=1, sorted=False)
    source = torch.arange(n, device=scores.device).repeat_interleave(k)
    target = nearest.indices.reshape(-1)
    keys = torch.cat([source * n + target, target * n + source])
    if masked:  # a row with fewer than k allowed pairs picks -inf ones: not edges
        keys = keys[(nearest.values.reshape(-1) > float("-inf")).repeat(2)]
    chosen = torch.zeros(n, n, dtype=torch.uint8, device=scores.device)
    chosen.view(-1)[keys] = 1
    rows, cols = chosen.nonzero(as_tuple=True)  # sorted: row-major order
    crow = torch.zeros(n + 1, dtype=torch.long, device=scores.device)
    torch.cumsum(torch.bincount(rows, minlength=n), dim=0, out=crow[1:])
    return rows, cols, crow


def _pair_values(matrix: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``matrix[i, j]`` on the pairs, read from the upper triangle: exactly symmetric."""
    return matrix[torch.minimum(rows, cols), torch.maximum(rows, cols)]


def _pair_product(
    grad: Tensor, rows: Tensor, cols: Tensor, crow: Tensor, x: Tensor
) -> tuple[Tensor, Tensor]:
    """``(G x, G)`` for the symmetric sparse ``G_ij = grad_ij + grad_ji`` on the pairs.

    Row ``i`` of ``x`` enters both pair ``(i, j)`` and pair ``(j, i)``, hence the sum.
    """
    n = x.shape[0]
    square = grad.new_zeros(n, n).index_put_((rows, cols), grad)
    both = (grad + square[cols, rows]).to(x.dtype)
    with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        pairs = torch.sparse_csr_tensor(crow, cols, both, (n, n))
    return pairs @ x, both


def _full_precision(x: Tensor) -> torch.autocast:
    """Autocast off: the k-NN selection needs the Gram matrix in ``x``'s precision (float32+)."""
    return torch.autocast(x.device.type, enabled=False)


def _select(gram: Tensor, scores: Tensor, k: int, allowed: Tensor | None) -> tuple[Tensor, ...]:
    """Check ``gram``'s diagonal, then the union k-NN pairs by ``scores`` (changed in place:
    only entries that cannot become edges: the diagonal and the disallowed pairs)."""
    if not bool(torch.isfinite(gram.diagonal()).all()):  # a NaN/inf row spoils its norm
        raise _not_finite("z")
    scores.fill_diagonal_(float("-inf"))
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    return _nearest_pairs(scores, k, masked=allowed is not None)


class _CosineEdges(torch.autograd.Function):
    """``cos(x_i, x_j)`` on the union k-NN pairs by cosine; returns ``(values, rows, cols)``.

    Rows are scaled as by ``F.normalize(x, eps=1e-12)``: an all-zero row has cosine 0.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, k: int, allowed: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        with _full_precision(x):
            length = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(_EPS)
            unit = x / length
            gram = unit @ unit.T
        rows, cols, crow = _select(gram, gram, k, allowed)  # edges keep their entries
        ctx.save_for_backward(unit, length, rows, cols, crow)
        ctx.mark_non_differentiable(rows, cols)
        return _pair_values(gram, rows, cols), rows, cols

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor, None, None]:
        unit, length, rows, cols, crow = ctx.saved_tensors
        grad_x, _ = _pair_product(grad, rows, cols, crow, unit)  # d/d unit
        # d(x / |x|) = (I - u u^T) / |x|; below eps the scale is the constant 1 / eps
        radial = torch.linalg.vecdot(grad_x, unit, dim=1).unsqueeze(1)
        grad_x.addcmul_(radial.mul_(length > _EPS), unit, value=-1.0)
        return grad_x.div_(length), None, None


class _DistanceEdges(torch.autograd.Function):
    """``||x_i - x_j||^2`` on the union k-NN pairs by L2 distance, and ``sum_i ||x_i - mean||^2``
    (the default RBF bandwidth's numerator); returns ``(squared, spread, rows, cols)``.

    Computed on centred rows (less rounding in the Gram matrix; distances are unchanged).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, k: int, allowed: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with _full_precision(x):
            centred = x - x.mean(dim=0, keepdim=True)
            gram = centred @ centred.T
        norms = gram.diagonal().clone()
        # minus the squared distances, exactly symmetric (n_i + n_j commutes)
        scores = gram.mul_(2.0).sub_(norms[:, None] + norms[None, :])
        rows, cols, crow = _select(scores, scores, k, allowed)
        raw = _pair_values(scores, rows, cols).neg_()
        ctx.save_for_backward(centred, rows, cols, crow, raw >= 0)
        ctx.mark_non_differentiable(rows, cols)
        ctx.set_materialize_grads(False)
        return raw.clamp_min_(0.0), norms.sum(), rows, cols

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad: Tensor | None, grad_spread: Tensor | None, *_: Any
    ) -> tuple[Tensor | None, None, None]:
        centred, rows, cols, crow, positive = ctx.saved_tensors
        if grad is None:
            grad_x = torch.zeros_like(centred)
        else:  # d||c_i - c_j||^2 / dc_i = 2 (c_i - c_j), summed over the pairs of i
            product, both = _pair_product(grad * positive, rows, cols, crow, centred)
            degree = both.new_zeros(centred.shape[0]).index_add_(0, rows, both)
            grad_x = product.mul_(-2.0).addcmul_(degree.mul_(2.0).unsqueeze(1), centred)
        if grad_spread is not None:
            grad_x.addcmul_(centred, 2.0 * grad_spread)
        # Both outputs are invariant to translating every row: the centring's backward
        # (subtracting the mean of grad_x over rows) would subtract zero.
        return grad_x, None, None


@dataclass(frozen=True)
class BatchGraph:
    """A batch's latent geometry graph as the list of its edges (``O(B k)``, not ``B x B``).

    ``rows``/``cols``: every ordered pair ``(i, j)`` joined by an edge, both directions of each
    undirected edge, sorted by row, no self loops; ``weights``: ``A_ij`` (differentiable).

    >>> graph = batch_graph(torch.tensor([[0.0], [1.0], [3.0]]), 1, similarity="rbf")
    >>> graph.rows.tolist(), graph.cols.tolist()
    ([0, 1, 1, 2], [1, 0, 2, 1])
    >>> graph.dense().shape
    torch.Size([3, 3])
    """

    size: int
    rows: Tensor
    cols: Tensor
    weights: Tensor

    def dense(self) -> Tensor:
        """The (B, B) adjacency matrix (differentiable in :attr:`weights`)."""
        adjacency = self.weights.new_zeros(self.size, self.size)
        return adjacency.index_put((self.rows, self.cols), self.weights)


def normalize_adjacency(adjacency: Tensor) -> Tensor:
    """``D^-1/2 A D^-1/2`` with ``D`` the row sums; rows of degree 0 stay zero.

    >>> normalize_adjacency(torch.tensor([[0.0, 4.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    tensor([[0., 1., 0.],
            [1., 0., 0.],
            [0., 0., 0.]])
    """
    adjacency = _square(adjacency)
    degree = adjacency.sum(dim=1)
    positive = degree > 0
    inverse = torch.where(
        positive, degree.clamp_min(torch.finfo(degree.dtype).tiny).rsqrt(), torch.zeros_like(degree)
    )
    return adjacency * (inverse[:, None] * inverse[None, :])  # symmetric factor


def batch_graph(
    z: Tensor,
    k: int,
    *,
    similarity: str = "auto",
    bandwidth: float | None = None,
    normalize: bool = False,
    mask: Tensor | None = None,
) -> BatchGraph:
    """The LGG of ``z`` (steps 1-4 of sec. 3.3) as a :class:`BatchGraph` edge list.

    ``k`` (1 <= k < B) nearest by similarity, no self loops, union-symmetrised with weight
    ``S_ij``; ``normalize``: ``D^-1/2 A D^-1/2``. ``mask`` (B, B) bool (symmetrised with its
    transpose) lists the pairs allowed as edges: the k nearest are chosen among them
    (e.g. :func:`distinct_classes_mask` for graphs between distinct classes only); a vertex
    with fewer than ``k`` allowed pairs keeps all of them. One Gram matrix, computed without
    gradient, serves the k-NN selection and the edges' values; gradients flow through the
    ``O(B k)`` edges only.

    >>> graph = batch_graph(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), 1)
    >>> list(zip(graph.rows.tolist(), graph.cols.tolist()))
    [(0, 1), (1, 0), (1, 2), (2, 1)]
    >>> [round(w, 3) for w in graph.weights.tolist()]
    [0.995, 0.995, 0.1, 0.1]
    """
    flat = _latents(z, check_finite=False)  # checked on the Gram diagonal (cheaper)
    kind = resolve_similarity(flat, similarity)
    h = _bandwidth(bandwidth)
    n = flat.shape[0]
    k = check_k(k, n)
    allowed = None if mask is None else _allowed_pairs(mask, n, flat.device)
    if kind == "cosine":
        dots, rows, cols = _CosineEdges.apply(flat, k, allowed)
        weights = dots.clamp_min(0.0)
    else:
        squared, spread, rows, cols = _DistanceEdges.apply(flat, k, allowed)
        if h is None:  # mean squared distance over distinct pairs, as in _rbf_scale
            scale = (2.0 * spread / (n - 1)).clamp_min(torch.finfo(flat.dtype).tiny)
        else:
            scale = torch.as_tensor(h * h, dtype=flat.dtype, device=flat.device)
        weights = torch.exp(-squared / scale)
    if normalize:
        degree = weights.new_zeros(n).index_add(0, rows, weights)
        # A vertex of degree 0 has only edges of weight 0 (clamped cosines): its finite
        # 1/sqrt(tiny) multiplies zeros. The product of the two factors is exactly symmetric.
        inverse = degree.clamp_min(torch.finfo(degree.dtype).tiny).rsqrt()
        weights = weights * (inverse[rows] * inverse[cols])
    return BatchGraph(size=n, rows=rows, cols=cols, weights=weights)


def _allowed_pairs(mask: object, n: int, device: torch.device) -> Tensor:
    if not isinstance(mask, Tensor) or mask.shape != (n, n):
        raise LCCInputError(
            f"mask must be a ({n}, {n}) bool tensor of allowed pairs, got {_describe(mask)}"
        )
    pairs = mask.to(device=device, dtype=torch.bool)
    return pairs & pairs.T


def latent_graph(
    z: Tensor,
    k: int,
    *,
    similarity: str = "auto",
    bandwidth: float | None = None,
    normalize: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """Dense (B, B) symmetric adjacency of the LGG of ``z``: :func:`batch_graph` as a matrix.

    >>> z = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    >>> (latent_graph(z, 1, similarity="rbf") > 0).int().tolist()
    [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    """
    graph = batch_graph(
        z, k, similarity=similarity, bandwidth=bandwidth, normalize=normalize, mask=mask
    )
    return graph.dense()


def distinct_classes_mask(y: Tensor) -> Tensor:
    """(B, B) bool: True for pairs of labelled samples (``y >= 0``) of distinct classes.

    >>> distinct_classes_mask(torch.tensor([0, 1, 0, -1])).int().tolist()
    [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    """
    device = y.device if isinstance(y, Tensor) else torch.device("cpu")
    labels = _labels(y, None, device)
    labeled = labels >= 0
    return labeled[:, None] & labeled[None, :] & (labels[:, None] != labels[None, :])


# ------------------------------------------------------------------------ label variation


def label_variation(graph: BatchGraph | Tensor, y: Tensor, *, normalized: bool = False) -> Tensor:
    """Label variation ``tr(V^T L V)`` of a graph (def. 6, eq. 5), as a scalar tensor.

    ``graph``: a :class:`BatchGraph` (what the losses use: sums over its edges) or a dense
    (B, B) adjacency. Sum of ``A_ij`` over ordered pairs ``i != j`` of labelled samples of
    distinct classes (each undirected edge twice); ``normalized``: divided by the sum of
    ``A_ij`` over all ordered pairs ``i != j`` of labelled samples (0 for a graph without
    edges). Samples with ``y == -1`` are ignored. Differentiable in the edge weights.

    >>> a = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    >>> float(label_variation(a, torch.tensor([0, 1, 0])))
    2.0
    >>> float(label_variation(a, torch.tensor([0, 1, 0]), normalized=True))
    0.6666666865348816
    """
    if isinstance(graph, BatchGraph):
        weights, rows, cols = graph.weights, graph.rows, graph.cols
        labels, all_labelled = _checked_labels(y, graph.size, weights.device)
        distinct = labels[rows] != labels[cols]
        if all_labelled:  # every edge counts
            variation = (weights * distinct).sum()
            total = weights.sum() if normalized else None
        else:
            labeled = labels >= 0
            pairs = labeled[rows] & labeled[cols]  # the edges between labelled samples
            variation = (weights * (distinct & pairs)).sum()
            total = (weights * pairs).sum() if normalized else None
    else:
        adjacency = _square(graph)
        labels = _labels(y, adjacency.shape[0], adjacency.device)
        labeled = labels >= 0
        pairs = labeled[:, None] & labeled[None, :]  # ordered pairs of labelled samples
        distinct = pairs & (labels[:, None] != labels[None, :])  # ... of distinct classes
        variation = (adjacency * distinct).sum()
        total = (adjacency * pairs.fill_diagonal_(False)).sum() if normalized else None
    if total is None:
        return variation
    if isinstance(graph, BatchGraph):  # weights >= 0: a zero total has a zero variation
        return variation / total.clamp_min(torch.finfo(total.dtype).tiny)
    return variation / torch.where(total != 0, total, torch.ones_like(total))


def smoothness(variations: Sequence[Tensor]) -> Tensor:
    """Eq. 8: ``sum_l |sigma(l+1) - sigma(l)|`` over consecutive layers (at least two).

    >>> float(smoothness([torch.tensor(3.0), torch.tensor(1.0), torch.tensor(2.0)]))
    3.0
    """
    values = list(variations)
    if len(values) < 2:
        raise LCCInputError(
            f"smoothness needs the label variation of at least 2 layers, got {len(values)}"
        )
    try:
        stacked = torch.stack([torch.as_tensor(v).reshape(()) for v in values])
    except (RuntimeError, TypeError, ValueError) as error:
        raise LCCInputError(f"smoothness needs scalar tensors ({error})") from None
    return (stacked[1:] - stacked[:-1]).abs().sum()


def gkd_distance(adj_teacher: Tensor, adj_student: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Eq. 7: Frobenius norm ``||A_T - A_S||_F`` between two LGGs of the same batch.

    Pass degree-normalised graphs (``latent_graph(..., normalize=True)``) as the paper does.
    ``mask`` (B, B) bool restricts the sum to those entries (e.g.
    :func:`distinct_classes_mask`). The teacher graph is cast to the student's dtype and device.

    >>> float(gkd_distance(torch.eye(2), torch.zeros(2, 2)))
    1.4142135381698608
    """
    student = _square(adj_student, "adj_student")
    teacher = _square(adj_teacher, "adj_teacher").to(device=student.device, dtype=student.dtype)
    if teacher.shape != student.shape:
        raise LCCInputError(
            f"teacher and student graphs have shapes {tuple(teacher.shape)} and "
            f"{tuple(student.shape)}; build both on the same batch"
        )
    difference = student - teacher
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != student.shape:
            raise LCCInputError(
                f"mask must be a {tuple(student.shape)} bool tensor, got {_describe(mask)}"
            )
        keep = mask.to(device=student.device, dtype=torch.bool)
        difference = torch.where(keep, difference, torch.zeros_like(difference))
    return torch.linalg.vector_norm(difference.reshape(-1))


# --------------------------------------------------------------------------------- measure


def _measure_labels(y: object, n: int) -> np.ndarray:
    labels = np.asarray(y.detach().cpu().numpy() if isinstance(y, Tensor) else y)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise LCCInputError(
            f"y has shape {labels.shape} but there are {n} latent rows; pass one label per row"
        )
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or not np.equal(np.mod(labels, 1), 0).all():
            raise LCCInputError("y must hold integer class labels, got non-integer values")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise LCCInputError(f"y must hold integer class labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < -1:
        raise LCCInputError(f"y must hold labels >= 0 (or -1 for unlabelled), got {labels.min()}")
    return labels


def _pair_weights(
    rows: np.ndarray, a: np.ndarray, b: np.ndarray, kind: str, scale: float
) -> np.ndarray:
    """Similarity of each pair (a[p], b[p]) of rows, in float64, a chunk of pairs at a time."""
    weights = np.empty(a.size, dtype=np.float64)
    for start in range(0, a.size, _PAIR_CHUNK):
        ia, ib = a[start : start + _PAIR_CHUNK], b[start : start + _PAIR_CHUNK]
        left = rows[ia].astype(np.float64)
        right = rows[ib].astype(np.float64)
        if kind == "cosine":
            norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
            dots = np.einsum("ij,ij->i", left, right)
            cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
            weights[start : start + ia.size] = np.maximum(cos, 0.0)
        else:
            diff = left - right
            weights[start : start + ia.size] = np.exp(-np.einsum("ij,ij->i", diff, diff) / scale)
    return weights


def _neighbour_rows(matrix: np.ndarray, kind: str) -> np.ndarray:
    """Rows whose L2 order is the similarity order: unit rows for cosine (zero rows get an
    extra orthogonal axis, so their cosine 0 with every other row keeps its rank)."""
    if kind != "cosine":
        return matrix
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    unit = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    if zero.any():
        unit = np.hstack([unit, zero[:, None].astype(unit.dtype)])
    return unit


def label_variation_measure(
    z: np.ndarray,
    y: np.ndarray,
    *,
    k: int = 10,
    similarity: str = "auto",
    bandwidth: float | None = None,
    normalize: bool = False,
) -> dict[str, Any]:
    """Label variation of the LGG of a whole dataset, without an N x N matrix.

    Same graph and sums as :func:`latent_graph` + :func:`label_variation` on all rows (the RBF
    bandwidth default is the dataset's mean squared distance over distinct pairs, in closed
    form), with an exact k-NN search (:func:`lcc.engine.knn.knn`) and the edge weights
    recomputed in float64 on the sparse union graph. ``y == -1`` rows are in the graph but not
    in the sums. Returns plain values: ``n``, ``labeled``, ``classes``, ``k``, ``similarity``
    (resolved), ``bandwidth`` (RBF ``h``; None for cosine), ``normalize``, ``edges``
    (undirected), ``label_variation``, ``label_variation_normalized``.

    >>> z = np.array([[-1.5, 0.0], [-1.4, 0.0], [1.5, 0.0], [1.6, 0.0]])
    >>> out = label_variation_measure(z, np.array([0, 0, 1, 1]), k=1)
    >>> out["similarity"], out["edges"], out["label_variation"]
    ('rbf', 2, 0.0)
    """
    from lcc.engine.knn import knn

    check_choice(similarity, SIMILARITIES, name="similarity")
    checked = as_latent_matrix(z)  # validates shape and finiteness (float32 copy for search)
    n = checked.shape[0]
    original = np.asarray(z.detach().cpu().numpy() if isinstance(z, Tensor) else z)
    rows = original.reshape(n, -1)
    labels = _measure_labels(y, n)
    k = check_k(k, n)
    h = _bandwidth(bandwidth)
    kind = resolve_similarity(checked, similarity)

    scale = 0.0
    if kind == "rbf":
        if h is None:
            centred_sq = 0.0
            mean = rows.mean(axis=0, dtype=np.float64)
            for start in range(0, n, _PAIR_CHUNK):
                block = rows[start : start + _PAIR_CHUNK].astype(np.float64) - mean
                centred_sq += float(np.einsum("ij,ij->", block, block))
            scale = max(2.0 * centred_sq / (n - 1), np.finfo(np.float64).tiny)
            h = float(np.sqrt(scale))
        else:
            scale = h * h

    neighbours = knn(_neighbour_rows(checked, kind), k, metric="l2").indices
    chosen = sp.csr_matrix(
        (np.ones(n * k, dtype=np.int8), (np.repeat(np.arange(n), k), neighbours.ravel())),
        shape=(n, n),
    )
    union = sp.triu(chosen + chosen.T, k=1).tocoo()
    a, b = union.row.astype(np.int64), union.col.astype(np.int64)
    weights = _pair_weights(rows, a, b, kind, scale)
    if normalize:
        degree = np.bincount(a, weights, n) + np.bincount(b, weights, n)
        inverse = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
        weights = weights * inverse[a] * inverse[b]

    labeled = labels >= 0
    both = labeled[a] & labeled[b]
    distinct = both & (labels[a] != labels[b])
    variation = 2.0 * float(weights[distinct].sum())
    total = 2.0 * float(weights[both].sum())
    return {
        "n": int(n),
        "labeled": int(labeled.sum()),
        "classes": int(np.unique(labels[labeled]).size),
        "k": int(k),
        "similarity": kind,
        "bandwidth": None if kind == "cosine" else float(h),  # type: ignore[arg-type]
        "normalize": bool(normalize),
        "edges": int(a.size),
        "label_variation": variation,
        "label_variation_normalized": variation / total if total > 0 else 0.0,
    }
