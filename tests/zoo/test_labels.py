"""Few labels: the stratified seeded split, its file, the masked dataset, unlabelled image sets
and the mixed batch sampler."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lcc.errors import LCCInputError
from lcc.zoo.datasets import load_dataset
from lcc.zoo.labels import (
    MaskedLabels,
    MixedBatchSampler,
    UnlabeledImages,
    load_split,
    save_split,
    split_labeled,
)

TARGETS = np.repeat(np.arange(5), [300, 200, 150, 100, 50])


def test_fraction_split_is_stratified_and_sums_to_the_fraction() -> None:
    for fraction in (0.01, 0.05, 0.333, 1.0):
        mask = split_labeled(TARGETS, fraction=fraction, seed=2)
        per_class = np.bincount(TARGETS[mask], minlength=5)
        sizes = np.bincount(TARGETS)
        assert abs(int(mask.sum()) - round(fraction * TARGETS.size)) <= 1
        assert (np.abs(per_class - fraction * sizes) < 1 + 1e-9).all()
        assert (per_class >= 1).all()


def test_per_class_split_counts_and_seed() -> None:
    mask = split_labeled(TARGETS, per_class=8, seed=0)
    assert np.bincount(TARGETS[mask]).tolist() == [8] * 5
    assert np.array_equal(mask, split_labeled(TARGETS, per_class=8, seed=0))
    assert not np.array_equal(mask, split_labeled(TARGETS, per_class=8, seed=1))
    bigger = split_labeled(TARGETS, per_class=32, seed=0)
    assert not (mask & ~bigger).any()  # nested: 8 per class are among the 32 of one seed
    rows = [np.flatnonzero(mask & np.equal(TARGETS, c)) for c in range(5)]
    assert all(r.max() - r.min() > 8 for r in rows)  # drawn at random, not the first ones


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.0}, r"in \(0, 1\]"),
        ({"fraction": 1.5}, r"in \(0, 1\]"),
        ({"fraction": float("nan")}, "finite"),
        ({"fraction": 0.004}, "for 5 classes"),
        ({"per_class": 51}, "class 4 holds"),
        ({"per_class": 0}, ">= 1"),
        ({}, "exactly one"),
        ({"fraction": 0.1, "per_class": 3}, "exactly one"),
    ],
)
def test_split_errors_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(LCCInputError, match=message) as error:
        split_labeled(TARGETS, **kwargs)
    assert "\n" not in str(error.value)


def test_split_file_round_trip_and_mismatch(tmp_path) -> None:
    mask = split_labeled(TARGETS, fraction=0.1, seed=3)
    path = save_split(tmp_path / "split.npz", mask)
    assert np.array_equal(load_split(path, n_samples=TARGETS.size), mask)
    with pytest.raises(LCCInputError, match="covers 800 samples"):
        load_split(path, n_samples=900)
    with pytest.raises(LCCInputError, match="not found"):
        load_split(tmp_path / "missing.npz")
    with pytest.raises(LCCInputError, match="bool mask"):
        save_split(tmp_path / "bad.npz", mask.astype(int))


def test_masked_labels_hide_unlabelled_targets_and_append_a_set() -> None:
    base = [(torch.full((2,), float(i)), int(TARGETS[i])) for i in range(10)]
    extra = [(torch.full((2,), -float(i)), 99) for i in range(3)]
    mask = np.zeros(10, dtype=bool)
    mask[[1, 4, 7]] = True
    data = MaskedLabels(base, mask, unlabeled=extra)
    assert len(data) == 13
    items = [data[i] for i in range(13)]
    assert [y for _, y, _ in items] == [-1, 0, -1, -1, 0, -1, -1, 0, -1, -1, -1, -1, -1]
    assert [i for _, _, i in items] == list(range(13))
    assert torch.equal(items[11][0], extra[1][0])
    order = [12, 4, 0, 10, 7]
    batch = data.__getitems__(order)
    assert [(y, i) for _, y, i in batch] == [(items[i][1], i) for i in order]
    assert all(torch.equal(x, items[i][0]) for (x, _, _), i in zip(batch, order, strict=True))
    assert data.labeled_indices.tolist() == [1, 4, 7]
    assert data.unlabeled_indices.tolist() == [0, 2, 3, 5, 6, 8, 9, 10, 11, 12]
    with pytest.raises(LCCInputError, match="length 10"):
        MaskedLabels(base, mask[:5])


def write_images(folder, count: int, size: tuple[int, int], mode: str = "L") -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(count):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode).save(sub / f"{i:03d}.png")
        arrays.append(array)
    return arrays


def test_unlabelled_folder_is_normalised_like_the_labelled_set(tmp_path) -> None:
    like = load_dataset("digits", subset=50)
    write_images(tmp_path / "pool", 6, (8, 8))
    images = UnlabeledImages.load(str(tmp_path / "pool"), like)
    assert len(images) == 6 and images.targets.tolist() == [-1] * 6
    raw = images.images[2:3]
    expected = like.train_plain.__class__(raw, torch.zeros(1), like.mean, like.std)[0][0]
    assert torch.equal(images[2][0], expected)
    subset = UnlabeledImages.load(f"folder:{tmp_path / 'pool'}", like, subset=4, seed=1)
    assert len(subset) == 4
    from_spec = UnlabeledImages.load("digits", like)
    assert len(from_spec) > 1000 and (from_spec.targets == -1).all()


@pytest.mark.parametrize(("size", "mode"), [((9, 8), "L"), ((8, 8), "RGB")])
def test_unlabelled_images_of_another_shape_are_one_clear_error(tmp_path, size, mode) -> None:
    like = load_dataset("digits", subset=50)
    write_images(tmp_path / "pool", 2, size, mode)
    with pytest.raises(LCCInputError, match="convert them to the same size") as error:
        UnlabeledImages.load(str(tmp_path / "pool"), like)
    assert "\n" not in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LCCInputError, match="holds no images"):
        UnlabeledImages.load(str(tmp_path / "empty"), like)


def test_mixed_batches_have_the_ratio_and_cover_the_longer_set() -> None:
    labeled, unlabeled = np.arange(0, 40), np.arange(40, 1000)
    sampler = MixedBatchSampler(labeled, unlabeled, batch_size=32, ratio=0.25, seed=7)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(960 / 24)
    for batch in batches:
        assert len(batch) == 32 and sum(i < 40 for i in batch) == 8
    seen = Counter(i for batch in batches for i in batch if i >= 40)
    assert set(seen) == set(unlabeled.tolist())  # one pass over the unlabelled set
    assert sum(seen.values()) - 960 < 24
    used = Counter(i for batch in batches for i in batch if i < 40)
    assert max(used.values()) - min(used.values()) <= 1  # labelled set cycled evenly


def test_mixed_batches_are_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[list[int]]:
        sampler = MixedBatchSampler(range(10), range(10, 50), batch_size=8, ratio=0.5, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    only = MixedBatchSampler(range(10), [], batch_size=4, ratio=0.5)
    assert len(only) == 3 and sorted({i for b in only for i in b}) == list(range(10))


def test_replicas_share_out_the_batches() -> None:
    args = (range(10), range(10, 70), 6, 0.5, 0)
    whole = list(MixedBatchSampler(*args))
    parts = [list(MixedBatchSampler(*args, num_replicas=3, rank=r)) for r in range(3)]
    assert len(whole) == 20 and all(len(p) == 7 for p in parts)  # 21: a multiple of 3
    together = [b for i in range(7) for b in (parts[0][i], parts[1][i], parts[2][i])]
    assert together[:20] == whole


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([], [1, 2], 4, 0.5), "no labelled samples"),
        (([1, 2], [2, 3], 4, 0.5), "both labelled and unlabelled"),
        (([1, 2], [3], 4, 0.0), r"in \(0, 1\]"),
        (([1, 2], [3], 1, 0.5), "batch size >= 2"),
        (([1, 1], [3], 4, 0.5), "twice"),
    ],
)
def test_sampler_errors(args: tuple, message: str) -> None:
    with pytest.raises(LCCInputError, match=message):
        MixedBatchSampler(*args)


def test_a_dataloader_serves_mixed_batches_and_whole_set_latents() -> None:
    from torch.utils.data import DataLoader

    from lcc.zoo.latents import collect_latents

    like = load_dataset("digits", subset=200)
    mask = split_labeled(like.targets, per_class=2, seed=0)
    extra = UnlabeledImages.load("digits", like, subset=50, augment=False)
    data = MaskedLabels(like.train_plain, mask, unlabeled=extra)
    sampler = MixedBatchSampler(data.labeled_indices, data.unlabeled_indices, 16, 0.25, seed=1)
    for x, y, index in DataLoader(data, batch_sampler=sampler):
        assert x.shape == (16, 1, 8, 8)
        assert ((y >= 0) == torch.as_tensor(np.isin(index.numpy(), data.labeled_indices))).all()
        assert int((y >= 0).sum()) == 4
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    loader = DataLoader(data, batch_size=64)
    latents, y, _ = collect_latents(model, loader, ["1"])
    assert latents["1"].shape == (250, 10)
    assert np.array_equal(y, data.targets) and int((y >= 0).sum()) == 20


@pytest.mark.parametrize("damage", ["not an image", "truncated"])
def test_an_unreadable_unlabelled_image_is_named(tmp_path, damage) -> None:
    like = load_dataset("digits", subset=50)
    write_images(tmp_path / "pool", 4, (8, 8))
    bad = tmp_path / "pool" / "a" / "001.png"
    data = bad.read_bytes()
    bad.write_bytes(b"junk" * 10 if damage == "not an image" else data[: len(data) // 2])
    with pytest.raises(LCCInputError) as caught:
        UnlabeledImages.load(f"folder:{tmp_path / 'pool'}", like)
    assert str(caught.value).startswith(f"cannot read image {bad}: ")
    assert "\n" not in str(caught.value)


def test_unlabelled_folder_specs_that_name_nothing_are_clear(tmp_path, monkeypatch) -> None:
    like = load_dataset("digits", subset=50)
    with pytest.raises(LCCInputError) as caught:
        UnlabeledImages.load(f"folder:{tmp_path / 'missing'}", like)
    message = str(caught.value)
    assert f"unlabeled folder {tmp_path / 'missing'} does not exist" in message
    assert "needs no class subfolders" in message and "one subfolder per class" not in message
    write_images(tmp_path / "pool", 2, (8, 8))
    monkeypatch.chdir(tmp_path)  # `folder:` must not scan the current directory
    for spec in ("folder:", "folder:  ", ""):
        with pytest.raises(LCCInputError, match="names no folder or dataset"):
            UnlabeledImages.load(spec, like)
