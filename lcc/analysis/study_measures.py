"""The measures of one trained model of an ``lcc study`` (the intraclass paper's sec. 3-4).

:func:`measure_run` reloads a finished ``lcc train`` run (its ``config.yaml`` and last
checkpoint), draws a seeded stratified sample of its *training* set (``samples``, stratified
on the fine labels), records the pre-activations of the chosen ``layers`` (conv maps
max-pooled to one value per channel, sec. 2.1) and computes, per layer and over all layers
(column ``NAME`` = all layers, ``NAME@LAYER`` = one layer):

- ``c1``, ``c2`` (needs superclass labels: the model is trained on superclasses, the fine
  labels are the subclasses), ``c3``, ``c4`` (on the trained classes), the paper's defaults
  or ``variant: authors``; ``top_k`` configurable;
- ``misclustered`` (LCC's misclustered fraction, lower is better) and ``cc_mc_gap`` (the
  accuracy on correctly clustered minus misclustered samples) per layer;
- ``label-variation`` per layer (lower is better);
- ``sharpness_sigma`` = 1/sigma' and ``sharpness_alpha`` = 1/alpha' (Jiang et al. 2020,
  :mod:`lcc.analysis.sharpness`, lower is better) on ``sharpness_samples`` training samples.

The per-neuron values of c1 and c3 (all layers pooled) are returned too, so the Kendall
coefficient can be recomputed for any ``k`` without the model (the paper's Fig. 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lcc.errors import LCCInputError

__all__ = ["HIGHER_IS_BETTER", "MEASURE_NAMES", "StudyMeasures", "measure_run", "parse_measures"]

#: every measure a study can compute, with its direction (True: larger = better generalisation)
HIGHER_IS_BETTER: dict[str, bool] = {
    "c1": True,
    "c2": True,
    "c3": True,
    "c4": True,
    "misclustered": False,
    "cc_mc_gap": True,
    "label-variation": False,
    "sharpness_sigma": False,
    "sharpness_alpha": False,
}
MEASURE_NAMES: tuple[str, ...] = tuple(HIGHER_IS_BETTER)
_KEYS = ("names", "layers", "samples", "top_k", "top_layers", "variant", "k", "sharpness",
         "sharpness_samples")  # fmt: skip


@dataclass(frozen=True)
class StudyMeasures:
    """The ``measures:`` block of a study file."""

    names: tuple[str, ...] = MEASURE_NAMES
    layers: tuple[str, ...] | None = None  # None: every BatchNorm layer + the penultimate
    samples: int = 1000  # seeded training samples the latent measures read
    top_k: int | None = None  # c1, c3 (None: the variant's default)
    top_layers: int | None = None  # c2, c4 over layers
    variant: str = "paper"
    k: int | None = None  # k-NN of clusters and label variation (None: their defaults)
    sharpness: Mapping[str, Any] = field(default_factory=dict)  # SharpnessConfig fields
    sharpness_samples: int = 500

    @property
    def needs_superclasses(self) -> bool:
        return "c1" in self.names or "c2" in self.names


def parse_measures(data: Mapping[str, Any] | None) -> StudyMeasures:
    """A :class:`StudyMeasures` from a study file's ``measures:`` mapping (None: defaults).

    >>> parse_measures({"names": "c1,c3", "samples": 500}).names
    ('c1', 'c3')
    """
    from lcc.analysis.sharpness import SharpnessConfig

    if data is None:
        return StudyMeasures()
    if not isinstance(data, Mapping):
        raise LCCInputError(f"measures: must be a mapping ({', '.join(_KEYS)}), got {data!r}")
    values = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = [key for key in values if key not in _KEYS]
    if unknown:
        raise LCCInputError(f"unknown measures key {unknown[0]!r}; valid: {', '.join(_KEYS)}")
    for key in ("names", "layers"):
        if isinstance(values.get(key), str):
            values[key] = [part.strip() for part in values[key].split(",") if part.strip()]
        if values.get(key) is not None:
            values[key] = tuple(str(item) for item in values[key])
    bad = [name for name in values.get("names", ()) if name not in HIGHER_IS_BETTER]
    if bad:
        raise LCCInputError(f"unknown measure {bad[0]!r}; valid: {', '.join(MEASURE_NAMES)}")
    measures = StudyMeasures(**values)
    if measures.variant not in ("paper", "authors"):
        raise LCCInputError(f"measures.variant {measures.variant!r} is not paper or authors")
    for key in ("samples", "sharpness_samples"):
        if not isinstance(getattr(measures, key), int) or getattr(measures, key) < 10:
            raise LCCInputError(f"measures.{key} must be an integer >= 10")
    try:
        SharpnessConfig(**dict(measures.sharpness)).check()
    except TypeError as error:
        raise LCCInputError(f"measures.sharpness: {error}") from None
    return measures


def _load(run: Path) -> tuple[Any, Any, Any]:
    """(config, model with the run's last weights, dataset bundle without augmentation)."""
    import torch

    from lcc.io import read_yaml
    from lcc.train.config import TrainConfig, merge_config
    from lcc.zoo.hierarchy import load_run_dataset
    from lcc.zoo.models import build_model, load_checkpoint

    config = merge_config(TrainConfig(), read_yaml(run / "config.yaml"))
    bundle = load_run_dataset(
        config.dataset or "",
        superclasses=config.superclasses,
        augment="none",
        root=config.data_dir,
        subset=config.subset,
        test_subset=config.test_subset,
        seed=config.seed,
    )
    torch.manual_seed(0)
    model = build_model(
        config.model or "",
        bundle.num_classes,
        input_shape=bundle.input_shape,
        pretrained=False,
        width=config.width,
        depth=config.depth,
        dropout=config.dropout,
    )
    load_checkpoint(model, run / "checkpoints" / "last.ckpt")
    return config, model.eval(), bundle


def default_layers(model: Any) -> list[str]:
    """Every BatchNorm layer (pre-activations after BN, sec. 2.1) and the penultimate Linear's
    output (``fc1`` for small-cnn) when there is one."""
    from torch import nn

    names = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if hasattr(model, "fc1"):
        names.append("fc1")
    return names


def _sample(bundle: Any, size: int, seed: int) -> tuple[Any, np.ndarray, np.ndarray | None]:
    """(x, trained labels, fine labels or None) of a seeded stratified training sample."""
    import torch

    from lcc.zoo.datasets import stratified_subset

    fine = getattr(bundle, "fine_targets", None)
    labels = np.asarray(bundle.targets if fine is None else fine)
    rows = stratified_subset(labels, min(size, labels.size), seed)
    x = torch.stack([bundle.train_plain[int(i)][0] for i in rows])
    y = np.asarray(bundle.targets)[rows]
    return x, y, None if fine is None else np.asarray(fine)[rows]


def _latents(model: Any, x: Any, layers: Sequence[str]) -> tuple[dict[str, np.ndarray], Any]:
    """Max-pooled latents of ``layers`` and the predictions, one eval-mode pass."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lcc.zoo.latents import collect_latents

    rows = torch.arange(x.shape[0])
    loader = DataLoader(TensorDataset(x, torch.zeros_like(rows), rows), batch_size=256)
    latents, _, predictions = collect_latents(model, loader, list(layers), pool="max")
    return latents, predictions


def measure_run(run: str | Path, measures: StudyMeasures, *, seed: int = 0) -> dict[str, Any]:
    """Every measure of ``measures`` on the finished run in ``run`` (module docstring):
    ``{"values": {column: value}, "neurons": {"c1": (I, D) array, "c3": (C, D)}}``."""
    from lcc.analysis.measures import MeasureInput, MeasureOptions, run_measures

    config, model, bundle = _load(Path(run))
    layers = list(measures.layers) if measures.layers else default_layers(model)
    x, y, fine = _sample(bundle, measures.samples, seed)
    latents, predictions = _latents(model, x, layers)
    wanted = [n for n in ("c1", "c2", "c3", "c4") if n in measures.names]
    if "misclustered" in measures.names or "cc_mc_gap" in measures.names:
        wanted.append("clusters")
    if "label-variation" in measures.names:
        wanted.append("label-variation")
    if measures.needs_superclasses and fine is None:
        raise LCCInputError(
            f"c1 and c2 need fine labels but {config.dataset} is trained without superclasses; "
            "use DATASET:super or --superclasses, or measure c3,c4"
        )
    data = (MeasureInput(latents, fine, y_super=y, predictions=predictions) if fine is not None
            else MeasureInput(latents, y, predictions=predictions))  # fmt: skip
    options = MeasureOptions(
        top_k=measures.top_k, top_layers=measures.top_layers, variant=measures.variant,
        k=measures.k, seed=seed,
    )  # fmt: skip
    values: dict[str, float | None] = {}
    for line in run_measures(wanted, data, options):
        _store(values, line)
    out = {"values": values, "neurons": _neurons(latents, fine, y, measures)}
    values.update(_sharpness(model, bundle, measures, seed))
    return out


def _store(values: dict[str, float | None], line: Mapping[str, Any]) -> None:
    suffix = "" if line["layer"] == "all" else f"@{line['layer']}"
    if line["measure"] == "clusters":
        values[f"misclustered{suffix}"] = float(line["value"])
        cc, mc = line.get("accuracy_cc"), line.get("accuracy_mc")
        values[f"cc_mc_gap{suffix}"] = None if cc is None or mc is None else float(cc - mc)
    else:
        values[f"{line['measure']}{suffix}"] = float(line["value"])


def _neurons(latents: Mapping[str, np.ndarray], fine: Any, y: Any, measures: StudyMeasures) -> Any:
    """Per-(sub)class, per-neuron values of c1 and c3 (layers pooled) for Fig. 4."""
    from lcc.analysis.measures import neuron_values

    out = {}
    if fine is not None and "c1" in measures.names:
        select = neuron_values("c1", measures.variant)
        out["c1"] = np.concatenate([select(z, fine, y).values for z in latents.values()], axis=1)
    if "c3" in measures.names:
        ratio = neuron_values("c3", measures.variant)
        out["c3"] = np.concatenate([ratio(z, y).values for z in latents.values()], axis=1)
    return out


def _sharpness(model: Any, bundle: Any, measures: StudyMeasures, seed: int) -> dict[str, float]:
    from lcc.analysis.sharpness import SharpnessConfig, pac_bayes_sigma, sharpness_alpha

    wanted = [n for n in ("sharpness_sigma", "sharpness_alpha") if n in measures.names]
    if not wanted:
        return {}
    import torch

    x, y, _ = _sample(bundle, measures.sharpness_samples, seed + 1)
    config = SharpnessConfig(**{"seed": seed, **dict(measures.sharpness)})
    searches = {"sharpness_sigma": pac_bayes_sigma, "sharpness_alpha": sharpness_alpha}
    target = torch.as_tensor(y)
    return {name: searches[name](model, x, target, config).measure for name in wanted}
