"""``lcc study``: which latent measure predicts generalisation (the intraclass paper, sec. 3-4).

A study file extends a sweep file (:mod:`lcc.train.sweep`): ``base:`` and ``grid:`` exactly as
in ``lcc sweep`` (``seed`` in the grid means repeats, not a hyperparameter), plus

- ``exclude:`` a list of partial settings that never go together, each ``key: value`` or
  ``key: [values]`` over grid keys; a model matching every key of one entry is not trained
  (the paper: weight decay only with the highest learning rate, dropout never with
  augmentation, width and depth not increased together);
- ``measures:`` which measures, at which layers, on how many training samples
  (:class:`lcc.analysis.study_measures.StudyMeasures`).

Models train one after the other into ``DIR/<name>`` with ``lcc sweep``'s machinery (a
finished run is skipped, a started one resumed, a run of other settings refused); a run whose
loss diverges is recorded as failed in ``DIR/<name>/failed.json`` with its reason, never
retrained, and left out of the correlations (counted). Each finished model is then measured
once into ``DIR/<name>/measures.json`` (+ ``neurons.npz``); ``DIR/study.json`` records the
study's settings, and a study directory made by another config is refused (the differing keys
are named). The outputs are written by :mod:`lcc.analysis.study_report`.

>>> study = parse_study({"base": {"model": "small-cnn", "dataset": "digits:super"},
...     "grid": {"lr": [0.1, 0.01], "weight_decay": [0.0, 1e-4]},
...     "exclude": [{"lr": 0.01, "weight_decay": 1e-4}]})
>>> [run.name for run in plan_study(study, "out")]
['lr=0.1_weight-decay=0.0_seed=0', 'lr=0.1_weight-decay=0.0001_seed=0', 'lr=0.01_weight-decay=0.0_seed=0']
"""  # noqa: E501

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcc.analysis.study_measures import StudyMeasures, parse_measures
from lcc.errors import LCCInputError
from lcc.train.sweep import Sweep, SweepRun, parse_sweep, plan_runs, run_state, train_run
from lcc.train.sweep_plan import check_config_keys, load_config_file

__all__ = ["STUDY_KEYS", "Study", "load_study", "parse_study", "plan_study", "run_study", "states"]

STUDY_KEYS: tuple[str, ...] = ("base", "grid", "exclude", "measures")


@dataclass(frozen=True)
class Study:
    """A parsed study file (see the module docstring)."""

    sweep: Sweep
    exclude: tuple[dict[str, list[Any]], ...]
    measures: StudyMeasures
    source: dict[str, Any]

    @property
    def hyperparameters(self) -> list[str]:
        """The grid keys that vary (``seed`` excluded)."""
        return [key for key in self.sweep.setting_keys if len(self.sweep.grid[key]) > 1]


def load_study(path: str | os.PathLike[str]) -> Study:
    """Read and check a study file (errors name the file)."""
    return load_config_file(path, parse_study, "study")


def _exclusions(value: Any, grid: Mapping[str, list[Any]]) -> tuple[dict[str, list[Any]], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
        raise LCCInputError("exclude: must be a list of partial settings ({key: value, ...})")
    out = []
    for entry in value:
        clean: dict[str, list[Any]] = {}
        for key, values in entry.items():
            name = str(key).replace("-", "_")
            if name not in grid:
                raise LCCInputError(
                    f"exclude names {key!r}, which is not a grid key ({', '.join(grid)})"
                )
            listed = values if isinstance(values, list) else [values]
            missing = [v for v in listed if v not in grid[name]]
            if missing:
                raise LCCInputError(f"exclude: {key}={missing[0]!r} is not in grid.{key}")
            clean[name] = listed
        out.append(clean)
    return tuple(out)


def parse_study(data: Mapping[str, Any]) -> Study:
    """A :class:`Study` from the mapping of a study file; every model's options are checked."""
    check_config_keys(data, STUDY_KEYS, "study", "base:, grid:, ...")
    sweep = parse_sweep({"base": data.get("base"), "grid": data.get("grid")})
    varying = [key for key in sweep.setting_keys if len(sweep.grid[key]) > 1]
    if not varying:
        raise LCCInputError(
            "the grid has no hyperparameter that varies (seed is repeats); give one key two or "
            "more values, e.g. grid: {lr: [0.1, 0.01]}"
        )
    study = Study(
        sweep=sweep,
        exclude=_exclusions(data.get("exclude"), sweep.grid),
        measures=parse_measures(data.get("measures")),
        source=json.loads(json.dumps(dict(data), default=str)),
    )
    if not plan_study(study, "study"):
        raise LCCInputError("the exclude: entries remove every model of the grid; relax them")
    if study.measures.needs_superclasses:
        _check_hierarchy(study)
    return study


def _check_hierarchy(study: Study) -> None:
    from lcc.zoo.superclasses import split_spec

    for run in plan_study(study, "study"):
        config = run.config
        assert config is not None
        if not split_spec(config.dataset or "")[1] and not config.superclasses:
            raise LCCInputError(
                f"measures c1/c2 need fine labels but {config.dataset} is trained without "
                "superclasses; use DATASET:super (mnist, fashion-mnist, cifar100, digits) or "
                "superclasses: MAP.yaml, or measure names: c3,c4,..."
            )


def _excluded(run: SweepRun, exclude: Sequence[Mapping[str, list[Any]]]) -> bool:
    values = dict(run.options)
    return any(all(values.get(k) in allowed for k, allowed in e.items()) for e in exclude)


def plan_study(study: Study, out: str | os.PathLike[str]) -> list[SweepRun]:
    """Every model of the study, in grid order, exclusions removed."""
    return [run for run in plan_runs(study.sweep, out) if not _excluded(run, study.exclude)]


def _failed(run: SweepRun) -> str | None:
    file = Path(run.config.out or "") / "failed.json" if run.config else None
    if file is None or not file.is_file():
        return None
    try:
        return str(json.loads(file.read_text(encoding="utf-8")).get("reason", "failed"))
    except ValueError:
        return "failed"


def states(runs: Sequence[SweepRun]) -> dict[str, str]:
    """Each model's state: failed, measured, trained (not measured), started, new."""
    out = {}
    for run in runs:
        folder = Path(run.config.out or "") if run.config else Path()
        if _failed(run) is not None:
            out[run.name] = "failed"
        elif (folder / "measures.json").is_file():
            out[run.name] = "measured"
        else:
            out[run.name] = {"done": "trained", "resume": "started"}.get(run_state(run)[0], "new")
    return out


def _differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ (one level into mappings: ``grid.lr``).

    >>> _differences({"grid": {"lr": [1, 2], "k": [3]}}, {"grid": {"lr": [1], "k": [3]}})
    ['grid.lr']
    """
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping) and not prefix:
            out += _differences(old, new, f"{key}.")
        elif old != new:
            out.append(f"{prefix}{key}")
    return out


def check_study_dir(study: Study, root: Path) -> None:
    """Refuse a directory made by a different study config (the differing keys named); record
    this one's settings in ``DIR/study.json`` otherwise."""
    from lcc.io import write_json_atomic

    if root.exists() and not root.is_dir():
        raise LCCInputError(f"--out {root} is a file; pass a folder for the study")
    saved_file = root / "study.json"
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
        differ = _differences(saved, study.source)
        if differ:
            raise LCCInputError(
                f"--out {root} holds a study made by another config (differs in "
                f"{', '.join(differ)}); run that config again or choose another --out"
            )
        return
    if root.is_dir() and any(root.iterdir()):
        raise LCCInputError(f"--out {root} is not empty and holds no study.json; choose another")
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved_file, study.source)


def _say(text: str, report: bool = True) -> None:
    if report:
        print(f"lcc study: {text}", file=sys.stderr, flush=True)


def _train_one(run: SweepRun, where: str, report: bool) -> None:
    """Train (or resume) one model; a divergence is recorded in failed.json."""
    from lcc.io import write_json_atomic

    state, config = run_state(run)
    if state == "done":
        return
    _say(f"{where}: {'resuming' if state == 'resume' else 'training'}", report)
    diverged = train_run(config, where, report=False)
    if diverged is not None:
        write_json_atomic(Path(config.out or "") / "failed.json", {"reason": diverged})
        _say(f"{where}: diverged ({diverged}); recorded as failed", report)


def _measure_one(run: SweepRun, study: Study, where: str, report: bool) -> None:
    import numpy as np

    from lcc.analysis.study_measures import measure_run
    from lcc.io import save_npz_atomic, write_json_atomic

    folder = Path(run.config.out or "") if run.config else Path()
    _say(f"{where}: measuring", report)
    result = measure_run(folder, study.measures, seed=0)
    if result["neurons"]:
        arrays = {key: np.asarray(value) for key, value in result["neurons"].items()}
        save_npz_atomic(folder / "neurons.npz", **arrays)
    write_json_atomic(folder / "measures.json", result["values"])


def run_study(study: Study, out: str | os.PathLike[str], *, report: bool = True) -> dict[str, str]:
    """Train and measure every model of ``study`` in ``out`` (resumable), then write the
    outputs (:func:`lcc.analysis.study_report.write_study`); returns each model's state."""
    from lcc.analysis.study_report import write_study

    root = Path(out).expanduser().resolve()
    check_study_dir(study, root)
    runs = plan_study(study, root)
    for position, run in enumerate(runs, start=1):
        where = f"[{position}/{len(runs)}] {run.name}"
        if _failed(run) is not None or (Path(run.config.out or "") / "measures.json").is_file():
            continue
        _train_one(run, where, report)
        if _failed(run) is None:
            _measure_one(run, study, where, report)
    final = states(runs)
    write_study(study, runs, final, root)
    return final
