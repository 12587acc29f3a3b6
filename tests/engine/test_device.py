"""The refresh's torch path (the code a GPU runs), checked on CPU tensors against the CPU path
(faiss, scikit-learn, NumPy) and against brute force; bad device input; the GPU itself when
there is one (``-m cuda``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from lcc.engine import device as device_module
from lcc.engine.device import empty_rows, place_rows, resolve_device, shrinking_blocks
from lcc.engine.exact_search import faiss_gpu_module, torch_search_tensors
from lcc.engine.knn import knn, search
from lcc.engine.match import match_clusters
from lcc.engine.projection import fit_pca
from lcc.engine.refresh import Refresh, refresh
from lcc.engine.targets import approximate_targets, exact_targets
from lcc.errors import LCCInputError
from lcc.synthetic import gaussian_mixture

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def brute_force_neighbours(z: np.ndarray, k: int, metric: str = "l2") -> np.ndarray:
    """(N, k) ids of each row's k nearest other rows, float64, one row at a time."""
    rows = z.astype(np.float64)
    if metric == "cosine":
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    out = np.empty((len(rows), k), np.int64)
    for i, row in enumerate(rows):
        distances = ((rows - row) ** 2).sum(axis=1)
        distances[i] = np.inf
        out[i] = np.argsort(distances, kind="stable")[:k]
    return out


def data(n: int = 1_500, dim: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    z, y, _ = gaussian_mixture(n, dim, 4, 3, separation=1.0, seed=seed)
    return np.asarray(z, np.float32), np.asarray(y)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_torch_knn_finds_the_brute_force_neighbours(metric: str) -> None:
    z, _ = data(600, 16)
    found = knn(z, 7, metric=metric, backend="torch")
    truth = brute_force_neighbours(z, 7, metric)
    # continuous random data: no ties, so the sets (and orders) agree with the float64 oracle
    assert (np.sort(found.indices, axis=1) == np.sort(truth, axis=1)).all()
    assert (found.indices == truth).mean() > 0.999
    assert (np.diff(found.distances, axis=1) >= 0).all()


def test_torch_knn_equals_faiss_flat() -> None:
    z, _ = data()
    faiss_nb, torch_nb = knn(z, 10, backend="faiss"), knn(z, 10, backend="torch")
    assert (faiss_nb.indices == torch_nb.indices).mean() > 0.999
    np.testing.assert_allclose(torch_nb.distances, faiss_nb.distances, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base_rows", [None, 7, 100, 1_000])
@pytest.mark.parametrize("block_entries", [1 << 24, 50_000])
def test_streamed_and_blocked_search_gives_the_same_neighbours(
    base_rows: int | None, block_entries: int
) -> None:
    # base chunks merged (latents streamed from host memory) and small query blocks: same k-NN
    z = torch.from_numpy(data(400, 8)[0])
    whole_i, whole_d = torch_search_tensors(z, z, 6)
    part_i, part_d = torch_search_tensors(z, z, 6, block_entries=block_entries, base_rows=base_rows)
    assert torch.equal(part_i, whole_i)
    torch.testing.assert_close(part_d, whole_d, rtol=1e-6, atol=1e-5)
    truth = brute_force_neighbours(z.numpy(), 5)
    assert (part_i[:, 1:].numpy() == truth).mean() > 0.999


def test_duplicates_never_list_a_row_as_its_own_neighbour() -> None:
    z = np.repeat(data(50, 4)[0], 3, axis=0)
    found = knn(z, 4, backend="torch")
    assert not (found.indices == np.arange(len(z))[:, None]).any()
    assert all(len(set(row.tolist())) == 4 for row in found.indices)


def test_torch_pca_matches_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    z = (rng.normal(size=(2_000, 20)) * np.linspace(5.0, 0.1, 20)).astype(np.float32)
    for sample in (100_000, 700):  # all rows, then the same seeded sample
        cpu = fit_pca(z, 6, seed=3, sample=sample)
        torch_fit = fit_pca(z, 6, seed=3, sample=sample, backend="torch")
        np.testing.assert_allclose(torch_fit.mean, cpu.mean, atol=1e-5)
        np.testing.assert_allclose(torch_fit.components, cpu.components, atol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_torch_exact_targets_equal_the_cpu_ones(metric: str) -> None:
    z, y = data()
    cc = np.random.default_rng(2).random(len(z)) < 0.7
    cpu = exact_targets(z, y, cc, 5, metric=metric)
    on_torch = exact_targets(z, y, cc, 5, metric=metric, backend="torch")
    assert cpu.n_correctible > 100
    assert np.array_equal(on_torch.indices, cpu.indices)
    np.testing.assert_allclose(on_torch.vectors, cpu.vectors, rtol=1e-5, atol=1e-5)


def test_torch_approximate_targets_equal_the_cpu_ones() -> None:
    z, y = data()
    clusters = np.random.default_rng(3).integers(0, 12, len(z))
    matching = match_clusters(clusters, y)
    cpu = approximate_targets(z, y, clusters, matching, seed=4)
    on_torch = approximate_targets(z, y, clusters, matching, seed=4, backend="torch")
    assert cpu.n_correctible > 100
    assert np.array_equal(on_torch.indices, cpu.indices)
    assert np.array_equal(on_torch.vectors, cpu.vectors)


@pytest.mark.parametrize(
    "options",
    [{}, {"pca": 8}, {"targets": "approximate"}, {"metric": "cosine"}, {"weights": "rbf"}],
)
def test_torch_refresh_gives_the_cpu_clusters_and_targets(options: dict) -> None:
    z, y = data(3_000, 32)
    cpu = refresh(z, y, k=5, seed=0, **options)
    on_torch = refresh(z, y, k=5, seed=0, backend="torch", **options)
    assert cpu.targets.n_correctible > 100
    assert np.array_equal(on_torch.clusters, cpu.clusters)
    assert np.array_equal(on_torch.targets.indices, cpu.targets.indices)
    np.testing.assert_allclose(on_torch.targets.vectors, cpu.targets.vectors, atol=1e-5)


def test_torch_refresh_accepts_a_tensor_and_a_float16_memory_map(tmp_path) -> None:
    z, y = data(1_000, 16)
    np.save(tmp_path / "z.npy", z.astype(np.float16))
    mapped = np.load(tmp_path / "z.npy", mmap_mode="r")
    reference = refresh(mapped, y, k=5, seed=0, pca=4)
    for latents in (mapped, torch.from_numpy(z.astype(np.float16).astype(np.float32))):
        result = refresh(latents, y, k=5, seed=0, pca=4, backend="torch")
        assert np.array_equal(result.clusters, reference.clusters)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16  # not converted


def test_the_caller_latents_are_not_modified() -> None:
    z, y = data(500, 8)
    tensor = torch.from_numpy(z.copy())
    knn(z, 3, backend="torch", metric="cosine")
    refresh(tensor, y, k=3, backend="torch")
    assert np.array_equal(tensor.numpy(), z)


def test_nan_is_one_line_on_every_path() -> None:
    z, y = data(300, 8)
    z[17, 2] = np.nan
    for call in (
        lambda: refresh(z, y, k=3, backend="torch"),
        lambda: refresh(torch.from_numpy(z), y, k=3),
        lambda: knn(torch.from_numpy(z), 3, backend="torch"),
        lambda: exact_targets(z, y, np.ones(len(z), bool), 3, backend="torch"),
        lambda: fit_pca(z, 2, backend="torch"),
    ):
        with pytest.raises(LCCInputError, match=r"NaN or inf in 1 row\(s\) \(first: \[17\]\)"):
            call()
    with pytest.raises(LCCInputError, match="latents of layer 'fc' contains NaN"):
        refresh(z, y, k=3, name="latents of layer 'fc'")


def test_refresh_scans_the_latents_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # the check stage scans every row; knn, PCA and targets trust it (no second full scan)
    z, y = data(2_000, 16)
    scanned: list[int] = []
    original = np.isfinite

    def counting(values, *args, **kwargs):
        if np.ndim(values) == 2 and np.shape(values)[1] == z.shape[1]:  # a scan of latent rows
            scanned.append(int(np.size(values)))
        return original(values, *args, **kwargs)

    monkeypatch.setattr(np, "isfinite", counting)
    for options in ({}, {"pca": 4}, {"targets": "approximate"}):
        scanned.clear()
        refresh(z, y, k=5, seed=0, **options)
        assert sum(scanned) == z.size, options


def test_out_of_memory_retries_with_smaller_blocks_then_says_what_to_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    z = torch.from_numpy(data(300, 8)[0])
    tried: list[int] = []

    def search(entries: int) -> tuple[torch.Tensor, torch.Tensor]:
        tried.append(entries)
        if entries > 20_000:  # a GPU that holds only small distance blocks
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return torch_search_tensors(z, z, 4, block_entries=entries)

    indices, _ = shrinking_blocks(search, 1 << 20, torch.device("cpu"))
    assert torch.equal(indices, torch_search_tensors(z, z, 4)[0])
    assert tried == [1 << 20, 1 << 18, 1 << 16, 1 << 14]
    assert capsys.readouterr().err.count("ran out of memory") >= 1

    def never(entries: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(LCCInputError, match=r"use --refresh-device cpu$"):
        shrinking_blocks(never, 1 << 20, torch.device("cpu"))


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line() -> None:
    z, y = data(200, 4)
    for call in (
        lambda: refresh(z, y, k=3, device="cuda"),
        lambda: knn(z, 3, device="cuda"),
        lambda: fit_pca(z, 2, device="cuda"),
        lambda: exact_targets(z, y, np.ones(len(z), bool), 3, device="cuda"),
        lambda: search(z, z[:3], 2, device="cuda"),
    ):
        with pytest.raises(LCCInputError, match=r"^CUDA is not available on this machine; use"):
            call()


def test_device_names() -> None:
    assert resolve_device(None, np.zeros((2, 2))) is None
    assert resolve_device("auto", torch.zeros(2, 2)) is None
    assert resolve_device("cpu", torch.zeros(2, 2)) is None
    assert resolve_device("cpu", None, backend="torch") == torch.device("cpu")
    for bad in ("gpu", "tpu:0", 3):
        with pytest.raises(LCCInputError, match="device"):
            resolve_device(bad)
    with pytest.raises(LCCInputError, match="backend"):
        refresh(*data(100, 4), k=3, backend="cupy")


# ------------------------------------------------------------------------------ on a GPU


def assert_same_refresh(gpu: Refresh, cpu: Refresh) -> None:
    """Same clusters and targets; a GPU's products round differently from the CPU's, so a
    near-tie may swap one k-NN edge and move a few samples: then ARI >= 0.99."""
    if not np.array_equal(gpu.clusters, cpu.clusters):
        assert adjusted_rand_score(cpu.clusters, gpu.clusters) >= 0.99
        return
    assert np.array_equal(gpu.targets.indices, cpu.targets.indices)
    np.testing.assert_allclose(gpu.targets.vectors, cpu.targets.vectors, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_cuda_refresh_equals_the_cpu_path() -> None:
    z, y = data(3_000, 32)
    for options in ({}, {"pca": 8}, {"targets": "approximate"}):
        cpu = refresh(z, y, k=5, seed=0, **options)
        for gpu in (
            refresh(z, y, k=5, seed=0, device="cuda", **options),
            refresh(torch.from_numpy(z).cuda(), y, k=5, seed=0, **options),  # auto: where z is
        ):
            assert_same_refresh(gpu, cpu)


@pytest.mark.cuda
@needs_cuda
def test_cuda_knn_matches_brute_force_under_tf32_settings() -> None:
    z, _ = data(2_000, 64)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # a user's setting must not lower the search's
    try:
        found = knn(torch.from_numpy(z).cuda(), 8)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert (np.sort(found.indices, 1) == np.sort(brute_force_neighbours(z, 8), 1)).mean() > 0.999


@pytest.mark.cuda
@needs_cuda
def test_cuda_latents_that_do_not_fit_are_streamed_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    z, y = data(2_000, 16)
    monkeypatch.setattr(device_module, "free_bytes", lambda device: 4 * 16 * 600)
    placed = place_rows(z, torch.device("cuda"))
    assert not placed.resident and placed.rows.is_pinned() and placed.chunk_rows < len(z)
    streamed = refresh(z, y, k=5, seed=0, device="cuda")
    assert capsys.readouterr().err.count("do not fit in the free GPU memory") == 1
    assert_same_refresh(streamed, refresh(z, y, k=5, seed=0))
    assert not empty_rows(10_000, 4, torch.device("cuda")).is_cuda  # 160 kB: pinned


@pytest.mark.cuda
@pytest.mark.skipif(faiss_gpu_module() is None, reason="needs a faiss GPU build and a GPU")
def test_faiss_gpu_and_torch_find_the_same_neighbours() -> None:
    z, _ = data(3_000, 32)
    on_gpu = torch.from_numpy(z).cuda()
    with_faiss = knn(on_gpu, 6)  # backend "auto": faiss's GPU brute force
    with_torch = knn(on_gpu, 6, backend="torch")
    assert (with_faiss.indices == with_torch.indices).mean() > 0.999
    np.testing.assert_allclose(with_faiss.distances, with_torch.distances, atol=1e-4)
