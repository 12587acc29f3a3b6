"""Benchmark of the k-means centroid loss (issue 8): per-step overhead on CPU.

Prints one line per measurement and, last, a JSON line with all figures:

* ``loss_fwd_bwd_ms_<T>thread[_min]``: forward + backward of
  :func:`lcc.engine.centroids.centroid_loss` + :func:`~lcc.engine.centroids.centroid_term` on a
  ``batch x dim`` float32 batch (default 256 x 512, half of it unlabelled) with ``centroids``
  learnable centroids (default 100), gradients to the latents and the centroids: median and
  fastest block of ``torch.utils.benchmark``, with the default thread count and with one thread
  (target: <= 1 ms);
* ``regulariser_fwd_bwd_ms_<T>thread``: the same through
  :class:`lcc.regularisers.kmeans.KMeansCentroids` (adds the assignment counts and the
  re-seeding reservoir).

Usage: ``python bench/bench_kmeans.py [--batch 256] [--dim 512] [--centroids 100]
[--min-time 1.0]`` (``--min-time 0.01`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from torch.utils import benchmark

from lcc.engine.centroids import centroid_loss, centroid_term
from lcc.regularisers import Batch
from lcc.regularisers.kmeans import KMeansCentroids


def time_stmt(stmt: str, values: dict, threads: int, min_time: float) -> tuple[float, float]:
    """(median, fastest block mean) seconds of ``stmt``."""
    timer = benchmark.Timer(stmt=stmt, globals=values, num_threads=threads)
    measurement = timer.blocked_autorange(min_run_time=min_time)
    return measurement.median, min(measurement.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--centroids", type=int, default=100)
    parser.add_argument("--min-time", type=float, default=1.0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, args.dim, generator=generator, requires_grad=True)
    centroids = torch.randn(args.centroids, args.dim, generator=generator, requires_grad=True)
    labeled = torch.arange(args.batch) % 2 == 0

    reg = KMeansCentroids(layers=["0"], centroids=args.centroids)
    reg.bind(nn.Sequential(nn.Identity()), num_classes=2, sample=z.detach())
    batch = Batch(
        latents={"0": z},
        y=torch.where(labeled, 0, -1),
        indices=torch.arange(args.batch),
        logits=torch.zeros(args.batch, 2),
    )
    figures: dict[str, object] = {
        "batch": args.batch,
        "dim": args.dim,
        "centroids": args.centroids,
        "threads": torch.get_num_threads(),
    }
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        values = {
            "centroid_loss": centroid_loss,
            "centroid_term": centroid_term,
            "z": z,
            "c": centroids,
            "labeled": labeled,
            "reg": reg,
            "batch": batch,
        }
        stmt = "centroid_term(centroid_loss([z], [c]), labeled).backward()"
        median, fastest = time_stmt(stmt, values, threads, args.min_time)
        figures[f"loss_fwd_bwd_ms_{threads}thread"] = round(median * 1e3, 4)
        figures[f"loss_fwd_bwd_ms_{threads}thread_min"] = round(fastest * 1e3, 4)
        print(f"loss fwd+bwd, {threads} thread(s): median {median * 1e3:.3f} ms")
        median, _ = time_stmt("reg(batch).backward()", values, threads, args.min_time)
        figures[f"regulariser_fwd_bwd_ms_{threads}thread"] = round(median * 1e3, 4)
        print(f"regulariser fwd+bwd, {threads} thread(s): median {median * 1e3:.3f} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
