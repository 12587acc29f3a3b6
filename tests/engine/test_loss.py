"""The LCC loss against its formula, finite differences, and its zero / dtype / device contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcc.engine.loss import LCCLoss, lcc_loss
from lcc.engine.projection import Projection
from lcc.engine.targets import Targets
from lcc.errors import LCCInputError


def make_targets(n: int = 20, dim: int = 6, seed: int = 0) -> Targets:
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(n, n // 2, replace=False))
    return Targets(indices, rng.normal(size=(indices.size, dim)).astype(np.float32), n_samples=n)


def by_hand(z: np.ndarray, ids: np.ndarray, targets: Targets, squared: bool) -> float:
    """Eq. 8 over the batch's correctible rows, one sample at a time, in float64."""
    dense = targets.dense().astype(np.float64)
    flat = z.reshape(len(z), -1).astype(np.float64)
    d = flat.shape[1]
    terms = []
    for row, i in zip(flat, ids, strict=True):
        if targets.correctible[i]:
            dist = float(np.sqrt(np.sum((row - dense[i]) ** 2)))
            # the poster's squared loss and eq. 8 both divide by sqrt(d)
            terms.append(dist**2 / np.sqrt(d) if squared else dist / np.sqrt(d))
    return float(np.mean(terms)) if terms else 0.0


@pytest.mark.parametrize("squared", [False, True])
def test_value_equals_the_formula(squared: bool) -> None:
    targets = make_targets()
    loss = LCCLoss(targets, squared=squared)
    rng = np.random.default_rng(1)
    for _ in range(5):
        ids = rng.choice(20, 8, replace=True)
        z = rng.normal(size=(8, 2, 3))
        got = loss(torch.tensor(z, dtype=torch.float64), torch.tensor(ids))
        assert got.dtype == torch.float64 and got.ndim == 0
        assert float(got) == pytest.approx(by_hand(z, ids, targets, squared), rel=1e-6)


@pytest.mark.parametrize("squared", [False, True])
def test_functional_value_equals_the_formula(squared: bool) -> None:
    rng = np.random.default_rng(2)
    z, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    dist = np.linalg.norm(z - t, axis=1)
    expected = np.mean(dist**2 / 2) if squared else np.mean(dist / 2)  # d = 4: sqrt(d) = 2
    got = lcc_loss(torch.tensor(z), torch.tensor(t), squared=squared)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    mask = torch.tensor([True, False, True, False, False])
    masked = lcc_loss(torch.tensor(z), t, squared=squared, mask=mask)
    want = np.mean((dist**2 / 2 if squared else dist / 2)[[0, 2]])
    assert float(masked) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("squared", [False, True])
def test_gradient_matches_finite_differences(squared: bool) -> None:
    targets = make_targets(dim=4)
    loss = LCCLoss(targets, squared=squared)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # a mix of correctible and not
    assert 0 < targets.correctible[ids.numpy()].sum() < 10
    z = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, ids), (z,))
    t = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lcc_loss(x, t, squared=squared), (z,))


def test_gradient_reaches_z_only() -> None:
    z = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    lcc_loss(z, t).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert t.grad is None
    loss = LCCLoss(make_targets(dim=3))
    assert all(not b.requires_grad for b in loss.buffers())
    assert list(loss.parameters()) == []


def assert_differentiable_zero(value: torch.Tensor, z: torch.Tensor) -> None:
    assert value.dtype == z.dtype and float(value.detach()) == 0.0 and value.requires_grad
    value.backward()
    assert z.grad is not None and torch.equal(z.grad, torch.zeros_like(z))


def test_exact_zero_that_backpropagates() -> None:
    targets = make_targets()
    not_correctible = torch.tensor(np.flatnonzero(~targets.correctible)[:3])
    z = torch.randn(3, 6, requires_grad=True)
    assert_differentiable_zero(LCCLoss(targets)(z, not_correctible), z)
    z = torch.randn(3, 6, requires_grad=True)
    assert_differentiable_zero(LCCLoss()(z, torch.tensor([0, 1, 2])), z)
    z = torch.randn(0, 6, requires_grad=True)
    assert_differentiable_zero(LCCLoss(targets)(z, torch.zeros(0, dtype=torch.long)), z)
    none = Targets(np.zeros(0, np.int64), np.zeros((0, 6), np.float32), n_samples=20)
    z = torch.randn(3, 6, requires_grad=True)
    assert_differentiable_zero(LCCLoss(none)(z, torch.tensor([0, 1, 2])), z)
    z = torch.randn(2, 6, requires_grad=True)
    nobody = torch.zeros(2, dtype=torch.bool)
    assert_differentiable_zero(lcc_loss(z, z.detach() + 1, mask=nobody), z)


def test_zero_distance_gives_zero_gradient_not_nan() -> None:
    targets = make_targets()
    ids = torch.tensor(targets.indices[:3])
    z = torch.tensor(targets.vectors[:3], requires_grad=True)
    value = LCCLoss(targets)(z, ids)
    value.backward()
    assert float(value.detach()) == 0.0 and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("squared", [False, True])
def test_any_float_dtype(dtype: torch.dtype, squared: bool) -> None:
    targets = make_targets(n=50, dim=512, seed=3)
    ids = np.arange(0, 50, 2)
    z = np.random.default_rng(4).normal(size=(25, 512)) * 20  # squared norms overflow float16
    expected = by_hand(z, ids, targets, squared)
    zt = torch.tensor(z, dtype=dtype, requires_grad=True)
    value = LCCLoss(targets, squared=squared)(zt, torch.tensor(ids))
    assert value.dtype == dtype and torch.isfinite(value)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    assert float(value.detach()) == pytest.approx(expected, rel=tolerance)
    value.backward()
    assert zt.grad is not None and zt.grad.dtype == dtype and torch.isfinite(zt.grad).all()


def test_projection_is_applied_before_comparing() -> None:
    rng = np.random.default_rng(5)
    mean = rng.normal(size=8).astype(np.float32)
    components = np.linalg.qr(rng.normal(size=(8, 3)))[0].astype(np.float32)
    projection = Projection(mean=mean, components=components)
    targets = make_targets(n=10, dim=3)
    loss = LCCLoss(targets, projection=projection)
    z = torch.tensor(rng.normal(size=(10, 2, 4)), dtype=torch.float64)
    ids = torch.arange(10)
    projected = (z.reshape(10, 8).numpy() - mean) @ components
    assert float(loss(z, ids)) == pytest.approx(by_hand(projected, ids.numpy(), targets, False))
    applied = projection.apply(z.reshape(10, 8))
    np.testing.assert_allclose(np.asarray(applied), projected, rtol=1e-5, atol=1e-6)
    assert loss.projection is not None
    np.testing.assert_array_equal(loss.projection.components, components)
    assert LCCLoss(targets).projection is None
    with pytest.raises(LCCInputError, match="projection expects 8"):
        loss(torch.randn(10, 5), ids)
    with pytest.raises(LCCInputError, match="projection maps to 3"):
        LCCLoss(make_targets(n=10, dim=4), projection=projection)


def test_state_dict_round_trip_and_set_targets() -> None:
    rng = np.random.default_rng(6)
    projection = Projection(
        mean=rng.normal(size=5).astype(np.float32),
        components=rng.normal(size=(5, 6)).astype(np.float32),
    )
    source = LCCLoss(make_targets(), projection=projection)
    restored = LCCLoss()
    restored.load_state_dict(source.state_dict())
    z, ids = torch.randn(7, 5), torch.arange(7)
    assert torch.equal(source(z, ids), restored(z, ids))
    assert restored.n_samples == 20 and restored.dim == 6 and restored.n_correctible == 10
    restored.set_targets(None)
    assert not restored.has_targets and float(restored(z, ids)) == 0.0
    restored.set_targets(make_targets(dim=5))
    assert restored.dim == 5 and restored.projection_components.numel() == 0


def test_buffers_follow_module_to() -> None:
    loss = LCCLoss(make_targets()).to(torch.float64)
    assert loss.vectors.dtype == torch.float64 and loss.rows.dtype == torch.int64
    z = torch.randn(4, 6)
    assert loss(z, torch.arange(4)).dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    targets = make_targets(n=40, dim=16)
    z, ids = torch.randn(12, 16), torch.arange(12) * 3
    cpu = LCCLoss(targets)(z, ids)
    module = LCCLoss(targets).cuda()
    assert module.rows.is_cuda
    zc = z.cuda().requires_grad_(True)
    value = module(zc, ids.cuda())
    value.backward()
    assert value.is_cuda and float(value.detach()) == pytest.approx(float(cpu), rel=1e-5)
    half = module(z.cuda().half(), ids)
    assert half.dtype == torch.float16 and float(half) == pytest.approx(float(cpu), rel=2e-3)


def test_bad_inputs_are_rejected() -> None:
    loss = LCCLoss(make_targets())
    with pytest.raises(LCCInputError, match=r"indices must have shape \(4,\)"):
        loss(torch.randn(4, 6), torch.arange(3))
    with pytest.raises(LCCInputError, match="dimension 5 but the targets have 6"):
        loss(torch.randn(4, 5), torch.arange(4))
    with pytest.raises(LCCInputError, match=r"\[0, 20\)"):
        loss(torch.randn(2, 6), torch.tensor([0, 20]))
    with pytest.raises(LCCInputError, match=r"\[0, 20\)"):
        loss(torch.randn(2, 6), torch.tensor([-1, 2]))
    with pytest.raises(LCCInputError, match="integer dataset ids"):
        loss(torch.randn(2, 6), torch.tensor([0.0, 1.0]))
    with pytest.raises(LCCInputError, match="floating-point"):
        loss(torch.ones(2, 6, dtype=torch.long), torch.arange(2))
    with pytest.raises(LCCInputError, match="floating-point"):
        loss(np.ones((2, 6)), torch.arange(2))  # type: ignore[arg-type]
    with pytest.raises(LCCInputError, match="one target row per latent row"):
        lcc_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(LCCInputError, match="dimension 5 but z has dimension 4"):
        lcc_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(LCCInputError, match="mask"):
        lcc_loss(torch.randn(3, 4), torch.randn(3, 4), mask=torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("squared", [False, True])
def test_mixed_precision_latents_are_compared_with_their_targets_in_float32(
    squared: bool,
) -> None:
    # latents close to large targets: a bfloat16 difference keeps about 2 of their digits
    rng = np.random.default_rng(5)
    targets = make_targets(n=40, dim=64)
    ids = np.arange(40)
    dense = np.nan_to_num(targets.dense(), nan=0.0)
    near = dense + 10.0 + 0.01 * rng.normal(size=dense.shape)
    shifted = Targets(targets.indices, targets.vectors + 10.0, n_samples=40)
    z = torch.tensor(near, dtype=torch.bfloat16)
    exact = by_hand(z.float().numpy(), ids, shifted, squared)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module = LCCLoss(shifted, squared=squared)(z, torch.as_tensor(ids))
        functional = lcc_loss(
            z,
            torch.as_tensor(shifted.dense()).nan_to_num(),
            squared=squared,
            mask=torch.as_tensor(shifted.correctible),
        )
    for value in (module, functional):
        assert value.dtype == torch.bfloat16
        assert float(value) == pytest.approx(exact, rel=1e-2)


def test_the_projection_runs_in_float32_under_autocast() -> None:
    rng = np.random.default_rng(6)
    mean = rng.normal(size=32).astype(np.float32) * 100.0
    components = np.linalg.qr(rng.normal(size=(32, 4)))[0].astype(np.float32)
    projection = Projection(mean, components)
    z = torch.tensor(mean + rng.normal(size=(10, 32)).astype(np.float32))
    projected = (z.double() - torch.tensor(mean).double()) @ torch.tensor(components).double()
    vectors = (projected + 0.05 * torch.randn(10, 4, dtype=torch.float64)).float().numpy()
    targets = Targets(np.arange(10), vectors, n_samples=10)
    exact = by_hand(projected.numpy(), np.arange(10), targets, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = LCCLoss(targets, projection=projection)(z, torch.arange(10))
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("squared", [False, True])
def test_shares_averaged_as_data_parallelism_does_give_the_global_batch_gradient(
    squared: bool,
) -> None:
    """A global batch split over two 'processes' whose correctible counts differ: each share
    divides by the global count over two (what ``reduce_count`` receives under DDP); the average
    of the shares' gradients (what DDP applies) is the gradient of eq. 8 over the whole batch."""
    targets = make_targets()
    loss = LCCLoss(targets, squared=squared)
    rng = np.random.default_rng(3)
    ids = np.array([1, 3, 5, 7, 9, 11, 13, 15, 0, 2])
    ids = ids[rng.permutation(len(ids))]
    z = torch.tensor(rng.normal(size=(len(ids), 6)), requires_grad=True)
    # the oracle: eq. 8 over the global batch, differentiated
    full = loss(z, torch.tensor(ids))
    (expected,) = torch.autograd.grad(full, z)
    shares = [slice(0, 3), slice(3, len(ids))]
    counts = [int(targets.correctible[ids[part]].sum()) for part in shares]
    assert counts[0] != counts[1]  # unequal shares: a per-process mean would weigh them wrong
    world_count = torch.tensor(float(sum(counts)))
    grads = []
    for part in shares:
        piece = z[part]
        value = loss(piece, torch.tensor(ids[part]), reduce_count=lambda _: world_count / 2)
        grads.append(torch.autograd.grad(value, z)[0])
    torch.testing.assert_close((grads[0] + grads[1]) / 2, expected)
    # without the reduction each share is its own mean: not the global batch's gradient
    plain = [torch.autograd.grad(loss(z[p], torch.tensor(ids[p])), z)[0] for p in shares]
    assert not torch.allclose((plain[0] + plain[1]) / 2, expected)
