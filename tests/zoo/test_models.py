"""Tests for lcc.zoo.models: built-ins, head replacement, checkpoints, adapters, external zoos.

External models: transformers models are built offline from tiny configs saved here;
timm/torchvision tests skip with the reason when they cannot be imported.
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import lcc.zoo.models as models_module
from lcc.errors import LCCInputError
from lcc.zoo.latents import list_layers
from lcc.zoo.models import InputAdapter, build_model, find_head, load_checkpoint, replace_head


def randomise(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator).abs() + 0.1)
    return model.eval()


@pytest.mark.parametrize("spec", ["small-cnn", "small-resnet"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (3, 7, 9)])
def test_builtins_map_images_to_logits(spec, shape):
    model = build_model(spec, 7, input_shape=shape)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_builtin_layer_names_and_shapes():
    cnn = dict(
        list_layers(
            build_model("small-cnn", 10, input_shape=(1, 28, 28)), torch.zeros(1, 1, 28, 28)
        )
    )
    assert cnn["features.block1"] == (16, 14, 14) and cnn["features.block2"] == (32, 7, 7)
    assert cnn["fc1"] == (128,) and cnn["act1"] == (128,) and cnn["head"] == (10,)
    resnet = build_model("small-resnet", 5, input_shape=(3, 32, 32))
    shapes = dict(list_layers(resnet, torch.zeros(1, 3, 32, 32)))
    assert shapes["stem"] == (16, 32, 32) and shapes["layer1"] == (16, 32, 32)
    assert shapes["layer2"] == (32, 16, 16) and shapes["layer3"] == (64, 8, 8)
    assert shapes["pool"] == (64, 1, 1) and shapes["fc"] == (5,)
    assert find_head(resnet) == "fc"


def test_basic_block_by_hand():
    torch.manual_seed(0)
    block = randomise(build_model("small-resnet", 2, input_shape=(1, 8, 8)), 1).layer2
    x = torch.randn(2, 16, 8, 8)
    # oracle: the residual formula written with functional ops and the block's weights
    y = torch.nn.functional.conv2d(x, block.conv1.weight, stride=2, padding=1)
    y = torch.relu(
        torch.nn.functional.batch_norm(
            y, block.bn1.running_mean, block.bn1.running_var, block.bn1.weight, block.bn1.bias
        )
    )
    y = torch.nn.functional.conv2d(y, block.conv2.weight, padding=1)
    y = torch.nn.functional.batch_norm(
        y, block.bn2.running_mean, block.bn2.running_var, block.bn2.weight, block.bn2.bias
    )
    conv, bn = block.shortcut[0], block.shortcut[1]
    s = torch.nn.functional.conv2d(x, conv.weight, stride=2)
    s = torch.nn.functional.batch_norm(s, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    torch.testing.assert_close(block(x), torch.relu(y + s))


def test_seeded_initialisation_is_reproducible():
    torch.manual_seed(3)
    a = build_model("small-cnn", 4, input_shape=(1, 12, 12))
    torch.manual_seed(3)
    b = build_model("small-cnn", 4, input_shape=(1, 12, 12))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(LCCInputError) as info:
        build_model("resnet9000", 10, input_shape=(1, 28, 28))
    assert "small-cnn" in str(info.value) and "hf:NAME" in str(info.value)
    with pytest.raises(LCCInputError, match="num_classes"):
        build_model("small-cnn", 0, input_shape=(1, 28, 28))
    with pytest.raises(LCCInputError, match="input_shape"):
        build_model("small-cnn", 3, input_shape=(28, 28))
    with pytest.raises(LCCInputError, match="after the colon"):
        build_model("timm:", 3, input_shape=(1, 28, 28))


# --------------------------------------------------------------------------- heads


class WithFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.fc = nn.Linear(5, 1000)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x.flatten(1))))


class WithClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(5, 1000))

    def forward(self, x):
        return self.classifier(self.body(x.flatten(1)))


class WithHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(5, 1000))

    def forward(self, x):
        return self.heads(self.body(x.flatten(1)))


class WithConvClassifier(nn.Module):  # squeezenet-style
    def __init__(self):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Dropout(0.0), nn.Conv2d(1, 1000, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x):
        return self.classifier(x).flatten(1)


@pytest.mark.parametrize(
    ("cls", "where"),
    [
        (WithFc, "fc"),
        (WithClassifier, "classifier.1"),
        (WithHeads, "heads.head"),
        (WithConvClassifier, "classifier.1"),
    ],
)
def test_replace_head_keeps_the_body(cls, where):
    torch.manual_seed(0)
    model = cls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert replace_head(model, 3) == where
    assert model(torch.randn(2, 1, 2, 3)).shape == (2, 3)
    for key, value in model.state_dict().items():
        if not key.startswith(where):
            assert torch.equal(value, before[key])


def test_replace_head_without_a_head_is_an_error():
    with pytest.raises(LCCInputError, match="classification head"):
        replace_head(nn.Sequential(nn.ReLU()), 3)


# --------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass
class Hyper:  # a pickled object that weights-only loading refuses
    lr: float = 0.1


class Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_round_trips(tmp_path):
    source = randomise(build_model("small-cnn", 10, input_shape=(1, 16, 16)), 1)
    x = torch.randn(4, 1, 16, 16)
    want = source(x)
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)
    lightning = tmp_path / "run.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}
            | {"lcc_loss.dummy": torch.zeros(1)},
            "hyper_parameters": {"lr": 0.1, "layers": ["act1"]},  # plain values, as Lightning
            "epoch": 3,
        },
        lightning,
    )
    from safetensors.torch import save_file

    safe = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, safe)
    for path in (plain, lightning, safe):
        torch.manual_seed(9)
        model = build_model("small-cnn", 10, input_shape=(1, 16, 16), checkpoint=path).eval()
        torch.testing.assert_close(model(x), want)


def test_checkpoint_with_another_head_keeps_the_new_head(tmp_path):
    source = randomise(build_model("small-cnn", 10, input_shape=(1, 16, 16)), 1)
    path = tmp_path / "ten.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(5)
    fresh = build_model("small-cnn", 3, input_shape=(1, 16, 16))
    with pytest.warns(UserWarning, match="kept the new classification head"):
        skipped = load_checkpoint(fresh, path)
    assert skipped == ["head.bias", "head.weight"]
    torch.manual_seed(5)
    reference = build_model("small-cnn", 3, input_shape=(1, 16, 16))
    for key, value in fresh.state_dict().items():
        if key.startswith("head."):
            assert torch.equal(value, reference.state_dict()[key])
        else:
            assert torch.equal(value, source.state_dict()[key])


def test_checkpoint_errors(tmp_path):
    with pytest.raises(LCCInputError, match="does not exist"):
        build_model("small-cnn", 3, input_shape=(1, 8, 8), checkpoint=tmp_path / "none.pt")
    path = tmp_path / "resnet.pt"
    torch.save(build_model("small-resnet", 3, input_shape=(1, 8, 8)).state_dict(), path)
    with pytest.raises(LCCInputError, match="does not match the model"):
        build_model("small-cnn", 3, input_shape=(1, 8, 8), checkpoint=path)
    other = tmp_path / "wide.pt"
    torch.save(build_model("small-cnn", 3, input_shape=(1, 16, 16)).state_dict(), other)
    with pytest.raises(LCCInputError, match="another shape"):
        build_model("small-cnn", 3, input_shape=(1, 8, 8), checkpoint=other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(LCCInputError, match="cannot read"):
        build_model("small-cnn", 3, input_shape=(1, 8, 8), checkpoint=junk)
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LCCInputError, match="cannot read checkpoint"):
        build_model("small-cnn", 3, input_shape=(1, 8, 8), checkpoint=bad_safetensors)


def test_checkpoint_with_pickled_objects_is_refused_without_a_retry(tmp_path):
    source = build_model("small-cnn", 3, input_shape=(1, 8, 8))
    path = tmp_path / "hyper.ckpt"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": Hyper()}, path)
    with pytest.raises(LCCInputError) as caught:
        build_model("small-cnn", 3, input_shape=(1, 8, 8), checkpoint=path)
    message = str(caught.value)
    assert "\n" not in message
    assert "needs arbitrary unpickling (test_models.Hyper)" in message
    assert "execute code" in message and "safetensors" in message and "state_dict" in message


@pytest.mark.parametrize("protocol", ["torch.save", "pickle-2", "pickle-5"])
def test_malicious_checkpoint_never_runs(tmp_path, protocol):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    state = {"state_dict": build_model("small-cnn", 3, input_shape=(1, 8, 8)).state_dict()}
    state["x"] = Payload(marker)
    if protocol == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=int(protocol[-1])))
    with pytest.raises(LCCInputError, match=r"arbitrary unpickling \(io\.open[,)]"):
        build_model("small-cnn", 3, input_shape=(1, 8, 8), checkpoint=path)
    assert not marker.exists()


# --------------------------------------------------------------------------- adapters


def test_input_adapter_repeats_gray_and_resizes():
    x = torch.randn(2, 1, 5, 5)
    out = InputAdapter(1, 3)(x)
    assert out.shape == (2, 3, 5, 5)
    assert all(torch.equal(out[:, c], x[:, 0]) for c in range(3))
    constant = InputAdapter(3, 3, (9, 7))(torch.full((1, 3, 4, 4), 2.5))
    assert constant.shape == (1, 3, 9, 7)
    torch.testing.assert_close(constant, torch.full((1, 3, 9, 7), 2.5))
    with pytest.raises(LCCInputError, match="channels"):
        InputAdapter(4, 3)


def test_optional_zoos_are_not_imported_by_lcc():
    code = (
        "import sys, lcc, lcc.zoo.models, lcc.zoo.datasets, lcc.zoo.latents; "
        "zoos = ('transformers', 'timm', 'torchvision', 'datasets'); "
        "bad = [m for m in zoos if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_optional_zoo_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    for spec in ("torchvision:resnet18", "timm:resnet18"):
        with pytest.raises(LCCInputError) as info:
            build_model(spec, 3, input_shape=(1, 28, 28), pretrained=False)
        message = str(info.value)
        assert "pip install -c constraints.txt 'lcc[vision]'" in message
        assert "CPU" in message and "\n" not in message


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is optional (lcc[hf])")


def tiny_resnet_config(transformers, **kwargs):
    return transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **kwargs
    )


def tiny_vit_config(transformers, **kwargs):
    return transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        **kwargs,
    )


def test_hf_model_from_a_local_config(tmp_path, transformers):
    tiny_resnet_config(transformers).save_pretrained(tmp_path / "resnet")
    model = build_model(f"hf:{tmp_path / 'resnet'}", 5, input_shape=(1, 28, 28), pretrained=False)
    out = model(torch.randn(2, 1, 28, 28))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    names = dict(list_layers(model, torch.zeros(1, 1, 28, 28)))
    assert names["adapter"] == (3, 28, 28)
    assert "model.resnet.encoder.stages.0" in names and names["model.resnet.pooler"][0] == 16


def test_hf_vit_resized_to_its_image_size(tmp_path, transformers):
    tiny_vit_config(transformers).save_pretrained(tmp_path / "vit")
    model = build_model(f"hf:{tmp_path / 'vit'}", 3, input_shape=(1, 28, 28), pretrained=False)
    assert model.adapter.size == (16, 16)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    shapes = dict(list_layers(model, torch.zeros(1, 1, 28, 28)))
    assert shapes["adapter"] == (3, 16, 16)
    assert shapes["model.vit.embeddings"] == (17, 16)  # 16 patches + CLS token, width 16


def test_hf_pretrained_weights_with_a_new_head(tmp_path, transformers):
    torch.manual_seed(0)
    saved = transformers.AutoModelForImageClassification.from_config(
        tiny_vit_config(transformers, num_labels=7)
    )
    saved.save_pretrained(tmp_path / "vit7")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(f"hf:{tmp_path / 'vit7'}", 3, input_shape=(3, 16, 16))
    assert model.model.classifier.out_features == 3
    mine, theirs = model.model.state_dict(), saved.state_dict()
    body = [k for k in theirs if not k.startswith("classifier")]
    assert body and all(torch.equal(mine[k], theirs[k]) for k in body)


def test_hf_unreachable_weights_suggest_no_pretrained(tmp_path, transformers, monkeypatch):
    tiny_resnet_config(transformers).save_pretrained(tmp_path / "config-only")
    with pytest.raises(LCCInputError, match="--no-pretrained"):
        build_model(f"hf:{tmp_path / 'config-only'}", 3, input_shape=(1, 8, 8))
    monkeypatch.setattr(models_module, "hub_available", lambda: False)
    with pytest.raises(LCCInputError, match="--no-pretrained"):
        build_model("hf:lcc-tests/no-such-model", 3, input_shape=(1, 8, 8))
    with pytest.raises(LCCInputError, match="config"):
        build_model("hf:lcc-tests/no-such-model", 3, input_shape=(1, 8, 8), pretrained=False)


def test_hf_checkpoint_of_the_wrapped_model(tmp_path, transformers):
    tiny_resnet_config(transformers).save_pretrained(tmp_path / "r")
    spec = f"hf:{tmp_path / 'r'}"
    source = randomise(build_model(spec, 4, input_shape=(1, 12, 12), pretrained=False), 2)
    path = tmp_path / "hf.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    model = build_model(spec, 4, input_shape=(1, 12, 12), pretrained=False, checkpoint=path).eval()
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(model(x), source(x))


# --------------------------------------------------------------------------- timm / torchvision


def _importable(name: str) -> str | None:
    try:
        importlib.import_module(name)
    except Exception as error:  # ImportError, or a broken CUDA build raising RuntimeError
        return f"{name} cannot be imported here ({type(error).__name__}); it is an optional extra"
    return None


@pytest.mark.skipif(bool(_importable("timm")), reason=str(_importable("timm")))
def test_timm_model_without_pretrained_weights():
    model = build_model("timm:resnet18", 3, input_shape=(1, 32, 32), pretrained=False)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.skipif(bool(_importable("torchvision")), reason=str(_importable("torchvision")))
def test_torchvision_model_without_pretrained_weights():
    model = build_model("torchvision:resnet18", 3, input_shape=(1, 32, 32), pretrained=False)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert model.model.fc.out_features == 3
