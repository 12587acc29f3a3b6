"""The smoothness regulariser: eq. 8 over the label variation of consecutive layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcc.engine.lgg import label_variation, latent_graph
from lcc.errors import LCCInputError
from lcc.regularisers import build_regulariser
from lcc.regularisers.base import Batch
from lcc.regularisers.smoothness import Smoothness
from lcc.synthetic import gaussian_mixture

LAYERS = ("early", "middle", "late", "last")


def make_batch(seed: int = 0, n: int = 36) -> Batch:
    """Four layers of one planted set, classes more separated the later the layer."""
    latents = {}
    y = None
    for depth, name in enumerate(LAYERS):
        z, y, _ = gaussian_mixture(n, 6 + depth, 3, 1, separation=0.5 + 1.5 * depth, seed=seed)
        latents[name] = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    labels = torch.as_tensor(y).clone()
    labels[[1, 7]] = -1
    return Batch(latents, labels, torch.arange(n), torch.zeros(n, 3, dtype=torch.float64))


def sigma(batch: Batch, name: str, k: int, **options) -> float:
    normalized = options.pop("normalized", True)
    keep = batch.y >= 0
    adjacency = latent_graph(batch.layer(name)[keep], k, **options)
    return label_variation(adjacency, batch.y[keep], normalized=normalized).item()


@pytest.mark.parametrize("options", [{}, {"normalize": True}, {"normalized": False}])
def test_term_is_eq_8_over_the_listed_layers(options: dict) -> None:
    batch = make_batch()
    values = [sigma(batch, name, 5, **dict(options)) for name in LAYERS]
    expected = sum(abs(values[i + 1] - values[i]) for i in range(len(values) - 1))
    got = Smoothness(layers=list(LAYERS), k=5, **options)(batch)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    assert values[0] > values[-1]  # planted: the deepest layer separates classes best


def test_layer_order_matters() -> None:
    batch = make_batch(1)
    forward = Smoothness(layers=["early", "middle", "late"], k=4)(batch)
    shuffled = Smoothness(layers=["middle", "early", "late"], k=4)(batch)
    values = {name: sigma(batch, name, 4) for name in ("early", "middle", "late")}
    expected = abs(values["early"] - values["middle"]) + abs(values["late"] - values["early"])
    assert shuffled.item() == pytest.approx(expected, rel=1e-10)
    assert forward.item() != pytest.approx(shuffled.item())


@pytest.mark.parametrize(
    ("option", "value"), [("k", 9), ("similarity", "cosine"), ("normalize", True)]
)
def test_options_change_the_term(option: str, value: object) -> None:
    batch = make_batch(2)
    base = Smoothness(layers=list(LAYERS), k=4)(batch)
    changed = Smoothness(layers=list(LAYERS), **{"k": 4, option: value})(batch)
    assert changed.item() != pytest.approx(base.item())


def test_gradients_match_finite_differences() -> None:
    batch = make_batch(3, n=12)
    inputs = tuple(batch.latents[name].detach().clone().requires_grad_(True) for name in LAYERS[:3])
    reg = Smoothness(layers=list(LAYERS[:3]), k=3)

    def term(*latents: torch.Tensor) -> torch.Tensor:
        return reg(
            Batch(dict(zip(LAYERS[:3], latents, strict=True)), batch.y, batch.indices, batch.logits)
        )

    assert torch.autograd.gradcheck(term, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_needs_two_layers() -> None:
    with pytest.raises(LCCInputError, match="at least 2"):
        Smoothness(layers=["early"])
    reg = Smoothness()
    reg.set_default_layers(["early"])
    with pytest.raises(LCCInputError, match="at least 2"):
        reg(make_batch())


def test_spec_and_weight_as_gamma() -> None:
    reg = build_regulariser("smoothness:w=0.05,layers=early,middle,late,k=3,normalize=1")
    assert isinstance(reg, Smoothness)
    assert reg.layers == ("early", "middle", "late") and reg.weight == 0.05
    assert reg.options.k == 3 and reg.options.normalize is True
    assert np.isfinite(reg(make_batch()).item())
