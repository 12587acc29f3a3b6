"""Benchmark of graph clustering (helper B's part of issue 2): Leiden, Louvain, peer pressure.

On the k-NN graphs (k = 5 and k = 50, unweighted) of ``gaussian_mixture(50_000, 512, 100, 3,
intrinsic_dim=48, seed=0)`` it prints, per method: seconds of
:func:`lcc.engine.cluster.cluster_graph`
(best of ``--repeat``; input check, igraph graph and clustering included), number of clusters,
ARI against the planted sub-clusters and against the classes, modularity and conductance.
The last line is a JSON list of all rows.

The exact k-NN (faiss flat, about 15-45 s here) is computed once at k = 50; the k = 5 graph uses
its first five columns. ``--cache FILE.npz`` stores / reuses those neighbours. ``--separation``
(default 10, the issue's data) makes the blobs overlap when lowered (e.g. 1.5).

Usage: ``python bench/bench_cluster.py [--n 50000] [--repeat 2] [--separation 10]
[--cache /tmp/knn.npz]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from lcc.engine.cluster import CLUSTER_METHODS, cluster_graph
from lcc.engine.peer_pressure import conductance
from lcc.synthetic import gaussian_mixture


def neighbours(z: np.ndarray, k: int, cache: Path | None, tag: str) -> np.ndarray:
    """(N, k) int64 exact nearest other rows, nearest first (cached when asked)."""
    if cache is not None and cache.exists():
        stored = np.load(cache)
        if stored["indices"].shape == (z.shape[0], k) and str(stored["tag"]) == tag:
            return stored["indices"]
    from lcc.engine.knn import knn

    start = time.perf_counter()
    indices = knn(z, k, mode="exact").indices
    print(f"exact k-NN (k={k}): {time.perf_counter() - start:.1f} s", flush=True)
    if cache is not None:
        np.savez(cache, indices=indices, tag=tag)
    return indices


def graph(indices: np.ndarray) -> sp.csr_matrix:
    """Unweighted symmetric k-NN graph (lcc.engine.graph.knn_graph when present)."""
    try:
        from lcc.engine import graph as graph_module
    except ImportError:
        n, k = indices.shape
        rows = np.repeat(np.arange(n), k)
        a = sp.csr_matrix((np.ones(n * k), (rows, indices.ravel())), shape=(n, n))
        return a.maximum(a.T).tocsr()
    distances = np.ones(indices.shape, dtype=np.float32)  # unused by the unweighted graph
    from lcc.engine.knn import Neighbors

    return graph_module.knn_graph(Neighbors(indices=indices, distances=distances))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--separation", type=float, default=10.0, help="blob centre distance")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()

    z, y, sub = gaussian_mixture(
        args.n, 512, 100, 3, separation=args.separation, intrinsic_dim=48, seed=0
    )
    indices = neighbours(z, 50, args.cache, tag=f"n={args.n} separation={args.separation}")
    rows = []
    for k in (5, 50):
        adjacency = graph(np.ascontiguousarray(indices[:, :k]))
        for method in CLUSTER_METHODS:
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                clustering = cluster_graph(adjacency, method, seed=0)
                times.append(time.perf_counter() - start)
            row = {
                "k": k,
                "method": method,
                "edges": adjacency.nnz // 2,
                "seconds": round(min(times), 3),
                "n_clusters": clustering.n_clusters,
                "ari_subclusters": round(adjusted_rand_score(sub, clustering.labels), 4),
                "ari_classes": round(adjusted_rand_score(y, clustering.labels), 4),
                "modularity": round(clustering.modularity, 4),
                "conductance": round(conductance(adjacency, clustering.labels), 4),
            }
            rows.append(row)
            print(
                f"k={k:<3} {method:<14} {row['seconds']:6.2f} s  K={row['n_clusters']:<4} "
                f"ARI(sub)={row['ari_subclusters']:.4f}  ARI(class)={row['ari_classes']:.4f}  "
                f"Q={row['modularity']:.4f}  Phi={row['conductance']:.4f}",
                flush=True,
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
