"""Graceful stops: SIGTERM / SIGINT save a mid-epoch checkpoint and resume exactly; periodic
mid-epoch checkpoints survive SIGKILL at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
SEMI = ["--labels-per-class", "10", "--reg", "kmeans:layers=act1,warmup=0,ramp=0", "--reg", "lcc"]


def _command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lcc", "train", "small-cnn", "digits", "--out", str(out),
        "--subset", "1500", "--test-subset", "200", "--epochs", "3", "--batch-size", "8",
        "--source", "recorded", *extra,
    ]  # fmt: skip


def _finish(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _same_run(out: Path, got: dict, whole: Path, expected: dict) -> None:
    for key in ("test_top1", "test_top5", "test_loss", "train_loss"):
        assert got[key] == expected[key], key
    a, b = _weights(out), _weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((d / "metrics.json").read_text())["history"] for d in (out, whole)]
    assert [r["loss"] for r in history[0]] == [r["loss"] for r in history[1]]


def _wait_mid_epoch(process: subprocess.Popen, out: Path) -> None:
    """Until the first epoch's checkpoint exists: epoch 2 (of ~190 batches) has just begun."""
    deadline = time.monotonic() + 240
    checkpoint = out / "checkpoints" / "last.ckpt"
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before its first checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "extra"),
    [(signal.SIGTERM, 143, []), (signal.SIGINT, 130, []), (signal.SIGTERM, 143, SEMI)],
    ids=["sigterm", "sigint", "sigterm-few-labels"],
)
def test_a_signal_saves_mid_epoch_and_the_run_resumes_exactly(tmp_path, sig, code, extra):
    whole = tmp_path / "whole"
    expected = _finish(_command(whole, *extra))
    out = tmp_path / "stopped"
    process = subprocess.Popen(
        _command(out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    _wait_mid_epoch(process, out)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("lcc train: stopped at epoch ") and last.endswith(
        f"continue with: lcc train --out {out} --resume"
    ), last
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch_in_progress"]["batches"] > 0  # a mid-epoch checkpoint
    assert not (out / "metrics.json").exists()
    got = _finish(_command(out, "--resume"))
    _same_run(out, got, whole, expected)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], SEMI], ids=["lcc", "kmeans-lcc-few-labels"])
def test_periodic_checkpoints_survive_sigkill_at_random_moments(tmp_path, extra):
    whole = tmp_path / "whole"
    expected = _finish(_command(whole, *extra))
    out = tmp_path / "killed"
    periodic = ("--checkpoint-every", "0.002")  # minutes: about every 0.1 s
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        resume = ("--resume",) if kills else ()
        process = subprocess.Popen(
            _command(out, *extra, *periodic, *resume),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
        )
        if kills == 0:
            _wait_mid_epoch(process, out)
        time.sleep(rng.uniform(0.1, 1.5))
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    assert kills >= 1
    got = _finish(_command(out, *extra, *periodic, "--resume"))
    _same_run(out, got, whole, expected)


@pytest.mark.slow
def test_a_second_interrupt_stops_at_once(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        _command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    _wait_mid_epoch(process, out)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("lcc train: stopped")
