"""Superclass datasets: labels, augmentation per dataset, and lcc measure on a superclass model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lcc.cli import main
from lcc.zoo.datasets import load_dataset
from lcc.zoo.hierarchy import basic_augmentation, hierarchical_latents, load_run_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_superclass_bundle_keeps_the_fine_labels():
    plain = load_dataset("digits", subset=150, seed=3)
    bundle = load_run_dataset("digits:super", subset=150, seed=3)
    assert (bundle.fine_targets == plain.targets).all()
    assert (np.asarray(bundle.targets) == (plain.targets >= 5)).all()
    assert (bundle.fine_test_targets == plain.test_targets).all()
    assert [bundle.train_plain[i][1] for i in range(5)] == (plain.targets[:5] >= 5).tolist()
    assert bundle.num_classes == 2 and bundle.classes == ["0-4", "5-9"]


def test_basic_augmentation_per_dataset():
    assert basic_augmentation("cifar100", 32) == (4, True)
    assert basic_augmentation("eurosat", 64) == (8, True)
    assert basic_augmentation("digits", 8) == (1, False)
    assert basic_augmentation("idx:/data", 28) == (4, False)


def test_lcc_measure_on_a_superclass_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "small-cnn", "digits:super", "--no-lcc", "--subset", "200", "--epochs",
                 "2", "--batch-size", "50", "--out", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    _, fine, sup, predictions = hierarchical_latents(
        "small-cnn", "digits:super", ["fc1"], subset=120, checkpoint=checkpoint
    )
    assert (sup == (fine >= 5)).all() and set(predictions.tolist()) <= {0, 1}
    saved = tmp_path / "z.npz"
    argv = ["measure", "--model", "small-cnn", "--dataset", "digits:super", "--checkpoint",
            checkpoint, "--layers", "fc1", "--measure", "c1,c3", "--top-k", "5", "--subset",
            "120", "--save-latents", str(saved)]  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["measure"], line.get("subclasses"), line.get("classes")) for line in lines] == [
        ("c1", 10, None), ("c3", None, 2)
    ]  # fmt: skip
    with np.load(saved) as data:
        assert (data["y"] == fine).all() and (data["y_super"] == sup).all()
    assert main([*argv[:4], "digits", *argv[5:-2]]) == 2  # c1 without superclasses: one line
    assert "has no superclass labels" in capsys.readouterr().err


def test_saved_refresh_latents_of_a_superclass_run_carry_the_fine_labels(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "small-cnn", "digits:super", "--subset", "200", "--epochs", "2",
                 "--batch-size", "50", "--save-latents", "--out", str(run)]) == 0  # fmt: skip
    capsys.readouterr()
    (saved,) = sorted((run / "refresh").glob("epoch_2_*.npz"))  # after the warmup epoch
    plain = load_dataset("digits", subset=200)
    with np.load(saved) as data:
        assert (data["y_fine"] == plain.targets).all() and (data["y"] == (plain.targets >= 5)).all()
    assert main(["measure", str(saved), "--measure", "c1,c3", "--top-k", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["measure"], line.get("subclasses"), line.get("classes")) for line in lines] == [
        ("c1", 10, None), ("c3", None, 2)
    ]  # fmt: skip
