"""Evaluate finished ``lcc train`` runs beyond clean top-1 (``lcc evaluate``).

For each run directory, the final model (``checkpoints/last.ckpt``, built as ``config.yaml``
says) is evaluated on the run's own test set (same dataset, ``test_subset`` and seed, so clean
top-1/top-5 equal ``metrics.json``'s), optionally on a seeded stratified ``subset`` of it:

- clean: ``top1``, ``top5``, ``per_class`` accuracy, ``ece`` (15-bin L1 expected calibration
  error, torchmetrics), ``nll`` (mean cross-entropy) (:mod:`lcc.analysis.calibration`);
- ``noise``: top-1 with Gaussian noise of standard deviation sigma added to the *normalised*
  inputs (the units the network sees; sigma = 1 is one dataset standard deviation), seeded;
- ``fgsm`` / ``pgd``: top-1 under L-inf attacks in *pixel units* ([0, 1], before
  normalisation), adversarial images clipped to [0, 1] (:mod:`lcc.analysis.attacks`, foolbox);
- ``corruption``: top-1 per type and severity (1-5) of the common corruptions; with a
  ``baseline`` run, per-type corruption error, ``mce`` and ``relative_mce`` as Hendrycks &
  Dietterich 2019 define them (:mod:`lcc.analysis.corruptions`);
- ``probe``: linear and k-NN probes fitted on the training set's features of a layer
  (:mod:`lcc.analysis.probes`);
- ``read_with``: every accuracy above measured through the linear probe of a layer instead of
  the model's logits (:class:`LinearReadout`), for networks trained without a classifier
  (``--ce-weight 0``, label variation as the objective).

Accuracies are fractions, as in ``metrics.json``. :func:`evaluate_runs` writes
``RUN_DIR/evaluation.json`` atomically for each run; :func:`evaluation_table` renders the
comparison (markdown and CSV); :func:`evaluation_columns` flattens one evaluation into the
columns that tables, reports and sweeps show.

>>> evaluation_columns({"top1": 0.9, "noise": {"0.5": 0.7}, "probe": {"act1": {"linear": 0.8}}})
{'top1': 0.9, 'noise 0.5': 0.7, 'probe act1 linear': 0.8}
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lcc.analysis.attacks import PGDSpec, PixelModel, attack
from lcc.analysis.calibration import classification_metrics
from lcc.analysis.corruptions import (
    COMMON,
    SEVERITIES,
    cached_corruption,
    corruption_errors,
    images_digest,
    mean_over,
    parse_corruptions,
    relative_corruption_errors,
)
from lcc.errors import LCCInputError

__all__ = [
    "EVALUATION_FILE",
    "EvalOptions",
    "LinearReadout",
    "LoadedRun",
    "evaluate_loaded",
    "evaluate_runs",
    "evaluate_sweep",
    "evaluation_columns",
    "evaluation_rows",
    "evaluation_table",
    "linear_readout",
    "load_evaluation",
    "load_run_model",
    "sweep_options",
]

#: the file each evaluated run directory gets
EVALUATION_FILE = "evaluation.json"


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate (see the module docstring). ``corruptions``: None (none), ``"all"``,
    ``"common"`` or comma-separated names, resolved against the dataset's channels."""

    noise: tuple[float, ...] = ()
    fgsm: tuple[float, ...] = ()
    pgd: tuple[PGDSpec, ...] = ()
    corruptions: str | None = None
    severities: tuple[int, ...] = SEVERITIES
    probe: tuple[str, ...] = ()
    probe_k: int = 10
    probe_train: int | None = None
    probe_pool: str = "flatten"
    read_with: str | None = None
    subset: int | None = None
    seed: int = 0
    batch_size: int = 500
    cache_dir: str | None = None

    def check(self) -> EvalOptions:
        """Validate values; returns ``self``."""
        for sigma in self.noise:
            if not np.isfinite(sigma) or sigma < 0:
                raise LCCInputError(f"--noise: sigma must be >= 0, got {sigma}")
        for eps in (*self.fgsm, *(spec.eps for spec in self.pgd)):
            if not np.isfinite(eps) or not 0 <= eps <= 1:
                raise LCCInputError(f"eps must lie in [0, 1] (pixel units), got {eps}")
        if not self.severities or any(s not in SEVERITIES for s in self.severities):
            raise LCCInputError(f"severities must be among 1..5, got {list(self.severities)}")
        for name, value, low in (
            ("--subset", self.subset, 1),
            ("--probe-train", self.probe_train, 2),
            ("--batch-size", self.batch_size, 1),
            ("--probe-k", self.probe_k, 1),
        ):
            if value is not None and (isinstance(value, bool) or int(value) < low):
                raise LCCInputError(f"{name} must be an integer >= {low}, got {value!r}")
        return self


@dataclass
class LoadedRun:
    """A run's final model (eval mode, on CPU) and its data, as ``lcc train`` built them."""

    path: Path
    config: dict[str, Any]
    model: nn.Module
    bundle: Any
    checkpoint: Path

    @property
    def dataset(self) -> str:
        return str(self.config.get("dataset"))


def load_run_model(run_dir: str | os.PathLike[str]) -> LoadedRun:
    """Build the model of a run directory from ``config.yaml`` and ``checkpoints/last.ckpt``
    (weights-only load) and load its dataset with the run's subsets and seed."""
    from lcc.io import read_yaml
    from lcc.zoo.datasets import load_dataset
    from lcc.zoo.models import build_model, load_checkpoint

    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise LCCInputError(f"run directory {folder} not found; pass the --out DIR of lcc train")
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        raise LCCInputError(f"{folder} holds no config.yaml; pass the --out DIR of lcc train")
    config = read_yaml(config_file)
    checkpoint = folder / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise LCCInputError(
            f"{folder} has no checkpoint ({checkpoint} is missing); finish its training with "
            f"`lcc train --out {folder} --resume`"
        )
    if not config.get("model") or not config.get("dataset"):
        raise LCCInputError(f"{config_file} names no model or dataset; rerun lcc train")
    bundle = load_dataset(
        str(config["dataset"]),
        root=config.get("data_dir"),
        subset=config.get("subset"),
        test_subset=config.get("test_subset"),
        seed=int(config.get("seed") or 0),
        augment=False,
    )
    model = build_model(
        str(config["model"]),
        bundle.num_classes,
        input_shape=bundle.input_shape,
        pretrained=False,
    )
    kept_new = load_checkpoint(model, checkpoint)
    if kept_new:
        raise LCCInputError(f"{checkpoint} lacks the classification head ({kept_new[0]})")
    model.eval()
    return LoadedRun(folder, config, model, bundle, checkpoint)


# --------------------------------------------------------------------------- forward passes


def _normalised(images: np.ndarray, labels: np.ndarray, bundle: Any) -> Any:
    """A dataset serving ``images`` normalised exactly as the run's test set is."""
    from lcc.zoo.datasets import ImageTensorDataset

    return ImageTensorDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels),
        bundle.test.mean,
        bundle.test.std,
    )


def _batches(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(start, min(start + size, n)) for start in range(0, n, size)]


def _logits(
    model: nn.Module,
    dataset: Any,
    batch_size: int,
    transform: Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """Logits of ``model`` on every sample of ``dataset`` (``transform(x, batch)`` first)."""
    outputs = []
    with torch.no_grad():
        for number, rows in enumerate(_batches(len(dataset), batch_size)):
            x = torch.stack([item[0] for item in dataset.__getitems__(rows.tolist())])
            if transform is not None:
                x = transform(x, number)
            outputs.append(model(x).float())
    return torch.cat(outputs)


def _accuracy(logits: Tensor, y: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1).numpy() == y))


def _noise_seed(seed: int, sigma: float, batch: int) -> int:
    sequence = np.random.SeedSequence([seed, round(sigma * 1e6), batch])
    return int(sequence.generate_state(1)[0])


# --------------------------------------------------------------------------- one run


@dataclass
class _Data:
    """The evaluated test images (after ``subset``) of one run."""

    images: np.ndarray
    labels: np.ndarray
    digest: str


def _test_data(loaded: LoadedRun, options: EvalOptions) -> _Data:
    from lcc.zoo.datasets import stratified_subset

    test = loaded.bundle.test
    images = getattr(test, "images", None)
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        raise LCCInputError("lcc evaluate needs an image dataset of uint8 tensors (lcc.zoo)")
    images, labels = images.numpy(), test.labels.numpy()
    if options.subset is not None and options.subset < len(labels):
        rows = stratified_subset(labels, int(options.subset), options.seed)
        images, labels = images[rows], labels[rows]
    return _Data(images, labels, images_digest(images))


def _features(
    loaded: LoadedRun, layer: str, data: _Data | None, options: EvalOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(training features, training labels, test features or None) of ``layer``."""
    from torch.utils.data import DataLoader, Subset

    from lcc.regularisers.base import OUTPUT
    from lcc.zoo.datasets import IndexedDataset, stratified_subset
    from lcc.zoo.latents import collect_latents

    train = loaded.bundle.train_plain
    train_y = np.asarray(loaded.bundle.targets)
    if options.probe_train is not None and options.probe_train < len(train_y):
        rows = stratified_subset(train_y, int(options.probe_train), options.seed)
        train, train_y = Subset(train, rows.tolist()), train_y[rows]

    def features(dataset: Any) -> np.ndarray:
        if layer == OUTPUT:
            return _logits(loaded.model, dataset, options.batch_size).numpy()
        loader = DataLoader(IndexedDataset(dataset), batch_size=options.batch_size)
        z, _, _ = collect_latents(
            loaded.model,
            loader,
            [layer],
            pool=options.probe_pool,  # type: ignore[arg-type]
        )
        return z[layer]

    test = None if data is None else _normalised(data.images, data.labels, loaded.bundle)
    return features(train), train_y, None if test is None else features(test)


def _probe(loaded: LoadedRun, layer: str, data: _Data, options: EvalOptions) -> dict[str, float]:
    from lcc.analysis.probes import probe_accuracies

    train_z, train_y, test_z = _features(loaded, layer, data, options)
    return probe_accuracies(
        train_z, train_y, test_z, data.labels, k=options.probe_k, seed=options.seed
    )


class LinearReadout(nn.Module):
    """``model`` read through a linear probe on ``layer``: the logistic regression's decision
    function ``((z - mean) / scale) @ coef.T + intercept`` of the layer's (pooled) output ``z``;
    differentiable, so noise, attacks and corruptions can be measured through it."""

    def __init__(
        self, model: nn.Module, layer: str, pool: str, probe: Any, num_classes: int
    ) -> None:
        super().__init__()
        scaler, regression = probe[0], probe[-1]
        if list(regression.classes_) != list(range(num_classes)):
            raise LCCInputError(
                f"the readout probe saw classes {list(regression.classes_)} in training; it "
                f"needs all {num_classes} (raise --probe-train)"
            )
        self.model, self.layer, self.pool = model, layer, pool
        self.register_buffer("mean", torch.tensor(scaler.mean_, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scaler.scale_, dtype=torch.float32))
        self.register_buffer("coef", torch.tensor(regression.coef_, dtype=torch.float32))
        self.register_buffer("intercept", torch.tensor(regression.intercept_, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        from lcc.regularisers.base import OUTPUT
        from lcc.zoo.latents import LatentRecorder, first_tensor

        if self.layer == OUTPUT:
            z = first_tensor(self.model(x), "model output")
        else:
            with LatentRecorder(self.model, [self.layer], pool=self.pool) as recorder:  # type: ignore[arg-type]
                self.model(x)
            z = recorder.outputs[self.layer]
        z = z.reshape(z.shape[0], -1)
        standard = (z - self.mean.to(z.dtype)) / self.scale.to(z.dtype)
        return standard @ self.coef.to(z.dtype).T + self.intercept.to(z.dtype)


def linear_readout(loaded: LoadedRun, layer: str, options: EvalOptions) -> LinearReadout:
    """The run's model read through the linear probe fitted on ``layer``'s training features
    (:func:`lcc.analysis.probes.linear_probe`); for networks without a classifier (--ce-weight
    0), so that every accuracy of ``lcc evaluate`` can be measured."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from lcc.analysis.probes import linear_probe

    train_z, train_y, _ = _features(loaded, layer, None, options)
    probe = linear_probe(options.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(train_z, train_y)
    return LinearReadout(
        loaded.model, layer, options.probe_pool, probe, loaded.bundle.num_classes
    ).eval()


def evaluate_loaded(
    loaded: LoadedRun,
    options: EvalOptions,
    *,
    baseline: Mapping[str, Any] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The evaluation of one loaded run (see the module docstring); ``baseline``: the result
    of this function for the baseline run, for the corruption errors."""
    from lcc.regularisers.base import OUTPUT
    from lcc.zoo.latents import check_layer_names

    options = options.check()
    say = say or (lambda _: None)
    model, bundle = loaded.model, loaded.bundle
    model.eval()
    for layer in (*options.probe, *([options.read_with] if options.read_with else [])):
        if layer != OUTPUT:
            check_layer_names(model, [layer])
    corruptions = []
    if options.corruptions is not None:
        corruptions = parse_corruptions(options.corruptions, bundle.input_shape[0])
    data = _test_data(loaded, options)
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {
        "run": str(loaded.path),
        "model": loaded.config.get("model"),
        "dataset": loaded.dataset,
        "checkpoint": str(loaded.checkpoint),
        "n_test": len(data.labels),
        "subset": options.subset,
        "seed": options.seed,
        "test_digest": data.digest,
        "read_with": None,
        "options": _options_record(options),
    }
    if options.read_with:
        model = linear_readout(loaded, options.read_with, options)
        result["read_with"] = f"linear probe on {options.read_with}"
    start = time.perf_counter()
    clean_set = _normalised(data.images, data.labels, bundle)
    clean_logits = _logits(model, clean_set, options.batch_size)
    result.update(
        classification_metrics(
            clean_logits, torch.from_numpy(data.labels), num_classes=bundle.num_classes
        )
    )
    seconds["clean"] = time.perf_counter() - start

    start = time.perf_counter()
    noise: dict[str, float] = {}
    for sigma in options.noise:

        def add_noise(x: Tensor, number: int, sigma: float = sigma) -> Tensor:
            generator = torch.Generator().manual_seed(_noise_seed(options.seed, sigma, number))
            return x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)

        noise[f"{sigma:g}"] = _accuracy(
            _logits(model, clean_set, options.batch_size, add_noise), data.labels
        )
    result["noise"] = noise
    seconds["noise"] = time.perf_counter() - start

    pixel_model = PixelModel(model, bundle.test.mean, bundle.test.std).eval()
    for kind, settings in (("fgsm", options.fgsm), ("pgd", options.pgd)):
        start = time.perf_counter()
        scores: dict[str, float] = {}
        for setting in settings:
            key = setting.key if isinstance(setting, PGDSpec) else f"{setting:g}"
            say(f"{loaded.path.name}: {kind} {key}")
            scores[key] = _attack_accuracy(pixel_model, data, kind, setting, options)
        result[kind] = scores
        seconds[kind] = time.perf_counter() - start

    start = time.perf_counter()
    corruption: dict[str, dict[str, float]] = {}
    for name in corruptions:
        say(f"{loaded.path.name}: {name}")
        corruption[name] = {}
        for severity in options.severities:
            corrupted = cached_corruption(
                data.images,
                name,
                severity,
                seed=options.seed,
                dataset=loaded.dataset,
                cache_dir=options.cache_dir,
            )
            logits = _logits(model, _normalised(corrupted, data.labels, bundle), options.batch_size)
            corruption[name][str(severity)] = _accuracy(logits, data.labels)
    result["corruption"] = corruption
    seconds["corruption"] = time.perf_counter() - start
    result.update(_corruption_measures(result, baseline))

    start = time.perf_counter()
    probe: dict[str, dict[str, float]] = {}
    for layer in options.probe:
        say(f"{loaded.path.name}: probe {layer}")
        probe[layer] = _probe(loaded, layer, data, options)
    result["probe"] = probe
    seconds["probe"] = time.perf_counter() - start
    result["seconds"] = seconds
    return result


def _attack_accuracy(
    model: PixelModel, data: _Data, kind: str, setting: Any, options: EvalOptions
) -> float:
    hits = 0
    for number, rows in enumerate(_batches(len(data.labels), options.batch_size)):
        pixels = torch.from_numpy(data.images[rows]).float() / 255.0
        labels = torch.from_numpy(data.labels[rows])
        if kind == "fgsm":
            adversarial = attack(model, pixels, labels, kind="fgsm", eps=float(setting))
        else:
            adversarial = attack(
                model,
                pixels,
                labels,
                kind="pgd",
                eps=setting.eps,
                steps=setting.steps,
                alpha=setting.alpha,
                seed=options.seed * 100_003 + number,
            )
        with torch.no_grad():
            hits += int((model(adversarial).argmax(1) == labels).sum())
    return hits / len(data.labels)


def _errors(result: Mapping[str, Any]) -> dict[str, list[float]]:
    return {
        name: [1.0 - float(acc) for _, acc in sorted(by_severity.items(), key=lambda kv: kv[0])]
        for name, by_severity in result.get("corruption", {}).items()
    }


def _corruption_measures(
    result: Mapping[str, Any], baseline: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Per-type CE and relative CE, their means, against ``baseline`` (None: all None)."""
    if baseline is None or not result.get("corruption"):
        keys = ("baseline", "corruption_error", "relative_corruption_error", "mce", "relative_mce")
        return dict.fromkeys(keys)
    errors, base = _errors(result), _errors(baseline)
    ce = corruption_errors(errors, base)
    relative = relative_corruption_errors(
        errors, 1.0 - float(result["top1"]), base, 1.0 - float(baseline["top1"])
    )
    names = [name for name in COMMON if name in errors] or list(errors)
    return {
        "baseline": baseline.get("run"),
        "corruption_error": ce,
        "relative_corruption_error": relative,
        "mce": mean_over(ce, names),
        "relative_mce": mean_over(relative, names),
    }


# --------------------------------------------------------------------------- several runs


def evaluate_runs(
    runs: Sequence[str | os.PathLike[str]],
    options: EvalOptions,
    *,
    baseline: str | os.PathLike[str] | None = None,
    say: Callable[[str], None] | None = None,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate each run, write ``RUN/evaluation.json`` (atomic), return the results in order.

    Every run is loaded (and checked, baseline included) before any is evaluated, so bad input
    fails at once. ``emit(result)`` is called as each run finishes (``lcc evaluate`` prints it).
    """
    from lcc.io import write_json_atomic

    options = options.check()
    if not runs:
        raise LCCInputError("pass at least one RUN_DIR")
    loaded = [load_run_model(run) for run in runs]
    base = base_result = None
    if baseline is not None:
        matches = [item for item in loaded if _same_dir(item.path, Path(baseline))]
        base = matches[0] if matches else load_run_model(baseline)
        for item in loaded:
            if item.dataset != base.dataset:
                raise LCCInputError(
                    f"--baseline {base.path} was trained on {base.dataset}, but {item.path} on "
                    f"{item.dataset}; pass a baseline run on {item.dataset}"
                )
        if options.corruptions is None:
            raise LCCInputError(
                "--baseline compares corruption errors; add --corruptions (e.g. --corruptions all)"
            )
        base_options = options
        if not any(_same_dir(item.path, base.path) for item in loaded):
            base_options = replace(options, noise=(), fgsm=(), pgd=(), probe=())
        base_result = evaluate_loaded(base, base_options, say=say)
        base_result.update(_corruption_measures(base_result, base_result))
    results = []
    for item in loaded:
        if base is not None and _same_dir(item.path, base.path) and base_result is not None:
            result = base_result
        else:
            result = evaluate_loaded(item, options, baseline=base_result, say=say)
        if base_result is not None and result["test_digest"] != base_result["test_digest"]:
            raise LCCInputError(
                f"--baseline {base_result['run']} was tested on other images than {item.path} "
                "(another test_subset or seed); train the baseline with the same test set"
            )
        write_json_atomic(item.path / EVALUATION_FILE, result)
        if emit is not None:
            emit(result)
        results.append(result)
    return results


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def load_evaluation(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``RUN_DIR/evaluation.json`` read, or None when absent or unreadable."""
    file = Path(run_dir) / EVALUATION_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- tables


def evaluation_columns(result: Mapping[str, Any]) -> dict[str, float | None]:
    """One evaluation flattened to ``{column: value}``: ``top1``, ``top5``, ``ece``, ``nll``,
    ``noise SIGMA``, ``fgsm EPS``, ``pgd EPS:STEPS:ALPHA``, ``corruption top1`` (mean over
    types and severities), ``mce``, ``relative_mce``, ``probe LAYER linear|knn``."""
    columns: dict[str, float | None] = {}
    for key in ("top1", "top5", "ece", "nll"):
        if key in result:
            columns[key] = result[key]
    for kind in ("noise", "fgsm", "pgd"):
        for setting, value in (result.get(kind) or {}).items():
            columns[f"{kind} {setting}"] = value
    corruption = result.get("corruption") or {}
    if corruption:
        values = [float(v) for by_severity in corruption.values() for v in by_severity.values()]
        columns["corruption top1"] = float(np.mean(values))
    for key in ("mce", "relative_mce"):
        if result.get(key) is not None:
            columns[key] = result[key]
    for layer, scores in (result.get("probe") or {}).items():
        for probe, value in scores.items():
            columns[f"probe {layer} {probe}"] = value
    return columns


def format_value(column: str, value: float | None) -> str:
    """A table cell: accuracies and ECE in %, NLL as is, mCE x 100 (the benchmark's units).

    >>> format_value("top1", 0.8125), format_value("nll", 0.41234), format_value("mce", 0.9)
    ('81.25', '0.412', '90.0')
    """
    if value is None:
        return "-"
    if column == "nll":
        return f"{value:.3f}"
    if column in ("mce", "relative_mce"):
        return f"{100 * value:.1f}"
    return f"{100 * value:.2f}"


#: what the tables' numbers mean
TABLE_NOTE = (
    "Accuracies, ECE in %; noise sigma in normalised-input units; fgsm/pgd eps in pixel "
    "units [0, 1]; mCE and relative mCE x 100 against the baseline (Hendrycks & Dietterich "
    "2019)."
)


def evaluation_rows(
    results: Sequence[tuple[str, Mapping[str, Any]]],
) -> tuple[list[str], list[list[str]]]:
    """(header, formatted rows) of ``(run name, evaluation)`` pairs, one row per run, columns
    of :func:`evaluation_columns` in the order they first appear.

    >>> evaluation_rows([("a", {"top1": 0.5, "nll": 0.25})])
    (['run', 'top1 (%)', 'nll'], [['a', '50.00', '0.250']])
    """
    flat = [(name, evaluation_columns(result)) for name, result in results]
    header = _header(columns for _, columns in flat)
    rows = [
        [name, *(format_value(column, columns.get(column)) for column in header)]
        for name, columns in flat
    ]
    shown = [name if name in ("nll", "mce", "relative_mce") else f"{name} (%)" for name in header]
    return ["run", *shown], rows


def _header(flat: Iterable[Mapping[str, Any]]) -> list[str]:
    """The columns of flattened evaluations, in the order they first appear."""
    header: list[str] = []
    for columns in flat:
        header.extend(name for name in columns if name not in header)
    return header


def evaluation_table(results: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """(markdown, CSV) comparing evaluations, one row per run; markdown in % (mCE x 100),
    CSV with the raw fractions."""
    names = [Path(str(result.get("run", "?"))).name for result in results]
    flat = [evaluation_columns(result) for result in results]
    header = _header(flat)
    shown, cells = evaluation_rows(list(zip(names, results, strict=True)))
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", *header])
    for name, columns in zip(names, flat, strict=True):
        writer.writerow([name, *("" if columns.get(c) is None else columns[c] for c in header)])
    return "\n".join(lines) + "\n\n" + TABLE_NOTE + "\n", buffer.getvalue()


# --------------------------------------------------------------------------- sweeps

#: keys of the ``evaluate:`` block of a sweep file (``lcc evaluate`` options)
SWEEP_EVALUATE_KEYS: tuple[str, ...] = (
    "noise", "fgsm", "pgd", "corruptions", "severities", "probe", "probe_k", "probe_train",
    "probe_pool", "read_with", "subset", "seed", "batch_size", "cache_dir", "baseline",
)  # fmt: skip


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _sigmas(text: str) -> tuple[float, ...]:
    """Noise standard deviations from ``"0.1,0.5"`` (finite, >= 0)."""
    values = []
    for piece in filter(None, (part.strip() for part in text.split(","))):
        try:
            value = float(piece)
        except ValueError:
            raise LCCInputError(
                f"noise: cannot read {piece!r}; write numbers like 0.1,0.5"
            ) from None
        if not np.isfinite(value) or value < 0:
            raise LCCInputError(f"noise: values must be finite and >= 0, got {piece}")
        values.append(value)
    return tuple(values)


def sweep_options(spec: Mapping[str, Any]) -> tuple[EvalOptions, bool]:
    """The ``evaluate:`` block of a sweep file as (:class:`EvalOptions`, whether the sweep's
    baseline run of the same seed is the ``--baseline``). Lists or comma-separated text.

    >>> spec = {"noise": [0.5, 2], "fgsm": "0.1", "corruptions": "fog", "baseline": True}
    >>> options, baseline = sweep_options(spec)
    >>> options.noise, options.fgsm, options.corruptions, baseline
    ((0.5, 2.0), (0.1,), 'fog', True)
    """
    from lcc.analysis.attacks import parse_eps_list, parse_pgd
    from lcc.analysis.corruptions import SEVERITIES

    values = {str(key).replace("-", "_"): value for key, value in dict(spec).items()}
    unknown = sorted(set(values) - set(SWEEP_EVALUATE_KEYS))
    if unknown:
        raise LCCInputError(
            f"evaluate.{unknown[0]} is not an lcc evaluate option; valid: "
            f"{', '.join(SWEEP_EVALUATE_KEYS)}"
        )
    baseline = values.pop("baseline", False)
    if not isinstance(baseline, bool):
        raise LCCInputError(f"evaluate.baseline must be true or false, got {baseline!r}")
    options: dict[str, Any] = {}
    if "noise" in values:
        options["noise"] = _sigmas(_text(values.pop("noise")))
    if "fgsm" in values:
        options["fgsm"] = tuple(parse_eps_list(_text(values.pop("fgsm")), "evaluate.fgsm"))
    if "pgd" in values:
        options["pgd"] = tuple(parse_pgd(_text(values.pop("pgd"))))
    if "corruptions" in values:
        options["corruptions"] = _text(values.pop("corruptions"))
    if "severities" in values:
        text = _text(values.pop("severities"))
        severities = [int(s) for s in text.split(",") if s.strip().isdigit()]
        if not severities or any(s not in SEVERITIES for s in severities):
            raise LCCInputError(f"evaluate.severities must be among 1..5, got {text!r}")
        options["severities"] = tuple(severities)
    if "probe" in values:
        options["probe"] = tuple(p for p in _text(values.pop("probe")).split(",") if p.strip())
    for key, kind in (
        ("probe_k", int), ("probe_train", int), ("subset", int), ("seed", int),
        ("batch_size", int), ("probe_pool", str), ("read_with", str), ("cache_dir", str),
    ):  # fmt: skip
        if key in values:
            value = values.pop(key)
            try:
                options[key] = None if value is None else kind(value)
            except (TypeError, ValueError):
                raise LCCInputError(f"evaluate.{key}: cannot read {value!r}") from None
    result = EvalOptions(**options).check()
    if baseline and result.corruptions is None:
        raise LCCInputError("evaluate.baseline compares corruption errors; add corruptions:")
    return result, baseline


def _options_record(options: EvalOptions) -> dict[str, Any]:
    """The options an evaluation was made with, as plain values (stored in evaluation.json)."""
    record = {
        key: getattr(options, key)
        for key in ("noise", "fgsm", "corruptions", "severities", "probe", "probe_k")
    }
    record |= {"probe_train": options.probe_train, "probe_pool": options.probe_pool}
    record |= {"read_with": options.read_with, "subset": options.subset, "seed": options.seed}
    record["pgd"] = [spec.key for spec in options.pgd]
    return json.loads(json.dumps(record))


def evaluate_sweep(
    runs: Sequence[Any],
    spec: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    say: Callable[[str], None] | None = None,
) -> tuple[Path, Path, str]:
    """Evaluate the finished runs of a sweep (``lcc sweep``'s ``evaluate:`` block) seed by
    seed, the sweep's baseline of each seed as ``--baseline`` when ``baseline: true``; runs
    whose evaluation.json was made with the same options are not evaluated again. Writes
    ``OUT/evaluation.md`` and ``OUT/evaluation.csv``: per setting (baseline first), the mean ±
    sample standard deviation over seeds of every evaluation column. Returns (md, csv, md
    text). ``runs``: :class:`lcc.train.sweep.SweepRun` objects."""
    from lcc.io import atomic_write

    options, use_baseline = sweep_options(spec)
    finished = [
        run for run in runs
        if run.kind != "pretrain" and (Path(run.config.out) / "metrics.json").is_file()
    ]  # fmt: skip
    record = _options_record(options)
    by_seed: dict[int, list[Any]] = {}
    for run in finished:
        by_seed.setdefault(run.seed, []).append(run)
    results: dict[str, dict[str, Any]] = {}
    for seed, members in by_seed.items():
        base = next((run for run in members if run.kind == "baseline"), None)
        if use_baseline and base is None:
            raise LCCInputError(
                f"evaluate.baseline: the sweep has no finished baseline run of seed {seed}; "
                "add baseline: true to the sweep"
            )
        dirs = [Path(run.config.out) for run in members]
        previous = {d: load_evaluation(d) for d in dirs}
        baseline = Path(base.config.out) if use_baseline and base is not None else None

        stale = [d for d in dirs if not _current(previous[d], record, baseline)]
        if stale:
            todo = dirs if baseline is not None else stale  # relative mCE needs the baseline's
            for result in evaluate_runs(todo, options, baseline=baseline, say=say):
                previous[Path(result["run"])] = result
        for run, folder in zip(members, dirs, strict=True):
            results[run.name] = previous[folder] or {}
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in finished:
        label = (
            "baseline"
            if run.kind == "baseline"
            else ", ".join(f"{key}={_text(value)}" for key, value in run.setting) or "base"
        )
        groups.setdefault(label, []).append(results[run.name])
    markdown, table = _sweep_tables(groups)
    folder = Path(out)
    md = atomic_write(folder / "evaluation.md", lambda handle: handle.write(markdown.encode()))
    csv_path = atomic_write(folder / "evaluation.csv", lambda handle: handle.write(table.encode()))
    return md, csv_path, markdown


def _current(result: Mapping[str, Any] | None, record: Any, baseline: Path | None) -> bool:
    """Whether an earlier evaluation was made with these options against this baseline."""
    result = result or {}
    against = result.get("baseline")
    if against is None or baseline is None:
        return result.get("options") == record and against is None and baseline is None
    return result.get("options") == record and _same_dir(Path(against), baseline)


def _sweep_tables(groups: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[str, str]:
    flat = {label: [evaluation_columns(r) for r in results] for label, results in groups.items()}
    header = _header(columns for rows in flat.values() for columns in rows)
    shown = [name if name in ("nll", "mce", "relative_mce") else f"{name} (%)" for name in header]
    lines = ["| setting | runs | " + " | ".join(shown) + " |", "|" + "---|" * (len(header) + 2)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["setting", "runs", *(f"{n} mean" for n in header), *(f"{n} std" for n in header)]
    )
    for label, rows in flat.items():
        cells, means, stds = [], [], []
        for column in header:
            values = [float(r[column]) for r in rows if r.get(column) is not None]
            mean = float(np.mean(values)) if values else None
            std = float(np.std(values, ddof=1)) if len(values) > 1 else None
            text = format_value(column, mean)
            if std is not None:
                text += f" ± {format_value(column, std)}"
            cells.append(text)
            means.append("" if mean is None else mean)
            stds.append("" if std is None else std)
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
        writer.writerow([label, len(rows), *means, *stds])
    caption = "\nMean ± sample standard deviation over seeds. " + TABLE_NOTE
    return "\n".join(lines) + "\n" + caption + "\n", buffer.getvalue()
