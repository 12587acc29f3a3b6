"""Lightning integration: a classifier module trained with ``CE + LCC``, DDP-aware refreshes.

:class:`LCCModule` owns the model and a :class:`lcc.train.loop.LatentClusterCorrection`. Its
``training_step`` computes ``loss = CE(logits, y) + lcc.loss(indices)`` and records the batch
with ``lcc.observe``; ``on_train_epoch_start`` refreshes the correction targets when due. The
optimiser is SGD (momentum 0.9 by default) with a per-step cosine schedule over the run.

Under DDP the refresh is computed once and shared with collectives, never through files:

- ``fresh`` source: each rank runs the eval pass over its shard ``rank::world`` of the
  non-augmented training set, the latents are ``all_gather``-ed into index order;
- ``recorded`` source: at the end of every epoch that precedes a refresh, the rows each rank
  recorded are ``all_gather``-ed into every rank's buffers (lowest rank wins on duplicates),
  so the buffers (and the checkpoint) are complete and identical on all ranks;
- rank 0 runs ``compute``; the picklable :class:`~lcc.train.loop.RefreshState` is sent with
  ``broadcast_object_list`` and every rank ``install``-s it (a digest check confirms it).

Data order depends only on ``(seed, epoch)`` (:class:`EpochSampler`), and each epoch starts from
RNG states derived from them, so a run resumed from an end-of-epoch checkpoint replays exactly.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> module = LCCModule(model, num_classes=3, n_train=30)
>>> module.model(torch.zeros(2, 1, 2, 2)).shape
torch.Size([2, 3])
>>> list(EpochSampler(6, seed=0, shuffle=False, rank=1, world_size=2))
[1, 3, 5]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lcc.errors import LCCInputError
from lcc.regularisers.base import Regulariser
from lcc.regularisers.lcc import LCC
from lcc.train.loop import Collected, LCCConfig, RefreshState, Regularisation
from lcc.zoo.datasets import IndexedDataset
from lcc.zoo.latents import collect_latents

__all__ = [
    "EpochSampler",
    "LCCDataModule",
    "LCCModule",
    "NonFiniteLossError",
    "all_gather_rows",
    "epoch_seed",
    "preserved_rng",
    "seed_rngs",
]


class NonFiniteLossError(RuntimeError):
    """The training loss (or the weights) became NaN/inf; the run stops, checkpoints are kept."""


# --------------------------------------------------------------------------- data order


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, rank)``.

    >>> epoch_seed(0, 1) == epoch_seed(0, 1) != epoch_seed(0, 2)
    True
    """
    digest = hashlib.sha256(f"lcc:{seed}:{epoch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global Python/NumPy/torch RNG states on exit (makes a block RNG-neutral)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def rng_state() -> dict[str, Any]:
    """The global Python/NumPy/torch RNG states as checkpoint-safe values (tensors, tuples)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(np.asarray(keys).copy()), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), int(position), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])


class ResumePoint:
    """Where a mid-epoch checkpoint stopped: ``epoch``, ``batches`` done in it, RNG states.

    A sampler given one (``resume_at``) skips the batches already trained on when it next
    iterates that epoch, then restores the RNG states, so the rest of the epoch replays
    exactly as in an uninterrupted run.
    """

    def __init__(self, epoch: int, batches: int, rng: dict[str, Any] | None):
        self.epoch, self.batches, self.rng = int(epoch), int(batches), rng

    def take(self, epoch: int) -> ResumePoint | None:
        """This point if it is for ``epoch`` (a point is used once)."""
        return self if epoch == self.epoch and self.batches > 0 else None


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1`` in an order that depends only on ``(seed, epoch)``; one rank's shard.

    The permutation of epoch ``e`` is ``torch.randperm(n)`` seeded with ``epoch_seed(seed, e)``
    (identity when ``shuffle=False``). With ``pad=True`` it is padded (wrapping around) to a
    multiple of ``world_size`` so every rank gets the same number of samples; rank ``r`` takes
    positions ``r, r + world_size, ...``. ``epoch_fn`` (if given) is read when iteration starts,
    otherwise :meth:`set_epoch` sets the epoch. With ``reseed=True`` the global RNGs are seeded
    from ``(seed, epoch, rank)`` when iteration starts, so augmentation and dropout of an epoch
    do not depend on what ran before it (exact resume).

    >>> order = list(EpochSampler(5, seed=3))
    >>> sorted(order), order == list(EpochSampler(5, seed=3))
    ([0, 1, 2, 3, 4], True)
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        epoch_fn: Callable[[], int] | None = None,
        reseed: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise LCCInputError(f"rank {rank} is not in 0..{world_size - 1}")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.rank, self.world_size, self.pad = int(rank), int(world_size), bool(pad)
        self.epoch_fn, self.reseed = epoch_fn, bool(reseed)
        self.epoch = 0
        self.batch_size = 1
        self.resume: ResumePoint | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, point: ResumePoint, batch_size: int) -> None:
        """Skip ``point.batches * batch_size`` samples the next time ``point.epoch`` runs."""
        self.resume, self.batch_size = point, int(batch_size)

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size) if self.n else 0
        return len(range(self.rank, self.n, self.world_size))

    def indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch`` (no side effects)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        if self.pad and order:
            total = math.ceil(self.n / self.world_size) * self.world_size
            order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        epoch = int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch
        if self.reseed:
            seed_rngs(epoch_seed(self.seed, epoch, self.rank))
        point, self.resume = (self.resume.take(epoch) if self.resume else None), None
        order = self.indices(epoch)
        if point is not None:
            order = order[point.batches * self.batch_size :]
            if point.rng is not None:
                set_rng_state(point.rng)
        yield from order


class _Shard(Dataset):
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


class _EpochBatches(Sampler[list[int]]):
    """A batch sampler whose order depends only on ``(seed, epoch)``: sets the epoch of
    ``batches`` and seeds the global RNGs from ``(seed, epoch, rank)`` when iteration starts
    (exact resume, as :class:`EpochSampler` with ``reseed=True``)."""

    def __init__(self, batches: Any, *, seed: int, rank: int, epoch_fn: Callable[[], int]):
        self.batches, self.seed, self.rank, self.epoch_fn = batches, seed, rank, epoch_fn
        self.resume: ResumePoint | None = None

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it; the epoch comes from epoch_fn
        pass

    def resume_at(self, point: ResumePoint, batch_size: int) -> None:
        """Skip ``point.batches`` batches the next time ``point.epoch`` runs."""
        self.resume = point

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = int(self.epoch_fn())
        self.batches.set_epoch(epoch)
        seed_rngs(epoch_seed(self.seed, epoch, self.rank))
        point, self.resume = (self.resume.take(epoch) if self.resume else None), None
        batches = iter(self.batches)
        if point is not None:
            for _ in range(point.batches):
                next(batches, None)
            if point.rng is not None:
                set_rng_state(point.rng)
        yield from batches


class ResumableLoader(DataLoader):
    """A training DataLoader Lightning can checkpoint mid-epoch (its ``state_dict`` protocol):
    the state is a :class:`ResumePoint` (epoch, batches trained on, RNG states), read from
    ``progress_fn`` when a checkpoint is saved; loading it makes the sampler skip those batches.
    """

    def __init__(self, *args: Any, progress_fn: Callable[[], tuple[int, int]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.progress_fn = progress_fn

    def _order(self) -> Any:
        return self.batch_sampler if self.batch_size is None else self.sampler

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self.progress_fn()
        return {"epoch": int(epoch), "batches": int(batches), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        point = ResumePoint(state["epoch"], state["batches"], state.get("rng"))
        self._order().resume_at(point, self.batch_size or 1)


class LCCDataModule(pl.LightningDataModule):
    """Train/test loaders of a :class:`lcc.zoo.datasets.DatasetBundle` for :class:`LCCModule`.

    The train loader yields ``(x, y, index)`` from the augmented training set in an
    :class:`EpochSampler` order (sharded and padded under DDP); the test loader yields
    ``(x, y)``, sharded without padding under DDP (metrics are summed exactly over ranks).
    """

    def __init__(
        self,
        bundle: Any,
        *,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        train: Any = None,
        labeled_ratio: float = 0.5,
    ):
        super().__init__()
        self.bundle = bundle
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.train = train  # a lcc.zoo.labels.MaskedLabels: labelled and unlabelled batches
        self.labeled_ratio = float(labeled_ratio)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        trainer = self.trainer

        def epoch() -> int:
            # the epoch being started, also while Lightning prefetches right after a resume
            return int(trainer.fit_loop.epoch_progress.current.processed) if trainer else 0

        def progress() -> tuple[int, int]:  # the epoch in progress and its batches trained on
            module = trainer.lightning_module if trainer else None
            if module is None:
                return 0, 0
            return int(getattr(module, "batches_epoch", 0)), int(getattr(module, "batches_done", 0))

        if self.train is not None:
            return self._mixed_dataloader(rank, world, epoch, progress)
        sampler = EpochSampler(
            len(self.bundle.train),
            seed=self.seed,
            rank=rank,
            world_size=world,
            epoch_fn=epoch,
            reseed=True,
        )
        return ResumableLoader(
            IndexedDataset(self.bundle.train),
            progress_fn=progress,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def _mixed_dataloader(
        self,
        rank: int,
        world: int,
        epoch: Callable[[], int],
        progress: Callable[[], tuple[int, int]],
    ) -> DataLoader:
        from lcc.zoo.labels import MixedBatchSampler

        batches = MixedBatchSampler(
            self.train.labeled_indices,
            self.train.unlabeled_indices,
            self.batch_size,
            ratio=self.labeled_ratio,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
        )
        return ResumableLoader(
            self.train,
            progress_fn=progress,
            batch_sampler=_EpochBatches(batches, seed=self.seed, rank=rank, epoch_fn=epoch),
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def test_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        rows = list(range(rank, len(self.bundle.test), world))
        return DataLoader(
            self.bundle.test,
            batch_size=self.batch_size,
            sampler=rows,
            num_workers=self.num_workers,
        )


# --------------------------------------------------------------------------- collectives


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _collective_device() -> torch.device:
    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(array: np.ndarray) -> list[np.ndarray]:
    """Every rank's ``array`` (same trailing shape and dtype, any number of rows), rank order.

    Without an initialised process group, returns ``[array]``.
    """
    dist = _dist()
    if dist is None:
        return [array]
    device = _collective_device()
    world = dist.get_world_size()
    count = torch.tensor([array.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = np.zeros((max(sizes), *array.shape[1:]), dtype=array.dtype)
    padded[: array.shape[0]] = array
    tensor = torch.from_numpy(padded).to(device)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return [part[:size].cpu().numpy() for part, size in zip(parts, sizes, strict=True)]


def _all_reduce_sum(values: Sequence[float]) -> list[float]:
    dist = _dist()
    if dist is None:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def _broadcast(obj: Any) -> Any:
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def _states_digest(states: Mapping[str, Any]) -> str:
    """A digest of refresh states: their arrays' bytes and plain values, walked in order (equal
    states give equal digests on every rank; pickles may differ in their memo layout)."""
    import dataclasses

    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, np.ndarray):
            digest.update(f"{value.dtype}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, Tensor):
            walk(value.detach().cpu().numpy())
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for item in dataclasses.fields(value):
                digest.update(item.name.encode())
                walk(getattr(value, item.name))
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        else:
            digest.update(repr(value).encode())

    walk(dict(states))
    return digest.hexdigest()


def _safe_name(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", layer)


# --------------------------------------------------------------------------- the module


class LCCModule(pl.LightningModule):
    """A classifier trained with ``CE + sum of weighted regulariser terms`` (none: the baseline).

    ``lcc_config`` (an :class:`lcc.train.loop.LCCConfig`) adds Latent Cluster Correction;
    ``regularisers`` adds any others (:mod:`lcc.regularisers`); ``source``/``pool`` say how the
    latents of the whole training set are obtained when ``lcc_config`` does not.
    ``n_train`` is the training-set size (for the per-sample buffers); ``refresh_data`` is the
    non-augmented training set yielding ``(x, y)`` (same order as the training set) used by the
    ``fresh`` latent pass, in batches of ``refresh_batch_size`` (``lcc train`` passes its
    training batch size: on CPU larger eval batches were slower -- small-resnet's pass over
    10,000 images took 0.8 s at 128 and 1.6 s at 256); ``out_dir`` (rank 0) receives
    ``refreshes.jsonl`` (one JSON line per refresh and layer) and
    ``refresh/epoch_E_<layer>.npz`` (clusters, targets' indices, and with ``save_latents`` the
    latents ``z`` and labels ``y``). Cross-entropy is averaged over the labelled samples of a
    batch (label ``-1``: unlabelled).
    """

    def __init__(
        self,
        model: nn.Module,
        lcc_config: LCCConfig | None = None,
        *,
        num_classes: int,
        n_train: int,
        regularisers: Sequence[Regulariser] = (),
        source: str = "fresh",
        pool: str = "flatten",
        sample: Tensor | None = None,
        latents_dir: str | Path | None = None,
        latents_dtype: str = "float32",
        ce_weight: float = 1.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        refresh_data: Dataset | None = None,
        refresh_batch_size: int = 128,
        num_workers: int = 0,
        out_dir: str | Path | None = None,
        save_latents: bool = False,
        report: bool = False,
    ):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.n_train = int(n_train)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.ce_weight = float(ce_weight)
        self.refresh_data = refresh_data
        self.refresh_batch_size = int(refresh_batch_size)
        self.num_workers = int(num_workers)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.save_latents = bool(save_latents)
        self.report = bool(report)
        regs: list[Regulariser] = []
        if lcc_config is not None:
            regs.append(LCC(lcc_config.options()))
            source, pool = lcc_config.source, lcc_config.pool
        regs.extend(regularisers)
        self.regularisation: Regularisation | None = None
        if regs:
            if sample is None and refresh_data is not None and len(refresh_data) > 0:  # type: ignore[arg-type]
                sample = torch.stack([refresh_data[i][0] for i in range(min(2, len(refresh_data)))])  # type: ignore[arg-type]
            self.regularisation = Regularisation(
                model,
                regs,
                source=source,
                pool=pool,
                n_samples=self.n_train,
                num_classes=self.num_classes,
                sample=sample,
                latents_dir=latents_dir,
                latents_dtype=latents_dtype,
            )
        self.history: list[dict[str, Any]] = []  # one record per finished epoch
        self.test_metrics: dict[str, float] = {}
        self._epoch_start = self._epoch_cpu_start = 0.0
        self._refresh_seconds = 0.0
        self._refresh_stats: dict[str, Any] | None = None
        self._sums = np.zeros(6)  # loss*B, ce*B, reg*B, correct, count, labelled
        self._term_sums: dict[str, float] = {}
        self._seen = np.zeros(self.n_train, dtype=bool)
        self.batches_done = 0  # training steps finished in epoch ``batches_epoch``
        self.batches_epoch = 0
        self._mid_epoch: dict[str, Any] | None = None  # a mid-epoch checkpoint's epoch state

    @property
    def lcc(self) -> LCC | None:
        """The LCC regulariser of this run (the first one), or None."""
        if self.regularisation is None:
            return None
        return next((r for r in self.regularisation.regularisers if isinstance(r, LCC)), None)  # type: ignore[return-value]

    # --- forward / optimisation --------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        if self.regularisation is not None:
            self.regularisation.to(self.device)

    def configure_optimizers(self) -> Any:
        groups: list[dict[str, Any]] = [{"params": list(self.model.parameters())}]
        own = [] if self.regularisation is None else list(self.regularisation.parameters())
        if own:  # e.g. k-means centroids: no weight decay pulling them towards 0
            groups.append({"params": own, "weight_decay": 0.0})
        optimizer = torch.optim.SGD(
            groups,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        totals: list[int] = []

        def cosine(step: int) -> float:
            # the number of steps is read at the first step, not here: asking for it now would
            # build the train loader before a checkpoint restores its position (mid-epoch resume)
            if step == 0:
                return 1.0
            if not totals:
                totals.append(max(1, int(self.trainer.estimated_stepping_batches)))
            total = totals[0]
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # --- training ----------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._restored_epoch = int(self.current_epoch) if self._resume_mid_epoch() else None

    def on_train_epoch_start(self) -> None:
        if getattr(self, "_restored_epoch", None) == int(self.current_epoch):
            self._restored_epoch = None  # continuing a mid-epoch checkpoint: already restored
            return
        self._epoch_start = time.perf_counter()
        self._epoch_cpu_start = time.process_time()
        self._refresh_seconds = 0.0
        self._refresh_stats = None
        self._sums[:] = 0
        self._term_sums = {}
        self._seen[:] = False
        self.batches_done = 0
        self.batches_epoch = int(self.current_epoch)
        regs = self.regularisation
        if regs is None:
            return
        epoch = int(self.current_epoch)
        regs.epoch = epoch
        for reg in regs.regularisers:
            reg.start_epoch(epoch)
        due = regs.due(epoch)
        if due:
            start = time.perf_counter()
            with preserved_rng():
                collected, states = self._refresh(epoch, due)
            self._refresh_seconds = time.perf_counter() - start
            self._refresh_stats = _layer_stats(states)
            if self.trainer.is_global_zero:
                self._write_refresh(epoch, collected, states)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = batch
        logits = self.model(x)
        labelled = y >= 0
        if bool(labelled.all()):
            ce = F.cross_entropy(logits, y)
        elif bool(labelled.any()):
            ce = F.cross_entropy(logits[labelled], y[labelled])
        else:  # an all-unlabelled batch: no cross-entropy, still attached to the graph
            ce = logits.sum() * 0.0
        if self.regularisation is not None:
            term = self.regularisation.loss(index, y=y, logits=logits, x=x)
            self.regularisation.observe(index, logits, y)
            for key, value in self.regularisation.terms.items():
                self._term_sums[key] = self._term_sums.get(key, 0.0) + value * int(y.shape[0])
        else:
            term = ce.new_zeros(())
        loss = ce + term if self.ce_weight == 1.0 else self.ce_weight * ce + term
        self._check_finite(loss, ce, term, batch_idx)
        size = int(y.shape[0])
        correct = int((logits.detach().argmax(1) == y)[labelled].sum())
        self._sums += (
            float(loss.detach()) * size,
            float(ce.detach()) * size,
            float(term.detach()) * size,
            correct,
            size,
            int(labelled.sum()),
        )
        self._seen[index.detach().cpu().numpy()] = True
        self.batches_done += 1
        if self._trainer is not None:
            self.log("loss", loss.detach(), prog_bar=True, on_epoch=False, logger=False)
        return loss

    def _world(self) -> int:
        return 1 if self._trainer is None else int(self.trainer.world_size)

    def on_after_backward(self) -> None:
        """DDP: the regularisers' own parameters live outside the wrapped model, so average
        their gradients across processes here."""
        dist = _dist()
        if dist is None or self.regularisation is None:
            return
        world = dist.get_world_size()
        for parameter in self.regularisation.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
            parameter.grad /= world

    def on_train_epoch_end(self) -> None:
        epoch = int(self.current_epoch)
        for name, parameter in self.model.named_parameters():
            if not torch.isfinite(parameter).all():
                raise NonFiniteLossError(
                    f"weight {name} became NaN/inf during epoch {epoch}; stopped before saving "
                    f"it{self._checkpoint_hint()}; lower --lr or --weight"
                )
        if self.regularisation is not None and self._world() > 1:
            self._merge_recorded(epoch)
        keys = list(self._term_sums)
        loss, ce, term, correct, count, labelled, *terms = _all_reduce_sum(
            [*self._sums, *(self._term_sums[key] for key in keys)]
        )
        count, labelled = max(count, 1.0), max(labelled, 1.0)
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": loss / count,
            "ce": ce / count,
            "lcc": term / count,
            "train_top1": correct / labelled,
            "seconds": time.perf_counter() - self._epoch_start,
            "cpu_seconds": time.process_time() - self._epoch_cpu_start,
            "refresh_seconds": self._refresh_seconds,
            "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
        }
        if (self.regularisation is not None and len(self.regularisation.keys) > 1) or any(
            key != "lcc" for key in keys
        ):
            record["terms"] = {key: value / count for key, value in zip(keys, terms, strict=True)}
        if self.regularisation is not None:
            stats = {
                key: reg.epoch_stats()
                for key, reg in self.regularisation.items()
                if not isinstance(reg, LCC) and reg.epoch_stats()
            }
            if stats:
                record["regulariser_stats"] = stats
        if self._refresh_stats is not None:
            record["refresh"] = {
                name: {key: stats.get(key) for key in _REPORTED}
                for name, stats in self._refresh_stats.items()
            }
        self.history = [r for r in self.history if r["epoch"] < epoch] + [record]
        numbers = {
            f"train/{k}": float(v)
            for k, v in record.items()
            if k not in ("refresh", "terms", "regulariser_stats")
        }
        numbers.update({f"train/term/{k}": float(v) for k, v in record.get("terms", {}).items()})
        self.log_dict(numbers, on_step=False, on_epoch=True, logger=True)
        if self.report and self.trainer.is_global_zero and not self.trainer.progress_bar_callback:
            print(_epoch_line(record, self.trainer.max_epochs), file=sys.stderr, flush=True)

    def _check_finite(self, loss: Tensor, ce: Tensor, term: Tensor, batch_idx: int) -> None:
        bad = not bool(torch.isfinite(loss.detach()))
        if self._world() > 1:
            bad = _all_reduce_sum([float(bad)])[0] > 0
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.current_epoch}, batch {batch_idx} (cross-entropy "
                f"{float(ce.detach()):.4g}, regularisers {float(term.detach()):.4g}); stopped"
                f"{self._checkpoint_hint()}; lower --lr or --weight"
            )

    def _checkpoint_hint(self) -> str:
        if self.out_dir is None:
            return ""
        last = self.out_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return f"; the last good checkpoint is kept: {last}"
        return " (no checkpoint was saved yet)"

    # --- refresh -----------------------------------------------------------------------------

    def _refresh(self, epoch: int, due: list[str]) -> tuple[Collected | None, dict[str, Any]]:
        """Collect (sharded under DDP), compute once on rank 0, broadcast, install everywhere."""
        regs = self.regularisation
        assert regs is not None
        world = self._world()
        layers = regs.training_layers(due)
        collected: Collected | None = None
        if world == 1:
            collected = regs.collect(self._plain_loader(), keys=due)
        else:
            gap = regs.recorded_gap(layers) if regs.source == "recorded" else "fresh"
            if gap is None:
                collected = regs.collect(None, keys=due) if self.trainer.is_global_zero else None
            else:
                collected = self._collect_fresh_sharded(layers, gap)
        outcome: Any = None
        if self.trainer.is_global_zero:
            assert collected is not None
            try:
                outcome = regs.compute(collected, epoch=epoch, keys=due)
            except Exception as error:  # every rank must leave the broadcast below
                outcome = ("error", type(error).__name__, str(error))
                if world == 1:
                    raise
        outcome = _broadcast(outcome)
        if isinstance(outcome, tuple):
            kind, message = outcome[1], outcome[2]
            if kind == "LCCInputError":
                raise LCCInputError(message)
            raise RuntimeError(f"the refresh failed on rank 0: {kind}: {message}")
        states: dict[str, Any] = outcome
        regs.install(states)
        if world > 1:
            digest = np.frombuffer(_states_digest(states).encode(), dtype=np.uint8)
            digests = all_gather_rows(digest)
            if any(not np.array_equal(d, digests[0]) for d in digests):
                raise RuntimeError("ranks installed different refresh states; please report this")
        return collected, states

    def _plain_loader(self, rows: np.ndarray | None = None) -> DataLoader:
        if self.refresh_data is None:
            raise LCCInputError(
                "the fresh latent pass needs refresh_data (the non-augmented training set)"
            )
        if rows is not None:
            dataset: Dataset = _Shard(self.refresh_data, rows)
        elif getattr(self.refresh_data, "yields_index", False):
            dataset = self.refresh_data  # already (x, y, index), e.g. lcc.zoo.labels.MaskedLabels
        else:
            dataset = IndexedDataset(self.refresh_data)
        return DataLoader(
            dataset,
            batch_size=self.refresh_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def _collect_fresh_sharded(self, layers: list[str], reason: str) -> Collected:
        """Eval pass over this rank's shard ``rank::world``, all-gathered into index order."""
        regs = self.regularisation
        assert regs is not None
        start = time.perf_counter()
        self._sync_buffers()
        rank, world, n = int(self.global_rank), int(self.trainer.world_size), self.n_train
        rows = np.arange(rank, n, world)
        latents, y, predictions = collect_latents(
            self.model,
            self._plain_loader(rows),
            layers,
            pool=regs.pool,  # type: ignore[arg-type]
            device=self.device,
        )
        full: dict[str, np.ndarray] = {}
        for name in layers:
            parts = all_gather_rows(latents[name])
            full[name] = np.empty((n, parts[0].shape[1]), dtype=np.float32)
            for r, part in enumerate(parts):
                full[name][r::world] = part
        labels = np.empty(n, dtype=np.int64)
        predicted = np.empty(n, dtype=np.int64)
        for r, part in enumerate(all_gather_rows(np.stack([y, predictions], axis=1))):
            labels[r::world], predicted[r::world] = part[:, 0], part[:, 1]
        source = "fresh" if reason == "fresh" else f"fresh (fallback: {reason})"
        return Collected(
            latents=full,
            y=labels,
            predictions=predicted,
            source=source,
            seconds=time.perf_counter() - start,
        )

    def _merge_recorded(self, epoch: int) -> None:
        """DDP, recorded source: share the rows each rank recorded this epoch with all ranks."""
        regs = self.regularisation
        assert regs is not None
        layers = regs.recording_layers(epoch)
        if regs.source != "recorded" or not layers:
            return
        buffers = regs.recorded
        if buffers["recorded_at"] is None:
            return
        rows = np.flatnonzero(self._seen & (buffers["recorded_at"] == epoch))
        gathered_rows = all_gather_rows(rows)
        meta = np.stack([buffers["predictions"][rows], buffers["labels"][rows]], axis=1)
        gathered_meta = all_gather_rows(meta)
        gathered = {name: all_gather_rows(buffers["latents"][name][rows]) for name in layers}
        for r in reversed(range(len(gathered_rows))):  # lowest rank written last: it wins
            index = gathered_rows[r]
            buffers["predictions"][index] = gathered_meta[r][:, 0]
            buffers["labels"][index] = gathered_meta[r][:, 1]
            buffers["recorded_at"][index] = epoch
            for name in layers:
                buffers["latents"][name][index] = gathered[name][r]

    def _write_refresh(
        self, epoch: int, collected: Collected | None, states: Mapping[str, Any]
    ) -> None:
        """Rank 0: log the per-layer stats, append them to refreshes.jsonl, save the clusters."""
        flat: dict[str, float] = {"epoch": float(epoch)}
        for name, stats in _layer_stats(states).items():
            for key in _REPORTED:
                value = stats.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[f"refresh/{name}/{key}"] = float(value)
            for stage, seconds in (stats.get("seconds") or {}).items():
                flat[f"refresh/{name}/seconds_{stage}"] = float(seconds)
        for logger in self.loggers:
            logger.log_metrics(flat, step=int(self.global_step))
        if self.out_dir is None:
            return
        from lcc.io import atomic_write, read_jsonl_tolerant, save_npz_atomic

        journal = self.out_dir / "refreshes.jsonl"
        # keep earlier epochs only (a resumed run rewrites its epoch; a torn last line is dropped)
        lines = [
            json.dumps(record, default=_json_value)
            for record in read_jsonl_tolerant(journal)
            if record.get("epoch", -1) < epoch
        ]
        for key, state in states.items():
            for name, stats in (getattr(state, "stats", None) or {}).items():
                record = {"epoch": epoch, "layer": name, **stats}
                if key != "lcc":
                    record["regulariser"] = key
                lines.append(json.dumps(record, default=_json_value))
        data = ("\n".join(lines) + "\n").encode("utf-8")
        atomic_write(journal, lambda handle: handle.write(data))
        folder = self.out_dir / "refresh"
        folder.mkdir(parents=True, exist_ok=True)
        for key, state in states.items():
            if not isinstance(state, RefreshState):
                continue
            prefix = "" if key == "lcc" else f"{_safe_name(key)}_"
            for name, layer in state.layers.items():
                arrays: dict[str, np.ndarray] = {
                    "clusters": layer.clusters,
                    "target_indices": layer.target_indices,
                }
                if self.save_latents and collected is not None:
                    arrays["z"] = collected.latents[name]
                    arrays["y"] = collected.y
                path = folder / f"epoch_{epoch}_{prefix}{_safe_name(name)}.npz"
                save_npz_atomic(path, **arrays)

    # --- test --------------------------------------------------------------------------------

    def _sync_buffers(self) -> None:
        """DDP: BatchNorm running statistics drift apart per rank (each updates them with its
        own batches); give every rank rank 0's, which are the ones checkpointed."""
        dist = _dist()
        if dist is not None:
            for buffer in self.model.buffers():
                dist.broadcast(buffer.data, src=0)

    def on_test_epoch_start(self) -> None:
        self._sync_buffers()
        self._test_sums = np.zeros(4)  # loss*B, top1, top5, count

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        self._test_sums += (
            float(loss),
            float(hits[:, 0].sum()),
            float(hits.any(1).sum()),
            float(y.shape[0]),
        )

    def on_test_epoch_end(self) -> None:
        loss, top1, top5, count = _all_reduce_sum(self._test_sums)
        count = max(count, 1.0)
        self.test_metrics = {
            "test_loss": loss / count,
            "test_top1": top1 / count,
            "test_top5": top5 / count,
            "test_samples": count,
        }
        self.log_dict({f"test/{k[5:]}": v for k, v in self.test_metrics.items()}, logger=True)

    # --- checkpoints -------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        regs = self.regularisation
        checkpoint["regularisation"] = None if regs is None else regs.state_dict()
        checkpoint["lcc_history"] = self.history
        checkpoint["epoch_in_progress"] = self._epoch_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("regularisation")
        if self.regularisation is not None and saved is not None:
            self.regularisation.load_state_dict(saved)
        self.history = list(checkpoint.get("lcc_history") or [])
        self._mid_epoch = checkpoint.get("epoch_in_progress")

    def _epoch_state(self) -> dict[str, Any]:
        """What the epoch in progress has accumulated (for a mid-epoch checkpoint)."""
        stats = self._refresh_stats
        return {
            # the epoch the counts belong to: a stop right after an epoch ends (Lightning's
            # current_epoch already moved on) must not read as the next epoch's progress
            "epoch": int(self.batches_epoch),
            "batches": int(self.batches_done),
            "sums": torch.from_numpy(self._sums.copy()),
            "term_sums": dict(self._term_sums),
            "seen": torch.from_numpy(self._seen.copy()),
            "seconds": time.perf_counter() - self._epoch_start,
            "cpu_seconds": time.process_time() - self._epoch_cpu_start,
            "refresh_seconds": self._refresh_seconds,
            "refresh_stats": None
            if stats is None
            else {name: {key: s.get(key) for key in _REPORTED} for name, s in stats.items()},
        }

    def _resume_mid_epoch(self) -> bool:
        """Continue the epoch a mid-epoch checkpoint stopped in: restore what it accumulated
        and skip the epoch-start work (refreshes, regulariser hooks) already done."""
        state, self._mid_epoch = self._mid_epoch, None
        if not state or state["epoch"] != int(self.current_epoch) or state["batches"] <= 0:
            return False
        self.batches_done = int(state["batches"])
        self.batches_epoch = int(state["epoch"])
        self._sums[:] = state["sums"].numpy()
        self._term_sums = dict(state["term_sums"])
        self._seen[:] = state["seen"].numpy()
        self._epoch_start = time.perf_counter() - float(state["seconds"])
        self._epoch_cpu_start = time.process_time() - float(state["cpu_seconds"])
        self._refresh_seconds = float(state["refresh_seconds"])
        self._refresh_stats = state["refresh_stats"]
        if self.regularisation is not None:
            self.regularisation.epoch = int(self.current_epoch)
        return True


def _layer_stats(states: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-layer refresh statistics of all states ({layer: stats}; ``key/layer`` on clashes)."""
    merged: dict[str, dict[str, Any]] = {}
    for key, state in states.items():
        for name, stats in (getattr(state, "stats", None) or {}).items():
            merged[name if name not in merged else f"{key}/{name}"] = stats
    return merged


_REPORTED = (
    "n_clusters",
    "misclustered_fraction",
    "correctible_fraction",
    "modularity",
    "accuracy",
    "accuracy_cc",
    "accuracy_mc",
    "source",
)


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, Tensor)):
        return value.tolist()
    return str(value)


def _epoch_line(record: dict[str, Any], max_epochs: int | None) -> str:
    total = f"/{max_epochs}" if max_epochs else ""
    terms = record.get("terms")
    named = ", ".join(f"{key} {value:.4f}" for key, value in terms.items()) if terms else ""
    total_term = f"{record['lcc']:.4f}"
    regs = f"regularisers {total_term}; unweighted {named}" if terms else f"LCC {total_term}"
    text = (
        f"epoch {record['epoch'] + 1}{total}: loss {record['loss']:.4f} "
        f"(CE {record['ce']:.4f}, {regs}), train top-1 "
        f"{100 * record['train_top1']:.2f}%, {record['seconds']:.1f} s"
    )
    if record.get("refresh"):
        parts = [
            f"{name}: {stats['n_clusters']} clusters, "
            f"MC {100 * stats['misclustered_fraction']:.1f}%"
            for name, stats in record["refresh"].items()
        ]
        text += f" (refresh {record['refresh_seconds']:.1f} s; {'; '.join(parts)})"
    return text
