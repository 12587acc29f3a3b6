"""End-to-end speed of the LCC refresh on CIFAR-100-sized latents; writes bench/README.md.

Measures, for each k:

1. the floor: one exact faiss ``IndexFlatL2`` k-NN search of the data (k + 1 with self);
2. the whole refresh in exact mode (exact k-NN, Leiden, exact targets), per stage, and its
   ratio to the floor (target <= 1.5x);
3. fast modes (approximate k-NN and/or PCA, see ``--fast``): total seconds (target <= 3 s),
   k-NN recall against the exact neighbours of the full-dimensional data (>= 0.95) and the ARI
   of the clusters against the exact mode's clusters (>= 0.95);
4. the loss forward + backward for a batch of 256 x d (target <= 0.5 ms);
4b. with ``--orthogonal``: the exact refresh with orthogonal correction (paper sec. V.C,
   ``correction=orthogonal``, tangent_k 50, tangent_dim 8) against the exact refresh
   (target <= 1.5x), its projection's seconds and the mean share of each pull it keeps;
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
import shutil
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
#: the orthogonal correction's refresh against the exact one
ORTHOGONAL = "correction=orthogonal,tangent_k=50,tangent_dim=8"
MEMORY_LIMIT_MIB = 2048
FULL = {"n": 50_000, "d": 512, "classes": 100, "k": [5, 50], "intrinsic_dim": 48}
QUICK = {"n": 5_000, "d": 128, "classes": 20, "k": [5], "intrinsic_dim": 32}


# ----------------------------------------------------------------------------- data


def make_data(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """CIFAR-100-like latents: sub-clusters per class, some samples labelled as another class."""
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
    rng = np.random.default_rng(args.seed + 1)
    hard = rng.choice(y.size, round(args.label_noise * y.size), replace=False)
    y[hard] = (y[hard] + rng.integers(1, args.classes, hard.size)) % args.classes
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
    from lcc.engine.refresh import RefreshConfig, refresh

    folder, name = Path(spec["folder"]), spec["name"]
    z, y = np.load(folder / "z.npy"), np.load(folder / "y.npy")
    config = RefreshConfig(**spec["config"])
    best, cpu = None, 0.0
    refresh(z[:500], y[:500], config, pca=min(config.pca or 0, 8) or None)  # warm-up: imports
    for _ in range(spec["repeats"]):
        started = time.process_time()
        result = refresh(z, y, config)
        if best is None or result.seconds["total"] < best.seconds["total"]:
            best, cpu = result, time.process_time() - started
    assert best is not None
    np.save(folder / f"clusters-{name}.npy", best.clusters)
    out = {
        "seconds": dict(best.seconds),
        "n_clusters": best.n_clusters,
        "misclustered_fraction": best.misclustered_fraction,
        "correctible_fraction": best.correctible_fraction,
        "modularity": best.modularity,
        "orthogonal": None if best.orthogonal is None else best.orthogonal.to_dict(),
        "cpu_seconds": cpu,
        "peak_mib": peak_mib(),
    }
    out |= _compare(spec, folder, z, best)
    return out


def _compare(spec: dict[str, Any], folder: Path, z: np.ndarray, result: Any) -> dict[str, Any]:
    """Recall of this configuration's neighbours vs exact ones; ARI vs the exact clusters; ARI
    vs the planted sub-clusters. Runs after the timed refresh (not counted in its time)."""
    from sklearn.metrics import adjusted_rand_score

    from lcc.engine.knn import Neighbors, knn, knn_recall

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

    from lcc.engine.loss import LCCLoss
    from lcc.engine.targets import Targets

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

DEFAULT_FAST = ("knn=approximate,targets=approximate", "knn=approximate,pca=64,targets=approximate")


def parse_config(text: str, k: int, seed: int) -> dict[str, Any]:
    """``"knn=approximate,pca=64"`` -> RefreshConfig fields (with k and seed)."""
    config: dict[str, Any] = {"k": k, "seed": seed}
    for part in filter(None, (item.strip() for item in text.split(","))):
        key, _, value = part.partition("=")
        numeric = key in ("pca", "tangent_k", "tangent_dim")
        config[key] = int(value) if numeric else float(value) if key == "resolution" else value
    return config


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="lcc-bench-"))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        started = time.perf_counter()
        data = make_data(args, folder)
        log(f"data: {data} in {folder} ({time.perf_counter() - started:.1f} s)")
        common = {"folder": str(folder), "repeats": args.repeats}
        rows: list[dict[str, Any]] = []
        for k in args.k:
            floor = run_worker({"kind": "floor", "k": k, **common})
            log(f"k={k} floor: {floor['seconds']:.2f} s")
            exact_config = parse_config(f"method={args.exact_method}", k, args.seed)
            exact = run_worker(
                {"kind": "refresh", "name": f"exact-k{k}", "config": exact_config, **common}
            )
            log(f"k={k} exact: {exact['seconds']['total']:.2f} s")
            fast = []
            for number, text in enumerate(args.fast):
                spec = {"kind": "refresh", "name": f"fast{number}-k{k}", "reference": f"exact-k{k}"}
                spec |= {"config": parse_config(text, k, args.seed), **common}
                fast.append(run_worker(spec) | {"label": text})
                log(
                    f"k={k} fast {text}: {fast[-1]['seconds']['total']:.2f} s, "
                    f"recall {fast[-1].get('recall')}, ARI {fast[-1]['ari_vs_exact']:.4f}"
                )
            row = {"k": k, "floor": floor, "exact": exact, "fast": fast}
            if args.orthogonal:
                config = parse_config(f"method={args.exact_method},{ORTHOGONAL}", k, args.seed)
                spec = {"kind": "refresh", "name": f"orthogonal-k{k}", "config": config}
                row["orthogonal"] = run_worker(spec | {"reference": f"exact-k{k}", **common})
                log(f"k={k} orthogonal: {row['orthogonal']['seconds']['total']:.2f} s")
            rows.append(row)
        loss_spec = {"kind": "loss", "n": args.n, "d": args.d, "batch": 256, "iterations": 500}
        loss = run_worker(loss_spec)
        log(f"loss: {loss}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"data": data, "rows": rows, "loss": loss, "load": (load_before, load_after)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(args: argparse.Namespace, results: dict[str, Any], command: str) -> str:
    """Markdown report: setup, stage times per k, targets, loss and memory."""
    data = results["data"]
    names = ["exact"] + [f"fast {chr(ord('A') + i)}" for i in range(len(args.fast))]
    lines = [
        "# Refresh benchmark",
        "",
        f"Measured {datetime.date.today().isoformat()} on {machine()}, with `{command}`.",
        f"Load average (1 min) just before the run: {results['load'][0]:.1f}, at its end: "
        f"{results['load'][1]:.1f} (the run itself adds about 2; more means other processes "
        "shared the 2 cores and inflated the wall-clock times, which the CPU-seconds row "
        "shows less).",
        "",
        f"Latents: `lcc.synthetic.gaussian_mixture`, N = {data['n']:,}, d = {data['d']}, "
        f"{data['classes']} classes x {args.clusters_per_class} sub-clusters in a random "
        f"{args.intrinsic_dim}-dimensional subspace, separation {args.separation}; then "
        f"{args.label_noise:.0%} of the samples get another class's label (hard samples that "
        "sit in another class's cluster), so that a realistic share is misclustered while the "
        "clustering itself stays stable. Every configuration runs in a fresh subprocess (best "
        f"of {args.repeats} run(s)); peak memory is that process's `ru_maxrss`; CPU seconds are "
        "the process's user + system time over the refresh (both cores together).",
        "",
        f"- exact: exact k-NN (faiss flat), {args.exact_method}, exact targets",
    ]
    for name, text in zip(names[1:], args.fast, strict=True):
        lines.append(f"- {name}: {text}, {args.exact_method if 'method=' not in text else ''}")
    lines[-len(args.fast) :] = [line.rstrip(", ") for line in lines[-len(args.fast) :]]
    header = " | ".join(f"{name} (s)" for name in names)
    lines += ["", f"| k | stage | {header} |", "|---|---|" + "---|" * len(names)]
    stage_notes = {"knn": "knn (pca + search + graph)", "pca": "- pca", "graph": "- graph"}
    for row in results["rows"]:
        runs = [row["exact"], *row["fast"]]
        for stage in ("knn", "pca", "graph", "cluster", "match", "targets", "total"):
            cells = " | ".join(f"{run['seconds'][stage]:.2f}" for run in runs)
            lines.append(f"| {row['k']} | {stage_notes.get(stage, stage)} | {cells} |")
        cells = " | ".join(f"{run['cpu_seconds']:.2f}" for run in runs)
        lines.append(f"| {row['k']} | total CPU seconds | {cells} |")
    lines += ["", "| k | figure | measured | target | met |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        lines += [f"| {row['k']} | {a} | {b} | {c} | {d} |" for a, b, c, d in figures(row, names)]
    lines += loss_lines(results["loss"], data)
    return "\n".join(lines)


def figures(row: dict[str, Any], names: list[str]) -> list[tuple[str, str, str, str]]:
    floor, exact = row["floor"], row["exact"]
    ratio = exact["seconds"]["total"] / floor["seconds"]
    out = [
        ("exact faiss flat k-NN search (the floor)", f"{floor['seconds']:.2f} s", "", ""),
        (
            "exact refresh total / floor",
            f"{exact['seconds']['total']:.2f} s = {ratio:.2f}x",
            f"<= {TARGETS['ratio']}x",
            verdict(ratio <= TARGETS["ratio"]),
        ),
        (
            "exact: clusters / misclustered / correctible",
            f"{exact['n_clusters']} / {exact['misclustered_fraction']:.1%} / "
            f"{exact['correctible_fraction']:.1%}",
            "",
            "",
        ),
        ("exact: clusters ARI vs planted sub-clusters", f"{exact['ari_planted']:.4f}", "", ""),
    ]
    for name, fast in zip(names[1:], row["fast"], strict=True):
        total, recall, ari = fast["seconds"]["total"], fast.get("recall", 1.0), fast["ari_vs_exact"]
        out += [
            (
                f"{name}: total",
                f"{total:.2f} s",
                f"<= {TARGETS['fast_seconds']} s",
                verdict(total <= TARGETS["fast_seconds"]),
            ),
            (
                f"{name}: k-NN recall vs exact",
                f"{recall:.4f}",
                f">= {TARGETS['recall']}",
                verdict(recall >= TARGETS["recall"]),
            ),
            (
                f"{name}: clusters ARI vs exact clusters",
                f"{ari:.4f}",
                f">= {TARGETS['ari']}",
                verdict(ari >= TARGETS["ari"]),
            ),
        ]
    if "orthogonal" in row:
        out += orthogonal_figures(exact, row["orthogonal"])
    for name, run in zip(["floor", *names], [floor, exact, *row["fast"]], strict=True):
        out.append(
            (
                f"peak memory, {name}",
                f"{run['peak_mib']:.0f} MiB",
                f"<= {MEMORY_LIMIT_MIB} MiB",
                verdict(run["peak_mib"] <= MEMORY_LIMIT_MIB),
            )
        )
    return out


def orthogonal_figures(exact: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, ...]]:
    """The orthogonal correction's rows: its refresh against the exact one, its own stage."""
    ratio = run["seconds"]["total"] / exact["seconds"]["total"]
    stats = run["orthogonal"] or {}
    return [
        (
            f"exact + orthogonal ({ORTHOGONAL}) total / exact total",
            f"{run['seconds']['total']:.2f} s = {ratio:.2f}x",
            f"<= {TARGETS['ratio']}x",
            verdict(ratio <= TARGETS["ratio"]),
        ),
        (
            "orthogonal: projection seconds / projected / fallback / mean ||P_perp v|| / ||v||",
            f"{run['seconds'].get('orthogonal', float('nan')):.2f} s / "
            f"{stats.get('orthogonal_projected')} / {stats.get('orthogonal_fallback')} / "
            f"{stats.get('orthogonal_mean_ratio', float('nan')):.3f}",
            "",
            "",
        ),
        (
            "orthogonal: peak memory",
            f"{run['peak_mib']:.0f} MiB",
            f"<= {MEMORY_LIMIT_MIB} MiB",
            verdict(run["peak_mib"] <= MEMORY_LIMIT_MIB),
        ),
    ]


def loss_lines(loss: dict[str, Any], data: dict[str, Any]) -> list[str]:
    lines = [
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
    return lines


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
        except Exception:
            continue
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, " + ", ".join(
        versions
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, help="number of samples (50,000; --quick 5,000)")
    parser.add_argument("--d", type=int, help="latent dimension (512; --quick 128)")
    parser.add_argument("--classes", type=int, help="number of classes (100; --quick 20)")
    parser.add_argument("--k", type=int, nargs="+", help="neighbour counts (5 50; --quick 5)")
    parser.add_argument("--clusters-per-class", type=int, default=3, help="planted sub-clusters")
    parser.add_argument(
        "--intrinsic-dim", type=int, help="dimension of the blobs' subspace (48; --quick 32)"
    )
    parser.add_argument("--separation", type=float, default=2.0, help="mean blob centre distance")
    parser.add_argument(
        "--label-noise", type=float, default=0.1, help="share of samples given another label"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the refresh")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (best)")
    parser.add_argument("--exact-method", default="leiden", help="clustering of the exact mode")
    parser.add_argument(
        "--fast",
        nargs="+",
        default=list(DEFAULT_FAST),
        metavar="CONFIG",
        help="fast-mode configurations to measure, each as comma-separated RefreshConfig "
        "fields (e.g. knn=approximate,pca=64,targets=approximate)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small smoke run (defaults in parentheses above)"
    )
    parser.add_argument(
        "--orthogonal",
        action="store_true",
        help=f"also time the exact refresh with {ORTHOGONAL} (paper sec. V.C)",
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
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.quick and args.readme is None:
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
