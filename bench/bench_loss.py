"""Benchmark of the LCC loss and of the target computation (helper C's part of issue 2).

Prints one line per measurement and, last, a JSON line with all figures:

* ``loss[_squared]_fwd_bwd_ms_<T>thread[_min]``: forward + backward of
  :class:`lcc.engine.loss.LCCLoss` on a 256 x 512 float32 batch (median and fastest block of
  ``torch.utils.benchmark``) with the default thread count and with one thread;
* ``exact_targets_s`` / ``approximate_targets_s``: :func:`lcc.engine.targets.exact_targets`
  (k = 5 and k = 50) and :func:`lcc.engine.targets.approximate_targets` on N = 50,000 latents of
  dimension 512 in 100 classes with about 30% of the samples misclustered (best of
  ``--repeat`` runs).

Usage: ``python bench/bench_loss.py [--n 50000] [--dim 512] [--classes 100] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils import benchmark

from lcc.engine.loss import LCCLoss
from lcc.engine.match import Matching
from lcc.engine.targets import Targets, approximate_targets, exact_targets
from lcc.synthetic import gaussian_mixture


def time_loss(targets: Targets, batch: int, squared: bool) -> tuple[float, float]:
    """(median, fastest block mean) seconds of one LCCLoss forward + backward on (batch, D)."""
    loss = LCCLoss(targets, squared=squared)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(batch, targets.dim, generator=generator, requires_grad=True)
    indices = torch.randint(0, targets.n_samples, (batch,), generator=generator)
    timer = benchmark.Timer(
        stmt="loss(z, indices).backward()",
        globals={"loss": loss, "z": z, "indices": indices},
        num_threads=torch.get_num_threads(),
    )
    measurement = timer.blocked_autorange(min_run_time=1.0)
    return measurement.median, min(measurement.times)


def best_of(repeat: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    z, y, sub = gaussian_mixture(args.n, args.dim, args.classes, 3, separation=4.0, seed=0)
    rng = np.random.default_rng(0)
    clusters = sub.copy()
    moved = rng.random(args.n) < 0.3  # ~30% of samples land in a cluster of another class
    n_blobs = int(sub.max()) + 1
    clusters[moved] = (sub[moved] + 3 * rng.integers(1, args.classes, moved.sum())) % n_blobs
    cluster_class = np.arange(n_blobs) // 3
    matching = Matching(cluster_class, cluster_class[clusters] == y)
    figures: dict[str, object] = {
        "n": args.n,
        "dim": args.dim,
        "classes": args.classes,
        "misclustered_fraction": round(float(matching.misclustered.mean()), 4),
        "threads": torch.get_num_threads(),
    }
    for k in (5, 50):
        seconds, targets = best_of(
            args.repeat, lambda k=k: exact_targets(z, y, matching.correctly_clustered, k)
        )
        figures[f"exact_targets_k{k}_s"] = round(seconds, 4)
        print(f"exact targets k={k}: {seconds:.3f} s for {targets.n_correctible} targets")
    seconds, approx = best_of(args.repeat, lambda: approximate_targets(z, y, clusters, matching))
    figures["approximate_targets_s"] = round(seconds, 4)
    print(f"approximate targets: {seconds:.3f} s for {approx.n_correctible} targets")

    threads = torch.get_num_threads()
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        for squared in (False, True):
            median, fastest = time_loss(targets, args.batch, squared)
            name = f"loss{'_squared' if squared else ''}_fwd_bwd_ms_{n_threads}thread"
            figures[name] = round(median * 1e3, 4)
            figures[name + "_min"] = round(fastest * 1e3, 4)
            print(
                f"loss{' (squared)' if squared else ''} fwd+bwd {args.batch}x{args.dim}, "
                f"{n_threads} thread(s): median {median * 1e3:.3f} ms, min {fastest * 1e3:.3f} ms"
            )
    torch.set_num_threads(threads)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
