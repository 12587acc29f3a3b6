"""Every epoch number a user reads counts from 1, as the console line ``epoch E/N`` does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lcc.cli import main
from lcc.regularisers.base import TrainingLatents
from lcc.train.collect import warn_latent_gap

RUN = ["small-cnn", "digits", "--subset", "200", "--test-subset", "100", "--batch-size", "50"]
RUN += ["--k", "3", "--warmup", "0", "--keep-checkpoints"]


def _journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "refreshes.jsonl").read_text().splitlines()]


def _csv_epochs(out: Path, column: str) -> list[float]:
    """The ``epoch`` of the rows of logs/metrics.csv that carry ``column``."""
    with (out / "logs" / "metrics.csv").open(newline="") as handle:
        return [float(row["epoch"]) for row in csv.DictReader(handle) if row.get(column)]


def _names(folder: Path, pattern: str) -> list[str]:
    return sorted(path.name for path in folder.glob(pattern))


def _console(record: dict) -> str:
    """How the console line of an epoch shows the refresh ``record`` (a journal line)."""
    share = 100 * record["misclustered_fraction"]
    return f"{record['layer']}: {record['n_clusters']} clusters, MC {share:.1f}%"


def test_files_logs_and_checkpoints_count_epochs_as_the_console(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *RUN, "--out", str(out), "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    journal = _journal(out)
    assert [(r["epoch"], r["layer"]) for r in journal] == [(1, "act1"), (2, "act1")]
    assert _names(out / "refresh", "*.npz") == ["epoch_1_act1.npz", "epoch_2_act1.npz"]
    assert _names(out / "checkpoints", "epoch=*.ckpt") == ["epoch=1.ckpt", "epoch=2.ckpt"]
    for epoch in (1, 2):  # epoch=E.ckpt: the end of the E-th epoch (Lightning's 0-based E - 1)
        saved = torch.load(out / "checkpoints" / f"epoch={epoch}.ckpt", weights_only=True)
        assert saved["epoch"] == epoch - 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["last_refresh_epoch"] == 2
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    # the line "epoch E/2" carries the refresh the journal calls epoch E
    lines = {line.split(":")[0]: line for line in err.splitlines() if line.startswith("epoch ")}
    assert set(lines) == {"epoch 1/2", "epoch 2/2"}
    assert _console(journal[0]) != _console(journal[1])  # the lines tell the two apart
    for epoch, record, history in zip((1, 2), journal, metrics["history"], strict=True):
        assert _console(record) in lines[f"epoch {epoch}/2"]
        assert record["n_clusters"] == history["refresh"]["act1"]["n_clusters"]
    # the logger's rows: one per epoch and one per refresh, with our epoch, not Lightning's
    assert _csv_epochs(out, "train/loss") == [1, 2]
    assert _csv_epochs(out, "refresh/act1/n_clusters") == [1, 2]


def test_a_resumed_run_rewrites_its_epoch_and_keeps_the_earlier_ones(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *RUN, "--out", str(out), "--epochs", "2"]) == 0
    before = (out / "refreshes.jsonl").read_text().splitlines()
    rows_before = _csv_epochs(out, "train/loss")
    # what a run killed after the refresh of epoch 3 (before its checkpoint) leaves behind
    stale = {"epoch": 3, "layer": "act1", "n_clusters": -1}
    (out / "refreshes.jsonl").write_text("\n".join([*before, json.dumps(stale)]) + "\n")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 0
    assert "epoch 3/3:" in capsys.readouterr().err
    after = (out / "refreshes.jsonl").read_text().splitlines()
    assert after[:2] == before  # the earlier epochs' lines, as they were
    assert [json.loads(line)["epoch"] for line in after] == [1, 2, 3]
    assert json.loads(after[2])["n_clusters"] > 0  # epoch 3's line is the resumed run's
    assert _names(out / "refresh", "*.npz") == [f"epoch_{e}_act1.npz" for e in (1, 2, 3)]
    assert _names(out / "checkpoints", "epoch=*.ckpt") == [f"epoch={e}.ckpt" for e in (1, 2, 3)]
    assert rows_before == [1, 2] and _csv_epochs(out, "train/loss") == [1, 2, 3]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["last_refresh_epoch"] == 3
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]


def test_the_latent_gap_warning_names_the_epoch_as_the_console():
    y = np.arange(40) % 4
    wrong = (y + 1) % 4  # the pass scores 0% where training scored 90%
    latents = TrainingLatents({"fc": np.zeros((40, 2))}, y, wrong, "fresh", 0.0)
    latents.train_accuracy = 0.9
    expected = r"^refresh at epoch 1: the fresh latent pass scores 0\.0%"
    with pytest.warns(UserWarning, match=expected):
        warn_latent_gap(latents, "running", 0)  # the refresh at the start of the first epoch
