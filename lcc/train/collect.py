"""The latents of the whole training set that a refresh reads, for any number of processes.

Two sources, as :class:`lcc.train.loop.Regularisation` offers them:

- ``fresh``: :func:`collect_fresh` runs an eval pass over the training set; under an
  :class:`lcc.train.exchange.Exchange` of ``W`` ranks, rank ``r`` passes over rows ``r::W``
  and the main rank gathers them into index order (in RAM, or memory-mapped ``.npy`` files in
  ``latents_dir``);
- ``recorded``: :class:`RecordedLatents` keeps per-sample buffers filled by the training
  forwards of the epoch before (:meth:`RecordedLatents.observe`); :meth:`RecordedLatents.share`
  merges what each rank recorded so every rank holds the same buffers.

>>> buffers = RecordedLatents(latents_dir=None, dtype="float32")
>>> buffers.set_size(4)
>>> buffers.gap(["fc"])
'no latents recorded yet'
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lcc.errors import LCCInputError, check_integer
from lcc.regularisers.base import TrainingLatents
from lcc.regularisers.lcc import to_numpy, to_torch
from lcc.train.epochs import shown_epoch
from lcc.train.exchange import Exchange
from lcc.zoo.batchnorm import batch_norm_layers, batch_statistics, check_refresh_bn, recalibrate
from lcc.zoo.latents import collect_latents, eval_mode, model_device

__all__ = [
    "GAP_WARNING",
    "RecordedLatents",
    "Shard",
    "collect_fresh",
    "dataset_labels",
    "warn_latent_gap",
]


class Shard(Dataset):
    """Rows ``rows`` of ``dataset`` as ``(x, y, position)`` (position within the shard)."""

    def __init__(self, dataset: Any, rows: np.ndarray):
        self.dataset, self.rows = dataset, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, position: int) -> tuple[Any, Any, int]:
        item = self.dataset[int(self.rows[position])]
        return item[0], item[1], int(position)

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[Any, Any, int]]:
        fetch = getattr(self.dataset, "__getitems__", None)
        rows = [int(self.rows[p]) for p in positions]
        items = fetch(rows) if fetch else [self.dataset[r] for r in rows]
        return [(item[0], item[1], int(p)) for item, p in zip(items, positions, strict=True)]


def _shard_loader(loader: Any, rank: int, world: int) -> DataLoader:
    """A loader over rows ``rank::world`` of ``loader``'s dataset, yielding shard positions."""
    rows = np.arange(rank, len(loader.dataset), world)
    return DataLoader(
        Shard(loader.dataset, rows),
        batch_size=getattr(loader, "batch_size", None) or 128,
        shuffle=False,
        num_workers=getattr(loader, "num_workers", 0),
    )


def collect_fresh(
    model: nn.Module,
    loader: Any,
    layers: Sequence[str],
    *,
    exchange: Exchange,
    pool: str,
    device: torch.device | None,
    latents_dir: Path | None,
    latents_dtype: str,
    reason: str | None = None,
    refresh_bn: str = "running",
    seed: int = 0,
    train_accuracy: float | None = None,
) -> TrainingLatents | None:
    """The eval pass over the training set (sharded over ``exchange``'s ranks); the gathered
    :class:`TrainingLatents` on the main rank, None on the others.

    ``refresh_bn`` (:mod:`lcc.zoo.batchnorm`): ``running`` (eval mode), ``batch`` (BatchNorm
    with batch statistics, running ones untouched) or ``recalibrate`` (running statistics first
    re-estimated on a sample of the training set drawn with ``seed``, the epoch). The
    per-sample cross-entropy of the pass is kept in ``losses`` (gathered like the latents).
    ``train_accuracy``: that of the previous epoch's training forwards, kept beside the pass's
    and compared with it (:func:`warn_latent_gap`) for a model with BatchNorm.

    ``latents_dir``: the latents are memory-mapped ``.npy`` files there (every rank writes its
    shard in ``latents_dir/shard-RANK``, the main rank the gathered whole in ``latents_dir``).
    ``reason``: why a ``recorded`` run falls back to a fresh pass (kept in ``source``).
    """
    start = time.perf_counter()
    if loader is None:
        raise LCCInputError(
            "a refresh needs the training loader (yielding (x, y, index)) for the latent pass"
        )
    refresh_bn = check_refresh_bn(refresh_bn)
    if refresh_bn == "recalibrate":
        batch_size = getattr(loader, "batch_size", None) or 128
        recalibrate(model, loader.dataset, batch_size=batch_size, seed=seed, device=device)
    folder = latents_dir
    if exchange.world > 1:
        exchange.broadcast_buffers(model)  # BatchNorm statistics drift apart per rank
        loader = _shard_loader(loader, exchange.rank, exchange.world)
        folder = latents_dir / f"shard-{exchange.rank}" if latents_dir is not None else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    losses, keep_loss = _loss_keeper(len(loader.dataset))
    latents, y, predictions = collect_latents(
        model,
        loader,
        list(layers),
        pool=pool,  # type: ignore[arg-type]
        device=device,
        memmap_dir=folder,
        memmap_dtype=np.dtype(latents_dtype),
        mode=batch_statistics if refresh_bn == "batch" else eval_mode,
        on_batch=keep_loss,
    )
    if exchange.world > 1:
        gathered = _gather_shards(
            latents, y, predictions, losses, exchange, latents_dir, latents_dtype
        )
        if gathered is None:
            return None
        latents, y, predictions, losses = gathered
    collected = TrainingLatents(
        latents=latents,
        y=np.asarray(y, dtype=np.int64),
        predictions=np.asarray(predictions, dtype=np.int64),
        source="fresh" if reason is None else f"fresh (fallback: {reason})",
        seconds=time.perf_counter() - start,
        device=str(device if device is not None else model_device(model)),
        losses=losses,
        refresh_bn=refresh_bn,
        train_accuracy=train_accuracy,
    )
    if batch_norm_layers(model):
        warn_latent_gap(collected, refresh_bn, seed)
    return collected


def _loss_keeper(n: int) -> tuple[np.ndarray, Any]:
    """A NaN-filled array of ``n`` per-sample losses and the ``on_batch`` callback of
    :func:`lcc.zoo.latents.collect_latents` that fills it with each labelled row's
    cross-entropy."""
    losses = np.full(n, np.nan)

    def keep_loss(logits: Tensor, labels: Tensor, rows: np.ndarray) -> None:
        labels = labels.reshape(-1).to(logits.device, torch.int64)
        losses[rows] = _sample_losses(logits, labels).cpu().numpy()

    return losses, keep_loss


def _sample_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """(B,) cross-entropy of each row (float32), NaN for unlabelled rows (label -1)."""
    scores = logits.reshape(labels.shape[0], -1).float()
    loss = nn.functional.cross_entropy(scores, labels.clamp(min=0), reduction="none")
    return torch.where(labels >= 0, loss, torch.nan)


#: A fresh pass whose accuracy is this far from training's (fraction) gets a warning.
GAP_WARNING = 0.15


def warn_latent_gap(collected: TrainingLatents, refresh_bn: str, epoch: int) -> None:
    """One warning line when the fresh pass's accuracy is more than :data:`GAP_WARNING` below
    the accuracy of the previous epoch's training forwards (stale BatchNorm statistics: the
    targets are computed in latents that training does not produce). For models with
    BatchNorm only; a pass *above* training is expected while the model still learns fast
    (training's accuracy is averaged over an epoch of a changing model)."""
    before, predictions = collected.train_accuracy, collected.predictions
    if before is None or predictions is None:
        return
    known = (collected.y >= 0) & (predictions >= 0)
    if not known.any():
        return
    now = float(np.mean(predictions[known] == collected.y[known]))
    if before - now > GAP_WARNING:
        other = "recalibrate or batch" if refresh_bn == "running" else "another --refresh-bn"
        warnings.warn(
            f"refresh at epoch {shown_epoch(epoch)}: the fresh latent pass scores "
            f"{100 * now:.1f}% on the training set, the training forwards of the epoch before "
            f"{100 * before:.1f}%: its latents differ from training's (BatchNorm statistics, "
            f"--refresh-bn {refresh_bn}); try --refresh-bn {other}",
            stacklevel=4,
        )


def _gather_shards(
    latents: Mapping[str, np.ndarray],
    y: np.ndarray,
    predictions: np.ndarray,
    losses: np.ndarray,
    exchange: Exchange,
    latents_dir: Path | None,
    dtype: str,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray] | None:
    """Shards ``r::W`` of every rank put back into index order, on the main rank only."""
    world = exchange.world
    meta = exchange.gather_rows(np.stack([y, predictions], axis=1))
    losses_parts = exchange.gather_rows(losses.reshape(-1, 1))
    n = sum(part.shape[0] for part in meta)
    full: dict[str, np.ndarray] = {}
    for name, mine in latents.items():
        parts = exchange.gather_rows(np.asarray(mine))
        if not exchange.is_main:
            continue
        shape = (n, parts[0].shape[1])
        full[name] = (
            np.lib.format.open_memmap(latents_dir / f"{name}.npy", "w+", np.dtype(dtype), shape)
            if latents_dir is not None
            else np.empty(shape, dtype=np.float32)
        )
        for rank, part in enumerate(parts):
            full[name][rank::world] = part
    if not exchange.is_main:
        return None
    labels, predicted = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    every_loss = np.empty(n)
    for rank, (part, loss) in enumerate(zip(meta, losses_parts, strict=True)):
        labels[rank::world], predicted[rank::world] = part[:, 0], part[:, 1]
        every_loss[rank::world] = loss[:, 0]
    return full, labels, predicted, every_loss


def dataset_labels(loader: Any) -> np.ndarray | None:
    """Training labels exposed by the loader's dataset (``targets`` attribute), if any."""
    dataset = getattr(loader, "dataset", None)
    for _ in range(3):
        labels = getattr(dataset, "targets", None)
        if labels is not None:
            try:
                return np.asarray(labels).astype(np.int64).reshape(-1)
            except (TypeError, ValueError):
                return None
        dataset = getattr(dataset, "dataset", None)
    return None


#: the per-sample buffers of :class:`RecordedLatents` (its attributes), as checkpoints hold them
_BUFFERS = ("predictions", "labels", "recorded_at", "losses", "latents")


class RecordedLatents:
    """Per-sample buffers of the training forwards: predictions, labels, cross-entropy, the
    epoch each row was recorded in, and latents per layer ((N, D), in RAM or memory-mapped in
    ``latents_dir``)."""

    def __init__(self, *, latents_dir: Path | None, dtype: str):
        self.latents_dir, self.dtype = latents_dir, dtype
        self.n: int | None = None  # the training-set size
        self.predictions: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.recorded_at: np.ndarray | None = None
        self.losses: np.ndarray | None = None  # (N,) float64 cross-entropy, NaN unknown
        self.latents: dict[str, np.ndarray] = {}
        #: per epoch, the labelled training forwards seen and predicted right by this process
        self.tally: dict[int, tuple[int, int]] = {}

    def set_size(self, n: int) -> None:
        """The training set has ``n`` samples (it may not change once rows are recorded)."""
        n = check_integer(n, "n_samples", 1)
        if self.n is not None and self.n != n and self.predictions is not None:
            raise LCCInputError(
                f"the training set has {n} samples but the recorded buffers hold "
                f"{self.n}; use the same training set for every epoch"
            )
        self.n = n

    def allocate(self, n: int) -> None:
        """Empty (-1) buffers for ``n`` samples, unless they exist at that size."""
        if self.predictions is None or self.predictions.shape[0] != n:
            self.predictions = np.full(n, -1, dtype=np.int64)
            self.labels = np.full(n, -1, dtype=np.int64)
            self.recorded_at = np.full(n, -1, dtype=np.int64)
            self.losses = np.full(n, np.nan)
            self.latents = {}

    def observe(
        self,
        index: Tensor,
        *,
        logits: Tensor | None,
        y: Tensor | np.ndarray | Sequence[int] | None,
        outputs: Mapping[str, Tensor],
        epoch: int,
    ) -> None:
        """Write one batch's predictions, labels and (``outputs``) latents at rows ``index``."""
        if self.n is None:
            raise LCCInputError(
                "the training-set size is not known yet: pass n_samples= or call "
                "start_epoch(epoch, loader) before observe()"
            )
        if int(index.min()) < 0 or int(index.max()) >= self.n:
            raise LCCInputError(
                f"observe got dataset index {int(index.max())} outside 0..{self.n - 1}; "
                "pass the dataset indices of the batch"
            )
        self.allocate(self.n)
        if logits is not None:
            predicted = logits.detach().argmax(dim=-1).reshape(-1).cpu()
            _check_rows(predicted.shape[0], index, "logits")
            torch.from_numpy(self.predictions)[index] = predicted  # type: ignore[arg-type]
        if y is not None:
            labels = torch.as_tensor(y).detach().reshape(-1).cpu().long()
            _check_rows(labels.shape[0], index, "y")
            torch.from_numpy(self.labels)[index] = labels  # type: ignore[arg-type]
        if logits is not None and y is not None:
            self._observe_losses(index, logits, labels)
            known = labels >= 0
            right, seen = self.tally.get(epoch, (0, 0))
            right += int((predicted[known] == labels[known]).sum())
            self.tally[epoch] = (right, seen + int(known.sum()))
        if not outputs:
            return
        n = self.n
        for name, output in outputs.items():
            out = output.detach().to("cpu", torch.float32)
            out = out.reshape(out.shape[0], -1)
            _check_rows(out.shape[0], index, f"the output of layer {name!r}")
            if name not in self.latents or self.latents[name].shape[1] != out.shape[1]:
                self.latents[name] = self._buffer(name, (n, out.shape[1]))
            torch.from_numpy(self.latents[name])[index] = out
        torch.from_numpy(self.recorded_at)[index] = max(epoch, 0)  # type: ignore[arg-type]

    def _observe_losses(self, index: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Per-sample cross-entropy of the batch (NaN for unlabelled rows)."""
        if self.losses is None or self.losses.shape[0] != self.predictions.shape[0]:  # type: ignore[union-attr]
            self.losses = np.full(self.predictions.shape[0], np.nan)  # type: ignore[union-attr]
        values = _sample_losses(logits.detach().float().cpu(), labels)
        torch.from_numpy(self.losses)[index] = values.double()

    def accuracy(self, epoch: int | None = None, exchange: Exchange | None = None) -> float | None:
        """Accuracy of the training forwards of ``epoch`` (over every process of ``exchange``,
        a collective: each one saw its shard), or without ``epoch`` that of the last forward of
        every sample recorded here; None before any was recorded."""
        if epoch is not None and (exchange is not None or epoch in self.tally):
            right, seen = self.tally.get(epoch, (0, 0))
            if exchange is not None and exchange.world > 1:
                right, seen = exchange.all_reduce_sum([right, seen])
            return float(right / seen) if seen else None
        if self.predictions is None or self.labels is None:
            return None
        known = (self.predictions >= 0) & (self.labels >= 0)
        if not known.any():
            return None
        return float(np.mean(self.predictions[known] == self.labels[known]))

    def gap(self, layers: Sequence[str]) -> str | None:
        """Why the buffers cannot serve a refresh of ``layers``, or None when they can."""
        n = self.n
        if n is None or self.recorded_at is None or self.labels is None:
            return "no latents recorded yet"
        if any(name not in self.latents for name in layers):
            return "no latents recorded yet"
        never = int(np.sum(self.recorded_at[:n] < 0))
        if never:
            return f"{never} samples never recorded"
        if not (self.labels[:n] >= 0).any():
            return "labels missing: pass y to observe()"
        return None

    def collected(self, layers: Sequence[str], epoch: int | None) -> TrainingLatents:
        """The buffers as :class:`TrainingLatents` (check :meth:`gap` first)."""
        start = time.perf_counter()
        n = self.n
        assert n is not None and self.labels is not None and self.recorded_at is not None
        previous = -1 if epoch is None else epoch - 1
        stale = int(np.sum(self.recorded_at[:n] < previous)) if previous >= 0 else 0
        return TrainingLatents(
            latents={name: self.latents[name][:n] for name in layers},
            y=self.labels[:n].copy(),
            predictions=None if self.predictions is None else self.predictions[:n].copy(),
            source="recorded",
            seconds=time.perf_counter() - start,
            stale=stale,
            losses=None if self.losses is None else self.losses[:n].copy(),
        )

    def share(
        self, epoch: int, layers: Sequence[str], rows: np.ndarray, exchange: Exchange
    ) -> None:
        """Give every rank the rows each rank recorded in ``epoch`` (``rows``: this rank's);
        on a row recorded by several ranks the lowest rank wins."""
        if self.recorded_at is None:
            return
        assert self.predictions is not None and self.labels is not None
        rows = rows[self.recorded_at[rows] == epoch]
        gathered_rows = exchange.gather_rows(rows)
        meta = exchange.gather_rows(np.stack([self.predictions[rows], self.labels[rows]], axis=1))
        gathered = {name: exchange.gather_rows(self.latents[name][rows]) for name in layers}
        losses = None if self.losses is None else exchange.gather_rows(self.losses[rows, None])
        for rank in reversed(range(len(gathered_rows))):  # lowest rank written last: it wins
            index = gathered_rows[rank]
            self.predictions[index] = meta[rank][:, 0]
            self.labels[index] = meta[rank][:, 1]
            self.recorded_at[index] = epoch
            if losses is not None and self.losses is not None:
                self.losses[index] = losses[rank][:, 0]
            for name in layers:
                self.latents[name][index] = gathered[name][rank]

    def as_dict(self) -> dict[str, Any]:
        """The buffers (numpy views): ``predictions``/``labels`` (N,) int64 (-1 unknown),
        ``recorded_at`` (N,) epoch of each row (-1 never), ``latents`` {layer: (N, D)}."""
        return {name: getattr(self, name) for name in _BUFFERS}

    def state_dict(self) -> dict[str, Any]:
        tally = np.array([[e, r, n] for e, (r, n) in sorted(self.tally.items())], dtype=np.int64)
        return to_torch(
            {**self.as_dict(), "latents": dict(self.latents), "tally": tally.reshape(-1, 3)}
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        buffers = to_numpy(dict(state))
        self.predictions = buffers["predictions"]
        self.labels = buffers["labels"]
        self.recorded_at = buffers["recorded_at"]
        self.losses = buffers.get("losses")  # absent from checkpoints before issue 20
        self.latents = dict(buffers["latents"])
        rows = buffers.get("tally", np.zeros((0, 3), dtype=np.int64))  # absent before
        self.tally = {int(e): (int(r), int(n)) for e, r, n in rows}

    def _buffer(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A zeroed (N, D) buffer: in RAM, or a memory-mapped ``recorded-<layer>.npy``."""
        if self.latents_dir is None:
            return np.zeros(shape, dtype=np.float32)
        path = Path(os.fspath(self.latents_dir)) / f"recorded-{name}.npy"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(self.dtype), shape=shape)


def _check_rows(rows: int, index: Tensor, what: str) -> None:
    if rows != index.shape[0]:
        raise LCCInputError(
            f"{what} has {rows} rows but the batch has {index.shape[0]} indices; call "
            "observe() right after the forward of the same batch"
        )
