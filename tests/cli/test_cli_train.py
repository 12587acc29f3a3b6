"""Tests of ``lcc train``: bad inputs, the run directory, config files, NaN, exact resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lcc.cli import main
from lcc.errors import LCCInputError
from lcc.io import read_yaml
from lcc.train.config import TrainConfig
from lcc.train.run import default_layers, probe_layers, resolve_config
from lcc.train.rundir import save_config

REPO = Path(__file__).resolve().parents[2]
TINY = ["--subset", "200", "--test-subset", "100", "--epochs", "1", "--batch-size", "50"]


def _fails(capsys, argv: list[str]) -> str:
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lcc train: error: ")
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "small-cnn", "digits", "--out", str(out), "--no-lcc", *TINY]) == 0
    return out


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope-net", "digits"], "unknown model 'nope-net'"),
        (["small-cnn", "nope-data"], "unknown dataset 'nope-data'"),
        (["small-cnn", "digits", "--layers", "fc9"], "model has no layer 'fc9'"),
        (["small-cnn", "digits", "--subset", "30", "--k", "5"], "k=5 is larger than class"),
        (["small-cnn", "digits", "--method", "kmeans"], None),  # argparse: exit 2
        (["small-cnn"], "DATASET is required"),
        (["small-cnn", "digits", "--class-policy", "top-pairs"], "needs a policy_size"),
        (["small-cnn", "digits", "--precision", "16-mixed", "--accelerator", "cpu"], "bf16-mixed"),
        (["small-cnn", "digits", "--precision", "64"], None),  # argparse: exit 2
    ],
)
def test_bad_inputs_give_one_line(capsys, tmp_path, argv, message):
    out = tmp_path / "run"
    if message is None:
        with pytest.raises(SystemExit) as caught:
            main(["train", *argv, "--out", str(out)])
        assert caught.value.code == 2
        return
    err = _fails(capsys, [*argv, "--out", str(out)])
    assert message in err
    assert not out.exists()  # a rejected run leaves no directory behind


def test_empty_dataset(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    err = _fails(
        capsys, ["small-cnn", f"folder:{tmp_path / 'images'}", "--out", str(tmp_path / "r")]
    )
    assert "holds no images" in err


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    err = _fails(capsys, ["small-cnn", "digits", "--out", str(blocker / "run")])
    assert f"cannot write to --out {blocker / 'run'}" in err
    err = _fails(capsys, ["small-cnn", "digits", "--out", str(blocker)])
    assert "is a file" in err


def test_layer_output_must_hold_a_tensor():
    class Meta(nn.Module):
        def forward(self, x):
            return {"shape": tuple(x.shape)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.meta = Meta()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            self.meta(x)
            return self.head(x)

    with pytest.raises(LCCInputError, match="layer 'meta' outputs no tensor"):
        probe_layers(Net(), ["meta"], torch.zeros(2, 4))
    probe_layers(Net(), ["head"], torch.zeros(2, 4))


def test_layer_that_does_not_run():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 2), nn.ReLU()

        def forward(self, x):
            return self.used(x)

    model = Net()
    with pytest.raises(LCCInputError, match="does not run"):
        probe_layers(model, ["unused"], torch.zeros(1, 4))


def test_default_layer_is_the_one_feeding_the_head():
    model = nn.Sequential(
        OrderedDict(
            body=nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
            norm=nn.LayerNorm(8),
            drop=nn.Dropout(0.1),
            head=nn.Linear(8, 3),
        )
    )
    assert default_layers(model, torch.zeros(2, 4)) == ["norm"]  # dropout skipped


def test_finished_run_needs_resume(capsys, finished_run):
    argv = ["small-cnn", "digits", "--out", str(finished_run), "--no-lcc", *TINY]
    err = _fails(capsys, argv)
    assert "already holds a finished run" in err and "--resume" in err
    # --resume on a finished run with the same settings: nothing to do, same metrics
    assert main(["train", *argv, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.err
    printed = json.loads(captured.out.strip().splitlines()[-1])
    saved = json.loads((finished_run / "metrics.json").read_text())
    assert printed["test_top1"] == saved["test_top1"]
    err = _fails(capsys, [*argv, "--resume", "--k", "3"])
    assert "used other settings (k: run has 5, requested 3)" in err


def test_unfinished_run_needs_resume(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    save_config(TrainConfig(model="small-cnn", dataset="digits", out=str(out)), out / "config.yaml")
    err = _fails(capsys, ["small-cnn", "digits", "--out", str(out)])
    # no checkpoint yet (e.g. it diverged in its first epoch): --resume starts it again
    assert "stopped before its first checkpoint; pass --resume to start it again" in err
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"saved")
    err = _fails(capsys, ["small-cnn", "digits", "--out", str(out)])
    assert "holds an unfinished run" in err


# --------------------------------------------------------------------------- config files


def test_config_file_then_command_line(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("model: small-cnn\ndataset: digits\nk: 3\nepochs: 4\nlayers: [fc1]\n")
    config = resolve_config({"k": 4, "out": str(tmp_path / "r")}, file)
    assert (config.model, config.k, config.epochs, config.layers) == ("small-cnn", 4, 4, ["fc1"])
    file.write_text("k: 3\nwarmpu: 2\n")
    with pytest.raises(LCCInputError, match="unknown config key 'warmpu' \\(did you mean 'warmup'"):
        resolve_config({"out": "x"}, file)


def test_resume_takes_the_saved_config(finished_run):
    config = resolve_config({"out": str(finished_run), "resume": True, "epochs": 2})
    assert (config.model, config.dataset, config.no_lcc, config.epochs) == (
        "small-cnn",
        "digits",
        True,
        2,
    )


# --------------------------------------------------------------------------- a run


def test_lcc_run_writes_its_directory(capsys, tmp_path):
    from lcc.engine.refresh import RefreshConfig, refresh

    file = tmp_path / "c.yaml"
    file.write_text("epochs: 2\nk: 4\nbatch_size: 64\n")
    out = tmp_path / "run"
    argv = ["small-cnn", "digits", "--out", str(out), "--config", str(file), "--k", "5"]
    argv += ["--subset", "300", "--test-subset", "100", "--save-latents"]
    assert main(["train", *argv]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out.strip())  # exactly one JSON line on stdout
    assert "epoch 2/2:" in captured.err  # per-epoch lines when stderr is not a terminal
    assert "\r" not in captured.err  # no progress bar
    saved = read_yaml(out / "config.yaml")
    assert (saved["k"], saved["epochs"], saved["batch_size"], saved["layers"]) == (
        5,
        2,
        64,
        ["act1"],
    )
    assert metrics["refreshes"] == 1 and metrics["last_refresh_epoch"] == 2  # after warmup 1
    assert 0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1
    assert len(metrics["epoch_seconds"]) == 2 and metrics["refresh_seconds"][0] == 0
    assert json.loads((out / "metrics.json").read_text())["test_top1"] == metrics["test_top1"]
    (line,) = (out / "refreshes.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (record["epoch"], record["layer"], record["n"]) == (2, "act1", 300)
    for key in ("n_clusters", "misclustered_fraction", "correctible_fraction", "modularity"):
        assert key in record
    assert {"accuracy_cc", "accuracy_mc", "seconds"} <= set(record)
    arrays = np.load(out / "refresh" / "epoch_2_act1.npz")
    again = refresh(arrays["z"], arrays["y"], RefreshConfig(k=5, seed=0))
    assert np.array_equal(arrays["clusters"], again.clusters)
    assert record["n_clusters"] == again.n_clusters
    csv = (out / "logs" / "metrics.csv").read_text()
    assert "refresh/act1/n_clusters" in csv and "train/loss" in csv and "test/top1" in csv
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_diverging_loss_stops_with_one_line(capsys, tmp_path):
    out = tmp_path / "run"
    code = main(
        ["train", "small-cnn", "digits", "--out", str(out), "--no-lcc", "--lr", "1e30", *TINY]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("lcc train: error: non-finite loss at epoch 1")
    assert "lower --lr" in err[-1]
    assert not (out / "metrics.json").exists()


# --------------------------------------------------------------------------- resume


def _train_command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lcc", "train", "small-cnn", "digits", "--out", str(out),
        "--subset", "400", "--test-subset", "200", "--epochs", "4", "--batch-size", "16",
        "--source", "recorded", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_final_metrics(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    whole = subprocess.run(
        _train_command(tmp_path / "whole"), capture_output=True, text=True, env=env, timeout=300
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = json.loads(whole.stdout.strip().splitlines()[-1])

    out = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    checkpoint, journal = out / "checkpoints" / "last.ckpt", out / "refreshes.jsonl"
    deadline = time.monotonic() + 240

    def wait(condition) -> None:
        while not condition() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)

    wait(journal.exists)  # epoch 2 started with a refresh; wait for its checkpoint
    first = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
    wait(lambda: checkpoint.exists() and checkpoint.stat().st_mtime_ns != first)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    killed_at = torch.load(checkpoint, weights_only=True)["epoch"]
    assert killed_at in (1, 2)  # the checkpoint holds a refresh state and recorded latents

    resumed = subprocess.run(
        _train_command(out, "--resume"), capture_output=True, text=True, env=env, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads(resumed.stdout.strip().splitlines()[-1])
    for key in ("test_top1", "test_top5", "test_loss", "train_loss"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    history = [
        json.loads((d / "metrics.json").read_text())["history"] for d in (tmp_path / "whole", out)
    ]
    assert [round(r["loss"], 6) for r in history[1]] == [round(r["loss"], 6) for r in history[0]]
    assert got["refreshes"] == expected["refreshes"] == 3
    journal = (out / "refreshes.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in journal] == [2, 3, 4]  # no duplicates


# --------------------------------------------------------------------------- faults and misuse


class Payload:
    """Unpickling this creates ``marker``: the stand-in for code a malicious file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


RUN2 = ["--k", "3", "--subset", "200", "--test-subset", "100", "--batch-size", "50"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A finished 2-epoch LCC run: checkpoints/last.ckpt (epoch 1) and previous.ckpt (epoch 0)."""
    out = tmp_path_factory.mktemp("two") / "run"
    assert main(["train", "small-cnn", "digits", "--out", str(out), "--epochs", "2", *RUN2]) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def test_resume_without_a_run_names_the_files_it_looked_for(capsys, tmp_path, two_epochs):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _fails(capsys, ["--out", str(empty), "--resume"])
    assert f"there is no run to resume in {empty} (looked for {empty / 'config.yaml'}" in err
    assert str(empty / "checkpoints" / "last.ckpt") in err and "without --resume" in err
    err = _fails(capsys, ["--out", str(tmp_path / "missing"), "--resume"])
    assert f"{tmp_path / 'missing'} does not exist" in err
    assert not (tmp_path / "missing").exists()
    run = _copy(two_epochs, tmp_path)
    (run / "config.yaml").unlink()
    err = _fails(capsys, ["--out", str(run), "--resume"])
    assert "config.yaml is missing" in err and "last.ckpt" in err


def test_out_directory_not_writable_is_one_line(capsys, tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    out = tmp_path / "run"
    err = _fails(capsys, ["small-cnn", "digits", "--out", str(out), *TINY])
    assert f"cannot write to --out {out}: Read-only file system" in err


@pytest.mark.parametrize(
    "how",
    ["truncated", pytest.param("zero-byte", marks=pytest.mark.slow), "random-bytes"],
)
def test_resume_falls_back_from_a_damaged_last_checkpoint(capsys, tmp_path, two_epochs, how):
    run = _copy(two_epochs, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    content = {
        "truncated": last.read_bytes()[: last.stat().st_size // 3],
        "zero-byte": b"",
        "random-bytes": np.random.default_rng(0).bytes(5000),
    }[how]
    last.write_bytes(content)
    earlier = json.loads((two_epochs / "metrics.json").read_text())["history"]
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert warnings == [
        f"lcc train: warning: checkpoint {last} is unusable ("
        + {
            "truncated": f"truncated ({len(content)} bytes; the archive torch.save writes is "
            "incomplete)",
            "zero-byte": "empty file (0 bytes)",
            "random-bytes": "not a file written by torch.save (unrecognised bytes)",
        }[how]
        + "); resuming from previous.ckpt (epoch 1, step 4)"
    ]
    assert "Traceback" not in captured.err
    metrics = json.loads((run / "metrics.json").read_text())
    assert [record["epoch"] for record in metrics["history"]] == [1, 2, 3]
    assert metrics["history"][0]["loss"] == earlier[0]["loss"]  # epoch 1 came from previous.ckpt
    journal = [json.loads(line) for line in (run / "refreshes.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in journal] == [2, 3]
    # the next save did not keep the damaged file as previous.ckpt
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert torch.load(run / "checkpoints" / "previous.ckpt", weights_only=True)["epoch"] == 1


def test_resume_with_every_checkpoint_damaged_is_one_line(capsys, tmp_path, two_epochs):
    run = _copy(two_epochs, tmp_path)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    previous = run / "checkpoints" / "previous.ckpt"
    previous.write_bytes(previous.read_bytes()[:1000])
    err = _fails(capsys, ["--out", str(run), "--resume", "--epochs", "3"])
    assert f"no usable checkpoint in {run / 'checkpoints'} (last.ckpt: empty file" in err
    assert "previous.ckpt: truncated (1000 bytes" in err


def test_malicious_checkpoint_in_the_run_never_runs(capsys, tmp_path, two_epochs):
    run = _copy(two_epochs, tmp_path)
    marker = tmp_path / "marker"
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({**saved, "lcc_history": Payload(marker)}, run / "checkpoints" / "last.ckpt")
    (run / "checkpoints" / "previous.ckpt").unlink()
    err = _fails(capsys, ["--out", str(run), "--resume", "--epochs", "3"])
    assert "last.ckpt: needs arbitrary unpickling (io.open), refused" in err
    assert not marker.exists()


def test_malicious_checkpoint_option_never_runs(capsys, tmp_path):
    from lcc.zoo.models import build_model

    marker = tmp_path / "marker"
    weights = build_model("small-cnn", 10, input_shape=(1, 8, 8)).state_dict()
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": weights, "hyper_parameters": Payload(marker)}, evil)
    out = tmp_path / "run"
    err = _fails(capsys, ["small-cnn", "digits", "--checkpoint", str(evil), "--out", str(out)])
    assert f"refusing to load checkpoint {evil}: it needs arbitrary unpickling (io.open)" in err
    assert "execute code" in err and "safetensors" in err
    assert not marker.exists()
    assert not out.exists()


def test_resume_tolerates_torn_logs(capsys, tmp_path, two_epochs):
    run = _copy(two_epochs, tmp_path)
    csv_file, journal = run / "logs" / "metrics.csv", run / "refreshes.jsonl"
    text = csv_file.read_text()
    csv_file.write_text(text + text.splitlines()[1][:7])  # a row cut by a kill
    journal.write_text(journal.read_text() + '{"epoch": 3, "layer": "ac')
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3"]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [record["epoch"] for record in records] == [2, 3]
    import csv as csv_module

    with csv_file.open(newline="") as handle:
        rows = list(csv_module.DictReader(handle))
    epochs = [float(row["epoch"]) for row in rows if row.get("train/loss")]
    assert epochs == [1, 2, 3]  # one row per epoch, counted from 1: no torn row, nothing twice
    before = [row for row in csv_module.DictReader(text.splitlines()) if row.get("train/loss")]
    after = [row for row in rows if row.get("train/loss")]
    assert after[0] == {key: before[0][key] for key in after[0]}  # written back as they were


def test_disk_full_during_training_is_one_line_and_keeps_the_checkpoint(
    capsys, tmp_path, monkeypatch
):
    import errno

    from lcc.train import checkpoints

    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def fills_up(obj, handle):
        calls.append(1)
        if len(calls) > 1:  # the first epoch's checkpoint fits, the second does not
            handle.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, handle)

    monkeypatch.setattr(checkpoints.torch, "save", fills_up)
    code = main(["train", "small-cnn", "digits", "--out", str(out), "--epochs", "2", *RUN2])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[0].startswith("epoch 1/2:")  # the per-epoch report, then
    (err,) = [line for line in lines if not line.startswith("epoch ")]  # one line
    last = out / "checkpoints" / "last.ckpt"
    assert err.startswith(f"lcc train: error: cannot write checkpoint {last}: no space left")
    assert "last.ckpt left as it was" in err and f"lcc train --out {out} --resume" in err
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert not (out / "metrics.json").exists()


def test_resume_before_the_first_checkpoint_starts_over_and_says_so(capsys, tmp_path, two_epochs):
    import shutil

    run = _copy(two_epochs, tmp_path)  # killed during epoch 1: config.yaml, no checkpoint
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.json").unlink()
    assert main(["train", "--out", str(run), "--resume", "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert f"lcc train: {run} holds no checkpoint yet: starting the run from epoch 1" in err
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the line of a CPU-only machine")
def test_cuda_settings_without_cuda_are_one_line(capsys, tmp_path):
    err = _fails(
        capsys, ["small-cnn", "digits", "--refresh-device", "cuda", "--out", str(tmp_path / "a")]
    )
    assert "CUDA is not available on this machine; use --refresh-device cpu" in err
    err = _fails(
        capsys, ["small-cnn", "digits", "--accelerator", "gpu", "--out", str(tmp_path / "b")]
    )
    assert "use --accelerator cpu" in err


def test_bf16_mixed_precision_trains_under_autocast(tmp_path):
    import lightning.pytorch as pl

    seen: dict = {}

    class Probe(pl.Callback):
        def on_before_backward(self, trainer, module, loss):
            seen["precision"] = trainer.precision

    config = resolve_config(
        {"model": "small-cnn", "dataset": "digits", "out": str(tmp_path / "run"), "epochs": 1,
         "subset": 200, "test_subset": 50, "warmup": 0, "precision": "bf16-mixed"}
    )  # fmt: skip
    from lcc.train.run import train

    metrics = train(config, callbacks=[Probe()], report=False)
    assert seen["precision"] == "bf16-mixed" and math.isfinite(metrics["test_loss"])
    assert metrics["refreshes"] == 1  # LCC refreshed and trained under bf16 autocast


def test_resume_with_nothing_to_resume_is_one_line_even_with_model_and_dataset(capsys, tmp_path):
    out = tmp_path / "never-ran"
    err = _fails(capsys, ["small-cnn", "digits", "--out", str(out), "--resume"])
    assert "there is no run to resume" in err and not out.exists()


def test_label_variation_run_reports_its_layers_and_unread_flags(capsys, tmp_path):
    out = tmp_path / "lv"
    argv = ["small-cnn", "digits", "--out", str(out), *TINY, "--k", "7", "--layers", "fc1"]
    assert main(["train", *argv, "--reg", "label-variation:layers=act1,fc1"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert metrics["layers"] == ["act1", "fc1"]  # what the regulariser read, not --layers
    warning = [line for line in captured.err.splitlines() if "read by no regulariser" in line]
    assert len(warning) == 1 and "--layers, --k" in warning[0]
    assert not any(" LCC " in line for line in captured.err.splitlines())


def test_label_variation_of_the_output_runs_as_the_readme_writes_it(capsys, tmp_path):
    out = tmp_path / "lv-output"
    argv = ["small-cnn", "digits", "--out", str(out), *TINY]
    assert main(["train", *argv, "--ce-weight", "0", "--reg", "label-variation:layers=output"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert metrics["layers"] == ["output"]
    assert "--ce-weight 0 trained no classifier" in captured.err and "--probe" in captured.err
