"""Parseval penalty: numpy oracle, gradients, the retraction it equals, module choice, trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lcc.errors import LCCInputError
from lcc.regularisers import build_regulariser, regulariser_help
from lcc.regularisers.parseval import Parseval, parseval_penalty
from lcc.train.loop import Regularisation


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(),
        nn.Linear(5, 20),
    ).double()  # fmt: skip


def oracle(weights: list[np.ndarray]) -> float:
    """sum_l ||W W^T - I||_F^2 with W the (out, fan-in) matrix; the smaller Gram when tall."""
    total = 0.0
    for weight in weights:
        w = weight.reshape(weight.shape[0], -1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        total += float(np.sum((gram - np.eye(gram.shape[0])) ** 2))
    return total


def test_default_term_is_the_sum_over_every_linear_and_conv_layer() -> None:
    model = net()
    reg = Parseval()
    reg.bind(model, num_classes=20)
    assert reg.penalised == ("0", "3", "5")
    weights = [model[i].weight.detach().numpy() for i in (0, 3, 5)]
    assert float(reg(None).detach()) == pytest.approx(oracle(weights), rel=1e-12)


def test_modules_option_chooses_the_weights() -> None:
    model = net()
    reg = build_regulariser("parseval:modules=3")
    reg.bind(model, num_classes=20)
    assert reg.penalised == ("3",)
    assert float(reg(None).detach()) == pytest.approx(oracle([model[3].weight.detach().numpy()]))


def test_gradients_match_finite_differences() -> None:
    for shape in [(3, 5), (6, 2), (2, 3, 2, 2)]:
        w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(parseval_penalty, (w,), eps=1e-6, atol=1e-6)


def test_one_sgd_step_is_cisse_retraction_with_beta_4_lr_weight() -> None:
    model = nn.Sequential(nn.Linear(6, 4, bias=False)).double()
    w0 = model[0].weight.detach().clone()
    lr, weight = 0.01, 0.5
    reg = Parseval(weight=weight)
    reg.bind(model, num_classes=4)
    (reg.weight * reg(None)).backward()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    beta = 4 * lr * weight
    torch.testing.assert_close(model[0].weight.detach(), (1 + beta) * w0 - beta * w0 @ w0.T @ w0)


def test_reads_no_latents_and_keeps_no_state() -> None:
    reg = Parseval()
    reg.set_default_layers(["act1"])  # the trainer's --layers: not weights
    assert reg.layers == ("output",)
    reg.bind(net(), num_classes=20)
    assert reg.penalised == ("0", "3", "5") and reg.state_dict() == {}


def test_bad_input_names_the_fix() -> None:
    assert "penalty" in regulariser_help("parseval")
    with pytest.raises(LCCInputError, match=r"have none; choose among: 0, 3, 5"):
        build_regulariser("parseval:modules=1").bind(net(), num_classes=20)
    with pytest.raises(LCCInputError, match="has no layer 'fc9'"):
        build_regulariser("parseval:modules=fc9").bind(net(), num_classes=20)
    with pytest.raises(LCCInputError, match="no model yet"):
        Parseval()(None)


def test_plugs_into_the_plain_training_loop_and_shrinks_the_penalty() -> None:
    x = torch.randn(64, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = (x.mean((1, 2, 3)) > 0).long()
    results = {}
    for weight in (0.0, 0.2):
        model = net()
        regs = Regularisation(
            model, [build_regulariser(f"parseval:w={weight}")], num_classes=20, sample=x[:2]
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        loader = DataLoader(TensorDataset(x, y, torch.arange(64)), batch_size=16)
        for epoch in range(4):
            regs.start_epoch(epoch, loader)
            for xb, yb, index in loader:
                logits = model(xb)
                loss = F.cross_entropy(logits, yb) + regs.loss(index, y=yb, logits=logits, x=xb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        results[weight] = oracle([model[i].weight.detach().numpy() for i in (0, 3, 5)])
    assert results[0.2] < 0.5 * results[0.0]
