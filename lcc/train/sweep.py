"""Run a sweep (:mod:`lcc.train.sweep_plan`: the file and its runs) one run after the other,
resumably, then write its table (:mod:`lcc.train.sweep_table`).

A directory with ``metrics.json`` is a finished run and is skipped; one with only
``config.yaml`` is resumed from its last checkpoint; a moved or copied sweep folder compares
its runs' settings without their location (:func:`relocated`). Every run's config and layers
are checked before the first one trains.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcc.errors import LCCInputError
from lcc.io import read_yaml
from lcc.train.config import TrainConfig, merge_config
from lcc.train.rundir import resume_differences
from lcc.train.sweep_plan import (
    BASELINE_OPTIONS,
    SWEEP_KEYS,
    Sweep,
    SweepRun,
    load_sweep,
    parse_sweep,
    plan_runs,
)
from lcc.train.sweep_table import (
    TABLE_HEADS,
    TableRow,
    format_table,
    sweep_table,
    table_csv,
    write_table,
)

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
    "train_run",
    "write_table",
]


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
        epochs = None
        with contextlib.suppress(ValueError):
            epochs = json.loads(metrics_file.read_text(encoding="utf-8")).get("epochs")
        if epochs == requested.epochs:
            return "done", requested
    return "resume", merge_config(requested, {"resume": True})


def _say(text: str, report: bool = True) -> None:
    if report:
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
            _say(f"{where}: finished earlier, skipped", report)
            continue
        if not train_runs:
            status[run.name] = "skipped"
            continue
        _say(f"{where}: {'resuming' if state == 'resume' else 'training'}", report)
        root.mkdir(parents=True, exist_ok=True)
        if state == "resume":
            _adopt_location(config)
        diverged = train_run(config, where, report=report)
        if diverged is not None:
            status[run.name] = "diverged"
            _say(f"{where}: diverged ({diverged}); left out of the table", report)
            continue
        status[run.name] = "resumed" if state == "resume" else "trained"
    rows = sweep_table(sweep, runs)
    if sweep.evaluate is not None:  # lcc evaluate on the finished runs: DIR/evaluation.md, .csv
        from lcc.analysis.evaluate import evaluate_sweep

        evaluate_sweep(runs, sweep.evaluate, root, say=_say if report else None)
    markdown, table = write_table(sweep, rows, root)
    return SweepResult(status=status, rows=rows, markdown=markdown, csv=table)


def train_run(config: TrainConfig, where: str, *, report: bool) -> str | None:
    """Train (or resume) one run of a sweep or study: ``None`` when it finished, the reason
    when it diverged (the caller records it and goes on); a signal raises :class:`SweepStopped`
    (its checkpoint is kept, so running the sweep again continues it)."""
    from lcc.train.lightning import NonFiniteLossError
    from lcc.train.run import train
    from lcc.train.stopping import TrainingStopped

    try:
        train(config, report=report)
    except TrainingStopped as stopped:
        message = f"stopped during run {where} (its last checkpoint is kept)"
        raise SweepStopped(message, stopped.exit_code) from None
    except NonFiniteLossError as error:
        return str(error)
    return None


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
    for name, head in TABLE_HEADS.items():
        file = root / name
        if file.exists() and (not file.is_file() or not file.read_bytes().startswith(head)):
            raise LCCInputError(
                f"--out {root} holds a {name} that lcc sweep did not write; pass another folder "
                "for the sweep's runs"
            )


def _adopt_location(config: TrainConfig) -> None:
    """A started run of a moved or copied sweep folder: its config.yaml moves with it (what
    ``lcc train`` saves there anyway once it resumes), so the resume compares equal."""
    from lcc.train.rundir import save_config

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
