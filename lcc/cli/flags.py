"""Command-line flags generated from option fields (declared once, with their help texts).

``lcc train`` builds its flags from :class:`lcc.train.config.TrainConfig` and ``lcc cluster``
its refresh flags from :class:`lcc.regularisers.lcc_options.LCCOptions`, both through
:func:`add_flag`, so a flag's type, choices and help are those of its field.

>>> import argparse
>>> from lcc.regularisers.lcc_options import LCCOptions
>>> parser = argparse.ArgumentParser()
>>> add_flag(parser, option_field(LCCOptions, "k"), default=5)
>>> parser.parse_args(["--k", "7"]).k
7
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lcc.regularisers.options import field_kind

__all__ = ["METAVARS", "Lists", "add_flag", "default_text", "option_field", "positive_int"]

#: help texts of options that several commands share
MODEL_HELP = "model spec: small-cnn, small-resnet, hf:NAME, timm:NAME, torchvision:NAME"
NO_PRETRAINED_HELP = "build external models from their config only (no weight download)"

#: metavars of the flags that take a number or a path
METAVARS = {
    "track_measures": "NAME",  # training options of lcc.train.training_options
    "track_every": "N",
    "track_samples": "N",
    "superclasses": "MAP.yaml",
    "stop_at_train_loss": "LOSS",
    "dropout": "P",
    "width": "F",
    "depth": "N",
    "adam_lr_scale": "F",
    "k": "K",
    "weight": "W",
    "ce_weight": "W",
    "warmup": "EPOCHS",
    "interval": "EPOCHS",
    "pca": "DIM",
    "policy_size": "N",
    "resolution": "R",
    "epochs": "N",
    "batch_size": "N",
    "lr": "LR",
    "momentum": "M",
    "weight_decay": "WD",
    "seed": "SEED",
    "checkpoint": "PATH",
    "subset": "N",
    "test_subset": "N",
    "data_dir": "DIR",
    "devices": "N",
    "num_workers": "N",
    "out": "DIR",
    "labeled_fraction": "F",
    "labels_per_class": "N",
    "unlabeled": "DATASET",
    "labeled_ratio": "R",
    "checkpoint_every": "MINUTES",
}


class Lists(argparse.Action):
    """``--layers a b`` or ``--layers a,b``."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        names = [part.strip() for value in values for part in value.split(",") if part.strip()]
        setattr(namespace, self.dest, names)


def positive_int(text: str) -> int:
    """An argparse ``type``: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def option_field(cls: type, name: str) -> dataclasses.Field:
    """The field ``name`` of the options dataclass ``cls``."""
    return next(item for item in dataclasses.fields(cls) if item.name == name)


def default_text(item: dataclasses.Field, default: Any = dataclasses.MISSING) -> str:
    """How ``--help`` shows the default of ``item`` (its ``shown`` metadata first)."""
    shown = item.metadata.get("shown")
    if shown is not None:
        return shown
    value = item.default if default is dataclasses.MISSING else default
    return "off" if isinstance(value, bool) else str(value)


def add_flag(
    group: Any,
    item: dataclasses.Field,
    *,
    default: Any = argparse.SUPPRESS,
    shown: Any = dataclasses.MISSING,
    help: str | None = None,
    show_default: bool = True,
) -> None:
    """Add ``--NAME`` for the field ``item`` to ``group`` (a parser or argument group);
    ``shown``: the default value the help text names (default: the field's); ``help``: the
    whole help text instead of the field's with its default; ``show_default``: False when the
    parser's formatter already appends defaults."""
    kind = field_kind(item).rstrip("?")
    text = item.metadata["help"]
    kwargs: dict[str, Any] = {"dest": item.name, "default": default}
    if kind == "bool":
        kwargs.update(action="store_true", help=f"{text} (default: off)" if show_default else text)
    elif kind == "list":
        kwargs.update(nargs="+", action=Lists, metavar=METAVARS.get(item.name, "LAYER"))
    else:
        kwargs["type"] = {"int": int, "float": float}.get(kind, str)
        if item.metadata.get("choices"):
            kwargs["choices"] = item.metadata["choices"]
        elif item.name in METAVARS:
            kwargs["metavar"] = METAVARS[item.name]
    shown_text = f" (default: {default_text(item, shown)})" if show_default else ""
    kwargs["help"] = help or kwargs.get("help") or f"{text}{shown_text}"
    group.add_argument("--" + item.name.replace("_", "-"), **kwargs)
