"""Few labels: the split, mixed batches, CE on labelled samples only, k-means in lcc train."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from lcc.cli import main
from lcc.regularisers.kmeans import KMeansCentroids
from lcc.train.lightning import LCCModule
from lcc.zoo.labels import load_split

TINY = ["--subset", "400", "--test-subset", "100", "--epochs", "2", "--batch-size", "40"]


def _module(**kwargs) -> LCCModule:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(flat=nn.Flatten(), hidden=nn.Linear(6, 5), act=nn.ReLU(), head=nn.Linear(5, 3))
    )
    return LCCModule(model, num_classes=3, n_train=12, **kwargs)


def test_unlabelled_samples_never_reach_the_cross_entropy():
    x = torch.randn(8, 1, 2, 3, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, -1, -1, -1, -1])
    module = _module()
    loss = module.training_step((x, y, torch.arange(8)), 0)
    loss.backward()
    # oracle: the cross-entropy of the labelled rows alone, on an identical model
    other = _module()
    expected = nn.functional.cross_entropy(other.model(x[:4]), y[:4])
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    for a, b in zip(module.model.parameters(), other.model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_an_all_unlabelled_batch_trains_only_the_regulariser():
    reg = KMeansCentroids(layers=["act"], weight=1.0, warmup=0, ramp=0)
    module = _module(regularisers=[reg], sample=torch.randn(2, 1, 2, 3))
    x = torch.randn(4, 1, 2, 3)
    loss = module.training_step((x, torch.full((4,), -1), torch.arange(4)), 0)
    loss.backward()
    centroids = module.regularisation.regularisers[0].centroids[0]
    assert centroids.grad is not None and centroids.grad.abs().sum() > 0


@pytest.mark.slow
def test_kmeans_run_with_few_labels_writes_and_reuses_its_split(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "small-cnn", "digits", "--out", str(out), *TINY, "--labels-per-class", "6"]
    argv += ["--reg", "kmeans:layers=act1,w=0.5,warmup=0,ramp=0", "--reg", "lcc:k=3"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n_labeled"], metrics["n_unlabeled"]) == (60, 340)
    mask = load_split(out / "split.npz", n_samples=400)
    assert mask.sum() == 60
    stats = [record["regulariser_stats"]["kmeans"] for record in metrics["history"]]
    assert stats[0]["reinitialised"] >= 1
    assert all(record["terms"]["kmeans"] > 0 for record in metrics["history"])
    # LCC clustered the labelled samples only
    refresh = [json.loads(line) for line in (out / "refreshes.jsonl").read_text().splitlines()]
    assert refresh and all(r["labelled_samples"] == 60 for r in refresh)
    clusters = np.load(out / "refresh" / "epoch_2_act1.npz")["clusters"]
    assert (clusters[~mask] == -1).all() and (clusters[mask] >= 0).all()
    # more epochs on resume: the saved split is reused, even if the seed's split would differ
    before = (out / "split.npz").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 0
    assert (out / "split.npz").read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--labeled-fraction", "1.5"], "--labeled-fraction must be in (0, 1]"),
        (["--labeled-fraction", "0"], "--labeled-fraction must be in (0, 1]"),
        (["--labeled-fraction", "0.5", "--labels-per-class", "3"], "not both"),
        (["--labeled-ratio", "0"], "--labeled-ratio must be in (0, 1]"),
        (["--labeled-fraction", "0.01"], "class"),
    ],
)
def test_bad_label_options_give_one_line(capsys, tmp_path, argv, message):
    out = tmp_path / "r"
    code = main(["train", "small-cnn", "digits", "--out", str(out), *TINY, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
