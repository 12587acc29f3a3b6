"""Run one ``lcc train`` job from a :class:`lcc.train.config.TrainConfig`: build, fit, test, save.

:func:`train` checks the config once, prepares the run directory (:mod:`lcc.train.rundir`),
builds data, model and regularisers (:mod:`lcc.train.build`), trains with Lightning
(checkpoint every epoch in ``DIR/checkpoints/last.ckpt``, written atomically, the one before
kept as ``previous.ckpt``; CSV logs in ``DIR/logs/``, TensorBoard in ``DIR/tensorboard/``),
tests, and writes ``DIR/metrics.json`` atomically. Under DDP every process runs :func:`train`;
only rank 0 checks and writes the run directory.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lcc.errors import LCCInputError
from lcc.io import read_yaml
from lcc.train.build import build, default_layers, idle_warnings, probe_layers
from lcc.train.checkpoints import checkpoint_candidates
from lcc.train.config import TrainConfig, merge_config
from lcc.train.epochs import shown_epoch
from lcc.train.rundir import loggers, no_run_to_resume, prepare_out, resume_checkpoint

__all__ = [
    "default_layers",
    "idle_warnings",
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
    elif merged.resume and saved is not None:
        nothing = not checkpoint_candidates(saved.parent)  # --resume with nothing to resume
        if nothing or not (merged.model and merged.dataset):
            raise LCCInputError(no_run_to_resume(saved.parent))
    return merge_config(base, from_file, options)


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


def _warn_unused(config: TrainConfig, module: Any, unread: list[str]) -> None:
    """One line per regulariser that never acts, one for the flags (``unread``) nothing reads."""
    if module.regularisation is not None:
        for line in idle_warnings(module.regularisation, config.epochs):
            print(f"lcc train: warning: {line}", file=sys.stderr)
    if unread:
        print(
            f"lcc train: warning: {', '.join(unread)} "
            f"{'is' if len(unread) == 1 else 'are'} read by no regulariser of this run (its "
            "--reg entries set their own, or none is lcc); drop them or put them in --reg",
            file=sys.stderr,
        )


def _trainer(config: TrainConfig, out: Path, resume_from: Path | None, callbacks: Sequence[Any]):
    """The Lightning trainer of the run, with its checkpoint, stop and logging callbacks."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lcc.train.checkpoints import AtomicCheckpointIO
    from lcc.train.stopping import GracefulStop

    checkpoint = ModelCheckpoint(
        dirpath=str(out / "checkpoints"),
        # {epoch}: the epoch LCCModule logs, counted from 1 (epoch=1.ckpt after the first)
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
        precision=config.precision,
        strategy=strategy,
        logger=loggers(out, resume_from if launched_rank() == 0 else None),
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
    return trainer, stop


def _stopped(config: TrainConfig, out: Path, stop: Any, signals: Any) -> Exception:
    """The one-line :class:`TrainingStopped` of a run a signal stopped (its exit code)."""
    from lcc.train.stopping import EXIT_CODES, TrainingStopped

    code = EXIT_CODES.get(signals.first or signal.SIGTERM, 143)
    resume = f"continue with: lcc train --out {out} --resume"
    if stop.stopped_at is None:
        where = "before the end of the epoch in progress; its last checkpoint is kept"
        if signals.interrupts > 1:
            where = "at once (second interrupt); the last checkpoint is kept"
        return TrainingStopped(f"stopped {where}; {resume}", code)
    epoch, step = stop.stopped_at
    return TrainingStopped(
        f"stopped at epoch {shown_epoch(epoch)}/{config.epochs}, step {step}; {resume}", code
    )


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
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lcc.io import write_json_atomic
    from lcc.train.stopping import stopping_signals

    config = merge_config(config, {}).check()  # the one check of the run's settings
    _quiet_lightning()
    rank = launched_rank()
    out = Path(config.out or "").expanduser()
    resume_from: Path | None = None
    finished, created = None, False
    if rank == 0:
        out, resume_from, finished, created = prepare_out(config)
    elif config.resume:  # the same choice as rank 0's, without its notes
        resume_from = resume_checkpoint(out, report=False)
    if finished is not None:
        if report:
            print(f"lcc train: {out} already finished {config.epochs} epochs", file=sys.stderr)
        return finished
    unread = config.unread_options()  # before build fills in the default layers
    try:
        module, data, config, bundle = build(config, bundle, out, rank, report)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # leave no empty run directory behind a rejected input
        raise
    if rank == 0:
        _warn_unused(config, module, unread)
    trainer, stop = _trainer(config, out, resume_from, callbacks)
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
            raise _stopped(config, out, stop, signals) from None
        # a signal from here on lets the finished run write its metrics (then exit 0)
        metrics = _metrics(config, module, bundle, fit_seconds, trainer.world_size)
        if trainer.is_global_zero:
            write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _read_layers(module: Any, config: TrainConfig) -> list[str] | None:
    """Every layer the run's regularisers read (``output``: the logits), in order."""
    if module.regularisation is None:
        return config.layers
    names = [name for reg in module.regularisation.regularisers for name in reg.layers]
    return list(dict.fromkeys(names))


def _metrics(
    config: TrainConfig, module: Any, bundle: Any, fit_seconds: float, world: int
) -> dict[str, Any]:
    history = [  # epochs counted from 1, as the console and every other file
        {**record, "epoch": shown_epoch(record["epoch"])}
        for record in sorted(module.history, key=lambda record: record["epoch"])
    ]
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
        "layers": _read_layers(module, config),
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
