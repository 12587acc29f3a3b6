"""Intraclass clustering measures c1-c4 and LCC's per-layer cluster measure, on arrays.

The four measures of Carbonnelle & De Vleeschouwer (``intraclass-clustering-measures``,
sec. 2) score how much a network separates samples *within* a class; higher values went
with better generalisation in the paper, so every c-measure has ``higher_is_better = True``.

Which latents (sec. 2.1): c1, c3 and c4 read **pre-activations**, the values before the ReLU;
with batch normalisation before the ReLU (as in the paper) that is the output of the
BatchNorm layer, so name the ``...bn`` layer (``lcc layers MODEL`` lists them), or a linear
layer whose output feeds a ReLU. c2 reads the **activations**, which :func:`c2` makes itself
as ``ReLU(latents)`` (``relu=True``); ReLU is idempotent, so post-ReLU latents give the same
value. c4 makes its own activations from the pre-activations (:func:`standardize_activations`).

Neurons: a neuron of a convolutional layer is a whole feature map, reduced by global max
pooling (:func:`neurons`); every function here applies :func:`neurons` to its input first.

Structure: per-layer functions return a :class:`ClassValues` (one row per (sub)class, one
column per neuron for c1/c3), and :func:`combine_neurons` / :func:`combine_layers` make the
paper's measure from one or several layers: c1 and c3 pool the neurons of all layers
("neurons are considered across all the layers", sec. 2.1) and take the mean of the top-k
per class; c2 and c4 take the mean of the top-k *layers* per class (eq. 2, 4), so on one
layer they report that layer's value.

Memory on N samples of D neurons: no N x N matrix is ever formed. Silhouettes use the
identity ``sum_j (1 - u_i.u_j) = n - u_i.sum_j u_j`` for unit rows ``u`` (exact, O(n_S x D)
per superclass S); the spread of pairwise cosine distances comes from the D x D Gram matrix
``U^T U`` accumulated over row chunks, or, when D is large, from streamed row-by-row-block
products of at most ``2**22`` float64 values (32 MB) each. Per-neuron statistics run over
column blocks of at most 32 MB. Peaks (tracemalloc) on 50,000 x 64 float32 latents (13 MB),
100 subclasses in 20 superclasses: c1 67 MB, c2 5 MB, c3 78 MB, c4 116 MB; a single N x N
float64 matrix would take 20 GB.

>>> rng = np.random.default_rng(0)
>>> z = rng.normal(size=(60, 8)); y = np.arange(60) % 6; y_super = y // 2
>>> [round(f(z, y, y_super, top_k=3), 3) for f in (c1, c2)]  # no planted structure: small
[0.303, 0.082]
>>> [round(f(z, y_super, top_k=3), 3) for f in (c3, c4)]
[1.124, 1.035]
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lcc.errors import LCCInputError, as_label_vector

__all__ = [
    "ClassValues",
    "c1",
    "c2",
    "c3",
    "c4",
    "cluster_measure",
    "combine_layers",
    "combine_neurons",
    "cosine_distance_std",
    "intraclass_distance_ratio",
    "intraclass_variance_ratio",
    "neurons",
    "standardize_activations",
    "subclass_selectivity",
    "subclass_silhouette",
    "top_k_mean",
]

Reduce = Literal["mean", "median"]
Latents = Any  # one (N, ...) array, a sequence of them, or a mapping layer name -> array
Ratio = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (numerator, denominator) -> ratio

#: Default top-k of the neuron-level measures c1, c3 (the paper's k = 30, sec. 4.1).
TOP_NEURONS = 30
#: Default top-k of the layer-level measures c2, c4 (the paper's k = 5 for ResNets, sec. 4.1).
TOP_LAYERS = 5
#: Fraction of samples left active by c4's bias + ReLU (sec. 2.3.2, footnote 3).
ACTIVE_FRACTION = 0.25
#: Largest float64 block (values) a streamed step holds: 2**22 values = 32 MB.
BLOCK = 2**22


@dataclass(frozen=True)
class ClassValues:
    """Per-(sub)class values of one layer: ``values[i]`` belongs to class ``labels[i]``.

    ``values`` is (I, D) for neuron-level measures (one column per neuron) and (I,) for
    layer-level ones.
    """

    labels: np.ndarray
    values: np.ndarray


# --------------------------------------------------------------------------- inputs


def neurons(latent: object, *, name: str = "z") -> np.ndarray:
    """One value per neuron and sample: feature maps reduced by global max pooling.

    ``(N, C, *spatial)`` with two or more spatial dims (conv feature maps) -> ``(N, C)`` by the
    maximum over the spatial positions (a neuron is a feature map, sec. 2.1); ``(N, T, C)``
    token sequences -> ``(N, C)`` by the maximum over tokens (as ``collect_latents(...,
    pool="max")``); ``(N, D)`` is kept. float64 stays float64, anything else becomes float32.

    >>> x = np.arange(16.0).reshape(2, 2, 2, 2)
    >>> neurons(x).tolist()
    [[3.0, 7.0], [11.0, 15.0]]
    >>> neurons(np.ones((3, 5))).shape
    (3, 5)
    """
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; never import it
    if torch is not None and isinstance(latent, torch.Tensor):
        latent = latent.detach().cpu().numpy()
    array = np.asarray(latent)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise LCCInputError(f"{name} must be a numeric array, got dtype {array.dtype}")
    if array.ndim < 2:
        raise LCCInputError(
            f"{name} must have shape (N, D) or (N, C, H, W), one row per sample; "
            f"got shape {array.shape}"
        )
    if array.shape[0] < 2 or array[0].size == 0:
        raise LCCInputError(f"{name} has shape {array.shape}; pass at least 2 non-empty rows")
    if array.ndim == 3:
        array = array.max(axis=1)
    elif array.ndim > 3:
        array = array.max(axis=tuple(range(2, array.ndim)))
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    array = np.ascontiguousarray(array, dtype=dtype)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise LCCInputError(
            f"{name} contains NaN or inf in {bad.size} row(s) (first: {bad[:5].tolist()}); "
            "check the model for diverging activations or drop those samples"
        )
    return array


def _layers(latents: Latents) -> list[tuple[str, np.ndarray]]:
    """Named (N, D) layers from one array, a sequence or a mapping of them."""
    if isinstance(latents, Mapping):
        items = [(str(key), value) for key, value in latents.items()]
    elif isinstance(latents, (list, tuple)):
        items = [(str(i), value) for i, value in enumerate(latents)]
    else:
        items = [("z", latents)]
    if not items:
        raise LCCInputError("no layer given; pass one (N, D) array or a list of them")
    layers = [(key, neurons(value, name=f"layer {key}")) for key, value in items]
    n = layers[0][1].shape[0]
    for key, value in layers:
        if value.shape[0] != n:
            raise LCCInputError(
                f"layer {key} has {value.shape[0]} rows but layer {layers[0][0]} has {n}; "
                "collect every layer on the same samples"
            )
    return layers


def _classes(y: np.ndarray, *, at_least: int = 2, name: str = "y") -> list[np.ndarray]:
    """Row indices of each class of ``y``, classes in increasing label order."""
    labels, inverse = np.unique(y, return_inverse=True)
    if labels.size < at_least:
        raise LCCInputError(
            f"{name} has {labels.size} class(es); these measures compare classes, "
            f"pass labels with at least {at_least}"
        )
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse))[:-1]
    return np.split(order, bounds)


def _hierarchy(y: object, y_super: object, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated subclass and superclass labels; each subclass inside one superclass."""
    sub = as_label_vector(y, n, name="y")
    sup = as_label_vector(y_super, n, name="y_super")
    pairs = np.unique(np.stack([sub, sup], axis=1), axis=0)
    labels, counts = np.unique(pairs[:, 0], return_counts=True)
    if (counts > 1).any():
        bad = int(labels[counts > 1][0])
        supers = pairs[pairs[:, 0] == bad, 1].tolist()
        raise LCCInputError(
            f"subclass {bad} appears under superclasses {supers}; y_super must give each "
            "subclass (a value of y) one superclass"
        )
    return sub, sup


def _groups(sub: np.ndarray, sup: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows of superclass S, subclass labels of those rows) for each S with >= 2 subclasses."""
    groups = [(rows, sub[rows]) for rows in _classes(sup, at_least=1, name="y_super")]
    kept = [(rows, labels) for rows, labels in groups if np.unique(labels).size >= 2]
    if not kept:
        raise LCCInputError(
            "no superclass holds two or more subclasses; c1 and c2 compare a subclass with the "
            "rest of its superclass: pass y (subclasses) finer than y_super (superclasses)"
        )
    return kept


def top_k_mean(values: np.ndarray, k: int, *, axis: int = -1) -> np.ndarray:
    """Mean of the ``k`` highest values along ``axis`` (all of them when fewer than ``k``).

    This is the paper's ``mean^k`` (sec. 2.1).

    >>> top_k_mean(np.array([[1.0, 5.0, 3.0], [0.0, -1.0, 2.0]]), 2).tolist()
    [4.0, 1.0]
    """
    k = _check_top_k(k)
    values = np.asarray(values, dtype=np.float64)
    count = values.shape[axis]
    if k >= count:
        return values.mean(axis=axis)
    top = np.partition(values, count - k, axis=axis)
    return np.take(top, np.arange(count - k, count), axis=axis).mean(axis=axis)


def _check_top_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise LCCInputError(f"top_k must be a positive integer, got {k!r}")
    return int(k)


def _blocks(n: int, size: int) -> list[slice]:
    """Slices of ``range(n)`` of at most ``BLOCK`` values when each index holds ``size``."""
    step = max(1, BLOCK // max(size, 1))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _mean_std(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation, two-pass in float64 blocks."""
    mean = np.empty(rows.shape[1])
    std = np.empty(rows.shape[1])
    for block in _blocks(rows.shape[1], rows.shape[0]):
        part = rows[:, block].astype(np.float64)
        mean[block] = part.mean(axis=0)
        std[block] = np.sqrt(np.square(part - mean[block]).mean(axis=0))
    return mean, std


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` with 0/0 = 0 (a constant neuron carries no information)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = numerator / denominator
    return np.where((numerator == 0) & (denominator == 0), 0.0, out)


# --------------------------------------------------------------------------- c1, c3: neurons


def subclass_selectivity(z: object, y: object, y_super: object) -> ClassValues:
    """Selectivity of every neuron for every subclass, the terms of eq. (1).

    ``(mu_{n,C_i} - mu_{n,S\\C_i}) / (sigma_{n,C_i} + sigma_{n,S\\C_i})`` with ``C_i`` the
    samples of subclass ``i`` (``y == i``), ``S`` those of its superclass (``y_super``),
    population standard deviations and 0/0 = 0. Subclasses alone in their superclass have no
    ``S\\C_i`` and are left out. Returns (I, D) values, rows in increasing subclass label.

    >>> z = np.array([[0.0], [1.0], [4.0], [5.0]])
    >>> subclass_selectivity(z, [0, 0, 1, 1], [0, 0, 0, 0]).values.ravel().tolist()
    [-4.0, 4.0]
    """
    return _selectivity(neurons(z), y, y_super, _ratio)


def _selectivity(z: np.ndarray, y: object, y_super: object, ratio: Ratio) -> ClassValues:
    """Eq. (1)'s terms ``ratio(mu_in - mu_out, sigma_in + sigma_out)`` of :func:`neurons` ``z``."""
    sub, sup = _hierarchy(y, y_super, z.shape[0])
    labels, rows_out = [], []
    for rows, sub_labels in _groups(sub, sup):
        for label in np.unique(sub_labels):
            inside = sub_labels == label
            mean_in, std_in = _mean_std(z[rows[inside]])
            mean_out, std_out = _mean_std(z[rows[~inside]])
            labels.append(label)
            rows_out.append(ratio(mean_in - mean_out, std_in + std_out))
    order = np.argsort(labels, kind="stable")
    return ClassValues(np.asarray(labels, dtype=np.int64)[order], np.stack(rows_out)[order])


def intraclass_variance_ratio(z: object, y: object) -> ClassValues:
    """``sigma_{n,C_i} / sigma_{n,D}`` for every class and neuron, the terms of eq. (3).

    Population standard deviations over the samples of class ``i`` and over all samples;
    a neuron constant over the whole set scores 0. Returns (I, D) values.

    >>> z = np.array([[0.0, 1.0], [2.0, 1.0], [10.0, 1.0], [12.0, 1.0]])
    >>> intraclass_variance_ratio(z, [0, 0, 1, 1]).values.round(3).tolist()  # 1 / sqrt(26)
    [[0.196, 0.0], [0.196, 0.0]]
    """
    z = neurons(z)
    return _variance_ratio(z, as_label_vector(y, z.shape[0]), _ratio)


def _variance_ratio(z: np.ndarray, y: np.ndarray, ratio: Ratio) -> ClassValues:
    """Eq. (3)'s terms ``ratio(sigma_C, sigma_D)`` of :func:`neurons` ``z``, labels ``y``."""
    classes = _classes(y)
    _, std_all = _mean_std(z)
    values = np.stack([ratio(_mean_std(z[rows])[1], std_all) for rows in classes])
    return ClassValues(np.unique(y), values)


def combine_neurons(parts: Sequence[ClassValues], top_k: int, reduce: Reduce) -> float:
    """Pool the neurons of all layers, average each class's ``top_k`` best, reduce classes.

    ``parts`` hold (I, D_l) values of the same classes; c1 reduces with the median over
    subclasses, c3 with the mean over classes.

    >>> a = ClassValues(np.array([0, 1]), np.array([[1.0, 2.0], [3.0, 0.0]]))
    >>> b = ClassValues(np.array([0, 1]), np.array([[5.0], [1.0]]))
    >>> combine_neurons([a, b], top_k=2, reduce="mean")  # (5+2)/2 and (3+1)/2
    2.75
    """
    labels = _same_labels(parts)
    values = np.concatenate([np.asarray(part.values).reshape(labels.size, -1) for part in parts], 1)
    return _reduce(top_k_mean(values, top_k, axis=1), reduce)


def combine_layers(parts: Sequence[ClassValues], top_k: int, reduce: Reduce) -> float:
    """Average each class's ``top_k`` best layers, then reduce over classes (eq. 2, 4).

    ``parts`` hold one (I,) value per class for each layer; c2 reduces with the median over
    subclasses, c4 with the mean over classes. On one layer: that layer's reduced value.

    >>> a = ClassValues(np.array([0, 1]), np.array([0.1, 0.9]))
    >>> b = ClassValues(np.array([0, 1]), np.array([0.5, 0.3]))
    >>> combine_layers([a, b], top_k=1, reduce="mean")  # (0.5 + 0.9) / 2
    0.7
    """
    labels = _same_labels(parts)
    values = np.stack([np.asarray(part.values).reshape(labels.size) for part in parts], axis=1)
    return _reduce(top_k_mean(values, top_k, axis=1), reduce)


def _same_labels(parts: Sequence[ClassValues]) -> np.ndarray:
    if not parts:
        raise LCCInputError("no layer given; pass at least one layer's values")
    labels = np.asarray(parts[0].labels)
    for part in parts[1:]:
        if not np.array_equal(np.asarray(part.labels), labels):
            raise LCCInputError(
                "layers hold values of different classes; measure every layer on the same "
                "samples and labels"
            )
    return labels


def _reduce(values: np.ndarray, reduce: Reduce) -> float:
    if reduce == "median":
        return float(np.median(values))
    if reduce == "mean":
        return float(np.mean(values))
    raise LCCInputError(f"reduce={reduce!r} is not one of 'mean', 'median'")


def c1(latents: Latents, y: object, y_super: object, *, top_k: int = TOP_NEURONS) -> float:
    """Neuron-level subclass selectivity, eq. (1); ``higher_is_better = True``.

    ``c1 = median_i mean^k_n (mu_{n,C_i} - mu_{n,S(i)\\C_i}) / (sigma_{n,C_i} +
    sigma_{n,S(i)\\C_i})``: for each subclass ``i`` (``y``) the mean of its ``top_k`` most
    selective neurons among all neurons of all given layers (pre-activations), then the
    median over subclasses. ``y_super`` gives each subclass's superclass. Selectivity is
    signed, as in eq. (1): the top neurons are those firing *more* on the subclass than on the
    rest of its superclass.

    >>> z = np.array([[0.0, 3.0], [1.0, 1.0], [4.0, 0.0], [5.0, 2.0]])
    >>> c1(z, [0, 0, 1, 1], [0, 0, 0, 0], top_k=1)  # median of 0.5 (neuron 1) and 4 (neuron 0)
    2.25
    """
    parts = [subclass_selectivity(z, y, y_super) for _, z in _layers(latents)]
    return combine_neurons(parts, _check_top_k(top_k), "median")


def c3(latents: Latents, y: object, *, top_k: int = TOP_NEURONS) -> float:
    """Neuron-level intraclass variance ratio, eq. (3); ``higher_is_better = True``.

    ``c3 = mean_i mean^k_n sigma_{n,C_i} / sigma_{n,D}``: for each class the mean of the
    ``top_k`` highest ratios among all neurons of all given layers (pre-activations; the
    *highest* ratios are the top, as in eq. 3), then the mean over classes.

    >>> z = np.array([[0.0, 1.0], [2.0, 3.0], [10.0, 1.0], [12.0, 3.0]])
    >>> c3(z, [0, 0, 1, 1], top_k=1)  # neuron 1 varies within each class only
    1.0
    """
    parts = [intraclass_variance_ratio(z, y) for _, z in _layers(latents)]
    return combine_neurons(parts, _check_top_k(top_k), "mean")


# --------------------------------------------------------------------------- c2: silhouette


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """float64 rows scaled to norm 1; all-zero rows stay zero (cosine distance 1 to others)."""
    rows = rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def _silhouettes(u: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Silhouette of every row of unit rows ``u`` for clusters ``labels``, cosine distance.

    Exact without pairwise distances: for unit rows the summed distance from ``u_i`` to a
    set ``C`` is ``|C| - u_i . sum_{j in C} u_j``. Same conventions as scikit-learn: a sample
    alone in its cluster scores 0, a zero row is at distance 1 from every other row.
    """
    names, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    sums = np.zeros((names.size, u.shape[1]))
    np.add.at(sums, inverse, u)
    distance_sums = counts[None, :] - u @ sums.T  # (n, m): to every member, self included
    rows = np.arange(u.shape[0])
    own = counts[inverse]
    # remove the self-distance 1 - |u_i|^2 (0 for unit rows, 1 for zero rows)
    intra_sum = distance_sums[rows, inverse] - (1.0 - np.einsum("ij,ij->i", u, u))
    with np.errstate(divide="ignore", invalid="ignore"):
        intra = intra_sum / (own - 1.0)
        inter_all = distance_sums / counts[None, :]
    inter_all[rows, inverse] = np.inf
    inter = inter_all.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = (inter - intra) / np.maximum(intra, inter)
    scores[own == 1] = 0.0
    return np.nan_to_num(scores)


def subclass_silhouette(z: object, y: object, y_super: object, *, relu: bool = True) -> ClassValues:
    """Mean silhouette of each subclass within its superclass: eq. (2)'s ``silhouette(a_l,
    S_{s(i)}, C_i)``.

    Cosine distances between the activations ``a = ReLU(z)`` (``relu=False``: ``z`` as given)
    of the samples of each superclass ``S``, clusters = the subclasses in ``S``; the value of
    subclass ``i`` is the mean silhouette over its samples. Subclasses alone in their
    superclass are left out. Peak memory O(n_S x D) float64 for the largest superclass.

    >>> z = np.array([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.2, 1.0]])
    >>> values = subclass_silhouette(z, [0, 0, 1, 1], [0, 0, 0, 0]).values
    >>> bool((values > 0.9).all())
    True
    """
    z = neurons(z)
    sub, sup = _hierarchy(y, y_super, z.shape[0])
    labels, values = [], []
    for rows, sub_labels in _groups(sub, sup):
        active = z[rows]
        if relu:
            active = np.maximum(active, 0)
        scores = _silhouettes(_unit_rows(active), sub_labels)
        for label in np.unique(sub_labels):
            labels.append(label)
            values.append(scores[sub_labels == label].mean())
    order = np.argsort(labels, kind="stable")
    return ClassValues(np.asarray(labels, dtype=np.int64)[order], np.asarray(values)[order])


def c2(
    latents: Latents,
    y: object,
    y_super: object,
    *,
    top_k: int = TOP_LAYERS,
    relu: bool = True,
) -> float:
    """Layer-level subclass silhouette, eq. (2); ``higher_is_better = True``.

    ``c2 = median_i mean^k_l silhouette(a_l, S_{s(i)}, C_i)``: for each subclass the mean of
    its ``top_k`` best layers' silhouettes (:func:`subclass_silhouette`), then the median
    over subclasses; one layer gives that layer's median silhouette.

    >>> z = np.array([[1.0, 0.1], [1.0, 0.2], [0.1, 1.0], [0.2, 1.0]])
    >>> round(c2(z, [0, 0, 1, 1], [0, 0, 0, 0]), 3)
    0.993
    """
    top_k = _check_top_k(top_k)
    parts = [subclass_silhouette(z, y, y_super, relu=relu) for _, z in _layers(latents)]
    return combine_layers(parts, top_k, "median")


# --------------------------------------------------------------------------- c4: distances


def standardize_activations(z: object, *, active: float = ACTIVE_FRACTION) -> np.ndarray:
    """c4's activations from pre-activations (sec. 2.3.2): standardise, bias, ReLU.

    Each neuron is shifted and scaled to zero mean and unit variance over the samples, then
    shifted by a bias so that a fraction ``active`` of the samples is positive (the bias is
    minus the ``1 - active`` quantile), then passed through a ReLU. A constant neuron becomes
    all zeros. Returns an array like ``neurons(z)`` (float32, or float64 for float64 input).

    >>> a = standardize_activations(np.arange(8.0).reshape(8, 1), active=0.25)
    >>> int((a > 0).sum())
    2
    """
    z = neurons(z)
    if not 0.0 < float(active) < 1.0:
        raise LCCInputError(f"active={active} must be a fraction strictly between 0 and 1")
    out = np.empty_like(z)
    for block in _blocks(z.shape[1], z.shape[0]):
        part = z[:, block].astype(np.float64)
        mean = part.mean(axis=0)
        std = np.sqrt(np.square(part - mean).mean(axis=0))
        scaled = np.divide(part - mean, std, out=np.zeros_like(part), where=std > 0)
        bias = -np.quantile(scaled, 1.0 - float(active), axis=0)
        out[:, block] = np.maximum(scaled + bias, 0.0)
    return out


def cosine_distance_std(z: object, *, method: Literal["auto", "gram", "pairs"] = "auto") -> float:
    """Population standard deviation of the cosine distances over all pairs ``i < j``.

    ``Sigma_E`` of eq. (4). A zero row is at distance 1 from every other row. ``method``:
    ``"gram"`` accumulates the D x D matrix ``U^T U`` of the unit rows over row chunks
    (``sum_{i<j} s_ij^2 = (||U^T U||_F^2 - sum_i |u_i|^4) / 2``; O(N D^2) time, D^2 + 32 MB
    memory); ``"pairs"`` streams blocks of ``U U^T`` (O(N^2 D) time, 32 MB blocks);
    ``"auto"`` takes ``"gram"`` when D <= min(N, 4096). Never holds N x N values.

    >>> z = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> round(cosine_distance_std(z), 4)  # distances 1, 1 - 1/sqrt(2) (twice)
    0.3333
    """
    z = neurons(z)
    n, d = z.shape
    if method == "auto":
        method = "gram" if d <= min(n, 4096) else "pairs"
    if method == "gram":
        count, total, squares = _pair_sums_gram(z)
    elif method == "pairs":
        count, total, squares = _pair_sums_streamed(z)
    else:
        raise LCCInputError(f"method={method!r} is not one of 'auto', 'gram', 'pairs'")
    mean = total / count
    return float(np.sqrt(max(squares / count - mean * mean, 0.0)))


def _pair_sums_gram(z: np.ndarray) -> tuple[float, float, float]:
    """(pair count, sum of distances, sum of squared distances) over i < j, via U^T U."""
    n, d = z.shape
    gram = np.zeros((d, d))
    column_sum = np.zeros(d)
    norms2 = norms4 = 0.0
    for rows in _blocks(n, d):
        u = _unit_rows(z[rows])
        gram += u.T @ u
        column_sum += u.sum(axis=0)
        squared = np.einsum("ij,ij->i", u, u)
        norms2 += float(squared.sum())
        norms4 += float(np.square(squared).sum())
    similarity = (float(column_sum @ column_sum) - norms2) / 2.0
    similarity2 = (float(np.square(gram).sum()) - norms4) / 2.0
    count = n * (n - 1) / 2.0
    # distance = 1 - similarity
    return count, count - similarity, count - 2.0 * similarity + similarity2


def _pair_sums_streamed(z: np.ndarray) -> tuple[float, float, float]:
    """Like :func:`_pair_sums_gram` from blocks of pairwise distances (upper triangle only)."""
    n, d = z.shape
    step = max(1, int(np.sqrt(BLOCK)))
    step = min(step, max(1, BLOCK // max(d, 1)))
    total = squares = 0.0
    for start in range(0, n, step):
        left = _unit_rows(z[start : start + step])
        for other in range(start, n, step):
            right = left if other == start else _unit_rows(z[other : other + step])
            distance = 1.0 - left @ right.T
            if other == start:
                distance = distance[np.triu_indices(distance.shape[0], k=1)]
            total += float(distance.sum())
            squares += float(np.square(distance).sum())
    return n * (n - 1) / 2.0, total, squares


def intraclass_distance_ratio(
    z: object, y: object, *, active: float = ACTIVE_FRACTION, standardize: bool = True
) -> ClassValues:
    """``Sigma_{l,C_i} / Sigma_{l,D}`` for every class, the terms of eq. (4).

    Standard deviations of the pairwise cosine distances within class ``i`` and over all
    samples, on :func:`standardize_activations` of the pre-activations ``z`` (``standardize=
    False``: on ``z`` as given). Each class needs 2 samples. Returns (I,) values.

    >>> z = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.5, 0.5]])
    >>> values = intraclass_distance_ratio(z, [0, 0, 1, 1, 1], standardize=False).values
    >>> [round(v, 3) for v in values.tolist()]
    [0.0, 0.331]
    """
    z = neurons(z)
    y = as_label_vector(y, z.shape[0])
    classes = _classes(y)
    small = [int(y[rows[0]]) for rows in classes if rows.size < 2]
    if small:
        raise LCCInputError(
            f"class {small[0]} has a single sample; c4 needs pairs within every class: "
            "drop it or collect more samples"
        )
    activations = standardize_activations(z, active=active) if standardize else z
    spread = cosine_distance_std(activations)
    within = np.array([cosine_distance_std(activations[rows]) for rows in classes])
    return ClassValues(np.unique(y), _ratio(within, np.full_like(within, spread)))


def c4(
    latents: Latents,
    y: object,
    *,
    top_k: int = TOP_LAYERS,
    active: float = ACTIVE_FRACTION,
) -> float:
    """Layer-level variance of pairwise cosine distances, eq. (4); ``higher_is_better = True``.

    ``c4 = mean_i mean^k_l Sigma_{l,C_i} / Sigma_{l,D}`` on the standardised activations
    (:func:`standardize_activations`: zero mean, unit variance, bias leaving ``active`` = 25%
    of the samples active, ReLU): for each class the mean of its ``top_k`` best layers, then
    the mean over classes. Peak memory about two copies of one layer's (N, D) pre-activations
    (input and activations) plus D^2 float64 values and 32 MB blocks.

    >>> rng = np.random.default_rng(0)
    >>> round(c4(rng.normal(size=(40, 6)), np.arange(40) % 2), 3)
    1.036
    """
    top_k = _check_top_k(top_k)
    parts = [intraclass_distance_ratio(z, y, active=active) for _, z in _layers(latents)]
    return combine_layers(parts, top_k, "mean")


# --------------------------------------------------------------------------- LCC's measure


def cluster_measure(
    z: object,
    y: object,
    predictions: object = None,
    *,
    k: int = 5,
    method: str = "leiden",
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """LCC's view of one layer: clusters, misclustered fraction, accuracy on CC vs MC samples.

    Clusters ``neurons(z)`` with :func:`lcc.engine.refresh.refresh` (k-NN graph with ``k``
    neighbours, ``method`` = leiden, louvain or peer-pressure; ``options`` are further
    :class:`~lcc.engine.refresh.RefreshConfig` fields, e.g. ``knn="approximate"``), matches
    clusters to classes, and splits the samples into correctly clustered (CC) and
    misclustered (MC). With ``predictions`` (N,) of the model, also reports its accuracy
    overall and on each group (None for an empty group). ``misclustered_fraction`` is the
    headline value; ``higher_is_better = False``.

    >>> from lcc.synthetic import gaussian_mixture
    >>> z, y, _ = gaussian_mixture(200, 8, 2, 2, separation=6.0, seed=0)
    >>> out = cluster_measure(z, y, y, k=5)
    >>> out["n_clusters"] >= 2, out["misclustered_fraction"] < 0.05, out["accuracy_cc"]
    (True, True, 1.0)
    """
    from lcc.engine.refresh import refresh

    z = neurons(z)
    labels = as_label_vector(y, z.shape[0])
    predicted = (
        None
        if predictions is None
        else as_label_vector(predictions, z.shape[0], name="predictions")
    )
    options.setdefault("targets", "approximate")  # targets are not needed: the cheap ones
    result = refresh(z, labels, k=k, method=method, seed=seed, **options)
    misclustered = result.misclustered
    out: dict[str, Any] = {
        "n": int(result.n),
        "k": int(result.config.k),
        "method": result.config.method,
        "seed": int(result.config.seed),
        "n_clusters": result.n_clusters,
        "misclustered": int(np.count_nonzero(misclustered)),
        "misclustered_fraction": result.misclustered_fraction,
        "modularity": float(result.modularity),
        "accuracy": None,
        "accuracy_cc": None,
        "accuracy_mc": None,
    }
    if predicted is not None:
        correct = predicted == labels
        out["accuracy"] = float(correct.mean())
        out["accuracy_cc"] = _mean_or_none(correct[~misclustered])
        out["accuracy_mc"] = _mean_or_none(correct[misclustered])
    return out


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None
