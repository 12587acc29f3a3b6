"""Tests of the pictures: what each figure draws (from its artists) and the files written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from sklearn.decomposition import PCA

from lcc.analysis import plots
from lcc.analysis.runs import refresh_stage_seconds
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture

HAS_UMAP = importlib.util.find_spec("umap") is not None


def check_png(path: Path, min_size: tuple[int, int] = (200, 300)) -> np.ndarray:
    """The PNG opens, is at least ``min_size`` (rows, cols) and is not blank."""
    assert path.suffix == ".png" and path.is_file()
    image = imread(path)
    assert image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1], image.shape
    pixels = image[..., :3].reshape(-1, 3)
    assert float(pixels.var()) > 0
    assert len(np.unique(pixels, axis=0)) > 2  # more than background and one ink colour
    return image


def latents(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    z, y = gaussian_mixture(n, n_classes=4, dim=6, separation=2.0, seed=seed)[:2]
    return np.asarray(z), np.asarray(y)


# --------------------------------------------------------------------------- embeddings


def test_sample_indices_is_seeded_and_bounded():
    a = plots.sample_indices(1000, 100, seed=3)
    assert len(a) == 100 and len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, plots.sample_indices(1000, 100, seed=3))
    assert not np.array_equal(a, plots.sample_indices(1000, 100, seed=4))
    assert np.array_equal(plots.sample_indices(50, 100), np.arange(50))
    with pytest.raises(LCCInputError, match="max_points=1 must be at least 2"):
        plots.sample_indices(10, 1)


def test_pca_embedding_is_the_top_two_principal_components():
    z, _ = latents(400)
    embedding = plots.embed_2d(z, method="pca", max_points=150, seed=1)
    assert embedding.method == "pca" and embedding.coords.shape == (150, 2)
    rows = plots.sample_indices(400, 150, seed=1)
    assert np.array_equal(embedding.index, rows)
    # oracle: scikit-learn's PCA of the sampled rows; components agree up to sign
    expected = PCA(n_components=2).fit_transform(z[rows].astype(np.float64))
    for column in range(2):
        sign = np.sign(expected[:, column] @ embedding.coords[:, column])
        np.testing.assert_allclose(
            embedding.coords[:, column], sign * expected[:, column], rtol=1e-4, atol=1e-4
        )


def test_tsne_embedding_is_seeded():
    z, _ = latents(120)
    first = plots.embed_2d(z, method="tsne", seed=0)
    again = plots.embed_2d(z, method="tsne", seed=0)
    assert first.method == "tsne" and first.coords.shape == (120, 2)
    np.testing.assert_allclose(first.coords, again.coords)
    pca = plots.embed_2d(z, method="pca", seed=0)
    assert not np.allclose(np.abs(first.coords), np.abs(pca.coords))


@pytest.mark.skipif(HAS_UMAP, reason="umap-learn is installed")
def test_auto_is_pca_without_umap_and_umap_says_how_to_install():
    assert plots.resolve_method("auto") == "pca"
    with pytest.raises(LCCInputError, match="pip install umap-learn"):
        plots.embed_2d(np.zeros((5, 2)), method="umap")


def test_unknown_method():
    with pytest.raises(LCCInputError, match="method='spectral' is not one of"):
        plots.embed_2d(np.zeros((5, 2)), method="spectral")


# --------------------------------------------------------------------------- latent map


def test_latent_map_draws_the_sample_classes_and_rings_the_misclustered():
    z, y = latents(1000)
    rng = np.random.default_rng(0)
    mask = rng.random(1000) < 0.2
    figure = plots.latent_map_figure(
        {"fc1": z, "act1": z[:, ::-1] * 2}, y, {"fc1": mask}, method="pca", max_points=300, seed=5
    )
    rows = plots.sample_indices(1000, 300, seed=5)
    panels = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title().split()[0] for axis in panels] == ["fc1", "act1"]
    points, rings = panels[0].collections
    assert len(points.get_offsets()) == 300
    assert len(rings.get_offsets()) == int(mask[rows].sum())  # only sampled misclustered rows
    ringed = np.asarray(rings.get_offsets())
    drawn = np.asarray(points.get_offsets())
    np.testing.assert_allclose(ringed, drawn[mask[rows]])
    # one colour per class present in the sample
    colours = {tuple(np.round(c, 4)) for c in points.get_facecolors()}
    assert len(colours) == len(np.unique(y[rows]))
    assert f"misclustered: {mask.sum()}" in panels[0].get_title()
    assert len(panels[1].collections) == 1  # no mask for act1: nothing ringed


def test_latent_map_files(tmp_path):
    z, y = latents(500)
    paths = plots.latent_map(
        {"layer3.0": z}, y, {"layer3.0": z[:, 0] > 1}, method="pca", path=tmp_path / "map.png"
    )
    assert [p.name for p in paths] == ["map.png", "map.svg"]
    check_png(paths[0])
    assert paths[1].read_text(encoding="utf-8").lstrip().startswith("<?xml")
    # a dotted name is not taken for a file extension
    paths = plots.latent_map({"a": z}, y, method="pca", path=tmp_path / "run.layer3.0")
    assert [p.name for p in paths] == ["run.layer3.0.png", "run.layer3.0.svg"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_latent_map_bad_input():
    z, y = latents(100)
    with pytest.raises(LCCInputError, match="at least one layer"):
        plots.latent_map_figure({}, y)
    with pytest.raises(LCCInputError, match="has 50 rows but the first layer has 100"):
        plots.latent_map_figure({"a": z, "b": z[:50]}, y, method="pca")
    with pytest.raises(LCCInputError, match="boolean mask of shape"):
        plots.latent_map_figure({"a": z}, y, {"a": np.zeros(100)}, method="pca")
    with pytest.raises(LCCInputError, match="NaN"):
        plots.latent_map_figure({"a": np.full((100, 3), np.nan)}, y, method="pca")


# --------------------------------------------------------------------------- run plots

HISTORY_BASE = [  # epochs as metrics.json counts them, from 1
    {"epoch": 1, "loss": 2.0, "train_top1": 0.3, "seconds": 1.0},
    {"epoch": 2, "loss": 1.0, "train_top1": 0.6, "seconds": 1.0},
    {"epoch": 3, "loss": 0.5, "train_top1": 0.8, "seconds": 1.0},
]
HISTORY_REG = [  # another regulariser's terms: extra keys are ignored
    dict(record, **{"reg/label-variation": 0.1, "train_top1": record["train_top1"] + 0.05})
    for record in HISTORY_BASE
]
RECORDS = [
    {
        "epoch": epoch,
        "layer": layer,
        "misclustered_fraction": 0.1 * epoch + offset,
        "accuracy": 0.7,
        "accuracy_cc": 0.8,
        "accuracy_mc": 0.4 + offset,
        "seconds": {"collect": 2.0, "knn": 1.0 + offset, "cluster": 0.5, "total": 9.0},
        "extra/term": [1, 2],
    }
    for epoch in (1, 2)
    for layer, offset in (("fc1", 0.0), ("act1", 0.05))
]


def test_top1_figure_overlays_the_runs(tmp_path):
    figure = plots.top1_figure(
        {"baseline": HISTORY_BASE, "lcc": HISTORY_REG}, test_top1={"baseline": 0.7, "lcc": 0.75}
    )
    accuracy, loss = figure.axes
    lines = {line.get_label(): line for line in accuracy.get_lines()}
    np.testing.assert_allclose(lines["baseline (train)"].get_ydata(), [30, 60, 80])
    np.testing.assert_allclose(lines["lcc (train)"].get_ydata(), [35, 65, 85])
    np.testing.assert_allclose(lines["lcc (train)"].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(lines["lcc (test, final)"].get_ydata(), [75])
    assert len(loss.get_lines()) == 2
    paths = plots.plot_top1({"baseline": HISTORY_BASE}, tmp_path / "top1")
    check_png(paths[0])


def test_refresh_quality_figure_per_layer(tmp_path):
    figure = plots.refresh_quality_figure(RECORDS)
    share, accuracy = figure.axes
    lines = {line.get_label(): line for line in share.get_lines()}
    np.testing.assert_allclose(lines["act1"].get_ydata(), [15, 25])
    np.testing.assert_allclose(lines["fc1"].get_xdata(), [1, 2])  # the journal's epochs
    labels = {line.get_label(): line for line in accuracy.get_lines()}
    assert {"fc1 CC", "fc1 MC", "fc1 all", "act1 CC", "act1 MC", "act1 all"} <= set(labels)
    np.testing.assert_allclose(labels["act1 MC"].get_ydata(), [45, 45])
    check_png(plots.plot_refresh_quality(RECORDS, tmp_path / "q")[0])
    with pytest.raises(LCCInputError, match="needs refresh records"):
        plots.refresh_quality_figure([{"epoch": 1}])


def test_refresh_seconds_bars_stack_the_stages(tmp_path):
    figure = plots.refresh_seconds_figure(RECORDS)
    (axis,) = figure.axes
    # oracle: per epoch, collect once (shared), other stages summed over layers, no total
    expected = {"collect": [2.0, 2.0], "knn": [2.05, 2.05], "cluster": [1.0, 1.0]}
    heights: dict[str, list[float]] = {}
    for container in axis.containers:
        heights[container.get_label()] = [bar.get_height() for bar in container]
    assert set(heights) == set(expected)
    for stage, values in expected.items():
        np.testing.assert_allclose(heights[stage], values)
    tops = [bar.get_y() + bar.get_height() for bar in axis.containers[-1]]
    np.testing.assert_allclose(tops, [5.05, 5.05])
    assert refresh_stage_seconds(RECORDS)[1] == pytest.approx(
        {"collect": 2.0, "knn": 2.05, "cluster": 1.0}
    )
    check_png(plots.plot_refresh_seconds(RECORDS, tmp_path / "s")[0])


def test_measures_figure_one_panel_per_measure(tmp_path):
    measures = [
        {"measure": "c3", "value": 0.5, "layer": "conv1"},
        {"measure": "c3", "value": 0.3, "layer": "fc1"},
        {"measure": "c2", "value": 0.1, "layer": "fc1"},
        {"measure": "c2", "value": None, "layer": "conv1"},  # skipped
    ]
    figure = plots.measures_figure(measures)
    panels = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title() for axis in panels] == ["c3", "c2"]
    (c3,) = panels[0].get_lines()
    np.testing.assert_allclose(c3.get_ydata(), [0.5, 0.3])
    (c2,) = panels[1].get_lines()
    np.testing.assert_allclose(c2.get_xdata(), [1])  # fc1 is the second layer
    by_epoch = [dict(m, epoch=e) for e in (0, 1) for m in measures[:2]]
    assert len(plots.measures_figure(by_epoch).axes[0].get_lines()) == 2
    check_png(plots.plot_measures(measures, tmp_path / "m")[0], min_size=(150, 200))
    with pytest.raises(LCCInputError, match="numeric value"):
        plots.measures_figure([{"measure": "c1", "value": "high"}])


def test_unknown_format(tmp_path):
    with pytest.raises(LCCInputError, match="format='gif'"):
        plots.plot_top1({"a": HISTORY_BASE}, tmp_path / "x", formats=("gif",))


def test_top1_legend_never_covers_a_test_star():
    """Random histories (seeded): the legend's box, widened by the star's radius, holds no
    star centre (the legend sat inside the axes and covered stars before)."""
    from lcc.analysis.plots import top1_figure

    rng = np.random.default_rng(0)
    for _ in range(40):
        runs, epochs = int(rng.integers(1, 4)), int(rng.integers(1, 8))
        histories, tests = {}, {}
        for r in range(runs):
            top1 = np.clip(np.cumsum(rng.uniform(-0.05, 0.3, epochs)), 0, 1)
            name = f"/tmp/runs/long-name-{r}"
            histories[name] = [
                {"epoch": e, "train_top1": float(v), "loss": float(rng.uniform(0, 2))}
                for e, v in enumerate(top1, start=1)
            ]
            tests[name] = float(np.clip(top1[-1] + rng.uniform(-0.1, 0.1), 0, 1))
        figure = top1_figure(histories, test_top1=tests)
        figure.canvas.draw()
        axis = figure.axes[0]
        box = axis.get_legend().get_window_extent(figure.canvas.get_renderer()).padded(12)
        for r, name in enumerate(histories):
            x, y = axis.transData.transform((epochs + 0.15 + 0.1 * r, 100 * tests[name]))
            assert not box.contains(x, y), (runs, epochs, r)
