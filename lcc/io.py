"""Reading latents from disk and writing results atomically.

:func:`load_latents` reads ``z`` (N, ...) and ``y`` (N,) from a ``.npz`` or ``.safetensors``
file, turning every failure (missing file, corrupt file, unknown extension, missing key) into
an :class:`~lcc.errors.LCCInputError` that names the file. The writers
(:func:`atomic_write`, :func:`save_npz_atomic`, :func:`write_json_atomic`) write to a temporary
file in the destination directory, flush it to disk and rename it over the destination, so a
reader never sees a half-written file and a crash leaves the previous version intact.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from lcc.errors import LCCInputError

__all__ = [
    "LATENT_FORMATS",
    "array_keys",
    "atomic_write",
    "load_arrays",
    "load_latents",
    "save_npz_atomic",
    "write_json_atomic",
]

#: File name suffixes :func:`load_latents` reads.
LATENT_FORMATS: tuple[str, ...] = (".npz", ".safetensors")


def load_latents(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read latents ``z`` and labels ``y`` from a ``.npz`` or ``.safetensors`` file.

    Arrays are returned as stored (not yet validated: :func:`lcc.engine.refresh.refresh` checks
    them);
    bfloat16 latents from a safetensors file come back as float32.
    """
    arrays = load_arrays(path, keys=("z", "y"))
    return arrays["z"], arrays["y"]


def load_arrays(path: str | os.PathLike[str], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read the named arrays from a ``.npz`` or ``.safetensors`` file, or raise LCCInputError.

    >>> load_arrays("missing.npz", keys=("z",))
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: file not found: missing.npz; check the path
    """
    file = _readable(path, keys)
    reader = _read_npz if file.suffix.lower() == ".npz" else _read_safetensors
    return reader(file, keys)


def array_keys(path: str | os.PathLike[str]) -> list[str]:
    """Names of the arrays in a ``.npz`` or ``.safetensors`` file, in stored order (no data read).

    Raises :class:`LCCInputError` like :func:`load_arrays`.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.npz"
    >>> array_keys(save_npz_atomic(path, z=np.ones(2), y=np.ones(2)))
    ['z', 'y']
    """
    file = _readable(path, ("z", "y"))
    try:
        if file.suffix.lower() == ".npz":
            if not zipfile.is_zipfile(file):
                raise LCCInputError(
                    f"cannot read {file}: not a .npz archive (corrupt or another format); "
                    "write it with numpy.savez"
                )
            with np.load(file, allow_pickle=False) as archive:
                return list(archive.files)
        from safetensors import safe_open

        with safe_open(str(file), framework="np") as handle:
            return list(handle.keys())
    except LCCInputError:
        raise
    except Exception as error:  # BadZipFile, SafetensorError, OSError...
        raise LCCInputError(f"cannot read {file}: {_reason(error)}") from error


def _readable(path: str | os.PathLike[str], keys: tuple[str, ...]) -> Path:
    """``path`` as a Path when it names an existing file of a known format, else LCCInputError."""
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
    return file


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
