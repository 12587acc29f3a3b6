"""Loading latents (.npz, .safetensors) and the atomic writers, including every failure path."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_safetensors_numpy
from safetensors.torch import save_file as save_safetensors_torch

from lcc.errors import LCCInputError
from lcc.io import (
    atomic_write,
    check_output_path,
    load_arrays,
    load_latents,
    npy_memmap_atomic,
    npz_kind,
    read_csv_tolerant,
    read_jsonl_tolerant,
    safe_torch_load,
    save_npy_atomic,
    save_npz_atomic,
    write_json_atomic,
)


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_npz_round_trip_keeps_arrays_and_dtypes(tmp_path: Path) -> None:
    z = np.arange(24, dtype=np.float64).reshape(3, 2, 4)
    y = np.array([3, 7, 42], dtype=np.int32)
    np.savez(tmp_path / "latents.npz", z=z, y=y, extra=np.zeros(1))
    got_z, got_y = load_latents(tmp_path / "latents.npz")
    np.testing.assert_array_equal(got_z, z)
    np.testing.assert_array_equal(got_y, y)
    assert got_z.dtype == np.float64 and got_y.dtype == np.int32


def test_compressed_npz_and_upper_case_suffix_are_read(tmp_path: Path) -> None:
    path = tmp_path / "LATENTS.NPZ"
    with path.open("wb") as handle:
        np.savez_compressed(handle, z=np.ones((2, 3), np.float32), y=np.array([0, 1]))
    z, y = load_latents(path)
    assert z.shape == (2, 3) and y.tolist() == [0, 1]


def test_safetensors_round_trip_and_half_precision_becomes_float32(tmp_path: Path) -> None:
    z = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    y = np.array([0, 1, 1, 0, 2], dtype=np.int64)
    save_safetensors_numpy({"z": z, "y": y}, str(tmp_path / "a.safetensors"))
    got_z, got_y = load_latents(str(tmp_path / "a.safetensors"))
    np.testing.assert_array_equal(got_z, z)
    np.testing.assert_array_equal(got_y, y)

    half = torch.from_numpy(z).to(torch.bfloat16)
    save_safetensors_torch({"z": half, "y": torch.from_numpy(y)}, str(tmp_path / "b.safetensors"))
    got_z, _ = load_latents(tmp_path / "b.safetensors")
    assert got_z.dtype == np.float32
    np.testing.assert_array_equal(got_z, half.float().numpy())


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_missing_keys_are_named_with_the_keys_found(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latents{suffix}"
    arrays = {"latents": np.ones((2, 2), np.float32), "y": np.array([0, 1])}
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        save_safetensors_numpy(arrays, str(path))
    with pytest.raises(LCCInputError) as caught:
        load_latents(path)
    message = str(caught.value)
    assert "'z'" in message and "'latents'" in message and "'y'" in message
    assert "missing" in message and str(path) in message and "\n" not in message


def test_missing_file_directory_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(LCCInputError, match="file not found"):
        load_latents(tmp_path / "nope.npz")
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(LCCInputError, match="directory"):
        load_latents(tmp_path / "folder.npz")
    (tmp_path / "latents.csv").write_text("1,2\n")
    with pytest.raises(LCCInputError, match=r"unknown file type '\.csv'"):
        load_latents(tmp_path / "latents.csv")
    with pytest.raises(LCCInputError, match="no extension"):
        load_latents(tmp_path / "latents")


@pytest.mark.parametrize(
    "content",
    [b"", b"not an archive at all", b"PK\x03\x04" + b"\x00" * 40],
    ids=["empty", "garbage", "truncated-zip"],
)
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_corrupt_files_raise_input_errors(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(LCCInputError, match="cannot read") as caught:
        load_latents(path)
    assert "\n" not in str(caught.value)


def test_npz_with_a_corrupted_member_raises_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "latents.npz"
    np.savez(path, z=np.arange(4000, dtype=np.float32).reshape(1000, 4), y=np.zeros(1000, int))
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64  # inside z's data
    data[60:70] = b"\x00" * 10  # and inside z's .npy header
    path.write_bytes(bytes(data))
    with pytest.raises(LCCInputError, match="cannot read"):
        load_latents(path)


def test_npy_renamed_to_npz_and_pickled_arrays_are_rejected(tmp_path: Path) -> None:
    with (tmp_path / "a.npz").open("wb") as handle:
        np.save(handle, np.ones(3))
    with pytest.raises(LCCInputError, match=r"not a \.npz archive"):
        load_latents(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", z=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(LCCInputError, match="cannot read"):
        load_latents(tmp_path / "b.npz")


def test_load_arrays_reads_any_named_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", a=np.arange(3), b=np.ones(2))
    assert load_arrays(tmp_path / "a.npz", keys=("b",))["b"].tolist() == [1.0, 1.0]


def test_save_npz_atomic_writes_exactly_at_path_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"  # no ".npz" appended, unlike numpy.savez(filename)
    assert save_npz_atomic(path, x=np.arange(3)) == path
    save_npz_atomic(path, x=np.arange(5), flag=np.array([True]))
    with np.load(path) as archive:
        assert sorted(archive.files) == ["flag", "x"] and archive["x"].tolist() == list(range(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_new_files_get_umask_permissions_and_overwrites_keep_the_old_mode(tmp_path: Path) -> None:
    path = save_npz_atomic(tmp_path / "a.npz", x=np.arange(2))
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o640)
    save_npz_atomic(path, x=np.arange(3))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "state.json", {"epoch": 1})

    def explode(handle):
        handle.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(path, explode)
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert _temporaries(tmp_path) == []


def test_write_json_atomic_converts_numpy_values(tmp_path: Path) -> None:
    obj = {"n": np.int64(3), "f": np.float32(0.5), "a": np.arange(2), "p": tmp_path}
    path = write_json_atomic(tmp_path / "a.json", obj, indent=None)
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert json.loads(text) == {"n": 3, "f": 0.5, "a": [0, 1], "p": str(tmp_path)}
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "b.json", {"x": object()})
    assert not (tmp_path / "b.json").exists() and _temporaries(tmp_path) == []


def test_unwritable_destinations_raise_input_errors(tmp_path: Path) -> None:
    with pytest.raises(LCCInputError, match="does not exist"):
        save_npz_atomic(tmp_path / "missing" / "a.npz", x=np.arange(2))
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(LCCInputError, match="is a directory"):
        save_npz_atomic(tmp_path / "dir.npz", x=np.arange(2))
    with pytest.raises(LCCInputError, match="at least one array"):
        save_npz_atomic(tmp_path / "a.npz")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_directory_raises_an_input_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(LCCInputError, match="cannot write"):
            write_json_atomic(folder / "a.json", {})
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------- before_replace


def test_before_replace_sees_the_complete_file_and_can_abort(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "a.json", {"v": 1})
    seen = []

    def check(temporary: Path) -> None:
        seen.append(json.loads(temporary.read_text()))
        assert json.loads(path.read_text()) == {"v": 1}  # not yet replaced

    atomic_write(path, lambda handle: handle.write(b'{"v": 2}'), before_replace=check)
    assert seen == [{"v": 2}] and json.loads(path.read_text()) == {"v": 2}

    def refuse(temporary: Path) -> None:
        raise ValueError("does not verify")

    with pytest.raises(ValueError, match="does not verify"):
        atomic_write(path, lambda handle: handle.write(b"{}"), before_replace=refuse)
    assert json.loads(path.read_text()) == {"v": 2} and _temporaries(tmp_path) == []


# --------------------------------------------------------------------------- outputs vs inputs


def test_output_that_resolves_to_an_input_is_refused(tmp_path: Path) -> None:
    source = save_npz_atomic(tmp_path / "lat.npz", z=np.zeros((2, 1)), y=np.zeros(2))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "alias.npz").symlink_to(source)
    os.link(source, tmp_path / "hard.npz")
    spellings = [
        source,
        str(source),
        tmp_path / "sub" / ".." / "lat.npz",
        tmp_path / "sub" / "alias.npz",
        tmp_path / "hard.npz",
    ]
    for out in spellings:
        with pytest.raises(LCCInputError, match=r"is the input .* would destroy the input"):
            check_output_path(out, [tmp_path / "other.npz", None, source], force=True)
    # a symlinked input is the file it points to
    with pytest.raises(LCCInputError, match="is the input"):
        check_output_path(source, [tmp_path / "sub" / "alias.npz"])
    new = tmp_path / "new.npz"
    assert check_output_path(str(new), [source]) == new
    assert check_output_path(tmp_path / "sub" / ".." / "new.npz", [new.with_name("x.npz")])


def test_existing_output_of_another_kind_needs_force(tmp_path: Path) -> None:
    kind = npz_kind("an lcc cluster result", "clusters", "targets")
    ours = save_npz_atomic(tmp_path / "ours.npz", clusters=np.zeros(2), targets=np.zeros(2), x=1)
    theirs = save_npz_atomic(tmp_path / "theirs.npz", z=np.zeros(2), y=np.zeros(2))
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    assert check_output_path(ours, [], kind=kind) == ours
    for foreign in (theirs, text):
        with pytest.raises(LCCInputError, match="exists and is not an lcc cluster result; pass"):
            check_output_path(foreign, [], kind=kind)
        assert check_output_path(foreign, [], kind=kind, force=True) == foreign
    assert check_output_path(tmp_path / "missing.npz", [], kind=kind)


# --------------------------------------------------------------------------- logs after a kill


def test_jsonl_drops_only_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    assert read_jsonl_tolerant(path) == []
    records = [{"epoch": e, "layer": "act1", "n": 10 * e} for e in range(3)]
    whole = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(whole)
    assert read_jsonl_tolerant(path) == records
    for cut in range(1, len(json.dumps(records[-1])) + 1):  # every possible tear of the last
        path.write_text(whole[:-cut])
        assert read_jsonl_tolerant(path) == records[: 2 if cut > 1 else 3], cut
    path.write_bytes(whole.encode() + b"\x00" * 64)  # a crash can leave zeros at the end
    assert read_jsonl_tolerant(path) == records
    path.write_text(whole.replace(json.dumps(records[1]), '{"epoch": 1, "la'))
    with pytest.raises(LCCInputError, match=r"log\.jsonl line 2 is not a JSON object"):
        read_jsonl_tolerant(path)


def test_csv_drops_a_torn_last_row(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    assert read_csv_tolerant(path) == []
    path.write_text("epoch,step,loss\n0,3,2.5\n1,7,1.25\n")
    rows = [{"epoch": "0", "step": "3", "loss": "2.5"}, {"epoch": "1", "step": "7", "loss": "1.25"}]
    assert read_csv_tolerant(path) == rows
    path.write_text("epoch,step,loss\n0,3,2.5\n1,7,1.2")  # "1.25" cut to "1.2": dropped
    assert read_csv_tolerant(path) == rows[:1]
    path.write_text("epoch,step,loss\n0,3,2.5\n1,7\n")  # fewer fields
    assert read_csv_tolerant(path) == rows[:1]
    path.write_text("epoch,st")
    assert read_csv_tolerant(path) == []


# --------------------------------------------------------------------------- torch files


class _Marker:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_safe_torch_load_refuses_code_and_names_damage(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3), "epoch": 2, "names": ["a"]}, good)
    loaded = safe_torch_load(good)
    assert loaded["epoch"] == 2 and loaded["w"].tolist() == [0, 1, 2]
    assert safe_torch_load(good, mmap=True)["w"].tolist() == [0, 1, 2]
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": _Marker(marker)}, evil)
    with pytest.raises(LCCInputError) as caught:
        safe_torch_load(evil, what="weights")
    message = str(caught.value)
    assert message.startswith(f"refusing to load weights {evil}: it needs arbitrary unpickling")
    assert "(io.open)" in message and "execute code" in message and "\n" not in message
    assert not marker.exists()
    cases = {
        "empty": (b"", "empty file (0 bytes)"),
        "truncated": (good.read_bytes()[:300], "truncated (300 bytes"),
        "random": (np.random.default_rng(0).bytes(2000), "not a file written by torch.save"),
    }
    for name, (content, words) in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(LCCInputError, match=f"cannot read checkpoint .*{name}.pt: ") as caught:
            safe_torch_load(path)
        assert words in str(caught.value) and "\n" not in str(caught.value), name
    with pytest.raises(LCCInputError, match="does not exist"):
        safe_torch_load(tmp_path / "missing.pt")
    with pytest.raises(LCCInputError, match="is a directory"):
        safe_torch_load(tmp_path)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_npy_pair_directory_is_memory_mapped_in_its_dtype(tmp_path: Path, dtype) -> None:
    z = np.random.default_rng(1).normal(size=(7, 2, 3)).astype(dtype)
    y = np.array([3, 7, 42, 3, 7, 42, 0], dtype=np.int32)
    save_npy_atomic(tmp_path / "z.npy", z)
    save_npy_atomic(tmp_path / "y.npy", y)
    got_z, got_y = load_latents(tmp_path)
    assert isinstance(got_z, np.memmap) and got_z.dtype == dtype and not got_z.flags.writeable
    np.testing.assert_array_equal(got_z, z)
    np.testing.assert_array_equal(got_y, y)
    # the latents file itself, with the labels named explicitly
    np.save(tmp_path / "other.npy", y[::-1].copy())
    got_z, got_y = load_latents(tmp_path / "z.npy", labels=tmp_path / "other.npy")
    np.testing.assert_array_equal(got_z, z)
    np.testing.assert_array_equal(got_y, y[::-1])
    # a directory's y.npy can be overridden too
    assert load_latents(tmp_path, labels=tmp_path / "other.npy")[1].tolist() == y[::-1].tolist()


def test_npy_pair_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    np.save(tmp_path / "z.npy", np.ones((4, 2), np.float32))
    with pytest.raises(LCCInputError, match="labels file not found"):
        load_latents(tmp_path)
    with pytest.raises(LCCInputError, match="--labels"):
        load_latents(tmp_path / "z.npy")
    np.save(tmp_path / "y.npy", np.arange(4))
    np.savez(tmp_path / "a.npz", z=np.ones((4, 2)), y=np.arange(4))
    with pytest.raises(LCCInputError, match=r"\.npy latents only"):
        load_latents(tmp_path / "a.npz", labels=tmp_path / "y.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LCCInputError, match=r"has no z\.npy"):
        load_latents(tmp_path / "empty")
    np.save(tmp_path / "y.npy", np.arange(5))
    with pytest.raises(LCCInputError, match=r"shape \(5,\) but .* 4 rows") as caught:
        load_latents(tmp_path)
    assert "\n" not in str(caught.value)


def test_npy_memmap_atomic_renames_on_success_and_cleans_up_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "z.npy"
    with npy_memmap_atomic(path, (5, 3), np.float16) as z:
        assert not path.exists()  # still a temporary file
        z[:] = np.arange(15).reshape(5, 3)
    loaded = np.load(path)
    assert loaded.dtype == np.float16 and loaded.tolist()[4] == [12.0, 13.0, 14.0]
    with pytest.raises(RuntimeError, match="boom"), npy_memmap_atomic(path, (2, 2), np.float32):
        raise RuntimeError("boom")
    assert np.load(path).shape == (5, 3)  # the previous file is intact
    assert _temporaries(tmp_path) == []
    missing = tmp_path / "missing" / "z.npy"
    with (
        pytest.raises(LCCInputError, match="does not exist"),
        npy_memmap_atomic(missing, (2, 2), np.float32),
    ):
        pass
