"""Does LCC move anything beyond seed noise? Paired seeds, MNIST-pretrained -> Fashion-MNIST.

Every setting runs with the same seeds as the reference, so seed ``s`` of both shares its data
subset, order and initial head; the table gives, per setting, the test top-1 and the
misclustered fraction of the last refresh (mean ± sd over seeds) and their *paired* gains over
the reference with a 95 % Student-t interval (:mod:`lcc.analysis.paired`). The reference is
LCC at weight 0 (``monitor``): trained exactly like a baseline (the term is never computed) but
refreshed every epoch, so its misclustered fraction is measured the same way as the others'.

Settings (LCC paper defaults: layer ``pool``, k = 5, w = 0.01, one warmup epoch, Leiden):

- ``monitor``: weight 0 (the reference); ``lcc``: paper defaults; ``lcc w=0.3``: a larger
  weight; ``squared``: the poster's squared loss; ``orthogonal`` (and at w = 0.3): sec. V.C
  correction (tangent_k 50, tangent_dim 8);
- ``recalibrate`` / ``batch``: ``--refresh-bn`` of the fresh pass; ``monitor recalibrate``:
  weight 0 with recalibration, the control of ``recalibrate`` (recalibrated running statistics
  stay in the model, so they change its test accuracy even without LCC); ``recorded``: targets
  from the latents recorded during the previous epoch (no extra pass).

Also per setting: the mean gap between the fresh pass's accuracy and the previous epoch's
training accuracy over the refreshes, and CE of CC vs MC samples at the last refresh.

Finished runs in ``OUT`` (``metrics.json``) are reused and unfinished ones resumed, so the
script can be stopped and run again. Usage::

    nice -n 19 python bench/compare_lcc.py --seeds 0 1 2 3 4 --epochs 15 --out runs/compare_lcc
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lcc.analysis.paired import paired_gain
from lcc.cli.demo import _pretrain_data
from lcc.io import atomic_write, write_json_atomic
from lcc.train.config import TrainConfig
from lcc.train.run import train
from lcc.zoo.datasets import load_dataset

LAYERS = {"small-resnet": "pool", "small-cnn": "act1"}
SETTINGS: dict[str, dict[str, Any]] = {
    "monitor": {"weight": 0.0},
    "lcc": {},
    "lcc w=0.3": {"weight": 0.3},
    "squared": {"squared": True},
    "orthogonal": {"correction": "orthogonal"},
    "orthogonal w=0.3": {"correction": "orthogonal", "weight": 0.3},
    "recalibrate": {"refresh_bn": "recalibrate"},
    "monitor recalibrate": {"weight": 0.0, "refresh_bn": "recalibrate"},
    "batch": {"refresh_bn": "batch"},
    "recorded": {"source": "recorded"},
}
REFERENCE = "monitor"


def _say(text: str) -> None:
    print(f"compare_lcc: {text}", file=sys.stderr, flush=True)


def pretrain(model: str, root: Path) -> Path:
    """``model`` trained on 10,000 MNIST samples for 2 epochs (seed 0), as in ``lcc demo``."""
    name, data = _pretrain_data({"pretrain_subset": 10_000}, 0)
    out = root / f"pretrain-{model}"
    if not (out / "metrics.json").is_file():
        config = TrainConfig(
            model=model, dataset=name, out=str(out), epochs=2, lr=0.05, no_lcc=True, resume=True
        )
        train(config.check(), bundle=data, report=False)
    return out / "checkpoints" / "last.ckpt"


def run(root: Path, name: str, options: dict[str, Any], data: Any) -> Path:
    out = root / name
    if not (out / "metrics.json").is_file():
        _say(name)
        config = TrainConfig(**options, out=str(out), resume=True)
        train(config.check(), bundle=data, report=False)
    return out


def summary(run_dir: Path) -> dict[str, Any]:
    """Test top-1, and from the refreshes: last misclustered fraction, mean |pass - train|
    accuracy gap, CE of CC / MC samples at the last refresh."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    records = [
        json.loads(line)
        for line in (run_dir / "refreshes.jsonl").read_text().splitlines()
        if line.strip()
    ]
    last = max(records, key=lambda r: r["epoch"]) if records else {}
    gaps = [
        abs(r["accuracy"] - r["train_accuracy"])
        for r in records
        if r.get("train_accuracy") is not None and r.get("accuracy") is not None
    ]
    return {
        "top1": float(metrics["test_top1"]),
        "misclustered": last.get("misclustered_fraction"),
        "gap": statistics.fmean(gaps) if gaps else None,
        "max_gap": max(gaps) if gaps else None,
        "ce_cc": last.get("cross_entropy_cc"),
        "ce_mc": last.get("cross_entropy_mc"),
        "orthogonal_ratio": last.get("orthogonal_mean_ratio"),
    }


def _mean_sd(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    mean = scale * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {scale * statistics.stdev(values):.2f}"


def table(model: str, results: dict[str, dict[int, dict[str, Any]]]) -> str:
    reference = results[REFERENCE]
    lines = [
        f"### {model} (layer {LAYERS[model]})",
        "",
        "| setting | top-1 (%) | paired gain top-1 | MC fraction (%) | paired gain MC "
        "| mean/max pass-train gap (pts) | CE CC / MC (last refresh) |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, by_seed in results.items():
        top1 = {s: r["top1"] for s, r in by_seed.items()}
        mc = {s: r["misclustered"] for s, r in by_seed.items() if r["misclustered"] is not None}
        # pairs: the seeds both this setting and the reference finished
        ref_top1 = {s: r["top1"] for s, r in reference.items() if s in top1}
        ref_mc = {s: r["misclustered"] for s, r in reference.items() if s in mc}
        top1_pairs = {s: v for s, v in top1.items() if s in ref_top1}
        mc_pairs = {s: v for s, v in mc.items() if s in ref_mc and ref_mc[s] is not None}
        ref_mc = {s: ref_mc[s] for s in mc_pairs}
        gain = paired_gain(top1_pairs, ref_top1) if setting != REFERENCE else None
        gain_mc = paired_gain(mc_pairs, ref_mc) if setting != REFERENCE else None
        gaps = [r["gap"] for r in by_seed.values() if r["gap"] is not None]
        max_gaps = [r["max_gap"] for r in by_seed.values() if r["max_gap"] is not None]
        ce_cc = [r["ce_cc"] for r in by_seed.values() if r["ce_cc"] is not None]
        ce_mc = [r["ce_mc"] for r in by_seed.values() if r["ce_mc"] is not None]
        lines.append(
            "| "
            + " | ".join(
                [
                    setting,
                    _mean_sd(list(top1.values())),
                    _gain_cell(setting, gain),
                    _mean_sd(list(mc.values())),
                    _gain_cell(setting, gain_mc),
                    f"{100 * statistics.fmean(gaps):.1f} / {100 * max(max_gaps):.1f}"
                    if gaps
                    else "-",
                    f"{statistics.fmean(ce_cc):.3f} / {statistics.fmean(ce_mc):.3f}"
                    if ce_cc and ce_mc
                    else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _gain_cell(setting: str, gain: Any) -> str:
    if setting == REFERENCE:
        return "reference"
    if gain is None:
        return "-"
    return gain.text() + (" **" if gain.beyond_noise else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["small-resnet", "small-cnn"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-subset", type=int, default=10_000)
    parser.add_argument("--test-subset", type=int, default=2_000)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", default="runs/compare_lcc")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: the table of the finished runs in OUT (a stopped study's)",
    )
    args = parser.parse_args()
    if REFERENCE not in args.settings:
        args.settings.insert(0, REFERENCE)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    caption = (
        f"Fine-tuned {args.epochs} epochs on {args.train_subset:,} Fashion-MNIST samples (test "
        f"{args.test_subset:,}), SGD lr {args.lr}; paired gain over `{REFERENCE}` (LCC at "
        "weight 0) with its 95 % t interval and the number of pairs n, ** where the interval "
        "excludes 0; percentage points. Pass-train gap: |accuracy of the refresh's latent pass "
        "- accuracy of the previous epoch's training forwards|, mean and max over refreshes."
    )
    for model in args.models:
        checkpoint = root / f"pretrain-{model}" / "checkpoints" / "last.ckpt"
        if not args.table_only:
            checkpoint = pretrain(model, root)
        results: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in args.settings}
        for seed in args.seeds:
            data = None
            if not args.table_only:
                data = load_dataset(
                    "fashion-mnist",
                    subset=args.train_subset,
                    test_subset=args.test_subset,
                    seed=seed,
                )
            base = {
                "model": model,
                "dataset": "fashion-mnist",
                "checkpoint": str(checkpoint),
                "layers": [LAYERS[model]],
                "epochs": args.epochs,
                "lr": args.lr,
                "seed": seed,
                "subset": args.train_subset,
                "test_subset": args.test_subset,
            }
            for setting in args.settings:
                name = f"{model}-{setting.replace(' ', '_').replace('=', '')}-seed{seed}"
                if args.table_only:
                    if (root / name / "metrics.json").is_file():
                        results[setting][seed] = summary(root / name)
                    continue
                out = run(root, name, {**base, **SETTINGS[setting]}, data)
                results[setting][seed] = summary(out)
            # the table so far (a stopped run still leaves the finished seeds' table)
            text = table(model, results) + "\n" + caption + "\n"
            encoded = text.encode("utf-8")
            atomic_write(root / f"STUDY-{model}.md", lambda handle, b=encoded: handle.write(b))
            write_json_atomic(root / f"STUDY-{model}.json", results)
            _say(f"{model} seed {seed} done, {time.perf_counter() - start:.0f} s")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
