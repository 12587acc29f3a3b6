"""Errors raised for bad input, and the checks that raise them.

Every check fails with an :class:`LCCInputError` whose message names the problem
and the fix, so that callers (and the CLI) never surface a traceback from deep
inside NumPy, faiss or igraph.

>>> import numpy as np
>>> check_k(5, n_samples=3)
Traceback (most recent call last):
...
lcc.errors.LCCInputError: k=5 must be smaller than the number of samples (3); choose k <= 2
"""

from __future__ import annotations

import math

import numpy as np


class LCCInputError(ValueError):
    """Bad input to an lcc function: the message says what is wrong and how to fix it."""


def as_latent_matrix(z: object, *, name: str = "z", checked: bool = False) -> np.ndarray:
    """Return latents as a C-contiguous float32 (N, D) matrix, trailing dims flattened.

    Rows holding NaN or inf are rejected unless ``checked`` says that the caller has already
    scanned ``z`` (:func:`check_finite`: a refresh scans its latents once, at its entry).

    >>> as_latent_matrix(np.zeros((4, 2, 3))).shape
    (4, 6)
    """
    if _is_tensor(z):
        z = z.detach().cpu().float().numpy()  # type: ignore[attr-defined]
    array = np.asarray(z)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise LCCInputError(f"{name} must be a numeric array, got dtype {array.dtype}")
    if array.ndim < 2:
        raise LCCInputError(
            f"{name} must have shape (N, d, ...) with one row per sample, got shape {array.shape}"
        )
    if array.shape[0] < 2:
        raise LCCInputError(f"{name} has {array.shape[0]} sample(s); at least 2 are needed")
    matrix = np.ascontiguousarray(array.reshape(array.shape[0], -1), dtype=np.float32)
    if matrix.shape[1] == 0:
        raise LCCInputError(f"{name} has latent dimension 0; pass non-empty latents")
    if not checked:
        check_finite(matrix, name=name)
    return matrix


def check_finite(z: object, *, name: str = "z", chunk_entries: int = 1 << 22) -> None:
    """Raise :class:`LCCInputError` naming the rows of ``z`` (N, ...) that hold NaN or inf.

    ``z`` is a NumPy array (a memory map too) or a torch tensor on any device; it is read in
    chunks of about ``chunk_entries`` values, so it is never converted as a whole.

    >>> check_finite(np.array([[0.0, 1.0], [np.inf, 0.0]]))
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: z contains NaN or inf in 1 row(s) (first: [1]); check the model \
for diverging activations or drop those samples
    """
    n = int(z.shape[0])  # type: ignore[attr-defined]
    width = max(1, int(np.prod(z.shape[1:])))  # type: ignore[attr-defined]
    step = max(1, chunk_entries // width)
    bad = []
    for start in range(0, n, step):
        part = z[start : start + step]  # type: ignore[index]
        if _is_tensor(part):
            rows = part.reshape(part.shape[0], -1).isfinite().all(dim=1).logical_not()
            if bool(rows.any()):
                bad.append(start + np.flatnonzero(rows.cpu().numpy()))
        else:
            finite = np.isfinite(np.asarray(part).reshape(part.shape[0], -1)).all(axis=1)
            if not finite.all():
                bad.append(start + np.flatnonzero(~finite))
    if bad:
        rows = np.concatenate(bad)
        raise LCCInputError(
            f"{name} contains NaN or inf in {rows.size} row(s) (first: {rows[:5].tolist()}); "
            "check the model for diverging activations or drop those samples"
        )


def _is_tensor(value: object) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(value, torch.Tensor)


def as_label_vector(y: object, n_samples: int, *, name: str = "y") -> np.ndarray:
    """Return labels as an int64 vector of length ``n_samples``; any non-negative ints allowed.

    >>> as_label_vector([3, 7, 42], 3).tolist()
    [3, 7, 42]
    """
    if _is_tensor(y):
        y = y.detach().cpu().numpy()  # type: ignore[attr-defined]
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise LCCInputError(f"{name} must be a 1-D label vector, got shape {labels.shape}")
    if labels.shape[0] != n_samples:
        raise LCCInputError(
            f"{name} has {labels.shape[0]} labels but there are {n_samples} samples; "
            "pass one label per latent row"
        )
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or not np.equal(np.mod(labels, 1), 0).all():
            raise LCCInputError(f"{name} must hold integer class labels, got non-integer values")
    elif not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise LCCInputError(f"{name} must hold integer class labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise LCCInputError(f"{name} must hold non-negative class labels, got {labels.min()}")
    return labels


def check_k(k: int, n_samples: int | None = None) -> int:
    """Validate the neighbour count ``k``: an integer >= 1, below ``n_samples`` when given."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise LCCInputError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise LCCInputError(f"k={k} must be at least 1 (a positive integer)")
    if n_samples is not None and k >= n_samples:
        raise LCCInputError(
            f"k={k} must be smaller than the number of samples ({n_samples}); "
            f"choose k <= {n_samples - 1}"
        )
    return int(k)


def check_choice(value: str, choices: tuple[str, ...], *, name: str) -> str:
    """Validate that ``value`` is one of ``choices``."""
    if value not in choices:
        raise LCCInputError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def check_integer(value: object, name: str, low: int) -> int:
    """``value`` as an int ``>= low`` (numeric strings accepted), else LCCInputError."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise LCCInputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_number(value: object, name: str, low: float | None = None) -> float:
    """``value`` as a finite float (``>= low`` when given), else LCCInputError."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise LCCInputError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise LCCInputError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or (low is not None and number < low):
        bound = "" if low is None else f" >= {low:g}"
        raise LCCInputError(f"{name} must be a finite number{bound}, got {value!r}")
    return number


def check_count(value: int, *, name: str, minimum: int) -> int:
    """Validate an integer option such as ``seed``, ``max_iterations`` or ``patience``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise LCCInputError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise LCCInputError(f"{name}={value} must be at least {minimum}")
    return int(value)
