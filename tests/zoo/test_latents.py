"""Tests for lcc.zoo.latents: hooks, pooling, layer names, list_layers, collect_latents.

Oracles: intermediate outputs computed by calling the submodules by hand, pooling by
explicit Python loops, and a per-sample loop over the dataset for collect_latents.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lcc.errors import LCCInputError
from lcc.zoo.latents import (
    LatentRecorder,
    check_layer_names,
    collect_latents,
    first_tensor,
    list_layers,
    pool_output,
)


class Net(nn.Module):
    """conv -> bn -> relu -> pool -> flatten -> fc1 -> act -> head, all named."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4 * 3 * 3, 8)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, classes)

    def stages(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = OrderedDict()
        for name in ("conv", "bn", "relu", "pool", "flatten", "fc1", "act", "head"):
            x = getattr(self, name)(x)
            out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)["head"]


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # non-trivial batch-norm statistics for eval mode
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def test_hooks_capture_what_each_submodule_computes():
    net = make_net()
    x = torch.randn(5, 2, 6, 6)
    expected = net.stages(x)
    layers = ["conv", "relu", "pool", "fc1", "act"]
    with LatentRecorder(net, layers) as recorder:
        logits = net(x)
    torch.testing.assert_close(logits, expected["head"])
    assert list(recorder.outputs) == layers
    for name in layers:
        torch.testing.assert_close(recorder.outputs[name], expected[name].reshape(5, -1))


def test_recorder_detaches_hooks_on_exit_and_attach_is_idempotent():
    net = make_net()
    recorder = LatentRecorder(net, ["fc1"]).attach().attach()
    net(torch.randn(2, 2, 6, 6))
    first = recorder.outputs["fc1"]
    recorder.detach()
    net(torch.randn(2, 2, 6, 6))
    assert recorder.outputs["fc1"] is first
    assert not recorder.attached
    assert len(net.fc1._forward_hooks) == 0


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pooling_of_conv_maps_matches_explicit_loops(pool):
    net = make_net()
    x = torch.randn(3, 2, 6, 6)
    conv = net.conv(x).detach()
    with LatentRecorder(net, ["conv"], pool=pool) as recorder:
        net(x)
    got = recorder.outputs["conv"].detach()
    assert got.shape == (3, 4)
    for b in range(3):
        for c in range(4):
            values = [float(conv[b, c, i, j]) for i in range(6) for j in range(6)]
            want = sum(values) / len(values) if pool == "avg" else max(values)
            assert abs(float(got[b, c]) - want) < 1e-5


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pooling_of_token_sequences_reduces_tokens(pool):
    tokens = torch.randn(2, 5, 3)  # (B, T, C)
    got = pool_output(tokens, pool)
    for b in range(2):
        for c in range(3):
            values = [float(tokens[b, t, c]) for t in range(5)]
            want = sum(values) / 5 if pool == "avg" else max(values)
            assert abs(float(got[b, c]) - want) < 1e-6


def test_pool_flatten_and_vectors():
    assert pool_output(torch.zeros(4, 2, 3, 5)).shape == (4, 30)
    assert pool_output(torch.zeros(4)).shape == (4, 1)
    assert pool_output(torch.zeros(4, 7), "max").shape == (4, 7)
    with pytest.raises(LCCInputError):
        pool_output(torch.tensor(1.0))


def test_bad_pool_is_rejected():
    with pytest.raises(LCCInputError, match="pool"):
        LatentRecorder(make_net(), ["fc1"], pool="median")


def test_gradients_flow_through_recorded_outputs():
    net = make_net()
    x = torch.randn(4, 2, 6, 6)
    with LatentRecorder(net, ["fc1"]) as recorder:
        net(x)
    assert recorder.outputs["fc1"].requires_grad
    recorder.outputs["fc1"].square().sum().backward()
    got = net.conv.weight.grad.clone()
    # oracle: the same quantity through the manual path, fresh gradients
    net.zero_grad()
    net.stages(x)["fc1"].square().sum().backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, net.conv.weight.grad)


class TupleBlock(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        y = self.lin(x)
        if self.kind == "tuple":
            return (y, None, y * 2)
        if self.kind == "nested":
            return [None, (y, y + 1)]
        if self.kind == "dict":
            return {"hidden": y, "other": y * 3}
        if self.kind == "none":
            return None
        return "not a tensor"


class Wrapper(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.block = TupleBlock(kind)

    def forward(self, x):
        out = self.block(x)
        return first_tensor(out) if out is not None and not isinstance(out, str) else x


@pytest.mark.parametrize("kind", ["tuple", "nested", "dict"])
def test_container_outputs_record_their_first_tensor(kind):
    torch.manual_seed(0)
    model = Wrapper(kind)
    x = torch.randn(4, 3)
    with LatentRecorder(model, ["block"]) as recorder:
        model(x)
    torch.testing.assert_close(recorder.outputs["block"], model.block.lin(x))


def test_model_output_records_first_tensor():
    modeling_outputs = pytest.importorskip(
        "transformers.modeling_outputs", reason="transformers is optional"
    )
    hidden = torch.randn(2, 4)
    out = modeling_outputs.BaseModelOutput(last_hidden_state=hidden)
    assert first_tensor(out) is hidden


@pytest.mark.parametrize("kind", ["none", "string"])
def test_non_tensor_output_is_a_clear_error_naming_the_layer(kind):
    model = Wrapper(kind)
    with (
        LatentRecorder(model, ["block"]),
        pytest.raises(LCCInputError, match="layer 'block' returned"),
    ):
        model(torch.randn(2, 3))


def test_unknown_layer_lists_closest_names():
    with pytest.raises(LCCInputError) as info:
        check_layer_names(make_net(), ["fc2"])
    message = str(info.value)
    assert "'fc2'" in message and "fc1" in message and "\n" not in message
    with pytest.raises(LCCInputError, match="valid"):
        check_layer_names(make_net(), ["zzzzzzzz"])
    with pytest.raises(LCCInputError, match="no layer given"):
        check_layer_names(make_net(), [])


def test_check_layer_names_accepts_nested_names_and_a_string():
    model = nn.Sequential(OrderedDict(block=nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
    assert check_layer_names(model, "block.1") == ["block.1"]
    assert check_layer_names(model, ["block.0", "block", "block.0"]) == ["block.0", "block"]
    with pytest.raises(LCCInputError):
        check_layer_names(model, [""])  # the root module is not a layer


def test_list_layers_shapes_and_mode_restored():
    net = make_net()
    net.train()
    net.bn.eval()  # a frozen sub-module must stay frozen
    x = torch.randn(1, 2, 6, 6)
    before = net.bn.running_mean.clone()
    listed = list_layers(net, x)
    manual = {name: tuple(t.shape[1:]) for name, t in net.eval().stages(x).items()}
    assert listed == list(manual.items())
    net.train()
    net.bn.eval()
    torch.testing.assert_close(net.bn.running_mean, before)


def test_list_layers_restores_mixed_modes_exactly():
    net = make_net()
    net.train()
    net.bn.eval()
    list_layers(net, torch.randn(1, 2, 6, 6))
    assert net.training and net.conv.training and not net.bn.training


def test_list_layers_skips_unused_modules():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(2, 3)
            self.unused = nn.Linear(5, 5)

        def forward(self, x):
            return self.used(x)

    assert list_layers(Partial(), torch.zeros(1, 2)) == [("used", (3,))]


def _loader(n=23, batch_size=5, shuffle=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    data = TensorDataset(x, y, torch.arange(n))
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator), x, y


def test_collect_latents_equals_a_per_sample_loop_in_index_order():
    net = make_net()
    net.train()
    loader, x, y = _loader()
    latents, labels, predictions = collect_latents(net, loader, ["pool", "fc1"], device="cpu")
    assert net.training  # mode restored
    net.eval()
    with torch.no_grad():
        for i in range(x.shape[0]):
            stages = net.stages(x[i : i + 1])
            np.testing.assert_allclose(
                latents["pool"][i], stages["pool"].reshape(-1).numpy(), rtol=1e-5, atol=1e-5
            )
            np.testing.assert_allclose(
                latents["fc1"][i], stages["fc1"].reshape(-1).numpy(), rtol=1e-5, atol=1e-5
            )
            assert predictions[i] == int(stages["head"].argmax())
    assert labels.tolist() == y.tolist()
    assert labels.dtype == np.int64 and predictions.dtype == np.int64
    assert latents["fc1"].dtype == np.float32 and latents["fc1"].shape == (23, 8)
    assert latents["pool"].shape == (23, 36)


def test_collect_latents_pooled_and_no_grad():
    net = make_net()
    loader, x, _ = _loader(n=7, batch_size=3)
    latents, _, _ = collect_latents(net, loader, ["conv"], pool="avg")
    with torch.no_grad():
        want = net.eval().conv(x).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(latents["conv"], want, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in net.parameters())


def test_collect_latents_rejects_partial_or_unindexed_loaders():
    net = make_net()
    loader, x, y = _loader(n=10, batch_size=4)
    partial = DataLoader(loader.dataset, batch_size=4, drop_last=True)
    with pytest.raises(LCCInputError, match="covered 8 of 10"):
        collect_latents(net, partial, ["fc1"])
    pairs = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(LCCInputError, match="IndexedDataset"):
        collect_latents(net, pairs, ["fc1"])
    with pytest.raises(LCCInputError, match="closest"):
        collect_latents(net, loader, ["fc"])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_collect_latents_into_memory_maps_matches_ram(tmp_path, dtype) -> None:
    net = make_net()
    loader, _, _ = _loader(shuffle=True)
    in_ram, labels, predictions = collect_latents(net, loader, ["pool", "fc1"])
    mapped, labels_m, predictions_m = collect_latents(
        net, loader, ["pool", "fc1"], memmap_dir=tmp_path, memmap_dtype=dtype
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fc1.npy", "pool.npy"]
    for name in ("pool", "fc1"):
        assert isinstance(mapped[name], np.memmap) and mapped[name].dtype == dtype
        np.testing.assert_array_equal(mapped[name], in_ram[name].astype(dtype))
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), mapped[name])
    assert labels_m.tolist() == labels.tolist()
    assert predictions_m.tolist() == predictions.tolist()


def test_collect_latents_memory_maps_leave_nothing_on_failure(tmp_path) -> None:
    net = make_net()
    loader, _, _ = _loader(n=10, batch_size=4)
    partial = DataLoader(loader.dataset, batch_size=4, drop_last=True)
    with pytest.raises(LCCInputError, match="covered 8 of 10"):
        collect_latents(net, partial, ["fc1"], memmap_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LCCInputError, match="float16 or float32"):
        collect_latents(net, loader, ["fc1"], memmap_dir=tmp_path, memmap_dtype=np.int8)
    with pytest.raises(LCCInputError, match="not a directory"):
        collect_latents(net, loader, ["fc1"], memmap_dir=tmp_path / "missing")


def test_probe_latents_runs_in_eval_mode_and_restores_each_flag():
    from lcc.zoo.latents import probe_latents

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)
    )
    model[2].eval()  # a submodule frozen in eval stays so
    x = torch.randn(6, 3)
    latents, logits = probe_latents(model, x, ["1", "2"])
    flags = [m.training for m in model]
    assert flags == [True, True, False, True]
    with torch.no_grad():  # oracle: the same layers in eval mode by hand
        bn = torch.nn.functional.batch_norm(
            model[0](x), model[1].running_mean, model[1].running_var, model[1].weight,
            model[1].bias, training=False,
        )  # fmt: skip
    torch.testing.assert_close(latents["1"], bn)
    torch.testing.assert_close(latents["2"], bn)  # dropout off in eval
    torch.testing.assert_close(logits, model[3](bn).detach())
    assert not latents["1"].requires_grad and not logits.requires_grad


def test_probe_latents_names_a_layer_that_does_not_run():
    from lcc.zoo.latents import probe_latents

    class Skips(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = Skips()
    with pytest.raises(LCCInputError, match="'unused' did not run"):
        probe_latents(model, torch.ones(2, 2), ["unused"])
    assert model.training
