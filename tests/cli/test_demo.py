"""Tests of ``lcc demo``: the quick demo end to end, the table, the pretraining fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcc.cli.demo import DEMO_LAYERS, FASHION_HOW, _upscaled_digits, format_table, run_demo
from lcc.errors import LCCInputError
from lcc.zoo.datasets import FASHION_DIR
from lcc.zoo.models import build_model

REPO = Path(__file__).resolve().parents[2]

needs_fashion = pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason=f"Fashion-MNIST not installed: {FASHION_HOW}"
)


def test_table_marks_what_a_baseline_does_not_have():
    base = {
        "test_top1": 0.5,
        "test_top5": 0.9,
        "mean_epoch_seconds": 1.0,
        "total_refresh_seconds": 0.0,
        "refreshes": 0,
        "last_refresh": None,
    }
    lcc = dict(
        base,
        refreshes=2,
        total_refresh_seconds=3.25,
        last_refresh={"a": {"misclustered_fraction": 0.1}, "b": {"misclustered_fraction": 0.3}},
    )
    lines = format_table(base, lcc).splitlines()
    assert lines[0].split() == ["metric", "baseline", "LCC"]
    assert lines[4].split()[-2:] == ["-", "3.25"]
    assert lines[5].split()[-2:] == ["-", "20.00%"]  # mean over layers


def test_unknown_demo_model_is_refused_before_any_work(tmp_path):
    with pytest.raises(LCCInputError, match="small-resnet or small-cnn, not 'resnet50'"):
        run_demo(tmp_path / "demo", model="resnet50")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("model", sorted(DEMO_LAYERS))
def test_demo_layer_is_the_penultimate_one(model):
    # the corrected layer feeds the classifier head directly: its output is the head's input
    net = build_model(model, 10, input_shape=(1, 28, 28), pretrained=False)
    seen: dict[str, torch.Tensor] = {}
    layer = dict(net.named_modules())[DEMO_LAYERS[model]]
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    layer.register_forward_hook(lambda m, i, o: seen.__setitem__("layer", o))
    head.register_forward_hook(lambda m, i, o: seen.__setitem__("head_input", i[0]))
    net.eval()(torch.randn(3, 1, 28, 28))
    torch.testing.assert_close(seen["layer"].flatten(1), seen["head_input"])


def test_digits_fallback_has_mnist_shape():
    bundle = _upscaled_digits(100, seed=0)
    x, _ = bundle.train[0]
    assert bundle.input_shape == (1, 28, 28) and x.shape == (1, 28, 28)
    assert len(bundle.train) == 100 and bundle.targets.shape == (100,)
    assert abs(float(torch.stack([bundle.train[i][0] for i in range(100)]).mean())) < 0.05


@pytest.mark.slow
@needs_fashion
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "lcc", "demo", "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    table = {line[:28].strip(): line[28:].split() for line in lines[header + 1 : header + 6]}
    assert set(table) == {
        "test top-1 (%)",
        "test top-5 (%)",
        "wall time per epoch (s)",
        "refresh seconds (total)",
        "misclustered (last refresh)",
    }
    baseline = json.loads((out / "quick-baseline" / "metrics.json").read_text())
    corrected = json.loads((out / "quick-lcc" / "metrics.json").read_text())
    assert table["test top-1 (%)"] == [
        f"{100 * baseline['test_top1']:.2f}",
        f"{100 * corrected['test_top1']:.2f}",
    ]
    assert table["refresh seconds (total)"][0] == "-" and corrected["refreshes"] == 1
    assert table["misclustered (last refresh)"][1].endswith("%")
    assert baseline["n_train"] == corrected["n_train"] == 1000
    assert baseline["n_test"] == 500 and baseline["epochs"] == 2
    assert baseline["lcc"] is False and corrected["lcc"] is True
    # same seed, same start: the warmup epoch (no correction yet) is identical in both runs
    assert baseline["history"][0]["loss"] == pytest.approx(corrected["history"][0]["loss"])
    # running it again reuses the finished runs and prints the same table
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already finished" in again.stderr
    assert again.stdout.splitlines()[header + 1] == lines[header + 1]
