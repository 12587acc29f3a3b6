"""lcc.analysis.evaluate on run directories: results against direct computations on the model."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Subset

from lcc.analysis.corruptions import corruption_errors, relative_corruption_errors
from lcc.analysis.evaluate import (
    EvalOptions,
    evaluate_runs,
    evaluation_columns,
    evaluation_table,
    load_evaluation,
    load_run_model,
)
from lcc.analysis.probes import probe_accuracies
from lcc.errors import LCCInputError
from lcc.zoo.datasets import IndexedDataset, load_dataset, stratified_subset
from lcc.zoo.latents import collect_latents
from lcc.zoo.models import build_model

pytest.importorskip("foolbox")


def make_run(
    folder: Path,
    *,
    dataset: str = "digits",
    seed: int = 0,
    steps: int = 40,
    subset: int | None = None,
    test_subset: int | None = None,
) -> Path:
    """A run directory as `lcc train` leaves it (config.yaml, Lightning-style last.ckpt) with a
    small-cnn trained for a few SGD steps."""
    bundle = load_dataset(dataset, subset=subset, test_subset=test_subset, seed=seed, augment=False)
    torch.manual_seed(seed)
    model = build_model("small-cnn", bundle.num_classes, input_shape=bundle.input_shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(bundle.train_plain, batch_size=64, shuffle=True)
    done = 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    (folder / "checkpoints").mkdir(parents=True)
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 0}, folder / "checkpoints" / "last.ckpt")
    config = {"model": "small-cnn", "dataset": dataset, "seed": seed, "out": str(folder)}
    config |= {"subset": subset, "test_subset": test_subset}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "a": make_run(root / "a", steps=40),
        "b": make_run(root / "b", seed=1, steps=8),
        "other": make_run(root / "other", test_subset=100),
    }


def direct_logits(run: Path, rows: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    loaded = load_run_model(run)
    test = loaded.bundle.test if rows is None else Subset(loaded.bundle.test, rows.tolist())
    outputs, labels = [], []
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=64):
            outputs.append(loaded.model(x))
            labels.append(y)
    return torch.cat(outputs), torch.cat(labels).numpy()


def test_clean_metrics_equal_a_direct_pass_and_land_in_evaluation_json(runs) -> None:
    (result,) = evaluate_runs([runs["a"]], EvalOptions(noise=(0.0, 0.8), fgsm=(0.0, 0.1)))
    logits, y = direct_logits(runs["a"])
    assert result["top1"] == pytest.approx(np.mean(logits.argmax(1).numpy() == y))
    assert result["nll"] == pytest.approx(float(F.cross_entropy(logits, torch.tensor(y))), 1e-5)
    assert result["n_test"] == len(y) == 359
    assert result["noise"]["0"] == result["top1"] == result["fgsm"]["0"]
    assert result["noise"]["0.8"] < result["top1"] and result["fgsm"]["0.1"] < result["top1"]
    saved = load_evaluation(runs["a"])
    assert saved == json.loads(json.dumps(result))
    for key in ("top1", "top5", "ece", "nll", "noise", "fgsm", "pgd", "corruption", "mce"):
        assert key in saved
    assert saved["mce"] is None and saved["probe"] == {} and saved["corruption"] == {}


def test_subset_and_seed_reach_the_evaluation(runs) -> None:
    options = EvalOptions(subset=100, seed=3, noise=(0.7,))
    (result,) = evaluate_runs([runs["a"]], options)
    labels = load_run_model(runs["a"]).bundle.test.labels.numpy()
    rows = stratified_subset(labels, 100, 3)
    logits, y = direct_logits(runs["a"], rows)
    assert result["n_test"] == 100
    assert result["top1"] == pytest.approx(np.mean(logits.argmax(1).numpy() == y))
    (again,) = evaluate_runs([runs["a"]], options)
    assert again["noise"] == result["noise"]
    noisier = [evaluate_runs([runs["a"]], EvalOptions(subset=100, seed=s, noise=(0.7,)))[0]
               for s in (4, 5)]  # fmt: skip
    assert {r["noise"]["0.7"] for r in [result, *noisier]} != {result["noise"]["0.7"]}


def test_corruption_errors_against_the_baseline_by_hand(runs, tmp_path) -> None:
    options = EvalOptions(
        corruptions="contrast,gaussian_noise", severities=(1, 4), cache_dir=str(tmp_path)
    )
    results = evaluate_runs([runs["a"], runs["b"]], options, baseline=runs["a"])
    base, other = results
    assert set(base["corruption"]) == {"contrast", "gaussian_noise"}
    assert set(base["corruption"]["contrast"]) == {"1", "4"}
    assert base["mce"] == pytest.approx(1.0) and base["relative_mce"] == pytest.approx(1.0)

    def errors(result):
        return {name: [1 - result["corruption"][name][s] for s in ("1", "4")]
                for name in ("contrast", "gaussian_noise")}  # fmt: skip

    ce = corruption_errors(errors(other), errors(base))
    assert other["corruption_error"] == pytest.approx(ce)
    assert other["mce"] == pytest.approx(np.mean(list(ce.values())))
    relative = relative_corruption_errors(
        errors(other), 1 - other["top1"], errors(base), 1 - base["top1"]
    )
    assert other["relative_mce"] == pytest.approx(np.mean(list(relative.values())))
    assert len(list(tmp_path.rglob("*.npz"))) == 4  # shared by both runs: cached once


def test_probe_equals_probe_accuracies_on_directly_collected_features(runs) -> None:
    (result,) = evaluate_runs([runs["a"]], EvalOptions(probe=("act1",), probe_train=600, probe_k=5))
    loaded = load_run_model(runs["a"])
    rows = stratified_subset(np.asarray(loaded.bundle.targets), 600, 0)
    train = Subset(loaded.bundle.train_plain, rows.tolist())
    z_train, y_train, _ = collect_latents(loaded.model, DataLoader(IndexedDataset(train)), "act1")
    z_test, y_test, _ = collect_latents(
        loaded.model, DataLoader(IndexedDataset(loaded.bundle.test)), "act1"
    )
    expected = probe_accuracies(z_train["act1"], y_train, z_test["act1"], y_test, k=5)
    assert result["probe"]["act1"] == pytest.approx(expected)


def test_table_has_one_row_per_run_and_the_raw_values_in_csv(runs) -> None:
    results = [
        {"run": "x/a", "top1": 0.5, "noise": {"0.5": 0.25}, "mce": 0.9},
        {"run": "x/b", "top1": 0.75, "fgsm": {"0.1": 0.125}},
    ]
    markdown, table = evaluation_table(results)
    lines = markdown.splitlines()
    assert lines[0] == "| run | top1 (%) | noise 0.5 (%) | mce | fgsm 0.1 (%) |"
    assert lines[2] == "| a | 50.00 | 25.00 | 90.0 | - |"
    rows = list(csv.DictReader(io.StringIO(table)))
    assert rows[1] == {"run": "b", "top1": "0.75", "noise 0.5": "", "mce": "", "fgsm 0.1": "0.125"}
    assert evaluation_columns({"corruption": {"fog": {"1": 0.5, "2": 0.25}}}) == {
        "corruption top1": 0.375
    }


def test_bad_input_names_the_fix(runs, tmp_path) -> None:
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((runs["a"] / "config.yaml").read_text())
    with pytest.raises(LCCInputError, match=r"has no checkpoint.*--resume"):
        evaluate_runs([empty], EvalOptions())
    with pytest.raises(LCCInputError, match=r"has no layer 'act9' \(closest: act1"):
        evaluate_runs([runs["a"]], EvalOptions(probe=("act9",)))
    with pytest.raises(LCCInputError, match="other images"):
        evaluate_runs([runs["other"]], EvalOptions(corruptions="fog"), baseline=runs["a"])
    with pytest.raises(LCCInputError, match="add --corruptions"):
        evaluate_runs([runs["b"]], EvalOptions(), baseline=runs["a"])
    with pytest.raises(LCCInputError, match="eps must lie in"):
        EvalOptions(fgsm=(-0.1,)).check()


def test_report_shows_the_evaluation_table_and_robustness_curves(runs, tmp_path) -> None:
    from lcc.analysis.plots import robustness_curves
    from lcc.analysis.report import write_report

    (result,) = evaluate_runs(
        [runs["b"]], EvalOptions(noise=(0.5, 1.0), fgsm=(0.1,), subset=50, seed=1)
    )
    curves = robustness_curves(result)
    assert curves["noise"] == [
        (0.0, result["top1"]), (0.5, result["noise"]["0.5"]), (1.0, result["noise"]["1"])
    ]  # fmt: skip
    assert set(curves) == {"noise", "fgsm"}
    (runs["b"] / "metrics.json").write_text(json.dumps({"test_top1": 0.5, "history": []}))
    report = write_report([runs["b"]], tmp_path / "report")
    text = report.markdown.read_text()
    assert "## Robustness and calibration (lcc evaluate)" in text
    assert f"| b | {100 * result['top1']:.2f} |" in text
    assert (tmp_path / "report" / "robustness.png").is_file()
    (runs["b"] / "evaluation.json").unlink()
    plain = write_report([runs["b"]], tmp_path / "plain").markdown.read_text()
    assert "Robustness" not in plain and not (tmp_path / "plain" / "robustness.png").exists()


@pytest.mark.parametrize("layer", ["output", "act1"])
def test_read_with_measures_every_accuracy_through_the_linear_probe(runs, layer) -> None:
    options = EvalOptions(probe=(layer,), probe_train=500, subset=120, fgsm=(0.0,), noise=(0.0,))
    (plain,) = evaluate_runs([runs["b"]], options)
    (read,) = evaluate_runs([runs["b"]], replace(options, read_with=layer))
    assert read["read_with"] == f"linear probe on {layer}" and plain["read_with"] is None
    assert read["top1"] == pytest.approx(plain["probe"][layer]["linear"], abs=1.5 / 120)
    assert read["fgsm"]["0"] == read["top1"] == read["noise"]["0"]
    assert read["top1"] != plain["top1"]  # runs["b"] is barely trained: its logits read worse


def test_sweep_evaluate_block_parses_and_rejects_bad_keys() -> None:
    from lcc.analysis.evaluate import sweep_options
    from lcc.train.sweep import parse_sweep

    sweep = parse_sweep({
        "base": {"model": "small-cnn", "dataset": "digits"}, "grid": {"seed": [0, 1]},
        "baseline": True, "evaluate": {"fgsm": [0.1], "corruptions": "fog", "baseline": True},
    })  # fmt: skip
    assert sweep.evaluate == {"fgsm": [0.1], "corruptions": "fog", "baseline": True}
    options, baseline = sweep_options(sweep.evaluate)
    assert options.fgsm == (0.1,) and options.corruptions == "fog" and baseline
    with pytest.raises(LCCInputError, match=r"evaluate\.fgsn is not an lcc evaluate option"):
        sweep_options({"fgsn": 0.1})
    with pytest.raises(LCCInputError, match="add corruptions"):
        sweep_options({"baseline": True})
    with pytest.raises(LCCInputError, match="needs the sweep's baseline"):
        parse_sweep({
            "base": {"model": "small-cnn", "dataset": "digits"}, "grid": {"seed": [0]},
            "evaluate": {"corruptions": "fog", "baseline": True},
        })  # fmt: skip


@pytest.mark.slow
def test_evaluate_sweep_tables_the_mean_and_spread_over_seeds(tmp_path) -> None:
    from types import SimpleNamespace

    from lcc.analysis.evaluate import evaluate_sweep

    runs = []
    for seed in (0, 1):
        for kind, steps in (("baseline", 3), ("grid", 20)):
            name = f"{kind}_seed={seed}"
            folder = make_run(tmp_path / name, seed=seed, steps=steps)
            (folder / "metrics.json").write_text("{}")
            setting = () if kind == "baseline" else (("weight", 0.1),)
            config = SimpleNamespace(out=str(folder))
            runs.append(SimpleNamespace(name=name, kind=kind, seed=seed, setting=setting,
                                        config=config))  # fmt: skip
    spec = {"noise": "0.5", "subset": 40, "corruptions": "contrast", "severities": [3],
            "baseline": True, "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    _, table, text = evaluate_sweep(runs, spec, tmp_path)
    lines = text.splitlines()
    assert lines[0].startswith("| setting | runs | top1 (%) |") and "relative_mce" in lines[0]
    assert lines[2].startswith("| baseline | 2 |") and lines[3].startswith("| weight=0.1 | 2 |")
    grid = [
        json.loads((tmp_path / f"grid_seed={s}" / "evaluation.json").read_text()) for s in (0, 1)
    ]
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    noise = [g["noise"]["0.5"] for g in grid]
    assert float(rows[1]["noise 0.5 mean"]) == pytest.approx(np.mean(noise))
    assert float(rows[1]["noise 0.5 std"]) == pytest.approx(np.std(noise, ddof=1))
    assert float(rows[0]["relative_mce mean"]) == pytest.approx(1.0)
    stamp = (tmp_path / "grid_seed=0" / "evaluation.json").stat().st_mtime_ns
    spec_without_baseline = {**spec, "baseline": False}
    evaluate_sweep(runs, spec_without_baseline, tmp_path)  # other options: evaluated again
    changed = (tmp_path / "grid_seed=0" / "evaluation.json").stat().st_mtime_ns
    evaluate_sweep(runs, spec_without_baseline, tmp_path)  # same options: reused
    assert changed != stamp
    assert (tmp_path / "grid_seed=0" / "evaluation.json").stat().st_mtime_ns == changed


def test_probe_pool_reaches_the_features(runs) -> None:
    options = EvalOptions(probe=("features.block2",), probe_train=400, probe_pool="avg")
    (result,) = evaluate_runs([runs["a"]], options)
    loaded = load_run_model(runs["a"])
    rows = stratified_subset(np.asarray(loaded.bundle.targets), 400, 0)
    train = Subset(loaded.bundle.train_plain, rows.tolist())

    def pooled(dataset):
        z, y, _ = collect_latents(
            loaded.model, DataLoader(IndexedDataset(dataset)), "features.block2", pool="avg"
        )
        return z["features.block2"], y

    (z_train, y_train), (z_test, y_test) = pooled(train), pooled(loaded.bundle.test)
    assert z_train.shape[1] == 32  # channels, not the flattened map
    expected = probe_accuracies(z_train, y_train, z_test, y_test)
    assert result["probe"]["features.block2"] == pytest.approx(expected)
