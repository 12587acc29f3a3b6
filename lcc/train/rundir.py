"""The run directory of ``lcc train``: check or create it, find the checkpoint to resume,
keep the CSV log of earlier epochs across a resume.

A run directory holds ``config.yaml``, ``checkpoints/`` (``last.ckpt``, ``previous.ckpt``),
``metrics.json`` once finished, ``logs/metrics.csv`` and ``tensorboard/``. A directory that
was moved or copied resumes where it is now.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from lcc.errors import LCCInputError
from lcc.io import read_yaml
from lcc.train.checkpoints import checkpoint_candidates, find_resumable, history_names
from lcc.train.config import TrainConfig, field_names, merge_config
from lcc.train.epochs import shown_epoch

__all__ = [
    "RESUME_MUTABLE",
    "loggers",
    "no_run_to_resume",
    "prepare_out",
    "resume_checkpoint",
    "resume_differences",
    "save_config",
]

#: keys that may differ from the saved config when a run is resumed
RESUME_MUTABLE: frozenset[str] = frozenset(
    {"epochs", "num_workers", "resume", "data_dir", "checkpoint_every"}
)


def no_run_to_resume(out: Path) -> str:
    """The line for ``--resume`` without MODEL/DATASET where ``out`` holds no config.yaml."""
    if not out.exists():
        return f"--resume: there is no run to resume: {out} does not exist; check --out"
    found = checkpoint_candidates(out)
    if found:
        return (
            f"--resume: {out / 'config.yaml'} is missing, so the settings of the run that wrote "
            f"{found[0]} are unknown; pass MODEL, DATASET and its other options again"
        )
    looked = ", ".join(str(out / "checkpoints" / name) for name in history_names(2))
    return (
        f"--resume: there is no run to resume in {out} (looked for {out / 'config.yaml'}, "
        f"{looked}); start one without --resume: lcc train MODEL DATASET --out {out}"
    )


def prepare_out(config: TrainConfig) -> tuple[Path, Path | None, dict[str, Any] | None, bool]:
    """Rank 0: check/create the run directory. Returns (DIR, checkpoint to resume, finished
    metrics when there is nothing left to do, whether DIR was created now)."""
    out = Path(config.out or "").expanduser()
    if out.exists() and not out.is_dir():
        raise LCCInputError(f"--out {out} is a file; pass a directory")
    saved_config = out / "config.yaml"
    metrics_file = out / "metrics.json"
    if not config.resume:
        if metrics_file.is_file():
            raise LCCInputError(
                f"--out {out} already holds a finished run (metrics.json); pass --resume to "
                "continue it (e.g. with more --epochs) or choose another --out"
            )
        if checkpoint_candidates(out):
            raise LCCInputError(
                f"--out {out} holds an unfinished run; pass --resume to continue it from its "
                "last checkpoint or choose another --out"
            )
        if saved_config.is_file():
            raise LCCInputError(
                f"--out {out} holds a run that stopped before its first checkpoint; pass "
                "--resume to start it again from epoch 1 or choose another --out"
            )
    elif saved_config.is_file():
        # a run directory that was moved or copied resumes where it is now
        saved = merge_config(TrainConfig(), read_yaml(saved_config), {"out": config.out})
        differences = resume_differences(saved, config)
        if differences:
            raise LCCInputError(
                f"--resume: the run in {out} used other settings ({'; '.join(differences)}); "
                "drop those options or choose another --out"
            )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise LCCInputError(
            f"cannot write to --out {out}: {reason}; choose a writable directory"
        ) from None
    finished = None
    if config.resume and metrics_file.is_file():
        with contextlib.suppress(ValueError):
            finished = json.loads(metrics_file.read_text(encoding="utf-8"))
        if finished is not None and int(finished.get("epochs", -1)) != config.epochs:
            finished = None  # more (or fewer) epochs asked: continue from the checkpoint
    resume_from = None
    if config.resume and finished is None:
        resume_from = resume_checkpoint(out, report=True)
        if resume_from is None and saved_config.is_file():
            print(
                f"lcc train: {out} holds no checkpoint yet: starting the run from epoch 1",
                file=sys.stderr,
                flush=True,
            )
    return out, resume_from, finished, created


def resume_checkpoint(out: Path, *, report: bool) -> Path | None:
    """The checkpoint to resume from (:func:`lcc.train.checkpoints.find_resumable`): None when
    ``out`` holds none yet; one stderr line per damaged one skipped (``report``); raises
    :class:`LCCInputError` when there are checkpoints but none loads."""
    if not checkpoint_candidates(out):
        return None
    path, notes = find_resumable(out)
    if report:
        for note in notes:
            print(f"lcc train: warning: {note}", file=sys.stderr, flush=True)
    return path


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _earlier_csv_rows(path: Path, checkpoint: Path | None) -> list[dict[str, float | int]]:
    """Rows of an earlier ``metrics.csv`` up to the checkpoint's epoch and step (Lightning's CSV
    logger deletes the file when it starts, so a resumed run writes them again). The rows'
    ``epoch`` counts from 1, the checkpoint's from 0. A row torn by a kill is dropped; the
    checkpoint is read weights-only."""
    from lcc.io import read_csv_tolerant, safe_torch_load

    if checkpoint is None or not path.is_file():
        return []
    try:
        saved = safe_torch_load(checkpoint, mmap=True)
        saved_epoch, saved_step = shown_epoch(saved["epoch"]), int(saved.get("global_step", -1))
        rows = read_csv_tolerant(path)
    except (LCCInputError, KeyError, TypeError, ValueError):  # unreadable: start a new log
        return []
    kept = []
    for row in rows:
        try:
            values = {key: _number(value) for key, value in row.items() if key and value != ""}
        except ValueError:  # a damaged row
            continue
        if (
            "epoch" in values
            and values["epoch"] <= saved_epoch
            and (saved_step < 0 or values.get("step", 0) <= saved_step)
            and not any(key.startswith("test/") for key in values)
        ):
            kept.append(values)
    return kept


def loggers(out: Path, resume_from: Path | None = None) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    earlier = _earlier_csv_rows(out / "logs" / "metrics.csv", resume_from)
    csv_logger = CSVLogger(str(out), name="logs", version="")
    if earlier:  # the logger has just deleted the old file: write those rows back at once
        csv_logger.experiment.metrics.extend(earlier)
        csv_logger.experiment.save()
    loggers: list[Any] = [csv_logger]
    try:
        loggers.append(TensorBoardLogger(str(out), name="tensorboard", version="", log_graph=False))
    except (ImportError, ModuleNotFoundError) as error:  # tensorboard missing: CSV only
        warnings.warn(f"TensorBoard logging disabled ({error})", stacklevel=2)
    return loggers


def save_config(config: TrainConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``config`` as YAML to ``path`` atomically (``resume`` is left out)."""
    import yaml

    from lcc.io import atomic_write

    values = config.to_dict()
    values.pop("resume", None)
    text = "# resolved lcc train config (lcc train --config this-file)\n"
    text += yaml.safe_dump(values, sort_keys=False, default_flow_style=False)
    data = text.encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


def resume_differences(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Run-defining settings in which ``requested`` differs from the ``saved`` run. A path
    written another way (relative or absolute) names the same file; no ``layers`` requested
    means the run's own (its default, resolved when it started).

    >>> resume_differences(TrainConfig(k=5), TrainConfig(k=7, epochs=20))
    ['k: run has 5, requested 7']
    >>> resume_differences(TrainConfig(layers=["act1"]), TrainConfig(layers=None))
    []
    """
    out = []
    for name in field_names():
        if name in RESUME_MUTABLE or (name == "layers" and requested.layers is None):
            continue
        old, new = getattr(saved, name), getattr(requested, name)
        if old != new and not _same_file(old, new):
            out.append(f"{name}: run has {old!r}, requested {new!r}".replace("'", ""))
    return out


def _same_file(old: Any, new: Any) -> bool:
    """Two path strings naming one existing file or folder."""
    if not isinstance(old, str) or not isinstance(new, str) or not old or not new:
        return False
    first, second = Path(old).expanduser(), Path(new).expanduser()
    return first.exists() and first.resolve() == second.resolve()
