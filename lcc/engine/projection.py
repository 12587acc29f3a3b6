"""Linear projection of latents to their top principal components (optional step before k-NN).

Built for ImageNet-size latents: :func:`fit_pca` fits on a seeded sample of at most 100,000 rows
(a random sample gives the same leading subspace up to sampling noise, at a fraction of the
cost), and :meth:`Projection.apply` projects NumPy input in row chunks, so a memory-mapped
float16 ``(N, D)`` file is read once and never converted to float32 as a whole.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> z = rng.normal(size=(200, 3)) * [10.0, 1.0, 0.1]
>>> projection = fit_pca(z, 1)
>>> projection.components.shape, projection.apply(z).shape
((3, 1), (200, 1))
>>> bool(abs(projection.components[0, 0]) > 0.99)
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import overload

import numpy as np
import torch
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from lcc.engine.device import resolve_device
from lcc.errors import LCCInputError, as_latent_matrix, check_choice, check_finite

_BACKENDS = ("auto", "torch")

#: :func:`fit_pca` fits on a seeded random sample of this many rows when there are more.
PCA_SAMPLE_ROWS = 100_000
#: :meth:`Projection.apply` converts at most this many input entries to float32 at once.
APPLY_CHUNK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class Projection:
    """``z -> (z - mean) @ components``: ``mean`` is ``(D,)`` and ``components`` ``(D, p)`` float32.

    The columns of ``components`` are orthonormal, ordered by decreasing explained variance.
    """

    mean: np.ndarray
    components: np.ndarray
    _cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        components = np.ascontiguousarray(self.components, dtype=np.float32)
        if mean.ndim != 1 or components.ndim != 2 or components.shape[0] != mean.shape[0]:
            raise LCCInputError(
                f"Projection needs mean (D,) and components (D, p), got {mean.shape} and "
                f"{components.shape}"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "components", components)

    @property
    def input_dim(self) -> int:
        """Flattened latent dimension ``D`` the projection expects."""
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        """Output dimension ``p``."""
        return int(self.components.shape[1])

    @overload
    def apply(self, z: torch.Tensor) -> torch.Tensor: ...

    @overload
    def apply(self, z: np.ndarray) -> np.ndarray: ...

    def apply(self, z: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Project ``z`` of shape ``(B, ...)`` (flattened to ``(B, D)``) to ``(B, p)``.

        NumPy in, float32 NumPy out; a tensor in gives a tensor on its device and dtype, and
        gradients flow through to ``z``.

        >>> p = Projection(np.array([1.0, 0.0]), np.array([[0.0], [1.0]]))
        >>> p.apply(np.array([[5.0, 2.0]])).tolist()
        [[2.0]]
        >>> p.apply(torch.tensor([[5.0, 2.0]], dtype=torch.float64)).dtype
        torch.float64
        """
        if isinstance(z, torch.Tensor):
            flat = z.reshape(z.shape[0], -1) if z.ndim != 1 else z
            self._check_width(flat.shape[-1])
            dtype = flat.dtype if flat.dtype.is_floating_point else torch.float32
            mean, components = self._tensors(flat.device, dtype)
            return (flat.to(dtype) - mean) @ components
        array = np.asarray(z)
        if array.ndim == 0:
            raise LCCInputError("z must have shape (B, D, ...), got a scalar")
        if array.ndim == 1:
            self._check_width(array.shape[-1])
            return (array.astype(np.float32, copy=False) - self.mean) @ self.components
        flat = array.reshape(array.shape[0], -1)
        self._check_width(flat.shape[-1])
        out = np.empty((flat.shape[0], self.dim), dtype=np.float32)
        rows = max(1, APPLY_CHUNK_ENTRIES // max(1, flat.shape[1]))
        for start in range(0, flat.shape[0], rows):
            chunk = flat[start : start + rows].astype(np.float32, copy=False)
            np.matmul(chunk - self.mean, self.components, out=out[start : start + rows])
        return out

    def _check_width(self, width: int) -> None:
        if width != self.input_dim:
            raise LCCInputError(
                f"latents have flattened dimension {width} but the projection was fitted on "
                f"dimension {self.input_dim}; project latents of the layer it was fitted on"
            )

    def _tensors(
        self, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = (
                torch.as_tensor(self.mean, device=device, dtype=dtype),
                torch.as_tensor(self.components, device=device, dtype=dtype),
            )
        return self._cache[key]


def fit_pca(
    z: object,
    dim: int,
    *,
    seed: int = 0,
    sample: int = PCA_SAMPLE_ROWS,
    device: str | None = None,
    backend: str = "auto",
    checked: bool = False,
) -> Projection:
    """Fit the ``dim`` leading principal components of ``z`` (shape ``(N, ...)``, flattened).

    With more than ``sample`` rows, the components (and mean) are fitted on ``sample`` rows
    drawn at random with ``seed`` (read straight from a memory map: only those rows are
    loaded). scikit-learn's PCA chooses the solver (covariance eigendecomposition for tall data,
    exact SVD for small data, randomized SVD, seeded by ``seed``, for large wide data). ``dim``
    must be below ``min(N, D)``.

    ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``; :func:`lcc.engine.device.resolve_device`)
    fits with torch on that device instead: the float64 covariance of the same sample and its
    eigendecomposition, each component's sign fixed as scikit-learn fixes it (its largest
    entry positive), so both give the same components up to rounding (``backend="torch"``:
    that code on the CPU). ``checked=True``: the caller has already checked ``z`` for NaN/inf.

    >>> fit_pca(np.eye(4), 2).components.shape
    (4, 2)
    >>> fit_pca(np.eye(4), 2, backend="torch").components.shape
    (4, 2)
    """
    target = resolve_device(device, z, backend=check_choice(backend, _BACKENDS, name="backend"))
    n, d = _shape(z)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise LCCInputError(f"PCA dim must be a positive integer, got {dim!r}")
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 2:
        raise LCCInputError(f"PCA sample must be an integer >= 2, got {sample!r}")
    if dim >= min(n, d):
        raise LCCInputError(
            f"PCA dim={dim} must be smaller than min(N, D) = min({n}, {d}); choose dim <= "
            f"{min(n, d) - 1} or skip PCA"
        )
    if n > sample and isinstance(z, (np.ndarray, torch.Tensor)):
        rows = np.sort(np.random.default_rng(seed).choice(n, int(sample), replace=False))
        if dim >= min(sample, d):
            raise LCCInputError(f"PCA dim={dim} must be smaller than the sample of {sample} rows")
        tensor = isinstance(z, torch.Tensor)
        picked = z.reshape(n, -1)[torch.from_numpy(rows).to(z.device) if tensor else rows]
    else:
        picked = z
    if target is not None:
        return _torch_pca(picked, int(dim), target, checked)
    matrix = as_latent_matrix(picked, checked=checked)
    # One BLAS thread: the fit is a (D x D) covariance and its eigendecomposition, where
    # multi-threaded LAPACK on a busy 2-core machine was measured 30-100x slower (a 512 x 512
    # eigh: 0.03 s on one thread, 0.1-3.8 s on two).
    with threadpool_limits(limits=1, user_api="blas"):
        pca = PCA(n_components=int(dim), random_state=seed).fit(matrix)
    return Projection(pca.mean_.astype(np.float32), pca.components_.T.astype(np.float32))


def _torch_pca(z: object, dim: int, device: torch.device, checked: bool) -> Projection:
    """The ``dim`` leading principal components of the rows of ``z``, by torch on ``device``."""
    if isinstance(z, torch.Tensor):
        rows = z.detach().reshape(z.shape[0], -1)
        if not checked:
            as_latent_matrix(rows[:2])  # dtype and shape checks on two rows
            check_finite(rows)
    else:
        rows = torch.from_numpy(as_latent_matrix(z, checked=checked))
    with torch.no_grad():
        x = rows.to(device, torch.float64)
        mean = x.mean(dim=0)
        x -= mean
        covariance = (x.T @ x) / max(1, x.shape[0] - 1)
        del x
        _, vectors = torch.linalg.eigh(covariance)
        components = vectors[:, -dim:].flip(1)
        largest = components.abs().argmax(dim=0)
        signs = torch.sign(components[largest, torch.arange(dim, device=device)])
        components *= torch.where(signs == 0, 1.0, signs)
    return Projection(
        mean.to(torch.float32).cpu().numpy(), components.to(torch.float32).cpu().numpy()
    )


def _shape(z: object) -> tuple[int, int]:
    """(N, D) of latents without converting them (a memory map stays on disk)."""
    array = isinstance(z, np.ndarray) and z.dtype != object
    if (array or isinstance(z, torch.Tensor)) and z.ndim >= 2:
        return int(z.shape[0]), int(np.prod(z.shape[1:]))
    matrix = as_latent_matrix(z, checked=True)  # values are checked where they are used
    return int(matrix.shape[0]), int(matrix.shape[1])
