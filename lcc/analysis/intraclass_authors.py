"""c1-c4 as the authors' public code computes them (``variant="authors"``).

The values of the paper's Table 1 come from ``measures.py`` of Simoncarbo/Intraclass-
clustering-measures, which departs from the paper's text (that :mod:`lcc.analysis.intraclass`
follows) in these details, each reproduced here:

1. **Dead neurons.** A neuron whose pre-activations are negative on every sample gets
   selectivity 0 in c1 and ratio 0 in c3 (it can still be among the top-k), and is dropped
   from its layer before c4 (a layer without a live neuron is dropped).
2. **+1e-7.** Denominators carry ``+ 1e-7``: c1's ``sigma_in + sigma_out``, c3's
   ``sigma_D``, c4's standardisation ``std`` and ``Sigma_D``.
3. **c4's threshold.** The active fraction is not always 25 %: the threshold is the
   ``min(100 - 1000 / D, 75)``-th percentile (Python's ``round``, at least 0) of each
   standardised neuron, for a layer of ``D`` live neurons, so that about 10 neurons per
   sample are active in narrow layers.
4. **c4's spread.** ``Sigma_E`` is the standard deviation of the *whole* ``n x n`` cosine
   distance matrix, its ``n`` zero self-distances included (the text: over the pairs).
5. **Default k.** ``k = 1`` for c1 (the most selective neuron), c2 and c4 (the best layer),
   and ``k = max(round(D / I), 1)`` for c3, with ``D`` the number of neurons pooled over the
   given layers and ``I`` the number of classes.

c2 is otherwise computed as in the text (activations ``ReLU(z)``, cosine silhouettes).

>>> rng = np.random.default_rng(0)
>>> z = rng.normal(size=(60, 8)); y = np.arange(60) % 6; y_super = y // 2
>>> round(c1(z, y, y_super), 3), round(c3(z, y_super), 3), round(c4(z, y_super), 3)
(0.409, 1.124, 0.95)
"""

from __future__ import annotations

import numpy as np

from lcc.analysis import intraclass
from lcc.analysis.intraclass import ClassValues, Latents

__all__ = [
    "EPSILON",
    "alive",
    "c1",
    "c2",
    "c3",
    "c3_top_k",
    "c4",
    "c4_activations",
    "distance_ratio",
    "full_distance_std",
    "subclass_selectivity",
    "variance_ratio",
]

#: the constant the authors add to denominators
EPSILON = 1e-7


def alive(z: np.ndarray) -> np.ndarray:
    """Neurons with a non-negative pre-activation on at least one sample (D,) bool.

    >>> alive(np.array([[-1.0, 0.0], [-2.0, -1.0]])).tolist()
    [False, True]
    """
    return ~np.all(np.asarray(z) < 0, axis=0)


def subclass_selectivity(z: object, y: object, y_super: object) -> ClassValues:
    """c1's terms as the code computes them: ``(mu_in - mu_out) / (sigma_in + sigma_out +
    1e-7)``, 0 for dead neurons; (I, D) values, rows in increasing subclass label.

    >>> z = np.array([[0.0], [1.0], [4.0], [5.0]])
    >>> subclass_selectivity(z, [0, 0, 1, 1], [0, 0, 0, 0]).values.ravel().round(3).tolist()
    [-4.0, 4.0]
    """
    z = intraclass.neurons(z)
    return intraclass._selectivity(z, y, y_super, _live_ratio(z))


def variance_ratio(z: object, y: object) -> ClassValues:
    """c3's terms as the code computes them: ``sigma_C / (sigma_D + 1e-7)``, 0 for dead
    neurons; (I, D) values.

    >>> z = np.array([[-1.0, 0.0], [-2.0, 2.0], [-3.0, 10.0], [-4.0, 12.0]])
    >>> variance_ratio(z, [0, 0, 1, 1]).values.round(3).tolist()  # neuron 0 is dead
    [[0.0, 0.196], [0.0, 0.196]]
    """
    z = intraclass.neurons(z)
    return intraclass._variance_ratio(z, np.asarray(y), _live_ratio(z))


def _live_ratio(z: np.ndarray) -> intraclass.Ratio:
    """The code's ratio: ``numerator / (denominator + 1e-7)``, 0 for the dead neurons of ``z``."""
    live = alive(z)
    return lambda numerator, denominator: np.where(live, numerator / (denominator + EPSILON), 0)


def c4_activations(z: object) -> np.ndarray | None:
    """c4's activations as the code makes them: dead neurons dropped, each neuron standardised
    (``std + 1e-7``), shifted by its ``min(round(100 - 1000/D), 75)``-th percentile, ReLU;
    None when no neuron is alive.

    >>> a = c4_activations(np.arange(40.0).reshape(20, 2))  # D = 2: the 0th percentile
    >>> int((a[:, 0] > 0).sum())
    19
    """
    z = intraclass.neurons(z).astype(np.float64)
    z = z[:, alive(z)]
    if z.shape[1] == 0:
        return None
    z = (z - z.mean(axis=0)) / (z.std(axis=0) + EPSILON)
    percentile = max(min(round(100 - 100 * 10 / z.shape[1]), 75), 0)
    return np.maximum(z - np.percentile(z, percentile, axis=0, keepdims=True), 0.0)


def full_distance_std(a: np.ndarray) -> float:
    """Standard deviation of the full ``n x n`` cosine distance matrix (zero diagonal included),
    from the pair sums of :func:`lcc.analysis.intraclass.cosine_distance_std` (no n x n matrix).

    >>> round(full_distance_std(np.array([[1.0, 0.0], [0.0, 1.0]])), 3)  # 0, 1, 1, 0
    0.5
    """
    n = a.shape[0]
    _, total, squares = intraclass._pair_sums_gram(np.ascontiguousarray(a))
    mean = 2.0 * total / (n * n)
    return float(np.sqrt(max(2.0 * squares / (n * n) - mean * mean, 0.0)))


def distance_ratio(z: object, y: object) -> ClassValues | None:
    """c4's terms as the code computes them: ``Sigma_C / (Sigma_D + 1e-7)`` on
    :func:`c4_activations`; None for a layer without live neurons."""
    activations = c4_activations(z)
    if activations is None:
        return None
    labels = np.asarray(y)
    classes = intraclass._classes(labels)
    spread = full_distance_std(activations)
    within = np.array([full_distance_std(activations[rows]) for rows in classes])
    return ClassValues(np.unique(labels), within / (spread + EPSILON))


def c3_top_k(n_neurons: int, n_classes: int) -> int:
    """The code's default k of c3: ``max(round(D / I), 1)``.

    >>> c3_top_k(64, 3), c3_top_k(2, 10)
    (21, 1)
    """
    return max(round(n_neurons / n_classes), 1)


def _live_layers(latents: Latents) -> list[np.ndarray]:
    return [z for _, z in intraclass._layers(latents)]


def c1(latents: Latents, y: object, y_super: object, *, top_k: int = 1) -> float:
    """c1 as the code computes it (k = 1: each subclass's most selective neuron)."""
    parts = [subclass_selectivity(z, y, y_super) for z in _live_layers(latents)]
    return intraclass.combine_neurons(parts, top_k, "median")


def c2(latents: Latents, y: object, y_super: object, *, top_k: int = 1) -> float:
    """c2 as the code computes it: the text's silhouettes, k = 1 (best layer per subclass)."""
    return intraclass.c2(latents, y, y_super, top_k=top_k)


def c3(latents: Latents, y: object, *, top_k: int | None = None) -> float:
    """c3 as the code computes it (k = round(D / I) by default)."""
    parts = [variance_ratio(z, y) for z in _live_layers(latents)]
    if top_k is None:
        total = sum(part.values.shape[1] for part in parts)
        top_k = c3_top_k(total, parts[0].labels.size)
    return intraclass.combine_neurons(parts, top_k, "mean")


def c4(latents: Latents, y: object, *, top_k: int = 1) -> float:
    """c4 as the code computes it (k = 1: the best layer per class); layers without live
    neurons are dropped."""
    parts = [part for z in _live_layers(latents) if (part := distance_ratio(z, y)) is not None]
    if not parts:
        raise intraclass.LCCInputError(
            "every neuron of every layer is dead (negative on every sample); c4 (authors) "
            "has nothing to measure: pass pre-activations of a trained layer"
        )
    return intraclass.combine_layers(parts, top_k, "mean")
