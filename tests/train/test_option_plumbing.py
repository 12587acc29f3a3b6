"""Every LCC option given to ``lcc train`` reaches the engine step that uses it.

The options are parsed by the real ``lcc train`` parser, resolved into a run config, turned into
the run's LCC regulariser, and one refresh runs on generated latents. Spies wrap the engine
functions (each still runs): the test reads the arguments each step actually received, so it
fails when any link of the chain (flag -> TrainConfig -> LCCOptions -> RefreshConfig -> step)
drops the option or replaces it by a default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from lcc.cli import build_parser
from lcc.engine import refresh as refresh_module
from lcc.errors import LCCInputError
from lcc.regularisers import lcc as lcc_module
from lcc.regularisers.base import Batch, TrainingLatents
from lcc.synthetic import gaussian_mixture
from lcc.train.config import field_names
from lcc.train.run import resolve_config


def _run_config(argv: list[str]):
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    args = train.parse_args(["small-cnn", "digits", "--out", "unused", *argv])
    options = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    return resolve_config(options)


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, calls: dict) -> None:
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.setdefault(name, []).append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def _refresh_with(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[dict, Any]:
    """Spied engine calls of one refresh of the LCC regulariser ``lcc train argv`` builds."""
    calls: dict = {}
    for name in ("knn", "knn_graph", "cluster_graph", "fit_pca", "exact_targets"):
        _spy(monkeypatch, refresh_module, name, calls)
    _spy(monkeypatch, refresh_module, "approximate_targets", calls)
    _spy(monkeypatch, lcc_module, "select_classes", calls)
    config = _run_config(argv)
    (reg,) = config.build_regularisers(["fc"])
    z, y, _ = gaussian_mixture(n_samples=240, dim=12, n_classes=3, clusters_per_class=2, seed=0)
    rng = np.random.default_rng(0)
    predictions = np.where(rng.random(len(y)) < 0.2, (y + 1) % 3, y)
    latents = TrainingLatents({"fc": z}, y, predictions, "fresh", 0.0)
    reg.install(reg.compute(latents, epoch=max(1, reg.warmup)))
    return calls, reg


def _kwarg(calls: dict, name: str, key: str, position: int | None = None) -> Any:
    args, kwargs = calls[name][-1]
    if key in kwargs:
        return kwargs[key]
    assert position is not None, (name, key, kwargs)
    return args[position]


@pytest.mark.parametrize(
    ("flag", "value", "step", "key", "position", "expected"),
    [
        ("--k", "7", "knn", "k", 1, 7),
        ("--knn", "exact", "knn", "mode", None, "exact"),
        ("--metric", "cosine", "knn", "metric", None, "cosine"),
        ("--seed", "3", "knn", "seed", None, 3),
        ("--weights", "rbf", "knn_graph", "weights", None, "rbf"),
        ("--method", "louvain", "cluster_graph", "method", 1, "louvain"),
        ("--resolution", "0.5", "cluster_graph", "resolution", None, 0.5),
        ("--seed", "3", "cluster_graph", "seed", None, 3),
        ("--pca", "4", "fit_pca", "dim", 1, 4),
        ("--k", "7", "exact_targets", "k", 3, 7),
        ("--metric", "cosine", "exact_targets", "metric", None, "cosine"),
        ("--class-policy", "heaviest-set", "select_classes", "policy", 1, "heaviest-set"),
    ],
)
def test_each_refresh_option_reaches_its_engine_step(
    monkeypatch, flag, value, step, key, position, expected
):
    argv = [flag, value]
    if flag == "--class-policy":
        argv += ["--policy-size", "2"]
    calls, _ = _refresh_with(monkeypatch, argv)
    assert _kwarg(calls, step, key, position) == expected
    default, _ = _refresh_with(monkeypatch, [])
    assert step not in default or _kwarg(default, step, key, position) != expected, (
        "the default already equals the tested value: the test would not see the option"
    )


def test_policy_size_and_approximate_targets_reach_the_engine(monkeypatch):
    argv = ["--class-policy", "top-pairs", "--policy-size", "1", "--targets", "approximate"]
    calls, _ = _refresh_with(monkeypatch, argv)
    args, kwargs = calls["select_classes"][-1]
    assert (kwargs.get("size", args[2] if len(args) > 2 else None)) == 1
    assert "approximate_targets" in calls and "exact_targets" not in calls


def test_squared_weight_warmup_and_interval_reach_the_loss_and_schedule(monkeypatch):
    _, reg = _refresh_with(
        monkeypatch, ["--squared", "--weight", "0.3", "--warmup", "2", "--interval", "3"]
    )
    assert [e for e in range(9) if reg.is_refresh_epoch(e)] == [2, 5, 8]
    assert reg.weight == 0.3 and reg.warmup == 2
    # the squared loss of eq. 8 computed by hand on the installed targets
    layer = reg.state.layers["fc"]
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(layer.n_samples, layer.target_vectors.shape[1], generator=generator)
    index = torch.arange(layer.n_samples)
    y = torch.zeros(layer.n_samples, dtype=torch.long)
    term = reg(Batch(latents={"fc": z}, y=y, indices=index, logits=None, epoch=2))
    rows = torch.from_numpy(layer.target_indices)
    targets = torch.from_numpy(layer.target_vectors)
    squared = ((z[rows] - targets) ** 2).sum(1)
    plain = squared.sqrt()
    d = z.shape[1]
    assert float(term) != pytest.approx(float((plain / d**0.5).mean()), rel=1e-4)
    assert reg.losses["fc"].squared is True


def test_refresh_device_auto_follows_the_training_device_into_the_engine():
    z, y, _ = gaussian_mixture(n_samples=120, dim=8, n_classes=3, seed=0)
    on_gpu = TrainingLatents({"fc": z}, y, None, "fresh", 0.0, device="cuda:0")
    auto = _run_config([]).build_regularisers(["fc"])[0]
    if not torch.cuda.is_available():  # the training device reached the engine's device check
        with pytest.raises(LCCInputError, match="CUDA is not available"):
            auto.compute(on_gpu, epoch=1)
    (cpu,) = _run_config(["--refresh-device", "cpu"]).build_regularisers(["fc"])
    state = cpu.compute(on_gpu, epoch=1)  # forced onto the CPU path whatever the training device
    on_cpu = dataclasses.replace(on_gpu, device="cpu")
    expected = auto.compute(on_cpu, epoch=1)
    assert np.array_equal(state.layers["fc"].clusters, expected.layers["fc"].clusters)


def test_orthogonal_correction_and_bandwidth_reach_the_engine(monkeypatch):
    """--correction/--tangent-k/--tangent-dim reach the orthogonal projection, --bandwidth the
    graph; the refresh's stats record what the projection did."""
    calls: dict = {}
    _spy(monkeypatch, refresh_module, "orthogonal_targets", calls)
    argv = ["--correction", "orthogonal", "--tangent-k", "9", "--tangent-dim", "0.7"]
    spied, reg = _refresh_with(monkeypatch, [*argv, "--weights", "rbf", "--bandwidth", "1.5"])
    assert _kwarg(calls, "orthogonal_targets", "tangent_k") == 9
    assert _kwarg(calls, "orthogonal_targets", "tangent_dim") == 0.7
    assert _kwarg(spied, "knn_graph", "bandwidth") == 1.5
    stats = reg.state.layers["fc"].stats
    assert stats["correction"] == "orthogonal" and "orthogonal_mean_ratio" in stats
    assert stats["orthogonal_projected"] + stats["orthogonal_fallback"] == stats["correctible"]
    calls.clear()
    default, reg = _refresh_with(monkeypatch, [])
    assert "orthogonal_targets" not in calls and _kwarg(default, "knn_graph", "bandwidth") is None


def test_refresh_bn_reaches_the_regularisation():
    from lcc.train.lightning import LCCModule

    config = _run_config(["--refresh-bn", "batch"])
    assert config.refresh_bn == "batch" and _run_config([]).refresh_bn == "running"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    (reg,) = config.build_regularisers(["0"])
    module = LCCModule(model, num_classes=3, n_train=10, regularisers=[reg], refresh_bn="batch")
    assert module.regularisation.refresh_bn == "batch"
