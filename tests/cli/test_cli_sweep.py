"""Tests of ``lcc sweep``: dry runs, the table on stdout, bad sweep files as one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lcc.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "model": "small-cnn",
    "dataset": "digits",
    "subset": 200,
    "test_subset": 100,
    "epochs": 1,
    "batch_size": 50,
}


def _fails(capsys, argv: list[str]) -> str:
    code = main(["sweep", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lcc sweep: error: ")
    return err


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("base: [\n", "is not valid YAML"),
        ({"base": TINY, "grids": {"k": [3]}}, "unknown sweep key 'grids'"),
        ({"base": TINY, "grid": {"kk": [3]}}, "unknown config key 'kk' (did you mean 'k'?)"),
        ({"base": TINY, "grid": {"k": 3}}, "grid.k must be a non-empty list"),
    ],
)
def test_bad_sweep_files(capsys, tmp_path, content, message):
    file = write(tmp_path / "sweep.yaml", content)
    err = _fails(capsys, [str(file), "--out", str(tmp_path / "runs")])
    assert message in err
    assert not (tmp_path / "runs").exists()


def test_missing_sweep_file(capsys, tmp_path):
    assert "cannot read config file" in _fails(capsys, [str(tmp_path / "none.yaml")])


def test_dry_run_lists_the_runs(capsys, tmp_path):
    file = write(tmp_path / "s.yaml", {"base": TINY, "grid": {"k": [3, 4]}, "baseline": True})
    assert main(["sweep", str(file), "--out", str(tmp_path / "runs"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["new     baseline_seed=0", "new     k=3_seed=0", "new     k=4_seed=0"]
    assert not (tmp_path / "runs").exists()


def test_shipped_table3_sweep_parses(capsys, tmp_path):
    file = REPO / "sweeps" / "table3.yaml"
    assert main(["sweep", str(file), "--out", str(tmp_path / "t3"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.split("\n")
    names = [line.split()[1] for line in lines if line.strip()]
    assert names[0] == "pretrain" and any(n.startswith("baseline_seed=") for n in names)
    assert any(n.startswith("layers=head_") for n in names)
    assert any(n.startswith("layers=act1_") for n in names)


@pytest.mark.slow
def test_sweep_trains_and_prints_the_table(capsys, tmp_path):
    file = write(tmp_path / "s.yaml", {"base": TINY, "grid": {"k": [3]}, "baseline": True})
    out = tmp_path / "runs"
    assert main(["sweep", str(file), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == (out / "table.md").read_text()
    base = json.loads((out / "baseline_seed=0" / "metrics.json").read_text())
    corrected = json.loads((out / "k=3_seed=0" / "metrics.json").read_text())
    gain = 100 * corrected["test_top1"] - 100 * base["test_top1"]
    assert f"| baseline | {100 * base['test_top1']:.2f} |" in captured.out
    assert f"| 3 | {100 * corrected['test_top1']:.2f} |" in captured.out
    assert f" {gain:+.2f}" in captured.out  # one pair: the paired mean is the difference
    assert "table in" in captured.err
    # a second call skips both finished runs and prints the same table
    assert main(["sweep", str(file), "--out", str(out)]) == 0
    again = capsys.readouterr()
    assert again.out == captured.out and again.err.count("finished earlier, skipped") == 2


def test_dry_run_checks_every_runs_layers(capsys, tmp_path):
    file = write(tmp_path / "s.yaml", {"base": TINY, "grid": {"layers": [["act1"], ["nope"]]}})
    err = _fails(capsys, [str(file), "--out", str(tmp_path / "runs"), "--dry-run"])
    assert "run layers=nope_seed=0: model has no layer 'nope'" in err
    assert not (tmp_path / "runs").exists()


def test_an_empty_sweep_file_asks_for_base(capsys, tmp_path):
    file = write(tmp_path / "empty.yaml", "")
    err = _fails(capsys, [str(file), "--dry-run"])
    assert "put them under base:" in err and "--config" not in err


@pytest.mark.slow
def test_sigterm_stops_the_sweep_in_one_line_with_exit_143(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    base = {**TINY, "subset": 1500, "epochs": 3, "batch_size": 8}
    file = write(tmp_path / "s.yaml", {"base": base, "grid": {"k": [3]}})
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "lcc", "sweep", str(file), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    checkpoint = out / "k=3_seed=0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before its first checkpoint"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lcc sweep: stopped during run [1/1] k=3_seed=0")
    assert "run the sweep again to continue" in last and "lcc train" not in last
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr and (out / "k=3_seed=0" / "metrics.json").is_file()
