"""``lcc cluster``: output schema, JSON line, example mode, and every bad input of issue 2."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file as save_safetensors

from lcc.cli import main
from lcc.synthetic import gaussian_mixture

OUTPUT_SCHEMA = {
    "clusters": np.int64,
    "cluster_class": np.int64,
    "misclustered": np.bool_,
    "correctible": np.bool_,
    "targets": np.float32,
}


def latents(path: Path, n: int = 300, labels=None, **arrays) -> Path:
    z, y, _ = gaussian_mixture(n, 12, 3, 2, separation=1.5, seed=0)
    if labels is not None:
        y = np.asarray(labels)[y]
    np.savez(path, **{"z": z, "y": y, **arrays})
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["cluster", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run, expect exit code 2 and a single stderr line; return that line."""
    try:
        code = main(["cluster", *args])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("usage:"), captured.err
    return lines[-1]


def check_output(path: Path, n: int, d: int, summary: dict) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    assert sorted(arrays) == sorted(OUTPUT_SCHEMA)
    for key, dtype in OUTPUT_SCHEMA.items():
        assert arrays[key].dtype == dtype, key
    k = summary["n_clusters"]
    assert arrays["clusters"].shape == (n,) and arrays["cluster_class"].shape == (k,)
    assert arrays["misclustered"].shape == (n,) and arrays["correctible"].shape == (n,)
    assert arrays["targets"].shape == (n, d)
    assert set(arrays["clusters"].tolist()) == set(range(k))
    nan_rows = np.isnan(arrays["targets"]).all(axis=1)
    finite_rows = np.isfinite(arrays["targets"]).all(axis=1)
    np.testing.assert_array_equal(nan_rows, ~arrays["correctible"])
    np.testing.assert_array_equal(finite_rows, arrays["correctible"])
    assert not (arrays["correctible"] & ~arrays["misclustered"]).any()
    mc = arrays["cluster_class"][arrays["clusters"]] != summary["_y"]
    np.testing.assert_array_equal(arrays["misclustered"], mc)
    assert summary["misclustered_fraction"] == pytest.approx(mc.mean())
    assert summary["correctible_fraction"] == pytest.approx(arrays["correctible"].mean())
    return arrays


def check_summary(stdout: str, n: int, d: int, k: int) -> dict:
    lines = stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    for key in ("n_clusters", "misclustered_fraction", "correctible_fraction", "modularity"):
        assert key in summary
    assert (summary["n"], summary["d"], summary["k"]) == (n, d, k)
    assert set(summary["seconds"]) >= {"knn", "cluster", "match", "targets", "total"}
    assert all(isinstance(v, float) and v >= 0 for v in summary["seconds"].values())
    assert 0 <= summary["correctible_fraction"] <= summary["misclustered_fraction"] <= 1
    return summary


def test_cluster_writes_the_documented_file_and_one_json_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = latents(tmp_path / "latents.npz")
    out = tmp_path / "clusters.npz"
    code, stdout, stderr = run_cli([str(source), str(out), "--k", "4", "--seed", "1"], capsys)
    assert code == 0 and stderr == ""
    summary = check_summary(stdout, 300, 12, 4)
    assert summary["method"] == "leiden" and summary["out"] == str(out)
    assert summary["latents"] == str(source)
    summary["_y"] = np.load(source)["y"]
    arrays = check_output(out, 300, 12, summary)
    assert arrays["correctible"].any()


def test_options_reach_the_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = latents(tmp_path / "latents.npz")
    out = tmp_path / "out.npz"
    args = [str(source), str(out), "--k", "6", "--method", "louvain", "--targets", "approximate"]
    args += ["--knn", "approximate", "--pca", "5", "--weights", "rbf", "--metric", "cosine"]
    args += ["--resolution", "0.8", "--seed", "3", "--classes", "0,2"]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    summary = check_summary(stdout, 300, 5, 6)
    expected = {"method": "louvain", "targets": "approximate", "knn": "approximate", "pca": 5}
    expected |= {"weights": "rbf", "metric": "cosine", "resolution": 0.8, "seed": 3}
    assert {key: summary[key] for key in expected} == expected
    assert summary["input_dim"] == 12
    summary["_y"] = np.load(source)["y"]
    arrays = check_output(out, 300, 5, summary)
    assert set(summary["_y"][arrays["correctible"]].tolist()) <= {0, 2}


def test_non_contiguous_labels_and_safetensors_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    z, y, _ = gaussian_mixture(200, 6, 3, 2, separation=4.0, seed=2)
    y = np.array([3, 7, 42])[y]
    save_safetensors({"z": z.reshape(200, 2, 3), "y": y}, str(tmp_path / "z.safetensors"))
    out = tmp_path / "out.npz"
    code, stdout, _ = run_cli([str(tmp_path / "z.safetensors"), str(out)], capsys)
    assert code == 0
    summary = check_summary(stdout, 200, 6, 5)
    summary["_y"] = y
    arrays = check_output(out, 200, 6, summary)
    assert set(arrays["cluster_class"].tolist()) <= {3, 7, 42}


def test_without_arguments_it_clusters_the_example_into_the_default_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(["--example-samples", "400"], capsys)
    assert code == 0 and stderr == ""
    summary = check_summary(stdout, 400, 64, 5)
    assert summary["latents"] == "example" and summary["out"] == "lcc-clusters.npz"
    assert (tmp_path / "lcc-clusters.npz").exists()
    assert 0 < summary["misclustered_fraction"] < 0.5  # the example is not trivial
    # --example with a single positional: that positional is OUT; same seed, same file content
    code, stdout2, _ = run_cli(["--example", "again.npz", "--example-samples", "400"], capsys)
    assert code == 0 and json.loads(stdout2)["out"] == "again.npz"
    for key in OUTPUT_SCHEMA:
        np.testing.assert_array_equal(np.load("again.npz")[key], np.load("lcc-clusters.npz")[key])


def test_progress_goes_to_stderr_only_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out = tmp_path / "out.npz"
    code = main(["cluster", str(latents(tmp_path / "l.npz")), str(out)])
    assert code == 0
    shown = terminal.getvalue()
    for stage in ("load", "check", "knn", "graph", "cluster", "match", "targets", "write"):
        assert f"{stage}..." in shown
        assert re.search(rf"lcc cluster: {stage} \d+\.\d\d s \(total", shown)  # its seconds
    assert f"wrote {out}" in shown
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    source = latents(tmp_path / "latents.npz", n=120)
    out = tmp_path / "out.npz"
    done = subprocess.run(
        [sys.executable, "-m", "lcc", "cluster", str(source), str(out), "--k", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    check_summary(done.stdout, 120, 12, 3)
    bad = subprocess.run(
        [sys.executable, "-m", "lcc", "cluster", str(source), str(out), "--k", "120"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "lcc cluster: error: k=120 must be smaller than the number of samples (120); "
        "choose k <= 119"
    ]


def _write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


BAD_INPUTS = {
    "missing-z": (lambda p: _write(p, latents=np.zeros((4, 2)), y=np.arange(4)), "'z'"),
    "missing-y": (lambda p: _write(p, z=np.zeros((4, 2)), labels=np.arange(4)), "'y'"),
    "nan": (
        lambda p: _write(p, z=np.array([[0, np.nan]] + [[i, i] for i in range(5)]), y=np.arange(6)),
        "NaN or inf",
    ),
    "inf": (
        lambda p: _write(p, z=np.array([[i, i] for i in range(5)] + [[0, np.inf]]), y=np.arange(6)),
        "NaN or inf",
    ),
    "y-length": (
        lambda p: _write(p, z=np.zeros((6, 2)), y=np.arange(5)),
        "5 labels but there are 6",
    ),
    "float-labels": (
        lambda p: _write(p, z=np.random.rand(6, 2), y=np.array([0, 1.5, 0, 1, 0, 1])),
        "non-integer",
    ),
    "string-labels": (
        lambda p: _write(p, z=np.random.rand(6, 2), y=np.array(list("abcabc"))),
        "integer class labels",
    ),
    "negative-labels": (
        lambda p: _write(p, z=np.random.rand(6, 2), y=np.array([0, 1, -2, 0, 1, 0])),
        "non-negative",
    ),
    "k-too-large": (
        lambda p: _write(p, z=np.random.rand(5, 2), y=np.arange(5)),
        "k=5 must be smaller",
    ),
    "one-sample": (lambda p: _write(p, z=np.zeros((1, 3)), y=np.zeros(1, int)), "at least 2"),
    "no-samples": (lambda p: _write(p, z=np.zeros((0, 3)), y=np.zeros(0, int)), "at least 2"),
    "1d-z": (lambda p: _write(p, z=np.zeros(5), y=np.zeros(5, int)), "shape (N, d"),
    "unreadable": (lambda p: p.write_bytes(b"\x00garbage\x01" * 10), "cannot read"),
    "missing-file": (lambda p: p, "file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_code_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path / "latents.npz")
    out = tmp_path / "out.npz"
    line = run_error([str(path), str(out)], capsys)
    assert line.startswith("lcc cluster: error: ")
    assert expected in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--method", "kmeans"], "invalid choice: 'kmeans'"),
        (["--k", "five"], "invalid int value"),
        (["--k", "0"], "k=0 must be at least 1"),
        (["--pca", "0"], "pca=0 must be at least 1"),
        (["--pca", "12"], "pca=12 must be smaller than min(N, D) = 12"),
        (["--resolution", "-1"], "resolution=-1.0 must be a positive"),
        (["--seed", "-3"], "seed must be a non-negative integer"),
        (["--classes", "a,b"], "comma-separated class labels"),
        (["--targets", "maybe"], "invalid choice"),
    ],
)
def test_bad_options_exit_2(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = latents(tmp_path / "latents.npz", n=50)
    line = run_error([str(source), str(tmp_path / "out.npz"), *args], capsys)
    assert expected in line


def test_unwritable_out_fails_before_clustering(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(latents(tmp_path / "latents.npz", n=50))
    line = run_error([source, str(tmp_path / "missing" / "out.npz")], capsys)
    assert "does not exist" in line
    (tmp_path / "dir.npz").mkdir()
    assert "is a directory" in run_error([source, str(tmp_path / "dir.npz")], capsys)
    assert "must be a .npz file name" in run_error([source, str(tmp_path / "out.txt")], capsys)
    assert "pass only OUT" in run_error(["--example", source, str(tmp_path / "o.npz")], capsys)


def test_help_documents_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["cluster", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--k", "--method", "--targets", "--knn", "--pca", "--weights", "--metric"):
        assert option in text
    for option in ("--resolution", "--seed", "--example", "--classes"):
        assert option in text
    assert "(default: 5)" in text and "(default: leiden)" in text
    assert "(default: lcc- clusters.npz)" in text or "(default: lcc-clusters.npz)" in text
    positionals = text.split("positional arguments:")[1].split("options:")[0]
    assert "LATENTS" in positionals and "(default: None)" not in positionals


# --------------------------------------------------------------------------- never destroy inputs


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot", "hardlink"])
def test_out_that_is_the_input_is_refused_and_the_input_kept(
    spelling: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = latents(tmp_path / "lat.npz", n=50)
    before = source.read_bytes()
    (tmp_path / "sub").mkdir()
    if spelling == "same":
        out = source
    elif spelling == "symlink":
        out = tmp_path / "sub" / "alias.npz"
        out.symlink_to(source)
    elif spelling == "dotdot":
        out = tmp_path / "sub" / ".." / "lat.npz"
    else:
        out = tmp_path / "sub" / "linked.npz"
        os.link(source, out)
    line = run_error([str(source), str(out)], capsys)
    assert "is the input" in line and "would destroy the input" in line
    assert source.read_bytes() == before
    line = run_error([str(source), str(out), "--force"], capsys)  # --force never allows this
    assert "is the input" in line
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_existing_out_of_another_kind_needs_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = latents(tmp_path / "lat.npz", n=60)
    other = latents(tmp_path / "other-latents.npz", n=40)  # a user's file, not our output
    before = other.read_bytes()
    line = run_error([str(source), str(other)], capsys)
    assert "exists and is not an lcc cluster result" in line and "--force" in line
    assert other.read_bytes() == before
    text = tmp_path / "notes.npz"
    text.write_bytes(b"my notes, not an archive")
    assert "is not an lcc cluster result" in run_error([str(source), str(text)], capsys)
    assert text.read_bytes() == b"my notes, not an archive"

    # an earlier output of lcc cluster is replaced without --force
    out = tmp_path / "clusters.npz"
    assert run_cli([str(source), str(out)], capsys)[0] == 0
    code, stdout, _ = run_cli([str(source), str(out), "--k", "3"], capsys)
    assert code == 0 and json.loads(stdout)["k"] == 3
    # and --force replaces the foreign file
    code, _, _ = run_cli([str(source), str(other), "--force"], capsys)
    assert code == 0
    assert set(np.load(other).files) == set(OUTPUT_SCHEMA)


def npy_pair(folder: Path, n: int = 400, dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """A directory holding z.npy (``dtype``) and y.npy; returns the arrays as written."""
    z, y, _ = gaussian_mixture(n, 12, 3, 2, separation=1.5, seed=5)
    folder.mkdir(exist_ok=True)
    np.save(folder / "z.npy", z.astype(dtype))
    np.save(folder / "y.npy", y)
    return z.astype(dtype), y


@pytest.mark.parametrize("fast", [False, True])
def test_float16_npy_pair_gives_the_clusters_of_in_memory_float32(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fast: bool
) -> None:
    from lcc.engine.refresh import refresh

    z16, y = npy_pair(tmp_path / "latents", n=2_500)  # above the approximate-search threshold
    options = ["--knn", "approximate", "--pca", "6", "--targets", "approximate"] if fast else []
    out = tmp_path / "out.npz"
    code, stdout, stderr = run_cli([str(tmp_path / "latents"), str(out), *options], capsys)
    assert code == 0 and stderr == ""
    summary = json.loads(stdout)
    assert summary["latents"] == str(tmp_path / "latents") and summary["n"] == 2_500
    settings = {"knn": "approximate", "pca": 6, "targets": "approximate"} if fast else {}
    expected = refresh(z16.astype(np.float32), y, **settings)
    with np.load(out) as archive:
        np.testing.assert_array_equal(archive["clusters"], expected.clusters)
        np.testing.assert_array_equal(archive["correctible"], expected.correctible)
        np.testing.assert_allclose(
            archive["targets"], expected.targets.dense(), rtol=1e-5, atol=1e-5
        )


def test_latents_npy_with_labels_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, y = npy_pair(tmp_path / "pair", dtype=np.float32)
    np.save(tmp_path / "labels.npy", y)
    out = tmp_path / "out.npz"
    code, stdout, _ = run_cli(
        [str(tmp_path / "pair" / "z.npy"), str(out), "--labels", str(tmp_path / "labels.npy")],
        capsys,
    )
    assert code == 0
    summary = check_summary(stdout, 400, 12, 5)
    summary["_y"] = y
    check_output(out, 400, 12, summary)


def _pair(folder: Path, z: object, y: object) -> Path:
    folder.mkdir()
    if z is not None:
        np.save(folder / "z.npy", z, allow_pickle=True)
    if y is not None:
        np.save(folder / "y.npy", y, allow_pickle=True)
    return folder


NPY_BAD_INPUTS = {
    "int-latents": (lambda f: _pair(f, np.ones((6, 2), np.int64), np.arange(6)), "float16 or"),
    "object-latents": (
        lambda f: _pair(f, np.array([[{"a": 1}]] * 6, dtype=object), np.arange(6)),
        "Python objects",
    ),
    "object-labels": (
        lambda f: _pair(f, np.ones((6, 2), np.float32), np.array([{}] * 6, dtype=object)),
        "Python objects",
    ),
    "float-labels": (
        lambda f: _pair(f, np.ones((6, 2), np.float32), np.arange(6.0)),
        "labels must be integers",
    ),
    "length-mismatch": (
        lambda f: _pair(f, np.ones((6, 2), np.float16), np.arange(5)),
        "has shape (5,) but",
    ),
    "2d-labels": (
        lambda f: _pair(f, np.ones((6, 2), np.float16), np.zeros((6, 2), np.int64)),
        "shape (N,)",
    ),
    "1d-latents": (lambda f: _pair(f, np.ones(6, np.float32), np.arange(6)), "shape (N, d"),
    "missing-y": (lambda f: _pair(f, np.ones((6, 2), np.float32), None), "labels file not found"),
    "missing-z": (lambda f: _pair(f, None, np.arange(6)), "has no z.npy"),
    "nan": (
        lambda f: _pair(
            f, np.array([[0, np.nan]] + [[i, i] for i in range(5)], np.float16), np.arange(6)
        ),
        "NaN or inf",
    ),
    "not-npy": (
        lambda f: (_pair(f, None, np.arange(6)), (f / "z.npy").write_bytes(b"PK\x03\x04junk"))[0],
        "not a .npy file",
    ),
    "truncated": (
        lambda f: (
            _pair(f, np.ones((600, 8), np.float32), np.arange(600)),
            (f / "z.npy").write_bytes((f / "z.npy").read_bytes()[:500]),
        )[0],
        "cannot read",
    ),
}


@pytest.mark.parametrize("case", sorted(NPY_BAD_INPUTS))
def test_bad_npy_pair_gives_one_line_and_exit_code_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = NPY_BAD_INPUTS[case]
    folder = make(tmp_path / "latents")
    out = tmp_path / "out.npz"
    line = run_error([str(folder), str(out)], capsys)
    assert line.startswith("lcc cluster: error: ")
    assert expected in line
    assert not out.exists()


def test_latents_npy_needs_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npy_pair(tmp_path / "pair")
    z_file, out = str(tmp_path / "pair" / "z.npy"), str(tmp_path / "out.npz")
    assert "--labels" in run_error([z_file, out], capsys)
    missing = run_error([z_file, out, "--labels", str(tmp_path / "nope.npy")], capsys)
    assert "labels file not found" in missing
    npz = latents(tmp_path / "l.npz", n=50)
    assert ".npy latents only" in run_error([str(npz), out, "--labels", z_file], capsys)


def test_stage_seconds_reach_a_log_only_for_slow_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import lcc.cli.cluster as cluster_module

    source = str(latents(tmp_path / "latents.npz"))
    out = str(tmp_path / "out.npz")
    _, _, quick = run_cli([source, out], capsys)
    assert quick == ""  # a quick run off a terminal prints nothing
    monkeypatch.setattr(cluster_module, "QUIET_SECONDS", 0.0)  # every run counts as slow
    code, stdout, stderr = run_cli([source, out], capsys)
    assert code == 0 and len(stdout.splitlines()) == 1
    lines = stderr.splitlines()
    assert "\r" not in stderr and "\x1b" not in stderr
    stages = [line.split()[2] for line in lines[:-1]]
    assert stages == ["load", "check", "knn", "graph", "cluster", "match", "targets", "write"]
    assert all(line.startswith("lcc cluster: ") and " s (total " in line for line in lines[:-1])
    assert lines[-1].startswith(f"lcc cluster: wrote {out}")


def test_orthogonal_correction_and_bandwidth_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--correction/--tangent-k/--tangent-dim write the effective targets z - P_perp(z - t)
    (the pull they leave is shorter than the plain one); --bandwidth reaches the graph."""
    from lcc.engine.orthogonal import orthogonal_targets
    from lcc.engine.targets import Targets

    source = latents(tmp_path / "latents.npz")
    z = np.load(source)["z"]
    plain_out, ortho_out = tmp_path / "plain.npz", tmp_path / "ortho.npz"
    assert run_cli([str(source), str(plain_out)], capsys)[0] == 0
    args = ["--correction", "orthogonal", "--tangent-k", "10", "--tangent-dim", "0.8"]
    code, stdout, _ = run_cli([str(source), str(ortho_out), *args], capsys)
    summary = json.loads(stdout)
    assert code == 0 and summary["correction"] == "orthogonal" and summary["tangent_dim"] == 0.8
    plain, ortho = np.load(plain_out), np.load(ortho_out)
    rows = np.flatnonzero(plain["correctible"])
    assert rows.size and summary["orthogonal_projected"] == rows.size
    expected = orthogonal_targets(
        z, plain["clusters"], Targets(rows, plain["targets"][rows], n_samples=len(z)),
        tangent_k=10, tangent_dim=0.8,
    )  # fmt: skip
    np.testing.assert_allclose(ortho["targets"][rows], expected.targets.vectors, atol=1e-5)
    kept = np.linalg.norm(z[rows] - ortho["targets"][rows], axis=1)
    assert np.all(kept <= np.linalg.norm(z[rows] - plain["targets"][rows], axis=1) + 1e-5)
    code, stdout, _ = run_cli(
        [str(source), str(plain_out), "--weights", "rbf", "--bandwidth", "1"], capsys
    )
    assert code == 0 and json.loads(stdout)["bandwidth"] == 1.0
    line = run_error([str(source), str(plain_out), "--bandwidth", "2"], capsys)
    assert "applies to weights=rbf only" in line
