"""--refresh-bn: the fresh pass's BatchNorm statistics, against formulas written here with numpy
on a model whose running statistics are deliberately stale."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lcc.engine.match import match_clusters
from lcc.regularisers.lcc import LCC
from lcc.train.collect import collect_fresh
from lcc.train.exchange import SingleProcess
from lcc.train.loop import Regularisation
from lcc.zoo.batchnorm import batch_statistics, recalibrate

N, BATCH, EPS = 96, 16, 1e-5


def stale_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(fc=nn.Linear(4, 6), bn=nn.BatchNorm1d(6), act=nn.ReLU(), head=nn.Linear(6, 3))
    )
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.bias.uniform_(-1.0, 1.0)
        model.bn.running_mean.fill_(5.0)  # stale: far from the data's statistics
        model.bn.running_var.fill_(0.1)
    model.train()
    return model


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 4, generator=generator) * 2 + 1
    return x, torch.randint(0, 3, (N,), generator=generator)


def loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y, torch.arange(N)), batch_size=BATCH, shuffle=False)


def pre_bn(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.fc(x).double().numpy()


def normalise(h: np.ndarray, mean: np.ndarray, var: np.ndarray, model: nn.Module) -> np.ndarray:
    weight = model.bn.weight.detach().double().numpy()
    bias = model.bn.bias.detach().double().numpy()
    return (h - mean) / np.sqrt(var + EPS) * weight + bias


def batch_oracle(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Train-mode BatchNorm with frozen statistics: each batch normalised by its own mean and
    biased variance."""
    h = pre_bn(model, x)
    out = np.empty_like(h)
    for start in range(0, N, BATCH):
        part = h[start : start + BATCH]
        out[start : start + BATCH] = normalise(part, part.mean(0), part.var(0), model)
    return out


def recalibrated_stats(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[np.ndarray, ...]:
    """Precise BN: the mean over batches of a seeded sample of the batch means and unbiased
    variances."""
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(seed)).numpy()
    h = pre_bn(model, x)[rows]
    batches = [h[s : s + BATCH] for s in range(0, N, BATCH) if len(h[s : s + BATCH]) == BATCH]
    mean = np.mean([b.mean(0) for b in batches], axis=0)
    var = np.mean([b.var(0, ddof=1) for b in batches], axis=0)
    return mean, var


def fresh(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, seed: int = 0):
    return collect_fresh(
        model,
        loader(x, y),
        ["bn"],
        exchange=SingleProcess(),
        pool="flatten",
        device=None,
        latents_dir=None,
        latents_dtype="float32",
        refresh_bn=mode,
        seed=seed,
    )


def test_batch_statistics_match_a_train_mode_forward_with_frozen_statistics() -> None:
    model, (x, y) = stale_model(), data()
    buffers = {k: v.clone() for k, v in model.bn.state_dict().items()}
    got = fresh(model, x, y, "batch").latents["bn"]
    np.testing.assert_allclose(got, batch_oracle(model, x), atol=1e-4)
    for key, value in model.bn.state_dict().items():  # running statistics untouched
        assert torch.equal(value, buffers[key]), key
    assert model.training and model.bn.training and model.bn.track_running_stats


def test_recalibrate_matches_recomputed_statistics() -> None:
    model, (x, y) = stale_model(), data()
    got = fresh(model, x, y, "recalibrate", seed=3)
    mean, var = recalibrated_stats(model, x, seed=3)
    np.testing.assert_allclose(model.bn.running_mean.double().numpy(), mean, atol=1e-5)
    np.testing.assert_allclose(model.bn.running_var.double().numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(
        got.latents["bn"], normalise(pre_bn(model, x), mean, var, model), atol=1e-4
    )
    assert model.bn.momentum == 0.1 and model.training


def test_running_keeps_the_stale_statistics() -> None:
    model, (x, y) = stale_model(), data()
    got = fresh(model, x, y, "running").latents["bn"]
    stale = normalise(pre_bn(model, x), np.full(6, 5.0), np.full(6, 0.1), model)
    np.testing.assert_allclose(got, stale, atol=1e-3)
    assert not np.allclose(got, batch_oracle(model, x), atol=0.1)
    mean, var = recalibrated_stats(model, x, seed=0)
    assert not np.allclose(got, normalise(pre_bn(model, x), mean, var, model), atol=0.1)


@pytest.mark.parametrize("mode", ["running", "batch", "recalibrate"])
def test_regularisation_passes_its_refresh_bn_to_the_fresh_pass(mode: str) -> None:
    model, (x, y) = stale_model(), data()
    regs = Regularisation(model, [LCC(layers=["bn"], k=3, warmup=0)], refresh_bn=mode)
    regs.start_epoch(0, loader(x, y))
    got = regs.last_refresh.collected.latents["bn"]
    regs.close()
    expected = {
        "running": lambda: normalise(pre_bn(model, x), np.full(6, 5.0), np.full(6, 0.1), model),
        "batch": lambda: batch_oracle(model, x),
        "recalibrate": lambda: normalise(pre_bn(model, x), *recalibrated_stats(model, x, 0), model),
    }[mode]()
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_refresh_records_cross_entropy_of_cc_and_mc_samples() -> None:
    model, (x, y) = stale_model(), data()
    regs = Regularisation(model, [LCC(layers=["bn"], k=3, warmup=0)], refresh_bn="batch")
    stats = regs.start_epoch(0, loader(x, y))["lcc"]["bn"]
    regs.close()
    with batch_statistics(model), torch.no_grad():
        logits = torch.cat([model(x[s : s + BATCH]) for s in range(0, N, BATCH)])
    losses = nn.functional.cross_entropy(logits, y, reduction="none").numpy()
    clusters = regs.last_refresh.states["lcc"].layers["bn"].clusters
    misclustered = match_clusters(clusters, y.numpy()).misclustered
    assert stats["cross_entropy"] == pytest.approx(losses.mean(), rel=1e-5)
    assert stats["cross_entropy_mc"] == pytest.approx(losses[misclustered].mean(), rel=1e-5)
    assert stats["cross_entropy_cc"] == pytest.approx(losses[~misclustered].mean(), rel=1e-5)


def test_a_gap_between_pass_and_training_accuracy_warns_naming_the_option() -> None:
    model, (x, y) = stale_model(), data()
    regs = Regularisation(model, [LCC(layers=["bn"], k=3, warmup=0)], refresh_bn="running")
    regs.start_epoch(0, loader(x, y))
    with torch.no_grad():
        regs.observe(torch.arange(N), logits=nn.functional.one_hot(y, 3).float(), y=y)
    with pytest.warns(UserWarning, match="--refresh-bn running.*try --refresh-bn recalibrate"):
        regs.start_epoch(1, loader(x, y))  # training was 100% right, the stale pass is not
    stats = regs.last_refresh.states["lcc"].layers["bn"].stats
    regs.close()
    assert stats["train_accuracy"] == 1.0 and stats["accuracy"] < 0.85


def test_recalibrate_without_batch_norm_does_nothing() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    before = [p.clone() for p in model.parameters()]
    assert recalibrate(model, TensorDataset(torch.randn(8, 2)), batch_size=4) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_no_gap_warning_without_batch_norm_or_when_the_pass_is_better() -> None:
    import warnings

    x, y = data()
    plain = nn.Sequential(OrderedDict(fc=nn.Linear(4, 6), act=nn.ReLU(), head=nn.Linear(6, 3)))
    for model, layer, logits in (
        (plain, "act", nn.functional.one_hot(y, 3).float()),  # no BatchNorm: nothing to fix
        (stale_model(), "bn", nn.functional.one_hot((y + 1) % 3, 3).float()),  # training 0 %
    ):
        regs = Regularisation(model, [LCC(layers=[layer], k=3, warmup=0)])
        regs.start_epoch(0, loader(x, y))
        regs.observe(torch.arange(N), logits=logits, y=y)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            regs.start_epoch(1, loader(x, y))
        regs.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["batch", "recalibrate"])
def test_lcc_train_refresh_bn_reaches_the_journal(tmp_path, mode: str) -> None:
    import json

    from lcc.cli import main

    out = tmp_path / "run"
    argv = ["train", "small-resnet", "digits", "--out", str(out), "--refresh-bn", mode]
    tiny = ["--subset", "200", "--test-subset", "50", "--epochs", "2", "--batch-size", "50"]
    assert main([*argv, *tiny]) == 0
    records = [json.loads(line) for line in (out / "refreshes.jsonl").read_text().splitlines()]
    assert records and all(r["refresh_bn"] == mode for r in records)
    assert all(r["cross_entropy_cc"] is not None for r in records)
    last = json.loads((out / "metrics.json").read_text())["last_refresh"]
    assert all(stats["train_accuracy"] is not None for stats in last.values())


def test_a_batch_of_one_sample_uses_the_running_statistics() -> None:
    model, (x, _) = stale_model(), data()
    with batch_statistics(model), torch.no_grad():
        one = model.bn(model.fc(x[:1]))
        two = model.bn(model.fc(x[:2]))
    stale = normalise(pre_bn(model, x[:1]), np.full(6, 5.0), np.full(6, 0.1), model)
    np.testing.assert_allclose(one.double().numpy(), stale, atol=1e-4)
    h = pre_bn(model, x[:2])
    np.testing.assert_allclose(
        two.double().numpy(), normalise(h, h.mean(0), h.var(0), model), atol=1e-4
    )
    assert float(model.bn.running_mean[0]) == 5.0 and model.bn.training


def test_recalibrate_keeps_the_pass_near_training() -> None:
    model, (x, y) = stale_model(), data()
    assert Regularisation(model, [LCC(layers=["bn"], k=3, warmup=0)]).refresh_bn == "running"
    regs = Regularisation(model, [LCC(layers=["bn"], k=3, warmup=0)], refresh_bn="recalibrate")
    regs.start_epoch(0, loader(x, y))
    got = regs.last_refresh.collected.latents["bn"]
    regs.close()
    expected = normalise(pre_bn(model, x), *recalibrated_stats(model, x, 0), model)
    np.testing.assert_allclose(got, expected, atol=1e-3)
