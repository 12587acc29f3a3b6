"""FGSM and PGD (foolbox) against finite differences, the eps-ball, and a linear model's optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcc.analysis.attacks import PixelModel, attack, parse_eps_list, parse_pgd
from lcc.errors import LCCInputError
from lcc.zoo.datasets import ImageTensorDataset

MEAN, STD = (0.3, 0.5), (0.2, 0.4)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 6), nn.Tanh(), nn.Linear(6, 3))


def finite_difference_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Central differences of the summed cross-entropy with respect to each pixel (float64)."""
    model = model.double()
    x = x.double()
    grad = np.zeros(x.numel())
    h = 1e-6
    flat = x.reshape(-1)
    for i in range(flat.numel()):
        up, down = flat.clone(), flat.clone()
        up[i] += h
        down[i] -= h
        with torch.no_grad():
            f_up = F.cross_entropy(model(up.reshape(x.shape)), y, reduction="sum")
            f_down = F.cross_entropy(model(down.reshape(x.shape)), y, reduction="sum")
        grad[i] = float(f_up - f_down) / (2 * h)
    return grad.reshape(tuple(x.shape))


def test_fgsm_is_eps_times_the_sign_of_the_finite_difference_gradient() -> None:
    model = PixelModel(tiny(), MEAN, STD).double()
    x = 0.3 + 0.4 * torch.rand(
        4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    y = torch.tensor([0, 1, 2, 0])
    eps = 0.05  # x in [0.3, 0.7]: no clipping
    adversarial = attack(model, x, y, kind="fgsm", eps=eps)
    expected = eps * np.sign(finite_difference_gradient(model, x, y))
    np.testing.assert_allclose((adversarial - x).numpy(), expected, atol=1e-9)


def test_eps_zero_gives_the_clean_inputs_exactly() -> None:
    images = torch.randint(0, 256, (20, 2, 3, 3), dtype=torch.uint8)
    labels = torch.randint(0, 3, (20,))
    dataset = ImageTensorDataset(images, labels, MEAN, STD)
    normalised = torch.stack([x for x, _ in dataset.__getitems__(list(range(20)))])
    inner = tiny()
    model = PixelModel(inner, MEAN, STD)
    pixels = images.float() / 255.0
    torch.testing.assert_close(model(pixels), inner(normalised), rtol=0, atol=0)
    for kind in ("fgsm", "pgd"):
        adversarial = attack(model, pixels, labels, kind=kind, eps=0.0, steps=3, alpha=0.01)
        assert torch.equal(adversarial, pixels)


def test_pgd_stays_in_the_ball_and_the_pixel_range() -> None:
    model = PixelModel(tiny(1), MEAN, STD)
    pixels = torch.rand(30, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    pixels[:5] = 0.0  # at the border of the valid range
    pixels[5:10] = 1.0
    labels = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(3))
    eps = 0.1
    adversarial = attack(model, pixels, labels, kind="pgd", eps=eps, steps=7, alpha=0.04, seed=1)
    assert float((adversarial - pixels).abs().max()) <= eps + 1e-6
    assert float(adversarial.min()) >= 0.0 and float(adversarial.max()) <= 1.0
    again = attack(model, pixels, labels, kind="pgd", eps=eps, steps=7, alpha=0.04, seed=1)
    assert torch.equal(adversarial, again)  # seeded random start


def test_pgd_harms_at_least_as_much_as_fgsm_and_both_reach_the_linear_optimum() -> None:
    """A linear two-class model: the worst L-inf perturbation of radius eps lowers the margin
    m = (w_y - w_other) . x + b by exactly eps * ||w_y - w_other||_1 (no clipping inside
    [eps, 1 - eps]); FGSM finds it in one step and PGD can do no better."""
    torch.manual_seed(4)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
    pixels = 0.2 + 0.6 * torch.rand(400, 2, 2, 2)
    labels = torch.randint(0, 2, (400,))
    eps = 0.05
    model = PixelModel(linear, (0.0,), (1.0,))
    w = linear[1].weight.detach() / 255.0 * 255.0
    with torch.no_grad():
        logits = model(pixels)
    sign = torch.where(labels == 0, 1.0, -1.0)
    margin = sign * (logits[:, 0] - logits[:, 1])
    direction = (w[0] - w[1]).abs().sum()
    optimum = float((margin > eps * direction).double().mean())

    def accuracy(adversarial: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(adversarial).argmax(1) == labels).double().mean())

    fgsm = accuracy(attack(model, pixels, labels, kind="fgsm", eps=eps))
    pgd = accuracy(attack(model, pixels, labels, kind="pgd", eps=eps, steps=10, alpha=0.02))
    assert pgd <= fgsm
    assert fgsm == pytest.approx(optimum, abs=1 / 400)
    assert pgd == pytest.approx(optimum, abs=1 / 400)
    assert optimum < accuracy(pixels)


def test_parsing_and_bad_input() -> None:
    assert parse_eps_list("0,0.1, 8/255") == [0.0, 0.1, 8 / 255]
    assert [(s.eps, s.steps, s.alpha) for s in parse_pgd("0.1:10:0.02")] == [(0.1, 10, 0.02)]
    with pytest.raises(LCCInputError, match="eps must be >= 0"):
        parse_eps_list("-0.1")
    with pytest.raises(LCCInputError, match="exceeds the pixel range"):
        parse_eps_list("8")
    with pytest.raises(LCCInputError, match="EPS:STEPS:ALPHA"):
        parse_pgd("0.1:10")
    with pytest.raises(LCCInputError, match="STEPS"):
        parse_pgd("0.1:0:0.01")
    with pytest.raises(LCCInputError, match=r"images in \[0, 1\]"):
        attack(PixelModel(tiny(), MEAN, STD), torch.full((1, 2, 3, 3), 2.0), torch.tensor([0]),
               kind="fgsm", eps=0.1)  # fmt: skip
