"""Training options the intraclass study varies (optimizer, schedule, dropout, augmentation,
width, depth, stop criterion, superclass labels), declared once.

:class:`TrainingOptions` fields become :class:`lcc.train.config.TrainConfig` fields (so
``lcc train`` flags, ``config.yaml`` keys, sweep/study grid keys, and settings compared on
resume) through :func:`with_training_options`. This module also holds what the options do:
:func:`make_optimizer`, :func:`schedule_factor` and :func:`should_stop`.

>>> schedule_factor("step", 59, 100), schedule_factor("step", 60, 100), schedule_factor("step", 96, 100)
(1.0, 0.2, 0.008000000000000002)
>>> round(schedule_factor("cosine", 50, 100), 3), schedule_factor("constant", 99, 100)
(0.5, 1.0)
"""  # noqa: E501

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lcc.errors import LCCInputError
from lcc.regularisers.options import add_fields, option

__all__ = [
    "AUGMENTS",
    "OPTIMIZERS",
    "SCHEDULES",
    "STEP_FRACTIONS",
    "TrainingOptions",
    "check_training_options",
    "end_of_epoch",
    "make_optimizer",
    "schedule_factor",
    "should_stop",
    "with_training_options",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
SCHEDULES: tuple[str, ...] = ("cosine", "step", "constant")
AUGMENTS: tuple[str, ...] = ("default", "none", "basic")
#: ``--schedule step``: the learning rate is multiplied by 0.2 at these fractions of the run
#: (the paper's epochs 150, 230 and 240 of 250, appendix A.3)
STEP_FRACTIONS: tuple[float, ...] = (0.6, 0.92, 0.96)
STEP_FACTOR = 0.2


def _training(default: Any, help: str, kind: str, **extra: Any) -> Any:
    return option(default, help, kind=kind, group="training", **extra)


@dataclass
class TrainingOptions:
    """The options' declarations (see ``lcc train --help``)."""

    optimizer: str = _training(
        "sgd",
        "optimizer: sgd (with --momentum), adam, adamw (betas 0.9, 0.999; --momentum unused); "
        "--weight-decay is L2 in the gradient for sgd/adam, decoupled for adamw",
        "str",
        choices=OPTIMIZERS,
    )
    adam_lr_scale: float = _training(
        1.0,
        "multiplies --lr for adam and adamw (the paper divides the learning rate by 100 for "
        "Adam: 0.01), so one lr grid serves both optimizers",
        "float",
    )
    schedule: str = _training(
        "cosine",
        "learning-rate schedule over --epochs, per step: cosine (to 0), step (x0.2 at 60%%, "
        "92%% and 96%% of the steps: the paper's epochs 150, 230, 240 of 250), constant",
        "str",
        choices=SCHEDULES,
    )
    dropout: float = _training(
        0.0,
        "dropout probability before the classification head and, for the built-in models, "
        "after each block (0: none, the modules are left out)",
        "float",
    )
    width: float = _training(
        1.0,
        "built-in models: multiplier of every layer's channels/units (small-cnn: 16, 32 conv, "
        "128 hidden; small-resnet: 16, 32, 64); also small-cnn:width=2",
        "float",
    )
    depth: int | None = _training(
        None,
        "built-in models: small-cnn's conv blocks (2: two pooled blocks; more add unpooled "
        "blocks at the last width; 0: none, an MLP without BatchNorm), small-resnet's blocks "
        "per stage (1); also small-cnn:depth=3",
        "int?",
        shown="the model's own (small-cnn 2, small-resnet 1)",
    )
    augment: str = _training(
        "default",
        "training augmentation: default (the dataset's usual one: crop+flip for colour data, "
        "none for grayscale), none, basic (random crop with zero padding H/8 rounded, 4 px at "
        "28-32 px, + horizontal flip except for digit datasets: mnist, digits, idx:)",
        "str",
        choices=AUGMENTS,
    )
    stop_at_train_loss: float | None = _training(
        None,
        "stop at the end of the first epoch whose mean training loss is below this value "
        "(the paper: 1e-4), --epochs being the maximum; the schedule still spans --epochs",
        "float?",
        shown="never",
    )
    track_measures: list[str] | None = _training(  # noqa: RUF009 - None, copied per instance
        None,
        "measures logged during training on a fixed seeded sample of the training set, e.g. "
        "c1,c3,label-variation (names of lcc measure); DIR/measures.jsonl, DIR/tracking/",
        "list?",
        shown="none",
    )
    track_every: int = _training(1, "with --track-measures: every this many epochs", "int")
    track_samples: int = _training(
        500, "with --track-measures: training samples measured (seeded, stratified)", "int"
    )
    superclasses: str | None = option(
        None,
        "train on superclass labels: a YAML map fine class -> superclass (DATASET:super uses "
        "the built-in map of mnist, digits, fashion-mnist, cifar100); the fine labels are kept "
        "for c1/c2 (y = fine classes, y_super = the trained superclasses in lcc measure)",
        kind="str?",
        shown="none (DATASET:super: the built-in map)",
        group="data",
    )


def with_training_options(cls: type) -> type:
    """Add :class:`TrainingOptions`' fields to the dataclass ``cls`` (before ``@dataclass``
    runs), after its ``weight_decay`` field."""
    return add_fields(cls, dataclasses.fields(TrainingOptions), "weight_decay")


def check_training_options(config: Any) -> None:
    """Ranges of the options (choices are checked by the config's coercion)."""
    if not 0 <= config.dropout < 1:
        raise LCCInputError(f"--dropout must be in [0, 1), got {config.dropout}")
    if not config.width > 0:
        raise LCCInputError(f"--width must be > 0, got {config.width}")
    if config.depth is not None and config.depth < 0:
        raise LCCInputError(f"--depth must be >= 0 (0: small-cnn as an MLP), got {config.depth}")
    if config.stop_at_train_loss is not None and not config.stop_at_train_loss > 0:
        raise LCCInputError(f"--stop-at-train-loss must be > 0, got {config.stop_at_train_loss}")
    if config.track_every < 1 or config.track_samples < 10:
        raise LCCInputError("--track-every must be >= 1 and --track-samples >= 10")
    if config.track_measures:
        from lcc.analysis.measures import parse_measures

        parse_measures(list(config.track_measures), superclasses=True)
    if not config.adam_lr_scale > 0:
        raise LCCInputError(f"--adam-lr-scale must be > 0, got {config.adam_lr_scale}")


def make_optimizer(
    groups: list[dict[str, Any]],
    name: str,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    adam_lr_scale: float = 1.0,
) -> Any:
    """The torch optimizer ``name`` over parameter ``groups``.

    >>> import torch
    >>> p = [torch.nn.Parameter(torch.ones(2))]
    >>> type(make_optimizer([{"params": p}], "adamw", lr=0.1, momentum=0.9, weight_decay=0.0)).__name__
    'AdamW'
    """  # noqa: E501
    import torch

    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}.get(name)
    if cls is None:
        raise LCCInputError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    return cls(groups, lr=lr * adam_lr_scale, betas=(0.9, 0.999), weight_decay=weight_decay)


def schedule_factor(name: str, step: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` of ``total`` steps."""
    total = max(1, int(total))
    if name == "constant":
        return 1.0
    if name == "step":
        passed = sum(step >= round(fraction * total) for fraction in STEP_FRACTIONS)
        return STEP_FACTOR**passed
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    raise LCCInputError(f"--schedule {name!r} is not one of {', '.join(SCHEDULES)}")


def should_stop(threshold: float | None, epoch_loss: float | None) -> bool:
    """Whether the stop criterion ``--stop-at-train-loss`` is met by an epoch's mean loss.

    >>> should_stop(1e-4, 5e-5), should_stop(1e-4, 2e-4), should_stop(None, 0.0)
    (True, False, False)
    """
    return threshold is not None and epoch_loss is not None and epoch_loss < threshold


def end_of_epoch(module: Any, epoch: int, loss: float | None) -> None:
    """What the options do after an epoch of :class:`lcc.train.lightning.LCCModule`: stop the
    run below ``--stop-at-train-loss``, record ``--track-measures`` when due (main process)."""
    trainer = module.trainer
    if should_stop(module.stop_at_train_loss, loss):
        trainer.should_stop = True  # this epoch is the last
    tracker = module.tracker
    if tracker is not None and trainer.is_global_zero:
        last = epoch + 1 >= int(trainer.max_epochs or 0) or trainer.should_stop
        if tracker.due(epoch, last):
            tracker.record(module.model, epoch)
