"""Recorded latents keep each sample's cross-entropy of its last training forward."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lcc.engine.match import match_clusters
from lcc.regularisers.lcc import LCC
from lcc.train.loop import Regularisation


def test_recorded_refresh_reports_cross_entropy_of_cc_and_mc_samples() -> None:
    torch.manual_seed(0)
    n = 90
    x, y = torch.randn(n, 5), torch.arange(n) % 3
    loader = DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=30, shuffle=True)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(5, 8), act=nn.ReLU(), head=nn.Linear(8, 3)))
    regs = Regularisation(model, [LCC(layers=["act"], k=3, warmup=1)], source="recorded")
    regs.start_epoch(0, loader)
    logits_by_row = torch.empty(n, 3)
    for xb, yb, index in loader:
        logits = model(xb)
        regs.observe(index, logits=logits, y=yb)
        logits_by_row[index] = logits.detach()
    stats = regs.start_epoch(1, loader)["lcc"]["act"]
    state = regs.last_refresh.states["lcc"].layers["act"]
    regs.close()
    assert stats["source"] == "recorded"
    losses = nn.functional.cross_entropy(logits_by_row, y, reduction="none").numpy()
    misclustered = match_clusters(state.clusters, y.numpy()).misclustered
    assert misclustered.any() and (~misclustered).any()
    assert stats["cross_entropy"] == pytest.approx(losses.mean(), rel=1e-5)
    assert stats["cross_entropy_mc"] == pytest.approx(losses[misclustered].mean(), rel=1e-5)
    assert stats["cross_entropy_cc"] == pytest.approx(losses[~misclustered].mean(), rel=1e-5)
    assert np.isfinite(regs.recorded["losses"]).all()
