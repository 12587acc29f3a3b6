"""Tests for `lcc layers`: the table printed for a model, shape options, bad input."""

from __future__ import annotations

import argparse
import importlib

import pytest

from lcc.cli import SUBCOMMANDS, HelpFormatter
from lcc.cli import layers as layers_cli
from lcc.errors import LCCInputError


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="lcc", formatter_class=HelpFormatter)
    layers_cli.register(root.add_subparsers(dest="command", required=True))
    return root


def run(argv: list[str], capsys) -> list[list[str]]:
    args = parser().parse_args(["layers", *argv])
    assert args.handler(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("#") and lines[1].split()[0] == "LAYER"
    return [line.split() for line in lines[2:]]


def test_small_cnn_table_matches_hand_computed_shapes(capsys):
    rows = {row[0]: row[1:] for row in run(["small-cnn", "--dataset", "fashion-mnist"], capsys)}
    # 28x28 -> conv 16 ch -> pool 14x14 -> conv 32 ch -> pool 7x7 -> 1568 -> 128 -> 10
    assert rows["features.block1.conv"][:2] == ["16x28x28", str(16 * 28 * 28)]
    assert rows["features.block1"][:2] == ["16x14x14", str(16 * 14 * 14)]
    assert rows["features.block2"][:2] == ["32x7x7", "1568"]
    assert rows["fc1"] == ["128", "128", str(1568 * 128 + 128)]
    assert rows["head"] == ["10", "10", str(128 * 10 + 10)]
    assert rows["features.block1.conv"][2] == str(1 * 16 * 9)  # no bias


def test_pool_and_explicit_shape(capsys):
    argv = ["small-resnet", "--input-shape", "3,16,16", "--num-classes", "4", "--pool", "avg"]
    rows = {row[0]: row[1:] for row in run(argv, capsys)}
    assert rows["layer2"][:2] == ["32x8x8", "32"]
    assert rows["layer3"][:2] == ["64x4x4", "64"]
    assert rows["fc"][:2] == ["4", "4"]


def test_preset_shapes_need_no_data():
    # cifar100 is not available offline here: its shape comes from the preset table
    assert layers_cli.resolve_shape("cifar100", None, None) == ((3, 32, 32), 100)
    assert layers_cli.resolve_shape("cifar100", "1x8x8", 3) == ((1, 8, 8), 3)
    assert layers_cli.resolve_shape("digits", None, 2) == ((1, 8, 8), 2)


def test_non_preset_dataset_is_loaded_for_its_shape(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (6, 5), (i * 40, 10, 200)).save(tmp_path / name / f"{i}.png")
    assert layers_cli.resolve_shape(f"folder:{tmp_path}", None, None) == ((3, 5, 6), 2)


@pytest.mark.parametrize("text", ["1,28", "a,b,c", "0,2,2", ""])
def test_bad_input_shape(text):
    with pytest.raises(LCCInputError, match="--input-shape"):
        layers_cli.parse_shape(text)


def test_unknown_model_is_an_input_error():
    args = parser().parse_args(["layers", "no-such-model"])
    with pytest.raises(LCCInputError, match="unknown model"):
        args.handler(args)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["layers", "--help"])
    text = capsys.readouterr().out
    assert "--dataset" in text and "(default: fashion-mnist)" in text
    assert "(default: flatten)" in text


def test_cli_main_exit_code_two_on_unknown_model(capsys):
    missing = [m for m in SUBCOMMANDS if importlib.util.find_spec(f"lcc.cli.{m}") is None]
    if missing:
        pytest.skip(f"lcc.cli modules {missing} (other work in progress) are not there yet")
    from lcc.cli import main

    assert main(["layers", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model" in err[0]
