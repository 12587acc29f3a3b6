"""Where a refresh's dense work (k-NN, PCA, targets) runs, and how latents get there.

:func:`resolve_device` turns the ``device`` keyword of :func:`lcc.engine.refresh.refresh` (and of
``knn``, ``fit_pca``, ``exact_targets``, ``approximate_targets``) into ``None`` -- the CPU path:
NumPy, faiss when installed -- or a ``torch.device`` for the torch path, which runs the same
blocked matrix products + ``topk`` on that device (:mod:`lcc.engine.exact_search`):

- ``None`` or ``"auto"``: where the latents are (a CUDA tensor: its GPU; anything else: the CPU
  path);
- ``"cpu"``: the CPU path; ``"cuda"`` / ``"cuda:N"``: that GPU (an :class:`LCCInputError` on a
  machine without CUDA).

``backend="torch"`` sends the CPU path through the torch code too (on CPU tensors): that is how
the tests check, on a machine without a GPU, the code the GPU runs.

:func:`place_rows` copies latents to the device when they take at most half of its free memory
(``torch.cuda.mem_get_info``), else into pinned host memory, from which the searches stream
them in chunks; it says so in one line on stderr.

>>> resolve_device(None, np.zeros((2, 2))) is None
True
>>> resolve_device("cpu", np.zeros((2, 2)), backend="torch")
device(type='cpu')
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from lcc.engine.exact_search import BLOCK_ENTRIES
from lcc.errors import LCCInputError

__all__ = [
    "DEVICES",
    "Placed",
    "block_entries",
    "empty_rows",
    "full_precision",
    "place_rows",
    "resolve_device",
    "rows_of",
    "shrinking_blocks",
]

#: Values of the ``device`` keyword (``"cuda:N"`` is accepted too).
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Share of the free GPU memory the latents may take on the device; above it they stay in
#: pinned host memory and are streamed.
DEVICE_SHARE = 0.5
#: Share of the free GPU memory (after the latents) one distance block may take.
BLOCK_SHARE = 0.125
#: Largest distance block on a GPU, in float32 entries (4 GiB).
MAX_GPU_BLOCK_ENTRIES = 1 << 30
#: Rows converted at once while latents are copied, checked or projected chunk by chunk.
CHUNK_ENTRIES = 1 << 24

_NO_CUDA = "CUDA is not available on this machine; use --refresh-device cpu"
#: Tries of :func:`shrinking_blocks`, each with a quarter of the previous block.
_OOM_RETRIES = 4

T = TypeVar("T")


def resolve_device(
    device: object, z: object = None, *, backend: str = "auto"
) -> torch.device | None:
    """``None`` for the CPU path, else the ``torch.device`` the torch path runs on.

    >>> resolve_device("auto", torch.zeros(2, 2)) is None
    True
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: device='tpu' is not one of 'auto', 'cpu', 'cuda' (or 'cuda:N')
    """
    text = "auto" if device is None else str(device) if isinstance(device, torch.device) else device
    if not isinstance(text, str):
        raise LCCInputError(f"device must be a string such as 'cuda', got {device!r}")
    if text == "auto":
        target = z.device if isinstance(z, torch.Tensor) and z.device.type == "cuda" else None
    elif text == "cpu":
        target = None
    elif text == "cuda" or text.startswith("cuda:"):
        target = _cuda_device(text)
    else:
        raise LCCInputError(
            f"device={device!r} is not one of {', '.join(map(repr, DEVICES))} (or 'cuda:N')"
        )
    return torch.device("cpu") if target is None and backend == "torch" else target


def _cuda_device(text: str) -> torch.device:
    if not torch.cuda.is_available():
        raise LCCInputError(_NO_CUDA)
    try:
        target = torch.device(text)
    except RuntimeError:
        raise LCCInputError(f"device={text!r} is not a valid CUDA device name") from None
    count = torch.cuda.device_count()
    if target.index is not None and target.index >= count:
        raise LCCInputError(
            f"device={text!r} but this machine has {count} CUDA device(s); "
            f"use cuda:0 to cuda:{count - 1}"
        )
    index = torch.cuda.current_device() if target.index is None else target.index
    return torch.device("cuda", index)


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` in bytes (the host's is not limited here: ``2**62``)."""
    return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 1 << 62


def block_entries(device: torch.device) -> int:
    """Entries of one distance block on ``device``: 64 MiB on the CPU; on a GPU an eighth of
    its free memory, at most 4 GiB."""
    if device.type != "cuda":
        return BLOCK_ENTRIES
    share = int(BLOCK_SHARE * free_bytes(device)) // 4
    return max(BLOCK_ENTRIES, min(MAX_GPU_BLOCK_ENTRIES, share))


@dataclass(frozen=True)
class Placed:
    """Float32 ``(N, D)`` rows and where they are: on ``device`` (``resident``), or in pinned
    host memory, streamed ``chunk_rows`` rows at a time."""

    rows: torch.Tensor
    device: torch.device
    chunk_rows: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, D)``."""
        return (int(self.rows.shape[0]), int(self.rows.shape[1]))

    @property
    def resident(self) -> bool:
        """Whether the rows are on the device."""
        return self.rows.device.type == self.device.type

    def base_rows(self) -> int | None:
        """``base_rows`` for :func:`lcc.engine.exact_search.torch_search_tensors`."""
        return None if self.resident else self.chunk_rows


def rows_of(z: object) -> int:
    """Number of rows of latents ``z``."""
    return int(z.shape[0])  # type: ignore[attr-defined]


def place_rows(
    z: object, device: torch.device, *, what: str = "latents", copy: bool = True
) -> Placed:
    """A float32 copy of the ``(N, D)`` rows of ``z`` on ``device`` when it fits, else pinned.

    ``z`` may be a NumPy array (a memory map too: it is read chunk by chunk) or a tensor on any
    device. With ``copy`` (the default) the result never shares memory with ``z`` (callers
    prepare it in place); ``copy=False`` takes a float32 tensor already on ``device`` (or
    pinned) as it is. Falling back to pinned host memory prints one line on stderr.
    """
    n = rows_of(z)
    width = int(np.prod(z.shape[1:]))  # type: ignore[attr-defined]
    chunk = max(1, CHUNK_ENTRIES // max(1, width))
    if not copy and isinstance(z, torch.Tensor) and z.dtype == torch.float32:
        rows = z.detach().reshape(n, width)
        if rows.device.type == device.type:
            return Placed(rows, device, n)
        if device.type == "cuda" and rows.is_pinned():
            return Placed(rows, device, _streamed_rows(device, width))
    if device.type != "cuda":
        if isinstance(z, torch.Tensor):
            rows = z.detach().reshape(n, width).to("cpu", torch.float32, copy=True)
            return Placed(rows, device, n)
        array = np.array(np.asarray(z).reshape(n, width), dtype=np.float32, order="C")
        return Placed(torch.from_numpy(array), device, n)
    out = empty_rows(n, width, device, what=what)
    if not out.is_cuda:
        chunk = _streamed_rows(device, width)
    for start, part in iterate_rows(z, CHUNK_ENTRIES):
        out[start : start + part.shape[0]] = part.to(out.device, torch.float32, non_blocking=True)
    return Placed(out, device, chunk)


def empty_rows(n: int, width: int, device: torch.device, *, what: str = "latents") -> torch.Tensor:
    """An uninitialised float32 ``(n, width)`` tensor on ``device`` when it takes at most
    :data:`DEVICE_SHARE` of the free memory there, else in pinned host memory (one line on
    stderr says so).

    >>> empty_rows(3, 2, torch.device("cpu")).shape
    torch.Size([3, 2])
    """
    if device.type != "cuda":
        return torch.empty((n, width), dtype=torch.float32)
    need = n * width * 4
    free = free_bytes(device)
    if need <= DEVICE_SHARE * free:
        return torch.empty((n, width), dtype=torch.float32, device=device)
    _say_once(
        f"lcc refresh: the {what} ({need / 2**30:.1f} GiB) do not fit in the free GPU "
        f"memory ({free / 2**30:.1f} GiB); streaming them from pinned host memory in chunks"
    )
    return torch.empty((n, width), dtype=torch.float32, pin_memory=True)


def _streamed_rows(device: torch.device, width: int) -> int:
    """Rows of a base chunk streamed to ``device``: a share of its free memory."""
    return max(1, int(BLOCK_SHARE * free_bytes(device)) // (4 * max(1, width)))


_last_said: list[str] = []


def _say_once(line: str) -> None:
    """Print ``line`` on stderr unless it is the line printed last (one line per refresh)."""
    if _last_said != [line]:
        _last_said[:] = [line]
        print(line, file=sys.stderr, flush=True)


def iterate_rows(z: object, entries: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, rows)`` chunks of about ``entries`` values of ``z`` (NumPy or tensor), as
    tensors where they are (NumPy chunks become CPU tensors; a memory map is read a chunk at a
    time)."""
    n = rows_of(z)
    width = int(np.prod(z.shape[1:]))  # type: ignore[attr-defined]
    step = max(1, entries // max(1, width))
    for start in range(0, n, step):
        if isinstance(z, torch.Tensor):
            yield start, z[start : start + step].detach().reshape(-1, width)
        else:
            part = np.asarray(z[start : start + step]).reshape(-1, width)  # type: ignore[index]
            yield start, torch.from_numpy(np.ascontiguousarray(part))


def shrinking_blocks(run: Callable[[int], T], entries: int, device: torch.device) -> T:
    """``run(entries)``; if the GPU runs out of memory, again with a quarter of the block (one
    line on stderr says so), and after :data:`_OOM_RETRIES` tries an :class:`LCCInputError`
    that names the fix instead of a CUDA traceback.

    >>> def search(entries):
    ...     if entries > 100:
    ...         raise torch.OutOfMemoryError("CUDA out of memory")
    ...     return entries
    >>> shrinking_blocks(search, 1_000, torch.device("cpu"))
    62
    """
    for _ in range(_OOM_RETRIES):
        try:
            return run(entries)
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            entries = max(1, entries // 4)
            _say_once(
                f"lcc refresh: the GPU ran out of memory; searching again in blocks of "
                f"{entries:,} distances"
            )
    try:
        return run(entries)
    except torch.OutOfMemoryError:
        raise LCCInputError(
            f"the GPU ran out of memory in the refresh even with blocks of {entries:,} "
            "distances; free GPU memory or use --refresh-device cpu"
        ) from None


@contextmanager
def full_precision() -> Iterator[None]:
    """float32 matrix products in full precision (no TF32) inside the block: a TF32 distance
    picks other neighbours, as a bfloat16 one does."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
