"""The intraclass paper's Fig. 7: the most selective neuron of the max- and median-selectivity
subclasses, and its pre-activations over training.

For each subclass, the neuron (over all tracked layers) with the highest selectivity (eq. 1's
term, :func:`lcc.analysis.intraclass.subclass_selectivity`) at the last tracked epoch; the
subclasses are ranked by that value and the first (max) and the middle one (median, the lower
middle for an even count) are shown: at each tracked epoch, the distribution of the neuron's
pre-activations on the subclass and on the rest of its superclass (``lcc train
--track-measures`` writes the latents to ``DIR/tracking/epoch=E.npz``).

>>> rng = np.random.default_rng(0)
>>> y_fine = np.arange(120) % 4; y_super = y_fine // 2
>>> z = rng.normal(size=(120, 5)); z[y_fine == 3, 2] += 4.0   # neuron 2 fires on subclass 3
>>> [(s, n) for s, n, _ in selective_neurons(z, y_fine, y_super)][0]
(3, 2)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from lcc.analysis.intraclass import subclass_selectivity
from lcc.io import atomic_write

__all__ = ["selective_neurons", "tracked_epochs", "write_figure"]


def selective_neurons(z: np.ndarray, y_fine: Any, y_super: Any) -> list[tuple[int, int, float]]:
    """``[(subclass, neuron, selectivity)]`` of the max- and median-selectivity subclasses."""
    values = subclass_selectivity(z, y_fine, y_super)
    best = values.values.argmax(axis=1)
    score = values.values.max(axis=1)
    order = np.argsort(-score, kind="stable")
    picks = [order[0], order[(len(order) - 1) // 2]]
    return [(int(values.labels[i]), int(best[i]), float(score[i])) for i in picks]


def tracked_epochs(run: Path) -> list[tuple[int, Path]]:
    """``(epoch, file)`` of ``run/tracking/epoch=E.npz`` in epoch order."""
    found = []
    for file in (run / "tracking").glob("epoch=*.npz"):
        match = re.fullmatch(r"epoch=(\d+)\.npz", file.name)
        if match:
            found.append((int(match.group(1)), file))
    return sorted(found)


def _load(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str]]:
    """(latents of every layer side by side, y, y_fine or None, 'layer:index' per column)."""
    with np.load(file, allow_pickle=False) as data:
        layers = sorted(key for key in data.files if key.startswith("z_"))
        parts = [data[key].astype(np.float32) for key in layers]
        names = [f"{key[2:]}:{i}" for key, part in zip(layers, parts, strict=True)
                 for i in range(part.shape[1])]  # fmt: skip
        fine = data["y_fine"] if "y_fine" in data.files else None
        return np.concatenate(parts, axis=1), data["y"], fine, names


def agg_pyplot() -> Any:
    """matplotlib's pyplot, drawing with the Agg backend (no window)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_pyplot(figure: Any, out: Path) -> None:
    """Lay out a pyplot ``figure`` tight, write it to ``out`` .png and .svg atomically, close it."""
    figure.tight_layout()
    for suffix in ("png", "svg"):
        atomic_write(
            out.with_suffix(f".{suffix}"),
            lambda handle, s=suffix: figure.savefig(handle, format=s, dpi=110),
        )
    agg_pyplot().close(figure)


def write_figure(run: Path, out: Path) -> bool:
    """Fig. 7 of ``run`` into ``out`` (.png, .svg); False when it has no fine-label tracking."""
    epochs = tracked_epochs(run)
    if not epochs:
        return False
    z, y, fine, names = _load(epochs[-1][1])
    if fine is None:
        return False
    picks = selective_neurons(z, fine, y)
    figure, axes = agg_pyplot().subplots(1, 2, figsize=(9, 3.2), squeeze=False)
    for axis, (subclass, neuron, value), kind in zip(
        axes[0], picks, ("max", "median"), strict=True
    ):
        inside, rest = [], []
        for _, file in epochs:
            values, labels, fine_labels, _ = _load(file)
            superclass = labels[fine_labels == subclass][0]
            inside.append(values[fine_labels == subclass, neuron])
            rest.append(values[(labels == superclass) & (fine_labels != subclass), neuron])
        positions = np.arange(len(epochs), dtype=float)
        for data, shift, colour in ((inside, -0.2, "tab:red"), (rest, 0.2, "tab:blue")):
            parts = axis.violinplot(data, positions + shift, widths=0.35, showextrema=False)
            for body in parts["bodies"]:
                body.set_facecolor(colour)
        axis.set_xticks(positions, [str(e) for e, _ in epochs], fontsize=7)
        axis.set_xlabel("epoch")
        axis.set_ylabel(f"{names[neuron]} pre-activation", fontsize=8)
        axis.set_title(f"{kind}: subclass {subclass} (red) vs rest of superclass, s={value:.2f}",
                       fontsize=8)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pyplot(figure, out)
    return True
