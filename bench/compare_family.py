"""Compare the regularisers of the family on real data available offline (accuracy, not speed).

MNIST-pretrained models fine-tuned on Fashion-MNIST (stratified subsets), several seeds; prints
a markdown table of test top-1 / top-5 (mean and spread over seeds) and writes it to
``OUT/STUDY.md`` and ``OUT/STUDY.json``. Finished runs in ``OUT`` are reused.

Studies:

* ``lgg`` (issue 7): small-resnet baseline vs LCC (layer ``pool``) vs label-variation
  smoothness over ``layer1, layer2, layer3, pool``; and graph knowledge distillation from the
  fine-tuned small-resnet baseline (teacher, layer ``pool``) into small-cnn (student, layer
  ``act1``) vs the small-cnn baseline. Every model is also tested under Gaussian input noise
  (standard deviations in units of the normalised pixels: the paper's robustness claim for
  smoothness).
* ``kmeans`` (issue 8): small-cnn with only ``--labels`` labelled samples per class: supervised
  only (the unlabelled rest unused by any loss) vs + the k-means centroid loss on the unlabelled
  rest vs + k-means + LCC.

Usage::

    python bench/compare_family.py lgg --seeds 0 1 2 --out runs/compare
    python bench/compare_family.py kmeans --labels 8 32 128 --seeds 0 1 2 --out runs/compare
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lcc.cli.demo import _pretrain_data
from lcc.io import atomic_write, write_json_atomic
from lcc.train.config import TrainConfig
from lcc.train.run import train
from lcc.zoo.datasets import load_dataset
from lcc.zoo.models import build_model

NOISE = (0.0, 0.5, 1.0)
PRETRAIN = {"pretrain_subset": 10_000, "pretrain_epochs": 2}


def _say(text: str) -> None:
    print(f"compare: {text}", file=sys.stderr, flush=True)


def pretrain(model: str, root: Path) -> Path:
    """The model trained on 10,000 MNIST samples for 2 epochs (seed 0); its checkpoint."""
    name, data = _pretrain_data(PRETRAIN, 0)
    out = root / f"pretrain-{model}"
    config = TrainConfig(
        model=model, dataset=name, out=str(out), epochs=2, lr=0.05, no_lcc=True, resume=True
    )
    train(config.check(), bundle=data, report=False)
    return out / "checkpoints" / "last.ckpt"


def noisy_accuracy(run: Path, model_name: str, data: Any, sigma: float, seed: int) -> float:
    """Top-1 of the run's final model on the test set with N(0, sigma^2) added to the inputs."""
    model = build_model(model_name, data.num_classes, input_shape=data.input_shape)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    weights = {k[6:]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    with torch.no_grad():
        for start in range(0, len(data.test), 500):
            rows = range(start, min(start + 500, len(data.test)))
            x = torch.stack([data.test[i][0] for i in rows])
            y = torch.tensor([int(data.test[i][1]) for i in rows])
            x = x + sigma * torch.randn(x.shape, generator=generator)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(rows)
    return correct / total


def run_one(root: Path, name: str, options: dict[str, Any], data: Any) -> dict[str, Any]:
    out = root / name
    _say(f"{name}")
    config = TrainConfig(**options, out=str(out), resume=True).check()
    metrics = train(config, bundle=data, report=False)
    result = {
        "top1": metrics["test_top1"],
        "top5": metrics["test_top5"],
        "epoch_seconds": metrics["mean_epoch_seconds"],
    }
    for sigma in NOISE[1:]:
        result[f"top1_noise_{sigma}"] = noisy_accuracy(out, options["model"], data, sigma, 0)
    return result


def lgg_settings(root: Path, seed: int, teacher_runs: dict[int, Path]) -> dict[str, dict]:
    resnet = pretrain("small-resnet", root)
    cnn = pretrain("small-cnn", root)
    base = {"dataset": "fashion-mnist", "epochs": 4, "lr": 0.05, "seed": seed}
    base |= {"subset": 10_000, "test_subset": 2_000}
    r = {**base, "model": "small-resnet", "checkpoint": str(resnet), "layers": ["pool"]}
    c = {**base, "model": "small-cnn", "checkpoint": str(cnn), "layers": ["act1"]}
    teacher = teacher_runs[seed] / "checkpoints" / "last.ckpt"
    return {
        "small-resnet baseline": {**r, "no_lcc": True},
        "small-resnet + LCC": {**r},
        "small-resnet + LV smoothness": {
            **r,
            "regularisers": ["smoothness:layers=layer1,layer2,layer3,pool"],
        },
        "small-cnn baseline": {**c, "no_lcc": True},
        "small-cnn + GKD from small-resnet": {
            **c,
            "regularisers": [
                f"gkd:teacher=small-resnet,teacher_checkpoint={teacher},teacher_layers=pool"
            ],
        },
    }


def kmeans_settings(root: Path, seed: int, labels: int) -> dict[str, dict]:
    cnn = pretrain("small-cnn", root)
    base = {"dataset": "fashion-mnist", "epochs": 4, "lr": 0.05, "seed": seed}
    base |= {"subset": 10_000, "test_subset": 2_000, "labels_per_class": labels}
    c = {**base, "model": "small-cnn", "checkpoint": str(cnn), "layers": ["act1"]}
    kmeans = "kmeans:layers=act1,w=0.01,warmup=1,ramp=1"
    return {
        f"{labels}/class supervised only": {**c, "no_lcc": True},
        f"{labels}/class + k-means": {**c, "regularisers": [kmeans]},
        f"{labels}/class + k-means + LCC": {**c, "regularisers": [kmeans, "lcc"]},
    }


def summarise(results: dict[str, list[dict[str, float]]]) -> str:
    keys = ["top1", "top5", *[f"top1_noise_{s}" for s in NOISE[1:]]]
    head = ["setting", "seeds", *[k.replace("top1_noise_", "top-1, noise σ=") for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        cells = [name, str(len(runs))]
        for key in keys:
            values = [100 * run[key] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=("lgg", "kmeans"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    data = load_dataset("fashion-mnist", subset=10_000, test_subset=2_000, seed=0)
    results: dict[str, list[dict[str, float]]] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        # the subsets are drawn with the run's seed: reload per seed
        data = load_dataset("fashion-mnist", subset=10_000, test_subset=2_000, seed=seed)
        if args.study == "lgg":
            resnet = pretrain("small-resnet", root)
            base = {"dataset": "fashion-mnist", "epochs": 4, "lr": 0.05, "seed": seed}
            base |= {"subset": 10_000, "test_subset": 2_000}
            teacher = {**base, "model": "small-resnet", "checkpoint": str(resnet)}
            teacher |= {"layers": ["pool"], "no_lcc": True}
            name = f"seed{seed}-small-resnet-baseline"
            results.setdefault("small-resnet baseline", []).append(
                run_one(root, name, teacher, data)
            )
            settings = lgg_settings(root, seed, {seed: root / name})
            settings.pop("small-resnet baseline")
        else:
            settings = {}
            for labels in args.labels:
                settings |= kmeans_settings(root, seed, labels)
        for setting, options in settings.items():
            slug = setting.replace(" ", "-").replace("/", "-").replace("+", "plus")
            results.setdefault(setting, []).append(
                run_one(root, f"seed{seed}-{slug}", options, data)
            )
    table = summarise(results)
    print(table)
    _say(f"{time.perf_counter() - start:.0f} s")
    text = (table + "\n").encode("utf-8")
    atomic_write(root / f"{args.study}.md", lambda handle: handle.write(text))
    write_json_atomic(root / f"{args.study}.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
