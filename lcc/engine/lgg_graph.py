"""The latent geometry graph (LGG) of a batch, at one or several layers, as an edge list.

Sec. 3.3 of the LGG paper, for a batch ``Z`` (B, D) at one layer:

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

**How it is computed.** A graph has ``O(B k)`` edges, and the losses only need those, so
:func:`batch_graph` returns the edge list. For each layer one Gram matrix, computed without
gradient, serves the k-NN selection and the edges' values; the backward is one sparse product
per layer over the edges (two autograd functions, one per similarity, instead of many
element-wise passes over (B, D) and (B, B) tensors). The graphs of several layers of the same
batch are built together, so that the selection and the bookkeeping run once for all of them:
pass a list of tensors. :func:`latent_graph` returns the dense (B, B) matrix.

>>> z = torch.tensor([[-1.5, 0.0], [-1.4, 0.0], [1.5, 0.0], [1.6, 0.0]])  # signed: RBF
>>> (latent_graph(z, 1) > 0).int().tolist()
[[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lcc.engine.choices import SIMILARITIES
from lcc.errors import LCCInputError, check_choice, check_k

__all__ = [
    "SIMILARITIES",
    "BatchGraph",
    "Similarity",
    "batch_graph",
    "latent_graph",
    "resolve_similarity",
]

Similarity = Literal["auto", "cosine", "rbf"]

_HALF = (torch.float16, torch.bfloat16)
_EPS = 1e-12  # F.normalize's: rows shorter than this are scaled by 1 / _EPS


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


def _bandwidth(bandwidth: float | None) -> float | None:
    if bandwidth is None:
        return None
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.floating)):
        raise LCCInputError(f"bandwidth must be a positive number or None, got {bandwidth!r}")
    value = float(bandwidth)
    if not np.isfinite(value) or value <= 0:
        raise LCCInputError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    return value


def _allowed_pairs(mask: object, n: int, device: torch.device) -> Tensor:
    if not isinstance(mask, Tensor) or mask.shape != (n, n):
        raise LCCInputError(
            f"mask must be a ({n}, {n}) bool tensor of allowed pairs, got {_describe(mask)}"
        )
    pairs = mask.to(device=device, dtype=torch.bool)
    return pairs & pairs.T


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


# ------------------------------------------------------------- edges of stacked graphs
# G graphs of the same batch of B samples are stacked: graph g's Gram matrix is grams[g], and
# an edge is (g, i, j). ``crow`` holds the CSR row offsets of the G * B rows (g, i).


def _full_precision(x: Tensor) -> torch.autocast:
    """Autocast off: the k-NN selection needs the Gram matrix in ``x``'s precision (float32+)."""
    return torch.autocast(x.device.type, enabled=False)


def _stacked_pairs(scores: Tensor, k: int, masked: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Union of each row's ``k`` best ``scores`` (G, B, B) as ordered pairs ``(g, i, j)``.

    ``masked``: ``-inf`` marks pairs not allowed (besides the diagonal). Returns ``graph``,
    ``rows``, ``cols`` (every pair in both directions, sorted by (g, i)) and ``crow``.
    """
    count, n, _ = scores.shape
    nearest = scores.topk(k, dim=2, sorted=False)
    device = scores.device
    vertex = torch.arange(count * n, device=device).repeat_interleave(k)  # g * B + i
    target = nearest.indices.reshape(-1)  # j
    start = torch.div(vertex, n, rounding_mode="floor") * n  # g * B
    keys = torch.cat([vertex * n + target, (start + target) * n + (vertex - start)])
    if masked:  # a row with fewer than k allowed pairs picks -inf ones: not edges
        keys = keys[(nearest.values.reshape(-1) > float("-inf")).repeat(2)]
    chosen = torch.zeros(count, n, n, dtype=torch.uint8, device=device)
    chosen.view(-1)[keys] = 1
    graph, rows, cols = chosen.nonzero(as_tuple=True)  # sorted: row-major order
    crow = torch.zeros(count * n + 1, dtype=torch.long, device=device)
    torch.cumsum(torch.bincount(graph * n + rows, minlength=count * n), dim=0, out=crow[1:])
    return graph, rows, cols, crow


def _select(
    grams: Tensor, k: int, allowed: Tensor | None, names: Sequence[str]
) -> tuple[Tensor, ...]:
    """The pairs by ``grams`` (G, B, B) as scores, changed in place only where no edge can
    be: the diagonal (after checking it is finite) and the disallowed pairs. ``names``: the
    graphs' latents, for the error message."""
    diagonal = grams.diagonal(dim1=1, dim2=2)
    finite = torch.isfinite(diagonal).all(dim=1)  # a NaN/inf row spoils its norm
    if not bool(finite.all()):
        raise _not_finite(names[int((~finite).nonzero()[0])])
    diagonal.fill_(float("-inf"))
    if allowed is not None:
        grams.masked_fill_(~allowed, float("-inf"))
    return _stacked_pairs(grams, k, masked=allowed is not None)


def _pair_values(grams: Tensor, graph: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``grams[g, i, j]`` on the pairs, read from the upper triangle: exactly symmetric."""
    return grams[graph, torch.minimum(rows, cols), torch.maximum(rows, cols)]


def _pair_products(
    grad: Tensor, pairs: tuple[Tensor, ...], xs: Sequence[Tensor], wanted: Sequence[bool]
) -> list[tuple[Tensor, Tensor, slice] | None]:
    """For each wanted graph g: ``G_g x_g`` with the symmetric sparse ``G_ij = grad_ij +
    grad_ji`` on its pairs (row ``i`` of ``x`` enters pair ``(i, j)`` and pair ``(j, i)``),
    ``G_g``'s values, and the slice of its edges. One (B, B) scratch matrix at a time."""
    _, rows, cols, crow = pairs
    n = xs[0].shape[0]
    bounds = crow[::n].tolist()  # first edge of each graph
    products: list[tuple[Tensor, Tensor, slice] | None] = []
    for g, (x, needed) in enumerate(zip(xs, wanted, strict=True)):
        if not needed:
            products.append(None)
            continue
        edges = slice(bounds[g], bounds[g + 1])
        mine, source, target = grad[edges], rows[edges], cols[edges]
        square = mine.new_zeros(n, n).index_put_((source, target), mine)
        both = (mine + square[target, source]).to(x.dtype)
        with warnings.catch_warnings():  # "sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(
                crow[g * n : (g + 1) * n + 1] - bounds[g], target, both, (n, n)
            )
        products.append((matrix @ x, both, edges))
    return products


class _CosineEdges(torch.autograd.Function):
    """``cos(x_i, x_j)`` on each graph's union k-NN pairs by cosine.

    ``apply(k, allowed, names, *xs)`` returns ``(values, graph, rows, cols)``. Rows are scaled as by
    ``F.normalize(x, eps=1e-12)``: an all-zero row has cosine 0.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, k: int, allowed: Tensor | None, names: tuple[str, ...], *xs: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = xs[0].shape[0]
        grams = xs[0].new_empty(len(xs), n, n)
        units, lengths = [], []
        with _full_precision(xs[0]):
            for g, x in enumerate(xs):
                length = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(_EPS)
                unit = x / length
                torch.mm(unit, unit.T, out=grams[g])
                units.append(unit)
                lengths.append(length)
        pairs = _select(grams, k, allowed, names)  # edges keep their entries
        ctx.save_for_backward(*pairs, *units, *lengths)
        ctx.count = len(xs)
        graph, rows, cols, _ = pairs
        ctx.mark_non_differentiable(graph, rows, cols)
        return _pair_values(grams, graph, rows, cols), graph, rows, cols

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        pairs, units, lengths = saved[:4], saved[4 : 4 + ctx.count], saved[4 + ctx.count :]
        wanted = ctx.needs_input_grad[3:]
        grads: list[Tensor | None] = []
        products = _pair_products(grad, pairs, units, wanted)  # d/d unit
        for product, unit, length in zip(products, units, lengths, strict=True):
            if product is None:
                grads.append(None)
                continue
            grad_x = product[0]  # d(x / |x|) = (I - u u^T) / |x|; below eps: 1 / eps
            radial = torch.linalg.vecdot(grad_x, unit, dim=1).unsqueeze(1)
            grad_x.addcmul_(radial.mul_(length > _EPS), unit, value=-1.0).div_(length)
            grads.append(grad_x)
        return None, None, None, *grads


class _DistanceEdges(torch.autograd.Function):
    """``||x_i - x_j||^2`` on each graph's union k-NN pairs by L2 distance.

    ``apply(k, allowed, names, *xs)`` returns ``(squared, spread, graph, rows, cols)``, ``spread``
    (G,) holding ``sum_i ||x_i - mean||^2`` (the default RBF bandwidth's numerator). Computed
    on centred rows (less rounding in the Gram matrix; distances are unchanged).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, k: int, allowed: Tensor | None, names: tuple[str, ...], *xs: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n = xs[0].shape[0]
        grams = xs[0].new_empty(len(xs), n, n)
        centred = []
        with _full_precision(xs[0]):
            for g, x in enumerate(xs):
                centred.append(x - x.mean(dim=0, keepdim=True))
                torch.mm(centred[-1], centred[-1].T, out=grams[g])
        norms = grams.diagonal(dim1=1, dim2=2).clone()  # (G, B)
        # minus the squared distances, exactly symmetric (n_i + n_j commutes)
        grams.mul_(2.0).sub_(norms[:, :, None] + norms[:, None, :])
        pairs = _select(grams, k, allowed, names)
        graph, rows, cols, _ = pairs
        raw = _pair_values(grams, graph, rows, cols).neg_()
        ctx.save_for_backward(*pairs, raw >= 0, *centred)
        ctx.mark_non_differentiable(graph, rows, cols)
        ctx.set_materialize_grads(False)
        return raw.clamp_min_(0.0), norms.sum(dim=1), graph, rows, cols

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad: Tensor | None, grad_spread: Tensor | None, *_: Any
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        pairs, positive, centred = saved[:4], saved[4], saved[5:]
        wanted = ctx.needs_input_grad[3:]
        grads: list[Tensor | None] = [
            torch.zeros_like(c) if needed else None
            for c, needed in zip(centred, wanted, strict=True)
        ]
        if grad is not None:  # d||c_i - c_j||^2 / dc_i = 2 (c_i - c_j), summed over i's pairs
            rows = pairs[1]
            products = _pair_products(grad * positive, pairs, centred, wanted)
            for g, product in enumerate(products):
                if product is None:
                    continue
                grad_x, both, edges = product
                degree = both.new_zeros(grad_x.shape[0]).index_add_(0, rows[edges], both)
                grads[g] = grad_x.mul_(-2.0).addcmul_(degree[:, None], centred[g], value=2.0)
        if grad_spread is not None:
            for g, grad_x in enumerate(grads):
                if grad_x is not None:
                    grad_x.addcmul_(centred[g], 2.0 * grad_spread[g])
        # Both outputs are invariant to translating every row: the centring's backward
        # (subtracting the mean of grad_x over rows) would subtract zero.
        return None, None, None, *grads


# ------------------------------------------------------------------------------ the graph


@dataclass(frozen=True)
class BatchGraph:
    """The latent geometry graph(s) of a batch as the list of their edges (``O(B k)`` each).

    ``rows``/``cols``: every ordered pair ``(i, j)`` joined by an edge, both directions of each
    undirected edge, no self loops; ``weights``: ``A_ij`` (differentiable). ``layers`` is None
    for one graph; for the graphs of several layers (``batch_graph([z1, z2, ...])``) vertex
    ``i`` of layer ``l`` is ``l * size + i`` in ``rows``/``cols``.

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
    layers: int | None = None

    @property
    def count(self) -> int:
        """The number of graphs (1 for a single one)."""
        return 1 if self.layers is None else self.layers

    def edge_layers(self) -> Tensor:
        """The layer of each edge (zeros for a single graph)."""
        return torch.div(self.rows, self.size, rounding_mode="floor")

    def dense(self) -> Tensor:
        """The (B, B) adjacency matrix, or (layers, B, B) (differentiable in the weights)."""
        n = self.size
        adjacency = self.weights.new_zeros(self.count * n, n)
        adjacency = adjacency.index_put((self.rows, self.cols.remainder(n)), self.weights)
        return adjacency if self.layers is None else adjacency.reshape(self.count, n, n)


def batch_graph(
    z: Tensor | Sequence[Tensor],
    k: int,
    *,
    similarity: str = "auto",
    bandwidth: float | None = None,
    normalize: bool = False,
    mask: Tensor | None = None,
) -> BatchGraph:
    """The LGG of ``z`` (steps 1-4 of sec. 3.3), or of each layer of a list, as edge lists.

    ``k`` (1 <= k < B) nearest by similarity, no self loops, union-symmetrised with weight
    ``S_ij``; ``normalize``: ``D^-1/2 A D^-1/2``. ``mask`` (B, B) bool (symmetrised with its
    transpose) lists the pairs allowed as edges: the k nearest are chosen among them
    (e.g. :func:`lcc.engine.lgg.distinct_classes_mask` for graphs between distinct classes
    only); a vertex with fewer than ``k`` allowed pairs keeps all of them. A list ``[z1, z2,
    ...]`` holds the latents of several layers for the same B samples (dimensions may
    differ; ``similarity="auto"`` is resolved per layer): the graphs are built together.

    >>> graph = batch_graph(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), 1)
    >>> list(zip(graph.rows.tolist(), graph.cols.tolist()))
    [(0, 1), (1, 0), (1, 2), (2, 1)]
    >>> [round(w, 3) for w in graph.weights.tolist()]
    [0.995, 0.995, 0.1, 0.1]
    """
    single = isinstance(z, Tensor)
    layers = [z] if single else list(z)  # type: ignore[arg-type]
    if not layers:
        raise LCCInputError("batch_graph needs the latents of at least one layer")
    names = ["z"] if single else [f"z[{index}]" for index in range(len(layers))]
    flats = [
        _latents(item, name, check_finite=False) for item, name in zip(layers, names, strict=True)
    ]
    n = flats[0].shape[0]
    for flat, name in zip(flats, names, strict=True):
        if flat.shape[0] != n or flat.device != flats[0].device:
            raise LCCInputError(
                f"{name} has {flat.shape[0]} rows on {flat.device}, z[0] {n} on "
                f"{flats[0].device}; pass the layers of one batch"
            )
    dtype = functools.reduce(torch.promote_types, (flat.dtype for flat in flats))
    flats = [flat.to(dtype) for flat in flats]  # checked on the Gram diagonals (cheaper)
    h = _bandwidth(bandwidth)
    k = check_k(k, n)
    allowed = None if mask is None else _allowed_pairs(mask, n, flats[0].device)
    kinds = [resolve_similarity(flat, similarity) for flat in flats]
    parts = []
    for kind in ("cosine", "rbf"):
        members = [index for index, found in enumerate(kinds) if found == kind]
        if members:
            chosen = [flats[index] for index in members]
            named = tuple(names[index] for index in members)
            parts.append(_edges(kind, chosen, named, members, k, allowed, h))
    if len(parts) == 1:
        rows, cols, weights = parts[0]
    else:  # layers of both similarities
        rows, cols, weights = (torch.cat(items) for items in zip(*parts, strict=True))
    if normalize:
        degree = weights.new_zeros(len(flats) * n).index_add(0, rows, weights)
        # A vertex of degree 0 has only edges of weight 0 (clamped cosines): its finite
        # 1/sqrt(tiny) multiplies zeros. The product of the two factors is exactly symmetric.
        inverse = degree.clamp_min(torch.finfo(degree.dtype).tiny).rsqrt()
        weights = weights * (inverse[rows] * inverse[cols])
    return BatchGraph(n, rows, cols, weights, layers=None if single else len(flats))


def _edges(
    kind: str,
    xs: list[Tensor],
    names: tuple[str, ...],
    members: list[int],
    k: int,
    allowed: Tensor | None,
    h: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, weights)`` of the graphs of ``xs`` (layers ``members``, latents named
    ``names``), one similarity."""
    n = xs[0].shape[0]
    if kind == "cosine":
        values, graph, rows, cols = _CosineEdges.apply(k, allowed, names, *xs)
        weights = values.clamp_min(0.0)
    else:
        squared, spread, graph, rows, cols = _DistanceEdges.apply(k, allowed, names, *xs)
        if h is None:  # mean squared distance over distinct pairs, 2 spread / (B - 1)
            scale = (2.0 * spread / (n - 1)).clamp_min(torch.finfo(spread.dtype).tiny)
            weights = torch.exp(-squared / scale[graph])
        else:
            weights = torch.exp(squared / (-h * h))
    if members != list(range(len(members))):  # the layers' places among all layers
        graph = torch.as_tensor(members, device=graph.device)[graph]
    start = graph * n
    return start + rows, start + cols, weights


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
