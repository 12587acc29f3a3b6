"""The table of a sweep: one row per setting (baseline first), mean ± sample standard
deviation of the test top-1/top-5 over its finished seeds and the gain over the baseline, as
markdown (``DIR/table.md``, percentage points) and CSV (``DIR/table.csv``, fractions like
``metrics.json``). When a setting's seeds are the baseline's, the gain is the mean paired
difference with its 95 % t interval (:mod:`lcc.analysis.paired`).

>>> _pct(0.8512, 0.0031), _pct(0.85, None), _pct(None, None)
('85.12 ± 0.31', '85.00', '-')
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from lcc.train.sweep_plan import Sweep, SweepRun, _canonical, _name, _value_text

__all__ = ["TABLE_HEADS", "TableRow", "format_table", "sweep_table", "table_csv", "write_table"]

#: the CSV's number columns, named as the fields of :class:`TableRow`
_NUMBERS = ("top1_mean", "top1_std", "top5_mean", "top5_std", "gain_top1", "gain_top5")
#: the first bytes of the table files :func:`write_table` writes, by name
TABLE_HEADS: dict[str, bytes] = {"table.md": b"| ", "table.csv": b"setting,"}


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
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


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
        by_seed = {
            name: {seed: float(m[name]) for seed, m in pairs if m.get(name) is not None}
            for name in base_seeds
        }
        top1_mean, top1_std = _mean_std(list(by_seed["test_top1"].values()))
        top5_mean, top5_std = _mean_std(list(by_seed["test_top5"].values()))
        is_baseline = key == "baseline"
        if is_baseline:
            reference = (top1_mean, top5_mean)
            base_seeds = by_seed

        def gain(mean: float | None, base: float | None, is_baseline: bool = is_baseline) -> Any:
            if is_baseline or mean is None or base is None:
                return None
            return mean - base

        paired = [None if is_baseline else paired_gain(by_seed[n], base_seeds[n]) for n in by_seed]
        rows.append(
            TableRow(
                setting=settings[key],
                baseline=is_baseline,
                runs=[run.name for run in members],
                finished=len(pairs),
                top1_mean=top1_mean,
                top1_std=top1_std,
                top5_mean=top5_mean,
                top5_std=top5_std,
                gain_top1=gain(top1_mean, reference[0]),
                gain_top5=gain(top5_mean, reference[1]),
                paired_top1=paired[0],
                paired_top5=paired[1],
            )
        )
    return rows


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
    writer.writerow(["setting", *keys, "finished", "planned", *_NUMBERS, *PAIRED_COLUMNS, "runs"])

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
                *(number(getattr(row, column)) for column in _NUMBERS),
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
