"""The registry: specs, options, help, and LCC as one regulariser among others."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lcc.engine.refresh import RefreshConfig, refresh
from lcc.errors import LCCInputError
from lcc.regularisers import (
    REGISTRY,
    Batch,
    Registration,
    Regulariser,
    RegulariserOptions,
    TrainingLatents,
    build_regulariser,
    option,
    options_class,
    parse_spec,
    regulariser_class,
    regulariser_help,
    regulariser_summary,
)
from lcc.regularisers.lcc import LCC, LCCOptions
from lcc.synthetic import gaussian_mixture


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("lcc", ("lcc", {})),
        ("lcc:k=10", ("lcc", {"k": "10"})),
        ("label-variation:w=0.1", ("label-variation", {"weight": "0.1"})),
        ("lcc:layers=a,b,k=3", ("lcc", {"layers": ["a", "b"], "k": "3"})),
        ("lcc:layers=a,b,c", ("lcc", {"layers": ["a", "b", "c"]})),
        ({"name": "lcc", "k": 4, "policy-size": 2}, ("lcc", {"k": 4, "policy_size": 2})),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty regulariser spec"),
        ("lcc:a", "cannot read 'a'"),
        ({"k": 3}, "needs a name"),
        ("lcd", "unknown regulariser 'lcd' (did you mean 'lcc'?)"),
        ("lcc:kk=3", "unknown option 'kk' of lcc (did you mean 'k'?)"),
        ("lcc:k=0,layers=fc", "k must be an integer >= 1, got 0"),
        ("lcc:k=x,layers=fc", "k must be an integer, got 'x'"),
        ("lcc:method=kmeans,layers=fc", "method='kmeans' is not one of"),
        ("lcc:layers=output", "'output' (the logits) is not one"),
        ("lcc:weight=-1,layers=fc", "weight must be a finite number >= 0"),
    ],
)
def test_bad_specs_name_the_fix(spec, message):
    with pytest.raises(LCCInputError) as caught:
        build_regulariser(spec)
    assert message in str(caught.value)


def test_spec_values_reach_the_options_and_defaults_fill_the_rest():
    reg = build_regulariser("lcc:k=7,squared=true", layers=["fc"], k=3, weight=0.5)
    assert isinstance(reg, LCC)
    assert (reg.config.k, reg.config.squared, reg.weight, reg.layers) == (7, True, 0.5, ("fc",))
    # a default for an option the class does not have is ignored, not an error
    assert build_regulariser("lcc", layers=["fc"], not_an_option=1).config.k == 5


def test_every_registered_class_is_named_as_registered_and_documented():
    for name in REGISTRY:
        cls = regulariser_class(name)
        assert cls.name == name
        text = regulariser_help(name)
        assert text.startswith(f"--reg {name}: ")
        for field in ("layers", "weight", "warmup"):
            assert f"  {field} " in text, (name, field)


def test_help_shows_each_lcc_option_with_its_default():
    text = regulariser_help("lcc")
    assert "[default: 5]" in text.split("  k ")[1].splitlines()[0]
    assert "one of leiden, louvain, peer-pressure" in text


def test_lcc_weight_is_not_switched_off_by_warmup():
    # LCC's warmup schedules refreshes; its term is zero anyway until targets are installed
    reg = LCC(layers=["fc"], warmup=3, weight=0.2)
    assert reg.weight_at(0) == 0.2 and [reg.needs_training_latents(e) for e in (2, 3)] == [
        False,
        True,
    ]


def test_lcc_refreshes_on_the_labelled_rows_only():
    z, y, _ = gaussian_mixture(
        n_samples=300, dim=6, n_classes=3, clusters_per_class=2, separation=2.5, seed=3
    )
    rng = np.random.default_rng(0)
    unlabelled = rng.random(len(y)) < 0.4
    y_seen = np.where(unlabelled, -1, y)
    reg = LCC(layers=["fc"], k=4, knn="exact", warmup=0)
    state = reg.compute(TrainingLatents({"fc": z}, y_seen, None, "fresh", 0.0), epoch=0)
    # oracle: the engine on the labelled subset, indices mapped back by hand
    rows = np.flatnonzero(~unlabelled)
    expected = refresh(z[rows], y[rows], RefreshConfig(k=4, knn="exact"))
    layer = state.layers["fc"]
    np.testing.assert_array_equal(layer.target_indices, rows[expected.targets.indices])
    np.testing.assert_allclose(layer.target_vectors, expected.targets.vectors)
    assert (layer.clusters[unlabelled] == -1).all()
    np.testing.assert_array_equal(layer.clusters[rows], expected.clusters)
    reg.install(state)
    # unlabelled samples get no target: a batch of them costs nothing
    zt = torch.from_numpy(z).requires_grad_(True)
    only_unlabelled = torch.from_numpy(np.flatnonzero(unlabelled))
    batch = Batch({"fc": zt[only_unlabelled]}, None, only_unlabelled, None)
    assert float(reg(batch).detach()) == 0.0


def test_lcc_options_validate_policy_size():
    with pytest.raises(LCCInputError, match="needs a policy_size"):
        LCCOptions(layers=["fc"], class_policy="top-pairs")
    with pytest.raises(LCCInputError, match="only used by"):
        LCCOptions(layers=["fc"], policy_size=3)


def test_a_key_given_twice_in_a_spec_is_refused():
    with pytest.raises(LCCInputError, match="gives 'k' twice"):
        parse_spec("lcc:k=5,k=6")


# --------------------------------------------------------------------------- --help-reg start-up

REPO = Path(__file__).resolve().parents[2]
#: what ``--help-reg`` must not import (each takes seconds on 2 cores)
HEAVY = ("torch", "sklearn", "lightning", "scipy")
#: runs ``lcc train --help-reg`` and ``--help-reg NAME`` for every name in one fresh interpreter,
#: then prints the texts and the heavy packages imported meanwhile
_HELP_PROBE = """
import contextlib, io, json, sys
from lcc.cli import main
from lcc.regularisers import REGISTRY
texts = {}
for name in ["", *REGISTRY]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "--help-reg", *([name] if name else [])])
    texts[name] = (code, out.getvalue())
heavy = [m for m in %r if m in sys.modules]
print(json.dumps({"texts": texts, "heavy": heavy}))
"""


def _option_rows(text: str) -> dict[str, str]:
    """{option: its help text on one line} of a ``--help-reg NAME`` text."""
    rows: dict[str, str] = {}
    last = None
    for line in text.split("\noptions (", 1)[1].splitlines()[1:]:
        if line.startswith(" " * 19) and last is not None:
            rows[last] += " " + line.strip()
        elif line.startswith("  ") and line.strip():
            last, _, rest = line.strip().partition(" ")
            rows[last] = rest.strip()
    return rows


def test_help_reg_imports_no_heavy_package_and_lists_every_option_with_its_default():
    done = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE % (HEAVY,)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["heavy"] == [], f"--help-reg imported {result['heavy']}"
    code, listing = result["texts"][""]
    assert code == 0
    for name in REGISTRY:
        assert f"  {name:<16} {regulariser_summary(name)}" in listing
        code, text = result["texts"][name]
        assert code == 0 and text.startswith(f"--reg {name}: ")
        fields = dataclasses.fields(regulariser_class(name).Options)  # the class, with torch
        rows = _option_rows(text)
        assert list(rows) == [item.name for item in fields], name
        for item in fields:
            default = item.default_factory() if callable(item.default_factory) else item.default
            shown = "the trainer's --layers" if item.name == "layers" and default == [] else default
            assert rows[item.name].endswith(f"[default: {shown}]"), (name, item.name)


def test_each_registration_names_the_options_its_class_uses_and_its_own_summary():
    summaries = set()
    for name, entry in REGISTRY.items():
        assert isinstance(entry, Registration) and entry.options, name
        assert options_class(name) is regulariser_class(name).Options, name
        summary = regulariser_summary(name)
        assert summary and "\n" not in summary and summary not in summaries, name
        summaries.add(summary)
    assert regulariser_summary("lcc").startswith("Latent Cluster Correction: pull each")


@dataclass
class _EchoOptions(RegulariserOptions):
    loudness: int = option(3, "how loud")


class _Echo(Regulariser):
    """Toy registered by a bare "module:Class": its summary is this paragraph.

    Not this one."""

    name = "echo"
    Options = _EchoOptions

    def forward(self, batch: Batch) -> torch.Tensor:
        return torch.zeros(())


def test_a_bare_module_class_string_still_registers_one(monkeypatch):
    monkeypatch.setitem(REGISTRY, "echo", f"{__name__}:_Echo")
    assert regulariser_class("echo") is _Echo and options_class("echo") is _EchoOptions
    assert regulariser_summary("echo") == (
        'Toy registered by a bare "module:Class": its summary is this paragraph.'
    )
    text = regulariser_help("echo")
    assert _option_rows(text)["loudness"] == "how loud [default: 3]"
    assert build_regulariser("echo:loudness=5").options.loudness == 5
    with pytest.raises(LCCInputError, match="unknown regulariser 'ecko' \\(did you mean 'echo'"):
        options_class("ecko")
