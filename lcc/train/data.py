"""Data order that depends only on ``(seed, epoch)``, and training loaders that resume mid-epoch.

:class:`EpochSampler` orders (and, under DDP, shards) the training set by ``(seed, epoch)``
alone and seeds the global RNGs from ``(seed, epoch, rank)`` when an epoch starts, so a run
resumed from an end-of-epoch checkpoint replays exactly; :class:`ResumableLoader` stores the
position in the epoch in a mid-epoch checkpoint. :class:`LCCDataModule` builds the train and
test loaders of a :class:`lcc.zoo.datasets.DatasetBundle` from them.

>>> list(EpochSampler(6, seed=0, shuffle=False, rank=1, world_size=2))
[1, 3, 5]
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from lcc.errors import LCCInputError
from lcc.zoo.datasets import IndexedDataset

__all__ = [
    "EpochSampler",
    "LCCDataModule",
    "ResumableLoader",
    "ResumePoint",
    "epoch_seed",
    "preserved_rng",
    "rng_state",
    "seed_rngs",
    "set_rng_state",
]


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

        order: dict[str, Any]
        if self.train is not None:  # labelled and unlabelled samples in every batch
            dataset, batches = self.train, self._mixed_batches(rank, world)
            order = {
                "batch_sampler": _EpochBatches(batches, seed=self.seed, rank=rank, epoch_fn=epoch)
            }
        else:
            dataset = IndexedDataset(self.bundle.train)
            sampler = EpochSampler(
                len(self.bundle.train),
                seed=self.seed,
                rank=rank,
                world_size=world,
                epoch_fn=epoch,
                reseed=True,
            )
            order = {"batch_size": self.batch_size, "sampler": sampler}
        return ResumableLoader(
            dataset,
            progress_fn=progress,
            num_workers=self.num_workers,
            persistent_workers=False,
            **order,
        )

    def _mixed_batches(self, rank: int, world: int) -> Any:
        from lcc.zoo.labels import MixedBatchSampler

        return MixedBatchSampler(
            self.train.labeled_indices,
            self.train.unlabeled_indices,
            self.batch_size,
            ratio=self.labeled_ratio,
            seed=self.seed,
            num_replicas=world,
            rank=rank,
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
