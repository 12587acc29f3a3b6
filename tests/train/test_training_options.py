"""Each training option of the intraclass study reaches the run: parsed by the real ``lcc train``
parser, resolved into the run config and built by :func:`lcc.train.build.build` (or trained for
a few steps); every test fails when its option is dropped anywhere on the way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lcc.cli import build_parser
from lcc.errors import LCCInputError
from lcc.train.build import build
from lcc.train.config import TrainConfig, field_names, merge_config
from lcc.train.run import resolve_config, train
from lcc.train.rundir import resume_differences, save_config
from lcc.train.sweep import parse_sweep, plan_runs
from lcc.train.training_options import make_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path, *argv: str, dataset: str = "digits"):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    args = sub.parse_args(["small-cnn", dataset, "--out", str(tmp_path / "run"), "--no-lcc",
                           "--subset", "200", *argv])  # fmt: skip
    options = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    return resolve_config(options)


def _built(tmp_path, *argv: str, dataset: str = "digits"):
    config = _config(tmp_path, *argv, dataset=dataset)
    (tmp_path / "run").mkdir(exist_ok=True)
    module, _, _, bundle = build(config, None, tmp_path / "run", 0, False)
    return module, bundle


def test_optimizer_reaches_the_module_and_changes_the_step(tmp_path):
    kinds = {}
    for name in ("sgd", "adam", "adamw"):
        module, _ = _built(tmp_path, "--optimizer", name, "--lr", "0.01", "--adam-lr-scale", "0.5")
        optimizer = module.configure_optimizers()["optimizer"]
        kinds[name] = (type(optimizer).__name__, optimizer.param_groups[0]["lr"])
    assert kinds == {"sgd": ("SGD", 0.01), "adam": ("Adam", 0.005), "adamw": ("AdamW", 0.005)}
    # one step from the same weights and gradient: Adam and SGD land elsewhere
    weights = {}
    for name in ("sgd", "adam"):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = make_optimizer([{"params": [p]}], name, lr=0.1, momentum=0.9, weight_decay=0.0)
        (p * torch.tensor([0.01, 3.0])).sum().backward()
        opt.step()
        weights[name] = p.detach().clone()
    assert weights["sgd"].tolist() == pytest.approx([0.999, -2.3])
    assert weights["adam"].tolist() == pytest.approx([0.9, -2.1])  # Adam: lr * sign at step 1


class _LastLearningRate(Callback):
    def on_train_end(self, trainer, pl_module):
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.epochs = len(pl_module.history)


@pytest.mark.parametrize(
    ("schedule", "factor"), [("constant", 1.0), ("step", 0.2**3), ("cosine", 0.0)]
)
def test_schedule_sets_the_learning_rate_at_the_end(tmp_path, schedule, factor):
    config = _config(tmp_path, "--schedule", schedule, "--epochs", "2", "--batch-size", "50",
                     "--subset", "100", "--test-subset", "20")  # fmt: skip
    probe = _LastLearningRate()
    train(config, report=False, callbacks=[probe])
    assert probe.lr == pytest.approx(0.1 * factor, abs=1e-12)


def test_stop_at_train_loss_ends_the_run_early(tmp_path):
    config = _config(tmp_path, "--stop-at-train-loss", "50", "--epochs", "3", "--batch-size",
                     "50", "--subset", "100", "--test-subset", "20")  # fmt: skip
    probe = _LastLearningRate()
    metrics = train(config, report=False, callbacks=[probe])
    assert probe.epochs == 1 and len(metrics["history"]) == 1


def test_dropout_changes_train_mode_outputs_only(tmp_path):
    module, _ = _built(tmp_path, "--dropout", "0.5")
    model = module.model
    x = torch.randn(4, 1, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert names == ["features.block1.drop", "features.block2.drop", "drop"]
    plain, _ = _built(tmp_path)
    plain.model.train()
    assert torch.equal(plain.model(x), plain.model(x))


def test_width_and_depth_shape_the_built_in_models(tmp_path):
    module, _ = _built(tmp_path, "--width", "1.5", "--depth", "3")
    model = module.model
    assert [name for name, _ in model.features.named_children()] == ["block1", "block2", "block3"]
    assert model.features.block1.conv.out_channels == 24 and model.fc1.out_features == 192
    spec = _config(tmp_path, "--depth", "3")
    assert spec.depth == 3
    from lcc.zoo.models import build_model

    wide = build_model("small-cnn:width=2,depth=3", 10, input_shape=(1, 8, 8))
    assert wide.fc1.out_features == 256
    with pytest.raises(LCCInputError, match="keep one of them"):
        build_model("small-cnn:width=3", 10, input_shape=(1, 8, 8), width=2.0)


def test_depth_zero_makes_small_cnn_an_mlp_without_batchnorm(tmp_path):
    from torch import nn

    from lcc.zoo.models import build_model

    module, _ = _built(tmp_path, "--depth", "0")
    model = module.model
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())
    assert model.fc1.in_features == 64  # the flattened 8 x 8 digit
    assert build_model("small-cnn:depth=0", 10, input_shape=(1, 8, 8)).fc1.in_features == 64
    with pytest.raises(LCCInputError, match="small-resnet needs depth >= 1"):
        build_model("small-resnet", 10, input_shape=(1, 8, 8), depth=0)
    with pytest.raises(LCCInputError, match="--depth must be >= 0"):
        _config(tmp_path, "--depth", "-1")


def test_augment_basic_none_and_default(tmp_path):
    _, basic = _built(tmp_path, "--augment", "basic", dataset="fashion-mnist")
    assert (basic.train.padding, basic.train.flip) == (4, True)
    torch.manual_seed(0)
    first = basic.train[0][0]
    assert any(not torch.equal(first, basic.train[0][0]) for _ in range(5))
    _, none = _built(tmp_path, "--augment", "none", dataset="fashion-mnist")
    assert torch.equal(none.train[0][0], none.train[0][0]) and none.train.padding == 0
    _, default = _built(tmp_path, dataset="fashion-mnist")
    assert default.train.padding == 0  # grayscale: the dataset's usual (none)


def test_superclass_run_trains_on_the_superclasses(tmp_path):
    module, bundle = _built(tmp_path, dataset="fashion-mnist:super")
    assert module.model.head.out_features == 3 and bundle.num_classes == 3
    assert sorted(set(np.asarray(bundle.targets).tolist())) == [0, 1, 2]
    assert len(set(bundle.fine_targets.tolist())) == 10
    mapping = tmp_path / "map.yaml"
    mapping.write_text("".join(f"{c}: {c % 2}\n" for c in range(10)))
    module, bundle = _built(tmp_path, "--superclasses", str(mapping))
    assert module.model.head.out_features == 2
    assert (np.asarray(bundle.targets) == bundle.fine_targets % 2).all()


def test_options_in_config_yaml_grids_and_resume(tmp_path):
    config = _config(tmp_path, "--optimizer", "adam", "--schedule", "step", "--dropout", "0.2",
                     "--augment", "basic", "--width", "2", "--depth", "3",
                     "--stop-at-train-loss", "1e-4")  # fmt: skip
    path = save_config(config, tmp_path / "config.yaml")
    again = merge_config(TrainConfig(), __import__("yaml").safe_load(path.read_text()))
    for name in ("optimizer", "schedule", "dropout", "augment", "width", "depth"):
        assert getattr(again, name) == getattr(config, name)
    assert again.stop_at_train_loss == 1e-4
    changed = merge_config(again, {"optimizer": "sgd", "dropout": 0.0})
    assert resume_differences(again, changed) == [
        "optimizer: run has adam, requested sgd", "dropout: run has 0.2, requested 0.0"
    ]  # fmt: skip
    grid = {"optimizer": ["sgd", "adam"], "dropout": [0.0, 0.3]}
    sweep = parse_sweep({"base": {"model": "small-cnn", "dataset": "digits"}, "grid": grid})
    runs = plan_runs(sweep, tmp_path / "sweep")
    assert {(r.config.optimizer, r.config.dropout) for r in runs} == {
        ("sgd", 0.0), ("sgd", 0.3), ("adam", 0.0), ("adam", 0.3)
    }  # fmt: skip
    with pytest.raises(LCCInputError, match="--dropout must be in"):
        merge_config(TrainConfig(), {"dropout": 1.5}).check(require_run=False)


def test_track_measures_writes_measures_jsonl_per_tracked_epoch(tmp_path):
    import json

    config = _config(tmp_path, "--track-measures", "c1,c3,label-variation", "--track-every", "2",
                     "--track-samples", "60", "--epochs", "3", "--batch-size", "50", "--subset",
                     "100", "--test-subset", "20", dataset="digits:super")  # fmt: skip
    train(config, report=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "measures.jsonl").read_text().splitlines()]
    assert sorted({line["epoch"] for line in lines}) == [2, 3]  # every 2nd epoch and the last
    assert {line["measure"] for line in lines} == {"c1", "c3", "label-variation"}
    assert {line["n"] for line in lines} == {60}
    assert sorted(p.name for p in (tmp_path / "run" / "tracking").iterdir()) == [
        "epoch=2.npz", "epoch=3.npz"
    ]  # fmt: skip
    from lcc.cli import main

    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "(and measures.jsonl)](run-layers.png)" in markdown  # one line per tracked epoch
    with pytest.raises(LCCInputError, match="need fine labels"):
        bad = _config(tmp_path, "--track-measures", "c1", "--out", str(tmp_path / "r2"))
        train(bad, report=False)


def test_sweep_checks_layers_on_the_runs_depth_and_superclasses(tmp_path):
    from lcc.train.sweep import check_layers

    base = {"model": "small-cnn", "dataset": "digits:super", "subset": 100,
            "layers": ["features.block3.conv"]}  # fmt: skip
    runs = plan_runs(parse_sweep({"base": base, "grid": {"depth": [3, 4]}}), tmp_path / "s")
    check_layers(runs)  # block3 exists at depth 3 and 4, on the superclass dataset
    shallow = plan_runs(parse_sweep({"base": base, "grid": {"depth": [2, 3]}}), tmp_path / "t")
    with pytest.raises(LCCInputError, match=r"run depth=2_seed=0: .*features\.block3\.conv"):
        check_layers(shallow)
