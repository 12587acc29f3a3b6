"""Label variation of latent geometry graphs (LGG), its smoothness, and the GKD distance.

Functional core of the LGG regularisers (paper *latent geometry graphs*, sec. 3.3 and 4.1-4.3).
Everything on tensors is differentiable, batched (no loop over samples) and runs on the input's
device; float16/bfloat16 inputs are computed in float32. The graphs themselves (sec. 3.3) are
built by :mod:`lcc.engine.lgg_graph` (re-exported here): :func:`batch_graph` as edge lists,
:func:`latent_graph` as a dense matrix.

**Label variation** (def. 6, eq. 5) with the one-hot label matrix ``V`` and ``L = D - A``:
``sigma = tr(V^T L V) = sum over ordered pairs (i, j), y_i != y_j, of A_ij``, i.e. every
undirected edge between distinct classes counts twice. (Eq. 4 as printed sums
``A_ij (s_i - s_j)^2`` over ordered pairs, which is twice ``tr(S^T L S)``; we keep the trace.)
The normalised form (appendix B) divides by the total edge weight: 1 when every edge joins
distinct classes, 0 when none does. Unlabelled samples (``y == -1``) are left out: their rows
and columns of ``A`` are dropped before the sums.

>>> z = torch.tensor([[-1.5, 0.0], [-1.4, 0.0], [1.5, 0.0], [1.6, 0.0]])  # signed: RBF
>>> graph = batch_graph(z, 1)
>>> float(label_variation(graph, torch.tensor([0, 0, 1, 1])))
0.0
>>> float(label_variation(graph, torch.tensor([0, 1, 0, 1]), normalized=True))
1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor

from lcc.engine.knn import knn
from lcc.engine.lgg_graph import (
    SIMILARITIES,
    BatchGraph,
    Similarity,
    _bandwidth,
    _describe,
    _full_precision,
    _latents,
    batch_graph,
    latent_graph,
    resolve_similarity,
)
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

# Rows of the measure's pair list whose weights are computed at once (bounds the memory).
_PAIR_CHUNK = 8192


# ----------------------------------------------------------------------------------- checks


def _square(adjacency: object, name: str = "adjacency") -> Tensor:
    if not isinstance(adjacency, Tensor) or not adjacency.is_floating_point():
        raise LCCInputError(
            f"{name} must be a floating-point torch tensor, got {_describe(adjacency)}"
        )
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise LCCInputError(f"{name} must be a square (B, B) matrix, got {tuple(adjacency.shape)}")
    return adjacency


def _labels(y: object, n: int | None, device: torch.device) -> tuple[Tensor, bool]:
    """(n,) int64 labels on ``device`` (any length when ``n`` is None; -1 marks unlabelled) and
    whether every sample is labelled (one reduction for both)."""
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


# ------------------------------------------------------------------------------- the graph


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
    with _full_precision(flat):  # the Gram matrix in float32 under autocast, as for the graph
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


def normalize_adjacency(adjacency: Tensor) -> Tensor:
    """``D^-1/2 A D^-1/2`` with ``D`` the row sums; rows of degree 0 stay zero.

    >>> normalize_adjacency(torch.tensor([[0.0, 4.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    tensor([[0., 1., 0.],
            [1., 0., 0.],
            [0., 0., 0.]])
    """
    adjacency = _square(adjacency)
    degree = adjacency.sum(dim=1)
    inverse = torch.where(degree > 0, degree.clamp_min(torch.finfo(degree.dtype).tiny).rsqrt(), 0.0)
    return adjacency * (inverse[:, None] * inverse[None, :])  # symmetric factor


def distinct_classes_mask(y: Tensor) -> Tensor:
    """(B, B) bool: True for pairs of labelled samples (``y >= 0``) of distinct classes.

    >>> distinct_classes_mask(torch.tensor([0, 1, 0, -1])).int().tolist()
    [[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    """
    device = y.device if isinstance(y, Tensor) else torch.device("cpu")
    labels = _labels(y, None, device)[0]
    labeled = labels >= 0
    return labeled[:, None] & labeled[None, :] & (labels[:, None] != labels[None, :])


# ------------------------------------------------------------------------ label variation


def label_variation(graph: BatchGraph | Tensor, y: Tensor, *, normalized: bool = False) -> Tensor:
    """Label variation ``tr(V^T L V)`` of a graph (def. 6, eq. 5), as a scalar tensor.

    ``graph``: a :class:`BatchGraph` (what the losses use: sums over its edges; the graphs of
    several layers give one value per layer) or a dense (B, B) adjacency. Sum of ``A_ij`` over
    ordered pairs ``i != j`` of labelled samples of distinct classes (each undirected edge
    twice); ``normalized``: divided by the sum of ``A_ij`` over all ordered pairs ``i != j`` of
    labelled samples (0 for a graph without edges). Samples with ``y == -1`` are ignored.
    Differentiable in the edge weights.

    >>> a = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    >>> float(label_variation(a, torch.tensor([0, 1, 0])))
    2.0
    >>> float(label_variation(a, torch.tensor([0, 1, 0]), normalized=True))
    0.6666666865348816
    """
    if isinstance(graph, BatchGraph):
        return _edge_variation(graph, y, normalized)
    adjacency = _square(graph)
    labels = _labels(y, adjacency.shape[0], adjacency.device)[0]
    labeled = labels >= 0
    pairs = labeled[:, None] & labeled[None, :]  # ordered pairs of labelled samples
    distinct = pairs & (labels[:, None] != labels[None, :])  # ... of distinct classes (i != j)
    variation = (adjacency * distinct).sum()
    if not normalized:
        return variation
    total = (adjacency * pairs.fill_diagonal_(False)).sum()
    return variation / torch.where(total != 0, total, torch.ones_like(total))


def _edge_variation(graph: BatchGraph, y: Tensor, normalized: bool) -> Tensor:
    """:func:`label_variation` of an edge list: () for one graph, (layers,) for several."""
    weights, n = graph.weights, graph.size
    labels, all_labelled = _labels(y, n, weights.device)
    source, target = graph.rows.remainder(n), graph.cols.remainder(n)
    if not all_labelled:  # only the edges between labelled samples count
        labeled = labels >= 0
        weights = weights * (labeled[source] & labeled[target])
    layer = None if graph.layers is None else graph.edge_layers()

    def per_graph(values: Tensor) -> Tensor:
        if layer is None:
            return values.sum()
        return values.new_zeros(graph.count).index_add(0, layer, values)

    variation = per_graph(weights * (labels[source] != labels[target]))
    if not normalized:
        return variation
    # weights >= 0: a zero total has a zero variation, and 0 / tiny = 0
    total = per_graph(weights)
    return variation / total.clamp_min(torch.finfo(total.dtype).tiny)


def smoothness(variations: Sequence[Tensor] | Tensor) -> Tensor:
    """Eq. 8: ``sum_l |sigma(l+1) - sigma(l)|`` over consecutive layers (at least two).

    ``variations``: scalar tensors, or one (layers,) tensor.

    >>> float(smoothness([torch.tensor(3.0), torch.tensor(1.0), torch.tensor(2.0)]))
    3.0
    """
    if isinstance(variations, Tensor) and variations.ndim == 1 and variations.numel() >= 2:
        return (variations[1:] - variations[:-1]).abs().sum()
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
    :func:`distinct_classes_mask`). The teacher graph is cast to the student's dtype and device;
    half-precision graphs (mixed precision) are compared in float32, with autocast off.

    >>> float(gkd_distance(torch.eye(2), torch.zeros(2, 2)))
    1.4142135381698608
    """
    student = _square(adj_student, "adj_student")
    if student.dtype in (torch.float16, torch.bfloat16):
        student = student.float()
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
    with _full_precision(difference):
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
    check_choice(similarity, SIMILARITIES, name="similarity")
    checked = as_latent_matrix(z)  # validates shape and finiteness (float32 copy for search)
    n = checked.shape[0]
    original = np.asarray(z.detach().cpu().numpy() if isinstance(z, Tensor) else z)
    rows = original.reshape(n, -1)
    labels = _measure_labels(y, n)
    k = check_k(k, n)
    h = _bandwidth(bandwidth)
    kind = resolve_similarity(checked, similarity)

    scale = 0.0 if h is None else h * h  # RBF only
    if kind == "rbf" and h is None:
        centred_sq = 0.0
        mean = rows.mean(axis=0, dtype=np.float64)
        for start in range(0, n, _PAIR_CHUNK):
            block = rows[start : start + _PAIR_CHUNK].astype(np.float64) - mean
            centred_sq += float(np.einsum("ij,ij->", block, block))
        scale = max(2.0 * centred_sq / (n - 1), np.finfo(np.float64).tiny)
        h = float(np.sqrt(scale))

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
