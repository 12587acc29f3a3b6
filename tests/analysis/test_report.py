"""Tests of ``write_report`` on real run directories (tiny ``lcc train`` runs on digits)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_plots import check_png

from lcc.analysis.report import write_report
from lcc.analysis.runs import load_latent_snapshot, load_run, load_runs, run_summary
from lcc.cli import main
from lcc.errors import LCCInputError

TINY = ["--subset", "300", "--test-subset", "100", "--epochs", "3", "--batch-size", "64"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A baseline and an LCC run (two layers, latents saved, refreshes at epochs 2 and 3)."""
    root = tmp_path_factory.mktemp("runs")
    base, lcc = root / "baseline", root / "lcc"
    assert main(["train", "small-cnn", "digits", "--out", str(base), "--no-lcc", *TINY]) == 0
    argv = ["train", "small-cnn", "digits", "--out", str(lcc), "--layers", "fc1", "act1"]
    assert main([*argv, "--warmup", "1", "--save-latents", *TINY]) == 0
    return base, lcc


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    return write_report(list(runs), out, max_points=200), out


def fake_run(folder: Path, **metrics) -> Path:
    """A finished run directory written by hand (no refresh)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: small-cnn\ndataset: digits\n")
    history = [{"epoch": 1, "loss": 1.0, "train_top1": 0.5, "seconds": 1.0}]
    values = {"test_top1": 0.5, "test_top5": 0.9, "epochs": 1, "history": history, **metrics}
    (folder / "metrics.json").write_text(json.dumps(values))
    return folder


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if current is None:
                current = {"header": cells, "rows": []}
            elif not set("".join(cells)) <= {"-"}:
                current["rows"].append(dict(zip(current["header"], cells, strict=True)))
        elif current is not None:
            tables.append(current["rows"])
            current = None
    if current is not None:
        tables.append(current["rows"])
    return tables


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_report_writes_pictures_markdown_and_html(report):
    result, out = report
    names = sorted(p.name for p in result.images)
    assert names == sorted(
        f"{stem}.{fmt}"
        for stem in (
            "top1",
            "lcc-refresh-quality",
            "lcc-refresh-seconds",
            "lcc-layers",
            "lcc-latents",
        )
        for fmt in ("png", "svg")
    )
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == sorted(n for n in names if n.endswith(".png"))
    for png in pngs:
        check_png(png)
    # the markdown links every picture and only existing ones
    markdown = result.markdown.read_text(encoding="utf-8")
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(linked) == [p.name for p in pngs]
    # the HTML embeds every picture it lists, byte for byte, and links nothing outside
    page = result.html.read_text(encoding="utf-8")
    embedded = re.findall(r'<img src="data:image/png;base64,([^"]+)"[^>]*data-file="([^"]+)"', page)
    assert sorted(name for _, name in embedded) == [p.name for p in pngs]
    for data, name in embedded:
        assert base64.b64decode(data) == (out / name).read_bytes()
    assert 'src="http' not in page and "<script" not in page
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_markdown_tables_equal_the_metrics(runs, report):
    result, _ = report
    metrics = {p.name: json.loads((p / "metrics.json").read_text()) for p in runs}
    summary, layers = markdown_tables(result.markdown.read_text(encoding="utf-8"))
    assert [row["run"] for row in summary] == ["baseline", "lcc"]
    for row in summary:
        m = metrics[row["run"]]
        assert row["test top-1 (%)"] == f"{100 * m['test_top1']:.2f}"
        assert row["test top-5 (%)"] == f"{100 * m['test_top5']:.2f}"
        assert row["epochs"] == str(m["epochs"]) == "3"
        assert row["mean epoch (s)"] == f"{np.mean(m['epoch_seconds']):.2f}"
        assert row["refreshes"] == str(m["refreshes"])
    assert summary[0]["refresh total (s)"] == "-" and summary[0]["misclustered, last (%)"] == "-"
    last = metrics["lcc"]["last_refresh"]
    mean_mc = np.mean([stats["misclustered_fraction"] for stats in last.values()])
    assert summary[1]["misclustered, last (%)"] == f"{100 * mean_mc:.2f}"
    assert summary[1]["refresh total (s)"] == f"{metrics['lcc']['total_refresh_seconds']:.2f}"
    assert [row["layer"] for row in layers] == ["fc1", "act1"]
    for row in layers:
        stats = last[row["layer"]]
        assert row["epoch"] == str(metrics["lcc"]["last_refresh_epoch"]) == "3"  # from 1
        assert row["clusters"] == str(stats["n_clusters"])
        assert row["misclustered (%)"] == f"{100 * stats['misclustered_fraction']:.2f}"
        assert row["CC accuracy (%)"] == f"{100 * stats['accuracy_cc']:.2f}"
        assert row["MC accuracy (%)"] == f"{100 * stats['accuracy_mc']:.2f}"


@pytest.mark.slow
def test_latent_snapshot_marks_the_misclustered_of_the_refresh(runs):
    run = load_run(runs[1])
    snapshot = load_latent_snapshot(run)
    assert snapshot is not None and snapshot.epoch == 3  # the refreshes of epochs 2 and 3
    assert list(snapshot.z) == ["fc1", "act1"] and snapshot.z["fc1"].shape == (300, 128)
    journal = {(r["epoch"], r["layer"]): r for r in run.refreshes}
    for layer in ("fc1", "act1"):
        clusters = np.load(run.path / "refresh" / f"epoch_3_{layer}.npz")["clusters"]
        # oracle: majority class per cluster by explicit loops
        expected = np.zeros(len(snapshot.y), dtype=bool)
        for cluster in np.unique(clusters):
            members = np.flatnonzero(clusters == cluster)
            counts = {c: int((snapshot.y[members] == c).sum()) for c in np.unique(snapshot.y)}
            majority = max(sorted(counts), key=lambda c: counts[c])
            expected[members] = snapshot.y[members] != majority
        assert np.array_equal(snapshot.misclustered[layer], expected)
        assert int(expected.sum()) == journal[(3, layer)]["misclustered"]
    assert load_latent_snapshot(run, epoch=2).epoch == 2
    assert load_latent_snapshot(load_run(runs[0])) is None  # the baseline saved nothing


@pytest.mark.slow
def test_a_second_report_replaces_the_files(runs, tmp_path):
    out = tmp_path / "report"
    first = write_report([runs[1]], out, max_points=100)
    before = first.markdown.read_text()
    second = write_report(list(runs), out, max_points=100)
    assert "| baseline |" in second.markdown.read_text() and "| baseline |" not in before
    assert not list(out.glob(".*.tmp"))


# --------------------------------------------------------------------------- hand-made runs


def test_out_must_not_be_a_run_directory(tmp_path):
    run = fake_run(tmp_path / "run")
    with pytest.raises(LCCInputError, match="is the run directory"):
        write_report([run], run)
    with pytest.raises(LCCInputError, match="is the run directory"):
        write_report([run], tmp_path / "." / "run")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.json"]


def test_unfinished_and_missing_runs(tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text(yaml.safe_dump({"model": "small-cnn"}))
    with pytest.raises(LCCInputError, match=r"has not finished.*--resume"):
        write_report([started], tmp_path / "out")
    with pytest.raises(LCCInputError, match="not found"):
        write_report([tmp_path / "nope"], tmp_path / "out")
    with pytest.raises(LCCInputError, match="at least one run"):
        write_report([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_text_is_escaped_in_html_and_markdown(tmp_path):
    run = fake_run(tmp_path / "a<b>&c|d")
    result = write_report([run], tmp_path / "out")
    page = result.html.read_text(encoding="utf-8")
    assert "a&lt;b&gt;&amp;c|d" in page and "<b>" not in page
    assert "a<b>&c\\|d" in result.markdown.read_text(encoding="utf-8")
    (row,) = markdown_tables(result.markdown.read_text(encoding="utf-8"))[0]
    assert (row["run"], row["test top-1 (%)"]) == ("a<b>&c|d", "50.00")


def test_same_folder_names_are_told_apart(tmp_path):
    one, two = fake_run(tmp_path / "x" / "run"), fake_run(tmp_path / "y" / "run", test_top1=0.7)
    assert [r.name for r in load_runs([one, two])] == ["x/run", "y/run"]
    result = write_report([one, two], tmp_path / "out")
    rows = markdown_tables(result.markdown.read_text(encoding="utf-8"))[0]
    expected = [("x/run", "50.00"), ("y/run", "70.00")]
    assert [(r["run"], r["test top-1 (%)"]) for r in rows] == expected


def test_future_keys_are_carried(tmp_path):
    history = [
        {"epoch": 1, "loss": 1.0, "train_top1": 0.5, "reg/label-variation": 0.2, "seconds": 2.0},
        {"epoch": 2, "loss": 0.8, "train_top1": 0.6, "reg/label-variation": 0.1, "seconds": 4.0},
    ]
    run = load_run(fake_run(tmp_path / "run", history=history, epochs=2))
    summary = run_summary(run)
    assert summary["mean_epoch_seconds"] == 3.0 and summary["refreshes"] == 0
    assert run.history[1]["reg/label-variation"] == 0.1


def test_measures_file_of_a_run_is_drawn(tmp_path):
    from lcc.analysis.report import _read_measures

    run = fake_run(tmp_path / "run")
    lines = [
        {"measure": "c3", "value": 0.7, "layer": "fc1"},
        {"measure": "c3", "value": 0.5, "layer": "act1"},
        {"measure": "c3", "value": 0.6, "layer": "all"},
    ]
    (run / "measures.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    assert [m["layer"] for m in _read_measures(load_run(run))] == ["fc1", "act1"]
    result = write_report([run], tmp_path / "out")
    check_png(tmp_path / "out" / "run-layers.png", min_size=(150, 200))
    assert "(run-layers.png)" in result.markdown.read_text(encoding="utf-8")
    good = json.dumps(lines[0])
    (run / "measures.jsonl").write_text(f"{good}\n{{not json")  # torn last line: dropped
    assert [m["layer"] for m in _read_measures(load_run(run))] == ["fc1"]
    (run / "measures.jsonl").write_text(f"{{not json\n{good}\n")  # damaged before the end
    with pytest.raises(LCCInputError, match="line 1 is not a JSON object"):
        write_report([run], tmp_path / "out")


@pytest.mark.slow
def test_class_map_draws_one_class_coloured_by_cluster(runs, tmp_path):
    """--class: per layer, the class's latents coloured by cluster (paper Fig. 2, right)."""
    report = write_report([runs[1]], tmp_path / "r", max_points=200, class_name="3")
    names = {path.name for path in report.images}
    assert {"lcc-class-3-fc1.png", "lcc-class-3-act1.png"} <= names
    for name in ("lcc-class-3-fc1.png", "lcc-class-3-act1.png"):
        check_png(tmp_path / "r" / name)
    snapshot = load_latent_snapshot(load_run(runs[1]))
    rows = snapshot.y == 3
    text = (tmp_path / "r" / "report.md").read_text()
    for layer in ("fc1", "act1"):
        count = len(np.unique(snapshot.clusters[layer][rows]))
        assert f"Class 3, layer {layer}: its latents coloured by cluster ({count} clusters)" in text
    with pytest.raises(LCCInputError, match="saved no latent of label 42"):
        write_report([runs[1]], tmp_path / "r2", class_name="42")
    # the per-layer table gives the last refresh's cross-entropy of CC and MC samples
    last = {r["layer"]: r for r in load_run(runs[1]).refreshes if r["epoch"] == snapshot.epoch}
    rows = [row for table in markdown_tables(text) for row in table if "CC CE" in row]
    for row in rows:
        stats = last[row["layer"]]
        assert row["CC CE"] == f"{stats['cross_entropy_cc']:.3f}"
        assert row["MC CE"] == f"{stats['cross_entropy_mc']:.3f}"
    assert {row["layer"] for row in rows} == {"fc1", "act1"}
