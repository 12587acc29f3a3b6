"""Graph knowledge distillation: the term is the functional core on teacher and student latents."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from lcc.engine.lgg import distinct_classes_mask, gkd_distance, latent_graph
from lcc.errors import LCCInputError
from lcc.regularisers import build_regulariser, regulariser_help
from lcc.regularisers.base import Batch
from lcc.regularisers.gkd import GraphDistillation
from lcc.zoo.latents import LatentRecorder
from lcc.zoo.models import build_model


def mlp(seed: int, width: int = 16, dim: int = 6, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, width),
        nn.Tanh(),
        nn.Linear(width, width // 2),
        nn.ReLU(),
        nn.Linear(width // 2, classes),
    ).double()


def inputs(seed: int = 0, n: int = 24, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(n, dim)))
    y = torch.as_tensor(rng.integers(0, 3, n))
    return x, y


def student_batch(model: nn.Module, layers: list[str], x: torch.Tensor, y: torch.Tensor) -> Batch:
    with LatentRecorder(model, layers) as recorder:
        logits = model(x)
    return Batch(dict(recorder.outputs), y, torch.arange(len(y)), logits, x=x)


def core(teacher: nn.Module, t_layers, s_layers, batch: Batch, k: int, **graph) -> torch.Tensor:
    graph.setdefault("normalize", True)
    hooked = [name for name in t_layers if name != "output"]
    with torch.no_grad(), LatentRecorder(teacher, hooked) as recorder:
        logits = teacher(batch.x)
    outputs = {**recorder.outputs, "output": logits}
    terms = [
        gkd_distance(latent_graph(outputs[t], k, **graph), latent_graph(batch.layer(s), k, **graph))
        for t, s in zip(t_layers, s_layers, strict=True)
    ]
    return torch.stack(terms).mean()


def test_term_is_mean_over_layer_pairs_of_the_core_across_dimensions() -> None:
    teacher, student = mlp(0, width=16), mlp(1, width=8)
    x, y = inputs()
    batch = student_batch(student, ["1", "3"], x, y)
    reg = GraphDistillation(teacher=teacher, teacher_layers=["1", "output"], layers=["1", "3"], k=4)
    reg.bind(student, num_classes=3)
    expected = core(teacher, ["1", "output"], ["1", "3"], batch, 4)
    torch.testing.assert_close(reg(batch), expected)
    assert expected.item() > 0


def test_zero_when_teacher_is_the_student_and_positive_for_a_shuffled_student() -> None:
    model = mlp(2)
    x, y = inputs(1)
    reg = GraphDistillation(teacher=model, layers=["1", "3", "output"], k=5)  # same names
    reg.bind(model, num_classes=3)
    batch = student_batch(model, ["1", "3"], x, y)
    assert reg(batch).item() == 0.0
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(y)))
    shuffled = Batch(
        {name: z[order] for name, z in batch.latents.items()},
        y,
        batch.indices,
        batch.logits[order],
        x=x,
    )
    assert reg(shuffled).item() > 0.1


def test_teacher_is_frozen_and_outside_parameters_and_state_dict() -> None:
    teacher, student = mlp(3), mlp(4)
    before = copy.deepcopy(teacher.state_dict())
    teacher.train()
    reg = GraphDistillation(teacher=teacher, layers=["1"], k=4)
    reg.bind(student, num_classes=3)
    reg.train()
    assert reg.teacher is teacher and not teacher.training
    assert list(reg.parameters()) == [] and reg.state_dict() == {}
    assert all(not p.requires_grad for p in teacher.parameters())
    x, y = inputs(2)
    batch = student_batch(student, ["1"], x, y)
    reg(batch).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student[0].weight.grad is not None and student[0].weight.grad.abs().sum() > 0
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert "teacher=Sequential" in reg.describe()


def test_copies_and_pickles_keep_working_and_leave_no_hooks_on_the_teacher() -> None:
    teacher, student = mlp(13), mlp(14)
    x, y = inputs(7)
    batch = student_batch(student, ["1"], x, y)
    reg = GraphDistillation(teacher=teacher, teacher_layers=["3"], layers=["1"], k=4)
    reg.bind(student, num_classes=3)
    expected = reg(batch).item()
    assert not teacher._forward_hooks and not teacher[3]._forward_hooks
    for clone in (copy.deepcopy(reg), pickle.loads(pickle.dumps(reg))):
        assert clone.teacher is not teacher
        assert clone(batch).item() == pytest.approx(expected, rel=1e-12)


def test_default_layers_may_arrive_after_bind() -> None:
    teacher, student = mlp(15), mlp(16)
    x, y = inputs(8)
    reg = GraphDistillation(teacher=teacher, k=4)
    reg.bind(student, num_classes=3)
    reg.set_default_layers(["1"])
    batch = student_batch(student, ["1"], x, y)
    torch.testing.assert_close(reg(batch), core(teacher, ["1"], ["1"], batch, 4))


def test_distinct_classes_builds_graphs_between_classes_of_labelled_rows() -> None:
    teacher, student = mlp(5), mlp(6, width=8)
    x, y = inputs(3)
    y = y.clone()
    y[[0, 4]] = -1
    batch = student_batch(student, ["1"], x, y)
    reg = GraphDistillation(
        teacher=teacher, teacher_layers=["3"], layers=["1"], k=3, distinct_classes=True
    )
    assert reg.labeled_only and not GraphDistillation(teacher=teacher, layers=["1"]).labeled_only
    reg.bind(student, num_classes=3)
    keep = y >= 0
    with torch.no_grad(), LatentRecorder(teacher, ["3"]) as recorder:
        teacher(x)
    mask = distinct_classes_mask(y[keep])
    expected = gkd_distance(
        latent_graph(recorder.outputs["3"][keep], 3, normalize=True, mask=mask),
        latent_graph(batch.layer("1")[keep], 3, normalize=True, mask=mask),
    )
    got = reg(batch)
    torch.testing.assert_close(got, expected)
    plain = GraphDistillation(teacher=teacher, teacher_layers=["3"], layers=["1"], k=3)
    assert got.item() != pytest.approx(plain(batch).item())


@pytest.mark.parametrize(
    ("option", "value"),
    [("k", 7), ("similarity", "rbf"), ("normalize", False), ("bandwidth", 0.8)],
)
def test_graph_options_reach_the_core(option: str, value: object) -> None:
    teacher, student = mlp(7), mlp(8)
    x, y = inputs(4)
    batch = student_batch(student, ["3"], x, y)
    base_options = {"k": 4, "similarity": "rbf" if option == "bandwidth" else "auto"}
    options = {**base_options, option: value}
    reg = GraphDistillation(teacher=teacher, teacher_layers=["3"], layers=["3"], **options)
    base = GraphDistillation(teacher=teacher, teacher_layers=["3"], layers=["3"], **base_options)
    k = options.pop("k")
    torch.testing.assert_close(reg(batch), core(teacher, ["3"], ["3"], batch, k, **options))
    assert reg(batch).item() != pytest.approx(base(batch).item())


def test_gradients_match_finite_differences() -> None:
    teacher = mlp(9)
    x, y = inputs(5, n=10)
    reg = GraphDistillation(teacher=teacher, teacher_layers=["1"], layers=["z"], k=3)
    z = torch.tensor(np.random.default_rng(9).normal(size=(10, 4)), requires_grad=True)

    def term(latents: torch.Tensor) -> torch.Tensor:
        return reg(Batch({"z": latents}, y, torch.arange(10), torch.zeros(10, 3), x=x))

    assert torch.autograd.gradcheck(term, (z,), eps=1e-6, atol=1e-6)


def test_teacher_from_a_spec_and_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    saved = build_model("small-cnn", 3, input_shape=(1, 12, 12))
    path = tmp_path / "teacher.pt"
    torch.save(saved.state_dict(), path)
    reg = build_regulariser(
        f"gkd:teacher=small-cnn,teacher_checkpoint={path},teacher_layers=act1,layers=fc,k=3"
    )
    sample = torch.randn(4, 1, 12, 12)
    reg.bind(nn.Linear(1, 1), num_classes=3, sample=sample)
    teacher = reg.teacher
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[key], value)
    x = torch.randn(9, 1, 12, 12)
    student_z = torch.randn(9, 5, requires_grad=True)
    batch = Batch(
        {"fc": student_z}, torch.zeros(9, dtype=torch.long), torch.arange(9), torch.zeros(9, 3), x=x
    )
    expected = core(saved.eval(), ["act1"], ["fc"], batch, 3)
    torch.testing.assert_close(reg(batch), expected)


def test_teacher_from_a_checkpoint_that_names_its_model(tmp_path) -> None:
    torch.manual_seed(1)
    saved = build_model("small-resnet", 2, input_shape=(3, 8, 8))
    path = tmp_path / "named.ckpt"
    torch.save(
        {"hyper_parameters": {"model": "small-resnet"}, "state_dict": saved.state_dict()}, path
    )
    reg = GraphDistillation(
        teacher=str(path), teacher_layers=["pool"], layers=["z"], teacher_pool="avg", k=2
    )
    reg.bind(nn.Linear(1, 1), num_classes=2, sample=torch.zeros(2, 3, 8, 8))
    assert type(reg.teacher).__name__ == "SmallResNet"
    torch.testing.assert_close(reg.teacher.fc.weight, saved.fc.weight)
    anonymous = tmp_path / "anonymous.pt"
    torch.save(saved.state_dict(), anonymous)
    with pytest.raises(LCCInputError, match="does not name its model"):
        GraphDistillation(teacher=str(anonymous), layers=["z"]).bind(
            nn.Linear(1, 1), num_classes=2, sample=torch.zeros(2, 3, 8, 8)
        )


class Opaque:
    """A pickled object: loading it needs weights_only=False."""


def test_checkpoints_that_need_unpickling_are_refused(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("small-cnn", 3, input_shape=(1, 12, 12))
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": model.state_dict(), "extra": Opaque()}, path)
    reg = GraphDistillation(teacher="small-cnn", teacher_checkpoint=str(path), layers=["fc1"])
    with pytest.raises(LCCInputError, match="weights_only"):
        reg.bind(nn.Linear(1, 1), num_classes=3, sample=torch.zeros(2, 1, 12, 12))


def test_teacher_pool_option_changes_conv_latents() -> None:
    torch.manual_seed(2)
    teacher = build_model("small-resnet", 3, input_shape=(1, 8, 8)).double()
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    batch = Batch(
        {"z": torch.randn(10, 4, dtype=torch.float64)},
        torch.zeros(10, dtype=torch.long),
        torch.arange(10),
        torch.zeros(10, 3),
        x=x,
    )
    terms = {}
    for pool in ("flatten", "avg", "max"):
        reg = GraphDistillation(
            teacher=teacher, teacher_layers=["layer2"], layers=["z"], k=3, teacher_pool=pool
        )
        terms[pool] = reg(batch).item()
    assert len({round(v, 12) for v in terms.values()}) == 3


def test_help_and_registry() -> None:
    text = regulariser_help("gkd")
    for name in ("teacher", "teacher_checkpoint", "teacher_layers", "distinct_classes", "k"):
        assert f"  {name} " in text
    assert "  normalized " not in text  # no label variation in GKD
    reg = build_regulariser("gkd:teacher=small-cnn,teacher_layers=act1,fc1,layers=a,b,w=0.5")
    assert reg.teacher_layers == ("act1", "fc1") and reg.layers == ("a", "b")
    assert reg.weight == 0.5 and reg.options.normalize is True


def test_bad_options_and_inputs_raise_lcc_input_error(tmp_path) -> None:
    teacher = mlp(10)
    with pytest.raises(LCCInputError, match="needs a teacher"):
        GraphDistillation(layers=["1"])
    with pytest.raises(LCCInputError, match="same count"):
        GraphDistillation(teacher=teacher, teacher_layers=["1", "3"], layers=["1"])
    with pytest.raises(LCCInputError):
        GraphDistillation(teacher=teacher, layers=["1"], teacher_pool="sum")
    with pytest.raises(LCCInputError):
        GraphDistillation(teacher=teacher, layers=["1"], distinct_classes="perhaps")
    with pytest.raises(LCCInputError, match="no layer"):
        GraphDistillation(teacher=teacher, teacher_layers=["nope"], layers=["1"]).bind(
            teacher, num_classes=3
        )
    with pytest.raises(LCCInputError, match="unknown model"):
        GraphDistillation(teacher="resnet-9000", layers=["1"]).bind(
            teacher, num_classes=3, sample=torch.zeros(2, 1, 8, 8)
        )
    with pytest.raises(LCCInputError, match="does not exist"):
        GraphDistillation(
            teacher="small-cnn", teacher_checkpoint=str(tmp_path / "missing.pt"), layers=["fc1"]
        ).bind(teacher, num_classes=3, sample=torch.zeros(2, 1, 8, 8))
    with pytest.raises(LCCInputError, match="sample batch"):
        GraphDistillation(teacher="small-cnn", layers=["fc1"]).bind(teacher, num_classes=3)
    with pytest.raises(LCCInputError, match="bind"):
        x, y = inputs()
        GraphDistillation(teacher="small-cnn", layers=["z"])(
            Batch({"z": x}, y, torch.arange(len(y)), torch.zeros(len(y), 3), x=x)
        )
    reg = GraphDistillation(teacher=teacher, layers=["1"])
    x, y = inputs()
    with pytest.raises(LCCInputError, match=r"Batch\.x"):
        reg(Batch({"1": x}, y, torch.arange(len(y)), torch.zeros(len(y), 3)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher_follows_the_batch_to_cuda() -> None:
    teacher, student = mlp(11), mlp(12)
    x, y = inputs(6)
    cpu_batch = student_batch(student, ["1"], x, y)
    reg = GraphDistillation(teacher=teacher, layers=["1"], k=4)
    cpu = reg(cpu_batch).item()
    student = student.cuda()
    gpu = reg(student_batch(student, ["1"], x.cuda(), y.cuda()))
    assert gpu.device.type == "cuda" and gpu.item() == pytest.approx(cpu, rel=1e-9)


# --------------------------------------------------------------------------- issue 17


def test_an_untrained_builtin_teacher_is_warned_about(tmp_path) -> None:
    sample = torch.zeros(2, 1, 12, 12)
    with pytest.warns(UserWarning, match=r"teacher=small-cnn has no teacher_checkpoint.*untrained"):
        GraphDistillation(teacher="small-cnn", layers=["fc1"]).bind(
            nn.Linear(1, 1), num_classes=3, sample=sample
        )
    path = tmp_path / "teacher.pt"
    torch.save(build_model("small-cnn", 3, input_shape=(1, 12, 12)).state_dict(), path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained weights: no warning
        GraphDistillation(teacher="small-cnn", teacher_checkpoint=str(path), layers=["fc1"]).bind(
            nn.Linear(1, 1), num_classes=3, sample=sample
        )


def test_a_checkpoint_of_an_lcc_run_names_its_model_through_config_yaml(tmp_path) -> None:
    torch.manual_seed(3)
    saved = build_model("small-resnet", 2, input_shape=(1, 8, 8))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: small-resnet\ndataset: digits\nepochs: 1\n")
    state = {f"model.{key}": value for key, value in saved.state_dict().items()}
    torch.save(
        {"state_dict": state, "epoch": 0, "global_step": 3}, run / "checkpoints" / "last.ckpt"
    )
    reg = GraphDistillation(teacher=str(run / "checkpoints" / "last.ckpt"), layers=["pool"], k=2)
    reg.bind(nn.Linear(1, 1), num_classes=2, sample=torch.zeros(2, 1, 8, 8))
    assert type(reg.teacher).__name__ == "SmallResNet"
    torch.testing.assert_close(reg.teacher.fc.weight, saved.fc.weight)
    (run / "config.yaml").write_text("dataset: digits\n")
    with pytest.raises(LCCInputError, match="names no model for the teacher"):
        GraphDistillation(teacher=str(run / "checkpoints" / "last.ckpt"), layers=["z"]).bind(
            nn.Linear(1, 1), num_classes=2, sample=torch.zeros(2, 1, 8, 8)
        )


def test_a_missing_teacher_layer_says_it_is_the_teachers() -> None:
    sample = torch.zeros(2, 1, 12, 12)
    student = build_model("small-cnn", 3, input_shape=(1, 12, 12))
    with pytest.raises(LCCInputError) as caught:
        GraphDistillation(teacher=mlp(0), teacher_layers=["nope"], layers=["fc1"]).bind(
            student, num_classes=3, sample=sample
        )
    assert str(caught.value).startswith("gkd teacher_layers: the teacher has no layer 'nope'")
    with pytest.warns(UserWarning), pytest.raises(LCCInputError) as caught:
        GraphDistillation(teacher="small-resnet", layers=["act1"]).bind(
            student, num_classes=3, sample=sample
        )
    message = str(caught.value)
    assert message.startswith("gkd teacher_layers (default: the student's layers): the teacher")
    assert "no layer 'act1'" in message and "`lcc layers small-resnet`" in message


@pytest.mark.slow
def test_the_last_checkpoint_of_a_real_lcc_train_run_is_a_teacher(tmp_path) -> None:
    from lcc.cli import main

    run = tmp_path / "run"
    argv = ["train", "small-cnn", "digits", "--out", str(run), "--no-lcc", "--epochs", "1"]
    assert main([*argv, "--subset", "100", "--test-subset", "50"]) == 0
    reg = GraphDistillation(teacher=str(run / "checkpoints" / "last.ckpt"), layers=["fc1"], k=2)
    reg.bind(nn.Linear(1, 1), num_classes=10, sample=torch.zeros(2, 1, 8, 8))
    weights = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(reg.teacher.fc1.weight, weights["model.fc1.weight"])
