"""Tests of lcc.train.lightning: data order, the training step's loss, NaN stops, checkpoints,
DDP.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lcc.regularisers.lcc import LCC
from lcc.train.config import TrainConfig
from lcc.train.data import EpochSampler, epoch_seed, preserved_rng
from lcc.train.exchange import SingleProcess
from lcc.train.lightning import LCCModule, NonFiniteLossError
from lcc.train.loop import LayerState, RefreshState

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- data order


@pytest.mark.parametrize("n", [1, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_index_with_equal_lengths(n, world):
    shards = [list(EpochSampler(n, seed=4, rank=r, world_size=world)) for r in range(world)]
    assert len({len(shard) for shard in shards}) == 1
    assert all(len(shard) == len(EpochSampler(n, rank=0, world_size=world)) for shard in shards)
    merged = [index for shard in shards for index in shard]
    assert sorted(set(merged)) == list(range(n))
    assert len(merged) == math.ceil(n / world) * world  # padded, duplicates only as padding


def test_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=1), EpochSampler(50, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) == list(a)  # same (seed, epoch): same order, every time
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(EpochSampler(50, seed=2)) != list(EpochSampler(50, seed=1))
    epoch = [5]
    c = EpochSampler(50, seed=1, epoch_fn=lambda: epoch[0])
    d = EpochSampler(50, seed=1)
    d.set_epoch(5)
    assert list(c) == list(d)


def test_unshuffled_unpadded_shard():
    assert list(EpochSampler(5, shuffle=False, rank=1, world_size=2, pad=False)) == [1, 3]
    assert len(EpochSampler(5, rank=1, world_size=2, pad=False)) == 2


def test_reseed_makes_the_epoch_rng_independent_of_the_past():
    sampler = EpochSampler(4, seed=0, reseed=True)
    sampler.set_epoch(2)
    torch.rand(3)
    list(sampler)
    first = torch.rand(3)
    torch.rand(100)  # whatever ran before ...
    np.random.rand(5)
    list(sampler)
    assert torch.equal(torch.rand(3), first)  # ... does not change the epoch's draws


def test_preserved_rng_is_neutral():
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    with preserved_rng():
        torch.rand(10)
        np.random.seed(3)
    assert torch.equal(torch.rand(2), expected)


def test_epoch_seed_is_stable_and_distinct():
    seeds = {epoch_seed(s, e, r) for s in range(3) for e in range(3) for r in range(2)}
    assert len(seeds) == 18
    assert all(0 <= s < 2**63 for s in seeds)


def test_all_gather_without_process_group_is_identity():
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    (only,) = SingleProcess().gather_rows(rows)
    assert np.array_equal(only, rows)


# --------------------------------------------------------------------------- the loss


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(flat=nn.Flatten(), hidden=nn.Linear(6, 5), act=nn.ReLU(), head=nn.Linear(5, 3))
    )


def _state(n: int, d: int, rows: list[int], seed: int = 0) -> RefreshState:
    rng = np.random.default_rng(seed)
    layer = LayerState(
        target_indices=np.asarray(rows, dtype=np.int64),
        target_vectors=rng.normal(size=(len(rows), d)).astype(np.float32),
        n_samples=n,
        projection_mean=None,
        projection_components=None,
        clusters=np.zeros(n, dtype=np.int64),
        stats={"n_clusters": 1},
    )
    return RefreshState(epoch=1, layers={"act": layer})


def test_training_step_adds_the_weighted_lcc_term():
    n, weight = 12, 0.25
    module = LCCModule(
        _mlp(), regularisers=[LCC(layers=["act"], k=1, weight=weight)], num_classes=3, n_train=n
    )
    state = _state(n, 5, rows=[1, 4, 7])
    assert module.lcc is not None
    module.lcc.install(state)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 2, 3, generator=generator)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    index = torch.tensor([0, 1, 2, 3, 4, 5])
    loss = module.training_step((x, y, index), 0)
    # independent computation: CE + w * mean over correctible rows of ||z - t|| / sqrt(d)
    model = module.model
    with torch.no_grad():
        z = model.act(model.hidden(model.flat(x)))
        ce = nn.functional.cross_entropy(model(x), y)
        vectors = torch.from_numpy(state.layers["act"].target_vectors)
        distances = [
            torch.linalg.vector_norm(z[1] - vectors[0]) / math.sqrt(5),
            torch.linalg.vector_norm(z[4] - vectors[1]) / math.sqrt(5),
        ]
        expected = ce + weight * torch.stack(distances).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()  # the LCC term backpropagates into the model
    assert model.hidden.weight.grad is not None


def test_baseline_step_is_plain_cross_entropy():
    module = LCCModule(_mlp(), num_classes=3, n_train=4)
    x, y = torch.randn(4, 1, 2, 3), torch.tensor([0, 1, 2, 0])
    loss = module.training_step((x, y, torch.arange(4)), 0)
    expected = nn.functional.cross_entropy(module.model(x), y)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_checkpoint_hooks_restore_the_refresh_state():
    source = LCCModule(_mlp(), regularisers=[LCC(layers=["act"], k=1)], num_classes=3, n_train=10)
    assert source.lcc is not None
    source.lcc.install(_state(10, 5, rows=[2, 3], seed=5))
    source.history = [{"epoch": 0, "loss": 1.0}]
    checkpoint: dict = {}
    source.on_save_checkpoint(checkpoint)
    buffer = __import__("io").BytesIO()
    torch.save(checkpoint, buffer)  # what Lightning does; must load with weights_only
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    target = LCCModule(_mlp(), regularisers=[LCC(layers=["act"], k=1)], num_classes=3, n_train=10)
    target.on_load_checkpoint(loaded)
    assert target.lcc is not None and target.lcc.state is not None
    restored = target.lcc.state.layers["act"]
    assert np.array_equal(restored.target_indices, [2, 3])
    assert np.array_equal(restored.target_vectors, source.lcc.state.layers["act"].target_vectors)
    assert target.lcc.last_refresh_epoch == 1
    assert target.history == [{"epoch": 0, "loss": 1.0}]


# --------------------------------------------------------------------------- NaN


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    import lightning.pytorch as pl

    from lcc.train.run import train

    class Diverge(pl.Callback):
        """Weights blow up at the start of epoch 1 (as with a far too large learning rate)."""

        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    for parameter in module.model.parameters():
                        parameter.mul_(float("inf"))

    out = tmp_path / "run"
    config = TrainConfig(
        model="small-cnn", dataset="digits", out=str(out), epochs=3, subset=200, no_lcc=True
    )
    with pytest.raises(NonFiniteLossError) as caught:
        train(config, callbacks=[Diverge()], report=False)
    message = str(caught.value)
    # epochs are 1-based in every line a user reads: the second epoch (index 1) diverged
    assert "non-finite loss at epoch 2" in message and "last good checkpoint" in message
    assert str(out / "checkpoints" / "last.ckpt") in message
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0
    assert all(
        torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point()
    )
    assert not (out / "metrics.json").exists()


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_refresh_equals_a_single_process_refresh(tmp_path):
    """2 CPU processes (gloo): the gathered latents = one process's pass over the same weights
    (BatchNorm statistics included), and the shared refresh = one refresh of those latents."""
    from torch.utils.data import DataLoader

    from lcc.engine.refresh import RefreshConfig, refresh
    from lcc.zoo.datasets import IndexedDataset, load_dataset
    from lcc.zoo.latents import collect_latents
    from lcc.zoo.models import build_model

    bundle = load_dataset("digits", subset=400, test_subset=100, seed=0)
    torch.manual_seed(123)
    start = build_model("small-cnn", 10, input_shape=bundle.input_shape)
    weights = tmp_path / "start.pt"
    torch.save(start.state_dict(), weights)
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "lcc", "train", "small-cnn", "digits", "--out", str(out),
        "--subset", "400", "--test-subset", "100", "--epochs", "3", "--warmup", "0",
        "--batch-size", "32", "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
        "--checkpoint", str(weights), "--save-latents", "--keep-checkpoints",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["devices"] == 2 and metrics["refreshes"] == 3
    assert metrics["test_samples"] == 100  # test shards summed exactly, no padding
    loader = DataLoader(IndexedDataset(bundle.train_plain), batch_size=64)
    config = RefreshConfig(k=5, seed=0)
    for epoch in (1, 2, 3):  # as the files count them, from 1
        # epoch E's refresh ran on the weights saved at the end of epoch E - 1
        if epoch == 1:
            model = start
        else:
            path = out / "checkpoints" / f"epoch={epoch - 1}.ckpt"
            model = build_model("small-cnn", 10, input_shape=bundle.input_shape, checkpoint=path)
        latents, _, _ = collect_latents(model, loader, ["act1"])
        saved = np.load(out / "refresh" / f"epoch_{epoch}_act1.npz")
        assert np.array_equal(saved["y"], bundle.targets)
        np.testing.assert_allclose(saved["z"], latents["act1"], rtol=1e-4, atol=1e-5)
        single = refresh(saved["z"], saved["y"], config)
        assert np.array_equal(saved["clusters"], single.clusters)
        assert np.array_equal(saved["target_indices"], single.targets.indices)
    lines = [json.loads(line) for line in (out / "refreshes.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line["layer"]) for line in lines] == [(e, "act1") for e in (1, 2, 3)]
    # the test metrics (summed over both ranks' shards) are those of the saved model
    final = build_model(
        "small-cnn",
        10,
        input_shape=bundle.input_shape,
        checkpoint=out / "checkpoints" / "last.ckpt",
    ).eval()
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    y = torch.as_tensor(bundle.test_targets)
    with torch.no_grad():
        logits = final(x)
    assert metrics["test_top1"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    loss = float(nn.functional.cross_entropy(logits, y))
    assert metrics["test_loss"] == pytest.approx(loss, rel=1e-5)
