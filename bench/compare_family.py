"""Compare the regularisers of the family on real data available offline (accuracy, robustness).

MNIST-pretrained models fine-tuned on Fashion-MNIST (stratified subsets), several seeds; every
number after training comes from ``lcc evaluate`` (run as a command on the runs of each seed;
its ``evaluation.json`` files are read back). Prints a markdown table per study (mean ± sample
standard deviation over seeds) and writes it to ``OUT/STUDY.md`` and ``OUT/STUDY.json``.
Finished runs in ``OUT`` are reused.

Studies:

* ``lgg`` (issue 7): small-resnet baseline vs LCC (layer ``pool``) vs label-variation
  smoothness over ``layer1, layer2, layer3, pool``; and graph knowledge distillation from the
  fine-tuned small-resnet baseline into small-cnn vs the small-cnn baseline; top-1 under
  Gaussian input noise (``lcc evaluate --noise``, normalised-input units).
* ``kmeans`` (issue 8): small-cnn with only ``--labels`` labelled samples per class: supervised
  only vs + the k-means centroid loss on the unlabelled rest vs + k-means + LCC.
* ``kd`` (LGG paper Table 1, issue 19): a small-cnn student (10,000 samples, 4 epochs) without
  distillation, with RKD-D and with GKD from a stronger teacher (small-cnn fine-tuned on all
  60,000 samples for 5 epochs, seed 0), both on ``act1`` -> ``act1``, weight 1; clean error.
* ``objective`` (LGG paper Table 2): small-cnn trained with cross-entropy vs with label
  variation of its output as the only loss (``--ce-weight 0``); both read through the linear
  probe of their output (``lcc evaluate --read-with output``): clean error and relative mCE
  (15 corruptions x 5 severities, the cross-entropy run of the same seed as the baseline).
* ``robustness`` (LGG paper Table 3): small-cnn baseline vs label-variation smoothness over
  ``features.block1, features.block2, act1`` (gamma 0.1; with the package's default graph and
  with the degree-normalised graph of the paper's experiments) vs Parseval (penalty, weight
  0.001): clean, FGSM (eps 0.1) and PGD (eps 0.1, 10 steps of 0.025) error and relative mCE.

The evaluations use a seeded stratified subset of ``--eval-subset`` test images (the same
images for every run), corrupted test sets cached in ``OUT/corruptions``.

Usage::

    python bench/compare_family.py lgg --seeds 0 1 2 --out runs/compare
    python bench/compare_family.py kmeans --labels 8 32 128 --seeds 0 1 2 --out runs/compare
    python bench/compare_family.py kd --seeds 0 1 2 --out runs/compare
    python bench/compare_family.py objective --seeds 0 1 2 --out runs/compare
    python bench/compare_family.py robustness --seeds 0 1 2 --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lcc.cli.demo import _pretrain_data
from lcc.io import atomic_write, write_json_atomic
from lcc.train.config import TrainConfig
from lcc.train.run import train
from lcc.zoo.datasets import load_dataset

PRETRAIN = {"pretrain_subset": 10_000, "pretrain_epochs": 2}
STUDIES = ("lgg", "kmeans", "kd", "objective", "robustness")
SUBSET = 10_000


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


def run_one(root: Path, name: str, options: dict[str, Any], data: Any) -> Path:
    """Train (or reuse) one run; its directory."""
    out = root / name
    _say(name)
    train(TrainConfig(**options, out=str(out), resume=True).check(), bundle=data, report=False)
    return out


def evaluate(
    runs: Sequence[Path], options: Sequence[str], baseline: Path | None = None
) -> list[dict[str, Any]]:
    """``lcc evaluate RUNS OPTIONS [--baseline B]`` as a command; the runs' evaluation.json."""
    command = [sys.executable, "-m", "lcc", "evaluate", *map(str, runs), *options]
    if baseline is not None:
        command += ["--baseline", str(baseline)]
    _say(" ".join(command[3:]))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return [json.loads((run / "evaluation.json").read_text()) for run in runs]


def _study_base(
    seed: int, checkpoint: Path, args: argparse.Namespace, *, test_subset: int | None = None
) -> dict:
    base = {"dataset": "fashion-mnist", "epochs": args.epochs, "lr": 0.05, "seed": seed}
    base |= {"subset": args.train_subset, "test_subset": test_subset, "model": "small-cnn"}
    return base | {"checkpoint": str(checkpoint)}


def lgg_study(root: Path, seed: int, data: Any, args: argparse.Namespace) -> dict[str, dict]:
    resnet, cnn = pretrain("small-resnet", root), pretrain("small-cnn", root)
    base = {"dataset": "fashion-mnist", "epochs": args.epochs, "lr": 0.05, "seed": seed}
    base |= {"subset": args.train_subset, "test_subset": 2_000}
    r = {**base, "model": "small-resnet", "checkpoint": str(resnet), "layers": ["pool"]}
    c = {**base, "model": "small-cnn", "checkpoint": str(cnn), "layers": ["act1"]}
    teacher = run_one(root, f"seed{seed}-small-resnet-baseline", {**r, "no_lcc": True}, data)
    gkd = f"gkd:teacher=small-resnet,teacher_checkpoint={teacher}/checkpoints/last.ckpt"
    settings = {
        "small-resnet + LCC": {**r},
        "small-resnet + LV smoothness": {
            **r,
            "regularisers": ["smoothness:layers=layer1,layer2,layer3,pool"],
        },
        "small-cnn baseline": {**c, "no_lcc": True},
        "small-cnn + GKD from small-resnet": {**c, "regularisers": [f"{gkd},teacher_layers=pool"]},
    }
    runs = {"small-resnet baseline": teacher}
    runs |= {
        name: run_one(root, f"seed{seed}-{_slug(name)}", o, data) for name, o in settings.items()
    }
    results = evaluate(list(runs.values()), ["--noise", "0.5,1.0", "--seed", "0"])
    return dict(zip(runs, results, strict=True))


def kmeans_study(root: Path, seed: int, data: Any, args: argparse.Namespace) -> dict[str, dict]:
    cnn = pretrain("small-cnn", root)
    kmeans = "kmeans:layers=act1,w=0.01,warmup=1,ramp=1"
    runs = {}
    for labels in args.labels:
        c = _study_base(seed, cnn, args, test_subset=2_000) | {"labels_per_class": labels}
        settings = {
            f"{labels}/class supervised only": {**c, "no_lcc": True},
            f"{labels}/class + k-means": {**c, "regularisers": [kmeans]},
            f"{labels}/class + k-means + LCC": {**c, "regularisers": [kmeans, "lcc"]},
        }
        runs |= {n: run_one(root, f"seed{seed}-{_slug(n)}", o, data) for n, o in settings.items()}
    results = evaluate(list(runs.values()), ["--noise", "0.5,1.0", "--seed", "0"])
    return dict(zip(runs, results, strict=True))


def _teacher(root: Path, cnn: Path, args: argparse.Namespace) -> Path:
    """The KD teacher: small-cnn fine-tuned on --teacher-subset Fashion-MNIST samples (default
    all 60,000) for --teacher-epochs epochs (default 5), seed 0."""
    options = _study_base(0, cnn, args) | {"no_lcc": True, "epochs": args.teacher_epochs}
    options["subset"] = args.teacher_subset
    full = load_dataset("fashion-mnist", subset=args.teacher_subset, seed=0)
    return run_one(root, "kd-teacher-small-cnn", options, full)


def kd_study(root: Path, seed: int, data: Any, args: argparse.Namespace) -> dict[str, dict]:
    cnn = pretrain("small-cnn", root)
    teacher = _teacher(root, cnn, args)
    spec = f"teacher=small-cnn,teacher_checkpoint={teacher}/checkpoints/last.ckpt"
    spec += ",teacher_layers=act1,layers=act1,w=1"
    c = _study_base(seed, cnn, args)
    settings = {
        "student, no distillation": {**c, "no_lcc": True},
        "student + RKD-D": {**c, "regularisers": [f"rkd:{spec}"]},
        "student + GKD": {**c, "regularisers": [f"gkd:{spec}"]},
    }
    runs = {n: run_one(root, f"seed{seed}-kd-{_slug(n)}", o, data) for n, o in settings.items()}
    if seed == args.seeds[0]:
        runs = {"teacher": teacher, **runs}
    options = ["--subset", str(args.eval_subset), "--seed", "0"]
    results = evaluate(list(runs.values()), options)
    return dict(zip(runs, results, strict=True))


def _corruption_options(args: argparse.Namespace, root: Path) -> list[str]:
    return [
        "--corruptions", "common", "--subset", str(args.eval_subset), "--seed", "0",
        "--cache-dir", str(root / "corruptions"),
    ]  # fmt: skip


def objective_study(root: Path, seed: int, data: Any, args: argparse.Namespace) -> dict[str, dict]:
    cnn = pretrain("small-cnn", root)
    c = _study_base(seed, cnn, args)
    settings = {
        "cross-entropy": {**c, "no_lcc": True},
        "label variation (--ce-weight 0)": {
            **c,
            "ce_weight": 0.0,
            "regularisers": ["label-variation:layers=output,w=1"],
        },
    }
    runs = {n: run_one(root, f"seed{seed}-obj-{_slug(n)}", o, data) for n, o in settings.items()}
    baseline = runs["cross-entropy"]
    options = [*_corruption_options(args, root), "--read-with", "output", "--probe", "output"]
    results = evaluate(list(runs.values()), options, baseline)
    return dict(zip(runs, results, strict=True))


def robustness_study(root: Path, seed: int, data: Any, args: argparse.Namespace) -> dict[str, dict]:
    cnn = pretrain("small-cnn", root)
    c = _study_base(seed, cnn, args)
    settings = {
        "baseline": {**c, "no_lcc": True},
        "LV smoothness (gamma 0.1)": {
            **c,
            "regularisers": ["smoothness:layers=features.block1,features.block2,act1,w=0.1"],
        },
        "LV smoothness (gamma 0.1), degree-normalised graph": {
            **c,
            "regularisers": [
                "smoothness:layers=features.block1,features.block2,act1,w=0.1,normalize=true"
            ],
        },
        "Parseval (penalty, w 0.001)": {**c, "regularisers": ["parseval:w=0.001"]},
    }
    runs = {n: run_one(root, f"seed{seed}-rob-{_slug(n)}", o, data) for n, o in settings.items()}
    options = [*_corruption_options(args, root), "--fgsm", "0.1", "--pgd", "0.1:10:0.025"]
    results = evaluate(list(runs.values()), options, runs["baseline"])
    return dict(zip(runs, results, strict=True))


def _slug(name: str) -> str:
    text = name.replace(" ", "-").replace("/", "-").replace("+", "plus")
    return "".join(ch for ch in text if ch.isalnum() or ch in "-_.=")


# --------------------------------------------------------------------------- tables


def _error(key: str) -> Callable[[dict], float | None]:
    def value(result: dict) -> float | None:
        return None if result.get(key) is None else 1.0 - float(result[key])

    return value


def _nested_error(kind: str, setting: str) -> Callable[[dict], float | None]:
    def value(result: dict) -> float | None:
        accuracy = (result.get(kind) or {}).get(setting)
        return None if accuracy is None else 1.0 - float(accuracy)

    return value


def _get(*keys: str) -> Callable[[dict], float | None]:
    def value(result: dict) -> float | None:
        for key in keys:
            result = (result or {}).get(key)  # type: ignore[assignment]
        return None if result is None else float(result)  # type: ignore[arg-type]

    return value


#: per study: (column header, value of one evaluation, scale for the table)
COLUMNS: dict[str, list[tuple[str, Callable[[dict], float | None], float]]] = {
    "lgg": [
        ("top1", _get("top1"), 100),
        ("top5", _get("top5"), 100),
        ("top-1, noise σ=0.5", _get("noise", "0.5"), 100),
        ("top-1, noise σ=1.0", _get("noise", "1"), 100),
    ],
    "kd": [
        ("error (%)", _error("top1"), 100),
        ("top-1 (%)", _get("top1"), 100),
        ("ECE (%)", _get("ece"), 100),
    ],
    "objective": [
        ("clean error, linear probe of the output (%)", _error("top1"), 100),
        ("relative mCE", _get("relative_mce"), 100),
        ("mCE", _get("mce"), 100),
        ("k-NN probe of the output, error (%)", lambda r: _knn_error(r), 100),
    ],
    "robustness": [
        ("clean error (%)", _error("top1"), 100),
        ("FGSM eps 0.1 error (%)", _nested_error("fgsm", "0.1"), 100),
        ("PGD eps 0.1 error (%)", _nested_error("pgd", "0.1:10:0.025"), 100),
        ("relative mCE", _get("relative_mce"), 100),
        ("mCE", _get("mce"), 100),
    ],
}
COLUMNS["kmeans"] = COLUMNS["lgg"]


def _knn_error(result: dict) -> float | None:
    knn = ((result.get("probe") or {}).get("output") or {}).get("knn")
    return None if knn is None else 1.0 - float(knn)


def summarise(study: str, results: dict[str, list[dict[str, Any]]]) -> str:
    columns = COLUMNS[study]
    head = ["setting", "seeds", *(name for name, _, _ in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        cells = [name, str(len(runs))]
        for _, value, scale in columns:
            values = [scale * v for v in (value(run) for run in runs) if v is not None]
            if not values:
                cells.append("-")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


STUDY_RUNNERS = {
    "lgg": lgg_study,
    "kmeans": kmeans_study,
    "kd": kd_study,
    "objective": objective_study,
    "robustness": robustness_study,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=STUDIES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument(
        "--eval-subset", type=int, default=1000, help="test images lcc evaluate uses (kd, ...)"
    )
    parser.add_argument(
        "--train-subset", type=int, default=SUBSET, help="Fashion-MNIST training samples"
    )
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs")
    parser.add_argument(
        "--teacher-subset", type=int, default=None, help="kd: teacher's training samples (all)"
    )
    parser.add_argument("--teacher-epochs", type=int, default=5, help="kd: teacher's epochs")
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        # the subsets are drawn with the run's seed: reload per seed
        test_subset = 2_000 if args.study in ("lgg", "kmeans") else None
        data = load_dataset(
            "fashion-mnist", subset=args.train_subset, test_subset=test_subset, seed=seed
        )
        for setting, result in STUDY_RUNNERS[args.study](root, seed, data, args).items():
            results.setdefault(setting, []).append(result)
    table = summarise(args.study, results)
    print(table)
    _say(f"{time.perf_counter() - start:.0f} s")
    text = (table + "\n").encode("utf-8")
    atomic_write(root / f"{args.study}.md", lambda handle: handle.write(text))
    write_json_atomic(root / f"{args.study}.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
