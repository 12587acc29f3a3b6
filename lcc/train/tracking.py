"""Measures during training (the intraclass paper's Fig. 6-7): ``--track-measures``.

:class:`MeasureTracker` draws a fixed, seeded, stratified sample of ``--track-samples``
training samples (no augmentation; stratified on the fine labels of a superclass run) once,
and at the end of every ``--track-every``-th epoch (and the last) records the max-pooled
pre-activations of the tracked layers (every BatchNorm layer and ``fc1`` by default, else
``--layers``), computes the chosen measures (:mod:`lcc.analysis.measures`: c1-c4, clusters,
label-variation; c1/c2 with the fine labels as subclasses) and appends one JSON line per
measure and layer, with its ``epoch`` (counted from 1, as on the console), to
``DIR/measures.jsonl`` (a resumed run rewrites its epochs). The latents go to
``DIR/tracking/epoch=E.npz`` (``z_<LAYER>`` float16, ``y``, ``y_fine``) for the neuron-level
figure (Fig. 7). Main process only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcc.io import atomic_write, read_jsonl_tolerant, save_npz_atomic
from lcc.train.epochs import shown_epoch

__all__ = ["MeasureTracker", "make_tracker"]


class MeasureTracker:
    """Records measures on a fixed training sample every ``every`` epochs (module docstring)."""

    def __init__(
        self,
        names: Sequence[str],
        bundle: Any,
        out: Path,
        *,
        every: int = 1,
        samples: int = 500,
        layers: Sequence[str] | None = None,
        seed: int = 0,
    ):
        import torch

        from lcc.zoo.datasets import stratified_subset

        self.names, self.out, self.every = list(names), Path(out), int(every)
        self.layers = list(layers) if layers else None
        fine = getattr(bundle, "fine_targets", None)
        labels = np.asarray(bundle.targets if fine is None else fine)
        rows = stratified_subset(labels, min(samples, labels.size), seed)
        self.x = torch.stack([bundle.train_plain[int(i)][0] for i in rows])
        self.y = np.asarray(bundle.targets)[rows]
        self.fine = None if fine is None else np.asarray(fine)[rows]

    def due(self, epoch: int, last: bool) -> bool:
        """Whether the end of the 0-based ``epoch`` is recorded (``last``: the run's last)."""
        return shown_epoch(epoch) % self.every == 0 or last

    def record(self, model: Any, epoch: int) -> list[dict[str, Any]]:
        """Measure ``model`` at the end of the 0-based ``epoch`` and append the lines (returned;
        their ``epoch`` counted from 1)."""
        from lcc.analysis.measures import MeasureInput, MeasureOptions, run_measures
        from lcc.analysis.study_measures import _latents, default_layers

        layers = self.layers or default_layers(model)
        latents, predictions = _latents(model, self.x.to(next(model.parameters()).device), layers)
        y, y_super = (self.y, None) if self.fine is None else (self.fine, self.y)
        data = MeasureInput(latents, y, y_super=y_super, predictions=predictions)
        options = MeasureOptions(top_k=5, top_layers=2)
        shown = shown_epoch(epoch)
        lines = [{"epoch": shown, **line} for line in run_measures(self.names, data, options)]
        journal = self.out / "measures.jsonl"
        kept = [r for r in read_jsonl_tolerant(journal) if r.get("epoch", 0) < shown]
        text = "".join(json.dumps(r, default=float) + "\n" for r in [*kept, *lines])
        atomic_write(journal, lambda handle: handle.write(text.encode("utf-8")))
        folder = self.out / "tracking"
        folder.mkdir(exist_ok=True)
        arrays = {f"z_{name}": np.asarray(z, dtype=np.float16) for name, z in latents.items()}
        extra = {} if self.fine is None else {"y_fine": self.fine}
        save_npz_atomic(folder / f"epoch={shown}.npz", **arrays, y=self.y, **extra)
        return lines


def make_tracker(config: Any, bundle: Any, out: Path) -> MeasureTracker | None:
    """The run's tracker (None without ``--track-measures``); c1/c2 need superclasses."""
    from lcc.analysis.measures import parse_measures
    from lcc.errors import LCCInputError

    if not config.track_measures:
        return None
    hierarchical = getattr(bundle, "fine_targets", None) is not None
    names = parse_measures(list(config.track_measures), superclasses=hierarchical)
    if not hierarchical and {"c1", "c2"} & set(names):
        raise LCCInputError(
            f"--track-measures c1/c2 need fine labels but {config.dataset} is trained without "
            "superclasses; use DATASET:super or --superclasses MAP.yaml, or track c3,c4"
        )
    return MeasureTracker(
        names, bundle, out, every=config.track_every, samples=config.track_samples,
        layers=config.layers, seed=config.seed,
    )  # fmt: skip
