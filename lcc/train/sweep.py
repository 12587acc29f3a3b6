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

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcc.analysis.paired import (
    PAIRED_CAPTION,
    PAIRED_COLUMNS,
    PairedGain,
    gain_text,
    paired_cells,
    paired_gain,
)
from lcc.errors import LCCInputError
from lcc.train.config import TrainConfig, merge_config, read_yaml, resume_differences

__all__ = [
    "BASELINE_OPTIONS",
    "SWEEP_KEYS",
    "Sweep",
    "SweepResult",
    "SweepRun",
    "SweepStopped",
    "TableRow",
    "check_layers",
    "check_out",
    "format_table",
    "load_sweep",
    "parse_sweep",
    "plan_runs",
    "relocated",
    "run_state",
    "run_sweep",
    "sweep_table",
    "table_csv",
    "write_table",
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


@dataclass(frozen=True)
class TableRow:
    """A row of the sweep table: a setting's mean/std over its finished seeds."""

    setting: tuple[tuple[str, Any], ...]
    baseline: bool
    runs: list[str]
    finished: int
    top1_mean: float | None
    top1_std: float | None
    top5_mean: float | None
    top5_std: float | None
    gain_top1: float | None
    gain_top5: float | None
    paired_top1: PairedGain | None = None  # gains over the baseline's runs of the same seeds
    paired_top5: PairedGain | None = None


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` did: ``status`` per run name (done, trained, resumed, diverged,
    skipped), the table rows and the written table files."""

    status: dict[str, str]
    rows: list[TableRow]
    markdown: Path
    csv: Path


class SweepStopped(Exception):
    """A signal stopped the sweep during a run (its checkpoint is saved); ``exit_code`` is
    128 + the signal number. Running the sweep again continues it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- parsing


def load_sweep(path: str | os.PathLike[str]) -> Sweep:
    """Read and check a sweep file (errors name the file)."""
    data = read_yaml(path)
    try:
        return parse_sweep(data)
    except LCCInputError as error:
        raise LCCInputError(f"sweep file {path}: {error}") from None


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LCCInputError(f"{name} must be a mapping of option: value, got {value!r}")
    return {str(key).replace("-", "_"): item for key, item in value.items()}


def parse_sweep(data: Mapping[str, Any]) -> Sweep:
    """A :class:`Sweep` from the mapping of a sweep file; every run's options are checked."""
    if not isinstance(data, Mapping):
        raise LCCInputError("a sweep file must hold a mapping with base: and grid:")
    unknown = [key for key in data if key not in SWEEP_KEYS]
    if unknown:
        raise LCCInputError(
            f"unknown sweep key {unknown[0]!r}; valid keys: {', '.join(SWEEP_KEYS)} "
            "(lcc train options go under base: or grid:)"
        )
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
            options = {**sweep.baseline, "seed": seed}
            runs.append(
                SweepRun(
                    name=_name([("seed", seed)], prefix="baseline"),
                    setting=(),
                    seed=seed,
                    kind="baseline",
                    options=options,
                )
            )
    keys = list(sweep.grid)
    for values in itertools.product(*(sweep.grid[key] for key in keys)):
        pairs = list(zip(keys, values, strict=True))
        options = dict(pairs)
        options.setdefault("seed", sweep.seeds[0])
        setting = tuple((key, value) for key, value in pairs if key != "seed")
        ordered = [*setting, ("seed", options["seed"])]
        runs.append(
            SweepRun(
                name=_name(ordered), setting=setting, seed=options["seed"], kind="grid",
                options=options,
            )
        )  # fmt: skip
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
        checked.append(
            SweepRun(
                name=name,
                setting=run.setting,
                seed=config.seed,
                kind=run.kind,
                options=run.options,
                config=config,
            )
        )
    return checked


# --------------------------------------------------------------------------- running


def relocated(saved: TrainConfig, requested: TrainConfig) -> TrainConfig:
    """``saved`` as if its sweep folder were where ``requested``'s is: its ``out``, and every
    path option under its old sweep folder (the pretraining's checkpoint), moved there. A
    copied or moved sweep folder then compares equal to its sweep.

    >>> saved = TrainConfig(out="/old/sw/k=3", checkpoint="/old/sw/pretrain/checkpoints/last.ckpt")
    >>> moved = relocated(saved, TrainConfig(out="/new/sw2/k=3"))
    >>> moved.out, moved.checkpoint
    ('/new/sw2/k=3', '/new/sw2/pretrain/checkpoints/last.ckpt')
    """
    if not saved.out or not requested.out:
        return saved
    old_root, new_root = Path(saved.out).parent, Path(requested.out).parent
    changes: dict[str, Any] = {"out": requested.out}
    for name, value in saved.to_dict().items():
        if name != "out" and isinstance(value, str) and Path(value).is_absolute():
            path = Path(value)
            if path.is_relative_to(old_root):
                changes[name] = str(new_root / path.relative_to(old_root))
    return merge_config(saved, changes)


def run_state(run: SweepRun) -> tuple[str, TrainConfig]:
    """(done | resume | new, the config to train with); raises when the directory holds a run
    with other settings. done: finished with these settings; resume: started."""
    assert run.config is not None
    requested = run.config
    folder = Path(requested.out or "")
    saved_file = folder / "config.yaml"
    if not saved_file.is_file():
        if (folder / "metrics.json").is_file():
            raise LCCInputError(
                f"{folder} holds metrics.json but no config.yaml, so its settings are unknown; "
                "choose another --out for the sweep"
            )
        return "new", requested
    saved = relocated(merge_config(TrainConfig(), read_yaml(saved_file)), requested)
    if requested.layers is None and saved.layers is not None:
        requested = merge_config(requested, {"layers": saved.layers})  # the default, resolved
    differences = resume_differences(saved, requested)
    if differences:
        raise LCCInputError(
            f"{folder} holds a run with other settings ({'; '.join(differences)}); give the "
            "sweep those settings again, or choose another --out for the new ones"
        )
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        try:
            epochs = json.loads(metrics_file.read_text(encoding="utf-8")).get("epochs")
        except ValueError:
            epochs = None
        if epochs == requested.epochs:
            return "done", requested
    return "resume", merge_config(requested, {"resume": True})


def _say(text: str) -> None:
    print(f"lcc sweep: {text}", file=sys.stderr, flush=True)


def run_sweep(
    sweep: Sweep,
    out: str | os.PathLike[str],
    *,
    train_runs: bool = True,
    report: bool = True,
) -> SweepResult:
    """Run every unfinished run of ``sweep`` in ``out`` with :func:`lcc.train.run.train`, one
    after the other, then write the table.

    ``train_runs=False`` writes the table from the finished runs only. ``report``: progress
    and per-epoch lines on stderr.
    """
    from lcc.train.lightning import NonFiniteLossError
    from lcc.train.run import train
    from lcc.train.stopping import TrainingStopped

    root = Path(out).expanduser().resolve()
    check_out(root)
    runs = plan_runs(sweep, root)
    states = {run.name: run_state(run) for run in runs}  # every clash found before any training
    if train_runs:
        check_layers([run for run in runs if states[run.name][0] != "done"])
    status: dict[str, str] = {}
    for position, run in enumerate(runs, start=1):
        state, config = states[run.name]
        where = f"[{position}/{len(runs)}] {run.name}"
        if state == "done":
            status[run.name] = "done"
            if report:
                _say(f"{where}: finished earlier, skipped")
            continue
        if not train_runs:
            status[run.name] = "skipped"
            continue
        if report:
            _say(f"{where}: {'resuming' if state == 'resume' else 'training'}")
        root.mkdir(parents=True, exist_ok=True)
        if state == "resume":
            _adopt_location(config)
        try:
            train(config, report=report)
        except TrainingStopped as stopped:
            raise SweepStopped(
                f"stopped during run {where} (its last checkpoint is kept)", stopped.exit_code
            ) from None
        except NonFiniteLossError as error:
            status[run.name] = "diverged"
            if report:
                _say(f"{where}: diverged ({error}); left out of the table")
            continue
        status[run.name] = "resumed" if state == "resume" else "trained"
    rows = sweep_table(sweep, runs)
    if sweep.evaluate is not None:  # lcc evaluate on the finished runs: DIR/evaluation.md, .csv
        from lcc.analysis.evaluate import evaluate_sweep

        evaluate_sweep(runs, sweep.evaluate, root, say=_say if report else None)
    markdown, table = write_table(sweep, rows, root)
    return SweepResult(status=status, rows=rows, markdown=markdown, csv=table)


#: the first bytes of the table files :func:`write_table` writes, by name
_TABLE_HEADS: dict[str, bytes] = {"table.md": b"| ", "table.csv": b"setting,"}


def check_out(root: Path) -> None:
    """Refuse a sweep folder that is a file, an ``lcc train`` run, or holds table files that
    ``lcc sweep`` did not write (they would be replaced)."""
    if root.exists() and not root.is_dir():
        raise LCCInputError(f"--out {root} is a file; pass a folder for the sweep's runs")
    if (root / "config.yaml").is_file():
        raise LCCInputError(
            f"--out {root} is the folder of an lcc train run (config.yaml); pass another folder "
            "for the sweep's runs"
        )
    for name, head in _TABLE_HEADS.items():
        file = root / name
        if file.exists() and (not file.is_file() or not file.read_bytes().startswith(head)):
            raise LCCInputError(
                f"--out {root} holds a {name} that lcc sweep did not write; pass another folder "
                "for the sweep's runs"
            )


def _adopt_location(config: TrainConfig) -> None:
    """A started run of a moved or copied sweep folder: its config.yaml moves with it (what
    ``lcc train`` saves there anyway once it resumes), so the resume compares equal."""
    from lcc.train.config import save_config

    saved_file = Path(config.out or "") / "config.yaml"
    saved = merge_config(TrainConfig(), read_yaml(saved_file))
    if saved.out != config.out:
        save_config(relocated(saved, config), saved_file)


def check_layers(runs: Sequence[SweepRun]) -> None:
    """Check the layers of every run on its model before any run trains, as ``lcc train``
    does at its start (:func:`lcc.train.run.default_layers`, :func:`lcc.train.run.probe_layers`
    on two samples); one untrained model per (model, dataset). Raises LCCInputError naming
    the run."""

    from lcc.regularisers.base import OUTPUT
    from lcc.train.build import default_layers, probe_layers

    probes: dict[tuple[str, str], tuple[Any, Any]] = {}
    for run in runs:
        config = run.config
        assert config is not None
        if config.no_lcc:
            continue
        try:
            key = (config.model or "", config.dataset or "")
            if key not in probes:
                probes[key] = _untrained(config)
            model, sample = probes[key]
            layers = list(config.layers) if config.layers else default_layers(model, sample)
            read = [
                name
                for regulariser in config.build_regularisers(layers)
                for name in regulariser.layers
                if name != OUTPUT
            ]
            probe_layers(model, list(dict.fromkeys(read)), sample)
        except LCCInputError as error:
            raise LCCInputError(f"run {run.name}: {error}") from None


def _untrained(config: TrainConfig) -> tuple[Any, Any]:
    """The run's architecture with initial weights (no download) and two input samples."""
    import torch

    from lcc.zoo.datasets import dataset_info
    from lcc.zoo.hierarchy import load_run_dataset
    from lcc.zoo.models import build_model

    info = None if config.superclasses else dataset_info(config.dataset or "")
    if info is None:  # also DATASET:super and --superclasses (the trained classes)
        bundle = load_run_dataset(
            config.dataset or "",
            superclasses=config.superclasses,
            augment="none",
            root=config.data_dir,
            subset=config.subset,
        )
        info = (bundle.input_shape, bundle.num_classes)
    shape, classes = info
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model(
            config.model or "", classes, input_shape=shape, pretrained=False,
            width=config.width, depth=config.depth, dropout=config.dropout,
        )  # fmt: skip
        sample = torch.rand(2, *shape)
    return model, sample


# --------------------------------------------------------------------------- the table


def _read_metrics(run: SweepRun) -> dict[str, Any] | None:
    assert run.config is not None
    file = Path(run.config.out or "") / "metrics.json"
    if not file.is_file():
        return None
    try:
        metrics = json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return metrics if isinstance(metrics, dict) else None


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)


def sweep_table(sweep: Sweep, runs: Sequence[SweepRun]) -> list[TableRow]:
    """One row per setting (the baseline first) from the runs' ``metrics.json``."""
    groups: dict[str, list[SweepRun]] = {}
    settings: dict[str, tuple[tuple[str, Any], ...]] = {}
    for run in runs:
        if run.kind == "pretrain":
            continue
        key = "baseline" if run.kind == "baseline" else _canonical(run.setting)
        groups.setdefault(key, []).append(run)
        settings[key] = run.setting
    rows: list[TableRow] = []
    reference: tuple[float | None, float | None] = (None, None)
    base_seeds: dict[str, dict[int, float]] = {"test_top1": {}, "test_top5": {}}
    for key, members in groups.items():
        pairs = [(run.seed, m) for run in members if (m := _read_metrics(run)) is not None]
        metrics = [m for _, m in pairs]
        by_seed = {
            name: {seed: float(m[name]) for seed, m in pairs if m.get(name) is not None}
            for name in base_seeds
        }
        top1 = list(by_seed["test_top1"].values())
        top5 = list(by_seed["test_top5"].values())
        top1_mean, top1_std = _mean_std(top1)
        top5_mean, top5_std = _mean_std(top5)
        is_baseline = key == "baseline"
        if is_baseline:
            reference = (top1_mean, top5_mean)
            base_seeds = by_seed

        def gain(mean: float | None, base: float | None, is_baseline: bool = is_baseline) -> Any:
            if is_baseline or mean is None or base is None:
                return None
            return mean - base

        rows.append(
            TableRow(
                setting=settings[key],
                baseline=is_baseline,
                runs=[run.name for run in members],
                finished=len(metrics),
                top1_mean=top1_mean,
                top1_std=top1_std,
                top5_mean=top5_mean,
                top5_std=top5_std,
                gain_top1=gain(top1_mean, reference[0]),
                gain_top5=gain(top5_mean, reference[1]),
                paired_top1=None if is_baseline else _paired(by_seed, base_seeds, "test_top1"),
                paired_top5=None if is_baseline else _paired(by_seed, base_seeds, "test_top5"),
            )
        )
    return rows


def _paired(
    values: dict[str, dict[int, float]], baseline: dict[str, dict[int, float]], name: str
) -> PairedGain | None:
    """The paired gain of metric ``name`` when the setting's seeds are the baseline's."""
    return paired_gain(values[name], baseline[name])


def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _cell(value: Any) -> str:
    text = _value_text(value) if isinstance(value, (list, tuple, Mapping)) else str(value)
    return text.replace("|", "\\|")


def format_table(sweep: Sweep, rows: Sequence[TableRow]) -> str:
    """The markdown table: a column per grid key (but seed), then top-1, top-5 (mean ± std
    over seeds, %), the gains over the baseline (percentage points) and the finished runs."""
    keys = sweep.setting_keys or ["setting"]
    header = [*keys, "top-1 (%)", "top-5 (%)", "gain top-1", "gain top-5", "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        values = {"setting": "base", **dict(row.setting)}
        cells = (
            ["baseline", *([""] * (len(keys) - 1))]
            if row.baseline
            else [_cell(values[key]) for key in keys]
        )
        cells += [
            _pct(row.top1_mean, row.top1_std),
            _pct(row.top5_mean, row.top5_std),
            gain_text(row.gain_top1, row.paired_top1),
            gain_text(row.gain_top5, row.paired_top5),
            f"{row.finished}/{len(row.runs)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Test accuracy, {_over_seeds(sweep.seeds)} (finished runs / planned in "
        "the last column); gain: mean minus the baseline's mean, in percentage points.",
        *(PAIRED_CAPTION if any(row.paired_top1 for row in rows) else ()),
    ]
    return "\n".join(lines) + "\n"


def _over_seeds(seeds: Sequence[int]) -> str:
    """The caption's words for the seeds.

    >>> _over_seeds([0]), _over_seeds([0, 1])
    ('one run per setting (seed 0)', 'mean ± sample standard deviation over seeds 0, 1')
    """
    if len(seeds) == 1:
        return f"one run per setting (seed {seeds[0]})"
    return f"mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}"


def table_csv(sweep: Sweep, rows: Sequence[TableRow]) -> str:
    """The table as CSV: fractions as in metrics.json, empty cells for missing values."""
    keys = sweep.setting_keys
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "setting",
            *keys,
            "finished",
            "planned",
            "top1_mean",
            "top1_std",
            "top5_mean",
            "top5_std",
            "gain_top1",
            "gain_top5",
            *PAIRED_COLUMNS,
            "runs",
        ]
    )

    def number(value: float | None) -> str:
        return "" if value is None else repr(float(value))

    for row in rows:
        values = dict(row.setting)
        name = "baseline" if row.baseline else _name(row.setting) or "base"
        writer.writerow(
            [
                name,
                *("" if row.baseline else _value_text(values[key]) for key in keys),
                row.finished,
                len(row.runs),
                number(row.top1_mean),
                number(row.top1_std),
                number(row.top5_mean),
                number(row.top5_std),
                number(row.gain_top1),
                number(row.gain_top5),
                *paired_cells(row.paired_top1, row.paired_top5),
                " ".join(row.runs),
            ]
        )
    return buffer.getvalue()


def write_table(sweep: Sweep, rows: Sequence[TableRow], out: Path) -> tuple[Path, Path]:
    """Write ``out/table.md`` and ``out/table.csv`` atomically; returns their paths."""
    from lcc.io import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    markdown = format_table(sweep, rows).encode("utf-8")
    text = table_csv(sweep, rows).encode("utf-8")
    md_path = atomic_write(out / "table.md", lambda handle: handle.write(markdown))
    csv_path = atomic_write(out / "table.csv", lambda handle: handle.write(text))
    return md_path, csv_path
