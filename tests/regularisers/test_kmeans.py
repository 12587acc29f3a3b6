"""The kmeans regulariser: its term against the paper's loss, the ramp, the centroid draws,
re-seeding of empty centroids and exact resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcc.errors import LCCInputError
from lcc.regularisers import Batch, TrainingLatents, build_regulariser, regulariser_class
from lcc.regularisers.kmeans import KMeansCentroids
from lcc.synthetic import gaussian_mixture
from lcc.zoo.latents import LatentRecorder

DIM, N_CLASSES = 8, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class MLP(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(DIM, 12)
        self.act = nn.ReLU()
        self.embed = nn.Linear(12, 5)
        self.head = nn.Linear(5, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(self.act(self.hidden(x)))))


def data(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = gaussian_mixture(n, DIM, N_CLASSES, 2, separation=3.0, seed=seed)
    return torch.from_numpy(x), torch.from_numpy(y)


def batch_of(model: nn.Module, reg: KMeansCentroids, x, y, rows, epoch: int = 0) -> Batch:
    with LatentRecorder(model, list(reg.layers)) as recorder:
        logits = model(x[rows])
    return Batch(dict(recorder.outputs), y[rows], torch.as_tensor(rows), logits, epoch)


def bound(layers=("act", "embed"), seed: int = 0, **options) -> tuple[MLP, KMeansCentroids]:
    model = MLP(seed)
    reg = KMeansCentroids(layers=list(layers), **options)
    reg.bind(model, num_classes=N_CLASSES, sample=data(16, seed=9)[0])
    return model, reg


def training_latents(model: nn.Module, reg: KMeansCentroids, x, y) -> TrainingLatents:
    with torch.no_grad(), LatentRecorder(model, list(reg.layers)) as recorder:
        model(x)
    latents = {name: value.numpy().copy() for name, value in recorder.outputs.items()}
    return TrainingLatents(latents, y.numpy(), None, "fresh", 0.0)


def test_registered_with_help_and_validated_options() -> None:
    assert regulariser_class("kmeans") is KMeansCentroids
    reg = build_regulariser("kmeans:layers=act,embed,centroids=4,6,w=0.2,ramp_shape=sigmoid")
    assert reg.options.centroids == [4, 6] and reg.weight == 0.2 and not reg.labeled_only
    for bad in (
        "reinit=0",
        "ramp=-1",
        "ramp_shape=cosine",
        "layers=output",
        "centroids=3,0",
        "seed=-2",
    ):
        with pytest.raises(LCCInputError):
            build_regulariser(f"kmeans:{bad}")
    model = MLP()
    with pytest.raises(LCCInputError, match="one per layer"):
        build_regulariser("kmeans:layers=act,centroids=4,6").bind(
            model, num_classes=3, sample=data()[0]
        )
    with pytest.raises(LCCInputError, match="sample"):
        KMeansCentroids(layers=["act"]).bind(model, num_classes=3)
    with pytest.raises(LCCInputError, match="needs layers"):
        KMeansCentroids().bind(model, num_classes=3, sample=data()[0])
    with pytest.raises(LCCInputError, match="no layer 'nope'"):
        KMeansCentroids(layers=["nope"]).bind(model, num_classes=3, sample=data()[0])


@pytest.mark.parametrize("shape", ["linear", "sigmoid"])
def test_beta_is_zero_in_warmup_then_ramps_to_weight(shape: str) -> None:
    reg = KMeansCentroids(layers=["act"], weight=0.4, warmup=2, ramp=3, ramp_shape=shape)
    fractions = [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # 3 partial epochs after 2 of warmup
    if shape == "sigmoid":
        fractions = [0.0 if f == 0 else math.exp(-5 * (1 - f) ** 2) for f in fractions]
    got = [reg.weight_at(epoch) for epoch in range(7)]
    assert got == pytest.approx([0.4 * f for f in fractions])
    step = KMeansCentroids(layers=["act"], weight=0.4, warmup=2, ramp=0)
    assert [step.weight_at(e) for e in range(4)] == [0.0, 0.0, 0.4, 0.4]


def test_bind_sizes_centroids_from_the_pooled_layers() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    sample = torch.randn(5, 1, 8, 8)
    flat = KMeansCentroids(layers=["1"])
    flat.bind(model, num_classes=2, sample=sample)
    avg = KMeansCentroids(layers=["1", "3"], centroids=[3, 7])
    avg.pool = "avg"
    avg.bind(model, num_classes=2, sample=sample)
    assert [tuple(c.shape) for c in flat.centroids] == [(4, 4 * 36)]  # 2 x classes
    assert [tuple(c.shape) for c in avg.centroids] == [(3, 4), (7, 2)]
    assert {id(p) for p in avg.parameters()} == {id(c) for c in avg.centroids}
    assert model.training  # modes restored


def loop_term(lc: np.ndarray, labeled: np.ndarray) -> float:
    n, m = labeled.sum(), (~labeled).sum()
    return sum(v / n if lab else v / m for v, lab in zip(lc, labeled, strict=True))


def test_trainer_total_equals_the_papers_loss() -> None:
    model, reg = bound(weight=0.3, warmup=0, ramp=0)
    x, y = data()
    rows = np.arange(20)
    labels = y[rows].clone()
    labels[rows % 3 != 0] = -1  # 7 labelled, 13 unlabelled
    batch = batch_of(model, reg, x[rows], labels, np.arange(20))
    term = reg(batch)
    # by hand: per-sample l_c over both layers, then the paper's weighting
    centroids = [c.detach().numpy().astype(np.float64) for c in reg.centroids]
    latents = [batch.latents[n].detach().numpy().astype(np.float64) for n in reg.layers]
    lc = np.array(
        [
            sum(min(((z[b] - c) ** 2).sum(1)) for z, c in zip(latents, centroids, strict=True))
            for b in range(20)
        ]
    )
    labeled = labels.numpy() >= 0
    assert term.item() == pytest.approx(loop_term(lc, labeled), rel=1e-5)
    ce = F.cross_entropy(batch.logits, labels, ignore_index=-1)  # mean over the labelled rows
    total = ce + reg.weight_at(0) * term
    ce_rows = F.cross_entropy(batch.logits, labels.clamp_min(0), reduction="none").detach()
    paper = sum(
        (ce_rows[b].item() + 0.3 * lc[b]) / labeled.sum()
        if labeled[b]
        else 0.3 * lc[b] / (~labeled).sum()
        for b in range(20)
    )
    assert total.item() == pytest.approx(paper, rel=1e-5)
    total.backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in reg.centroids)


def test_compute_draws_labelled_training_latents_evenly_over_classes() -> None:
    model, reg = bound(reinit=2, seed=5)
    x, y = data(90)
    y = y.clone()
    y[torch.arange(90) % 2 == 0] = -1
    latents = training_latents(model, reg, x, y)
    assert [reg.needs_training_latents(e) for e in range(4)] == [True, True, False, False]
    state = reg.compute(latents, epoch=0)
    again = reg.compute(latents, epoch=0)["centroids"]  # a function of (seed, epoch)
    assert all(np.array_equal(a, b) for a, b in zip(state["centroids"], again, strict=True))
    reg.install(state)
    labels = y.numpy()
    for name, centroids in zip(reg.layers, reg.centroids, strict=True):
        table = latents.latents[name]
        rows = [int(np.flatnonzero((table == c).all(1))[0]) for c in centroids.detach().numpy()]
        assert (labels[rows] >= 0).all()  # labelled samples only
        assert np.bincount(labels[rows], minlength=N_CLASSES).tolist() == [2, 2, 2]
    other = reg.compute(latents, epoch=1)["centroids"][0]
    assert not np.array_equal(other, state["centroids"][0])
    assert reg.epoch_stats()["reinitialised"] == 1


def test_empty_centroids_are_reseeded_from_recent_latents_and_counted() -> None:
    model, reg = bound(layers=["embed"], reinit=1, centroids=4)
    x, y = data()
    reg.start_epoch(0)
    reg.install(reg.compute(training_latents(model, reg, x, y), 0))
    with torch.no_grad():
        reg.centroids[0][2] = 1e3  # wins no sample
    before = reg.centroids[0].detach().clone()
    seen = []
    for start in range(0, 120, 30):
        batch = batch_of(model, reg, x, y, np.arange(start, start + 30))
        seen.append(batch.latents["embed"].detach())
        reg(batch)
    assert reg.epoch_stats()["empty"] == 1
    reg.eval()
    reg(batch_of(model, reg, x, y, np.arange(30)))  # not counted outside training
    reg.train()
    assert int(reg.counts_0.sum()) == 120
    reg.start_epoch(1)
    after = reg.centroids[0].detach()
    assert reg.epoch_stats() == {"empty": 0, "reseeded": 1, "reinitialised": 0}
    torch.testing.assert_close(after[[0, 1, 3]], before[[0, 1, 3]], rtol=0, atol=0)
    recent = torch.cat(seen)
    assert (recent == after[2]).all(1).any()  # a latent seen in the epoch
    assert int(reg.counts_0.sum()) == 0
    with torch.no_grad():
        reg.centroids[0][3] = 1e3
    reg(batch_of(model, reg, x, y, np.arange(30)))
    counts, centroids = reg.counts_0.clone(), reg.centroids[0].detach().clone()
    reg.start_epoch(1)  # once per epoch (resume mid-epoch): a second call changes nothing
    assert torch.equal(reg.counts_0, counts) and torch.equal(reg.centroids[0], centroids)


def test_no_reseeding_in_epochs_that_draw_all_centroids_again() -> None:
    model, reg = bound(layers=["embed"], reinit=3, centroids=4)
    x, y = data()
    with torch.no_grad():
        reg.centroids[0][1] = 1e3
    reg.start_epoch(0)
    reg(batch_of(model, reg, x, y, np.arange(60)))
    reg.start_epoch(1)
    assert reg.epoch_stats()["reseeded"] == 0 and reg.centroids[0][1, 0].item() == 1e3


def run_steps(model, reg, optimiser, x, y, epochs: range) -> list[dict]:
    """A tiny training loop in the trainer's order; returns epoch_stats() of each epoch."""
    generator = torch.Generator().manual_seed(epochs.start)
    stats = []
    for epoch in epochs:
        reg.start_epoch(epoch)
        if reg.needs_training_latents(epoch):
            reg.install(reg.compute(training_latents(model, reg, x, y), epoch))
        if epoch == 1:
            with torch.no_grad():
                reg.centroids[1][0] = 1e3  # wins no sample: re-seeded at the next start
        for _ in range(3):
            rows = torch.randperm(x.shape[0], generator=generator)[:32].numpy()
            batch = batch_of(model, reg, x, y, rows, epoch)
            loss = F.cross_entropy(batch.logits, batch.y, ignore_index=-1)
            loss = loss + reg.weight_at(epoch) * reg(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        stats.append(reg.epoch_stats())
    return stats


def test_state_dict_round_trip_is_exact_and_resume_continues_identically() -> None:
    x, y = data()
    y = torch.where(torch.arange(120) % 4 == 0, y, -1)

    def fresh():
        model, reg = bound(weight=0.5, warmup=0, ramp=1, reinit=1, seed=3)
        return model, reg, torch.optim.Adam([*model.parameters(), *reg.parameters()], lr=1e-2)

    model, reg, optimiser = fresh()
    assert run_steps(model, reg, optimiser, x, y, range(0, 2))[1]["empty"] >= 1
    buffer = io.BytesIO()
    state = {"model": model.state_dict(), "reg": reg.state_dict(), "opt": optimiser.state_dict()}
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    model2, reg2, optimiser2 = fresh()
    model2.load_state_dict(loaded["model"])
    reg2.load_state_dict(loaded["reg"])
    optimiser2.load_state_dict(loaded["opt"])
    for key, value in reg.state_dict().items():
        other = reg2.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    unbound = KMeansCentroids(layers=["act", "embed"])
    unbound.load_state_dict(loaded["reg"])  # shapes from the checkpoint
    assert torch.equal(unbound.centroids[1], reg.centroids[1])

    stats = run_steps(model, reg, optimiser, x, y, range(2, 4))
    assert run_steps(model2, reg2, optimiser2, x, y, range(2, 4)) == stats
    assert stats[0]["reseeded"] >= 1  # the resumed run re-seeded from the saved reservoir
    for a, b in zip(
        [*model.parameters(), *reg.parameters()],
        [*model2.parameters(), *reg2.parameters()],
        strict=True,
    ):
        assert torch.equal(a, b)


def test_centroids_train_with_the_network_and_the_term_falls() -> None:
    model, reg = bound(weight=1.0, warmup=0, ramp=0, reinit=1)
    x, y = data(120)
    y = torch.where(torch.arange(120) % 6 == 0, y, -1)
    reg.start_epoch(0)
    reg.install(reg.compute(training_latents(model, reg, x, y), 0))
    optimiser = torch.optim.SGD([*model.parameters(), *reg.parameters()], lr=0.05)
    start = reg.centroids[0].detach().clone()
    terms = []
    for _ in range(40):
        batch = batch_of(model, reg, x, y, np.arange(120))
        term = reg(batch)
        loss = F.cross_entropy(batch.logits, batch.y, ignore_index=-1) + term
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        terms.append(term.item())
    assert terms[-1] < 0.5 * terms[0]
    assert not torch.equal(reg.centroids[0].detach(), start)


def _ddp_rank(rank: int, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        model = nn.Sequential(nn.Identity())
        reg = KMeansCentroids(layers=["0"], centroids=4, reinit=1, seed=0)
        reg.bind(model, num_classes=2, sample=torch.zeros(4, 2))
        start = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [1e3, 1e3]])
        reg.install({"centroids": [start.numpy()]})
        reg.start_epoch(1)
        # rank 0 sees points near centroids 0 and 1, rank 1 near 0 and 2; none near 3
        near = start[[0, 1]] if rank == 0 else start[[0, 2]]
        z = near.repeat(8, 1) + 0.1 * torch.randn(
            16, 2, generator=torch.Generator().manual_seed(rank)
        )
        batch = Batch({"0": z}, torch.zeros(16, dtype=torch.long), torch.arange(16), z)
        reg(batch)
        reg.start_epoch(2)
        torch.save(
            {"centroids": reg.centroids[0].detach(), **reg.epoch_stats()}, f"{folder}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_distributed_processes_agree_on_the_reseeded_centroids(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_rank, args=(str(tmp_path),), nprocs=2, start_method="fork")
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert torch.equal(results[0]["centroids"], results[1]["centroids"])
    assert results[0]["reseeded"] == results[1]["reseeded"] == 1  # only centroid 3: summed counts
    centroids = results[0]["centroids"]
    assert centroids[:3].tolist() == [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]
    assert centroids[3].abs().max() < 20  # re-seeded from a latent
