"""Classifiers for LCC fine-tuning: built-in small CNNs and external model zoos.

``build_model(spec, num_classes, input_shape=(C, H, W))`` returns an ``nn.Module`` mapping
``(B, C, H, W)`` to logits ``(B, num_classes)``. Specs:

- ``small-cnn``: two conv blocks (``features.block1``, ``features.block2``) then ``fc1``,
  ``act1`` (its ReLU, a good LCC layer) and ``head``; fast on CPU at 28×28;
- ``small-resnet``: ``stem``, ``layer1``..``layer3`` (one basic block each), ``pool``, ``fc``;
- ``hf:NAME`` (``transformers`` image classifier; NAME may be a local directory),
  ``timm:NAME``, ``torchvision:NAME``: the classification head is replaced to
  ``num_classes``; the model sits under ``model.`` behind an input ``adapter`` that
  repeats gray channels to 3 and resizes to the model's declared input size.

transformers, timm and torchvision are optional and imported only when asked for.
Seed ``torch.manual_seed`` before calling for a reproducible initialisation.

>>> model = build_model("small-cnn", 10, input_shape=(1, 28, 28))
>>> model(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch  # noqa: F401 - the doctests use it
import torch.nn.functional as F
from torch import Tensor, nn

from lcc.errors import LCCInputError
from lcc.zoo.datasets import hub_available
from lcc.zoo.latents import first_tensor

__all__ = [
    "BUILTINS",
    "ExternalClassifier",
    "InputAdapter",
    "SmallCNN",
    "SmallResNet",
    "build_model",
    "find_head",
    "load_checkpoint",
    "replace_head",
]

BUILTINS = ("small-cnn", "small-resnet")
PREFIXES = ("hf:", "timm:", "torchvision:")
VISION_INSTALL = (
    "install it with `pip install -c constraints.txt 'lcc[vision]'` (torchvision's default "
    "wheel is a CUDA build that fails to import on CPU-only machines: use the CPU wheel from "
    "https://download.pytorch.org/whl/cpu matching your torch)"
)
HF_INSTALL = "install it with `pip install -c constraints.txt 'lcc[hf]'`"


# --------------------------------------------------------------------------- built-ins


def _conv_block(cin: int, cout: int, *, pool: bool = True, dropout: float = 0.0) -> nn.Sequential:
    parts: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        bn=nn.BatchNorm2d(cout),
        relu=nn.ReLU(),
    )
    if pool:
        parts["pool"] = nn.MaxPool2d(2, ceil_mode=True)
    if dropout > 0:
        parts["drop"] = nn.Dropout(dropout)
    return nn.Sequential(parts)


def _scaled(base: int, width: float) -> int:
    return max(1, round(base * width))


class SmallCNN(nn.Module):
    """Conv blocks (conv-bn-relu-maxpool; ``depth`` > 2 adds unpooled conv-bn-relu blocks at
    the last width; ``depth`` 0: none, an MLP on the flattened image without BatchNorm) and a
    two-layer MLP head; ``width`` multiplies every channel and unit count; ``dropout`` > 0 adds
    ``drop`` after each block and before the head.

    >>> SmallCNN(1, 10, (8, 8), depth=0).fc1
    Linear(in_features=64, out_features=128, bias=True)
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        *,
        widths: tuple[int, int] = (16, 32),
        hidden: int = 128,
        width: float = 1.0,
        depth: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = [_scaled(widths[0], width), _scaled(widths[1], width)]
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        cin = in_channels
        for index in range(depth):
            cout = channels[min(index, 1)]
            blocks[f"block{index + 1}"] = _conv_block(cin, cout, pool=index < 2, dropout=dropout)
            cin = cout
        self.features = nn.Sequential(blocks)
        pools = min(depth, 2)
        height, side = (-(-length // 2**pools) for length in image_size)  # ceil-mode pools
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(cin * height * side, _scaled(hidden, width))
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.head = nn.Linear(_scaled(hidden, width), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act1(self.fc1(self.flatten(self.features(x))))
        return self.head(hidden if self.drop is None else self.drop(hidden))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A tiny ResNet: 3x3 stem, three stages of ``depth`` basic blocks (16, 32, 64 channels
    times ``width``), global pool; ``dropout`` > 0 adds dropout after each block and before
    ``fc``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        widths: Sequence[int] = (16, 32, 64),
        width: float = 1.0,
        depth: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        w1, w2, w3 = (_scaled(value, width) for value in widths)
        self.stem = _conv_block(in_channels, w1, pool=False)  # conv, bn, relu
        self.layer1 = _stage(w1, w1, 1, depth, dropout)
        self.layer2 = _stage(w1, w2, 2, depth, dropout)
        self.layer3 = _stage(w2, w3, 2, depth, dropout)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))))
        return self.fc(x if self.drop is None else self.drop(x))


def _stage(cin: int, cout: int, stride: int, depth: int, dropout: float) -> nn.Module:
    """One basic block (the default architecture: its names unchanged), or a Sequential of
    ``depth`` blocks, each followed by dropout when ``dropout`` > 0."""
    blocks: list[nn.Module] = []
    for index in range(depth):
        blocks.append(BasicBlock(cin if index == 0 else cout, cout, stride if index == 0 else 1))
        if dropout > 0:
            blocks.append(nn.Dropout(dropout))
    return blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)


# --------------------------------------------------------------------------- external models


class InputAdapter(nn.Module):
    """Map dataset images to what an external model expects: channels and spatial size.

    >>> InputAdapter(1, 3, (4, 4))(torch.zeros(2, 1, 2, 2)).shape
    torch.Size([2, 3, 4, 4])
    """

    def __init__(self, in_channels: int, channels: int, size: tuple[int, int] | None = None):
        super().__init__()
        if in_channels != channels and 1 not in (in_channels, channels):
            raise LCCInputError(
                f"images have {in_channels} channels but the model expects {channels}; "
                "only gray <-> colour is adapted"
            )
        self.in_channels = in_channels
        self.channels = channels
        self.size = tuple(size) if size is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        elif self.channels == 1 and self.in_channels != 1:
            x = x.mean(dim=1, keepdim=True)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, size={self.size}"


class ExternalClassifier(nn.Module):
    """``adapter`` then ``model``; returns the logits tensor (``.logits`` of HF outputs)."""

    def __init__(self, model: nn.Module, adapter: InputAdapter, *, hf: bool = False):
        super().__init__()
        self.adapter = adapter
        self.model = model
        self.hf = hf

    def forward(self, x: Tensor) -> Tensor:
        x = self.adapter(x)
        out = self.model(pixel_values=x) if self.hf else self.model(x)
        logits = getattr(out, "logits", None)
        return logits if isinstance(logits, Tensor) else first_tensor(out, "model output")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _import_optional(module: str, spec: str, how: str) -> Any:
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError, OSError, AttributeError) as error:
        raise LCCInputError(
            f"model {spec} needs `{module}`, which cannot be imported ({_first_line(error)}); {how}"
        ) from None


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else [int(v) for v in value]
    return (values[-2], values[-1]) if len(values) >= 2 else (values[0], values[0])


def _build_error(spec: str, error: BaseException, pretrained: bool, why: str = "") -> LCCInputError:
    """Why building ``spec`` failed: unreachable pretrained weights, else ``why`` (a default)."""
    if not pretrained:
        return LCCInputError(why or f"cannot build {spec} ({_first_line(error)})")
    return LCCInputError(
        f"cannot load pretrained weights for {spec} ({_first_line(error)}); pass --no-pretrained "
        "(pretrained=False) to start from random weights, or run once with network access"
    )


def _build_hf(name: str, num_classes: int, channels: int, pretrained: bool) -> nn.Module:
    spec = f"hf:{name}"
    transformers = _import_optional("transformers", spec, HF_INSTALL)
    local = Path(name).expanduser()
    source = str(local) if local.is_dir() else name
    offline = local.is_dir() or not hub_available()
    auto = transformers.AutoModelForImageClassification
    try:
        if pretrained:
            model = auto.from_pretrained(
                source,
                num_labels=num_classes,
                ignore_mismatched_sizes=True,
                local_files_only=offline,
            )
        else:
            config = transformers.AutoConfig.from_pretrained(source, local_files_only=offline)
            config.num_labels = num_classes
            model = auto.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        why = (
            f"cannot load the config of {spec} ({_first_line(error)}); run once with network "
            "access, or pass a local directory with config.json as hf:DIR"
        )
        raise _build_error(spec, error, pretrained, why) from None
    config = model.config
    size = _size(getattr(config, "image_size", None))
    adapter = InputAdapter(channels, int(getattr(config, "num_channels", 3)), size)
    return ExternalClassifier(model, adapter, hf=True)


def _build_timm(name: str, num_classes: int, channels: int, pretrained: bool) -> nn.Module:
    spec = f"timm:{name}"
    timm = _import_optional("timm", spec, VISION_INSTALL)
    if not timm.is_model(name):
        raise LCCInputError(f"timm has no model {name!r}; see timm.list_models() for names")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except Exception as error:  # download / hub failures differ across timm versions
        raise _build_error(spec, error, pretrained) from None
    config = getattr(model, "pretrained_cfg", None) or {}
    size = _size(config.get("input_size")) if pretrained or config.get("fixed_input_size") else None
    return ExternalClassifier(model, InputAdapter(channels, 3, size))


def _build_torchvision(name: str, num_classes: int, channels: int, pretrained: bool) -> nn.Module:
    spec = f"torchvision:{name}"
    models = _import_optional("torchvision.models", spec, VISION_INSTALL)
    if name not in models.list_models():
        raise LCCInputError(
            f"torchvision has no model {name!r}; see torchvision.models.list_models()"
        )
    try:
        model = models.get_model(name, weights="DEFAULT" if pretrained else None)
    except Exception as error:  # urllib / hash / file errors when weights are unreachable
        raise _build_error(spec, error, pretrained) from None
    replace_head(model, num_classes)
    size = _size(getattr(model, "image_size", None))
    if size is None and pretrained:
        try:
            size = _size(models.get_model_weights(name).DEFAULT.transforms().crop_size)
        except Exception:  # weights without a crop size: keep the dataset's size
            size = None
    return ExternalClassifier(model, InputAdapter(channels, 3, size))


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Replace the final classifier of a torchvision-style model; returns its name.

    Looks for ``fc``, ``classifier`` (a Linear, or a Sequential ending in Linear/1x1 conv),
    ``heads.head`` and ``head``.

    >>> net = torch.nn.Module(); net.fc = torch.nn.Linear(4, 1000)
    >>> replace_head(net, 3), net.fc.out_features
    ('fc', 3)
    """
    for path in ("fc", "classifier", "heads.head", "head", "heads"):
        parent: Any = model
        parts = path.split(".")
        for part in parts[:-1]:
            parent = getattr(parent, part, None)
        module = getattr(parent, parts[-1], None) if parent is not None else None
        if isinstance(module, nn.Linear):
            setattr(parent, parts[-1], nn.Linear(module.in_features, num_classes))
            return path
        if isinstance(module, nn.Sequential) and len(module) > 0:
            last = module[-1]
            if isinstance(last, nn.Linear):
                module[-1] = nn.Linear(last.in_features, num_classes)
                return f"{path}.{len(module) - 1}"
            for index in range(len(module) - 1, -1, -1):  # a last conv (squeezenet: relu, pool)
                if isinstance(module[index], nn.Conv2d):
                    conv = module[index]
                    module[index] = nn.Conv2d(conv.in_channels, num_classes, conv.kernel_size)
                    return f"{path}.{index}"
    raise LCCInputError(
        f"cannot find the classification head of {type(model).__name__} "
        "(looked for fc, classifier, heads.head, head); use another model"
    )


# --------------------------------------------------------------------------- checkpoints


def find_head(model: nn.Module) -> str | None:
    """Name of the final classifier: the last registered Linear or Conv2d submodule.

    >>> find_head(build_model("small-resnet", 3, input_shape=(1, 8, 8)))
    'fc'
    """
    last: str | None = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = name
    return last


def _read_state(path: Path) -> Mapping[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # SafetensorError: bad header, truncated data
            raise LCCInputError(f"cannot read checkpoint {path} ({_first_line(error)})") from None
    from lcc.io import safe_torch_load

    obj = safe_torch_load(path)  # weights_only=True: a file needing more is refused
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
                return inner
        return obj
    raise LCCInputError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")


_PREFIXES = (
    "",
    "model.",
    "module.",
    "model.module.",
    "module.model.",
    "_orig_mod.",
    "model.model.",
)


def _best_prefix(keys: Sequence[str], own: set[str]) -> str:
    def score(prefix: str) -> int:
        return sum(1 for k in keys if k.startswith(prefix) and k[len(prefix) :] in own)

    return max(_PREFIXES, key=score)  # ties: the earlier (shorter) prefix


def load_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Load a state_dict (plain ``torch.save``, Lightning ``.ckpt`` or ``.safetensors``).

    Keys may carry a ``model.`` / ``module.`` prefix. Head tensors whose shape differs (a
    different number of classes) are skipped and keep their new initialisation: their
    names are returned and a warning says so. Any other mismatch is an error.
    Loading never runs code from the file (``torch.load(weights_only=True)``): a file that
    needs arbitrary unpickling (e.g. a pickled module or hyperparameter object) is refused
    with an :class:`LCCInputError` saying how to convert it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LCCInputError(
            f"checkpoint {path} does not exist; pass a saved state_dict, .ckpt or .safetensors"
        )
    state = {k: v for k, v in _read_state(path).items() if isinstance(v, Tensor)}
    own = model.state_dict()
    prefix = _best_prefix(list(state), set(own))
    loaded = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    head = find_head(model)

    def is_head(key: str) -> bool:
        return head is not None and key.rsplit(".", 1)[0] == head

    differ = [k for k, v in loaded.items() if k in own and own[k].shape != v.shape]
    skipped = [k for k in differ if is_head(k)]
    wrong = [k for k in differ if not is_head(k)]
    missing = [k for k in own if k not in loaded and not is_head(k)]
    unexpected = [k for k in loaded if k not in own]
    if wrong or missing or unexpected or not loaded:
        parts = []
        if wrong:
            shapes = [f"{k} {tuple(loaded[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3]]
            parts.append(f"{len(wrong)} with another shape ({'; '.join(shapes)})")
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} (first: {', '.join(keys[:3])})")
        detail = ", ".join(parts) or "no tensors"
        raise LCCInputError(
            f"checkpoint {path} does not match the model: {detail}; build the same architecture "
            "that was saved"
        )
    keep_new = set(skipped) | {k for k in own if k not in loaded}
    model.load_state_dict({k: own[k] if k in keep_new else loaded[k] for k in own})
    if keep_new:
        warnings.warn(
            f"checkpoint {path}: kept the new classification head ({', '.join(sorted(keep_new))}) "
            "because the saved one has another number of classes",
            stacklevel=2,
        )
    return sorted(keep_new)


# --------------------------------------------------------------------------- entry point


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise LCCInputError(f"input_shape must be (C, H, W) positive ints, got {input_shape!r}")
    return shape  # type: ignore[return-value]


def build_model(
    spec: str,
    num_classes: int,
    *,
    input_shape: Sequence[int],
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    width: float = 1.0,
    depth: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Build the classifier ``spec`` for ``num_classes`` classes and (C, H, W) inputs.

    ``pretrained`` only concerns external models (built-ins start from random weights);
    ``checkpoint`` then loads saved weights (see :func:`load_checkpoint`). ``width`` and
    ``depth`` (built-ins only; also written ``small-cnn:width=2,depth=3``) scale the channels
    and set the number of blocks; ``dropout`` adds dropout before the head (any model: a
    pre-hook on it) and, for the built-ins, after each block.

    >>> build_model("small-cnn:width=2,depth=3", 10, input_shape=(1, 8, 8)).fc1.out_features
    256
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise LCCInputError(f"num_classes must be a positive integer, got {num_classes!r}")
    channels, height, side = _check_shape(input_shape)
    text = spec.strip() if isinstance(spec, str) else ""
    text, width, depth = _spec_options(text, width, depth)
    key = text.lower()
    model: nn.Module | None = None
    if key == "small-cnn":
        model = SmallCNN(
            channels, num_classes, (height, side), width=width, depth=_or(depth, 2), dropout=dropout
        )
    elif key == "small-resnet":
        if depth == 0:
            raise LCCInputError(
                "small-resnet needs depth >= 1 (blocks per stage); depth 0 is small-cnn's MLP"
            )
        model = SmallResNet(
            channels, num_classes, width=width, depth=_or(depth, 1), dropout=dropout
        )
    else:
        if width != 1.0 or depth is not None:
            raise LCCInputError(
                f"width and depth apply to the built-in models ({', '.join(BUILTINS)}), not "
                f"{spec!r}; drop --width/--depth"
            )
        builders = {"hf:": _build_hf, "timm:": _build_timm, "torchvision:": _build_torchvision}
        for prefix, builder in builders.items():
            if key.startswith(prefix):
                name = text[len(prefix) :].strip()
                if not name:
                    raise LCCInputError(f"{prefix}NAME needs a model name after the colon")
                model = builder(name, num_classes, channels, pretrained)
                break
    if model is None:
        valid = ", ".join([*BUILTINS, "hf:NAME", "timm:NAME", "torchvision:NAME"])
        raise LCCInputError(f"unknown model {spec!r}; valid: {valid}")
    if dropout > 0 and key not in BUILTINS:
        _dropout_before_head(model, dropout)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _spec_options(text: str, width: float, depth: int | None) -> tuple[str, float, int | None]:
    """``small-cnn:width=2,depth=3`` -> ("small-cnn", 2.0, 3); the keyword values otherwise
    (a spec option and a different keyword value together are refused)."""
    name, _, options = text.partition(":")
    if name.lower() not in BUILTINS or not options:
        return text, width, depth
    for item in options.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        try:
            number = float(value) if key == "width" else int(value)
        except ValueError:
            number = None
        low = 0 if key == "depth" else 1e-12
        if key not in ("width", "depth") or number is None or number < low:
            raise LCCInputError(
                f"model option {item!r} of {text!r}: use width=FACTOR (> 0) and/or "
                "depth=BLOCKS (>= 0; small-cnn:depth=0 is an MLP), e.g. small-cnn:width=2,depth=3"
            )
        current = width if key == "width" else depth
        if current not in (None, 1.0) and current != number:
            raise LCCInputError(
                f"{text!r} sets {key}={value} but --{key} says {current}; keep one of them"
            )
        width, depth = (float(number), depth) if key == "width" else (width, int(number))
    return name, width, depth


def _dropout_before_head(model: nn.Module, p: float) -> None:
    """Dropout on the input of the classification head (train mode only), as a forward
    pre-hook so the model's parameter names stay those of its checkpoints."""
    head = find_head(model)
    if head is None:
        raise LCCInputError("--dropout: the model's classification head was not found")
    module = model.get_submodule(head)

    def hook(layer: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return (F.dropout(inputs[0], p, layer.training), *inputs[1:])

    module.register_forward_pre_hook(hook)
