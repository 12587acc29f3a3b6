"""Independent reference implementations shared by several test files."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def brute_force_knn_graph(z: np.ndarray, k: int) -> sp.csr_matrix:
    """Unweighted graph linking i and j when either is among the other's k nearest (loops)."""
    z = z.astype(np.float64)
    n = z.shape[0]
    dense = np.zeros((n, n))
    for i in range(n):
        distances = np.linalg.norm(z - z[i], axis=1)
        distances[i] = np.inf
        dense[i, np.argsort(distances, kind="stable")[:k]] = 1.0
    return sp.csr_matrix(np.maximum(dense, dense.T))
