"""Tests of lcc.train.config: defaults, YAML files, merging with the command line, validation."""

from __future__ import annotations

import dataclasses
import re

import pytest

from lcc.cli import build_parser
from lcc.errors import LCCInputError
from lcc.io import read_yaml
from lcc.train.config import TrainConfig, field_names, load_config, merge_config
from lcc.train.rundir import resume_differences, save_config


def _train_parser():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]


def test_every_field_is_an_option_whose_help_shows_its_default():
    parser = _train_parser()
    helps = {action.dest: action.help or "" for action in parser._actions}
    for item in dataclasses.fields(TrainConfig):
        text = " ".join(helps[item.name].split())
        if item.name in ("model", "dataset"):
            assert "may come from --config" in text
            continue
        if item.name == "out":
            assert text.endswith("(required)")
            continue
        if item.metadata.get("shown") is not None:
            expected = item.metadata["shown"]
        elif isinstance(item.default, bool):
            assert item.default is False
            expected = "off"
        else:
            expected = str(item.default)
        assert text.endswith(f"(default: {expected})"), (item.name, text)
    rendered = " ".join(parser.format_help().split())
    assert "(default: 5)" in rendered and "(default: leiden)" in rendered
    assert "default: None" not in rendered and "==SUPPRESS==" not in rendered


def test_choices_are_declared_once_and_shared_with_the_engine():
    from lcc.engine import choices, refresh, selection
    from lcc.train import loop as correction

    fields = {item.name: item for item in dataclasses.fields(TrainConfig)}
    for name, tuple_ in (
        ("method", refresh.CLUSTER_METHODS),
        ("targets", refresh.TARGET_MODES),
        ("knn", refresh.KNN_MODES),
        ("metric", refresh.METRICS),
        ("weights", refresh.WEIGHTS),
        ("source", correction.SOURCES),
        ("pool", correction.POOLS),
        ("class_policy", selection.CLASS_POLICIES),
    ):
        assert fields[name].metadata["choices"] is tuple_, name  # the same object: one declaration
    assert refresh.CLUSTER_METHODS is choices.CLUSTER_METHODS


def test_defaults_follow_the_paper():
    config = TrainConfig()
    assert (config.k, config.weight, config.warmup, config.interval) == (5, 0.01, 1, 1)
    assert (config.method, config.source, config.momentum, config.lr) == (
        "leiden",
        "fresh",
        0.9,
        0.1,
    )


def test_later_layers_win_and_dashes_are_accepted():
    config = merge_config(
        TrainConfig(), {"k": 10, "batch-size": 32, "lr": "1e-3"}, {"k": 7}, None, {}
    )
    assert (config.k, config.batch_size, config.lr) == (7, 32, 0.001)
    assert TrainConfig().k == 5  # the base is not modified


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kk": 1}, "unknown config key 'kk' (did you mean 'k'?)"),
        ({"k": "five"}, "k must be an integer"),
        ({"k": True}, "k must be an integer"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"no_lcc": "maybe"}, "no_lcc must be true or false"),
        ({"method": "kmeans"}, "method='kmeans' is not one of"),
        ({"layers": [1]}, "layers must hold layer names"),
        ({"epochs": 0}, "--epochs must be >= 1"),
        ({"lr": 0}, "--lr must be positive"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1)"),
        ({"subset": 0}, "--subset must be a positive integer"),
        ({"policy_size": 3}, "policy_size is only used by"),
        ({"class_policy": "top-pairs"}, "needs a policy_size"),
        ({"k": None}, "k must not be empty"),
    ],
)
def test_bad_values_raise_one_clear_error(values, message):
    with pytest.raises(LCCInputError) as caught:
        merge_config(TrainConfig(), values)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_layers_accept_a_string_or_commas():
    assert merge_config(TrainConfig(), {"layers": "a,b"}).layers == ["a", "b"]
    assert merge_config(TrainConfig(), {"layers": ["a", "b,c"]}).layers == ["a", "b", "c"]


def test_run_fields_are_required_by_check():
    with pytest.raises(LCCInputError, match="MODEL is required"):
        TrainConfig(dataset="digits", out="x").check()
    with pytest.raises(LCCInputError, match="--out DIR is required"):
        TrainConfig(model="small-cnn", dataset="digits").check()
    assert TrainConfig(model="m", dataset="d", out="o").check().model == "m"


def test_save_and_load_round_trip(tmp_path):
    config = merge_config(
        TrainConfig(model="small-cnn", dataset="digits", out=str(tmp_path / "run")),
        {"layers": ["act1"], "pca": 16, "resume": True, "lr": 0.05},
    )
    path = save_config(config, tmp_path / "config.yaml")
    saved = read_yaml(path)
    assert "resume" not in saved  # run control, not a setting of the run
    assert list(saved) == [name for name in field_names() if name != "resume"]
    again = load_config(path)
    assert dataclasses.replace(again, resume=True) == config
    assert load_config(path, epochs=3).epochs == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k: [1, 2\n", "is not valid YAML (line"),
        ("- k\n- 5\n", "must hold a mapping"),
    ],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(LCCInputError, match=re.escape(message)):
        read_yaml(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(LCCInputError, match="cannot read config file"):
        read_yaml(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}


def test_resume_differences_ignore_the_mutable_keys():
    saved = TrainConfig(model="m", dataset="d", out="o", k=5, epochs=3)
    assert resume_differences(saved, dataclasses.replace(saved, epochs=9, num_workers=2)) == []
    changed = dataclasses.replace(saved, k=3, method="louvain")
    assert resume_differences(saved, changed) == [
        "k: run has 5, requested 3",
        "method: run has leiden, requested louvain",
    ]


def test_resume_differences_read_paths_as_files_and_no_layers_as_the_runs(tmp_path, monkeypatch):
    (tmp_path / "start.ckpt").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    saved = TrainConfig(model="m", dataset="d", checkpoint=str(tmp_path / "start.ckpt"))
    saved = dataclasses.replace(saved, layers=["act1"])
    # the same file written relative to the working directory; layers left to the run
    assert resume_differences(saved, dataclasses.replace(saved, checkpoint="start.ckpt")) == []
    assert resume_differences(saved, dataclasses.replace(saved, layers=None)) == []
    other = dataclasses.replace(saved, checkpoint="other.ckpt", layers=["fc1"])
    assert resume_differences(saved, other) == [
        "layers: run has [act1], requested [fc1]",
        f"checkpoint: run has {tmp_path / 'start.ckpt'}, requested other.ckpt",
    ]
