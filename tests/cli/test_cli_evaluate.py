"""``lcc evaluate``: JSON lines, evaluation.json, tables; bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lcc.cli import main

pytest.importorskip("foolbox")
sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))
from test_evaluate import make_run  # the run builder of the analysis tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-runs")
    return {"a": make_run(root / "a", steps=30), "b": make_run(root / "b", seed=1, steps=5)}


def test_json_lines_files_and_table(runs, tmp_path, capsys) -> None:
    out = tmp_path / "table"
    code = main(
        ["evaluate", str(runs["a"]), str(runs["b"]), "--noise", "0.5", "--fgsm", "0.05",
         "--pgd", "0.05:3:0.02", "--corruptions", "fog", "--severities", "2",
         "--baseline", str(runs["a"]), "--subset", "60", "--cache-dir", str(tmp_path / "c"),
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["run"]).name for r in lines] == ["a", "b"]
    for line, run in zip(lines, ("a", "b"), strict=True):
        assert json.loads((runs[run] / "evaluation.json").read_text()) == line
        assert line["n_test"] == 60 and set(line["pgd"]) == {"0.05:3:0.02"}
        assert set(line["corruption"]["fog"]) == {"2"} and line["mce"] is not None
    table = (out / "evaluation.md").read_text().splitlines()
    assert table[0].startswith("| run | top1 (%) | top5 (%) | ece (%) | nll | noise 0.5 (%)")
    assert [row.split(" | ")[0] for row in table[2:4]] == ["| a", "| b"]
    assert (out / "evaluation.csv").read_text().splitlines()[0].startswith("run,top1,top5")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fgsm", "-0.1"], "eps must be >= 0"),
        (["--pgd", "0.1:10"], "EPS:STEPS:ALPHA"),
        (["--noise", "x"], "cannot read 'x'"),
        (["--corruptions", "fogg"], "unknown corruption 'fogg' (did you mean 'fog'?); valid:"),
        (["--probe", "fc9"], "model has no layer 'fc9' (closest: fc"),
        (["--severities", "6"], "each must be 1..5"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(runs, capsys, extra, message) -> None:
    assert main(["evaluate", str(runs["a"]), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("lcc evaluate: error:")


def test_bad_runs_are_one_line_and_exit_2(runs, tmp_path, capsys) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((runs["a"] / "config.yaml").read_text())
    other = make_run(tmp_path / "fashion", dataset="fashion-mnist", subset=200, test_subset=50,
                     steps=1)  # fmt: skip
    cases = [
        ([str(bare)], "has no checkpoint"),
        ([str(runs["a"]), "--corruptions", "fog", "--baseline", str(other)],
         "was trained on fashion-mnist, but"),
        ([str(runs["a"]), "--out", str(runs["a"])], "would destroy the input"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(["evaluate", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_a_trained_run_reproduces_its_metrics_json(tmp_path) -> None:
    """End to end through the real commands: clean top-1/top-5 equal metrics.json's."""
    run = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "lcc", "train", "small-cnn", "digits", "--out", str(run),
         "--epochs", "1", "--no-lcc", "--test-subset", "200"],
        check=True, capture_output=True,
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "lcc", "evaluate", str(run), "--fgsm", "0"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(done.stdout)
    metrics = json.loads((run / "metrics.json").read_text())
    assert result["top1"] == metrics["test_top1"] and result["top5"] == metrics["test_top5"]
    assert result["fgsm"]["0"] == metrics["test_top1"] and result["n_test"] == 200
    assert result["nll"] == pytest.approx(metrics["test_loss"], rel=1e-5)
