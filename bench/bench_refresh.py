"""End-to-end speed of the LCC refresh on CIFAR-100-sized latents; writes bench/README.md.

Measures, for each k:

1. the floor: one exact faiss ``IndexFlatL2`` k-NN search of the data (k + 1 with self);
2. the whole refresh in exact mode (exact k-NN, Leiden, exact targets), per stage, and its
   ratio to the floor (target <= 1.5x);
3. a fast mode (approximate k-NN and/or PCA, see ``--fast-*``): total seconds (target <= 3 s),
   its k-NN recall against the exact neighbours (>= 0.95) and the ARI of its clusters against
   the exact mode's clusters (>= 0.95);
4. the loss forward + backward for a batch of 256 x d (target <= 0.5 ms);
5. peak memory (``ru_maxrss``) of each configuration, each run in a fresh subprocess
   (target <= 2 GiB).

Usage::

    python bench/bench_refresh.py                 # full run (N=50,000, d=512, k=5 and 50)
    python bench/bench_refresh.py --quick         # small smoke run, does not touch README.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
TARGETS = {"ratio": 1.5, "fast_seconds": 3.0, "recall": 0.95, "ari": 0.95, "loss_ms": 0.5}
MEMORY_LIMIT_MIB = 2048


# ----------------------------------------------------------------------------- data


def make_data(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """CIFAR-100-like latents: ``classes`` classes of several overlapping sub-clusters."""
    from lcc.synthetic import gaussian_mixture

    z, y, sub = gaussian_mixture(
        n_samples=args.n,
        dim=args.d,
        n_classes=args.classes,
        clusters_per_class=args.clusters_per_class,
        separation=args.separation,
        noise=1.0,
        intrinsic_dim=args.intrinsic_dim,
        seed=args.seed,
    )
    np.save(folder / "z.npy", z)
    np.save(folder / "y.npy", y)
    np.save(folder / "sub.npy", sub)
    return {"n": int(z.shape[0]), "d": int(z.shape[1]), "classes": int(y.max() + 1)}


# ----------------------------------------------------------------------------- workers


def peak_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def worker_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """One exact faiss flat search of the data against itself (k + 1: the sample is its own NN)."""
    import faiss

    folder, k = Path(spec["folder"]), spec["k"]
    z = np.load(folder / "z.npy")
    best, indices = float("inf"), None
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        index = faiss.IndexFlatL2(z.shape[1])
        index.add(z)
        _, found = index.search(z, k + 1)
        best = min(best, time.perf_counter() - start)
        indices = found
    assert indices is not None
    rows = np.arange(z.shape[0])[:, None]
    own = indices == rows
    own[~own.any(axis=1), -1] = True
    exact = indices[~own].reshape(z.shape[0], k)
    np.save(folder / f"exact-neighbours-k{k}.npy", exact)
    return {"seconds": best, "peak_mib": peak_mib(), "threads": faiss.omp_get_max_threads()}


def worker_refresh(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole refresh with ``spec["config"]``; the best of ``repeats`` runs by total time."""
    from lcc.refresh import RefreshConfig, refresh

    folder, name = Path(spec["folder"]), spec["name"]
    z, y = np.load(folder / "z.npy"), np.load(folder / "y.npy")
    config = RefreshConfig(**spec["config"])
    best = None
    for _ in range(spec["repeats"]):
        result = refresh(z, y, config)
        if best is None or result.seconds["total"] < best.seconds["total"]:
            best = result
    assert best is not None
    np.save(folder / f"clusters-{name}.npy", best.clusters)
    out = {
        "seconds": dict(best.seconds),
        "n_clusters": best.n_clusters,
        "misclustered_fraction": best.misclustered_fraction,
        "correctible_fraction": best.correctible_fraction,
        "modularity": best.modularity,
        "peak_mib": peak_mib(),
    }
    out |= _compare(spec, folder, z, best)
    return out


def _compare(spec: dict[str, Any], folder: Path, z: np.ndarray, result: Any) -> dict[str, Any]:
    """Recall of this configuration's neighbours vs exact ones; ARI vs the exact clusters; ARI
    vs the planted sub-clusters. Runs after the timed refresh (not counted in its time)."""
    from sklearn.metrics import adjusted_rand_score

    from lcc.knn import Neighbors, knn, knn_recall

    config = result.config
    k = config.k
    out: dict[str, Any] = {
        "ari_planted": float(adjusted_rand_score(np.load(folder / "sub.npy"), result.clusters))
    }
    reference = folder / f"clusters-{spec.get('reference', '')}.npy"
    if spec.get("reference") and reference.exists():
        out["ari_vs_exact"] = float(adjusted_rand_score(np.load(reference), result.clusters))
    if config.knn == "approximate" or config.pca is not None:
        space = result.projection.apply(z) if result.projection is not None else z
        found = knn(space, k, mode=config.knn, metric=config.metric, seed=config.seed)
        exact = np.load(folder / f"exact-neighbours-k{k}.npy")
        out["recall"] = knn_recall(found, Neighbors(exact, np.zeros(exact.shape, np.float32)))
    return out


def worker_loss(spec: dict[str, Any]) -> dict[str, Any]:
    """Median forward + backward time (ms) of LCCLoss on a batch of ``batch`` x d latents.

    Two batches: 256 random dataset ids with 10% of the dataset correctible, and a batch whose
    samples are all correctible; each with torch's default thread count and with 1 thread.
    """
    import torch

    from lcc.loss import LCCLoss
    from lcc.targets import Targets

    n, d, batch = spec["n"], spec["d"], spec["batch"]
    rng = np.random.default_rng(0)
    default_threads = torch.get_num_threads()
    results: dict[str, Any] = {"threads": default_threads, "timings": []}
    for every in (10, 1):
        indices = np.arange(0, n, every, dtype=np.int64)
        vectors = rng.normal(size=(indices.size, d)).astype(np.float32)
        loss = LCCLoss(Targets(indices, vectors, n_samples=n))
        ids = torch.from_numpy(rng.choice(indices if every == 1 else n, batch, replace=False))
        z = torch.randn(batch, d, requires_grad=True)
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            times = []
            for step in range(spec["iterations"] + 50):
                start = time.perf_counter()
                loss(z, ids).backward()
                elapsed = time.perf_counter() - start
                z.grad = None
                if step >= 50:  # warm-up
                    times.append(elapsed)
            results["timings"].append(
                {
                    "correctible": "10% of dataset" if every == 10 else "whole batch",
                    "threads": threads,
                    "median_ms": float(np.median(times) * 1e3),
                    "p90_ms": float(np.percentile(times, 90) * 1e3),
                }
            )
    torch.set_num_threads(default_threads)
    results["peak_mib"] = peak_mib()
    return results


WORKERS = {"floor": worker_floor, "refresh": worker_refresh, "loss": worker_loss}


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh Python process (so peak memory is its own)."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def fast_config(args: argparse.Namespace, k: int) -> dict[str, Any]:
    config: dict[str, Any] = {"k": k, "knn": args.fast_knn, "method": args.fast_method}
    config |= {"targets": args.fast_targets, "pca": args.fast_pca, "seed": args.seed}
    return config


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="lcc-bench-"))
    started = time.perf_counter()
    data = make_data(args, folder)
    log(f"data: {data} in {folder} ({time.perf_counter() - started:.1f} s)")
    common = {"folder": str(folder), "repeats": args.repeats}
    rows: list[dict[str, Any]] = []
    for k in args.k:
        floor = run_worker({"kind": "floor", "k": k, **common})
        log(f"k={k} floor: {floor['seconds']:.2f} s")
        exact = run_worker(
            {
                "kind": "refresh",
                "name": f"exact-k{k}",
                "config": {"k": k, "method": args.exact_method, "seed": args.seed},
                **common,
            }
        )
        log(f"k={k} exact: {exact['seconds']}")
        fast = run_worker(
            {
                "kind": "refresh",
                "name": f"fast-k{k}",
                "reference": f"exact-k{k}",
                "config": fast_config(args, k),
                **common,
            }
        )
        log(f"k={k} fast: {fast['seconds']} recall={fast.get('recall')} ari={fast['ari_vs_exact']}")
        rows.append({"k": k, "floor": floor, "exact": exact, "fast": fast})
    loss = run_worker({"kind": "loss", "n": args.n, "d": args.d, "batch": 256, "iterations": 500})
    log(f"loss: {loss}")
    return {"data": data, "rows": rows, "loss": loss}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(args: argparse.Namespace, results: dict[str, Any], command: str) -> str:
    """Markdown report: setup, one table per k, loss and memory."""
    data = results["data"]
    fast = fast_config(args, 0)
    fast_text = ", ".join(f"{key}={value}" for key, value in fast.items() if key not in ("k",))
    lines = [
        "# Refresh benchmark",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine()}, with `{command}`.",
        "",
        f"Latents: `lcc.synthetic.gaussian_mixture`, N = {data['n']:,}, d = {data['d']}, "
        f"{data['classes']} classes x {args.clusters_per_class} sub-clusters, intrinsic "
        f"dimension {args.intrinsic_dim}, separation {args.separation} (overlapping sub-clusters, "
        "so a realistic share of samples is misclustered). Every configuration runs in a fresh "
        f"subprocess (best of {args.repeats} run(s)); peak memory is that process's `ru_maxrss`.",
        "",
        f"Exact mode: exact k-NN, {args.exact_method}, exact targets. "
        f"Fast mode: {fast_text}.",
        "",
        "| k | stage | exact mode (s) | fast mode (s) |",
        "|---|---|---|---|",
    ]
    for row in results["rows"]:
        exact, quick = row["exact"]["seconds"], row["fast"]["seconds"]
        for stage in ("pca", "knn", "graph", "cluster", "match", "targets", "total"):
            note = " (incl. pca + graph)" if stage == "knn" else ""
            note = " (part of knn)" if stage in ("pca", "graph") else note
            lines.append(
                f"| {row['k']} | {stage}{note} | {exact[stage]:.2f} | {quick[stage]:.2f} |"
            )
    lines += [
        "",
        "| k | figure | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        k, floor, exact, quick = row["k"], row["floor"], row["exact"], row["fast"]
        ratio = exact["seconds"]["total"] / floor["seconds"]
        recall = quick.get("recall", 1.0)
        figures = [
            ("exact faiss flat k-NN search (the floor)", f"{floor['seconds']:.2f} s", "", ""),
            (
                "exact refresh total / floor",
                f"{exact['seconds']['total']:.2f} s = {ratio:.2f}x",
                f"<= {TARGETS['ratio']}x",
                verdict(ratio <= TARGETS["ratio"]),
            ),
            (
                "fast refresh total",
                f"{quick['seconds']['total']:.2f} s",
                f"<= {TARGETS['fast_seconds']} s",
                verdict(quick["seconds"]["total"] <= TARGETS["fast_seconds"]),
            ),
            (
                "fast k-NN recall vs exact",
                f"{recall:.4f}",
                f">= {TARGETS['recall']}",
                verdict(recall >= TARGETS["recall"]),
            ),
            (
                "fast clusters ARI vs exact clusters",
                f"{quick['ari_vs_exact']:.4f}",
                f">= {TARGETS['ari']}",
                verdict(quick["ari_vs_exact"] >= TARGETS["ari"]),
            ),
            (
                "exact clusters ARI vs planted sub-clusters",
                f"{exact['ari_planted']:.4f}",
                "",
                "",
            ),
            (
                "exact: clusters / misclustered / correctible",
                f"{exact['n_clusters']} / {exact['misclustered_fraction']:.1%} / "
                f"{exact['correctible_fraction']:.1%}",
                "",
                "",
            ),
        ]
        for name, kind in (("floor", floor), ("exact", exact), ("fast", quick)):
            figures.append(
                (
                    f"peak memory, {name}",
                    f"{kind['peak_mib']:.0f} MiB",
                    f"<= {MEMORY_LIMIT_MIB} MiB",
                    verdict(kind["peak_mib"] <= MEMORY_LIMIT_MIB),
                )
            )
        lines += [f"| {k} | {a} | {b} | {c} | {d} |" for a, b, c, d in figures]
    loss = results["loss"]
    lines += [
        "",
        f"Loss forward + backward, batch 256 x {data['d']} (median of 500 after 50 warm-up "
        f"steps; peak memory {loss['peak_mib']:.0f} MiB):",
        "",
        "| correctible samples | torch threads | median (ms) | p90 (ms) | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for timing in loss["timings"]:
        lines.append(
            f"| {timing['correctible']} | {timing['threads']} | {timing['median_ms']:.3f} | "
            f"{timing['p90_ms']:.3f} | <= {TARGETS['loss_ms']} | "
            f"{verdict(timing['median_ms'] <= TARGETS['loss_ms'])} |"
        )
    lines.append("")
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for module in ("torch", "faiss", "igraph", "leidenalg"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except Exception:  # noqa: BLE001 - a version string is optional
            continue
    return (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
        + ", ".join(versions)
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50_000, help="number of samples")
    parser.add_argument("--d", type=int, default=512, help="latent dimension")
    parser.add_argument("--classes", type=int, default=100, help="number of classes")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 50], help="neighbour counts")
    parser.add_argument("--clusters-per-class", type=int, default=3, help="planted sub-clusters")
    parser.add_argument("--intrinsic-dim", type=int, default=48, help="dimension of the blobs")
    parser.add_argument("--separation", type=float, default=1.5, help="mean blob centre distance")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the refresh")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (best)")
    parser.add_argument("--exact-method", default="leiden", help="clustering of the exact mode")
    parser.add_argument("--fast-knn", default="approximate", help="k-NN mode of the fast mode")
    parser.add_argument("--fast-pca", type=int, default=None, help="PCA dim of the fast mode")
    parser.add_argument("--fast-method", default="leiden", help="clustering of the fast mode")
    parser.add_argument("--fast-targets", default="exact", help="targets of the fast mode")
    parser.add_argument(
        "--quick", action="store_true", help="small run (N=5,000, d=128, 20 classes, k=5)"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help=f"markdown output (default: {README.relative_to(HERE.parent)} for a full run, "
        "none for --quick)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.d, args.classes, args.k = 5_000, 128, 20, [5]
        args.intrinsic_dim = min(args.intrinsic_dim, 32)
    elif args.readme is None:
        args.readme = README
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)), flush=True)
        return 0
    command = "python bench/bench_refresh.py " + shlex.join(argv if argv else sys.argv[1:])
    results = benchmark(args)
    report = render(args, results, command.strip())
    print(report)
    if args.readme is not None:
        args.readme.write_text(report)
        log(f"wrote {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
