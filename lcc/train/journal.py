"""What a run tells about itself: the refresh journal, the per-epoch record and its console line.

:func:`write_refresh` appends one JSON line per refresh and layer to ``DIR/refreshes.jsonl``
(atomically; a resumed run rewrites its epoch) and saves ``DIR/refresh/epoch_E_<layer>.npz``
(clusters, targets' indices, and with ``save_latents`` the latents ``z`` and labels ``y``).
:func:`epoch_line` is the line printed after each epoch. Every epoch written or printed here
counts from 1 (:func:`lcc.train.epochs.shown_epoch`): the refresh at the start of the E-th
epoch is ``"epoch": E`` and is printed on the line ``epoch E/N``.

>>> record = {"epoch": 0, "loss": 0.5, "ce": 0.4, "lcc": 0.1, "train_top1": 0.9, "seconds": 2.0}
>>> epoch_line(record, 3, regularised=True)
'epoch 1/3: loss 0.5000 (CE 0.4000, LCC 0.1000), train top-1 90.00%, 2.0 s'
>>> epoch_line(record, 3, regularised=False)
'epoch 1/3: loss 0.5000 (CE 0.4000), train top-1 90.00%, 2.0 s'
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from lcc.io import atomic_write, read_jsonl_tolerant, save_npz_atomic
from lcc.regularisers.lcc import RefreshState
from lcc.train.epochs import shown_epoch
from lcc.train.loop import Refreshed

__all__ = ["REPORTED", "epoch_line", "layer_stats", "refresh_metrics", "write_refresh"]

#: per-layer refresh statistics kept in each epoch's record
REPORTED = (
    "n_clusters",
    "misclustered_fraction",
    "correctible_fraction",
    "modularity",
    "accuracy",
    "accuracy_cc",
    "accuracy_mc",
    "train_accuracy",
    "cross_entropy",
    "cross_entropy_cc",
    "cross_entropy_mc",
    "orthogonal_mean_ratio",
    "orthogonal_fallback",
    "source",
)


def layer_stats(states: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-layer refresh statistics of all states ({layer: stats}; ``key/layer`` on clashes)."""
    merged: dict[str, dict[str, Any]] = {}
    for key, state in states.items():
        for name, stats in (getattr(state, "stats", None) or {}).items():
            merged[name if name not in merged else f"{key}/{name}"] = stats
    return merged


def refresh_metrics(states: Mapping[str, Any], epoch: int) -> dict[str, float]:
    """The numbers of the refresh at the start of the 0-based ``epoch`` as flat logger metrics
    (``refresh/LAYER/KEY``; ``epoch`` counted from 1)."""
    flat: dict[str, float] = {"epoch": float(shown_epoch(epoch))}
    for name, stats in layer_stats(states).items():
        for key in REPORTED:
            value = stats.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"refresh/{name}/{key}"] = float(value)
        for stage, seconds in (stats.get("seconds") or {}).items():
            flat[f"refresh/{name}/seconds_{stage}"] = float(seconds)
    return flat


def _safe_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer)


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, Tensor)):
        return value.tolist()
    return str(value)


def write_refresh(
    out_dir: Path, refreshed: Refreshed, *, save_latents: bool, fine: np.ndarray | None = None
) -> None:
    """Append the refresh to ``out_dir/refreshes.jsonl`` and save its clusters (main rank);
    ``fine``: the fine labels of a superclass run, saved as ``y_fine`` beside ``y`` (the
    trained superclasses) with the latents."""
    states, collected = refreshed.states, refreshed.collected
    epoch = shown_epoch(refreshed.epoch)
    journal = out_dir / "refreshes.jsonl"
    # keep earlier epochs only (a resumed run rewrites its epoch; a torn last line is dropped)
    lines = [
        json.dumps(record, default=_json_value)
        for record in read_jsonl_tolerant(journal)
        if record.get("epoch", 0) < epoch
    ]
    for key, state in states.items():
        for name, stats in (getattr(state, "stats", None) or {}).items():
            record = {"epoch": epoch, "layer": name, **stats}
            record["epoch"] = epoch  # the stats carry the regulariser's own, 0-based, epoch
            if key != "lcc":
                record["regulariser"] = key
            lines.append(json.dumps(record, default=_json_value))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    atomic_write(journal, lambda handle: handle.write(data))
    folder = out_dir / "refresh"
    folder.mkdir(parents=True, exist_ok=True)
    for key, state in states.items():
        if not isinstance(state, RefreshState):
            continue
        prefix = "" if key == "lcc" else f"{_safe_name(key)}_"
        for name, layer in state.layers.items():
            arrays = {"clusters": layer.clusters, "target_indices": layer.target_indices}
            if save_latents and collected is not None:
                arrays["z"] = collected.latents[name]
                arrays["y"] = collected.y
                if fine is not None:
                    arrays["y_fine"] = np.asarray(fine)
            save_npz_atomic(folder / f"epoch_{epoch}_{prefix}{_safe_name(name)}.npz", **arrays)


def epoch_line(record: Mapping[str, Any], max_epochs: int | None, *, regularised: bool) -> str:
    """The console line of one finished epoch (``record["epoch"]`` 0-based, printed from 1)."""
    total = f"/{max_epochs}" if max_epochs else ""
    terms = record.get("terms")
    named = ", ".join(f"{key} {value:.4f}" for key, value in terms.items()) if terms else ""
    total_term = f"{record['lcc']:.4f}"
    if not regularised:
        regs = ""
    elif terms:
        regs = f", regularisers {total_term}; unweighted {named}"
    else:
        regs = f", LCC {total_term}"
    text = (
        f"epoch {shown_epoch(record['epoch'])}{total}: loss {record['loss']:.4f} "
        f"(CE {record['ce']:.4f}{regs}), train top-1 "
        f"{100 * record['train_top1']:.2f}%, {record['seconds']:.1f} s"
    )
    if record.get("refresh"):
        parts = [
            f"{name}: {stats['n_clusters']} clusters, "
            f"MC {100 * stats['misclustered_fraction']:.1f}%" + _pass_accuracy(stats)
            for name, stats in record["refresh"].items()
        ]
        text += f" (refresh {record['refresh_seconds']:.1f} s; {'; '.join(parts)})"
    return text


def _pass_accuracy(stats: Mapping[str, Any]) -> str:
    """``, pass top-1 A% (train B%)``: the refresh pass's training-set accuracy next to that
    of the previous epoch's training forwards (empty when either is unknown).

    >>> _pass_accuracy({"accuracy": 0.37, "train_accuracy": 0.79})
    ', pass top-1 37.0% (train 79.0%)'
    """
    now, before = stats.get("accuracy"), stats.get("train_accuracy")
    if not isinstance(now, (int, float)) or not isinstance(before, (int, float)):
        return ""
    if now != now or before != before:  # NaN
        return ""
    return f", pass top-1 {100 * now:.1f}% (train {100 * before:.1f}%)"
