"""Stop a run gracefully: SIGTERM / SIGINT finish the current step, save, say how to resume.

SIGTERM (what SLURM, Kubernetes and ``timeout`` send before a kill) and a first SIGINT (Ctrl+C)
let the training step in progress finish; then :class:`GracefulStop` writes a mid-epoch
checkpoint (model, optimiser, scheduler, regulariser state, RNG states and the position in the
epoch's data order, through the atomic checkpoint writer) and :func:`stopping_signals` turns the
stop into :class:`TrainingStopped`, which ``lcc train`` reports in one line and exits with
143 (SIGTERM) or 130 (SIGINT). A second SIGINT stops at once. ``every_minutes`` also saves such
a checkpoint periodically.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

__all__ = ["GracefulStop", "TrainingStopped", "stopping_signals"]

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class TrainingStopped(Exception):
    """The run was stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Signals:
    """What arrived: the first stopping signal and how many SIGINTs."""

    def __init__(self) -> None:
        self.first: int | None = None
        self.interrupts = 0


@contextlib.contextmanager
def stopping_signals(trainer: pl.Trainer) -> Iterator[_Signals]:
    """Within the block, SIGTERM and a first SIGINT ask ``trainer`` to stop after the current
    step (Lightning's SIGTERM flag); a second SIGINT raises KeyboardInterrupt at once.
    Previous handlers are restored on exit. Outside the main thread this does nothing."""
    seen = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def on_signal(signum: int, frame: Any) -> None:
        seen.first = seen.first or signum
        if signum == signal.SIGINT:
            seen.interrupts += 1
            if seen.interrupts > 1:
                raise KeyboardInterrupt
        trainer._signal_connector.received_sigterm = True  # the same flag Lightning sets

    # signal.signal returns the handler it replaces
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class GracefulStop(pl.Callback):
    """Saves a mid-epoch checkpoint to ``path`` when training stops on a signal, and every
    ``every_minutes`` (None: only on signals). ``stopped_at``: (epoch, step) of the stop."""

    def __init__(self, path: str | Path, every_minutes: float | None = None) -> None:
        self.path = Path(path)
        self.every = None if every_minutes is None else float(every_minutes) * 60.0
        self.last_save = time.monotonic()
        self.stopped_at: tuple[int, int] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        if self.every is not None and time.monotonic() - self.last_save >= self.every:
            trainer.save_checkpoint(self.path)
            self.last_save = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
        self.last_save = time.monotonic()  # the end-of-epoch checkpoint was just written

    def on_exception(self, trainer: pl.Trainer, module: Any, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        trainer.save_checkpoint(self.path)
        epoch = int(getattr(module, "batches_epoch", module.current_epoch))
        self.stopped_at = (epoch, int(getattr(module, "batches_done", 0)))
