"""c1-c4 in the authors' variant against numpy/sklearn loops of their code's formulas."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import silhouette_samples
from sklearn.metrics.pairwise import cosine_distances

from lcc.analysis import intraclass, intraclass_authors


@pytest.fixture
def data():
    rng = np.random.default_rng(5)
    y = np.arange(90) % 6
    y_super = y // 3
    a = rng.normal(size=(90, 12)) + 0.8 * np.eye(6)[y] @ rng.normal(size=(6, 12))
    b = rng.normal(size=(90, 5)) + np.eye(6)[y] @ rng.normal(size=(6, 5))
    a[:, 3] = -np.abs(a[:, 3]) - 0.1  # a dead neuron
    b[:, :] -= 0.5
    return {"a": a, "b": b}, y, y_super


def _loop_c1(layers, y, y_super, k):
    values = []
    for sub in np.unique(y):
        inside = y == sub
        rest = (y_super == y_super[inside][0]) & ~inside
        row = []
        for z in layers:
            s = (z[inside].mean(0) - z[rest].mean(0)) / (z[inside].std(0) + z[rest].std(0) + 1e-7)
            row.append(s * (1 - np.all(z < 0, axis=0)))
        row = np.concatenate(row)
        values.append(np.sort(row)[-k:].mean())
    return float(np.median(values))


def _loop_c3(layers, y):
    n = sum(z.shape[1] for z in layers)
    k = max(round(n / np.unique(y).size), 1)
    values = []
    for c in np.unique(y):
        row = np.concatenate(
            [z[y == c].std(0) / (z.std(0) + 1e-7) * (1 - np.all(z < 0, axis=0)) for z in layers]
        )
        values.append(np.sort(row)[-k:].mean())
    return float(np.mean(values))


def _loop_c4(layers, y):
    per_layer = []
    for z in layers:
        z = z[:, ~np.all(z < 0, axis=0)]
        z = (z - z.mean(0)) / (z.std(0) + 1e-7)
        p = max(min(round(100 - 100 * 10 / z.shape[1]), 75), 0)
        act = np.maximum(z - np.percentile(z, p, axis=0, keepdims=True), 0)
        spread = np.std(cosine_distances(act))
        per_layer.append([np.std(cosine_distances(act[y == c])) / (spread + 1e-7)
                          for c in np.unique(y)])  # fmt: skip
    return float(np.mean(np.max(np.array(per_layer), axis=0)))


def _loop_c2(layers, y, y_super):
    per_layer = []
    for z in layers:
        act = np.maximum(z, 0)
        values = []
        for s in np.unique(y_super):
            rows = y_super == s
            score = silhouette_samples(act[rows], y[rows], metric="cosine")
            values += [score[y[rows] == sub].mean() for sub in np.unique(y[rows])]
        per_layer.append(values)
    return float(np.median(np.max(np.array(per_layer), axis=0)))


def test_each_measure_matches_a_loop_of_the_code(data):
    layers, y, y_super = data
    arrays = list(layers.values())
    assert intraclass_authors.c1(layers, y, y_super) == pytest.approx(
        _loop_c1(arrays, y, y_super, 1)
    )
    assert intraclass_authors.c1(layers, y, y_super, top_k=4) == pytest.approx(
        _loop_c1(arrays, y, y_super, 4)
    )
    assert intraclass_authors.c2(layers, y, y_super) == pytest.approx(_loop_c2(arrays, y, y_super))
    assert intraclass_authors.c3(layers, y_super) == pytest.approx(_loop_c3(arrays, y_super))
    assert intraclass_authors.c4(layers, y_super) == pytest.approx(_loop_c4(arrays, y_super))


def test_the_variant_departs_from_the_text_where_the_code_does(data):
    layers, _, y_super = data
    # c4 on a narrow layer (5 neurons: the 0th percentile, not the 75th) and the full matrix
    narrow = layers["b"]
    text = intraclass.c4(narrow, y_super, top_k=1)
    assert intraclass_authors.c4(narrow, y_super) != pytest.approx(text, rel=1e-3)
    # the dead neuron scores 0 in c3 (the text scores its true ratio)
    dead = intraclass_authors.variance_ratio(layers["a"], y_super).values[:, 3]
    assert (dead == 0).all()
    assert (intraclass.intraclass_variance_ratio(layers["a"], y_super).values[:, 3] > 0).all()


def test_every_neuron_dead_is_one_line():
    z = -np.ones((10, 3)) - np.arange(30.0).reshape(10, 3)
    with pytest.raises(intraclass.LCCInputError, match="every neuron of every layer is dead"):
        intraclass_authors.c4(z, np.arange(10) % 2)


def test_measure_registry_and_cli_take_the_variant(data, capsys, tmp_path):
    import json

    from lcc.analysis.measures import MeasureInput, MeasureOptions, run_measures
    from lcc.cli import main
    from lcc.io import save_npz_atomic

    layers, y, y_super = data
    lines = run_measures(
        "c1,c2,c3,c4", MeasureInput(layers, y, y_super), MeasureOptions(variant="authors")
    )
    all_lines = {line["measure"]: line for line in lines if line["layer"] == "all"}
    assert all_lines["c1"]["value"] == pytest.approx(intraclass_authors.c1(layers, y, y_super))
    assert all_lines["c2"]["value"] == pytest.approx(intraclass_authors.c2(layers, y, y_super))
    assert all_lines["c3"]["value"] == pytest.approx(intraclass_authors.c3(layers, y_super))
    assert all_lines["c4"]["value"] == pytest.approx(intraclass_authors.c4(layers, y_super))
    assert all_lines["c3"]["top_k"] == round(17 / 2) and all_lines["c1"]["top_k"] == 1
    assert {line["variant"] for line in lines} == {"authors"}
    path = tmp_path / "l.npz"
    save_npz_atomic(path, z_a=layers["a"], z_b=layers["b"], y=y, y_super=y_super)
    values = {}
    for variant in ("paper", "authors"):
        assert main(["measure", str(path), "--measure", "c4", "--variant", variant]) == 0
        out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        values[variant] = next(line["value"] for line in out if line["layer"] == "all")
    assert values["authors"] == pytest.approx(all_lines["c4"]["value"])
    assert values["paper"] != pytest.approx(values["authors"], rel=1e-3)
