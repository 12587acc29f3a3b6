"""Benchmark k-NN search: exact faiss, exact torch fallback, approximate mode per index (time and
recall).

Run ``python bench/bench_knn.py`` (N=50,000 x 512, 100 classes, k in {5, 50}); ``--n 5000`` for a
quick look; ``--pca 64`` searches the 64 leading principal components (the fast refresh mode).
Latents come from :func:`lcc.synthetic.gaussian_mixture`, or from ``--latents FILE`` (``.npy``,
or ``.npz`` with the rows under ``z``). The approximate mode runs once per ``--indexes`` entry
(``auto`` is what the refresh uses; ``ivf-flat``, ``ivf-pq``, ``hnsw`` force one faiss index),
one table row each. The "exact torch" column is the chunked torch search that a refresh runs on
a GPU, here on the CPU (``--device cuda``: on the GPU, the latents on the device; "= faiss" is
the share of neighbour ids equal to faiss flat's). Times are wall-clock seconds (best and
median of ``--repeats`` runs for the fast modes); on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from lcc.engine.graph import knn_graph
from lcc.engine.knn import Neighbors, knn, knn_recall
from lcc.synthetic import gaussian_mixture


def timed(run: Callable[[], Neighbors], repeats: int) -> tuple[Neighbors, list[float]]:
    """Result of the last run and the wall-clock time of every run."""
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    assert result is not None
    return result, times


def torch_knn(z: np.ndarray, k: int, device: str) -> Neighbors:
    """The exact torch search (the refresh's GPU path) on ``device``; on CUDA the copy of the
    latents to the GPU is timed too (a refresh makes it)."""
    if device == "cuda":
        return knn(torch.from_numpy(np.ascontiguousarray(z, np.float32)).cuda(), k)
    return knn(z, k, backend="torch")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="number of latents")
    parser.add_argument("--dim", type=int, default=512, help="latent dimension")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--clusters-per-class", type=int, default=3)
    parser.add_argument("--intrinsic-dim", type=int, default=48, help="0: full dimension")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast modes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torch", action="store_true", help="skip the slow torch fallback")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="torch search on")
    parser.add_argument("--latents", help=".npy file, or .npz with key z, instead of synthetic")
    parser.add_argument("--pca", type=int, default=0, help="search this many PCA components")
    parser.add_argument(
        "--indexes", nargs="+", default=["auto"], choices=["auto", "ivf-flat", "ivf-pq", "hnsw"]
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.latents:
        loaded = np.load(args.latents)
        z = loaded["z"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
        print(f"latents: {z.shape[0]} x {z.shape[1]} from {args.latents}")
    else:
        z, _, _ = gaussian_mixture(
            args.n,
            args.dim,
            args.classes,
            args.clusters_per_class,
            intrinsic_dim=args.intrinsic_dim or None,
            seed=args.seed,
        )
        print(f"latents: {z.shape[0]} x {z.shape[1]}, intrinsic dim {args.intrinsic_dim or 'full'}")
    if args.pca:
        from lcc.engine.projection import fit_pca

        z = fit_pca(z, args.pca, seed=args.seed).apply(z)
        print(f"searching the {args.pca} leading principal components")
    rows = []
    for k, index in [(k, index) for k in args.k for index in args.indexes]:
        exact, faiss_times = timed(lambda k=k: knn(z, k, backend="faiss"), 1)
        torch_time = same = float("nan")
        if not args.skip_torch:
            fallback, torch_times = timed(lambda k=k: torch_knn(z, k, args.device), 1)
            torch_time = torch_times[0]
            np.testing.assert_allclose(fallback.distances, exact.distances, rtol=1e-3, atol=1e-3)
            same = float((fallback.indices == exact.indices).mean())
        approx, approx_times = timed(
            lambda k=k, index=index: knn(z, k, mode="approximate", index=index, seed=args.seed),
            args.repeats,
        )
        _, graph_times = timed(lambda exact=exact: knn_graph(exact), args.repeats)
        recall = knn_recall(approx, exact)
        row = {
            "k": k,
            "index": index,
            "exact_faiss_s": round(faiss_times[0], 2),
            "exact_torch_s": round(torch_time, 2),
            "torch_equals_faiss": round(same, 5),
            "approx_best_s": round(min(approx_times), 3),
            "approx_median_s": round(statistics.median(approx_times), 3),
            "recall": round(recall, 4),
            "estimated_recall": round(approx.recall, 4),
            "graph_best_s": round(min(graph_times), 3),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        f"\n| k | index | exact faiss s | exact torch ({args.device}) s | = faiss | approx s "
        "(best / median) | recall | est. recall | graph s |"
    )
    print("|---" * 9 + "|")
    for row in rows:
        print(
            f"| {row['k']} | {row['index']} | {row['exact_faiss_s']} | {row['exact_torch_s']} | "
            f"{row['torch_equals_faiss']} | "
            f"{row['approx_best_s']} / {row['approx_median_s']} | {row['recall']} | "
            f"{row['estimated_recall']} | {row['graph_best_s']} |"
        )


if __name__ == "__main__":
    main()
