"""``lcc measure``: JSON lines from files, a model on digits and the example; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_safetensors

from lcc.analysis import intraclass
from lcc.cli import main
from lcc.synthetic import gaussian_mixture

SMALL_CNN_LAYERS = ["features.block1.bn", "features.block2.bn", "fc1"]


def hierarchical(n: int = 240, seed: int = 0):
    z, classes, subclasses = gaussian_mixture(
        n, 10, 3, 2, separation=2.5, noise=1.0, intrinsic_dim=6, seed=seed
    )
    return z, subclasses, classes


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    code = main(["measure", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    return [json.loads(line) for line in captured.out.splitlines()]


def run_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run, expect exit code 2, nothing on stdout and one stderr line; return that line."""
    try:
        code = main(["measure", *args])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("usage:"), captured.err
    return lines[-1]


def values(lines: list[dict], measure: str) -> dict[str, float]:
    return {line["layer"]: line["value"] for line in lines if line["measure"] == measure}


# --------------------------------------------------------------------------- files


def test_one_layer_npz_with_a_custom_superclass_key(tmp_path, capsys):
    z, sub, sup = hierarchical()
    path = tmp_path / "latents.npz"
    np.savez(path, z=z, y=sub, coarse=sup)
    args = [str(path), "--measure", "c1,c2,c3,c4", "--top-k", "3", "--superclass-key", "coarse"]
    lines = run_cli(args, capsys)
    assert [(line["measure"], line["layer"]) for line in lines] == [
        ("c1", "z"),
        ("c2", "z"),
        ("c3", "z"),
        ("c4", "z"),
    ]
    assert lines[0]["value"] == pytest.approx(intraclass.c1(z, sub, sup, top_k=3))
    assert lines[1]["value"] == pytest.approx(intraclass.c2(z, sub, sup))
    assert lines[2]["value"] == pytest.approx(intraclass.c3(z, sup, top_k=3))
    assert lines[3]["value"] == pytest.approx(intraclass.c4(z, sup))
    assert all(line["n"] == 240 and line["higher_is_better"] for line in lines)


def test_several_layers_conv_maps_and_layer_selection(tmp_path, capsys):
    z, sub, sup = hierarchical(seed=1)
    rng = np.random.default_rng(1)
    conv = rng.normal(size=(240, 4, 3, 3)) + z[:, :4, None, None]
    path = tmp_path / "layers.npz"
    np.savez(path, **{"z_fc": z, "z_block.bn": conv, "y": sub, "y_super": sup})
    lines = run_cli([str(path), "--top-k", "2", "--top-layers", "1"], capsys)  # auto: c1-c4
    assert {line["measure"] for line in lines} == {"c1", "c2", "c3", "c4"}
    c2 = values(lines, "c2")
    assert sorted(c2) == ["all", "block.bn", "fc"]
    pooled = conv.max(axis=(2, 3))
    assert c2["block.bn"] == pytest.approx(intraclass.c2(pooled, sub, sup))
    assert c2["all"] == pytest.approx(intraclass.c2([z, pooled], sub, sup, top_k=1))
    assert values(lines, "c3")["all"] == pytest.approx(intraclass.c3([z, pooled], sup, top_k=2))
    only = run_cli([str(path), "--measure", "c3", "--layers", "fc"], capsys)
    assert [line["layer"] for line in only] == ["fc"]


def test_safetensors_input_matches_npz(tmp_path, capsys):
    z, sub, _ = hierarchical(seed=2)
    np.savez(tmp_path / "a.npz", z=z, y=sub)
    save_safetensors({"z": z, "y": sub}, str(tmp_path / "a.safetensors"))
    from_npz = run_cli([str(tmp_path / "a.npz"), "--measure", "c3,c4"], capsys)
    from_st = run_cli([str(tmp_path / "a.safetensors"), "--measure", "c3,c4"], capsys)
    assert from_npz == from_st
    assert from_npz[0]["labels"] == "y"


def test_label_variation_line(tmp_path, capsys):
    z, _, sup = hierarchical(seed=3)
    z = np.abs(z)
    path = tmp_path / "l.npz"
    np.savez(path, z=z, y=sup)
    args = [str(path), "--measure", "label-variation", "--k", "7", "--similarity", "cosine"]
    (line,) = run_cli(args, capsys)
    assert {"measure", "value", "n", "k", "label_variation", "label_variation_normalized"} <= set(
        line
    )
    assert line["measure"] == "label-variation"
    assert (line["n"], line["k"], line["similarity"], line["normalize"]) == (
        240,
        7,
        "cosine",
        False,
    )
    assert 0 < line["label_variation_normalized"] < 1
    assert line["value"] == line["label_variation_normalized"]
    (normalized,) = run_cli([*args, "--normalize"], capsys)
    assert normalized["normalize"] is True
    assert normalized["label_variation"] != pytest.approx(line["label_variation"])
    (rbf,) = run_cli([str(path), "--measure", "label-variation", "--similarity", "rbf"], capsys)
    assert rbf["similarity"] == "rbf" and rbf["k"] == 10


def test_clusters_line_with_predictions(tmp_path, capsys):
    z, _, sup = hierarchical(seed=4)
    predictions = np.where(np.arange(240) % 4 == 0, (sup + 1) % 3, sup)
    path = tmp_path / "p.npz"
    np.savez(path, z=z, y=sup, predictions=predictions)
    (line,) = run_cli(
        [str(path), "--measure", "clusters", "--k", "6", "--method", "louvain"], capsys
    )
    expected = intraclass.cluster_measure(z, sup, predictions, k=6, method="louvain")
    assert line["value"] == pytest.approx(expected["misclustered_fraction"])
    assert line["accuracy"] == pytest.approx(0.75)
    for key in ("n_clusters", "accuracy_cc", "accuracy_mc", "k", "method"):
        assert line[key] == expected[key]


def test_relu_active_and_bandwidth_options_reach_the_measures(tmp_path, capsys):
    z, sub, sup = hierarchical(seed=5)
    path = tmp_path / "o.npz"
    np.savez(path, z=z, y=sub, y_super=sup)
    (c2,) = run_cli([str(path), "--measure", "c2", "--no-relu"], capsys)
    assert c2["relu"] is False
    assert c2["value"] == pytest.approx(intraclass.c2(z, sub, sup, relu=False))
    assert c2["value"] != pytest.approx(intraclass.c2(z, sub, sup))
    (c4,) = run_cli([str(path), "--measure", "c4", "--active", "0.5"], capsys)
    assert c4["active"] == 0.5
    assert c4["value"] == pytest.approx(intraclass.c4(z, sup, active=0.5))
    assert c4["value"] != pytest.approx(intraclass.c4(z, sup))
    args = [str(path), "--measure", "label-variation", "--similarity", "rbf"]
    (default,) = run_cli(args, capsys)
    (fixed,) = run_cli([*args, "--bandwidth", "0.5"], capsys)
    assert fixed["bandwidth"] == 0.5 and default["bandwidth"] != 0.5
    assert fixed["label_variation"] != pytest.approx(default["label_variation"])


def test_generated_example(capsys):
    lines = run_cli([], capsys)
    assert [line["measure"] for line in lines] == ["c1", "c2", "c3", "c4"]
    assert lines[1]["value"] > 0.2  # planted subclasses


# --------------------------------------------------------------------------- errors


@pytest.fixture
def latents_file(tmp_path):
    z, sub, _ = hierarchical(n=60)
    path = tmp_path / "lat.npz"
    np.savez(path, z=z, y=sub)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.npz"], "file not found: missing.npz"),
        (["{dir}/lat.txt"], "unknown file type '.txt'"),
        (["{lat}", "--measure", "c5"], "unknown measure 'c5'"),
        (["{lat}", "--measure", "c1,c2"], "c1 and c2 need superclass labels"),
        (["{lat}", "--superclass-key", "coarse"], "no key 'coarse' for --superclass-key"),
        (["{lat}", "--layers", "fc9"], "has no layer 'fc9'"),
        (["{lat}", "--measure", "clusters", "--k", "60"], "k=60 must be smaller"),
        (["{lat}", "--measure", "c4", "--active", "2"], "strictly between 0 and 1"),
        (["{lat}", "--top-k", "0"], "expected a positive integer, got 0"),
        (["{lat}", "--dataset", "digits"], "--dataset applies to --model only"),
        (["{lat}", "--model", "small-cnn"], "either LATENTS"),
        (["--model", "small-cnn", "--layers", "fc1"], "--model needs --dataset"),
        (["--layers", "fc1"], "the generated example has one layer, z"),
        (["{dir}/nolatents.npz"], "holds no latents"),
        (["{dir}/nolabels.npz"], "missing key(s) 'y'"),
        (["{dir}/nan.npz"], "NaN"),
        (["{dir}/corrupt.npz"], "not a .npz archive"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, latents_file, capsys):
    z, sub, _ = hierarchical(n=60)
    np.savez(tmp_path / "nolatents.npz", y=sub)
    np.savez(tmp_path / "nolabels.npz", z=z)
    bad = z.copy()
    bad[4, 2] = np.nan
    np.savez(tmp_path / "nan.npz", z=bad, y=sub)
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    (tmp_path / "lat.txt").write_text("x")
    args = [a.format(dir=tmp_path, lat=latents_file) for a in args]
    line = run_error(args, capsys)
    assert message in line, line


# --------------------------------------------------------------------------- model path


def test_model_on_digits_and_the_saved_latents_round_trip(tmp_path, capsys):
    saved = tmp_path / "digits.npz"
    base = ["--model", "small-cnn", "--dataset", "digits", "--subset", "200"]
    args = [*base, "--layers", *SMALL_CNN_LAYERS, "--measure", "c3,c4,clusters"]
    lines = run_cli([*args, "--save-latents", str(saved)], capsys)
    assert sorted(values(lines, "c3")) == sorted([*SMALL_CNN_LAYERS, "all"])
    assert sorted(values(lines, "clusters")) == sorted(SMALL_CNN_LAYERS)
    assert all(line["n"] == 200 for line in lines)
    assert values(lines, "c3")["features.block1.bn"] > 0
    clusters = [line for line in lines if line["measure"] == "clusters"]
    assert all(line["accuracy"] is not None for line in clusters)  # predictions collected
    with np.load(saved) as archive:
        arrays = {key: archive[key] for key in archive.files}
    assert arrays["z_features.block1.bn"].shape == (200, 16)  # channels: max-pooled maps
    assert arrays["z_fc1"].shape == (200, 128)
    # the same numbers from the saved file, and c1/c2 once superclasses are added
    again = run_cli([str(saved), "--measure", "c3,c4,clusters"], capsys)
    assert again == lines
    coarse = tmp_path / "coarse.npz"
    np.savez(coarse, **arrays, y_super=arrays["y"] // 5)
    hierarchical_lines = run_cli([str(coarse), "--measure", "c1,c2", "--layers", "fc1"], capsys)
    assert [line["measure"] for line in hierarchical_lines] == ["c1", "c2"]
    # c1 on a flat dataset: one line saying how to provide superclasses
    line = run_error([*base, "--layers", "fc1", "--measure", "c1"], capsys)
    assert "c1 needs superclass labels and dataset digits has no superclass labels" in line
    assert "--save-latents" in line
    line = run_error([*base, "--layers", "fc9"], capsys)
    assert "model has no layer 'fc9'" in line


@pytest.mark.slow
def test_model_checkpoint_and_split_are_used(tmp_path, capsys):
    from lcc.zoo.datasets import load_dataset
    from lcc.zoo.models import build_model

    torch.manual_seed(5)
    model = build_model("small-cnn", 10, input_shape=(1, 8, 8))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    base = ["--model", "small-cnn", "--dataset", "digits", "--layers", "fc1", "--measure", "c3"]
    seeded = run_cli([*base, "--seed", "5"], capsys)
    loaded = run_cli([*base, "--checkpoint", str(tmp_path / "model.pt")], capsys)
    fresh = run_cli(base, capsys)
    assert loaded == seeded
    assert loaded[0]["value"] != pytest.approx(fresh[0]["value"])
    test = run_cli([*base, "--split", "test"], capsys)
    bundle = load_dataset("digits", augment=False)
    assert (test[0]["n"], fresh[0]["n"]) == (len(bundle.test), len(bundle.train))
    assert test[0]["n"] != fresh[0]["n"]


def test_help_lists_every_measure_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["measure", "--help"])
    text = capsys.readouterr().out
    for word in (
        "c1",
        "c2",
        "c3",
        "c4",
        "clusters",
        "label-variation",
        "the paper's k = 30",
        "z_<LAYER>",
    ):
        assert word in text


# --------------------------------------------------------------------------- issue 17


def flat_predictions(n: int = 200, seed: int = 0):
    """10 separated classes, a model's perfect predictions of them and superclasses y // 5."""
    z, y, _ = gaussian_mixture(n, 8, 10, 1, separation=8.0, noise=0.5, seed=seed)
    return z, y, y.copy(), y // 5


def test_clusters_scores_fine_predictions_against_the_fine_labels(tmp_path, capsys):
    z, y, predictions, y_super = flat_predictions()
    path = tmp_path / "with_super.npz"
    np.savez(path, z=z, y=y, y_super=y_super, predictions=predictions)
    (line,) = run_cli([str(path), "--measure", "clusters"], capsys)
    expected = intraclass.cluster_measure(z, y, predictions, k=5, method="leiden")
    assert line["labels"] == "y"  # 10-class predictions belong to y, not to y_super (0..1)
    assert line["accuracy"] == pytest.approx(1.0)
    assert line["value"] == pytest.approx(expected["misclustered_fraction"])
    # predictions within y_super's range are the superclass model's (the paper's set-up)
    coarse = tmp_path / "coarse.npz"
    np.savez(coarse, z=z, y=y, y_super=y_super, predictions=y_super)
    (line,) = run_cli([str(coarse), "--measure", "clusters"], capsys)
    assert line["labels"] == "y_super" and line["accuracy"] == pytest.approx(1.0)


def test_predictions_beyond_every_label_range_are_one_line(tmp_path, capsys):
    z, y, predictions, y_super = flat_predictions()
    path = tmp_path / "bad.npz"
    np.savez(path, z=z, y=y, y_super=y_super, predictions=predictions + 3)
    line = run_error([str(path), "--measure", "clusters"], capsys)
    assert "predictions hold class 12 but the labels go y_super up to 1 and y up to 9" in line
    flat = tmp_path / "flat.npz"
    np.savez(flat, z=z, y=y, predictions=predictions + 3)
    assert "predictions hold class 12" in run_error([str(flat), "--measure", "clusters"], capsys)


def test_c1_with_top_k_over_the_neurons_warns_and_reports_the_effective_k(tmp_path, capsys):
    z, sub, sup = hierarchical()  # 10 neurons
    path = tmp_path / "h.npz"
    np.savez(path, z=z, y=sub, y_super=sup)
    assert main(["measure", str(path), "--measure", "c1", "--top-k", "10"]) == 0
    captured = capsys.readouterr()
    (line,) = [json.loads(text) for text in captured.out.splitlines()]
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("lcc measure: warning: c1 of layer z")
    assert "top_k=10 (--top-k) is not below its 10 neurons" in warning[0]
    assert line["top_k"] == 10 and line["value"] == pytest.approx(0.0, abs=1e-9)
    run_cli([str(path), "--measure", "c1", "--top-k", "9"], capsys)  # below: no warning


def test_a_directory_as_latents_says_so(tmp_path, capsys):
    line = run_error([str(tmp_path)], capsys)
    assert f"cannot read {tmp_path}: it is a directory" in line


def test_save_latents_refuses_to_replace_another_file_without_force(tmp_path, capsys):
    base = ["--model", "small-cnn", "--dataset", "digits", "--subset", "60", "--layers", "fc1"]
    base += ["--measure", "c3"]
    cluster_result = tmp_path / "clusters.npz"
    np.savez(cluster_result, clusters=np.zeros(3), cluster_class=np.zeros(1))
    refresh = tmp_path / "epoch_1_act1.npz"
    np.savez(refresh, z=np.zeros((3, 2)), y=np.zeros(3), clusters=np.zeros(3))
    for existing in (cluster_result, refresh):
        before = existing.read_bytes()
        line = run_error([*base, "--save-latents", str(existing)], capsys)
        assert f"--save-latents {existing} exists and is not latents saved by lcc measure" in line
        assert "--force" in line and existing.read_bytes() == before
    run_cli([*base, "--save-latents", str(refresh), "--force"], capsys)
    with np.load(refresh) as archive:
        assert {"z_fc1", "y", "predictions"} <= set(archive.files)
    run_cli([*base, "--save-latents", str(refresh)], capsys)  # its own output: replaced
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "weights.npz")
    line = run_error(
        [*base, "--checkpoint", str(tmp_path / "weights.npz"), "--save-latents",
         str(tmp_path / "weights.npz"), "--force"],
        capsys,
    )  # fmt: skip
    assert "is the input" in line
