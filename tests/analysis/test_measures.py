"""The measure registry: lines, per-layer and "all" values, option plumbing, label semantics.

The c-measures' formulas are checked against loops in ``test_intraclass.py``; here each line
is compared with those functions, and label variation with a dense loop over the paper's
def. 6 (k-NN union graph of cosine similarities, weight of edges between distinct classes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lcc.analysis import intraclass
from lcc.analysis.measures import (
    MEASURES,
    MeasureInput,
    MeasureOptions,
    parse_measures,
    run_measures,
)
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture


def hierarchical(n: int = 360, seed: int = 0):
    """Two layers (one a conv map), 3 classes of 3 overlapping subclasses."""
    z, classes, subclasses = gaussian_mixture(
        n, 12, 3, 3, separation=2.5, noise=1.0, intrinsic_dim=8, seed=seed
    )
    rng = np.random.default_rng(seed)
    conv = rng.normal(size=(n, 5, 3, 3)) + z[:, :5, None, None]
    return {"fc": z, "conv": conv}, subclasses, classes


def by_layer(lines, measure):
    return {line["layer"]: line for line in lines if line["measure"] == measure}


def test_every_line_is_json_with_the_required_keys():
    layers, sub, sup = hierarchical()
    data = MeasureInput(layers, sub, y_super=sup, predictions=sup)
    lines = run_measures(list(MEASURES), data, MeasureOptions(top_k=3))
    for line in lines:
        assert json.loads(json.dumps(line)) == line
        assert {"measure", "value", "higher_is_better", "layer", "n"} <= set(line)
        assert line["n"] == 360
        assert line["higher_is_better"] == (line["measure"] in ("c1", "c2", "c3", "c4"))
    counts = {name: len(by_layer(lines, name)) for name in MEASURES}
    assert counts == {"c1": 3, "c2": 3, "c3": 3, "c4": 3, "clusters": 2, "label-variation": 2}


def test_c_lines_equal_the_functions_per_layer_and_over_all_layers():
    layers, sub, sup = hierarchical(seed=1)
    data = MeasureInput(layers, sub, y_super=sup)
    options = MeasureOptions(top_k=4, top_layers=1)
    lines = run_measures("c1,c2,c3,c4", data, options)
    pooled = [layers["fc"], layers["conv"].max(axis=(2, 3))]
    expected = {
        "c1": (lambda z: intraclass.c1(z, sub, sup, top_k=4)),
        "c2": (lambda z: intraclass.c2(z, sub, sup, top_k=1)),
        "c3": (lambda z: intraclass.c3(z, sup, top_k=4)),
        "c4": (lambda z: intraclass.c4(z, sup, top_k=1)),
    }
    for name, function in expected.items():
        got = by_layer(lines, name)
        assert got["fc"]["value"] == pytest.approx(function(pooled[0]))
        assert got["conv"]["value"] == pytest.approx(function(pooled[1]))
        assert got["all"]["value"] == pytest.approx(function(pooled))
        assert got["all"]["layers"] == ["fc", "conv"]
    assert by_layer(lines, "c3")["conv"]["top_k"] == 4
    assert by_layer(lines, "c1")["fc"]["subclasses"] == 9
    assert by_layer(lines, "c3")["fc"]["classes"] == 3  # the superclasses: the model's classes
    assert by_layer(lines, "c3")["fc"]["labels"] == "y_super"


def test_top_k_and_top_layers_options_reach_the_measures():
    layers, sub, sup = hierarchical(seed=2)
    data = MeasureInput(layers, sub, y_super=sup)
    few = run_measures("c1,c2,c3,c4", data, MeasureOptions(top_k=1, top_layers=1))
    with pytest.warns(UserWarning, match=r"c1 of layer conv: top_k=8 .* its 5 neurons") as seen:
        many = run_measures("c1,c2,c3,c4", data, MeasureOptions(top_k=8, top_layers=2))
    assert len(seen) == 1  # fc has more than 8 neurons; c3 does not cancel out: no warning
    for name in ("c1", "c3"):
        assert by_layer(few, name)["fc"]["value"] > by_layer(many, name)["fc"]["value"]
        assert by_layer(many, name)["fc"]["top_k"] == 8
        assert by_layer(many, name)["conv"]["top_k"] == 5  # all 5 channels
    pooled = [layers["fc"], layers["conv"].max(axis=(2, 3))]
    for name in ("c2", "c4"):
        one, two = by_layer(few, name)["all"], by_layer(many, name)["all"]
        assert (one["top_layers"], two["top_layers"]) == (1, 2)
        assert one["value"] != pytest.approx(two["value"])
    assert by_layer(many, "c4")["all"]["value"] == pytest.approx(
        intraclass.c4(pooled, sup, top_k=2)
    )
    relu_off = run_measures("c2", data, MeasureOptions(relu=False))
    assert by_layer(relu_off, "c2")["fc"]["value"] == pytest.approx(
        intraclass.c2(layers["fc"], sub, sup, relu=False)
    )
    half = run_measures("c4", data, MeasureOptions(active=0.5))
    assert by_layer(half, "c4")["fc"]["value"] == pytest.approx(
        intraclass.c4(layers["fc"], sup, active=0.5)
    )


def test_without_superclasses_the_flat_measures_use_y():
    layers, sub, _ = hierarchical(seed=3)
    data = MeasureInput({"fc": layers["fc"]}, sub)
    lines = run_measures("auto", data, MeasureOptions(top_k=3))
    assert [line["measure"] for line in lines] == ["c3", "c4"]
    assert lines[0]["value"] == pytest.approx(intraclass.c3(layers["fc"], sub, top_k=3))
    assert lines[0]["labels"] == "y" and lines[0]["classes"] == 9


def dense_label_variation(z, y, k):
    """Normalised label variation of the cosine k-NN union graph, by loops (def. 6)."""
    n = z.shape[0]
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    similarity = unit @ unit.T
    chosen = np.zeros((n, n), dtype=bool)
    for i in range(n):
        others = [j for j in np.argsort(-similarity[i], kind="stable") if j != i][:k]
        chosen[i, others] = True
    keep = chosen | chosen.T
    cross = sum(similarity[i, j] for i in range(n) for j in range(n) if keep[i, j] and y[i] != y[j])
    total = sum(similarity[i, j] for i in range(n) for j in range(n) if keep[i, j])
    return cross, cross / total


def test_label_variation_line_against_a_dense_loop():
    layers, _, sup = hierarchical(n=90, seed=4)
    z = np.abs(layers["fc"]).astype(np.float64)  # non-negative: cosine similarity
    lines = run_measures(
        "label-variation", MeasureInput({"fc": z}, sup), MeasureOptions(k=6, similarity="cosine")
    )
    (line,) = lines
    cross, normalized = dense_label_variation(z, sup, 6)
    assert {"n", "k", "label_variation", "label_variation_normalized"} <= set(line)
    assert line["k"] == 6 and line["n"] == 90 and line["similarity"] == "cosine"
    assert line["label_variation_normalized"] == pytest.approx(normalized, rel=1e-6)
    assert line["label_variation"] == pytest.approx(cross, rel=1e-6)  # ordered pairs
    assert line["value"] == line["label_variation_normalized"]
    other = run_measures(
        "label-variation",
        MeasureInput({"fc": z}, sup),
        MeasureOptions(k=6, similarity="cosine", normalize=True),
    )
    assert other[0]["normalize"] is True
    assert other[0]["label_variation"] != pytest.approx(line["label_variation"])


def test_clusters_line_uses_k_method_seed_and_predictions():
    layers, _, sup = hierarchical(seed=5)
    rng = np.random.default_rng(5)
    predictions = np.where(rng.random(360) < 0.7, sup, (sup + 1) % 3)
    data = MeasureInput({"fc": layers["fc"]}, sup, predictions=predictions)
    options = MeasureOptions(k=8, method="louvain", seed=2)
    (line,) = run_measures("clusters", data, options)
    expected = intraclass.cluster_measure(
        layers["fc"], sup, predictions, k=8, method="louvain", seed=2
    )
    assert line == {
        "measure": "clusters",
        "value": expected["misclustered_fraction"],
        "higher_is_better": False,
        "layer": "fc",
        **expected,
        "labels": "y",
    }
    (default,) = run_measures("clusters", data)
    assert default["k"] == 5 and default["method"] == "leiden"


def test_parse_measures():
    assert parse_measures("auto", superclasses=True) == ["c1", "c2", "c3", "c4"]
    assert parse_measures(["c4", "c1", "c4"]) == ["c4", "c1"]
    with pytest.raises(LCCInputError, match="unknown measure 'c5'"):
        parse_measures("c1,c5")
    with pytest.raises(LCCInputError, match="no measure given"):
        parse_measures(" , ")


@pytest.mark.parametrize(
    "names, options, change, message",
    [
        ("c1", MeasureOptions(), {"y_super": None}, "c1 needs superclass labels"),
        ("c3", MeasureOptions(top_k=0), {}, "top_k must be a positive integer"),
        ("c2", MeasureOptions(top_layers=0), {}, "top_layers must be a positive integer"),
        ("c4", MeasureOptions(active=0.0), {}, "strictly between 0 and 1"),
        ("clusters", MeasureOptions(k=500), {}, "k=500 must be smaller"),
        ("clusters", MeasureOptions(method="kmeans"), {}, "method='kmeans'"),
        ("label-variation", MeasureOptions(similarity="l1"), {}, "similarity='l1'"),
        ("label-variation", MeasureOptions(bandwidth=-1.0), {}, "bandwidth=-1.0"),
        ("c3", MeasureOptions(), {"y_super": "one"}, "single class"),
        ("c3", MeasureOptions(), {"layers": "short"}, "same samples"),
        ("c3", MeasureOptions(), {"layers": "nan"}, "NaN"),
        ("c2", MeasureOptions(), {"y_super": "flat"}, "no superclass holds two"),
        ("c4", MeasureOptions(), {"y_super": "singleton"}, "class 5 has a single sample"),
    ],
)
def test_bad_input_raises_one_clear_error(names, options, change, message):
    layers, sub, sup = hierarchical(n=120, seed=6)
    data = {"layers": layers, "y": sub, "y_super": sup}
    if change.get("y_super") == "one":
        data["y_super"] = np.zeros(120, dtype=np.int64)
    elif change.get("y_super") == "flat":
        data["y_super"] = sub
    elif change.get("y_super") == "singleton":
        data["y_super"] = sup.copy()
        data["y_super"][0] = 5
    elif "y_super" in change:
        data["y_super"] = None
    if change.get("layers") == "short":
        data["layers"] = {**layers, "conv": layers["conv"][:100]}
    elif change.get("layers") == "nan":
        bad = layers["fc"].copy()
        bad[3, 1] = np.nan
        data["layers"] = {"fc": bad}
    with pytest.raises(LCCInputError, match=message):
        run_measures(names, MeasureInput(**data), options)
