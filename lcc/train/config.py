"""Settings of one ``lcc train`` run: defaults, YAML files, command-line overrides.

:class:`TrainConfig` holds every option of ``lcc train`` (its fields are the option names with
``-`` written ``_``; a YAML config file uses the same keys). Values are resolved in this order,
later winning: the field defaults, the ``--config`` file, the options given on the command line.
The resolved config is saved as ``DIR/config.yaml`` in the run directory, and that file can be
passed back with ``--config`` to repeat the run.

>>> config = merge_config(TrainConfig(), {"k": 10, "layers": "act1"}, {"k": 7})
>>> config.k, config.layers
(7, ['act1'])
>>> merge_config(TrainConfig(), {"kk": 10})
Traceback (most recent call last):
...
lcc.errors.LCCInputError: unknown config key 'kk' (did you mean 'k'?); valid keys: model, ...
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lcc.engine.choices import LATENT_DTYPES, POOLS, PRECISIONS, REFRESH_BN, SOURCES
from lcc.errors import LCCInputError
from lcc.regularisers.lcc_options import LCCOptions
from lcc.regularisers.options import add_fields, coerce_fields, did_you_mean, option
from lcc.train.training_options import check_training_options, with_training_options

STRATEGIES: tuple[str, ...] = ("auto", "ddp")
ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "gpu", "cuda", "mps")


def _option(
    default: Any,
    help: str,
    *,
    kind: str,
    choices: tuple[str, ...] | None = None,
    shown: str | None = None,
    group: str = "training",
) -> Any:
    """A dataclass field with the metadata the CLI parser is built from."""
    return option(default, help, choices=choices, kind=kind, shown=shown, group=group)


#: LCC's options that ``lcc train`` takes from :class:`LCCOptions` (``layers`` and ``seed``
#: are the run's own: every regulariser's default layers, the seed of everything)
LCC_FIELDS: tuple[str, ...] = tuple(
    item.name for item in dataclasses.fields(LCCOptions) if item.name not in ("layers", "seed")
)


def _with_lcc_options(cls: type) -> type:
    """Add LCC's options (declared once, in :class:`LCCOptions`) as fields of ``cls``, after
    ``layers``, in the ``lcc`` group of ``lcc train --help``."""
    lcc = [item for item in dataclasses.fields(LCCOptions) if item.name in LCC_FIELDS]
    return add_fields(cls, lcc, "layers", group="lcc")


@dataclass
@_with_lcc_options
@with_training_options
class TrainConfig:
    """Every option of ``lcc train`` (see ``lcc train --help``); validated by :meth:`check`.

    >>> TrainConfig(model="small-cnn", dataset="digits", out="run").check().lr
    0.1
    """

    model: str | None = _option(
        None,
        "model spec: small-cnn, small-resnet, hf:NAME, timm:NAME, torchvision:NAME",
        kind="str?",
        group="run",
    )
    dataset: str | None = _option(
        None,
        "dataset spec: digits, mnist, fashion-mnist, cifar10, cifar100, eurosat, hf:NAME, "
        "folder:PATH, idx:PATH",
        kind="str?",
        group="run",
    )
    out: str | None = _option(
        None,
        "run directory: config.yaml, checkpoints/, metrics.json, refreshes.jsonl, logs",
        kind="str?",
        group="run",
    )
    layers: list[str] | None = _option(  # noqa: RUF009 - a None default, copied per instance
        None,
        "layers whose latents are corrected (names from `lcc layers MODEL`)",
        kind="list?",
        shown="the model's penultimate layer: the last submodule run before the "
        "classification head, dropout skipped (act1 for small-cnn)",
        group="lcc",
    )
    source: str = _option(
        "fresh",
        "latents of a refresh: an extra eval pass over the training set (fresh, the paper) or "
        "those recorded during the previous epoch's training steps (recorded, no extra pass)",
        kind="str",
        choices=SOURCES,
        group="lcc",
    )
    pool: str = _option(
        "flatten", "how conv feature maps become vectors", kind="str", choices=POOLS, group="lcc"
    )
    refresh_bn: str = _option(
        "running",
        "BatchNorm statistics of the fresh latent pass: running (eval mode, as the paper's code), "
        "recalibrate (running statistics re-estimated first on a seeded sample of 4,096 training "
        "samples, precise BN; they stay in the model) or batch (each batch's own statistics, the "
        "running ones untouched). With running statistics the pass of small-resnet fine-tuned at "
        "lr 0.05 scored up to 43 points away from training (mean 7.5), recalibrated up to 20 "
        "(mean 2.9); running stays the default (the paper's code) because recalibrate moved "
        "neither top-1 nor the misclustered fraction beyond seed noise over 5 paired seeds and "
        "doubles the refresh time (bench/compare_lcc.py, README 'LCC variants')",
        kind="str",
        choices=REFRESH_BN,
        group="lcc",
    )
    regularisers: list[Any] | None = _option(  # noqa: RUF009 - a None default, copied per instance
        None,
        "latent regularisers of the run, any combination: NAME or NAME:key=value,... (repeat "
        "the option; `--help-reg NAME` lists a regulariser's options). lcc takes its defaults "
        "from the LCC options above, the others their layers from --layers",
        kind="specs?",
        shown="lcc alone (none with --no-lcc)",
        group="lcc",
    )
    ce_weight: float = _option(
        1.0,
        "weight of the cross-entropy; 0 trains on the regularisers alone (e.g. label variation "
        "of the output as the objective, LGG paper sec. 4.2)",
        kind="float",
        group="lcc",
    )
    no_lcc: bool = _option(
        False, "train without any regulariser (the baseline)", kind="bool", group="lcc"
    )
    epochs: int = _option(
        10, "training epochs (cosine learning-rate schedule over them)", kind="int"
    )
    batch_size: int = _option(128, "batch size (per process)", kind="int")
    lr: float = _option(0.1, "initial learning rate of SGD", kind="float")
    momentum: float = _option(0.9, "SGD momentum", kind="float")
    weight_decay: float = _option(5e-4, "SGD weight decay", kind="float")
    seed: int = _option(
        0, "seed of everything: weights, data order, subsets, clustering", kind="int"
    )
    resume: bool = _option(False, "continue the run in --out from its last checkpoint", kind="bool")
    no_pretrained: bool = _option(
        False, "external models start from random weights (no download)", kind="bool", group="data"
    )
    checkpoint: str | None = _option(
        None,
        "start from these saved weights (state_dict, Lightning .ckpt or .safetensors)",
        kind="str?",
        shown="none",
        group="data",
    )
    subset: int | None = _option(
        None,
        "use a seeded stratified subset of this many training samples",
        kind="int?",
        shown="all",
        group="data",
    )
    labeled_fraction: float | None = _option(
        None,
        "keep the labels of a stratified, seeded fraction (0, 1] of the training set; the rest "
        "is trained on unlabelled (cross-entropy and LCC-family terms see labelled samples only)",
        kind="float?",
        shown="all labelled",
        group="data",
    )
    labels_per_class: int | None = _option(
        None,
        "keep the labels of this many training samples per class (stratified, seeded); the "
        "rest is unlabelled",
        kind="int?",
        shown="all labelled",
        group="data",
    )
    unlabeled: str | None = _option(
        None,
        "add an unlabelled set: a DATASET spec (its labels are ignored) or a folder of images "
        "without classes; images must have the training set's shape",
        kind="str?",
        shown="none",
        group="data",
    )
    labeled_ratio: float = _option(
        0.5,
        "share of labelled samples in each batch when some are unlabelled (an epoch is one "
        "pass over the larger of the two sets)",
        kind="float",
        group="data",
    )
    test_subset: int | None = _option(
        None,
        "use a seeded stratified subset of this many test samples",
        kind="int?",
        shown="all",
        group="data",
    )
    data_dir: str | None = _option(
        None, "dataset root", kind="str?", shown="$LCC_DATA_DIR or ~/.cache/lcc/data", group="data"
    )
    devices: int = _option(
        1, "number of processes (devices) to train on", kind="int", group="system"
    )
    strategy: str = _option(
        "auto",
        "distribution strategy; auto = ddp when --devices > 1",
        kind="str",
        choices=STRATEGIES,
        group="system",
    )
    accelerator: str = _option(
        "auto", "Lightning accelerator", kind="str", choices=ACCELERATORS, group="system"
    )
    precision: str = _option(
        "32",
        "numeric precision of training (Lightning's names): 32, bf16-mixed (CPU or GPU), "
        "16-mixed (GPU only); the regularisers keep their graphs and distances in float32",
        kind="str",
        choices=PRECISIONS,
        group="system",
    )
    num_workers: int = _option(0, "DataLoader worker processes", kind="int", group="system")
    latents_on_disk: bool = _option(
        False,
        "keep the training-set latents of refreshes in memory-mapped files in DIR/latents "
        "instead of RAM (for large training sets)",
        kind="bool",
        group="system",
    )
    latents_dtype: str = _option(
        "float32",
        "dtype of latents kept on disk (float16 halves the files)",
        kind="str",
        choices=LATENT_DTYPES,
        group="system",
    )
    checkpoint_every: float | None = _option(
        None,
        "also save a mid-epoch checkpoint every this many minutes (SIGTERM/SIGINT always save one)",
        kind="float?",
        shown="every epoch only",
        group="system",
    )
    keep_checkpoints: bool = _option(
        False,
        "also keep checkpoints/epoch=E.ckpt of every epoch, besides last.ckpt",
        kind="bool",
        group="system",
    )
    save_latents: bool = _option(
        False,
        "also store each refresh's latents z and labels y in DIR/refresh/*.npz "
        "(readable by `lcc cluster`)",
        kind="bool",
        group="system",
    )

    # --- validation ------------------------------------------------------------------------

    def check(self, *, require_run: bool = True) -> TrainConfig:
        """Validate every value (types, ranges, choices); returns ``self``.

        ``require_run``: MODEL, DATASET and ``--out`` must be set.
        """
        self.coerce()
        if require_run:
            for name, what in (("model", "MODEL"), ("dataset", "DATASET"), ("out", "--out DIR")):
                if not getattr(self, name):
                    raise LCCInputError(
                        f"{what} is required: pass it on the command line or as `{name}:` in "
                        "the --config file"
                    )
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("seed", 0),
            ("devices", 1),
            ("num_workers", 0),
            ("weight_decay", 0),
            ("ce_weight", 0),
        ):
            if getattr(self, name) < low:
                raise LCCInputError(f"{_flag(name)} must be >= {low}, got {getattr(self, name)}")
        for name in ("labeled_fraction", "labeled_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise LCCInputError(f"{_flag(name)} must be in (0, 1], got {value}")
        if self.labeled_fraction is not None and self.labels_per_class is not None:
            raise LCCInputError("pass --labeled-fraction or --labels-per-class, not both")
        if self.checkpoint_every is not None and not self.checkpoint_every > 0:
            raise LCCInputError(
                f"--checkpoint-every must be > 0 minutes, got {self.checkpoint_every}"
            )
        for name in ("subset", "test_subset", "labels_per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LCCInputError(f"{_flag(name)} must be a positive integer, got {value}")
        if not self.lr > 0:
            raise LCCInputError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise LCCInputError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.layers is not None and not self.layers:
            raise LCCInputError("--layers needs at least one layer name")
        if self.ce_weight == 0 and self.no_lcc:
            raise LCCInputError("--ce-weight 0 with --no-lcc leaves nothing to train on")
        if self.no_lcc and self.regularisers:
            raise LCCInputError(
                "--no-lcc trains the baseline without regularisers; drop it or drop --reg"
            )
        self.lcc_options()  # LCC's settings, checked by the one class that declares them
        check_training_options(self)  # optimizer, dropout, width, ... (training_options.py)
        return self

    def coerce(self) -> TrainConfig:
        """Convert every value (YAML, text, Python) to its field's kind; returns ``self``."""
        coerce_fields(self)
        return self

    def lcc_options(self, layers: list[str] | None = None) -> LCCOptions:
        """This run's LCC settings as :class:`LCCOptions` (the defaults of ``lcc`` entries)."""
        values = {name: getattr(self, name) for name in LCC_FIELDS}
        return LCCOptions(layers=list(layers or []), seed=self.seed, **values)

    def regulariser_specs(self) -> list[Any]:
        """The run's regulariser specs: ``--reg`` entries, or LCC alone (none with --no-lcc)."""
        if self.no_lcc:
            return []
        return list(self.regularisers) if self.regularisers else ["lcc"]

    def unread_options(self) -> list[str]:
        """Flags set away from their defaults that no regulariser of the run reads (LCC's
        options without an ``lcc`` entry that takes them, ``--layers`` when every entry names
        its own layers); none for a baseline (``--no-lcc``).

        >>> TrainConfig(k=7, layers=["fc1"], regularisers=["label-variation:layers=act1"]).unread_options()
        ['--layers', '--k']
        >>> TrainConfig(k=7, regularisers=["lcc:k=5"]).unread_options()
        ['--k']
        """  # noqa: E501
        from lcc.regularisers import parse_spec

        if self.no_lcc:  # a baseline often shares its options with the runs it is compared to
            return []
        specs = [parse_spec(spec) for spec in self.regulariser_specs()]
        defaults = TrainConfig()
        unread = []
        if self.layers is not None and all("layers" in options for _, options in specs):
            unread.append("layers")
        for name in LCC_FIELDS:
            taken = any(reg == "lcc" and name not in options for reg, options in specs)
            if not taken and getattr(self, name) != getattr(defaults, name):
                unread.append(name)
        return [_flag(name) for name in unread]

    def build_regularisers(self, layers: list[str]) -> list[Any]:
        """The :class:`lcc.regularisers.Regulariser` objects of this run, default layers
        ``layers``: ``lcc`` entries take the LCC options of this config as defaults."""
        from lcc.regularisers import build_regulariser, parse_spec

        lcc_defaults = dataclasses.asdict(self.lcc_options(layers))
        others = {"layers": list(layers), "seed": self.seed}  # each regulariser copies them
        return [
            build_regulariser(spec, **(lcc_defaults if parse_spec(spec)[0] == "lcc" else others))
            for spec in self.regulariser_specs()
        ]

    # --- conversion ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain values, YAML/JSON-ready, in field order."""
        values = dataclasses.asdict(self)
        if values["layers"] is not None:
            values["layers"] = list(values["layers"])
        return values

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (unknown keys -> :class:`LCCInputError`)."""
        return merge_config(self, changes)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_names() -> list[str]:
    """Valid config keys, in ``lcc train --help`` order."""
    return [item.name for item in dataclasses.fields(TrainConfig)]


def merge_config(base: TrainConfig, *layers: Mapping[str, Any] | None) -> TrainConfig:
    """``base`` with each mapping of ``layers`` applied in turn (later wins), validated.

    Keys may use ``-`` or ``_``. Unknown keys raise :class:`LCCInputError` naming the
    closest valid one. ``MODEL``/``DATASET``/``--out`` are not required here (see
    :meth:`TrainConfig.check`).
    """
    values = base.to_dict()
    valid = field_names()
    for layer in layers:
        if not layer:
            continue
        for key, value in layer.items():
            name = str(key).replace("-", "_")
            if name not in valid:
                raise LCCInputError(
                    f"unknown config key {key!r}{did_you_mean(name, valid)}; "
                    f"valid keys: {', '.join(valid)}"
                )
            values[name] = value
    return TrainConfig(**values).check(require_run=False)


def load_config(path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file, then ``overrides`` (unknown keys -> error)."""
    from lcc.io import read_yaml

    return merge_config(TrainConfig(), read_yaml(path), overrides)


__all__ = [
    "TrainConfig",
    "field_names",
    "load_config",
    "merge_config",
]
