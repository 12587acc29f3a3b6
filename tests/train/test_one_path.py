"""One refresh path for every process count: the plain loop, Lightning and DDP agree.

- ``lcc train`` (Lightning, one process) and a plain loop (:class:`Regularisation` driven by
  hand) give identical refreshes on the same weights, data and seed;
- DDP (2 gloo processes) with ``--latents-on-disk`` writes the gathered latents (and each
  rank's shard) to memory-mapped files, its first refresh reads one process's latents, and it
  ends with exactly the metrics of the same DDP run that keeps its latents in RAM;
- on a model without BatchNorm (whose per-process batch statistics would make any DDP run
  differ from one process), DDP with ``--latents-on-disk`` ends with the metrics of one process
  training on the global batch: same data order, same refreshes, the LCC mean over the global
  batch's correctible samples, the training accuracy summed over processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lcc.regularisers.lcc import LCC
from lcc.train.loop import Regularisation
from lcc.zoo.datasets import IndexedDataset, load_dataset
from lcc.zoo.models import build_model

REPO = Path(__file__).resolve().parents[2]
DIGITS = ["--subset", "400", "--test-subset", "100", "--seed", "0"]


def _lcc_train(out: Path, *extra: str, model: str = "small-cnn") -> dict:
    command = [sys.executable, "-m", "lcc", "train", model, "digits", "--out", str(out)]
    command += [*DIGITS, "--accelerator", "cpu", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _start_weights(tmp_path: Path, bundle) -> Path:
    torch.manual_seed(123)
    start = build_model("small-cnn", 10, input_shape=bundle.input_shape)
    path = tmp_path / "start.pt"
    torch.save(start.state_dict(), path)
    return path


@pytest.mark.slow
def test_plain_loop_and_lightning_give_identical_refreshes(tmp_path):
    bundle = load_dataset("digits", subset=400, test_subset=100, seed=0)
    weights = _start_weights(tmp_path, bundle)
    out = tmp_path / "run"
    options = ["--k", "7", "--method", "louvain", "--pca", "8", "--knn", "exact"]
    _lcc_train(
        out, "--epochs", "2", "--warmup", "0", "--batch-size", "32", "--checkpoint", str(weights),
        "--keep-checkpoints", *options,
    )  # fmt: skip
    loader = DataLoader(IndexedDataset(bundle.train_plain), batch_size=32)
    journal = [json.loads(line) for line in (out / "refreshes.jsonl").read_text().splitlines()]
    for epoch in (1, 2):  # as the files count them, from 1
        # the refresh of epoch E ran on the weights at the end of epoch E - 1
        checkpoint = weights if epoch == 1 else out / "checkpoints" / f"epoch={epoch - 1}.ckpt"
        model = build_model("small-cnn", 10, input_shape=bundle.input_shape, checkpoint=checkpoint)
        reg = LCC(layers=["act1"], k=7, method="louvain", pca=8, knn="exact", warmup=0, seed=0)
        with Regularisation(model, [reg]) as regs:
            stats = regs.start_epoch(epoch - 1, loader)["lcc"]["act1"]  # 0-based inside
        saved = np.load(out / "refresh" / f"epoch_{epoch}_act1.npz")
        assert np.array_equal(saved["clusters"], reg.state.layers["act1"].clusters)
        assert np.array_equal(saved["target_indices"], reg.state.layers["act1"].target_indices)
        logged = journal[epoch - 1]
        assert logged["epoch"] == epoch
        for key in ("n_clusters", "misclustered_fraction", "correctible_fraction", "accuracy"):
            assert logged[key] == pytest.approx(stats[key], abs=1e-12), key


@pytest.mark.slow
def test_ddp_with_latents_on_disk_writes_memory_maps_and_changes_no_result(tmp_path):
    bundle = load_dataset("digits", subset=400, test_subset=100, seed=0)
    weights = _start_weights(tmp_path, bundle)
    common = ["--epochs", "2", "--warmup", "0", "--checkpoint", str(weights), "--save-latents"]
    common += ["--batch-size", "16", "--devices", "2", "--strategy", "ddp", "--knn", "exact"]
    in_ram = _lcc_train(tmp_path / "ram", *common)
    on_disk_out = tmp_path / "disk"
    on_disk = _lcc_train(on_disk_out, *common, "--latents-on-disk")
    assert on_disk["devices"] == 2 and on_disk["refreshes"] == 2
    mapped = np.load(on_disk_out / "latents" / "act1.npy", mmap_mode="r")  # gathered, on disk
    saved = np.load(on_disk_out / "refresh" / "epoch_2_act1.npz")
    assert mapped.shape == (400, saved["z"].shape[1])
    np.testing.assert_array_equal(np.asarray(mapped), saved["z"])
    for rank in (0, 1):  # each rank's shard went through a memory map too
        assert (on_disk_out / "latents" / f"shard-{rank}" / "act1.npy").is_file()
    # the epoch-1 refresh read the start weights: its gathered rows are one process's pass
    model = build_model("small-cnn", 10, input_shape=bundle.input_shape, checkpoint=weights)
    loader = DataLoader(IndexedDataset(bundle.train_plain), batch_size=64)
    with Regularisation(model, [LCC(layers=["act1"], warmup=0)]) as regs:
        single = regs.collect(loader, keys=["lcc"])
    first = np.load(on_disk_out / "refresh" / "epoch_1_act1.npz")
    np.testing.assert_allclose(first["z"], single.latents["act1"], rtol=1e-5, atol=1e-6)
    # keeping the latents on disk changes no result of the run
    for key in ("test_top1", "test_top5", "test_loss", "train_loss", "last_refresh"):
        assert on_disk[key] == in_ram[key], key


@pytest.mark.slow
def test_ddp_trains_as_one_process_with_the_global_batch(tmp_path):
    bundle = load_dataset("digits", subset=400, test_subset=100, seed=0)
    torch.manual_seed(123)
    start = build_model("small-cnn:depth=0", 10, input_shape=bundle.input_shape)  # no BatchNorm
    torch.save(start.state_dict(), tmp_path / "start.pt")
    common = ["--epochs", "3", "--warmup", "0", "--checkpoint", str(tmp_path / "start.pt")]
    common += ["--knn", "exact", "--weight", "0.5"]
    one = _lcc_train(tmp_path / "one", *common, "--batch-size", "32", model="small-cnn:depth=0")
    ddp_out = tmp_path / "ddp"
    ddp = _lcc_train(
        ddp_out, *common, "--batch-size", "16", "--devices", "2", "--strategy", "ddp",
        "--latents-on-disk", model="small-cnn:depth=0",
    )  # fmt: skip
    assert ddp["devices"] == 2 and (ddp_out / "latents" / "shard-1" / "act1.npy").is_file()
    assert one["last_refresh"]["act1"]["misclustered_fraction"] > 0  # LCC had work to do
    for key in ("test_top1", "test_top5", "train_top1"):
        assert ddp[key] == one[key], key
    for key in ("test_loss", "train_loss"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-5), key
    for key, value in one["last_refresh"]["act1"].items():
        if isinstance(value, float):
            assert ddp["last_refresh"]["act1"][key] == pytest.approx(value, rel=1e-5), key
        else:
            assert ddp["last_refresh"]["act1"][key] == value, key
