"""RKD-D: a numpy loop of Park et al.'s distance-wise loss, gradients, gkd's teacher options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lcc.errors import LCCInputError
from lcc.regularisers import build_regulariser, regulariser_help
from lcc.regularisers.base import Batch
from lcc.regularisers.rkd import RelationalDistillation, rkd_distance
from lcc.train.loop import Regularisation
from lcc.zoo.latents import LatentRecorder
from lcc.zoo.models import build_model


def mlp(seed: int, width: int = 16, dim: int = 6, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width // 2), nn.ReLU(),
        nn.Linear(width // 2, classes),
    ).double()  # fmt: skip


def oracle_rkd(teacher: np.ndarray, student: np.ndarray, delta: float = 1.0) -> float:
    """Park et al. eq. (RKD-D) by loops: psi = distance / mean distance over pairs i != j,
    Huber loss of psi_S - psi_T, mean over the ordered pairs."""
    n = teacher.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]

    def psi(z: np.ndarray) -> dict[tuple[int, int], float]:
        d = {(i, j): float(np.sqrt(np.sum((z[i] - z[j]) ** 2))) for i, j in pairs}
        mu = sum(d.values()) / len(d)
        return {pair: value / mu for pair, value in d.items()}

    t, s = psi(teacher), psi(student)
    total = 0.0
    for pair in pairs:
        a = abs(s[pair] - t[pair])
        total += 0.5 * a * a if a <= delta else delta * (a - 0.5 * delta)
    return total / len(pairs)


@pytest.mark.parametrize("delta", [1.0, 0.05])
def test_core_equals_a_numpy_loop_of_the_formula(delta: float) -> None:
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(9, 7)), rng.normal(size=(9, 3)) * 5
    value = rkd_distance(torch.tensor(teacher), torch.tensor(student), delta)
    assert float(value) == pytest.approx(oracle_rkd(teacher, student, delta), rel=1e-10)


@pytest.mark.parametrize("delta", [1.0, 0.05])
def test_regulariser_runs_the_teacher_and_averages_layer_pairs(delta: float) -> None:
    teacher, student = mlp(0), mlp(1, width=8)
    x = torch.tensor(np.random.default_rng(1).normal(size=(12, 6)))
    reg = RelationalDistillation(
        teacher=teacher, teacher_layers=["1", "3"], layers=["2", "output"], delta=delta
    )
    reg.bind(student, num_classes=3)
    with LatentRecorder(student, ["2"]) as recorder:
        logits = student(x)
    batch = Batch({"2": recorder.outputs["2"]}, None, torch.arange(12), logits, x=x)
    with torch.no_grad():
        t1 = teacher[1](teacher[0](x))
        t3 = teacher[3](teacher[2](t1))
    expected = (
        oracle_rkd(t1.numpy(), recorder.outputs["2"].detach().numpy(), delta)
        + oracle_rkd(t3.numpy(), logits.detach().numpy(), delta)
    ) / 2
    assert float(reg(batch).detach()) == pytest.approx(expected, rel=1e-10)


def test_gradients_match_finite_differences() -> None:
    teacher = mlp(3)
    x = torch.tensor(np.random.default_rng(2).normal(size=(8, 6)))
    reg = RelationalDistillation(teacher=teacher, teacher_layers=["1"], layers=["z"], delta=0.5)
    z = torch.tensor(np.random.default_rng(3).normal(size=(8, 4)), requires_grad=True)

    def term(latents: torch.Tensor) -> torch.Tensor:
        return reg(Batch({"z": latents}, None, torch.arange(8), None, x=x))

    assert torch.autograd.gradcheck(term, (z,), eps=1e-6, atol=1e-6)


def test_scaled_teacher_geometry_is_free_and_a_shuffle_is_not() -> None:
    t = torch.randn(10, 5, dtype=torch.float64)
    assert float(rkd_distance(t, 7.0 * t + 3.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(rkd_distance(t, t[torch.randperm(10)])) > 1e-3


def test_teacher_is_frozen_and_outside_parameters_and_state_dict() -> None:
    teacher = mlp(0)
    reg = RelationalDistillation(teacher=teacher, teacher_layers=["1"], layers=["output"])
    reg.bind(mlp(1), num_classes=3)
    assert list(reg.parameters()) == [] and reg.state_dict() == {}
    assert reg.teacher is teacher and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_from_a_spec_and_checkpoint_as_gkd(tmp_path) -> None:
    torch.manual_seed(0)
    saved = build_model("small-cnn", 3, input_shape=(1, 12, 12))
    path = tmp_path / "teacher.pt"
    torch.save(saved.state_dict(), path)
    reg = build_regulariser(
        f"rkd:teacher=small-cnn,teacher_checkpoint={path},teacher_layers=act1,layers=fc,"
        "teacher_pool=flatten"
    )
    reg.bind(nn.Linear(1, 1), num_classes=3, sample=torch.randn(4, 1, 12, 12))
    x = torch.randn(9, 1, 12, 12)
    student = torch.randn(9, 5, requires_grad=True)
    batch = Batch({"fc": student}, None, torch.arange(9), None, x=x)
    with torch.no_grad(), LatentRecorder(saved.eval(), ["act1"]) as recorder:
        saved(x)
    expected = oracle_rkd(
        recorder.outputs["act1"].double().numpy(), student.detach().double().numpy()
    )
    assert float(reg(batch).detach()) == pytest.approx(expected, rel=1e-5)


def test_help_registry_and_bad_input(tmp_path) -> None:
    assert "Park et al" in regulariser_help("rkd") and "delta" in regulariser_help("rkd")
    with pytest.raises(LCCInputError, match="rkd needs a teacher"):
        build_regulariser("rkd:layers=fc")
    with pytest.raises(LCCInputError, match="delta"):
        build_regulariser("rkd:teacher=small-cnn,delta=0")
    with pytest.raises(LCCInputError, match="same count"):
        RelationalDistillation(teacher=mlp(0), teacher_layers=["1", "3"], layers=["z"])
    with pytest.raises(LCCInputError, match="does not exist"):
        build_regulariser(
            f"rkd:teacher=small-cnn,teacher_checkpoint={tmp_path / 'missing.pt'},layers=fc"
        ).bind(nn.Linear(1, 1), num_classes=3, sample=torch.zeros(2, 1, 12, 12))


@pytest.mark.parametrize("name", ["rkd", "gkd"])
def test_teacher_options_are_read_and_checked_alike(name: str) -> None:
    from lcc.regularisers import options_class

    cls = options_class(name)
    options = cls(teacher=" small-cnn ", teacher_checkpoint="  ", teacher_layers="act1, fc1")
    assert (options.teacher, options.teacher_checkpoint) == ("small-cnn", None)
    assert options.teacher_layers == ["act1", "fc1"]
    with pytest.raises(LCCInputError, match="teacher must be"):
        cls(teacher=3)
    with pytest.raises(LCCInputError, match="teacher_checkpoint must be"):
        cls(teacher="small-cnn", teacher_checkpoint=3)
    with pytest.raises(LCCInputError, match="same count"):
        cls(teacher="small-cnn", teacher_layers="act1,fc1", layers=["fc1"])
    with pytest.raises(LCCInputError, match="teacher_pool"):
        cls(teacher="small-cnn", teacher_pool="mean")


def test_plugs_into_the_plain_training_loop_without_trainer_change() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    teacher, student = mlp(0), mlp(1, width=8)
    before = [p.detach().clone() for p in student.parameters()]
    regs = Regularisation(
        student,
        [build_regulariser("rkd:teacher_layers=1,layers=2,w=1.0", teacher=teacher)],
        num_classes=3,
        sample=x[:2],
    )
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    loader = DataLoader(TensorDataset(x, y, torch.arange(64)), batch_size=16, shuffle=True)
    terms = []
    for epoch in range(3):
        regs.start_epoch(epoch, loader)
        for xb, yb, index in loader:
            logits = student(xb)
            loss = F.cross_entropy(logits, yb) + regs.loss(index, y=yb, logits=logits, x=xb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            terms.append(regs.terms["rkd"])
    assert all(np.isfinite(terms)) and min(terms) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert sum(1 for _ in regs.parameters()) == 0
