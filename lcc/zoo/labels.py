"""Training with few labels: a seeded labelled/unlabelled split, and batches that mix both.

* :func:`split_labeled` keeps a stratified, seeded part of the labels (``fraction`` of each
  class, or ``per_class`` samples of each); the splits of one seed are nested (8 labels per
  class are among the 32 of the same seed). :func:`save_split` / :func:`load_split` keep it in
  the run directory.
* :class:`MaskedLabels` serves ``(x, y, index)`` with ``y = -1`` for unlabelled samples, and can
  append a separate unlabelled set (:class:`UnlabeledImages`: any dataset spec, or a folder of
  images without classes).
* :class:`MixedBatchSampler` yields batches with a fixed share of labelled samples, in an order
  that depends only on ``(seed, epoch)``.

>>> mask = split_labeled(np.array([0, 0, 0, 0, 1, 1, 1, 1]), per_class=1, seed=0)
>>> int(mask.sum()), sorted(np.array([0, 0, 0, 0, 1, 1, 1, 1])[mask].tolist())
(2, [0, 1])
>>> data = MaskedLabels([("a", 0), ("b", 1)], np.array([True, False]))
>>> data[0], data[1]
(('a', 0, 0), ('b', -1, 1))
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lcc.errors import LCCInputError, as_label_vector, check_integer, check_number
from lcc.io import load_arrays, save_npz_atomic
from lcc.zoo.datasets import (
    GRAY_MODES,
    IMAGE_SUFFIXES,
    DatasetBundle,
    ImageTensorDataset,
    largest_remainder,
    load_dataset,
    open_image,
    pil_to_array,
)

__all__ = [
    "UNLABELED",
    "MaskedLabels",
    "MixedBatchSampler",
    "UnlabeledImages",
    "load_split",
    "save_split",
    "split_labeled",
]

#: the label of an unlabelled sample
UNLABELED = -1


# --------------------------------------------------------------------------- the split


def split_labeled(
    targets: np.ndarray,
    *,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """(N,) bool mask of the samples that keep their label: stratified and seeded.

    Exactly one of ``fraction`` (in (0, 1]: ``round(fraction * N)`` labels shared over the
    classes in proportion to their sizes, largest remainders first, at least one each) or
    ``per_class`` (that many of each class). Each class's samples are shuffled once by
    ``seed`` and the first ones kept, so the masks of one seed are nested.

    >>> y = np.repeat([0, 1, 2], [50, 30, 20])
    >>> mask = split_labeled(y, fraction=0.1, seed=1)
    >>> np.bincount(y[mask]).tolist()
    [5, 3, 2]
    """
    array = np.asarray(targets)
    labels = as_label_vector(array, array.shape[0] if array.ndim else 0)
    if (fraction is None) == (per_class is None):
        raise LCCInputError("give exactly one of --labeled-fraction or --labels-per-class")
    seed = check_integer(seed, "seed", low=0)
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size == 0:
        raise LCCInputError("there are no training labels to split")
    if fraction is not None:
        value = check_number(fraction, "labeled fraction")
        if not 0.0 < value <= 1.0:
            raise LCCInputError(f"labeled fraction must be in (0, 1], got {fraction!r}")
        total = round(value * labels.size)
        if total < classes.size:
            raise LCCInputError(
                f"labeled fraction {value:g} of {labels.size} samples gives {total} label(s) for "
                f"{classes.size} classes; use at least {classes.size / labels.size:.3g} or "
                "--labels-per-class"
            )
        quota = np.clip(largest_remainder(counts, total), 1, counts)
    else:
        share = check_integer(per_class, "labels per class", low=1)
        smallest = int(np.argmin(counts))
        if share > counts[smallest]:
            raise LCCInputError(
                f"labels per class {share} is more than class {classes[smallest]} holds "
                f"({counts[smallest]} samples); use at most {counts[smallest]}"
            )
        quota = np.full(classes.size, share)
    rng = np.random.default_rng(seed)
    mask = np.zeros(labels.size, dtype=bool)
    for label, keep in zip(classes, quota, strict=True):
        mask[rng.permutation(np.flatnonzero(labels == label))[:keep]] = True
    return mask


def save_split(path: str | os.PathLike[str], mask: np.ndarray) -> Path:
    """Write the labelled mask to ``path`` (``.npz``, key ``labeled``), atomically."""
    array = np.asarray(mask)
    if array.dtype != bool or array.ndim != 1:
        raise LCCInputError(f"the split must be a 1-D bool mask, got {array.dtype} {array.shape}")
    return save_npz_atomic(path, labeled=array)


def load_split(path: str | os.PathLike[str], n_samples: int | None = None) -> np.ndarray:
    """Read a mask written by :func:`save_split`; ``n_samples`` checks it fits the dataset."""
    mask = load_arrays(path, keys=("labeled",))["labeled"]
    if mask.dtype != bool or mask.ndim != 1:
        raise LCCInputError(f"{path} holds no labelled mask (1-D bool); write it with save_split")
    if n_samples is not None and mask.size != n_samples:
        raise LCCInputError(
            f"the split in {path} covers {mask.size} samples but the training set has "
            f"{n_samples}; use the same dataset and subset, or start a new run"
        )
    return mask


# --------------------------------------------------------------------------- datasets


class UnlabeledImages(ImageTensorDataset):
    """uint8 images (N, C, H, W) served like a labelled set's images, with label -1.

    Build it with :meth:`load`; ``mean``/``std``/``padding`` come from the labelled set so
    both are normalised (and augmented) alike.
    """

    def __init__(
        self,
        images: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        padding: int = 0,
        source: str = "",
    ):
        labels = torch.full((int(images.shape[0]),), UNLABELED, dtype=torch.int64)
        super().__init__(images, labels, mean, std, padding=padding)
        self.source = source

    @classmethod
    def load(
        cls,
        spec: str,
        like: DatasetBundle,
        *,
        root: str | os.PathLike[str] | None = None,
        subset: int | None = None,
        seed: int = 0,
        augment: bool = True,
    ) -> UnlabeledImages:
        """Unlabelled images of ``spec`` shaped and normalised like ``like``'s.

        ``spec``: a folder (``PATH`` or ``folder:PATH``: every image below it, class
        subfolders ignored) or any other dataset spec (its training images, labels dropped).
        ``subset``: a seeded random subset of that size. Images of another shape than
        ``like.input_shape`` -> LCCInputError.
        """
        text = str(spec).strip()
        named = text.lower().startswith("folder:")
        folder = text[len("folder:") :].strip() if named else text
        if not folder:
            raise LCCInputError(
                f"unlabeled set {text!r} names no folder or dataset; pass --unlabeled PATH (a "
                "folder of images) or a dataset spec"
            )
        if (named or os.sep in folder) and not Path(folder).expanduser().is_dir():
            raise LCCInputError(
                f"unlabeled folder {folder} does not exist; pass a folder of images (any layout: "
                "an unlabelled set needs no class subfolders)"
            )
        if Path(folder).expanduser().is_dir():
            images = _folder_images(Path(folder).expanduser(), like.input_shape)
            source = str(Path(folder).expanduser())
        else:
            bundle = load_dataset(text, root=root, augment=False)
            images = getattr(bundle.train_plain, "images", None)
            if not isinstance(images, torch.Tensor):
                raise LCCInputError(f"dataset {text} does not hold images in memory")
            source = bundle.source or text
        shape = tuple(int(v) for v in images.shape[1:])
        if shape != tuple(like.input_shape):
            raise LCCInputError(
                f"unlabeled set {text} has images of shape {shape} but the labelled set "
                f"{like.name} has {tuple(like.input_shape)}; convert them to the same size "
                "and channels"
            )
        if subset is not None:
            size = check_integer(subset, "unlabeled subset", low=1)
            if size < images.shape[0]:
                rows = np.sort(np.random.default_rng(seed).choice(images.shape[0], size, False))
                images = images[torch.as_tensor(rows)]
        padding = getattr(like.train, "padding", 0) if augment else 0
        return cls(images.contiguous(), like.mean, like.std, padding=padding, source=source)

    def without_augmentation(self) -> UnlabeledImages:
        """The same images without the training augmentation (for latents of the whole set)."""
        return UnlabeledImages(self.images, self.mean, self.std, source=self.source)


def _folder_images(folder: Path, shape: Sequence[int]) -> torch.Tensor:
    """Every image below ``folder`` (sorted paths) as uint8 (N, C, H, W); all of ``shape``."""
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LCCInputError(
            f"unlabeled folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    channels, height, width = (int(v) for v in shape)
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for file in files:
        with open_image(file) as image:
            found = (1 if image.mode in GRAY_MODES else 3, image.height, image.width)
            if found != (channels, height, width):
                raise LCCInputError(
                    f"unlabeled image {file} has shape {found} but the labelled set's images "
                    f"have {(channels, height, width)}; convert them to the same size and channels"
                )
            arrays.append(pil_to_array(image, mode, None))
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))


class MaskedLabels(Dataset):
    """``(x, y, index)`` of ``dataset`` with ``y = -1`` where ``labeled_mask`` is False.

    ``unlabeled`` (optional): a dataset appended after it (indices ``len(dataset)`` on), every
    sample unlabelled. ``index`` is the position in this combined dataset.
    """

    #: items are already ``(x, y, index)`` (the trainer does not wrap it in IndexedDataset)
    yields_index = True

    def __init__(self, dataset: Any, labeled_mask: np.ndarray, unlabeled: Any = None):
        mask = np.asarray(labeled_mask)
        if mask.dtype != bool or mask.shape != (len(dataset),):
            raise LCCInputError(
                f"labeled_mask must be a bool mask of length {len(dataset)}, got "
                f"{mask.dtype} {mask.shape}"
            )
        self.dataset = dataset
        self.unlabeled = unlabeled
        self.mask = mask
        self._first = len(dataset)

    def __len__(self) -> int:
        return self._first + (len(self.unlabeled) if self.unlabeled is not None else 0)

    @property
    def labeled_indices(self) -> np.ndarray:
        """Indices of the labelled samples."""
        return np.flatnonzero(self.mask)

    @property
    def unlabeled_indices(self) -> np.ndarray:
        """Indices of the unlabelled samples (the masked ones, then the appended set)."""
        return np.concatenate([np.flatnonzero(~self.mask), np.arange(self._first, len(self))])

    @property
    def targets(self) -> np.ndarray | None:
        """(len,) labels with -1 for unlabelled samples (None if the dataset has no targets)."""
        base = getattr(self.dataset, "targets", None)
        if base is None:
            return None
        labels = np.where(self.mask, np.asarray(base, dtype=np.int64), UNLABELED)
        return np.concatenate([labels, np.full(len(self) - self._first, UNLABELED)])

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        index = int(index)
        if index < 0 or index >= len(self):
            raise IndexError(f"index {index} out of range 0..{len(self) - 1}")
        if index >= self._first:
            return self.unlabeled[index - self._first][0], UNLABELED, index
        x, y = self.dataset[index]
        return x, (int(y) if self.mask[index] else UNLABELED), index

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, int, int]]:
        rows = np.asarray(indices, dtype=np.int64)
        out: list[Any] = [None] * rows.size
        parts = [(self.dataset, 0, self._first)]
        if self.unlabeled is not None:
            parts.append((self.unlabeled, self._first, len(self)))
        for part, offset, end in parts:
            where = np.flatnonzero((rows >= offset) & (rows < end))
            if where.size == 0:
                continue
            local = (rows[where] - offset).tolist()
            fetch = getattr(part, "__getitems__", None)
            pairs = fetch(local) if fetch else [part[i] for i in local]
            for slot, (x, y) in zip(where.tolist(), pairs, strict=True):
                index = int(rows[slot])
                keep = offset == 0 and self.mask[index]
                out[slot] = (x, int(y) if keep else UNLABELED, index)
        if any(item is None for item in out):
            raise IndexError(f"indices out of range 0..{len(self) - 1}")
        return out


# --------------------------------------------------------------------------- batches


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices, ``round(ratio * batch_size)`` of them labelled.

    One epoch is one pass over the set that needs more batches at this ratio (with few labels:
    the unlabelled set); the other set is reshuffled and cycled, and the last batch is
    completed from a fresh shuffle, so every batch has exactly the same share. The order is a
    function of ``(seed, epoch)`` only (call :meth:`set_epoch`), so a resumed run sees the
    same batches. Without unlabelled indices (or ``ratio=1``) batches are labelled only.
    ``num_replicas``/``rank``: each process takes every ``num_replicas``-th batch (all get as
    many; the list is cycled to a multiple).

    >>> sampler = MixedBatchSampler(range(4), range(4, 10), batch_size=4, ratio=0.5, seed=0)
    >>> len(sampler), [sum(i < 4 for i in batch) for batch in sampler]
    (3, [2, 2, 2])
    """

    def __init__(
        self,
        labeled_idx: Sequence[int] | np.ndarray,
        unlabeled_idx: Sequence[int] | np.ndarray,
        batch_size: int,
        ratio: float = 0.5,
        seed: int = 0,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.labeled = _index_array(labeled_idx, "labeled indices")
        self.unlabeled = _index_array(unlabeled_idx, "unlabeled indices")
        if self.labeled.size == 0:
            raise LCCInputError("there are no labelled samples; keep at least one per class")
        if np.intersect1d(self.labeled, self.unlabeled).size:
            raise LCCInputError("a sample is both labelled and unlabelled; pass disjoint indices")
        self.batch_size = check_integer(batch_size, "batch size", low=1)
        self.ratio = check_number(ratio, "labeled ratio")
        if not 0.0 < self.ratio <= 1.0:
            raise LCCInputError(f"labeled ratio must be in (0, 1], got {ratio!r}")
        self.seed = check_integer(seed, "seed", low=0)
        self.num_replicas = check_integer(num_replicas, "num_replicas", low=1)
        self.rank = check_integer(rank, "rank", low=0)
        if self.rank >= self.num_replicas:
            raise LCCInputError(f"rank {rank} must be below num_replicas {num_replicas}")
        self.epoch = 0
        if self.unlabeled.size == 0 or self.ratio == 1.0:
            self.n_labeled = self.batch_size
        else:
            if self.batch_size < 2:
                raise LCCInputError("mixing labelled and unlabelled samples needs batch size >= 2")
            share = round(self.ratio * self.batch_size)
            self.n_labeled = min(max(share, 1), self.batch_size - 1)
        self.n_unlabeled = self.batch_size - self.n_labeled

    @property
    def batches_per_epoch(self) -> int:
        """Batches of all processes together in one epoch."""
        count = math.ceil(self.labeled.size / self.n_labeled)
        if self.n_unlabeled:
            count = max(count, math.ceil(self.unlabeled.size / self.n_unlabeled))
        return math.ceil(count / self.num_replicas) * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order :meth:`__iter__` yields."""
        self.epoch = check_integer(epoch, "epoch", low=0)

    def __len__(self) -> int:
        return self.batches_per_epoch // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        total = self.batches_per_epoch
        labeled = _stream(self.labeled, total * self.n_labeled, [self.seed, self.epoch, 0])
        unlabeled = _stream(self.unlabeled, total * self.n_unlabeled, [self.seed, self.epoch, 1])
        for b in range(self.rank, total, self.num_replicas):
            part = labeled[b * self.n_labeled : (b + 1) * self.n_labeled]
            rest = unlabeled[b * self.n_unlabeled : (b + 1) * self.n_unlabeled]
            yield [*part.tolist(), *rest.tolist()]


def _index_array(values: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values if len(values) else [], dtype=np.int64)
    if array.ndim != 1 or (array.size and array.min() < 0):
        raise LCCInputError(f"{name} must be a 1-D list of non-negative dataset indices")
    if np.unique(array).size != array.size:
        raise LCCInputError(f"{name} hold an index twice; pass each sample once")
    return array


def _stream(indices: np.ndarray, length: int, seed: list[int]) -> np.ndarray:
    """``length`` indices: consecutive shuffles of ``indices`` drawn from ``seed``."""
    if length == 0 or indices.size == 0:
        return indices[:0]
    rng = np.random.default_rng(seed)
    shuffles = [rng.permutation(indices) for _ in range(math.ceil(length / indices.size))]
    return np.concatenate(shuffles)[:length]
