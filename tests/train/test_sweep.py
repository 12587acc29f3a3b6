"""Tests of sweeps: parsing, run names, the table's numbers, and a tiny real grid with resume."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
import yaml

from lcc.errors import LCCInputError
from lcc.train.sweep import (
    BASELINE_OPTIONS,
    format_table,
    load_sweep,
    parse_sweep,
    plan_runs,
    run_state,
    run_sweep,
    sweep_table,
    table_csv,
)

BASE = {"model": "small-cnn", "dataset": "digits"}


def finish(run, top1: float, top5: float) -> None:
    """Write a finished run's files by hand: config.yaml as lcc train saves it, metrics.json."""
    from lcc.train.rundir import save_config

    folder = Path(run.config.out)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(run.config, folder / "config.yaml")
    metrics = {"test_top1": top1, "test_top5": top5, "epochs": run.config.epochs}
    (folder / "metrics.json").write_text(json.dumps(metrics))


# --------------------------------------------------------------------------- parsing


def test_plan_expands_the_grid_in_file_order(tmp_path):
    sweep = parse_sweep(
        {
            "base": {**BASE, "epochs": 3},
            "grid": {"layers": ["act1", ["fc1", "act1"]], "weight": [0.01, 1e-4], "seed": [0, 1]},
            "baseline": True,
        }
    )
    runs = plan_runs(sweep, tmp_path)
    assert [r.name for r in runs[:2]] == ["baseline_seed=0", "baseline_seed=1"]
    assert [r.name for r in runs[2:5]] == [
        "layers=act1_weight=0.01_seed=0",
        "layers=act1_weight=0.01_seed=1",
        "layers=act1_weight=0.0001_seed=0",
    ]
    assert runs[-1].name == "layers=fc1+act1_weight=0.0001_seed=1"
    assert len(runs) == 2 + 2 * 2 * 2
    last = runs[-1].config
    assert (last.layers, last.weight, last.seed, last.epochs) == (["fc1", "act1"], 1e-4, 1, 3)
    assert last.out == str(tmp_path.resolve() / runs[-1].name)
    assert all(r.config.no_lcc for r in runs[:2]) and not any(r.config.no_lcc for r in runs[2:])
    assert runs[0].options == {**BASELINE_OPTIONS, "seed": 0}
    assert runs[2].setting == (("layers", "act1"), ("weight", 0.01))


def test_no_seed_in_grid_uses_the_base_seed(tmp_path):
    sweep = parse_sweep({"base": {**BASE, "seed": 7}, "grid": {"k": [3]}})
    (run,) = plan_runs(sweep, tmp_path)
    assert (run.name, run.config.seed, sweep.seeds) == ("k=3_seed=7", 7, [7])


def test_pretrain_checkpoint_becomes_every_runs_start(tmp_path):
    sweep = parse_sweep(
        {
            "base": BASE,
            "grid": {"k": [3]},
            "baseline": True,
            "pretrain": {"dataset": "mnist", "epochs": 1, "no_lcc": True},
        }
    )
    pretrain, baseline, grid = plan_runs(sweep, tmp_path)
    assert pretrain.kind == "pretrain" and pretrain.config.model == "small-cnn"
    assert pretrain.config.dataset == "mnist" and pretrain.config.checkpoint is None
    weights = str(tmp_path.resolve() / "pretrain" / "checkpoints" / "last.ckpt")
    assert baseline.config.checkpoint == grid.config.checkpoint == weights


def test_names_that_clash_after_sanitising_get_a_hash(tmp_path):
    sweep = parse_sweep({"base": BASE, "grid": {"data_dir": ["a/b", "a:b"]}})
    first, second = plan_runs(sweep, tmp_path)
    assert first.name.startswith("data-dir=a-b_seed=0-") and first.name != second.name


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"base": BASE, "grids": {"k": [1]}}, "unknown sweep key 'grids'"),
        ({"base": BASE, "grid": {"kk": [1]}}, "unknown config key 'kk' (did you mean 'k'?)"),
        ({"base": {**BASE, "warmpu": 1}}, "unknown config key 'warmpu'"),
        ({"base": BASE, "grid": {"k": 5}}, "grid.k must be a non-empty list"),
        ({"base": BASE, "grid": {"k": []}}, "grid.k must be a non-empty list"),
        ({"base": BASE, "grid": {"k": [0]}}, "k must be"),
        ({"base": {**BASE, "out": "x"}}, "base.out is set by lcc sweep"),
        ({"base": BASE, "baseline": "yes"}, "baseline must be true, false or a mapping"),
        ({"base": ["small-cnn"]}, "base must be a mapping"),
        ({"grid": {"k": [3]}}, "the sweep sets no model and no dataset; put them under base:"),
        ({}, "the sweep sets no model and no dataset; put them under base:"),
        (
            {"base": {**BASE, "checkpoint": "w.ckpt"}, "pretrain": {"dataset": "mnist"}},
            "keep one",
        ),
    ],
)
def test_bad_sweeps(tmp_path, data, message):
    file = tmp_path / "sweep.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(LCCInputError) as caught:
        load_sweep(file)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"sweep file {file}: ")


def test_bad_yaml(tmp_path):
    file = tmp_path / "sweep.yaml"
    file.write_text("base: {model: small-cnn\ngrid: [")
    with pytest.raises(LCCInputError, match="is not valid YAML"):
        load_sweep(file)
    with pytest.raises(LCCInputError, match="cannot read config file"):
        load_sweep(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- the table


def test_table_means_spreads_and_gains(tmp_path):
    sweep = parse_sweep({"base": BASE, "grid": {"k": [3, 5], "seed": [0, 1, 2]}, "baseline": True})
    runs = plan_runs(sweep, tmp_path)
    values = {}
    for position, run in enumerate(runs):
        top1, top5 = 0.5 + 0.01 * position + 0.003 * run.seed**2, 0.9 + 0.001 * position
        values[run.name] = (top1, top5)
        if run.name != "k=5_seed=2":  # one run not finished: left out of its row
            finish(run, top1, top5)
    rows = sweep_table(sweep, runs)
    assert [row.baseline for row in rows] == [True, False, False]
    groups = [
        [f"baseline_seed={s}" for s in range(3)],
        [f"k=3_seed={s}" for s in range(3)],
        [f"k=5_seed={s}" for s in range(2)],
    ]
    for row, names in zip(rows, groups, strict=True):
        top1 = [values[name][0] for name in names]
        top5 = [values[name][1] for name in names]
        assert row.finished == len(names)
        assert row.top1_mean == pytest.approx(statistics.mean(top1))
        assert row.top1_std == pytest.approx(statistics.stdev(top1))
        assert row.top5_mean == pytest.approx(statistics.mean(top5))
        assert row.top5_std == pytest.approx(statistics.stdev(top5))
    base1 = statistics.mean(values[name][0] for name in groups[0])
    assert rows[0].gain_top1 is None
    assert rows[2].gain_top1 == pytest.approx(rows[2].top1_mean - base1)
    assert rows[2].runs == ["k=5_seed=0", "k=5_seed=1", "k=5_seed=2"]

    markdown = format_table(sweep, rows).splitlines()
    assert markdown[0] == "| k | top-1 (%) | top-5 (%) | gain top-1 | gain top-5 | runs |"
    cells = [c.strip() for c in markdown[4].strip("|").split("|")]
    assert cells[0] == "5"
    assert cells[1] == f"{100 * rows[2].top1_mean:.2f} ± {100 * rows[2].top1_std:.2f}"
    assert cells[3] == f"{100 * rows[2].gain_top1:+.2f}" and cells[5] == "2/3"
    assert markdown[2].startswith("| baseline | ") and " - | - | 3/3 |" in markdown[2]

    table = list(csv.DictReader(io.StringIO(table_csv(sweep, rows))))
    assert [r["setting"] for r in table] == ["baseline", "k=3", "k=5"]
    assert float(table[1]["top1_mean"]) == rows[1].top1_mean
    assert float(table[1]["top5_std"]) == rows[1].top5_std
    assert float(table[2]["gain_top5"]) == rows[2].gain_top5 and table[0]["gain_top1"] == ""


def test_one_seed_has_no_spread(tmp_path):
    sweep = parse_sweep({"base": BASE, "grid": {"k": [3]}})
    (run,) = plan_runs(sweep, tmp_path)
    finish(run, 0.625, 0.95)
    (row,) = sweep_table(sweep, [run])
    assert (row.top1_mean, row.top1_std) == (0.625, None)
    assert "| 3 | 62.50 | 95.00 | - | - | 1/1 |" in format_table(sweep, [row])


def test_run_state_finds_finished_started_and_clashing_runs(tmp_path):
    sweep = parse_sweep({"base": {**BASE, "epochs": 2}, "grid": {"k": [3, 4, 5]}})
    finished, started, fresh = plan_runs(sweep, tmp_path)
    finish(finished, 0.5, 0.9)
    finish(started, 0.5, 0.9)
    (Path(started.config.out) / "metrics.json").unlink()
    assert run_state(finished)[0] == "done"
    state, config = run_state(started)
    assert state == "resume" and config.resume
    assert run_state(fresh)[0] == "new"
    more = parse_sweep({"base": {**BASE, "epochs": 4}, "grid": {"k": [3]}})
    assert run_state(plan_runs(more, tmp_path)[0])[0] == "resume"  # more epochs: continue
    other = parse_sweep({"base": {**BASE, "epochs": 2, "lr": 0.5}, "grid": {"k": [3]}})
    with pytest.raises(LCCInputError, match=r"holds a run with other settings \(lr"):
        run_state(plan_runs(other, tmp_path)[0])


# --------------------------------------------------------------------------- a real grid

TINY = {**BASE, "subset": 200, "test_subset": 100, "epochs": 2, "batch_size": 50, "warmup": 1}


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "runs"
    sweep = parse_sweep(
        {"base": TINY, "grid": {"weight": [0.01, 5.0], "seed": [0, 1]}, "baseline": True}
    )
    return sweep, out, run_sweep(sweep, out, report=False)


@pytest.mark.slow
def test_real_grid_table_equals_the_runs_metrics(grid_run):
    _, out, result = grid_run
    assert set(result.status.values()) == {"trained"} and len(result.status) == 6
    metrics = {
        name: json.loads((out / name / "metrics.json").read_text()) for name in result.status
    }
    assert metrics["weight=5.0_seed=1"]["lcc"] and not metrics["baseline_seed=1"]["lcc"]
    assert metrics["weight=5.0_seed=0"]["n_train"] == 200
    table = list(csv.DictReader(result.csv.open()))
    assert [row["setting"] for row in table] == ["baseline", "weight=0.01", "weight=5.0"]
    for row, prefix in zip(table, ("baseline", "weight=0.01", "weight=5.0"), strict=True):
        top1 = [metrics[f"{prefix}_seed={seed}"]["test_top1"] for seed in (0, 1)]
        top5 = [metrics[f"{prefix}_seed={seed}"]["test_top5"] for seed in (0, 1)]
        assert float(row["top1_mean"]) == pytest.approx(statistics.mean(top1))
        assert float(row["top1_std"]) == pytest.approx(statistics.stdev(top1))
        assert float(row["top5_mean"]) == pytest.approx(statistics.mean(top5))
    base = statistics.mean(metrics[f"baseline_seed={s}"]["test_top1"] for s in (0, 1))
    assert float(table[2]["gain_top1"]) == pytest.approx(float(table[2]["top1_mean"]) - base)
    markdown = result.markdown.read_text()
    assert f"| 5.0 | {100 * float(table[2]['top1_mean']):.2f} ± " in markdown


@pytest.mark.slow
def test_real_grid_resumes_and_skips(grid_run):
    sweep, out, _ = grid_run
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    (out / "weight=0.01_seed=1" / "metrics.json").unlink()  # as if killed after its last epoch
    again = run_sweep(sweep, out, report=False)
    assert again.status.pop("weight=0.01_seed=1") == "resumed"
    assert set(again.status.values()) == {"done"}
    for name, stamp in stamps.items():
        if name != "weight=0.01_seed=1":
            assert (out / name / "metrics.json").stat().st_mtime_ns == stamp, name
    assert (out / "weight=0.01_seed=1" / "metrics.json").is_file()
    table_only = run_sweep(sweep, out, train_runs=False, report=False)
    assert set(table_only.status.values()) == {"done"}


# --------------------------------------------------------------------------- issue 17


def test_a_moved_or_copied_sweep_folder_is_the_same_sweep(tmp_path):
    import shutil

    from lcc.train.rundir import resume_differences
    from lcc.train.sweep import _adopt_location

    pretraining = {"dataset": "digits", "epochs": 1}
    sweep = parse_sweep(
        {"base": {**BASE, "epochs": 2}, "grid": {"k": [3, 4]}, "pretrain": pretraining}
    )
    pretrain, finished, started = plan_runs(sweep, tmp_path / "sw")
    finish(pretrain, 0.5, 0.9)
    finish(finished, 0.6, 0.9)
    finish(started, 0.6, 0.9)
    (Path(started.config.out) / "metrics.json").unlink()
    shutil.copytree(tmp_path / "sw", tmp_path / "sw2")
    moved = plan_runs(sweep, tmp_path / "sw2")
    assert [run_state(run)[0] for run in moved] == ["done", "done", "resume"]
    table = run_sweep(sweep, tmp_path / "sw2", train_runs=False, report=False)
    assert table.status == {"pretrain": "done", "k=3_seed=0": "done", "k=4_seed=0": "skipped"}
    # the started run's config.yaml moves with it, so lcc train's resume check agrees
    config = run_state(moved[2])[1]
    _adopt_location(config)
    saved = yaml.safe_load((Path(config.out) / "config.yaml").read_text())
    assert saved["out"] == config.out
    assert saved["checkpoint"] == str(tmp_path / "sw2" / "pretrain" / "checkpoints" / "last.ckpt")
    from lcc.train.config import TrainConfig, merge_config

    assert resume_differences(merge_config(TrainConfig(), saved), config) == []
    again = yaml.safe_load((tmp_path / "sw" / "k=4_seed=0" / "config.yaml").read_text())
    assert again["out"] == str(tmp_path / "sw" / "k=4_seed=0")  # the original is untouched


def test_other_settings_never_ask_to_delete_runs(tmp_path):
    sweep = parse_sweep({"base": {**BASE, "epochs": 2}, "grid": {"k": [3]}})
    (run,) = plan_runs(sweep, tmp_path)
    finish(run, 0.5, 0.9)
    other = parse_sweep({"base": {**BASE, "epochs": 2, "lr": 0.5}, "grid": {"k": [3]}})
    with pytest.raises(LCCInputError) as caught:
        run_state(plan_runs(other, tmp_path)[0])
    assert "delete" not in str(caught.value) and "choose another --out" in str(caught.value)
    (Path(run.config.out) / "config.yaml").unlink()
    with pytest.raises(LCCInputError) as caught:
        run_state(run)
    assert "delete" not in str(caught.value) and "no config.yaml" in str(caught.value)


def test_a_missing_layer_stops_the_sweep_before_any_run_trains(tmp_path):
    sweep = parse_sweep({"base": {**BASE, "epochs": 1}, "grid": {"layers": [["act1"], ["nope"]]}})
    with pytest.raises(LCCInputError, match=r"run layers=nope_seed=0: model has no layer 'nope'"):
        run_sweep(sweep, tmp_path / "runs", report=False)
    assert not (tmp_path / "runs" / "layers=act1_seed=0").exists()
    regs = parse_sweep(
        {"base": {**BASE, "epochs": 1}, "grid": {"regularisers": [["label-variation:layers=nope"]]}}
    )
    with pytest.raises(LCCInputError, match="has no layer 'nope'"):
        run_sweep(regs, tmp_path / "runs2", report=False)


def test_one_seed_caption_says_one_run_per_setting(tmp_path):
    sweep = parse_sweep({"base": BASE, "grid": {"k": [3]}})
    text = format_table(sweep, sweep_table(sweep, plan_runs(sweep, tmp_path)))
    assert "over seeds 0 " not in text and "one run per setting (seed 0)" in text


def test_out_may_not_be_a_run_or_hold_foreign_tables(tmp_path):
    sweep = parse_sweep({"base": BASE, "grid": {"k": [3]}})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: small-cnn\n")
    with pytest.raises(LCCInputError, match="is the folder of an lcc train run"):
        run_sweep(sweep, tmp_path / "run", train_runs=False, report=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "table.md").write_text("my notes\n")
    with pytest.raises(LCCInputError, match=r"holds a table\.md that lcc sweep did not write"):
        run_sweep(sweep, tmp_path / "mine", train_runs=False, report=False)
    assert (tmp_path / "mine" / "table.md").read_text() == "my notes\n"
    first = run_sweep(sweep, tmp_path / "ok", train_runs=False, report=False)
    again = run_sweep(sweep, tmp_path / "ok", train_runs=False, report=False)  # its own tables
    assert again.markdown.read_text() == first.markdown.read_text()
