"""Tests of ``lcc report``: the command on finished runs, and bad inputs as one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from lcc.cli import main


def fake_run(folder: Path, top1: float = 0.5) -> Path:
    """A finished run directory written by hand (two epochs, no refresh)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: small-cnn\ndataset: digits\nno_lcc: true\n")
    history = [
        {"epoch": e + 1, "loss": 1.0 - 0.2 * e, "train_top1": 0.4 + 0.1 * e, "seconds": 1.0}
        for e in range(2)
    ]
    metrics = {"test_top1": top1, "test_top5": 0.9, "epochs": 2, "history": history}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _fails(capsys, argv: list[str]) -> str:
    code = main(["report", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lcc report: error: ")
    return err


def test_report_command(capsys, tmp_path):
    runs = [fake_run(tmp_path / "base", 0.5), fake_run(tmp_path / "other", 0.625)]
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out), "--max-points", "100"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"report: {out / 'report.html'} (and report.md, 1 picture)"
    image = imread(out / "top1.png")
    assert image.shape[0] > 200 and float(image[..., :3].var()) > 0
    assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 2
    markdown = (out / "report.md").read_text()
    assert "| base | 50.00 | 90.00 | 2 |" in markdown and "| other | 62.50 |" in markdown
    assert 'data-file="top1.png"' in (out / "report.html").read_text()


def test_out_equal_to_a_run_is_refused(capsys, tmp_path):
    run = fake_run(tmp_path / "run")
    err = _fails(capsys, [str(run), "--out", str(run)])
    assert "is the run directory" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.json"]


def test_bad_inputs(capsys, tmp_path):
    run = fake_run(tmp_path / "run")
    assert "not found" in _fails(capsys, [str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text("model: small-cnn\n")
    assert "--resume" in _fails(capsys, [str(started), "--out", str(tmp_path / "o")])
    err = _fails(capsys, [str(run), "--out", str(tmp_path / "o"), "--max-points", "1"])
    assert "max_points=1 must be at least 2" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is a file" in _fails(capsys, [str(run), "--out", str(blocker)])
    with pytest.raises(SystemExit) as caught:  # argparse: --out is required
        main(["report", str(run)])
    assert caught.value.code == 2


def test_out_in_another_runs_folder_is_refused(capsys, tmp_path):
    run, other = fake_run(tmp_path / "run"), fake_run(tmp_path / "other")
    err = _fails(capsys, [str(run), "--out", str(other)])
    assert "holds config.yaml: it is the folder of a run or a sweep" in err
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml", "metrics.json"]
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "table.csv").write_text("setting\n")
    assert "holds table.csv" in _fails(capsys, [str(run), "--out", str(sweep)])


def test_a_foreign_report_file_is_replaced_only_with_force(capsys, tmp_path):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.md").write_text("# my own notes\n")
    err = _fails(capsys, [str(run), "--out", str(out)])
    assert "report.md exists and is not an lcc report; pass --force" in err
    assert (out / "report.md").read_text() == "# my own notes\n"
    assert main(["report", str(run), "--out", str(out), "--force"]) == 0
    assert (out / "report.md").read_text().startswith("# lcc report: run")
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(out)]) == 0  # its own report: replaced
    assert "(and report.md, 1 picture)" in capsys.readouterr().out


def test_the_same_run_twice_gets_clean_distinct_names(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "runs" / "base")
    assert main(["report", "runs/base", str(tmp_path / "runs" / "base"), "--out", "rep"]) == 0
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert markdown.startswith("# lcc report: base, base (2)\n")
    assert "//" not in markdown
