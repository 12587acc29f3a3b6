"""lcc study: parsing and bad input, exclusions, resumable runs, failures, outputs."""

from __future__ import annotations

import csv
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lcc.cli import main
from lcc.errors import LCCInputError
from lcc.train.study import parse_study, plan_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = {"model": "small-cnn", "dataset": "digits:super", "no_lcc": True, "subset": 120,
        "test_subset": 60, "epochs": 1, "batch_size": 40}  # fmt: skip
MEASURES = {"samples": 100, "top_k": 3, "top_layers": 2, "sharpness_samples": 60,
            "sharpness": {"depth": 3, "samples": 2, "steps": 2}}  # fmt: skip


def test_the_papers_exclusions_are_expressible():
    grid = {"lr": [0.01, 0.1], "weight_decay": [0.0, 4e-5], "dropout": [0.0, 0.2],
            "augment": ["none", "basic"], "width": [1.0, 1.5], "depth": [2, 3]}  # fmt: skip
    exclude = [{"weight_decay": 4e-5, "lr": 0.01}, {"dropout": 0.2, "augment": "basic"},
               {"width": 1.5, "depth": 3}]  # fmt: skip
    study = parse_study({"base": BASE, "grid": grid, "exclude": exclude})
    expected = [
        combo for combo in itertools.product(*grid.values())
        if not any(all(dict(zip(grid, combo, strict=True))[k] == v for k, v in e.items())
                   for e in exclude)
    ]  # fmt: skip
    runs = plan_study(study, "out")
    # the paper's pairs: 3 (lr, wd) x 3 (dropout, augment) x 3 (width, depth)
    assert len(runs) == len(expected) == 3 * 3 * 3
    assert all(not (r.config.weight_decay and r.config.lr == 0.01) for r in runs)
    assert study.hyperparameters == list(grid)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"base": BASE, "grid": {"lrr": [0.1, 0.2]}},
            "unknown config key 'lrr' .did you mean 'lr'",
        ),
        ({"base": BASE, "grid": {"lr": [0.1], "seed": [0, 1]}}, "no hyperparameter that varies"),
        (
            {"base": BASE, "grid": {"lr": [0.1, 0.2]}, "exclude": [{"lr": [0.1, 0.2]}]},
            "remove every model",
        ),
        ({"base": BASE, "grid": {"lr": [0.1, 0.2]}, "exclude": [{"k": 3}]}, "not a grid key"),
        ({"base": BASE, "grid": {"lr": [0.1, 0.2]}, "exclude": [{"lr": 0.3}]}, "not in grid.lr"),
        (
            {"base": {**BASE, "dataset": "digits"}, "grid": {"lr": [0.1, 0.2]}},
            "need fine labels but digits is trained without superclasses",
        ),
        (
            {"base": BASE, "grid": {"lr": [0.1, 0.2]}, "measures": {"names": ["c9"]}},
            "unknown measure 'c9'",
        ),
        ({"base": BASE, "grid": {"lr": [0.1, 0.2]}, "tables": 1}, "unknown study key 'tables'"),
    ],
)
def test_bad_input_is_one_line(data, message):
    with pytest.raises(LCCInputError, match=message):
        parse_study(data)


def _write(tmp_path: Path, grid: dict, **extra) -> Path:
    file = tmp_path / "study.yaml"
    data = {"base": BASE, "grid": grid, "measures": MEASURES, **extra}
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def test_cli_bad_input_exit_2_and_another_config(tmp_path, capsys):
    file = _write(tmp_path, {"lr": [0.1]})
    assert main(["study", str(file), "--out", str(tmp_path / "o")]) == 2
    assert "no hyperparameter that varies" in capsys.readouterr().err
    out = tmp_path / "o"
    out.mkdir()
    (out / "study.json").write_text('{"base": {}, "grid": {"lr": [1, 2]}}')
    file = _write(tmp_path, {"lr": [0.1, 0.05]})
    assert main(["study", str(file), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "made by another config (differs in base.batch_size, base.dataset" in err
    assert "grid.lr, measures); run that config again" in err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_study_end_to_end_with_a_diverged_model(tmp_path, capsys):
    tracked = {**BASE, "track_measures": ["c1"], "track_samples": 60}
    file = _write(tmp_path, {"lr": [0.05, 1e30], "dropout": [0.0, 0.2]}, base=tracked)
    out = tmp_path / "out"
    assert main(["study", str(file), "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("new") == 4
    assert main(["study", str(file), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("| measure | lr | dropout | overall")
    rows = list(csv.DictReader((out / "models.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert "non-finite loss" in (out / "lr=1e+30_dropout=0.0_seed=0" / "failed.json").read_text()
    head = list(rows[0])
    assert head[:7] == ["lr", "dropout", "status", "train_top1", "test_top1", "gap", "c1"]
    kendall = list(csv.DictReader((out / "kendall.csv").open()))
    assert [r["measure"] for r in kendall] == head[6:]
    assert {r["left_out"] for r in kendall} == {"2"}
    figures = ("fig3_measures_vs_test.svg", "fig4_kendall_vs_k.png",
               "fig6_measures_over_training.png", "fig7_selective_neurons.svg")  # fmt: skip
    for name in ("report.html", "kendall.md", *(f"figures/{f}" for f in figures)):
        assert (out / name).is_file()
    assert main(["study", str(file), "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == [
        "measured", "lr=0.05_dropout=0.0_seed=0", "measured", "lr=0.05_dropout=0.2_seed=0",
        "failed", "lr=1e+30_dropout=0.0_seed=0", "failed", "lr=1e+30_dropout=0.2_seed=0",
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_again_gives_the_same_kendall_table(tmp_path):
    file = _write(
        tmp_path, {"lr": [0.05, 0.02], "batch_size": [20, 40]}, base={**BASE, "epochs": 3}
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    command = [sys.executable, "-m", "lcc", "study", str(file), "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, str(whole)], check=True, capture_output=True, env=env)
    process = subprocess.Popen([*command, str(killed)], stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while not list(killed.glob("*/measures.json")) and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the study ended before it could be killed"
    process.send_signal(signal.SIGKILL)  # during the second model
    process.wait()
    assert not (killed / "kendall.csv").exists()
    subprocess.run([*command, str(killed)], check=True, capture_output=True, env=env)
    assert (killed / "kendall.csv").read_text() == (whole / "kendall.csv").read_text()
    assert (killed / "models.csv").read_text() == (whole / "models.csv").read_text()
