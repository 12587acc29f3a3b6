"""Common corruptions of test images (Hendrycks & Dietterich 2019) and their error measures.

The corruptions come from ``imagecorruptions`` (the benchmark's code, packaged; the
``imagecorruptions-imaug`` fork, which runs on today's NumPy, scikit-image and setuptools):
the benchmark's 15 types (``COMMON``, over which the mean corruption error is defined) and its
4 held-out validation types (``EXTRA``), severities 1-5. The library refuses images under 32
pixels a side and works in RGB, so:

- images smaller than 32 are edge-padded to 32 and cropped back afterwards;
- grey images go in as three equal channels and come back as their ITU-R BT.601 luminance
  (``0.299 R + 0.587 G + 0.114 B``, PIL's ``L``): per-channel independent noise
  (gaussian/shot/impulse/speckle) is averaged by it, its standard deviation about 0.67x of the
  RGB one;
- ``saturate`` does not apply to grey images (a grey pixel has no saturation to change).

Randomness is seeded: each image of a set gets its own seed drawn from
``SeedSequence([seed, type, severity])``, so a corrupted set is reproducible. Corrupted sets are
cached as ``.npz`` (written atomically) under ``CACHE/DATASET/TYPE-sSEVERITY-seedSEED-DIGEST.npz``,
``DIGEST`` a hash of the source images (a different subset is a different file).

Error measures (Hendrycks & Dietterich 2019, sec. 3), from top-1 errors ``E[c][s]`` of type
``c`` at severity ``s``, ``E_clean`` the clean error and ``B`` the baseline's:

- corruption error ``CE_c = sum_s E[c][s] / sum_s B[c][s]``; ``mCE`` = mean over types;
- relative ``rCE_c = sum_s (E[c][s] - E_clean) / sum_s (B[c][s] - B_clean)``; relative mCE =
  mean over types. Both are ratios (1 = as the baseline; the paper prints them x 100).

>>> errors = {"contrast": [0.25, 0.5]}
>>> corruption_errors(errors, {"contrast": [0.5, 0.5]})
{'contrast': 0.75}
>>> relative_corruption_errors(errors, 0.125, {"contrast": [0.5, 0.5]}, 0.25)
{'contrast': 1.0}
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcc.errors import LCCInputError

__all__ = [
    "COMMON",
    "EXTRA",
    "NAMES",
    "SEVERITIES",
    "applicable",
    "cached_corruption",
    "corrupt_images",
    "corruption_errors",
    "default_cache_dir",
    "images_digest",
    "mean_over",
    "parse_corruptions",
    "relative_corruption_errors",
]

#: the benchmark's 15 corruption types, in its order (noise, blur, weather, digital)
COMMON: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
#: its 4 held-out validation types
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
NAMES: tuple[str, ...] = COMMON + EXTRA
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: types that do not apply to grey images, and why
NOT_FOR_GREY: dict[str, str] = {"saturate": "a grey image has no colour saturation to change"}
#: types whose function takes the image seed as an argument (the others use np.random)
_SEEDED = ("impulse_noise", "glass_blur")
_MIN_SIDE = 32
_LUMA = np.array([0.299, 0.587, 0.114])


def applicable(channels: int) -> tuple[str, ...]:
    """Corruption types that apply to images with ``channels`` channels (1 grey, 3 RGB).

    >>> len(applicable(3)), len(applicable(1)), "saturate" in applicable(1)
    (19, 18, False)
    """
    if channels == 1:
        return tuple(name for name in NAMES if name not in NOT_FOR_GREY)
    if channels == 3:
        return NAMES
    raise LCCInputError(f"corruptions need grey (1) or RGB (3) images, got {channels} channels")


def parse_corruptions(text: str | None, channels: int) -> list[str]:
    """``--corruptions`` as a list: ``all`` (every applicable type), ``common`` (the 15 of the
    benchmark), or names; unknown names list the valid ones.

    >>> parse_corruptions("contrast, fog", 1)
    ['contrast', 'fog']
    """
    valid = applicable(channels)
    if text is None or str(text).strip().lower() in ("", "all"):
        return list(valid)
    names: list[str] = []
    for piece in filter(None, (part.strip() for part in str(text).split(","))):
        if piece.lower() == "common":
            names.extend(name for name in COMMON if name in valid)
            continue
        name = piece.lower().replace("-", "_")
        if name not in NAMES:
            import difflib

            close = difflib.get_close_matches(name, list(NAMES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LCCInputError(
                f"unknown corruption {piece!r}{hint}; valid: {', '.join(valid)} (or all, common)"
            )
        if name not in valid:
            raise LCCInputError(
                f"corruption {name!r} does not apply to grey images ({NOT_FOR_GREY[name]}); "
                f"valid here: {', '.join(valid)}"
            )
        names.append(name)
    return list(dict.fromkeys(names))


def images_digest(images: np.ndarray) -> str:
    """A short hash of a uint8 image array (shape included), naming its cached corruptions.

    >>> images_digest(np.zeros((2, 1, 4, 4), np.uint8)) == images_digest(np.zeros((1, 1, 4, 8)))
    False
    """
    digest = hashlib.sha1(repr(tuple(images.shape)).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()[:16]


def _check(images: np.ndarray, name: str, severity: int) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise LCCInputError("corruptions need uint8 images (N, C, H, W)")
    if name not in NAMES:
        raise LCCInputError(f"unknown corruption {name!r}; valid: {', '.join(NAMES)}")
    if name not in applicable(images.shape[1]):
        raise LCCInputError(f"corruption {name!r} does not apply: {NOT_FOR_GREY[name]}")
    if severity not in SEVERITIES:
        raise LCCInputError(f"severity must be one of 1..5, got {severity!r}")


def _import_library() -> Any:
    try:
        import imagecorruptions
    except ImportError as error:
        raise LCCInputError(
            f"corruptions need the imagecorruptions package ({error}); install it with "
            "`pip install -c constraints.txt -e '.[robustness]'` (imagecorruptions-imaug)"
        ) from None
    return imagecorruptions


def corrupt_images(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (N, C, H, W) uint8, grey or RGB, corrupted with ``name`` at ``severity``;
    same shape and dtype; NumPy's global random state is left as it was."""
    _check(images, name, severity)
    library = _import_library()
    n, channels, height, width = images.shape
    pad_h, pad_w = max(0, _MIN_SIDE - height), max(0, _MIN_SIDE - width)
    pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    sequence = np.random.SeedSequence([int(seed), NAMES.index(name), int(severity)])
    seeds = np.random.default_rng(sequence).integers(0, 2**31 - 1, size=n)
    out = np.empty_like(images)
    state = np.random.get_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(n):
                image = np.pad(images[i].transpose(1, 2, 0), (*pads, (0, 0)), mode="edge")
                if channels == 1:
                    image = np.repeat(image, 3, axis=2)
                np.random.seed(int(seeds[i]))
                extra = {"seed": int(seeds[i])} if name in _SEEDED else {}
                result = library.corrupt(image, severity=severity, corruption_name=name, **extra)
                result = np.asarray(result, dtype=np.float64)
                if channels == 1:
                    result = (result @ _LUMA)[..., None]
                result = result[pads[0][0] : pads[0][0] + height, pads[1][0] : pads[1][0] + width]
                out[i] = np.clip(np.rint(result), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    finally:
        np.random.set_state(state)
    return out


def default_cache_dir() -> Path:
    """``$LCC_DATA_DIR/corruptions``, else ``~/.cache/lcc/corruptions``."""
    root = os.environ.get("LCC_DATA_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lcc") / "corruptions"


def cached_corruption(
    images: np.ndarray,
    name: str,
    severity: int,
    *,
    seed: int = 0,
    dataset: str = "dataset",
    cache_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """:func:`corrupt_images`, read from / written to the on-disk cache (see the module doc).

    A cache file that cannot be read or holds other shapes is computed and written again.
    """
    from lcc.io import save_npz_atomic

    _check(images, name, severity)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder.expanduser() / re.sub(r"[^A-Za-z0-9._-]+", "_", dataset)
    file = folder / f"{name}-s{severity}-seed{seed}-{images_digest(images)}.npz"
    if file.is_file():
        try:
            with np.load(file, allow_pickle=False) as archive:
                cached = archive["images"]
            if cached.shape == images.shape and cached.dtype == np.uint8:
                return cached
        except (OSError, ValueError, KeyError):
            pass  # damaged: computed again below
    corrupted = corrupt_images(images, name, severity, seed)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LCCInputError(
            f"cannot create the corruption cache {folder}: {error.strerror or error}; "
            "pass --cache-dir DIR"
        ) from None
    save_npz_atomic(file, images=corrupted)
    return corrupted


def _sums(errors: Mapping[str, Sequence[float]], name: str, shift: float = 0.0) -> float:
    return float(sum(float(e) - shift for e in errors[name]))


def corruption_errors(
    errors: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]]
) -> dict[str, float | None]:
    """``CE_c = sum_s E[c][s] / sum_s B[c][s]`` for each type ``c`` of ``errors`` (None where the
    baseline never errs on that type)."""
    out: dict[str, float | None] = {}
    for name in errors:
        if name not in baseline or len(baseline[name]) != len(errors[name]):
            raise LCCInputError(f"the baseline has no errors for {name!r} at the same severities")
        denominator = _sums(baseline, name)
        out[name] = _sums(errors, name) / denominator if denominator > 0 else None
    return out


def relative_corruption_errors(
    errors: Mapping[str, Sequence[float]],
    clean_error: float,
    baseline: Mapping[str, Sequence[float]],
    baseline_clean_error: float,
) -> dict[str, float | None]:
    """``rCE_c = sum_s (E[c][s] - E_clean) / sum_s (B[c][s] - B_clean)`` (None where the
    corruption does not degrade the baseline: a zero denominator)."""
    out: dict[str, float | None] = {}
    for name in errors:
        if name not in baseline or len(baseline[name]) != len(errors[name]):
            raise LCCInputError(f"the baseline has no errors for {name!r} at the same severities")
        denominator = _sums(baseline, name, baseline_clean_error)
        numerator = _sums(errors, name, clean_error)
        out[name] = numerator / denominator if denominator != 0 else None
    return out


def mean_over(values: Mapping[str, float | None], names: Sequence[str] = COMMON) -> float | None:
    """Mean of ``values`` over the types of ``names`` it holds (H&D average the 15 ``COMMON``
    types); None when one of them is undefined or none is present.

    >>> mean_over({"fog": 0.5, "contrast": 1.0, "saturate": 9.0})
    0.75
    """
    present = [values[name] for name in names if name in values]
    if not present or any(value is None for value in present):
        return None
    return float(np.mean([float(value) for value in present]))  # type: ignore[arg-type]
