"""The label-variation regulariser: its term is the functional core on the labelled rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcc.engine.lgg import label_variation, latent_graph
from lcc.errors import LCCInputError
from lcc.regularisers import build_regulariser, regulariser_help
from lcc.regularisers.base import Batch
from lcc.regularisers.label_variation import LabelVariation
from lcc.synthetic import gaussian_mixture


def make_batch(seed: int = 0, n: int = 40, unlabelled: int = 5) -> Batch:
    """Two layers of overlapping planted latents (signed and ReLU-like) and logits."""
    z, y, _ = gaussian_mixture(n, 8, 3, 2, separation=2.0, seed=seed)
    y = y.copy()
    y[np.random.default_rng(seed).choice(n, unlabelled, replace=False)] = -1
    signed = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    relu = torch.relu(torch.tensor(z[:, :5] * 1.3 + 0.2, dtype=torch.float64)).requires_grad_(True)
    logits = torch.tensor(z[:, :3], dtype=torch.float64, requires_grad=True)
    return Batch(
        latents={"signed": signed, "relu": relu},
        y=torch.as_tensor(y),
        indices=torch.arange(n),
        logits=logits,
        epoch=0,
    )


def core(z: torch.Tensor, y: torch.Tensor, k: int = 10, **options) -> torch.Tensor:
    normalized = options.pop("normalized", True)
    keep = y >= 0
    adjacency = latent_graph(z[keep], k, **options)
    return label_variation(adjacency, y[keep], normalized=normalized)


def test_term_is_mean_over_layers_of_the_core_on_labelled_rows() -> None:
    batch = make_batch()
    reg = LabelVariation(layers=["signed", "relu", "output"], k=4)
    expected = torch.stack(
        [core(batch.layer(name), batch.y, 4) for name in ("signed", "relu", "output")]
    ).mean()
    torch.testing.assert_close(reg(batch), expected)
    assert 0.0 < expected.item() < 1.0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("k", 7),
        ("similarity", "rbf"),
        ("normalize", True),
        ("normalized", False),
        ("bandwidth", 0.5),
    ],
)
def test_each_option_reaches_the_core_and_changes_the_term(option: str, value: object) -> None:
    batch = make_batch(1)
    base_options = {"k": 4, "similarity": "rbf" if option == "bandwidth" else "auto"}
    options = {**base_options, option: value}
    base = LabelVariation(layers=["relu"], **base_options)(batch)
    got = LabelVariation(layers=["relu"], **options)(batch)
    torch.testing.assert_close(got, core(batch.layer("relu"), batch.y, **options))
    assert got.item() != pytest.approx(base.item())


def test_spec_strings_are_parsed_into_options() -> None:
    reg = build_regulariser(
        "label-variation:w=0.3,layers=relu,signed,k=6,similarity=rbf,bandwidth=1.5,"
        "normalize=true,normalized=false"
    )
    assert isinstance(reg, LabelVariation)
    options = reg.options
    assert reg.layers == ("relu", "signed") and reg.weight == 0.3
    assert (options.k, options.similarity, options.bandwidth) == (6, "rbf", 1.5)
    assert options.normalize is True and options.normalized is False
    assert build_regulariser("label-variation:bandwidth=none").options.bandwidth is None
    text = regulariser_help("label-variation")
    for name in ("k", "similarity", "bandwidth", "normalize", "normalized"):
        assert f"  {name} " in text


def test_gradients_reach_the_latents_and_match_finite_differences() -> None:
    batch = make_batch(2, n=14, unlabelled=2)
    reg = LabelVariation(layers=["signed"], k=3, normalize=True)
    z = batch.latents["signed"].detach().clone().requires_grad_(True)

    def term(latents: torch.Tensor) -> torch.Tensor:
        return reg(Batch({"signed": latents}, batch.y, batch.indices, batch.logits))

    assert torch.autograd.gradcheck(term, (z,), eps=1e-6, atol=1e-6)
    term(z).backward()
    unlabelled = batch.y < 0
    assert torch.all(z.grad[unlabelled] == 0) and z.grad[~unlabelled].abs().sum() > 0


def test_small_batches_shrink_k_and_a_single_labelled_row_gives_an_attached_zero() -> None:
    batch = make_batch(3, n=8, unlabelled=3)  # 5 labelled rows, k = 10 > 4
    reg = LabelVariation(layers=["signed"])
    torch.testing.assert_close(reg(batch), core(batch.layer("signed"), batch.y, 4))
    y = torch.full((8,), -1)
    y[2] = 1
    lonely = Batch(batch.latents, y, batch.indices, batch.logits)
    term = reg(lonely)
    assert term.item() == 0.0
    term.backward()


def test_one_class_gives_zero_and_no_error() -> None:
    batch = make_batch(4)
    same = Batch(batch.latents, torch.zeros_like(batch.y), batch.indices, batch.logits)
    assert LabelVariation(layers=["signed"], k=3)(same).item() == 0.0


def test_minimising_the_term_alone_separates_planted_classes() -> None:
    """Sec. 4.2 as the sole objective: a linear map trained on label variation only."""
    z, y, _ = gaussian_mixture(96, 10, 3, 1, separation=2.0, seed=5)
    x = torch.tensor(z)
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 4)
    reg = LabelVariation(layers=["output"], k=5, similarity="rbf")
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    labels = torch.as_tensor(y)

    def term() -> torch.Tensor:
        out = model(x)
        return reg(Batch({}, labels, torch.arange(96), out))

    before = term().item()
    for _ in range(60):
        optimiser.zero_grad()
        loss = term()
        loss.backward()
        optimiser.step()
    after = term().item()
    assert after < 0.5 * before


def test_state_dict_is_empty_and_warmup_applies() -> None:
    reg = LabelVariation(layers=["signed"], weight=0.2, warmup=2)
    assert reg.state_dict() == {} and list(reg.parameters()) == []
    assert (reg.weight_at(1), reg.weight_at(2)) == (0.0, 0.2)


def test_bad_options_and_batches_raise_lcc_input_error() -> None:
    for bad in (
        {"k": 0},
        {"k": "many"},
        {"similarity": "l1"},
        {"bandwidth": -1.0},
        {"bandwidth": "wide"},
        {"normalize": "maybe"},
        {"normalized": 2},
        {"kk": 3},
    ):
        with pytest.raises(LCCInputError):
            LabelVariation(layers=["signed"], **bad)
    batch = make_batch()
    with pytest.raises(LCCInputError, match="not recorded"):
        LabelVariation(layers=["fc9"])(batch)
    with pytest.raises(LCCInputError, match="no layer"):
        LabelVariation()(batch)
    nan = batch.latents["signed"].detach().clone()
    nan[0, 0] = float("nan")
    with pytest.raises(LCCInputError, match="NaN"):
        LabelVariation(layers=["x"])(Batch({"x": nan}, batch.y, batch.indices, batch.logits))
