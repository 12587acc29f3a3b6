"""Run one ``lcc train`` job from a :class:`lcc.train.config.TrainConfig`: build, fit, test, save.

:func:`train` loads the dataset and model, picks the layers (default: :func:`default_layers`),
checks the inputs up front, trains with Lightning (checkpoint every epoch in
``DIR/checkpoints/last.ckpt``, written atomically, the one before kept as ``previous.ckpt``;
CSV logs in ``DIR/logs/``, TensorBoard in ``DIR/tensorboard/``),
tests, and writes ``DIR/metrics.json`` atomically. ``DIR/config.yaml`` holds the resolved
config. Under DDP every process runs :func:`train`; only rank 0 checks and writes the run
directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcc.errors import LCCInputError
from lcc.train.config import TrainConfig, merge_config, read_yaml, resume_differences, save_config

__all__ = [
    "default_layers",
    "launched_rank",
    "probe_layers",
    "resolve_config",
    "train",
]


def launched_rank() -> int:
    """Rank of this process as set by a DDP launcher (0 when not launched as a child)."""
    for key in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value and value.isdigit():
            return int(value)
    return 0


def _execution_order(model: nn.Module, sample: torch.Tensor) -> tuple[list[str], dict[str, bool]]:
    """Names of the submodules in the order they first run on ``sample``, and whether each
    returned (something holding) a tensor."""
    from lcc.zoo.latents import first_tensor

    order: list[str] = []
    holds_tensor: dict[str, bool] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if name not in holds_tensor:
                order.append(name)
            try:
                first_tensor(output, name)
                holds_tensor[name] = True
            except LCCInputError:
                holds_tensor.setdefault(name, False)

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return order, holds_tensor


def default_layers(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The default LCC layer: the penultimate layer, i.e. the last leaf submodule that runs
    before the classification head (the last Linear/Conv2d, :func:`lcc.zoo.models.find_head`) in a
    forward pass on ``sample``, skipping dropout and identity modules.

    >>> from lcc.zoo.models import build_model
    >>> model = build_model("small-cnn", 10, input_shape=(1, 8, 8))
    >>> default_layers(model, torch.zeros(2, 1, 8, 8))
    ['act1']
    """
    from lcc.zoo.models import find_head

    order, holds_tensor = _execution_order(model, sample)
    modules = dict(model.named_modules())
    head = find_head(model)
    stop = order.index(head) if head in order else len(order) - 1
    skipped = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
    for name in reversed(order[:stop]):
        module = modules[name]
        is_leaf = next(module.children(), None) is None
        ancestor_of_head = head is not None and head.startswith(name + ".")
        if (
            is_leaf
            and not ancestor_of_head
            and holds_tensor.get(name)
            and not isinstance(module, skipped)
        ):
            return [name]
    raise LCCInputError(
        "cannot find a layer before the classification head; pass --layers "
        "(run `lcc layers MODEL` to list them)"
    )


def probe_layers(model: nn.Module, layers: Sequence[str], sample: torch.Tensor) -> None:
    """Check that each layer exists, runs in the forward pass and outputs a tensor."""
    from lcc.zoo.latents import check_layer_names

    check_layer_names(model, list(layers))
    _, holds_tensor = _execution_order(model, sample)
    for name in layers:
        if name not in holds_tensor:
            raise LCCInputError(
                f"layer {name!r} does not run in the model's forward pass; choose another "
                "(run `lcc layers MODEL`)"
            )
        if not holds_tensor[name]:
            raise LCCInputError(
                f"layer {name!r} outputs no tensor, so its latents cannot be recorded; choose "
                "another layer (run `lcc layers MODEL`)"
            )


def resolve_config(
    options: Mapping[str, Any] | None = None, config_file: str | os.PathLike[str] | None = None
) -> TrainConfig:
    """Defaults <- ``config_file`` (YAML) <- ``options`` (given on the command line), converted
    (:func:`train` checks it, once).

    With ``resume`` set and an existing ``DIR/config.yaml``, that saved config is the base
    instead of the defaults, so ``lcc train --out DIR --resume`` alone continues a run.
    """
    options = dict(options or {})
    from_file = read_yaml(config_file) if config_file else {}
    merged = merge_config(TrainConfig(), from_file, options)
    base = TrainConfig()
    saved = Path(merged.out or "") / "config.yaml" if merged.out else None
    if merged.resume and saved is not None and saved.is_file():
        base = merge_config(TrainConfig(), read_yaml(saved))
    elif merged.resume and saved is not None and not (merged.model and merged.dataset):
        raise LCCInputError(_no_run_to_resume(saved.parent))
    return merge_config(base, from_file, options)


def _no_run_to_resume(out: Path) -> str:
    """The line for ``--resume`` without MODEL/DATASET where ``out`` holds no config.yaml."""
    from lcc.train.checkpoints import checkpoint_candidates, history_names

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


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*sync_dist=True.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*Experiment logs directory .* exists and is not empty.*",
        ".*LightningModule.*has parameters that were not used.*",
        ".*`isinstance.*treespec.*",
        ".*is_leaf.*",
        ".*No positive samples found in target.*",
        ".*The number of training batches .* is smaller than the logging interval.*",
        ".*Total length of .* across ranks is zero.*",
        ".*You called `self.log.*",
        ".*tensorboardX.*",
        ".*The dirpath has changed from.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _prepare_out(config: TrainConfig) -> tuple[Path, Path | None, dict[str, Any] | None, bool]:
    """Rank 0: check/create the run directory. Returns (DIR, checkpoint to resume, finished
    metrics when there is nothing left to do, whether DIR was created now)."""
    import json

    out = Path(config.out or "").expanduser()
    if out.exists() and not out.is_dir():
        raise LCCInputError(f"--out {out} is a file; pass a directory")
    from lcc.train.checkpoints import checkpoint_candidates

    saved_config = out / "config.yaml"
    metrics_file = out / "metrics.json"
    if not config.resume:
        if metrics_file.is_file():
            raise LCCInputError(
                f"--out {out} already holds a finished run (metrics.json); pass --resume to "
                "continue it (e.g. with more --epochs) or choose another --out"
            )
        if saved_config.is_file() or checkpoint_candidates(out):
            raise LCCInputError(
                f"--out {out} holds an unfinished run; pass --resume to continue it from its "
                "last checkpoint or choose another --out"
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
        try:
            finished = json.loads(metrics_file.read_text(encoding="utf-8"))
        except ValueError:
            finished = None
        if finished is not None and int(finished.get("epochs", -1)) != config.epochs:
            finished = None  # more (or fewer) epochs asked: continue from the checkpoint
    resume_from = None
    if config.resume and finished is None:
        resume_from = _resume_checkpoint(out, report=True)
        if resume_from is None and saved_config.is_file():
            print(
                f"lcc train: {out} holds no checkpoint yet: starting the run from epoch 1",
                file=sys.stderr,
                flush=True,
            )
    return out, resume_from, finished, created


def idle_warnings(regularisation: Any, epochs: int) -> list[str]:
    """One line per regulariser that would never act in a run of ``epochs`` epochs (a warmup
    or interval longer than the run), so the user learns it before the run, not after.

    >>> from lcc.regularisers.lcc import LCC
    >>> from lcc.train.loop import Regularisation
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> idle_warnings(Regularisation(model, [LCC(layers=["0"], warmup=5)]), 2)
    ['lcc never acts in this run: warmup=5 >= epochs=2 (it starts at epoch 5); lower the warmup or raise --epochs']
    """  # noqa: E501
    lines = []
    for key, reg in regularisation.items():
        refreshes = [e for e in range(epochs) if reg.needs_training_latents(e)]
        active = [e for e in range(epochs) if reg.weight_at(e) > 0]
        if (reg.refreshes and not refreshes) or not active:
            lines.append(
                f"{key} never acts in this run: warmup={reg.warmup} >= epochs={epochs} "
                f"(it starts at epoch {reg.warmup}); lower the warmup or raise --epochs"
            )
    return lines


def _resume_checkpoint(out: Path, *, report: bool) -> Path | None:
    """The checkpoint to resume from (:func:`lcc.train.checkpoints.find_resumable`): None when
    ``out`` holds none yet; one stderr line per damaged one skipped (``report``); raises
    :class:`LCCInputError` when there are checkpoints but none loads."""
    from lcc.train.checkpoints import checkpoint_candidates, find_resumable

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
    logger deletes the file when it starts, so a resumed run writes them again). A row torn by
    a kill is dropped; the checkpoint is read weights-only."""
    from lcc.io import read_csv_tolerant, safe_torch_load

    if checkpoint is None or not path.is_file():
        return []
    try:
        saved = safe_torch_load(checkpoint, mmap=True)
        saved_epoch, saved_step = int(saved["epoch"]), int(saved.get("global_step", -1))
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


def _loggers(out: Path, resume_from: Path | None = None) -> list[Any]:
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


def _labelled_split(config: TrainConfig, bundle: Any, out: Path, rank: int) -> Any:
    """With --labeled-fraction / --labels-per-class / --unlabeled: the training set and the
    non-augmented one as :class:`lcc.zoo.labels.MaskedLabels` (label -1 = unlabelled); None
    otherwise. The split is saved in ``DIR/split.npz`` and reused when the run is resumed."""
    from lcc.zoo.labels import MaskedLabels, UnlabeledImages, load_split, save_split, split_labeled

    fraction, per_class = config.labeled_fraction, config.labels_per_class
    if fraction is None and per_class is None and not config.unlabeled:
        return None
    saved = out / "split.npz"
    n = len(bundle.train)
    if config.resume and saved.is_file():
        mask = load_split(saved, n_samples=n)
    elif fraction is not None or per_class is not None:
        targets = np.asarray(bundle.targets)
        mask = split_labeled(targets, fraction=fraction, per_class=per_class, seed=config.seed)
    else:
        mask = np.ones(n, dtype=bool)
    extra = None
    if config.unlabeled:
        extra = UnlabeledImages.load(
            config.unlabeled, bundle, root=config.data_dir, seed=config.seed
        )
    train = MaskedLabels(bundle.train, mask, extra)
    plain = MaskedLabels(
        bundle.train_plain, mask, None if extra is None else extra.without_augmentation()
    )
    if rank == 0:
        save_split(saved, mask)
    return train, plain


def _build(
    config: TrainConfig, bundle: Any, out: Path, rank: int, report: bool
) -> tuple[Any, Any, TrainConfig, Any]:
    """Load data and model, resolve and check the layers, save config.yaml (rank 0)."""
    import lightning.pytorch as pl

    from lcc.regularisers.base import OUTPUT
    from lcc.train.data import LCCDataModule
    from lcc.train.lightning import LCCModule
    from lcc.zoo.datasets import load_dataset
    from lcc.zoo.models import build_model

    pl.seed_everything(config.seed, workers=True, verbose=False)
    if bundle is None:
        bundle = load_dataset(
            config.dataset or "",
            root=config.data_dir,
            subset=config.subset,
            test_subset=config.test_subset,
            seed=config.seed,
        )
    n_train, n_test = len(bundle.train), len(bundle.test)
    if n_train == 0 or n_test == 0:
        raise LCCInputError(
            f"dataset {config.dataset} has {n_train} training and {n_test} test samples; "
            "both must be non-empty"
        )
    split = _labelled_split(config, bundle, out, rank)
    train_set = bundle.train if split is None else split[0]
    plain_set = bundle.train_plain if split is None else split[1]
    targets = np.asarray(bundle.targets if split is None else train_set.targets)
    n_train = len(train_set)
    torch.manual_seed(config.seed)
    model = build_model(
        config.model or "",
        bundle.num_classes,
        input_shape=bundle.input_shape,
        pretrained=not config.no_pretrained,
        checkpoint=config.checkpoint,
    )
    regularisers = []
    sample = None
    if not config.no_lcc:
        sample = torch.stack([bundle.train_plain[i][0] for i in range(min(2, n_train))])
        layers = list(config.layers) if config.layers else default_layers(model, sample)
        config = dataclasses.replace(config, layers=layers)  # names probed below
        regularisers = config.build_regularisers(layers)
        read = [name for reg in regularisers for name in reg.layers if name != OUTPUT]
        probe_layers(model, list(dict.fromkeys(read)), sample)

    module = LCCModule(
        model,
        regularisers=regularisers,
        source=config.source,
        pool=config.pool,
        sample=sample,
        num_classes=bundle.num_classes,
        n_train=n_train,
        ce_weight=config.ce_weight,
        latents_dir=out / "latents" if config.latents_on_disk else None,
        latents_dtype=config.latents_dtype,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        refresh_data=plain_set,
        refresh_batch_size=config.batch_size,  # fits; larger was slower on CPU (LCCModule)
        num_workers=config.num_workers,
        out_dir=out,
        save_latents=config.save_latents,
        report=report,
    )
    if module.regularisation is not None:
        module.regularisation.check_labels(targets)
    module.data_counts = {  # type: ignore[attr-defined]
        "n_labeled": int(np.sum(targets >= 0)),
        "n_unlabeled": int(np.sum(targets < 0)),
    }
    data = LCCDataModule(
        bundle,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        seed=config.seed,
        train=None if split is None else train_set,
        labeled_ratio=config.labeled_ratio,
    )
    if rank == 0:
        save_config(config, out / "config.yaml")
    return module, data, config, bundle


def train(
    config: TrainConfig,
    *,
    bundle: Any = None,
    report: bool = True,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train (and test) as ``config`` says; returns the metrics written to DIR/metrics.json.

    ``bundle``: an already loaded :class:`lcc.zoo.datasets.DatasetBundle` to use instead of
    ``config.dataset``. ``report``: one line per epoch on stderr (rank 0, when Lightning's
    progress bar is off, i.e. stderr is not a terminal). Raises :class:`LCCInputError` for
    bad input and :class:`lcc.train.lightning.NonFiniteLossError` when the loss diverges.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lcc.io import write_json_atomic
    from lcc.train.checkpoints import AtomicCheckpointIO
    from lcc.train.stopping import EXIT_CODES, GracefulStop, TrainingStopped, stopping_signals

    config = merge_config(config, {}).check()  # the one check of the run's settings
    _quiet_lightning()
    rank = launched_rank()
    out = Path(config.out or "").expanduser()
    resume_from: Path | None = None
    finished, created = None, False
    if rank == 0:
        out, resume_from, finished, created = _prepare_out(config)
    elif config.resume:  # the same choice as rank 0's, without its notes
        resume_from = _resume_checkpoint(out, report=False)
    if finished is not None:
        if report:
            print(f"lcc train: {out} already finished {config.epochs} epochs", file=sys.stderr)
        return finished
    try:
        module, data, config, bundle = _build(config, bundle, out, rank, report)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # leave no empty run directory behind a rejected input
        raise
    if rank == 0 and module.regularisation is not None:
        for line in idle_warnings(module.regularisation, config.epochs):
            print(f"lcc train: warning: {line}", file=sys.stderr)
    checkpoint = ModelCheckpoint(
        dirpath=str(out / "checkpoints"),
        filename="epoch={epoch}" if config.keep_checkpoints else "last",
        auto_insert_metric_name=False,
        save_top_k=-1 if config.keep_checkpoints else 1,
        monitor=None,
        save_last=config.keep_checkpoints,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    stop = GracefulStop(out / "checkpoints" / "last.ckpt", config.checkpoint_every)
    strategy: Any = "auto"
    if config.devices > 1 or config.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(start_method="popen")
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=strategy,
        logger=_loggers(out, resume_from if rank == 0 else None),
        callbacks=[checkpoint, stop, *callbacks],
        plugins=[AtomicCheckpointIO(keep_last=2)],  # atomic, keeps previous.ckpt, weights-only
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        log_every_n_steps=10,
        default_root_dir=str(out),
    )
    start = time.perf_counter()
    with stopping_signals(trainer) as signals:
        try:
            trainer.fit(
                module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None
            )
            fit_seconds = time.perf_counter() - start
            trainer.test(module, datamodule=data, verbose=False)
        except (SIGTERMException, SystemExit) as error:
            if signals.first is None and isinstance(error, SystemExit):
                raise
            code = EXIT_CODES.get(signals.first or signal.SIGTERM, 143)
            resume = f"continue with: lcc train --out {out} --resume"
            if stop.stopped_at is None:
                where = "before the end of the epoch in progress; its last checkpoint is kept"
                if signals.interrupts > 1:
                    where = "at once (second interrupt); the last checkpoint is kept"
                raise TrainingStopped(f"stopped {where}; {resume}", code) from None
            epoch, step = stop.stopped_at
            raise TrainingStopped(
                f"stopped at epoch {epoch + 1}/{config.epochs}, step {step}; {resume}", code
            ) from None
        # a signal from here on lets the finished run write its metrics (then exit 0)
        metrics = _metrics(config, module, bundle, fit_seconds, trainer.world_size)
        if trainer.is_global_zero:
            write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _metrics(
    config: TrainConfig, module: Any, bundle: Any, fit_seconds: float, world: int
) -> dict[str, Any]:
    history = sorted(module.history, key=lambda record: record["epoch"])
    seconds = [record["seconds"] for record in history]
    refresh_seconds = [record["refresh_seconds"] for record in history]
    refreshed = [record for record in history if record.get("refresh")]
    last_refresh = refreshed[-1]["refresh"] if refreshed else None
    return {
        "model": config.model,
        "dataset": config.dataset,
        "lcc": module.lcc is not None,
        "regularisers": []
        if module.regularisation is None
        else [reg.describe() for reg in module.regularisation.regularisers],
        "layers": config.layers,
        "source": None if config.no_lcc else config.source,
        "epochs": config.epochs,
        "n_train": len(bundle.train),
        **getattr(module, "data_counts", {}),
        "n_test": len(bundle.test),
        "devices": world,
        **module.test_metrics,
        "train_loss": history[-1]["loss"] if history else None,
        "train_top1": history[-1]["train_top1"] if history else None,
        "epoch_seconds": seconds,
        "mean_epoch_seconds": sum(seconds) / len(seconds) if seconds else None,
        "epoch_cpu_seconds": [record.get("cpu_seconds") for record in history],
        "refresh_seconds": refresh_seconds,
        "total_refresh_seconds": sum(refresh_seconds),
        "refreshes": len(refreshed),
        "last_refresh_epoch": refreshed[-1]["epoch"] if refreshed else None,
        "last_refresh": last_refresh,
        "fit_seconds_this_process": fit_seconds,
        "history": history,
    }
