"""The trainer side of the regulariser interface: a toy regulariser defined here plugs into
the plain loop and ``lcc train`` with no change to the trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lcc.cli import main
from lcc.errors import LCCInputError
from lcc.regularisers import REGISTRY, Batch, Regulariser, RegulariserOptions, option
from lcc.regularisers.lcc import LCC
from lcc.synthetic import gaussian_mixture
from lcc.train.loop import Regularisation


@dataclass
class ShrinkOptions(RegulariserOptions):
    power: float = option(2.0, "exponent p of the mean |z|^p")


class Shrink(Regulariser):
    """Toy: mean over its layers of mean |z|^p (pulls latents towards 0)."""

    name = "shrink"
    Options = ShrinkOptions
    batches: list[dict] = []  # noqa: RUF012 - what the trainer handed over, for the tests

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        self.scale = nn.Parameter(torch.ones(()))  # trained by the same optimiser
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, batch: Batch) -> torch.Tensor:
        Shrink.batches.append(
            {
                "epoch": batch.epoch,
                "indices": batch.indices.tolist(),
                "y": None if batch.y is None else batch.y.tolist(),
                "logits": None if batch.logits is None else tuple(batch.logits.shape),
                "x": batch.x is not None,
            }
        )
        self.calls += 1
        p = self.options.power
        terms = [batch.layer(name).abs().pow(p).mean() for name in self.layers]
        return self.scale * torch.stack(terms).mean()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            hidden=nn.Linear(8, 12), act=nn.ReLU(), embed=nn.Linear(12, 6), head=nn.Linear(6, 3)
        )
    )


def _data(n: int = 90):
    x, y, _ = gaussian_mixture(n_samples=n, dim=8, n_classes=3, seed=1)
    return torch.from_numpy(x), torch.from_numpy(y)


def test_weighted_terms_add_up_and_warmup_switches_a_term_off():
    model = _mlp()
    x, y = _data()
    first = Shrink(layers=["act"], weight=0.5, warmup=1)
    second = Shrink(layers=["act", "embed", "output"], weight=2.0, power=1.0)
    with Regularisation(model, [first, second]) as regs:
        assert regs.keys == ["shrink", "shrink#2"] and regs.layers == ("act", "embed")
        for epoch in (0, 1):
            regs.start_epoch(epoch)
            logits = model(x)
            total = regs.loss(torch.arange(len(y)), y=y, logits=logits)
            with torch.no_grad():  # oracle: the layers computed by calling the submodules
                act = model.act(model.hidden(x))
                embed = model.embed(act)
                out = model.head(embed)
                t1 = act.pow(2).mean()
                t2 = (act.abs().mean() + embed.abs().mean() + out.abs().mean()) / 3
            expected = (0.5 * t1 if epoch >= 1 else 0.0) + 2.0 * t2
            assert float(total.detach()) == pytest.approx(float(expected), rel=1e-6)
            assert regs.terms["shrink#2"] == pytest.approx(float(t2), rel=1e-6)
            assert regs.terms["shrink"] == (pytest.approx(float(t1), rel=1e-6) if epoch else 0.0)
    assert Shrink.batches[-1]["logits"] == (90, 3) and Shrink.batches[-1]["epoch"] == 1


def test_a_refreshing_and_a_per_batch_regulariser_train_together():
    model = _mlp()
    x, y = _data(120)
    loader = DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=40, shuffle=True)
    shrink = Shrink(layers=["embed"], weight=0.1)
    lcc = LCC(layers=["act"], k=3, weight=0.5, warmup=0)
    regs = Regularisation(model, [lcc, shrink])
    optimizer = torch.optim.SGD([*model.parameters(), *regs.parameters()], lr=0.05)
    assert any(p is shrink.scale for p in regs.parameters())
    for epoch in range(2):
        stats = regs.start_epoch(epoch, loader)
        assert stats is not None and set(stats) == {"lcc"} and "act" in stats["lcc"]
        for xb, yb, index in loader:
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb) + regs.loss(index, y=yb, logits=logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert float(shrink.scale.detach()) < 1.0  # the optimiser trained the regulariser's parameter
    # exact resume: a new object restores parameters, buffers and LCC's refresh state
    state = regs.state_dict()
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other = Regularisation(
        model,
        [LCC(layers=["act"], k=3, weight=0.5, warmup=0), Shrink(layers=["embed"], weight=0.1)],
    )
    other.load_state_dict(saved)
    model(x)
    index = torch.arange(len(y))
    a = float(regs.loss(index, y=y).detach())
    b = float(other.loss(index, y=y).detach())
    assert a == b and int(other.regularisers[1].calls) == int(shrink.calls) > 0
    with pytest.raises(LCCInputError, match="resume with the same --reg"):
        Regularisation(model, [Shrink(layers=["embed"])]).load_state_dict(saved)


def test_bad_regulariser_lists():
    model = _mlp()
    with pytest.raises(LCCInputError, match="names no layers"):
        Regularisation(model, [Shrink()])
    with pytest.raises(LCCInputError, match="Regulariser objects"):
        Regularisation(model, ["lcc"])
    with pytest.raises(LCCInputError, match="has no layer 'emb'"):
        Regularisation(model, [Shrink(layers=["emb"])])
    regs = Regularisation(model, [Shrink()], default_layers=["embed"])
    assert regs.layers == ("embed",)


# --------------------------------------------------------------------------- lcc train


REPO = Path(__file__).resolve().parents[2]
TINY = ["--subset", "300", "--test-subset", "100", "--epochs", "2", "--batch-size", "50"]


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(REGISTRY, "shrink", f"{__name__}:Shrink")


def _latent_energy(out: Path) -> float:
    """Mean |act1|^2 of the trained model on digits (reloaded from the run's checkpoint)."""
    from lcc.zoo.datasets import load_dataset
    from lcc.zoo.models import build_model

    bundle = load_dataset("digits", subset=300, test_subset=100, seed=0)
    model = build_model("small-cnn", bundle.num_classes, input_shape=bundle.input_shape)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    model.load_state_dict(
        {k[6:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    )
    model.eval()
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    with torch.no_grad():
        seen = {}
        model.act1.register_forward_hook(lambda m, i, o: seen.setdefault("z", o))
        model(x)
    return float(seen["z"].pow(2).mean())


@pytest.mark.slow
def test_a_toy_regulariser_plugs_into_lcc_train(capsys, tmp_path, toy_registered):
    base = tmp_path / "base"
    toy = tmp_path / "toy"
    assert main(["train", "small-cnn", "digits", "--out", str(base), "--no-lcc", *TINY]) == 0
    argv = [
        "train",
        "small-cnn",
        "digits",
        "--out",
        str(toy),
        "--reg",
        "shrink:w=1,layers=act1",
        *TINY,
    ]
    assert main(argv) == 0
    capsys.readouterr()
    metrics = json.loads((toy / "metrics.json").read_text())
    assert metrics["regularisers"][0].startswith("shrink(")
    terms = [record["terms"]["shrink"] for record in metrics["history"]]
    assert len(terms) == 2 and terms[1] < terms[0]
    assert Shrink.batches[-1]["x"] and Shrink.batches[-1]["logits"] == (50, 10)
    assert _latent_energy(toy) < 0.5 * _latent_energy(base)
    # the option reaches the regulariser: p = 1 logs another term
    other = tmp_path / "p1"
    argv = [
        "train",
        "small-cnn",
        "digits",
        "--out",
        str(other),
        "--reg",
        "shrink:w=1,layers=act1,power=1",
        *TINY,
    ]
    assert main(argv) == 0
    assert (
        json.loads((other / "metrics.json").read_text())["history"][0]["terms"]["shrink"]
        != terms[0]
    )


def test_regulariser_options_on_the_command_line(capsys, tmp_path, toy_registered):
    assert main(["train", "--help-reg", "shrink"]) == 0
    text = capsys.readouterr().out
    assert "power" in text and "[default: 2.0]" in text
    assert main(["train", "--help-reg"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in REGISTRY)
    for argv, message in (
        (["--reg", "nope"], "unknown regulariser 'nope'"),
        (["--reg", "shrink:powr=2"], "unknown option 'powr' of shrink (did you mean 'power'?)"),
        (["--reg", "lcc", "--no-lcc"], "--no-lcc trains the baseline without regularisers"),
        (["--reg", "shrink:layers=fc9"], "model has no layer 'fc9'"),
    ):
        code = main(["train", "small-cnn", "digits", "--out", str(tmp_path / "r"), *argv, *TINY])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "r").exists()


def test_yaml_lists_regularisers(tmp_path, toy_registered):
    from lcc.train.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("regularisers:\n  - lcc:k=3\n  - {name: shrink, weight: 0.2, power: 1}\n")
    config = load_config(path)
    regs = config.build_regularisers(["act1"])
    assert [type(r).__name__ for r in regs] == ["LCC", "Shrink"]
    assert regs[0].config.k == 3 and regs[1].weight == 0.2 and regs[1].options.power == 1.0
    assert regs[0].weight == config.weight  # lcc takes the top-level LCC options as defaults
    assert np.isclose(regs[1].options.power, 1.0)


# --------------------------------------------------------------------------- two at once


def _command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lcc", "train", "small-cnn", "digits", "--out", str(out),
        "--subset", "1500", "--test-subset", "200", "--epochs", "4", "--batch-size", "8",
        "--reg", "lcc", "--reg", "label-variation:w=0.5,layers=act1,output,k=5",
        "--source", "recorded", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_lcc_and_label_variation_resume_exactly_after_sigkill(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    whole = subprocess.run(
        _command(tmp_path / "whole"), capture_output=True, text=True, env=env, timeout=300
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = json.loads(whole.stdout.strip().splitlines()[-1])
    history = json.loads((tmp_path / "whole" / "metrics.json").read_text())["history"]
    assert all(set(r["terms"]) == {"lcc", "label-variation"} for r in history)
    assert all(r["terms"]["label-variation"] > 0 for r in history)
    assert history[-1]["terms"]["lcc"] > 0 and expected["refreshes"] == 3

    out = tmp_path / "killed"
    process = subprocess.Popen(
        _command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    journal = out / "refreshes.jsonl"
    deadline = time.monotonic() + 240
    while not journal.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # inside epoch 1 (about 190 steps): resume redoes its refresh
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(
        _command(out, "--resume"), capture_output=True, text=True, env=env, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads(resumed.stdout.strip().splitlines()[-1])
    for key in ("test_top1", "test_top5", "test_loss", "train_loss"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    again = json.loads((out / "metrics.json").read_text())["history"]
    assert len(again) == len(history)
    for resumed_record, record in zip(again, history, strict=True):
        for key, value in record["terms"].items():
            assert resumed_record["terms"][key] == pytest.approx(value, abs=1e-6), key


def test_ce_weight_zero_trains_on_the_regularisers_alone():
    from lcc.regularisers.label_variation import LabelVariation
    from lcc.train.lightning import LCCModule

    x, y = _data(40)
    reg = LabelVariation(layers=["output"], weight=1.0, k=3)
    module = LCCModule(_mlp(), num_classes=3, n_train=40, regularisers=[reg], ce_weight=0.0)
    loss = module.training_step((x, y, torch.arange(40)), 0)
    logits = module.model(x)
    expected = reg(Batch(latents={}, y=y, indices=torch.arange(40), logits=logits))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    with_ce = LCCModule(_mlp(), num_classes=3, n_train=40, regularisers=[reg])
    loss = with_ce.training_step((x, y, torch.arange(40)), 0)
    ce = nn.functional.cross_entropy(logits, y)
    assert float(loss.detach()) == pytest.approx(float((ce + expected).detach()), rel=1e-6)


@pytest.mark.parametrize("source", ["fresh", "recorded"])
def test_latents_on_disk_give_the_same_refresh_as_in_memory(tmp_path, source):
    x, y = _data(150)
    loader = DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=50)
    losses = []
    for folder in (None, tmp_path / "latents"):
        model = _mlp()
        regs = Regularisation(
            model, [LCC(layers=["act"], k=3, warmup=1)], source=source, latents_dir=folder
        )
        for epoch in range(3):
            regs.start_epoch(epoch, loader)
            for xb, yb, index in loader:
                logits = model(xb)
                regs.observe(index, logits, yb)
        layer = regs.regularisers[0].state.layers["act"]
        losses.append((layer.clusters, layer.target_indices, layer.target_vectors))
        regs.close()
    for in_memory, on_disk_result in zip(*losses, strict=True):
        np.testing.assert_array_equal(in_memory, on_disk_result)
    name = "recorded-act.npy" if source == "recorded" else "act.npy"
    on_disk = np.load(tmp_path / "latents" / name, mmap_mode="r")
    assert on_disk.shape == (150, 12) and on_disk.dtype == np.float32
