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
import csv
import io
import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from lcc.errors import LCCInputError

__all__ = [
    "LATENT_FORMATS",
    "NPY_LABELS",
    "NPY_LATENTS",
    "OutputKind",
    "TorchLoadError",
    "array_keys",
    "atomic_write",
    "check_output_path",
    "describe_load_error",
    "load_arrays",
    "load_latents",
    "load_npy_pair",
    "npy_memmap_atomic",
    "npz_kind",
    "read_csv_tolerant",
    "read_jsonl_tolerant",
    "read_yaml",
    "safe_torch_load",
    "save_npy_atomic",
    "save_npz_atomic",
    "unsafe_globals",
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
        return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except LCCInputError:
        raise
    except Exception as error:  # OSError, truncated data, bad header, object arrays...
        if isinstance(error, ValueError) and ("pickle" in str(error) or "object" in str(error)):
            raise LCCInputError(
                f"cannot read {file}: it holds Python objects (an object array); save numeric "
                "arrays only"
            ) from error
        raise LCCInputError(f"cannot read {file} as .npy: {_reason(error)}") from error


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
            with _open_npz(file) as archive:
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
    if file.is_dir():
        raise LCCInputError(
            f"cannot read {file}: it is a directory; pass a {' or '.join(LATENT_FORMATS)} file"
        )
    if suffix not in LATENT_FORMATS:
        raise LCCInputError(
            f"cannot read {file}: unknown file type {suffix or '(no extension)'!r}; "
            f"save the latents as {' or '.join(LATENT_FORMATS)} with keys {', '.join(keys)}"
        )
    if not file.exists():
        raise LCCInputError(f"file not found: {file}; check the path")
    return file


def _open_npz(file: Path) -> Any:
    """``np.load`` of a ``.npz`` archive (never unpickling); LCCInputError for another format."""
    if not zipfile.is_zipfile(file):
        raise LCCInputError(
            f"cannot read {file}: not a .npz archive (corrupt or another format); "
            "write it with numpy.savez"
        )
    return np.load(file, allow_pickle=False)


def _read_npz(file: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with _open_npz(file) as archive:
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
    return {
        key: (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).numpy()
        for key, tensor in tensors.items()
    }


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


def _writable_target(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path whose folder exists and which is not a folder, else LCCInputError."""
    target = Path(path)
    if not target.parent.is_dir():
        raise LCCInputError(
            f"cannot write {target}: directory {target.parent} does not exist; create it first"
        )
    if target.is_dir():
        raise LCCInputError(f"cannot write {target}: it is a directory; pass a file name")
    return target


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[IO[bytes]], None],
    *,
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    The destination's directory must exist. Any ``OSError`` (missing directory, no permission,
    destination is a directory, disk full) becomes an :class:`LCCInputError` naming ``path``
    (the ``OSError`` is its ``__cause__``); the temporary file is removed on failure.
    ``before_replace(temporary)``, if given, runs after the fsync and before the rename (to
    verify the written file or to keep the old one); an exception there aborts the write and
    leaves ``path`` untouched. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    with _replacing(path, before_replace) as handle:
        write(handle)
    return Path(path)


@contextlib.contextmanager
def _replacing(
    path: str | os.PathLike[str], before_replace: Callable[[Path], None] | None = None
) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path``, open for writing, that replaces ``path`` at the end of
    the block (flushed, fsynced, given ``path``'s permissions, ``before_replace`` called,
    renamed); on an exception it is removed instead and an ``OSError`` becomes LCCInputError."""
    target = _writable_target(path)
    try:
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, renamed on success
            mode="wb", dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
        )
    except OSError as error:
        raise LCCInputError(f"cannot write {target}: {_os_reason(error)}") from error
    temporary = Path(handle.name)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, _file_mode(target))
        if before_replace is not None:
            before_replace(temporary)
        os.replace(temporary, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(error, OSError):
            raise LCCInputError(f"cannot write {target}: {_os_reason(error)}") from error
        raise
    _fsync_directory(target.parent)


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
    with _replacing(path) as handle:
        array = np.lib.format.open_memmap(
            handle.name, mode="w+", dtype=np.dtype(dtype), shape=tuple(int(s) for s in shape)
        )
        yield array
        array.flush()
        del array


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
    return f"{error.strerror or error}; choose a writable location"


def _file_mode(target: Path) -> int:
    """Permissions for the new file: the old file's if it exists, else 0o666 minus the umask."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
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
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- outputs vs inputs


@dataclass(frozen=True)
class OutputKind:
    """What a command writes: ``name`` for messages, ``matches(path)`` tells whether an existing
    file is an earlier output of that kind (and may be overwritten without ``--force``)."""

    name: str
    matches: Callable[[Path], bool]


def npz_kind(name: str, *keys: str) -> OutputKind:
    """An :class:`OutputKind` for ``.npz`` archives that hold (at least) ``keys``.

    >>> folder = Path(tempfile.mkdtemp())
    >>> kind = npz_kind("a pair", "a", "b")
    >>> kind.matches(save_npz_atomic(folder / "p.npz", a=np.zeros(1), b=np.ones(1)))
    True
    >>> kind.matches(save_npz_atomic(folder / "q.npz", z=np.zeros(1)))
    False
    """
    wanted = frozenset(keys)

    def matches(path: Path) -> bool:
        try:
            with _open_npz(path) as archive:
                return wanted <= set(archive.files)
        except Exception:  # unreadable or not a .npz archive: not ours
            return False

    return OutputKind(name, matches)


def check_output_path(
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None],
    *,
    force: bool = False,
    kind: OutputKind | None = None,
    label: str = "OUT",
) -> Path:
    """Refuse an output path that would destroy an input or a file of another kind.

    ``output`` may not be any of ``inputs`` (``None`` entries are ignored), compared as files:
    symlinks, ``..`` and hard links to an input count as the input. An existing ``output`` that
    ``kind`` does not recognise is overwritten only with ``force``. Returns ``output`` as a
    :class:`~pathlib.Path`; raises :class:`LCCInputError` (one line) otherwise.

    >>> folder = Path(tempfile.mkdtemp())
    >>> source = save_npz_atomic(folder / "lat.npz", z=np.zeros((2, 1)), y=np.zeros(2))
    >>> check_output_path(folder / "sub" / ".." / "lat.npz", [source])
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: OUT .../sub/../lat.npz is the input .../lat.npz: ...
    """
    out = Path(output).expanduser()
    for source_path in (Path(source).expanduser() for source in inputs if source is not None):
        if _same_file(out, source_path):
            raise LCCInputError(
                f"{label} {out} is the input {source_path}: writing it would destroy the input; "
                "choose another output file"
            )
    if kind is not None and not force and out.is_file() and not kind.matches(out):
        raise LCCInputError(
            f"{label} {out} exists and is not {kind.name}; pass --force to overwrite it, "
            "or choose another output file"
        )
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return a.resolve(strict=False) == b.resolve(strict=False)


# --------------------------------------------------------------------------- logs after a kill


def read_jsonl_tolerant(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, without a torn last line (what a kill leaves).

    A missing file has no records. The last non-blank line is dropped when it is not a JSON
    object (cut mid-write, or zero bytes after a crash); any earlier such line raises
    :class:`LCCInputError` naming the file and the line.

    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "log.jsonl").write_text('{"epoch": 1}\\n{"epoch": 2}\\n{"epo')
    >>> read_jsonl_tolerant(folder / "log.jsonl")
    [{'epoch': 1}, {'epoch': 2}]
    """
    file = Path(path)
    if not file.is_file():
        return []
    lines = [
        (number, line)
        for number, line in enumerate(_read_text(file).split("\n"), start=1)
        if line.strip(" \t\r\x00")
    ]
    records: list[dict[str, Any]] = []
    for position, (number, line) in enumerate(lines):
        record = None
        with contextlib.suppress(ValueError):
            record = json.loads(line)
        if isinstance(record, dict):
            records.append(record)
        elif position < len(lines) - 1:
            raise LCCInputError(
                f"{file} line {number} is not a JSON object ({line[:40]!r}); the file is "
                "damaged before its last line: repair or remove it"
            )
    return records


def read_csv_tolerant(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, without a torn last row (what a kill leaves).

    A missing or empty file has no rows. A last line without its newline, or a row whose number
    of fields differs from the header's, is dropped.

    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "m.csv").write_text("epoch,loss\\n0,1.5\\n1,1.2\\n2,0.9")
    >>> read_csv_tolerant(folder / "m.csv")
    [{'epoch': '0', 'loss': '1.5'}, {'epoch': '1', 'loss': '1.2'}]
    """
    file = Path(path)
    if not file.is_file():
        return []
    text = _read_text(file)
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the cut last line (and a header-only file: none)
    rows = csv.DictReader(io.StringIO(text, newline=""))
    # a row with more or fewer fields than the header has None as a key or a value
    return [row for row in rows if None not in row and None not in row.values()]


def _read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
    except OSError as error:
        raise LCCInputError(f"cannot read {file}: {error.strerror or error}") from error


# --------------------------------------------------------------------------- torch files


def safe_torch_load(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    mmap: bool = False,
    what: str = "checkpoint",
) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain values, never code.

    Every failure is an :class:`LCCInputError` naming the file (``what`` names its role):
    missing, empty, truncated, not written by ``torch.save``, or needing arbitrary unpickling
    (refused, with how to convert it). ``mmap``: map tensors lazily (zip files only).

    >>> import torch
    >>> folder = Path(tempfile.mkdtemp())
    >>> torch.save({"w": torch.ones(2), "epoch": 3}, folder / "w.pt")
    >>> safe_torch_load(folder / "w.pt")["epoch"]
    3
    """
    import torch

    file = Path(path).expanduser()
    if not file.exists():
        raise TorchLoadError(file, f"{what} {file} does not exist; check the path", "missing")
    if file.is_dir():
        raise TorchLoadError(
            file, f"cannot read {what} {file}: it is a directory, not a file", "a directory"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4"
            return torch.load(
                file,
                map_location=map_location,
                weights_only=True,
                mmap=mmap and zipfile.is_zipfile(file),
            )
    except Exception as error:
        unsafe = unsafe_globals(file, error)
        if unsafe:
            reason = f"needs arbitrary unpickling ({', '.join(unsafe[:3])}), refused"
            raise TorchLoadError(
                file,
                f"refusing to load {what} {file}: it needs arbitrary unpickling "
                f"({', '.join(unsafe[:3])}), which would execute code from the file; lcc loads "
                "only tensors and plain values. If you trust the file, convert it once: "
                "torch.save(its state_dict, 'weights.pt') or safetensors.torch.save_file",
                reason,
                unsafe,
            ) from error
        reason = describe_load_error(file, error)
        raise TorchLoadError(file, f"cannot read {what} {file}: {reason}", reason) from error


class TorchLoadError(LCCInputError):
    """:func:`safe_torch_load` failed: ``reason`` in a few words; ``unsafe`` lists the globals
    of a file that needs arbitrary unpickling (empty for damaged or foreign files)."""

    def __init__(
        self, path: Path, message: str, reason: str, unsafe: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason
        self.unsafe = list(unsafe or [])


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def unsafe_globals(path: str | os.PathLike[str], error: BaseException | None = None) -> list[str]:
    """Classes or functions that unpickling ``path`` would import (refused by weights-only
    loading); read statically from the pickle, never executed. Empty when there are none."""
    import torch

    try:
        if zipfile.is_zipfile(path):
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        else:
            names = sorted(_pickle_globals(Path(path)) - _allowed_globals())
    except Exception:  # damaged archive or not a pickle: fall back to the loader's message
        names = []
    if not names and error is not None:
        names = sorted(set(_GLOBAL.findall(str(error))))
    return names


def _pickle_globals(file: Path) -> set[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in a plain pickle, read with pickletools
    (which only parses opcodes); stops quietly at the first byte that is not pickle."""
    import pickletools

    found: set[str] = set()
    strings: list[str] = []
    with file.open("rb") as handle:
        try:
            for opcode, argument, _ in pickletools.genops(handle):
                if opcode.name == "GLOBAL" and isinstance(argument, str):
                    found.add(argument.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(argument, str) and "UNICODE" in opcode.name:
                    strings.append(argument)
        except Exception:  # truncated or not a pickle: what was read so far
            pass
    return found


def _allowed_globals() -> set[str]:
    """What ``torch.load(weights_only=True)`` accepts (its defaults and add_safe_globals)."""
    import torch

    allowed: set[str] = set()
    with contextlib.suppress(Exception):  # private helpers: best effort
        from torch import _weights_only_unpickler as unpickler

        allowed |= set(unpickler._get_allowed_globals())
        allowed |= set(unpickler._get_user_allowed_globals())
    for item in torch.serialization.get_safe_globals():
        target = item[0] if isinstance(item, tuple) else item
        allowed.add(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}")
    return allowed


def describe_load_error(path: str | os.PathLike[str], error: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, in a few words (empty, truncated, foreign bytes).

    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "empty.ckpt").write_bytes(b"")
    >>> describe_load_error(folder / "empty.ckpt", EOFError())
    'empty file (0 bytes)'
    """
    file = Path(path)
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(4)
    except OSError as os_error:
        return os_error.strerror or str(os_error)
    if size == 0:
        return "empty file (0 bytes)"
    text = str(error)
    if head == b"PK\x03\x04" and (not zipfile.is_zipfile(file) or "central directory" in text):
        return f"truncated ({size} bytes; the archive torch.save writes is incomplete)"
    if not zipfile.is_zipfile(file):
        if head.startswith(b"\x80\x02\x8a"):  # the legacy (pre-zip) torch.save format
            return "truncated or damaged (legacy torch.save format)"
        return "not a file written by torch.save (unrecognised bytes)"
    return f"damaged archive ({_unpickler_detail(text) or _reason(error)})"


def _unpickler_detail(text: str) -> str:
    """The useful sentence of torch's weights-only error text (it spans many lines)."""
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return _reason(RuntimeError(text.strip())) if text.strip() else ""


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping stored in a YAML file (empty file -> ``{}``), errors as LCCInputError."""
    import yaml

    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise LCCInputError(f"cannot read config file {file}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise LCCInputError(f"config file {file} is not valid YAML{line}; fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LCCInputError(
            f"config file {file} must hold a mapping of option: value, got {type(data).__name__}"
        )
    return data
