"""Named measures of latent spaces, as JSON-ready lines: the registry behind ``lcc measure``.

Each measure of :data:`MEASURES` turns a :class:`MeasureInput` (named layers of latents,
labels, optional superclass labels and model predictions) into a list of dicts, one per
layer, each with at least ``measure``, ``value``, ``higher_is_better``, ``layer`` and ``n``.
The c-measures add one more line with ``layer = "all"`` when several layers are given: the
paper's measure over all of them (c1, c3: top-k neurons among all layers; c2, c4: mean of
the top-k layers per class, eq. 2 and 4).

=================  ===========================================================  ==========
name               value (context keys)                                         higher is
                                                                                better
=================  ===========================================================  ==========
``c1``             subclass selectivity, eq. 1 (``top_k``, ``subclasses``)      yes
``c2``             subclass silhouette, eq. 2 (``top_layers``, ``subclasses``)  yes
``c3``             intraclass variance ratio, eq. 3 (``top_k``, ``classes``)    yes
``c4``             spread of cosine distances, eq. 4 (``top_layers``,           yes
                   ``classes``, ``active``)
``clusters``       misclustered fraction (``k``, ``n_clusters``, ``accuracy``,  no
                   ``accuracy_cc``, ``accuracy_mc``, ...)
``label-variation`` fraction of the graph's edge weight that joins two     no
                   classes (``k``, ``similarity``, ``label_variation``,
                   ``label_variation_normalized``, ...)
=================  ===========================================================  ==========

Every layer goes through :func:`lcc.analysis.intraclass.neurons` first (conv feature maps
max-pooled to one value per channel).

>>> from lcc.synthetic import gaussian_mixture
>>> z, y_super, y = gaussian_mixture(300, 8, 3, 2, separation=3.0, seed=0)
>>> data = MeasureInput({"fc": z}, y, y_super=y_super)
>>> lines = run_measures(["c1", "c3"], data, MeasureOptions(top_k=2))
>>> [(line["measure"], line["layer"], line["top_k"]) for line in lines]
[('c1', 'fc', 2), ('c3', 'fc', 2)]
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcc.analysis import intraclass, intraclass_authors
from lcc.errors import LCCInputError, as_label_vector, check_choice, check_k

__all__ = [
    "DEFAULT_K",
    "MEASURES",
    "Measure",
    "MeasureInput",
    "MeasureOptions",
    "parse_measures",
    "read_measure_input",
    "run_measures",
]

#: k-NN size of each graph measure when ``MeasureOptions.k`` is None.
DEFAULT_K: dict[str, int] = {"clusters": 5, "label-variation": 10}
SIMILARITIES: tuple[str, ...] = ("auto", "cosine", "rbf")
#: c1-c4 as the paper's text defines them, or as the authors' measures.py computes them
#: (:mod:`lcc.analysis.intraclass_authors` lists the differences)
VARIANTS: tuple[str, ...] = ("paper", "authors")


@dataclass(frozen=True)
class MeasureInput:
    """Latents of named layers (each (N, ...)) and labels (N,) of the same samples.

    ``y`` are the class labels. With superclass labels ``y_super`` the set-up is the paper's
    (sec. 2.2: a model trained on superclasses): c1 and c2 read ``y`` as the subclasses and
    ``y_super`` as their superclasses, and c3, c4, clusters and label-variation use the
    model's classes, ``y_super`` (their lines say so with ``"labels": "y_super"``; omit
    ``y_super`` to measure them on ``y``). ``predictions`` (N,), the model's predicted
    classes, give ``clusters`` its CC/MC accuracies; ``clusters`` then runs on the labels the
    predictions were made for: ``y_super`` when they lie in its range, else ``y`` (a model
    trained on the subclasses), and predictions beyond both ranges are refused.
    """

    layers: Mapping[str, Any]
    y: Any
    y_super: Any = None
    predictions: Any = None


@dataclass(frozen=True)
class MeasureOptions:
    """Settings shared by the measures; see :data:`MEASURES` for who reads what.

    >>> MeasureOptions(top_k=5).top_k
    5
    """

    top_k: int | None = None  # c1, c3: neurons per (sub)class (None: the variant's default)
    top_layers: int | None = None  # c2, c4: layers per (sub)class ("all" line; None: default)
    k: int | None = None  # clusters, label-variation: k-NN size (None: DEFAULT_K)
    method: str = "leiden"  # clusters: graph clustering
    similarity: str = "auto"  # label-variation: cosine, rbf or auto
    bandwidth: float | None = None  # label-variation: RBF bandwidth (None: mean sq. distance)
    normalize: bool = False  # label-variation: D^-1/2 A D^-1/2
    relu: bool = True  # c2: activations = ReLU(latents)
    active: float = intraclass.ACTIVE_FRACTION  # c4: fraction of samples left active
    seed: int = 0  # clusters: clustering seed
    variant: str = "paper"  # c1-c4: "paper" (the text) or "authors" (their measures.py)

    def neuron_k(self, measure: str, neurons: int, classes: int) -> int:
        """c1/c3's k: ``top_k``, else the paper's 30, or the authors' code's default (c1: 1,
        c3: round(neurons / classes)).

        >>> MeasureOptions().neuron_k("c1", 64, 4), MeasureOptions(variant="authors").neuron_k(
        ...     "c3", 64, 4)
        (30, 16)
        """
        if self.top_k is not None:
            return self.top_k
        if self.variant != "authors":
            return intraclass.TOP_NEURONS
        return 1 if measure == "c1" else intraclass_authors.c3_top_k(neurons, classes)

    def layer_k(self) -> int:
        """c2/c4's k over layers: ``top_layers``, else 5 (paper) or 1 (the authors' code)."""
        if self.top_layers is not None:
            return self.top_layers
        return 1 if self.variant == "authors" else intraclass.TOP_LAYERS


@dataclass(frozen=True)
class Measure:
    """One registered measure: its lines come from ``compute(data, options)``."""

    name: str
    description: str
    higher_is_better: bool
    compute: Callable[[_Prepared, MeasureOptions], list[dict[str, Any]]] = field(repr=False)
    needs_superclasses: bool = False


@dataclass(frozen=True)
class _Prepared:
    """Validated input: (N, D) neurons per layer and int64 label vectors."""

    layers: dict[str, np.ndarray]
    y: np.ndarray
    y_super: np.ndarray | None
    predictions: np.ndarray | None

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def classes(self) -> np.ndarray:
        """The model's classes: the superclasses when given (the paper's set-up), else y."""
        return self.y if self.y_super is None else self.y_super

    @property
    def labels(self) -> str:
        """Which input the classes come from: ``"y_super"`` or ``"y"``."""
        return "y" if self.y_super is None else "y_super"

    def predicted_classes(self) -> tuple[np.ndarray, str]:
        """The labels the predictions were made for, and their name: without predictions the
        model's classes; else the first of ``y_super``, ``y`` whose range holds every
        prediction (a model trained on the subclasses predicts beyond ``y_super``'s range)."""
        if self.predictions is None:
            return self.classes, self.labels
        candidates = [("y", self.y)] if self.y_super is None else [
            ("y_super", self.y_super), ("y", self.y)
        ]  # fmt: skip
        top = int(self.predictions.max(initial=0))
        for name, labels in candidates:
            if top <= int(labels.max(initial=0)):
                return labels, name
        names = " and ".join(f"{name} up to {int(labels.max())}" for name, labels in candidates)
        raise LCCInputError(
            f"predictions hold class {top} but the labels go {names}; save the predictions "
            "of the model trained on these labels (or drop the predictions)"
        )


# --------------------------------------------------------------------------- c1-c4


def _line(name: str, value: float, layer: str, data: _Prepared, **context: Any) -> dict[str, Any]:
    return {
        "measure": name,
        "value": float(value),
        "higher_is_better": MEASURES[name].higher_is_better,
        "layer": layer,
        "n": data.n,
        **context,
    }


def neuron_values(measure: str, variant: str) -> Callable[..., intraclass.ClassValues]:
    """c1's subclass selectivity or c3's variance ratio (``measure``), as ``variant`` computes
    them."""
    if measure == "c1":
        authors, paper = intraclass_authors.subclass_selectivity, intraclass.subclass_selectivity
    else:
        authors, paper = intraclass_authors.variance_ratio, intraclass.intraclass_variance_ratio
    return authors if variant == "authors" else paper


def _c1(data: _Prepared, options: MeasureOptions) -> list[dict[str, Any]]:
    select = neuron_values("c1", options.variant)
    parts = {name: select(z, data.y, data.y_super) for name, z in data.layers.items()}
    return _neuron_lines("c1", parts, "median", "subclasses", data, options)


def _c3(data: _Prepared, options: MeasureOptions) -> list[dict[str, Any]]:
    ratio = neuron_values("c3", options.variant)
    parts = {name: ratio(z, data.classes) for name, z in data.layers.items()}
    return _neuron_lines("c3", parts, "mean", "classes", data, options, labels=data.labels)


def _neuron_lines(
    name: str,
    parts: dict[str, intraclass.ClassValues],
    reduce: intraclass.Reduce,
    count_key: str,
    data: _Prepared,
    options: MeasureOptions,
    **context: Any,
) -> list[dict[str, Any]]:
    count = _count(parts)
    context["variant"] = options.variant
    # one line per layer, then the "all" line of the pooled neurons
    groups: list[tuple[str, list[intraclass.ClassValues], dict[str, Any]]]
    groups = [(layer, [part], {}) for layer, part in parts.items()]
    if len(parts) > 1:
        groups.append(("all", list(parts.values()), {"layers": list(data.layers)}))
    lines = []
    for layer, group, extra in groups:
        width = sum(part.values.shape[1] for part in group)
        k = options.neuron_k(name, width, count)
        value = intraclass.combine_neurons(group, k, reduce)
        if name == "c1" and len(group) == 1 and k >= width:
            _warn_all_neurons(layer, k, width)
        top = {"top_k": min(k, width), count_key: count}
        lines.append(_line(name, value, layer, data, **extra, **top, **context))
    return lines


def _warn_all_neurons(layer: str, top_k: int, neurons: int) -> None:
    warnings.warn(
        f"c1 of layer {layer}: top_k={top_k} (--top-k) is not below its {neurons} neurons, so "
        f"c1 averages every neuron (top_k={neurons} in the line) and the selectivities of a "
        "superclass's subclasses cancel (exactly 0 with two subclasses per superclass); pass "
        f"a top_k below {neurons}",
        stacklevel=4,
    )


def _c2(data: _Prepared, options: MeasureOptions) -> list[dict[str, Any]]:
    parts = {
        name: intraclass.subclass_silhouette(z, data.y, data.y_super, relu=options.relu)
        for name, z in data.layers.items()
    }
    context = {"subclasses": _count(parts), "relu": options.relu, "variant": options.variant}
    return _layer_lines("c2", parts, "median", data, options, **context)


def _c4(data: _Prepared, options: MeasureOptions) -> list[dict[str, Any]]:
    if options.variant == "authors":
        found = {name: intraclass_authors.distance_ratio(z, data.classes) for name, z in
                 data.layers.items()}  # fmt: skip
        parts = {name: part for name, part in found.items() if part is not None}
        if not parts:
            raise LCCInputError(
                "c4 (variant authors): every neuron of every layer is negative on every sample "
                "(dead); measure pre-activations of a trained layer"
            )
    else:
        parts = {
            name: intraclass.intraclass_distance_ratio(z, data.classes, active=options.active)
            for name, z in data.layers.items()
        }
    context = {"classes": _count(parts), "labels": data.labels, "variant": options.variant}
    if options.variant != "authors":
        context["active"] = options.active
    return _layer_lines("c4", parts, "mean", data, options, **context)


def _count(parts: dict[str, intraclass.ClassValues]) -> int:
    return int(next(iter(parts.values())).labels.size)


def _layer_lines(
    name: str,
    parts: dict[str, intraclass.ClassValues],
    reduce: intraclass.Reduce,
    data: _Prepared,
    options: MeasureOptions,
    **context: Any,
) -> list[dict[str, Any]]:
    lines = [
        _line(name, intraclass.combine_layers([part], 1, reduce), layer, data, **context)
        for layer, part in parts.items()
    ]
    if len(parts) > 1:
        value = intraclass.combine_layers(list(parts.values()), options.layer_k(), reduce)
        top = min(options.layer_k(), len(parts))
        lines.append(
            _line(name, value, "all", data, layers=list(data.layers), top_layers=top, **context)
        )
    return lines


# --------------------------------------------------------------------------- graph measures


def _clusters(data: _Prepared, options: MeasureOptions) -> list[dict[str, Any]]:
    k = options.k if options.k is not None else DEFAULT_K["clusters"]
    classes, labels = data.predicted_classes()
    lines = []
    for layer, z in data.layers.items():
        out = intraclass.cluster_measure(
            z, classes, data.predictions, k=k, method=options.method, seed=options.seed
        )
        value = out["misclustered_fraction"]
        lines.append(_line("clusters", value, layer, data, **out, labels=labels))
    return lines


def _label_variation(data: _Prepared, options: MeasureOptions) -> list[dict[str, Any]]:
    from lcc.engine.lgg import label_variation_measure

    k = options.k if options.k is not None else DEFAULT_K["label-variation"]
    lines = []
    for layer, z in data.layers.items():
        out = label_variation_measure(
            z,
            data.classes,
            k=k,
            similarity=options.similarity,
            bandwidth=options.bandwidth,
            normalize=options.normalize,
        )
        value = out["label_variation_normalized"]
        lines.append(_line("label-variation", value, layer, data, **out, labels=data.labels))
    return lines


#: Every measure ``lcc measure`` knows, by name.
MEASURES: dict[str, Measure] = {
    measure.name: measure
    for measure in (
        Measure(
            "c1",
            "neuron-level subclass selectivity (eq. 1): median over subclasses of the mean of "
            "the top-k neurons; needs superclass labels",
            True,
            _c1,
            needs_superclasses=True,
        ),
        Measure(
            "c2",
            "layer-level subclass silhouette on cosine distances within each superclass "
            "(eq. 2); needs superclass labels",
            True,
            _c2,
            needs_superclasses=True,
        ),
        Measure(
            "c3",
            "neuron-level intraclass variance ratio sigma(n, class) / sigma(n, dataset) "
            "(eq. 3): mean over classes of the mean of the top-k neurons",
            True,
            _c3,
        ),
        Measure(
            "c4",
            "layer-level spread of pairwise cosine distances within a class over the whole "
            "set (eq. 4), on standardised activations (25% active)",
            True,
            _c4,
        ),
        Measure(
            "clusters",
            "LCC's view: k-NN graph clusters matched to classes; value = misclustered "
            "fraction, with the model's accuracy on correctly clustered (CC) and "
            "misclustered (MC) samples when predictions are given",
            False,
            _clusters,
        ),
        Measure(
            "label-variation",
            "label variation of the latent geometry graph (k-NN, cosine or RBF); value = "
            "its share of the graph's total edge weight (0: no edge joins two classes, 1: "
            "every edge does)",
            False,
            _label_variation,
        ),
    )
}

#: Measures of ``"auto"``: c1-c4 with superclass labels, else c3 and c4.
AUTO_HIERARCHICAL: tuple[str, ...] = ("c1", "c2", "c3", "c4")
AUTO_FLAT: tuple[str, ...] = ("c3", "c4")


def parse_measures(text: str | Sequence[str], *, superclasses: bool = False) -> list[str]:
    """Measure names from ``"c1,c3"`` (or a list); ``"auto"`` is c1-c4 with superclass
    labels, else c3 and c4. Unknown names raise :class:`LCCInputError`.

    >>> parse_measures("c3, label-variation,c3")
    ['c3', 'label-variation']
    >>> parse_measures("auto")
    ['c3', 'c4']
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for part in (str(item).strip() for item in parts):
        if not part:
            continue
        if part == "auto":
            names.extend(AUTO_HIERARCHICAL if superclasses else AUTO_FLAT)
        elif part in MEASURES:
            names.append(part)
        else:
            raise LCCInputError(f"unknown measure {part!r}; valid: {', '.join(MEASURES)} (or auto)")
    if not names:
        raise LCCInputError(f"no measure given; pass names such as c1,c3 ({', '.join(MEASURES)})")
    return list(dict.fromkeys(names))


def run_measures(
    names: str | Sequence[str],
    data: MeasureInput,
    options: MeasureOptions | None = None,
) -> list[dict[str, Any]]:
    """The JSON-ready lines of the measures ``names`` on ``data``, in the order given.

    Every input and option is checked before any measure runs, so bad input raises
    :class:`LCCInputError` without partial results.
    """
    options = options or MeasureOptions()
    prepared = _prepare(data)
    selected = parse_measures(names, superclasses=prepared.y_super is not None)
    _validate(selected, prepared, options)
    lines: list[dict[str, Any]] = []
    for name in selected:
        lines.extend(MEASURES[name].compute(prepared, options))
    return lines


def _prepare(data: MeasureInput) -> _Prepared:
    if not isinstance(data.layers, Mapping) or not data.layers:
        raise LCCInputError("no layer given; pass at least one layer's latents")
    layers = dict(intraclass._layers(data.layers))  # neurons of each, the same rows
    n = next(iter(layers.values())).shape[0]
    y = as_label_vector(data.y, n)
    y_super = None if data.y_super is None else as_label_vector(data.y_super, n, name="y_super")
    predictions = (
        None
        if data.predictions is None
        else as_label_vector(data.predictions, n, name="predictions")
    )
    return _Prepared(layers, y, y_super, predictions)


def _validate(names: list[str], data: _Prepared, options: MeasureOptions) -> None:
    if not isinstance(options, MeasureOptions):
        raise LCCInputError(f"options must be a MeasureOptions, got {type(options).__name__}")
    if options.top_k is not None:
        intraclass._check_top_k(options.top_k)
    if options.top_layers is not None and (
        isinstance(options.top_layers, bool)
        or not isinstance(options.top_layers, int)
        or options.top_layers < 1
    ):
        raise LCCInputError(f"top_layers must be a positive integer, got {options.top_layers!r}")
    check_choice(options.variant, VARIANTS, name="variant")
    if np.unique(data.classes).size < 2:
        raise LCCInputError(
            f"{data.labels} holds a single class; the measures compare classes, pass >= 2"
        )
    needing = [name for name in names if MEASURES[name].needs_superclasses]
    if needing and data.y_super is None:
        raise LCCInputError(
            f"{' and '.join(needing)} {'need' if len(needing) > 1 else 'needs'} superclass "
            "labels (hierarchical labels: y are the "
            "subclasses, y_super their superclasses); pass them (lcc measure: --superclass-key "
            "with a .npz holding them), or measure c3,c4, which need none"
        )
    if needing:
        intraclass._groups(*intraclass._hierarchy(data.y, data.y_super, data.n))
    if "c4" in names:
        if not 0.0 < float(options.active) < 1.0:
            raise LCCInputError(
                f"active={options.active} must be a fraction strictly between 0 and 1"
            )
        counts = np.unique(data.classes, return_counts=True)
        if (counts[1] < 2).any():
            label = int(counts[0][counts[1] < 2][0])
            raise LCCInputError(
                f"class {label} has a single sample; c4 needs pairs within every class: "
                "drop it or collect more samples"
            )
    if "clusters" in names:
        data.predicted_classes()  # predictions beyond every label range: refused up front
    graph = [name for name in names if name in DEFAULT_K]
    for name in graph:
        check_k(options.k if options.k is not None else DEFAULT_K[name], data.n)
    if "clusters" in names:
        from lcc.engine.refresh import CLUSTER_METHODS

        check_choice(options.method, CLUSTER_METHODS, name="method")
        if isinstance(options.seed, bool) or not isinstance(options.seed, int) or options.seed < 0:
            raise LCCInputError(f"seed must be a non-negative integer, got {options.seed!r}")
    if "label-variation" in names:
        check_choice(options.similarity, SIMILARITIES, name="similarity")
        if options.bandwidth is not None and not (
            isinstance(options.bandwidth, (int, float))
            and math.isfinite(options.bandwidth)
            and options.bandwidth > 0
        ):
            raise LCCInputError(
                f"bandwidth={options.bandwidth!r} must be a positive number (or None: default)"
            )


# --------------------------------------------------------------------------- files


def read_measure_input(
    path: str | os.PathLike[str],
    layers: Sequence[str] | None = None,
    superclass_key: str | None = None,
) -> MeasureInput:
    """A :class:`MeasureInput` from a ``.npz`` / ``.safetensors`` file: ``z`` (one layer) or
    ``z_<LAYER>`` (several), ``y``, optional superclass labels (``superclass_key``, default
    ``y_super`` when present) and ``predictions``; ``layers`` keeps only those layers.

    >>> import tempfile
    >>> from lcc.io import save_npz_atomic
    >>> path = Path(tempfile.mkdtemp()) / "l.npz"
    >>> _ = save_npz_atomic(path, z_a=np.ones((4, 2)), z_b=np.ones((4, 3)), y=np.arange(4) % 2)
    >>> data = read_measure_input(path)
    >>> sorted(data.layers), data.y_super is None
    (['a', 'b'], True)
    """
    from lcc.io import array_keys, load_arrays

    file = Path(path)
    keys = array_keys(file)
    stored = {key.removeprefix("z_"): key for key in keys if key == "z" or key.startswith("z_")}
    if not stored:
        raise LCCInputError(
            f"{file} holds no latents (keys found: {', '.join(keys) or 'none'}); save them "
            "under z (one layer) or z_<LAYER> (several)"
        )
    if layers:
        missing = [layer for layer in layers if layer not in stored]
        if missing:
            raise LCCInputError(
                f"{file} has no layer {missing[0]!r} (layers: {', '.join(stored)}); "
                "pass --layers among those, or omit it"
            )
        stored = {layer: stored[layer] for layer in dict.fromkeys(layers)}
    if superclass_key is not None and superclass_key not in keys:
        raise LCCInputError(
            f"{file} has no key {superclass_key!r} for --superclass-key (keys found: "
            f"{', '.join(keys)}); save the superclass labels under it"
        )
    if superclass_key is None and "y_super" in keys:
        superclass_key = "y_super"
    if superclass_key is None and "y_fine" in keys:  # lcc train --save-latents of a superclass
        # run: y holds the trained superclasses, y_fine their subclasses (c1/c2's y)
        arrays = load_arrays(file, (*stored.values(), "y", "y_fine"))
        return MeasureInput(
            layers={layer: arrays[key] for layer, key in stored.items()},
            y=arrays["y_fine"],
            y_super=arrays["y"],
        )
    wanted = [*stored.values(), "y"]
    if superclass_key is not None:
        wanted.append(superclass_key)
    if "predictions" in keys:
        wanted.append("predictions")
    arrays = load_arrays(file, tuple(dict.fromkeys(wanted)))
    return MeasureInput(
        layers={layer: arrays[key] for layer, key in stored.items()},
        y=arrays["y"],
        y_super=arrays.get(superclass_key) if superclass_key is not None else None,
        predictions=arrays.get("predictions"),
    )
