"""PCA projection against NumPy's SVD, and the torch path against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcc.engine.projection import Projection, fit_pca
from lcc.errors import LCCInputError


def spectrum_data(n: int, d: int, seed: int) -> np.ndarray:
    """Rows with clearly separated variances along random orthogonal directions, off-centre."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = 10.0 * 0.7 ** np.arange(d)
    return (rng.normal(size=(n, d)) * scales) @ basis.T + rng.normal(size=d) * 5


def svd_oracle(z: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, leading right singular vectors (D, dim) and their variances, from NumPy's SVD."""
    z = z.astype(np.float64)
    mean = z.mean(axis=0)
    _, singular, vt = np.linalg.svd(z - mean, full_matrices=False)
    return mean, vt[:dim].T, singular[:dim] ** 2 / (len(z) - 1)


@pytest.mark.parametrize(("n", "d", "dim"), [(500, 20, 5), (200, 520, 8)])
def test_pca_matches_svd(n: int, d: int, dim: int) -> None:
    # (200, 520) is wide and large enough for scikit-learn to pick its randomized solver
    z = spectrum_data(n, min(d, 40), seed=0)
    if d > z.shape[1]:  # embed in a larger space
        rng = np.random.default_rng(1)
        basis, _ = np.linalg.qr(rng.normal(size=(d, z.shape[1])))
        z = z @ basis.T
    projection = fit_pca(z, dim, seed=0)
    mean, components, variances = svd_oracle(z, dim)
    assert projection.components.shape == (d, dim) and projection.components.dtype == np.float32
    assert projection.mean.shape == (d,) and projection.mean.dtype == np.float32
    np.testing.assert_allclose(projection.mean, mean, rtol=1e-5, atol=1e-4)
    # same subspace: the projectors onto the two column spaces agree
    ours = projection.components.astype(np.float64)
    np.testing.assert_allclose(ours @ ours.T, components @ components.T, atol=1e-4)
    # same directions one by one (the spectrum has no ties), up to sign
    cosines = np.abs((ours * components).sum(axis=0))
    np.testing.assert_allclose(cosines, 1.0, atol=1e-4)
    # orthonormal columns, and the projected variance is the explained variance, in order
    np.testing.assert_allclose(ours.T @ ours, np.eye(dim), atol=1e-5)
    projected = projection.apply(z)
    np.testing.assert_allclose(projected.var(axis=0, ddof=1), variances, rtol=1e-3)


def test_pca_is_deterministic_under_a_seed() -> None:
    z = spectrum_data(300, 40, seed=2)
    a, b = fit_pca(z, 8, seed=3), fit_pca(z, 8, seed=3)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_array_equal(a.mean, b.mean)


def test_apply_numpy_flattens_trailing_dimensions() -> None:
    z = spectrum_data(100, 12, seed=4).reshape(100, 3, 4)
    projection = fit_pca(z, 3)
    flat = z.reshape(100, 12)
    expected = (flat - flat.mean(axis=0)) @ projection.components.astype(np.float64)
    out = projection.apply(z)
    assert out.shape == (100, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_apply_torch_matches_numpy_and_keeps_dtype(dtype: torch.dtype) -> None:
    z = spectrum_data(64, 10, seed=5)
    projection = fit_pca(z, 4)
    out = projection.apply(torch.tensor(z, dtype=dtype))
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (64, 4)
    tolerance = 0.5 if dtype == torch.bfloat16 else 1e-3
    np.testing.assert_allclose(
        out.float().numpy(), projection.apply(z), rtol=tolerance, atol=tolerance
    )


def test_apply_torch_gradient_matches_finite_differences() -> None:
    z = spectrum_data(20, 6, seed=6)
    projection = fit_pca(z, 3)
    x = torch.tensor(z[:5].reshape(5, 2, 3), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(projection.apply, (x,))
    # and the gradient of a sum is the row sums of the components, for every sample
    projection.apply(x).sum().backward()
    expected = projection.components.astype(np.float64).sum(axis=1).reshape(2, 3)
    np.testing.assert_allclose(x.grad.numpy(), np.broadcast_to(expected, (5, 2, 3)), rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_apply_torch_on_cuda() -> None:  # pragma: no cover - CPU-only CI
    z = spectrum_data(32, 8, seed=7)
    projection = fit_pca(z, 2)
    out = projection.apply(torch.tensor(z, device="cuda"))
    assert out.device.type == "cuda"
    np.testing.assert_allclose(out.cpu().numpy(), projection.apply(z), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("z", "dim", "match"),
    [
        (np.zeros((10, 4)), 4, r"smaller than min\(N, D\)"),
        (np.zeros((3, 8)), 3, r"smaller than min\(N, D\)"),
        (np.zeros((10, 4)), 0, "positive integer"),
        (np.zeros((10, 4)), 2.5, "positive integer"),
        (np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 2.0]]), 1, "NaN"),
        (np.zeros(10), 1, "shape"),
    ],
)
def test_fit_pca_rejects_bad_input(z: np.ndarray, dim: object, match: str) -> None:
    with pytest.raises(LCCInputError, match=match):
        fit_pca(z, dim)  # type: ignore[arg-type]


def test_apply_rejects_wrong_width_and_projection_checks_shapes() -> None:
    projection = fit_pca(spectrum_data(30, 6, seed=8), 2)
    with pytest.raises(LCCInputError, match="dimension 5"):
        projection.apply(np.zeros((4, 5)))
    with pytest.raises(LCCInputError, match="dimension 7"):
        projection.apply(torch.zeros(4, 7))
    with pytest.raises(LCCInputError, match="components"):
        Projection(np.zeros(3), np.zeros((4, 2)))


def test_fit_on_a_sample_uses_exactly_the_seeded_rows() -> None:
    z = spectrum_data(3_000, 30, seed=9)
    projection = fit_pca(z, 5, seed=4, sample=1_000)
    rows = np.sort(np.random.default_rng(4).choice(3_000, 1_000, replace=False))
    mean, components, _ = svd_oracle(z[rows], 5)
    np.testing.assert_allclose(projection.mean, mean, rtol=1e-5, atol=1e-4)
    ours = projection.components.astype(np.float64)
    np.testing.assert_allclose(ours @ ours.T, components @ components.T, atol=1e-4)
    assert np.abs(projection.mean - z.mean(axis=0)).max() > 1e-3  # not the full data's mean
    # and the sampled subspace is the full data's one up to sampling noise
    _, full, _ = svd_oracle(z, 5)
    np.testing.assert_allclose(ours @ ours.T, full @ full.T, atol=0.05)


def test_apply_in_chunks_matches_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    import lcc.engine.projection as projection_module

    z = spectrum_data(500, 16, seed=10)
    projection = fit_pca(z, 4)
    expected = (z - projection.mean.astype(np.float64)) @ projection.components.astype(np.float64)
    monkeypatch.setattr(projection_module, "APPLY_CHUNK_ENTRIES", 16 * 7)  # 7 rows a chunk
    chunked = projection.apply(z)
    assert chunked.shape == (500, 4) and chunked.dtype == np.float32
    np.testing.assert_allclose(chunked, expected, rtol=1e-4, atol=1e-3)


def test_float16_memory_map_fits_and_projects_like_its_float32_values(tmp_path) -> None:
    z16 = spectrum_data(2_000, 24, seed=11).astype(np.float16)
    np.save(tmp_path / "z.npy", z16)
    mapped = np.load(tmp_path / "z.npy", mmap_mode="r")
    from_map = fit_pca(mapped, 6, seed=2, sample=800)
    in_memory = fit_pca(z16.astype(np.float32), 6, seed=2, sample=800)
    np.testing.assert_array_equal(from_map.mean, in_memory.mean)
    np.testing.assert_allclose(from_map.components, in_memory.components, atol=1e-6)
    np.testing.assert_allclose(
        from_map.apply(mapped), in_memory.apply(z16.astype(np.float32)), rtol=1e-5, atol=1e-4
    )


def test_fit_pca_rejects_a_bad_sample_size() -> None:
    with pytest.raises(LCCInputError, match="sample"):
        fit_pca(spectrum_data(30, 6, seed=8), 2, sample=1)
