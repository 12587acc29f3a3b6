"""Reading latents from disk and writing results atomically.

:func:`load_latents` reads ``z`` (N, ...) and ``y`` (N,) from a ``.npz`` or ``.safetensors``
file, or from a ``.npy`` pair (see :func:`load_npy_pair`: a directory holding ``z.npy`` and
``y.npy``, or a latents ``.npy`` plus a labels ``.npy``), turning every failure (missing file,
corrupt file, unknown extension, missing key, wrong dtype, mismatched lengths) into an
:class:`~lcc.errors.LCCInputError` that names the file. ``.npy`` latents are memory-mapped
read-only (float16 or float32 stay as stored, nothing is copied through a zip archive), so
1.28M x 512 latents cost no RAM until they are read.

The writers (:func:`atomic_write`, :func:`save_npz_atomic`, :func:`save_npy_atomic`,
:func:`write_json_atomic`, and :func:`npy_memmap_atomic` for arrays filled in chunks) write to
a temporary file in the destination directory, flush it to disk and rename it over the
destination, so a reader never sees a half-written file and a crash leaves the previous
version intact.

>>> import tempfile, pathlib, numpy as np
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> path = save_npz_atomic(folder / "latents.npz", z=np.ones((3, 2)), y=np.array([0, 1, 1]))
>>> z, y = load_latents(path)
>>> z.shape, y.tolist()
((3, 2), [0, 1, 1])
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from lcc.errors import LCCInputError

__all__ = [
    "LATENT_FORMATS",
    "NPY_LABELS",
    "NPY_LATENTS",
    "atomic_write",
    "load_arrays",
    "load_latents",
    "load_npy_pair",
    "npy_memmap_atomic",
    "save_npy_atomic",
    "save_npz_atomic",
    "write_json_atomic",
]

#: File name suffixes :func:`load_arrays` reads.
LATENT_FORMATS: tuple[str, ...] = (".npz", ".safetensors")
#: File names of the latents and labels in a ``.npy`` pair directory.
NPY_LATENTS = "z.npy"
NPY_LABELS = "y.npy"
#: Latent dtypes a ``.npy`` pair may hold (read as stored, memory-mapped).
NPY_LATENT_DTYPES: tuple[str, ...] = ("float16", "float32", "float64")


def load_latents(
    path: str | os.PathLike[str], *, labels: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read latents ``z`` and labels ``y`` from a ``.npz``/``.safetensors`` file or a ``.npy`` pair.

    ``path`` is a ``.npz`` or ``.safetensors`` file with keys ``z`` and ``y``; or a directory
    holding ``z.npy`` and ``y.npy``; or a latents ``.npy`` file, with ``labels`` naming the
    labels ``.npy`` (see :func:`load_npy_pair`). Arrays are returned as stored (not yet
    validated: :func:`lcc.engine.refresh.refresh` checks them); ``.npy`` latents come back as a
    read-only memory map; bfloat16 latents from a safetensors file come back as float32.
    """
    file = Path(path)
    if file.is_dir() or file.suffix.lower() == ".npy":
        return load_npy_pair(file, labels)
    if labels is not None:
        raise LCCInputError(
            f"labels={labels} applies to .npy latents only; {file} holds its own y array"
        )
    arrays = load_arrays(path, keys=("z", "y"))
    return arrays["z"], arrays["y"]


def load_npy_pair(
    path: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Latents (memory-mapped, read-only) and labels from a pair of ``.npy`` files.

    ``path`` is either a directory holding ``z.npy`` (N, ...) and ``y.npy`` (N,), or the
    latents ``.npy`` itself, with ``labels`` the labels ``.npy`` (``labels`` also overrides a
    directory's ``y.npy``). Latents must be float16, float32 or float64 and are returned as a
    ``numpy.memmap`` in their stored dtype; labels must be integers and are read into memory.
    Object arrays are never unpickled.

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_npy_atomic(folder / "z.npy", np.ones((3, 2), np.float16))
    >>> _ = save_npy_atomic(folder / "y.npy", np.array([0, 1, 1]))
    >>> z, y = load_npy_pair(folder)
    >>> z.dtype.name, z.shape, y.tolist()
    ('float16', (3, 2), [0, 1, 1])
    """
    source = Path(path)
    if source.is_dir():
        latents_file = source / NPY_LATENTS
        labels_file = Path(labels) if labels is not None else source / NPY_LABELS
        if not latents_file.is_file():
            raise LCCInputError(
                f"directory {source} has no {NPY_LATENTS}; put the latents there as {NPY_LATENTS} "
                f"and the labels as {NPY_LABELS}"
            )
    elif source.suffix.lower() == ".npy":
        latents_file = source
        if labels is None:
            raise LCCInputError(
                f"{source} holds latents only; pass the labels .npy too (lcc cluster: "
                f"--labels Y.npy), or pass a directory holding {NPY_LATENTS} and {NPY_LABELS}"
            )
        labels_file = Path(labels)
    else:
        raise LCCInputError(f"cannot read {source} as a .npy pair: expected a directory or a .npy")
    if not latents_file.exists():
        raise LCCInputError(f"file not found: {latents_file}; check the path")
    if not labels_file.is_file():
        raise LCCInputError(
            f"labels file not found: {labels_file}; save the labels (N,) integers as "
            f"{labels_file.name if labels_file.suffix == '.npy' else NPY_LABELS}"
        )
    z = _open_npy(latents_file, mmap=True)
    if z.dtype.name not in NPY_LATENT_DTYPES:
        raise LCCInputError(
            f"{latents_file} holds {z.dtype} values; latents must be float16 or float32 "
            "(save them with z.astype(np.float32))"
        )
    if z.ndim < 2:
        raise LCCInputError(
            f"{latents_file} has shape {z.shape}; latents must have shape (N, d, ...) with one "
            "row per sample"
        )
    y = np.asarray(_open_npy(labels_file, mmap=False))
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise LCCInputError(
            f"{labels_file} holds {y.dtype} values; labels must be integers "
            "(save them with y.astype(np.int64))"
        )
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise LCCInputError(
            f"{labels_file} has shape {y.shape} but {latents_file} has {z.shape[0]} rows; "
            "pass one label per latent row, shape (N,)"
        )
    return z, y


def _open_npy(file: Path, *, mmap: bool) -> np.ndarray:
    """``np.load`` of one ``.npy`` (memory-mapped read-only when ``mmap``), never unpickling."""
    if file.is_dir():
        raise LCCInputError(f"cannot read {file}: it is a directory, not a .npy file")
    try:
        with file.open("rb") as handle:
            magic = handle.read(6)
        if magic != b"\x93NUMPY":
            raise LCCInputError(
                f"cannot read {file}: not a .npy file (corrupt or another format); "
                "write it with numpy.save"
            )
        if mmap:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        else:
            array = np.load(file, allow_pickle=False)
    except LCCInputError:
        raise
    except ValueError as error:
        if "pickle" in str(error) or "object" in str(error):
            raise LCCInputError(
                f"cannot read {file}: it holds Python objects (an object array); save numeric "
                "arrays only"
            ) from error
        raise LCCInputError(f"cannot read {file} as .npy: {_reason(error)}") from error
    except Exception as error:  # OSError, truncated data, bad header...
        raise LCCInputError(f"cannot read {file} as .npy: {_reason(error)}") from error
    return array


def load_arrays(path: str | os.PathLike[str], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read the named arrays from a ``.npz`` or ``.safetensors`` file, or raise LCCInputError.

    >>> load_arrays("missing.npz", keys=("z",))
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: file not found: missing.npz; check the path
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in LATENT_FORMATS:
        raise LCCInputError(
            f"cannot read {file}: unknown file type {suffix or '(no extension)'!r}; "
            f"save the latents as {' or '.join(LATENT_FORMATS)} with keys {', '.join(keys)}"
        )
    if not file.exists():
        raise LCCInputError(f"file not found: {file}; check the path")
    if file.is_dir():
        raise LCCInputError(f"cannot read {file}: it is a directory, not a {suffix} file")
    reader = _read_npz if suffix == ".npz" else _read_safetensors
    return reader(file, keys)


def _read_npz(file: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        if not zipfile.is_zipfile(file):
            raise LCCInputError(
                f"cannot read {file}: not a .npz archive (corrupt or another format); "
                "write it with numpy.savez"
            )
        with np.load(file, allow_pickle=False) as archive:
            _check_keys(file, keys, list(archive.files))
            return {key: np.asarray(archive[key]) for key in keys}
    except LCCInputError:
        raise
    except Exception as error:  # OSError, BadZipFile, zlib.error, ValueError (object arrays)...
        raise LCCInputError(f"cannot read {file} as .npz: {_reason(error)}") from error


def _read_safetensors(file: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        import torch
        from safetensors import safe_open
    except ImportError as error:  # pragma: no cover - safetensors is a dependency
        raise LCCInputError(
            f"cannot read {file}: the safetensors package is missing; pip install safetensors"
        ) from error
    try:
        with safe_open(str(file), framework="pt") as handle:
            _check_keys(file, keys, list(handle.keys()))
            tensors = {key: handle.get_tensor(key) for key in keys}
    except LCCInputError:
        raise
    except Exception as error:  # SafetensorError, OSError: corrupt header, truncated data, ...
        raise LCCInputError(f"cannot read {file} as .safetensors: {_reason(error)}") from error
    arrays = {}
    for key, tensor in tensors.items():
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        arrays[key] = tensor.numpy()
    return arrays


def _check_keys(file: Path, wanted: tuple[str, ...], present: list[str]) -> None:
    missing = [key for key in wanted if key not in present]
    if missing:
        found = ", ".join(repr(key) for key in sorted(present)) or "none"
        raise LCCInputError(
            f"{file} is missing key(s) {', '.join(repr(key) for key in missing)} "
            f"(keys found: {found}); save the arrays under the keys {', '.join(wanted)}"
        )


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    The destination's directory must exist. Any ``OSError`` (missing directory, no permission,
    destination is a directory, disk full) becomes an :class:`LCCInputError` naming ``path``;
    the temporary file is removed on failure. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise LCCInputError(
            f"cannot write {target}: directory {directory} does not exist; create it first"
        )
    if target.is_dir():
        raise LCCInputError(f"cannot write {target}: it is a directory; pass a file name")
    try:
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, renamed on success
            mode="wb", dir=directory, prefix=f".{target.name}.", suffix=".tmp", delete=False
        )
    except OSError as error:
        raise LCCInputError(f"cannot write {target}: {_os_reason(error)}") from error
    temporary = Path(handle.name)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode(target))
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(error, OSError):
            raise LCCInputError(f"cannot write {target}: {_os_reason(error)}") from error
        raise
    _fsync_directory(directory)
    return target


def save_npz_atomic(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """Write ``arrays`` to an uncompressed ``.npz`` at exactly ``path``, atomically.

    >>> import tempfile, pathlib
    >>> out = save_npz_atomic(pathlib.Path(tempfile.mkdtemp()) / "a.npz", x=np.arange(3))
    >>> np.load(out)["x"].tolist()
    [0, 1, 2]
    """
    if not arrays:
        raise LCCInputError("save_npz_atomic needs at least one array")
    return atomic_write(path, lambda handle: np.savez(handle, **arrays))


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write one array to a ``.npy`` at exactly ``path``, atomically (never pickled).

    >>> import tempfile, pathlib
    >>> out = save_npy_atomic(pathlib.Path(tempfile.mkdtemp()) / "a.npy", np.arange(3))
    >>> np.load(out).tolist()
    [0, 1, 2]
    """
    data = np.asarray(array)
    return atomic_write(path, lambda handle: np.save(handle, data, allow_pickle=False))


@contextlib.contextmanager
def npy_memmap_atomic(
    path: str | os.PathLike[str], shape: tuple[int, ...], dtype: Any
) -> Iterator[np.memmap]:
    """A writable memory-mapped ``.npy`` of ``shape`` and ``dtype``, renamed to ``path`` on success.

    Fill it in chunks inside the ``with`` block; on normal exit it is flushed, fsynced and
    renamed over ``path`` (readers never see a half-written file), on an exception the
    temporary file is removed and ``path`` is untouched. The array must not be used after the
    block.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "z.npy"
    >>> with npy_memmap_atomic(out, (4, 2), np.float16) as z:
    ...     z[:2], z[2:] = 1.0, 2.0
    >>> np.load(out).tolist()
    [[1.0, 1.0], [1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise LCCInputError(
            f"cannot write {target}: directory {directory} does not exist; create it first"
        )
    if target.is_dir():
        raise LCCInputError(f"cannot write {target}: it is a directory; pass a file name")
    try:
        descriptor, name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
        os.close(descriptor)
    except OSError as error:
        raise LCCInputError(f"cannot write {target}: {_os_reason(error)}") from error
    temporary = Path(name)
    try:
        array = np.lib.format.open_memmap(
            temporary, mode="w+", dtype=np.dtype(dtype), shape=tuple(int(s) for s in shape)
        )
        yield array
        array.flush()
        del array
        with temporary.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode(target))
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(error, OSError):
            raise LCCInputError(f"cannot write {target}: {_os_reason(error)}") from error
        raise
    _fsync_directory(directory)


def write_json_atomic(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path``, atomically.

    NumPy scalars and arrays are converted to plain Python values.

    >>> import tempfile, pathlib
    >>> out = write_json_atomic(pathlib.Path(tempfile.mkdtemp()) / "a.json", {"x": np.int64(3)})
    >>> json.loads(out.read_text())
    {'x': 3}
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default)
    data = (text + "\n").encode("utf-8")
    return atomic_write(path, lambda handle: handle.write(data))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _os_reason(error: OSError) -> str:
    reason = error.strerror or str(error)
    return f"{reason}; choose a writable location"


def _file_mode(target: Path) -> int:
    """Permissions for the new file: the old file's if it exists, else 0o666 minus the umask."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _fsync_directory(directory: Path) -> None:
    """Persist the rename (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
