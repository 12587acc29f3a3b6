"""Grids of ``lcc train`` runs and their table (the LCC paper's Tables III-IV).

A sweep file (YAML) holds:

- ``base``: options of every run (any ``lcc train`` option: model, dataset, epochs, subset, ...);
- ``grid``: option -> list of values; every combination is one setting (keys in file order).
  ``seed`` in the grid gives the repetitions a table row averages over; any other key (layers,
  k, weight, warmup, regularisers, ...) is passed to :func:`lcc.train.config.merge_config` as
  is, so a new ``lcc train`` option works in a grid without a change here;
- ``baseline``: ``true`` adds, per seed, a run of ``base`` without correction
  (:data:`BASELINE_OPTIONS`), or a mapping of the options that make the baseline;
- ``pretrain`` (optional): options of a first run, in ``DIR/pretrain``, whose last checkpoint
  every other run starts from (its ``checkpoint``); ``model`` defaults to the base's;
- ``evaluate`` (optional): ``lcc evaluate`` options (``noise``, ``fgsm``, ``pgd``,
  ``corruptions``, ``severities``, ``probe``, ``read_with``, ``subset``, ``seed``, ...;
  ``baseline: true`` makes each seed's baseline run the ``--baseline``): the finished runs are
  evaluated and ``DIR/evaluation.md`` / ``.csv`` get the mean ± std over seeds of every
  evaluation column per setting (:func:`lcc.analysis.evaluate.evaluate_sweep`).

Runs go sequentially into ``DIR/<name>`` where the name spells the run's grid values
(``k=5_weight=0.01_seed=0``, ``baseline_seed=0``). A directory with ``metrics.json`` is a
finished run and is skipped; one with only ``config.yaml`` is resumed from its last checkpoint.
Then ``DIR/table.md`` and ``DIR/table.csv`` get one row per setting (baseline first): the mean
and the spread of the test top-1/top-5 over the seeds and the gain over the baseline.

The spread is the sample standard deviation over seeds (``ddof=1``; left out with one seed).
The gain is the difference of the means, setting minus baseline (percentage points in the
markdown, fractions in the CSV like ``metrics.json``).

>>> sweep = parse_sweep({"base": {"model": "small-cnn", "dataset": "digits"},
...                      "grid": {"k": [3, 5], "seed": [0, 1]}, "baseline": True})
>>> [run.name for run in plan_runs(sweep, "out")]
['baseline_seed=0', 'baseline_seed=1', 'k=3_seed=0', 'k=3_seed=1', 'k=5_seed=0', 'k=5_seed=1']
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lcc.errors import LCCInputError
from lcc.io import read_yaml
from lcc.train.config import TrainConfig, merge_config

__all__ = [
    "BASELINE_OPTIONS",
    "SWEEP_KEYS",
    "Sweep",
    "SweepRun",
    "load_sweep",
    "parse_sweep",
    "plan_runs",
]

#: top-level keys of a sweep file
SWEEP_KEYS: tuple[str, ...] = ("base", "grid", "baseline", "pretrain", "evaluate")
#: options of the baseline run (``baseline: true``): plain cross-entropy
BASELINE_OPTIONS: dict[str, Any] = {"no_lcc": True}
#: options a sweep sets itself
_RESERVED = frozenset({"out", "resume"})
_MAX_NAME = 100


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    baseline: dict[str, Any] | None = None
    pretrain: dict[str, Any] | None = None
    evaluate: dict[str, Any] | None = None  # lcc evaluate options (lcc.analysis.evaluate)

    @property
    def setting_keys(self) -> list[str]:
        """Grid keys that define a table row (all but ``seed``)."""
        return [key for key in self.grid if key != "seed"]

    @property
    def seeds(self) -> list[int]:
        """The seeds every setting runs with."""
        if "seed" in self.grid:
            return list(self.grid["seed"])
        return [self.base.get("seed", TrainConfig().seed)]


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its directory ``name``, its ``setting`` (grid values but the seed;
    empty for the baseline and the pretraining), and the ``options`` over the base."""

    name: str
    setting: tuple[tuple[str, Any], ...]
    seed: int
    kind: str  # "pretrain", "baseline" or "grid"
    options: dict[str, Any] = field(default_factory=dict)
    config: TrainConfig | None = None


# --------------------------------------------------------------------------- parsing


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read and check a sweep file (errors name the file)."""
    return load_config_file(path, parse_sweep, "sweep")


def load_config_file(path: str | os.PathLike[str], parse: Callable[[Any], Any], kind: str) -> Any:
    """``parse`` of the YAML file ``path`` (a sweep or a study), its errors naming the file."""
    data = read_yaml(path)
    try:
        return parse(data)
    except LCCInputError as error:
        raise LCCInputError(f"{kind} file {path}: {error}") from None


def check_config_keys(
    data: Any, valid: tuple[str, ...], kind: str, needs: str, hint: str = ""
) -> None:
    """``data`` must be a mapping (with ``needs``) of ``valid`` keys only."""
    if not isinstance(data, Mapping):
        raise LCCInputError(f"a {kind} file must hold a mapping with {needs}")
    unknown = [key for key in data if key not in valid]
    if unknown:
        raise LCCInputError(
            f"unknown {kind} key {unknown[0]!r}; valid keys: {', '.join(valid)}{hint}"
        )


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LCCInputError(f"{name} must be a mapping of option: value, got {value!r}")
    return {str(key).replace("-", "_"): item for key, item in value.items()}


def parse_sweep(data: Mapping[str, Any]) -> Sweep:
    """A :class:`Sweep` from the mapping of a sweep file; every run's options are checked."""
    hint = " (lcc train options go under base: or grid:)"
    check_config_keys(data, SWEEP_KEYS, "sweep", "base: and grid:", hint)
    base = _mapping(data.get("base"), "base")
    grid = _mapping(data.get("grid"), "grid")
    missing = [key for key in ("model", "dataset") if key not in base and key not in grid]
    if missing:
        raise LCCInputError(
            f"the sweep sets no {' and no '.join(missing)}; put them under base: (e.g. "
            "base: {model: small-cnn, dataset: digits})"
        )
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise LCCInputError(
                f"grid.{key} must be a non-empty list of values, got {values!r} "
                f"(a single value belongs under base:)"
            )
    for where, options in (("base", base), ("grid", grid)):
        reserved = sorted(_RESERVED & set(options))
        if reserved:
            raise LCCInputError(f"{where}.{reserved[0]} is set by lcc sweep; remove it")
    baseline_value = data.get("baseline", False)
    if isinstance(baseline_value, bool):
        baseline = dict(BASELINE_OPTIONS) if baseline_value else None
    elif isinstance(baseline_value, Mapping):
        baseline = _mapping(baseline_value, "baseline")
    else:
        raise LCCInputError(
            f"baseline must be true, false or a mapping of options, got {baseline_value!r}"
        )
    pretrain = None
    if data.get("pretrain") is not None:
        pretrain = _mapping(data["pretrain"], "pretrain")
        if "checkpoint" in base:
            raise LCCInputError(
                "base.checkpoint and pretrain: both set the starting weights; keep one"
            )
        pretrain.setdefault("model", base.get("model"))
    evaluate = _mapping(data.get("evaluate"), "evaluate") or None
    if evaluate is not None:
        from lcc.analysis.evaluate import sweep_options

        if sweep_options(evaluate)[1] and baseline is None:
            raise LCCInputError("evaluate.baseline needs the sweep's baseline: add baseline: true")
    sweep = Sweep(base=base, grid=grid, baseline=baseline, pretrain=pretrain, evaluate=evaluate)
    plan_runs(sweep, "sweep")  # checks every run's options
    return sweep


# --------------------------------------------------------------------------- planning


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_value_text(item) for item in value)
    if isinstance(value, Mapping):
        return "+".join(f"{k}-{_value_text(v)}" for k, v in value.items())
    return str(value)


def _name(pairs: Sequence[tuple[str, Any]], prefix: str = "") -> str:
    parts = [prefix] if prefix else []
    parts += [f"{key.replace('_', '-')}={_value_text(value)}" for key, value in pairs]
    text = "_".join(re.sub(r"[^A-Za-z0-9.=+-]+", "-", part) for part in parts)
    if len(text) > _MAX_NAME:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]
        text = f"{text[: _MAX_NAME - 11]}-{digest}"
    return text


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def plan_runs(sweep: Sweep, out: str | os.PathLike[str]) -> list[SweepRun]:
    """Every run of ``sweep`` in order (pretraining, baselines, grid), configs checked."""
    root = Path(out).expanduser().resolve()
    runs: list[SweepRun] = []
    base = dict(sweep.base)
    if sweep.pretrain is not None:
        runs.append(SweepRun(name="pretrain", setting=(), seed=-1, kind="pretrain"))
        base["checkpoint"] = str(root / "pretrain" / "checkpoints" / "last.ckpt")
    if sweep.baseline is not None:
        for seed in sweep.seeds:
            name = _name([("seed", seed)], prefix="baseline")
            options = {**sweep.baseline, "seed": seed}
            runs.append(
                SweepRun(name=name, setting=(), seed=seed, kind="baseline", options=options)
            )
    keys = list(sweep.grid)
    for values in itertools.product(*(sweep.grid[key] for key in keys)):
        pairs = list(zip(keys, values, strict=True))
        options = dict(pairs)
        options.setdefault("seed", sweep.seeds[0])
        setting = tuple((key, value) for key, value in pairs if key != "seed")
        seed = options["seed"]
        name = _name([*setting, ("seed", seed)])
        runs.append(SweepRun(name=name, setting=setting, seed=seed, kind="grid", options=options))
    names = [run.name for run in runs]
    checked = []
    for run in runs:
        name = run.name
        if names.count(name) > 1:  # two settings spelled alike after sanitising
            digest = hashlib.sha1(_canonical(run.options).encode("utf-8")).hexdigest()[:8]
            name = f"{name}-{digest}"
        layers = (sweep.pretrain,) if run.kind == "pretrain" else (base, run.options)
        try:
            config = merge_config(TrainConfig(), *layers, {"out": str(root / name)})
            config.check()
        except LCCInputError as error:
            raise LCCInputError(f"run {name}: {error}") from None
        checked.append(replace(run, name=name, seed=config.seed, config=config))
    return checked
