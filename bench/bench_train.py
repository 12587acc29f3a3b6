"""Epoch-time cost of LCC on the demo setup, and the refresh's peak memory.

Runs the ``lcc demo`` setup (a built-in model pretrained on MNIST, fine-tuned on a 10,000 /
2,000 sample Fashion-MNIST subset, batch 128, CPU; ``--model`` picks it) three ways with the
same seed -- baseline, LCC with the ``recorded`` latent source, LCC with the ``fresh`` source --
and prints the per-epoch wall time of each and the ratios LCC / baseline (targets: recorded <= 1.1x,
fresh <= 1.5x). Epoch 0 is the warmup (no refresh), so ratios use the post-warmup epochs;
an LCC epoch includes its refresh. Then measures one refresh (fresh pass + clustering +
targets) of the pretrained model on the training subset: wall time, peak RSS increase
(sampled every 5 ms) and the size of the latents it holds.

    python bench/bench_train.py                  # demo sizes, 4 epochs (about 5 minutes)
    python bench/bench_train.py --quick          # tiny sizes, a smoke run
    python bench/bench_train.py --repeats 3      # median of 3 runs per setting

Timings on a shared machine are noisy: use --repeats and compare medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread; ``peak - start`` is the increase."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _post_warmup(metrics: dict[str, Any], key: str = "epoch_seconds") -> float:
    seconds = metrics[key][1:] or metrics[key]
    return statistics.mean(seconds)


def time_runs(
    out: Path,
    *,
    quick: bool,
    epochs: int,
    repeats: int,
    seed: int,
    model: str = "small-resnet",
    knn: str | None = None,
) -> dict[str, Any]:
    from lcc.cli.demo import DEMO_LAYERS, FULL, QUICK, _pretrain_data
    from lcc.train.config import TrainConfig
    from lcc.train.run import train
    from lcc.zoo.datasets import load_dataset

    sizes = QUICK if quick else FULL
    fashion = load_dataset(
        "fashion-mnist", subset=sizes["subset"], test_subset=sizes["test_subset"], seed=seed
    )
    name, pretrain_data = _pretrain_data(sizes, seed)
    common = {"model": model, "seed": seed, "lr": 0.05}
    pretrain_dir = out / "pretrain"
    train(
        TrainConfig(
            **common, dataset=name, out=str(pretrain_dir), epochs=sizes["pretrain_epochs"],
            no_lcc=True,
        ).check(),
        bundle=pretrain_data,
        report=False,
    )  # fmt: skip
    weights = pretrain_dir / "checkpoints" / "last.ckpt"
    finetune = {
        **common, "dataset": "fashion-mnist", "subset": sizes["subset"],
        "test_subset": sizes["test_subset"], "epochs": epochs, "checkpoint": str(weights),
        "layers": [DEMO_LAYERS[model]] if model in DEMO_LAYERS else None,
    }  # fmt: skip
    settings = {
        "baseline": {"no_lcc": True},
        "recorded": {"source": "recorded"},
        "fresh": {"source": "fresh"},
    }
    if knn is not None:
        for key in ("recorded", "fresh"):
            settings[key]["knn"] = knn
    per_epoch: dict[str, list[float]] = {key: [] for key in settings}
    per_epoch_cpu: dict[str, list[float]] = {key: [] for key in settings}
    runs: dict[str, dict[str, Any]] = {}
    for repeat in range(repeats):
        for key, extra in settings.items():  # interleaved, so load changes hit all settings
            run_dir = out / f"{key}-{repeat}"
            metrics = train(
                TrainConfig(**finetune, **extra, out=str(run_dir)).check(),
                bundle=fashion,
                report=False,
            )
            per_epoch[key].append(_post_warmup(metrics))
            per_epoch_cpu[key].append(_post_warmup(metrics, "epoch_cpu_seconds"))
            runs[key] = metrics
            epoch_seconds = [round(s, 2) for s in metrics["epoch_seconds"]]
            refresh_seconds = [round(s, 2) for s in metrics["refresh_seconds"]]
            print(
                f"  {key:<9} run {repeat + 1}: epochs {epoch_seconds} s, refresh "
                f"{refresh_seconds} s, top-1 {100 * metrics['test_top1']:.2f}%",
                flush=True,
            )
    medians = {key: statistics.median(values) for key, values in per_epoch.items()}
    cpu = {key: statistics.median(values) for key, values in per_epoch_cpu.items()}
    return {
        "post_warmup_epoch_cpu_seconds": cpu,
        "cpu_ratio_recorded": cpu["recorded"] / cpu["baseline"],
        "cpu_ratio_fresh": cpu["fresh"] / cpu["baseline"],
        "sizes": sizes,
        "epochs": epochs,
        "repeats": repeats,
        "post_warmup_epoch_seconds": medians,
        "ratio_recorded": medians["recorded"] / medians["baseline"],
        "ratio_fresh": medians["fresh"] / medians["baseline"],
        "top1": {key: runs[key]["test_top1"] for key in runs},
        "refresh_seconds": {
            key: runs[key]["refresh_seconds"] for key in ("recorded", "fresh") if key in runs
        },
        "pretrain_checkpoint": str(weights),
        "n_train": len(fashion.train),
    }


def refresh_memory(
    weights: str, *, quick: bool, seed: int, model_name: str = "small-resnet"
) -> dict[str, Any]:
    """One fresh refresh of the pretrained model on the training subset, with peak RSS."""
    import gc

    import torch
    from torch.utils.data import DataLoader

    from lcc.cli.demo import DEMO_LAYERS, FULL, QUICK
    from lcc.train.loop import LatentClusterCorrection
    from lcc.train.run import default_layers
    from lcc.zoo.datasets import IndexedDataset, load_dataset
    from lcc.zoo.models import build_model

    sizes = QUICK if quick else FULL
    fashion = load_dataset(
        "fashion-mnist", subset=sizes["subset"], test_subset=sizes["test_subset"], seed=seed
    )
    torch.manual_seed(seed)
    model = build_model(
        model_name, 10, input_shape=fashion.input_shape, pretrained=False, checkpoint=weights
    )
    loader = DataLoader(IndexedDataset(fashion.train_plain), batch_size=128)  # as lcc train
    sample = torch.stack([fashion.train_plain[i][0] for i in range(2)])
    layer_name = DEMO_LAYERS.get(model_name) or default_layers(model, sample)[0]
    lcc = LatentClusterCorrection(model, layers=[layer_name], k=5, warmup=0)
    from lcc.engine.refresh import refresh
    from lcc.synthetic import gaussian_mixture

    z, y, _ = gaussian_mixture(n_samples=300, dim=8, n_classes=3, seed=0)
    refresh(z, y, k=5)  # warm-up: imports faiss/igraph, so their code is not counted below
    with torch.no_grad():  # and torch's first-forward allocations
        model.eval()(next(iter(loader))[0])
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    with PeakRSS() as memory:
        stats = lcc.start_epoch(0, loader)
    seconds = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stats is not None
    layer = stats["lcc"][layer_name]
    n, d = layer["n"], layer.get("input_dim", layer["d"])
    return {
        "refresh_seconds": seconds,
        "stage_seconds": layer["seconds"],
        "n": n,
        "d": d,
        "latents_mib": n * d * 4 / 2**20,
        "peak_rss_increase_mib": (memory.peak - memory.start) / 2**20,
        "peak_python_numpy_mib": traced_peak / 2**20,
        "rss_before_mib": memory.start / 2**20,
        "n_clusters": layer["n_clusters"],
        "misclustered_fraction": layer["misclustered_fraction"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny subsets (smoke run)")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model",
        default="small-resnet",
        help="small-resnet (the demo's default, layer pool) or small-cnn (lcc demo --model "
        "small-cnn, layer act1)",
    )
    parser.add_argument(
        "--knn",
        default=None,
        choices=("exact", "approximate"),
        help="k-NN mode of the LCC runs (default: lcc train's, approximate)",
    )
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--memory-only", metavar="WEIGHTS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.memory_only:
        result = refresh_memory(
            args.memory_only, quick=args.quick, seed=args.seed, model_name=args.model
        )
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="lcc-bench-") as temporary:
        out = Path(args.out or temporary)
        print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}", flush=True)
        timing = time_runs(
            out,
            quick=args.quick,
            epochs=args.epochs,
            repeats=args.repeats,
            seed=args.seed,
            model=args.model,
            knn=args.knn,
        )
        # in a fresh process: the allocator's free pools of the training runs would hide it
        command = [sys.executable, __file__, "--memory-only", timing["pretrain_checkpoint"]]
        command += ["--seed", str(args.seed), "--model", args.model]
        command += ["--quick"] if args.quick else []
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        memory = json.loads(done.stdout.strip().splitlines()[-1])
    medians = timing["post_warmup_epoch_seconds"]
    print(f"\nper-epoch wall time (median of post-warmup epochs, n_train={timing['n_train']}):")
    print(f"  baseline        {medians['baseline']:.2f} s")
    print(
        f"  LCC recorded    {medians['recorded']:.2f} s   ratio {timing['ratio_recorded']:.2f}x"
        "  (target <= 1.1x)"
    )
    print(
        f"  LCC fresh       {medians['fresh']:.2f} s   ratio {timing['ratio_fresh']:.2f}x"
        "  (target <= 1.5x)"
    )
    cpu = timing["post_warmup_epoch_cpu_seconds"]
    print("per-epoch CPU time of the process (less sensitive to other load on the machine):")
    print(f"  baseline        {cpu['baseline']:.2f} s")
    print(f"  LCC recorded    {cpu['recorded']:.2f} s   ratio {timing['cpu_ratio_recorded']:.2f}x")
    print(f"  LCC fresh       {cpu['fresh']:.2f} s   ratio {timing['cpu_ratio_fresh']:.2f}x")
    print(
        f"refresh (fresh, {memory['n']} x {memory['d']} latents = "
        f"{memory['latents_mib']:.1f} MiB): "
        f"{memory['refresh_seconds']:.2f} s, peak RSS increase "
        f"{memory['peak_rss_increase_mib']:.1f} MiB (Python/NumPy allocations: "
        f"{memory['peak_python_numpy_mib']:.1f} MiB)"
    )
    print(f"  stages: {json.dumps({k: round(v, 3) for k, v in memory['stage_seconds'].items()})}")
    if args.json:
        Path(args.json).write_text(json.dumps({"timing": timing, "memory": memory}, indent=2))


if __name__ == "__main__":
    main()
