"""Checkpoints that survive kills and full disks, and that never run code when loaded.

:func:`save_checkpoint_atomic` writes a checkpoint to a temporary file beside its destination,
fsyncs it, checks that it loads with ``weights_only=True``, keeps the file it is about to
replace as ``previous.ckpt`` (``previous-2.ckpt`` ... with ``keep_last`` > 2), then renames the
new file over the destination: ``last.ckpt`` is always a whole checkpoint, and an older one is
kept beside it. A full disk or a read-only directory is one :class:`~lcc.errors.LCCInputError`
line, with the old files untouched. :class:`AtomicCheckpointIO` is the Lightning
``CheckpointIO`` plugin doing this (``pl.Trainer(plugins=[AtomicCheckpointIO()])``): every
``ModelCheckpoint`` and ``trainer.save_checkpoint`` write goes through it, and every load is
weights-only.

:func:`find_resumable` picks, in a run directory, the newest checkpoint that loads and whose
epoch and step agree with its loop state, with one note per file it had to skip.

>>> import tempfile, torch
>>> run = Path(tempfile.mkdtemp())
>>> for epoch in (0, 1):
...     _ = save_checkpoint_atomic({"epoch": epoch, "global_step": 4 * epoch + 4,
...         "state_dict": {"w": torch.ones(1)}}, run / "checkpoints" / "last.ckpt")
>>> sorted(p.name for p in (run / "checkpoints").iterdir())
['last.ckpt', 'previous.ckpt']
>>> _ = (run / "checkpoints" / "last.ckpt").write_bytes(b"")  # what a bad copy leaves
>>> path, notes = find_resumable(run)
>>> path.name, notes
('previous.ckpt', ['checkpoint .../last.ckpt is unusable (empty file (0 bytes)); resuming from previous.ckpt (epoch 1, step 4)'])
"""  # noqa: E501

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from lcc.errors import LCCInputError
from lcc.io import TorchLoadError, atomic_write, safe_torch_load
from lcc.train.epochs import shown_epoch

__all__ = [
    "LAST",
    "AtomicCheckpointIO",  # noqa: F822 - built on first use, see __getattr__
    "CheckpointInfo",
    "checkpoint_candidates",
    "find_resumable",
    "history_names",
    "inspect_checkpoint",
    "save_checkpoint_atomic",
]

#: The checkpoint a run resumes from; the ones it replaced are kept beside it.
LAST = "last.ckpt"


def history_names(keep_last: int = 2) -> list[str]:
    """File names of the kept checkpoints, newest first.

    >>> history_names(3)
    ['last.ckpt', 'previous.ckpt', 'previous-2.ckpt']
    >>> history_names(1)
    ['last.ckpt']
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise LCCInputError(f"keep_last must be a positive integer, got {keep_last!r}")
    return [LAST, "previous.ckpt", *(f"previous-{i}.ckpt" for i in range(2, keep_last))][:keep_last]


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint that loads: where it is, and the epoch and optimiser step it was saved at."""

    path: Path
    epoch: int
    global_step: int


class _Unusable(Exception):
    """A checkpoint that cannot be resumed from; the message is the reason."""


# --------------------------------------------------------------------------- checking


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Load ``path`` weights-only (tensors memory-mapped) and check that it is a training
    checkpoint whose ``epoch`` and ``global_step`` agree with its loop state.

    Raises :class:`LCCInputError` with the file and the reason (empty, truncated, foreign
    bytes, needs arbitrary unpickling, inconsistent counters).
    """
    file = Path(path)
    try:
        return _inspect(file)
    except _Unusable as problem:
        raise LCCInputError(f"checkpoint {file} is unusable ({problem})") from None


def _inspect(file: Path) -> CheckpointInfo:
    try:
        checkpoint = safe_torch_load(file, mmap=True)
    except TorchLoadError as error:
        raise _Unusable(error.reason) from None
    if not isinstance(checkpoint, Mapping):
        raise _Unusable(f"holds a {type(checkpoint).__name__}, not a training checkpoint")
    epoch, step = checkpoint.get("epoch"), checkpoint.get("global_step")
    if not (_count(epoch) and _count(step)):
        raise _Unusable(f"epoch {epoch!r} and global_step {step!r} must be non-negative integers")
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping) or not any(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise _Unusable("no model weights (state_dict)")
    if problem := _loop_mismatch(checkpoint, int(epoch), int(step)):
        raise _Unusable(problem)
    return CheckpointInfo(file, int(epoch), int(step))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _nested(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _loop_mismatch(checkpoint: Mapping[str, Any], epoch: int, step: int) -> str | None:
    """Lightning's loop counters must agree with ``epoch`` and ``global_step``."""
    fit = _nested(checkpoint, "loops", "fit_loop")
    if fit is None:
        return None  # not written by a Lightning fit (e.g. a weights-only save)
    done = _nested(fit, "epoch_progress", "current", "completed")
    if done is not None and done != epoch:
        return f"epoch {epoch} but the loop state has {done} completed epochs"
    steps = [
        _nested(fit, f"epoch_loop.{kind}", *path, "total", "completed")
        for kind, path in (
            ("automatic_optimization.optim_progress", ("optimizer", "step")),
            ("manual_optimization.optim_step_progress", ()),
        )
    ]
    known = [s for s in steps if s is not None]
    if known and step not in known:
        return f"global_step {step} but the loop state counts {max(known)} optimiser steps"
    return None


# --------------------------------------------------------------------------- resuming


def checkpoint_candidates(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files in ``run_dir/checkpoints``: ``last.ckpt``, ``previous*.ckpt``, then any
    other ``*.ckpt`` (e.g. ``epoch=E.ckpt``), newest first by modification time."""
    folder = Path(run_dir).expanduser() / "checkpoints"
    if not folder.is_dir():
        return []
    ranked = [folder / LAST, folder / "previous.ckpt"]
    ranked += sorted(
        folder.glob("previous-*.ckpt"),
        key=lambda p: int(p.stem.split("-")[-1]) if p.stem.split("-")[-1].isdigit() else 1 << 30,
    )
    others = [p for p in folder.glob("*.ckpt") if p not in ranked]
    others.sort(key=lambda p: _mtime(p), reverse=True)
    return [p for p in ranked + others if p.is_file()]


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def find_resumable(run_dir: str | os.PathLike[str]) -> tuple[Path, list[str]]:
    """The newest checkpoint in ``run_dir/checkpoints`` that loads, and one note per skipped one.

    Every candidate (:func:`checkpoint_candidates`) is checked with :func:`inspect_checkpoint`;
    the one with the largest (global_step, epoch) wins, ties going to the earlier candidate.
    Each unusable file gets a note naming it and the reason. Raises :class:`LCCInputError`
    (one line) when there is no candidate or none loads.
    """
    run = Path(run_dir).expanduser()
    candidates = checkpoint_candidates(run)
    if not candidates:
        looked = ", ".join(history_names(2))
        raise LCCInputError(
            f"no checkpoint to resume in {run / 'checkpoints'} (looked for {looked} and *.ckpt)"
        )
    good: list[CheckpointInfo] = []
    bad: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            good.append(_inspect(path))
        except _Unusable as problem:
            bad.append((path, str(problem)))
    if not good:
        reasons = "; ".join(f"{path.name}: {reason}" for path, reason in bad)
        raise LCCInputError(
            f"no usable checkpoint in {run / 'checkpoints'} ({reasons}); remove that folder to "
            "start the run over, or choose another --out"
        )
    order = {info.path: rank for rank, info in enumerate(good)}
    best = max(good, key=lambda info: (info.global_step, info.epoch, -order[info.path]))
    notes = [
        f"checkpoint {path} is unusable ({reason}); resuming from {best.path.name} "
        f"(epoch {shown_epoch(best.epoch)}, step {best.global_step})"
        for path, reason in bad
    ]
    return best.path, notes


# --------------------------------------------------------------------------- saving


def save_checkpoint_atomic(
    checkpoint: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    keep_last: int = 2,
    verify: bool = True,
) -> Path:
    """Write ``checkpoint`` with ``torch.save`` to ``path`` atomically; keep older ones.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, checked
    to load with ``weights_only=True`` (``verify``), and renamed over ``path``; the directory
    is fsynced. When ``path`` is named ``last.ckpt`` and ``keep_last`` > 1, the file it
    replaces becomes ``previous.ckpt`` (and so on, :func:`history_names`), unless that file
    does not load (a damaged one is never kept in place of a good one). On ENOSPC, a
    read-only directory or another ``OSError``: :class:`LCCInputError` (one line), nothing
    changed. A checkpoint holding objects weights-only loading refuses is a bug: ``TypeError``.
    """
    target = Path(path).expanduser()
    names = history_names(keep_last) if target.name == LAST else [target.name]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _write_error(target, error) from error
    _remove_leftovers(target.parent, names)

    def write(handle: IO[bytes]) -> None:
        torch.save(dict(checkpoint), handle)

    def before_replace(temporary: Path) -> None:
        if verify:
            _check_loads(temporary, target)
        if len(names) > 1:
            _rotate(target.parent, names)

    try:
        atomic_write(target, write, before_replace=before_replace)
    except LCCInputError as error:
        cause = error.__cause__
        if isinstance(cause, OSError):
            raise _write_error(target, cause) from cause
        raise
    _remember(target)
    return target


def _remove_leftovers(folder: Path, names: list[str]) -> None:
    """Temporary files of earlier writes killed before their rename (they can be large)."""
    for name in names[:2]:
        for pattern in (f".{name}.*.tmp", f".{name}.link"):
            for leftover in folder.glob(pattern):
                with contextlib.suppress(OSError):
                    leftover.unlink()


def _check_loads(temporary: Path, target: Path) -> None:
    try:
        safe_torch_load(temporary, mmap=True)
    except TorchLoadError as error:
        if error.unsafe:
            raise TypeError(
                f"checkpoint {target} holds objects that weights-only loading refuses "
                f"({', '.join(error.unsafe)}); keep only tensors and plain values in it"
            ) from None
        raise LCCInputError(
            f"checkpoint {target} does not read back after writing ({error.reason}); check the disk"
        ) from None


# (inode, size, mtime) of the checkpoints this process wrote: known good, no need to reload
_WRITTEN: dict[Path, tuple[int, int, int]] = {}


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def _remember(path: Path) -> None:
    if (signature := _signature(path)) is not None:
        _WRITTEN[path.resolve()] = signature


def _loads(path: Path) -> bool:
    if (signature := _signature(path)) is None:
        return False
    if _WRITTEN.get(path.resolve()) == signature:
        return True
    try:
        safe_torch_load(path, mmap=True)
    except TorchLoadError:
        return False
    return True


def _rotate(folder: Path, names: list[str]) -> None:
    """Shift ``names[i] -> names[i+1]`` (the oldest dropped) and keep ``names[0]``'s current
    content as ``names[1]`` too, via a hard link when possible (so ``names[0]`` never goes
    missing). Skipped when ``names[0]`` is missing or does not load."""
    newest = folder / names[0]
    if not _loads(newest):
        return
    for older, newer in zip(reversed(names[1:-1]), reversed(names[2:]), strict=True):
        if (folder / older).exists():
            os.replace(folder / older, folder / newer)
    keep = folder / names[1]
    link = folder / f".{names[1]}.link"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    try:
        os.link(newest, link)
    except OSError:  # no hard links here: move it (the new file follows at once)
        os.replace(newest, keep)
    else:
        os.replace(link, keep)
    if (signature := _WRITTEN.pop(newest.resolve(), None)) is not None:
        _WRITTEN[keep.resolve()] = signature


def _write_error(target: Path, error: OSError) -> LCCInputError:
    if error.errno == errno.ENOSPC:
        reason, fix = "no space left on device", "free some space"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = f"{target.parent} is not writable ({error.strerror or error})"
        fix = "make it writable"
    else:
        reason, fix = error.strerror or str(error), "fix that"
    kept = [p.name for p in (target, target.with_name("previous.ckpt")) if p.is_file()]
    verb = "left as they were" if len(kept) > 1 else "left as it was"
    left = f"{' and '.join(kept)} {verb}" if kept else "no earlier checkpoint exists"
    run = target.parent.parent if target.parent.name == "checkpoints" else "DIR"
    return LCCInputError(
        f"cannot write checkpoint {target}: {reason}; {left}; {fix}, then continue with "
        f"`lcc train --out {run} --resume`"
    )


# --------------------------------------------------------------------------- Lightning


def _plugin_class() -> type:
    """Build :class:`AtomicCheckpointIO` on first use: importing Lightning takes seconds, and
    the rest of this module (used by ``lcc train`` before training) does not need it."""
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

    class AtomicCheckpointIO(CheckpointIO):
        """Lightning ``CheckpointIO``: atomic saves with a history, weights-only loads.

        Pass it to the trainer, ``pl.Trainer(plugins=[AtomicCheckpointIO(keep_last=2)])``; a
        ``ModelCheckpoint(filename="last")`` then keeps ``last.ckpt`` and ``previous.ckpt``, and
        ``trainer.fit(ckpt_path=...)`` loads with ``weights_only=True`` whatever it is asked.
        """

        def __init__(self, keep_last: int = 2, *, verify: bool = True) -> None:
            history_names(keep_last)  # validates
            self.keep_last = keep_last
            self.verify = verify

        def save_checkpoint(
            self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
        ) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO takes no storage_options")
            save_checkpoint_atomic(checkpoint, path, keep_last=self.keep_last, verify=self.verify)

        def load_checkpoint(
            self,
            path: Any,
            map_location: Callable[..., Any] | Any | None = None,
            weights_only: bool | None = None,  # ignored: always True
        ) -> dict[str, Any]:
            loaded = safe_torch_load(path, map_location=map_location or "cpu")
            if not isinstance(loaded, dict):
                kind = type(loaded).__name__
                raise LCCInputError(f"checkpoint {path} holds a {kind}, not a dict")
            return loaded

        def remove_checkpoint(self, path: Any) -> None:
            with contextlib.suppress(FileNotFoundError):
                Path(path).unlink()
            _WRITTEN.pop(Path(path).resolve(), None)

    AtomicCheckpointIO.__qualname__ = "AtomicCheckpointIO"  # pickles by reference
    return AtomicCheckpointIO


def __getattr__(name: str) -> Any:
    if name == "AtomicCheckpointIO":
        cls = _plugin_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
