"""Common corruptions: every type changes the images and keeps shape and dtype, seeded, cached;
CE / mCE / relative mCE against Hendrycks & Dietterich's formulas computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lcc.analysis.corruptions import (
    COMMON,
    EXTRA,
    applicable,
    cached_corruption,
    corrupt_images,
    corruption_errors,
    mean_over,
    parse_corruptions,
    relative_corruption_errors,
)
from lcc.errors import LCCInputError

pytest.importorskip("imagecorruptions")


def grey(n: int = 3, side: int = 28, seed: int = 0) -> np.ndarray:
    """Digit-like grey images: a bright blob on a dark background."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, side, side), np.uint8)
    quarter = side // 4
    images[:, :, quarter:-quarter, quarter:-quarter] = 200
    return np.clip(images + rng.integers(0, 30, images.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", applicable(1))
def test_every_grey_type_changes_the_images_and_keeps_shape_and_dtype(name: str) -> None:
    images = grey()
    out = corrupt_images(images, name, 3, seed=0)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)


def test_rgb_and_small_images() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (2, 3, 32, 32)).astype(np.uint8)
    small = grey(2, side=8)
    for images in (rgb, small):
        for name in ("saturate", "frost", "zoom_blur") if images.shape[1] == 3 else ("fog",):
            out = corrupt_images(images, name, 5, seed=0)
            assert out.shape == images.shape and out.dtype == np.uint8
            assert not np.array_equal(out, images)


def test_seeded_and_leaves_numpy_global_state_alone() -> None:
    images = grey(4)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = corrupt_images(images, "gaussian_noise", 2, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(first, corrupt_images(images, "gaussian_noise", 2, seed=7))
    assert not np.array_equal(first, corrupt_images(images, "gaussian_noise", 2, seed=8))
    for name in ("impulse_noise", "glass_blur"):  # seeded through their own argument
        assert np.array_equal(corrupt_images(images, name, 1), corrupt_images(images, name, 1))


def test_severity_raises_the_change() -> None:
    images = grey(4)
    change = [
        np.abs(corrupt_images(images, "gaussian_noise", s).astype(float) - images).mean()
        for s in (1, 5)
    ]
    assert change[1] > 2 * change[0]


def test_cache_is_read_back_and_rewritten_when_damaged(tmp_path) -> None:
    images = grey(3)
    first = cached_corruption(images, "contrast", 2, seed=0, dataset="toy", cache_dir=tmp_path)
    files = list((tmp_path / "toy").glob("contrast-s2-seed0-*.npz"))
    assert len(files) == 1 and np.array_equal(first, corrupt_images(images, "contrast", 2))
    np.savez(files[0], images=np.full_like(images, 9))  # a planted cache entry is what is read
    assert (cached_corruption(images, "contrast", 2, dataset="toy", cache_dir=tmp_path) == 9).all()
    files[0].write_bytes(b"torn")
    again = cached_corruption(images, "contrast", 2, dataset="toy", cache_dir=tmp_path)
    assert np.array_equal(again, first)
    other = cached_corruption(images[:2], "contrast", 2, dataset="toy", cache_dir=tmp_path)
    assert other.shape[0] == 2 and len(list((tmp_path / "toy").glob("*.npz"))) == 2


def test_ce_mce_and_relative_mce_by_hand() -> None:
    """A made-up table of top-1 errors at severities 1..3 (H&D 2019, sec. 3)."""
    model = {"fog": [0.20, 0.30, 0.40], "contrast": [0.15, 0.25, 0.50]}
    base = {"fog": [0.25, 0.40, 0.55], "contrast": [0.20, 0.20, 0.40]}
    clean, base_clean = 0.10, 0.12
    ce = corruption_errors(model, base)
    assert ce["fog"] == pytest.approx((0.20 + 0.30 + 0.40) / (0.25 + 0.40 + 0.55))
    assert ce["contrast"] == pytest.approx(0.90 / 0.80)
    assert mean_over(ce) == pytest.approx((0.9 / 1.2 + 0.9 / 0.8) / 2)
    relative = relative_corruption_errors(model, clean, base, base_clean)
    fog = (0.10 + 0.20 + 0.30) / (0.13 + 0.28 + 0.43)
    contrast = (0.05 + 0.15 + 0.40) / (0.08 + 0.08 + 0.28)
    assert relative["fog"] == pytest.approx(fog)
    assert relative["contrast"] == pytest.approx(contrast)
    assert mean_over(relative) == pytest.approx((fog + contrast) / 2)
    assert mean_over({**ce, "saturate": 5.0}) == mean_over(ce)  # not one of the 15
    assert corruption_errors({"fog": [0.1]}, {"fog": [0.0]}) == {"fog": None}


def test_names_and_bad_input() -> None:
    assert len(COMMON) == 15 and len(EXTRA) == 4
    assert parse_corruptions(None, 1) == list(applicable(1))
    assert parse_corruptions("common", 3) == list(COMMON)
    assert parse_corruptions("Gaussian-Noise,fog", 1) == ["gaussian_noise", "fog"]
    with pytest.raises(
        LCCInputError,
        match=r"unknown corruption 'fogg' \(did you mean 'fog'\?\); valid: gaussian_noise",
    ):
        parse_corruptions("fogg", 1)
    with pytest.raises(LCCInputError, match="does not apply to grey images"):
        parse_corruptions("saturate", 1)
    with pytest.raises(LCCInputError, match="uint8"):
        corrupt_images(np.zeros((1, 1, 28, 28), np.float32), "fog", 1)
    with pytest.raises(LCCInputError, match="severity"):
        corrupt_images(grey(1), "fog", 6)
