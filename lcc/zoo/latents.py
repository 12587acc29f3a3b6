"""Record the outputs of named submodules (the latents LCC corrects) with forward hooks.

A layer is named as in ``model.named_modules()`` (``lcc layers MODEL`` prints them).
A submodule that returns a tuple, list, dict or ``transformers`` ``ModelOutput`` is
recorded through its first tensor. Outputs are pooled to one row per sample:

- ``"flatten"`` (default): ``(B, ...) -> (B, D)`` with ``D`` the product of the trailing dims;
- ``"avg"`` / ``"max"``: a 4-D or higher output is a feature map ``(B, C, *spatial)`` and is
  reduced over its spatial dims to ``(B, C)``; a 3-D output is a token sequence ``(B, T, C)``
  (transformer blocks) and is reduced over the tokens to ``(B, C)``; 2-D outputs are kept.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> with LatentRecorder(model, ["1"]) as recorder:
...     logits = model(torch.ones(5, 4))
>>> recorder.outputs["1"].shape
torch.Size([5, 3])
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from lcc.engine.choices import POOLS
from lcc.errors import LCCInputError, check_choice
from lcc.io import npy_memmap_atomic

Pool = Literal["flatten", "avg", "max"]

__all__ = [
    "POOLS",
    "LatentRecorder",
    "Pool",
    "check_layer_names",
    "collect_latents",
    "eval_mode",
    "first_tensor",
    "layer_trace",
    "list_layers",
    "model_device",
    "model_latents",
    "pool_output",
    "probe_latents",
]


def first_tensor(output: object, name: str = "output") -> Tensor:
    """Return the first tensor in a module output (tensor, tuple/list, dict or ModelOutput).

    >>> first_tensor((None, torch.zeros(2), torch.ones(3))).tolist()
    [0.0, 0.0]
    """
    found = _find_tensor(output)
    if found is None:
        raise LCCInputError(
            f"layer {name!r} returned {type(output).__name__}, which holds no tensor; "
            "choose another layer (run `lcc layers MODEL` to list them)"
        )
    return found


def _find_tensor(output: object) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):  # dicts and transformers' ModelOutput
        items: Iterable[object] = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    else:
        return None
    for item in items:
        found = _find_tensor(item)
        if found is not None:
            return found
    return None


def pool_output(tensor: Tensor, pool: Pool = "flatten") -> Tensor:
    """Reduce a batch output ``(B, ...)`` to ``(B, D)`` (see the module docstring).

    >>> x = torch.arange(16.0).reshape(1, 2, 2, 4)
    >>> pool_output(x, "flatten").shape, pool_output(x, "avg").tolist()
    (torch.Size([1, 16]), [[3.5, 11.5]])
    """
    if tensor.ndim == 0:
        raise LCCInputError("a layer output is a scalar; choose a layer with one row per sample")
    if tensor.ndim == 1:
        return tensor.reshape(-1, 1)
    if pool == "flatten" or tensor.ndim == 2:
        return tensor.reshape(tensor.shape[0], -1)
    dims = (1,) if tensor.ndim == 3 else tuple(range(2, tensor.ndim))
    if pool == "avg":
        return tensor.mean(dim=dims)
    if pool == "max":
        return tensor.amax(dim=dims)
    raise LCCInputError(f"pool={pool!r} is not one of {', '.join(map(repr, POOLS))}")


def _named_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if name}


def check_layer_names(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    """Validate layer names against ``model.named_modules()``; return them deduplicated.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> check_layer_names(model, ["1", "0", "1"])
    ['1', '0']
    """
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names))
    if not names:
        raise LCCInputError("no layer given; pass at least one submodule name (see `lcc layers`)")
    valid = _named_layers(model)
    for name in names:
        if not isinstance(name, str):
            raise LCCInputError(f"layer names must be strings, got {name!r}")
        if name not in valid:
            close = difflib.get_close_matches(name, list(valid), n=5, cutoff=0.4)
            shown = close or list(valid)[:8]
            more = ", ..." if not close and len(valid) > 8 else ""
            hint = f"{'closest' if close else 'valid'}: {', '.join(shown)}{more}"
            raise LCCInputError(
                f"model has no layer {name!r} ({hint}); run `lcc layers MODEL` to list all"
            )
    return names


class LatentRecorder:
    """Forward hooks that keep the last forward's output of each named layer, pooled to (B, D).

    Use as a context manager, or call :meth:`attach` / :meth:`detach`. ``outputs`` is
    NOT detached, so a loss on it backpropagates into the model. A layer called several
    times in one forward keeps its last call's output. ``allow_empty``: no layer is fine (a
    recorder that hooks nothing, e.g. for regularisers that read only the logits).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        pool: Pool = "flatten",
        allow_empty: bool = False,
    ):
        self.model = model
        empty = allow_empty and not layers
        self.layers = [] if empty else check_layer_names(model, layers)
        self.pool: Pool = check_choice(pool, POOLS, name="pool")  # type: ignore[assignment]
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> LatentRecorder:
        """Register the hooks (idempotent); returns ``self``."""
        if not self._handles:
            modules = _named_layers(self.model)
            self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.layers]
        return self

    def detach(self) -> None:
        """Remove the hooks; ``outputs`` keeps the last values."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget the recorded outputs (frees the graph they hold)."""
        self.outputs = {}

    def output(self, name: str) -> Tensor:
        """The last forward's output of layer ``name`` (one line when there is none yet)."""
        out = self.outputs.get(name)
        if out is None:
            raise LCCInputError(
                f"layer {name!r} has not produced an output yet; run the model forward on the "
                "batch before calling loss() or observe()"
            )
        return out

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            self.outputs[name] = pool_output(first_tensor(output, name), self.pool)

        return hook

    def __enter__(self) -> LatentRecorder:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"LatentRecorder(layers={self.layers}, pool={self.pool!r}, attached={self.attached})"


def call_model(model: nn.Module, sample_input: object) -> object:
    if isinstance(sample_input, Mapping):
        return model(**sample_input)
    if isinstance(sample_input, (tuple, list)):
        return model(*sample_input)
    return model(sample_input)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; on exit (also on an error) every submodule gets back its
    own train/eval flag, so a model with some submodules frozen in eval stays that way.

    >>> model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.BatchNorm1d(2))
    >>> _ = model[1].eval()
    >>> with eval_mode(model):
    ...     [m.training for m in model.modules()]
    [False, False, False]
    >>> [m.training for m in model.modules()]
    [True, True, False]
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def probe_latents(
    model: nn.Module,
    sample: object,
    layers: str | Sequence[str],
    *,
    pool: Pool = "flatten",
    device: str | torch.device | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """One forward pass on a ``sample`` batch in eval mode without gradients (modes restored):
    ``({layer: (B, D) output}, logits (B, ...))``, every tensor detached.

    ``sample`` is a batch (tensor, or tuple/dict of model arguments), moved to ``device``
    (default: the model's). Every layer must run in the forward pass. Use it to size
    parameters or check layers on a sample; :func:`collect_latents` covers a whole loader.

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> latents, logits = probe_latents(model, torch.ones(5, 3), ["1"])
    >>> latents["1"].shape, logits.shape, model.training
    (torch.Size([5, 4]), torch.Size([5, 2]), True)
    """
    names = check_layer_names(model, layers)
    target = torch.device(device) if device is not None else model_device(model)
    recorder = LatentRecorder(model, names, pool=pool)
    with eval_mode(model), torch.no_grad(), recorder:
        logits = first_tensor(call_model(model, _to(sample, target)), "model output")
    missing = [name for name in names if name not in recorder.outputs]
    if missing:
        raise LCCInputError(
            f"layer(s) {', '.join(map(repr, missing))} did not run in the model's forward pass; "
            "choose others (run `lcc layers MODEL`)"
        )
    return {name: recorder.outputs[name].detach() for name in names}, logits.detach()


def layer_trace(model: nn.Module, sample_input: object) -> dict[str, tuple[int, ...] | None]:
    """The one probe of a model: every named submodule that runs on ``sample_input``, in the
    order it first runs, with the full shape of the tensor its output holds (None: no tensor).

    Runs once in eval mode without gradients; every submodule's mode is restored.

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    >>> layer_trace(model, torch.zeros(1, 1, 5, 5))
    {'0': (1, 4, 3, 3), '1': (1, 36)}
    """
    shapes: dict[str, tuple[int, ...] | None] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            tensor = _find_tensor(output)
            if tensor is not None or name not in shapes:
                shapes[name] = None if tensor is None else tuple(tensor.shape)

        return hook

    modules = _named_layers(model)
    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, sample_input)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def list_layers(model: nn.Module, sample_input: object) -> list[tuple[str, tuple[int, ...]]]:
    """Every named submodule that runs on ``sample_input``, with its per-sample output shape.

    ``sample_input`` is a batch (tensor, or tuple/dict of model arguments); shapes drop the
    batch dim (:func:`layer_trace`). Submodules that do not run, or return no tensor of at
    least one dimension, are left out (they cannot be recorded).

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
    >>> list_layers(model, torch.zeros(1, 1, 5, 5))
    [('0', (4, 3, 3)), ('1', (36,))]
    """
    trace = layer_trace(model, sample_input)
    return [
        (name, shape[1:])
        for name in _named_layers(model)
        if (shape := trace.get(name)) is not None and len(shape) >= 1
    ]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (or buffers) live (the CPU for a model with neither)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def _unpack(batch: object) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        raise LCCInputError(
            "the loader must yield (x, y, index) batches; wrap the dataset in "
            "lcc.zoo.datasets.IndexedDataset"
        )
    x, y, index = batch
    return x, torch.as_tensor(y), torch.as_tensor(index)


def collect_latents(
    model: nn.Module,
    loader: Any,
    layers: str | Sequence[str],
    *,
    pool: Pool = "flatten",
    device: str | torch.device | None = None,
    memmap_dir: str | os.PathLike[str] | None = None,
    memmap_dtype: npt.DTypeLike = np.float32,
    mode: Callable[[nn.Module], contextlib.AbstractContextManager[Any]] = eval_mode,
    on_batch: Callable[[Tensor, Tensor, np.ndarray], None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One eval-mode pass without gradients over ``loader``; latents ordered by dataset index.

    ``mode``: the context the pass runs in (default :func:`eval_mode`; e.g.
    :func:`lcc.zoo.batchnorm.batch_statistics`); ``on_batch(logits, y, rows)``, if given, sees
    each batch's detached logits, labels and dataset rows.

    ``loader`` yields ``(x, y, index)`` with ``index`` the position in ``loader.dataset``
    (shuffled loaders are fine). Returns ``({layer: (N, D) float32}, y (N,) int64,
    predictions (N,) int64)``, each array allocated once (no per-batch copies kept).
    ``device`` is where batches go (default: the model's device). Modes are restored.

    With ``memmap_dir`` (an existing directory), each layer's latents are written into
    ``memmap_dir/<layer>.npy`` (``memmap_dtype``: float16 or float32) through a memory map
    instead of RAM; the files appear atomically once the pass has covered every sample, and
    are returned opened read-only (``np.load(..., mmap_mode="r")``), ready for
    :func:`lcc.engine.refresh.refresh`. A failed pass leaves no file behind.

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> data = TensorDataset(torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]), torch.arange(6))
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    >>> z, y, pred = collect_latents(model, DataLoader(data, batch_size=4), ["0"])
    >>> z["0"].shape, z["0"].dtype, y.tolist()
    ((6, 4), dtype('float32'), [0, 1, 0, 1, 0, 1])
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> z16, _, _ = collect_latents(model, DataLoader(data, batch_size=4), ["0"],
    ...                             memmap_dir=folder, memmap_dtype=np.float16)
    >>> z16["0"].dtype.name, bool(np.allclose(z16["0"], z["0"], atol=1e-2))
    ('float16', True)
    >>> sorted(os.listdir(folder))
    ['0.npy']
    """
    names = check_layer_names(model, layers)
    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError) as error:
        raise LCCInputError("the loader needs a sized `.dataset` (a torch DataLoader)") from error
    if n == 0:
        raise LCCInputError("the loader's dataset is empty; nothing to collect")
    target = torch.device(device) if device is not None else model_device(model)
    files = _latent_files(memmap_dir, names, memmap_dtype)
    latents: dict[str, np.ndarray] = {}
    labels = np.zeros(n, dtype=np.int64)
    predictions = np.zeros(n, dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    recorder = LatentRecorder(model, names, pool=pool)
    # the memory-mapped files close last: renamed into place only once every check has passed
    with contextlib.ExitStack() as stack, mode(model), torch.no_grad(), recorder:
        for batch in loader:
            x, y, index = _unpack(batch)
            recorder.clear()
            logits = first_tensor(call_model(model, _to(x, target)), "model output")
            rows = index.to("cpu", torch.int64).numpy()
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise LCCInputError(f"loader index out of range 0..{n - 1}: got {rows.max()}")
            for name in names:
                if name not in recorder.outputs:
                    raise LCCInputError(f"layer {name!r} did not run in the model's forward pass")
                out = recorder.outputs[name].detach().to("cpu", torch.float32)
                if name not in latents:
                    shape = (n, out.shape[1])
                    latents[name] = (
                        stack.enter_context(npy_memmap_atomic(files[name], shape, memmap_dtype))
                        if files
                        else np.empty(shape, dtype=np.float32)
                    )
                latents[name][rows] = out.numpy()
            labels[rows] = y.to("cpu", torch.int64).reshape(-1).numpy()
            predictions[rows] = logits.detach().reshape(logits.shape[0], -1).argmax(1).cpu().numpy()
            seen[rows] = True
            if on_batch is not None:
                on_batch(logits.detach(), y, rows)
        if not seen.all():
            raise LCCInputError(
                f"the loader covered {int(seen.sum())} of {n} samples; pass a loader over the "
                "whole dataset (no drop_last, no sampler subset)"
            )
    if files:  # renamed into place when the stack closed: reopen read-only
        latents = {name: np.load(files[name], mmap_mode="r") for name in latents}
    return latents, labels, predictions


def _latent_files(
    folder: str | os.PathLike[str] | None, names: list[str], dtype: npt.DTypeLike
) -> dict[str, Path]:
    """``{layer: folder/<layer>.npy}``, or ``{}`` without a folder; checks folder and dtype."""
    if folder is None:
        return {}
    directory = Path(folder)
    if not directory.is_dir():
        raise LCCInputError(f"memmap_dir {directory} is not a directory; create it first")
    if np.dtype(dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise LCCInputError(f"memmap_dtype must be float16 or float32, got {np.dtype(dtype)}")
    return {name: directory / f"{name}.npy" for name in names}


def _to(x: object, device: torch.device) -> object:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {key: _to(value, device) for key, value in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(value, device) for value in x)
    return x


def model_latents(
    model: str,
    dataset: str,
    layers: str | Sequence[str],
    *,
    split: Literal["train", "test"] = "train",
    subset: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    pool: Pool = "max",
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Build ``model`` (a spec, weights from ``checkpoint``) for ``dataset`` and collect the
    latents of ``layers`` on its ``split`` (not augmented; ``subset``: a seeded stratified
    subset of that many samples) with :func:`collect_latents`; the model's initial weights
    come from ``seed``. Returns ``({layer: (N, D)}, y (N,), predictions (N,))``.

    >>> z, y, predictions = model_latents("small-cnn", "digits", ["fc1"], subset=40)
    >>> z["fc1"].shape, y.shape, predictions.shape
    ((40, 128), (40,), (40,))
    """
    from torch.utils.data import DataLoader

    from lcc.zoo.datasets import IndexedDataset, load_dataset
    from lcc.zoo.models import build_model

    check_choice(split, ("train", "test"), name="split")
    train = split == "train"
    bundle = load_dataset(
        dataset,
        root=data_dir,
        subset=subset if train else None,
        test_subset=None if train else subset,
        seed=seed,
        augment=False,
    )
    torch.manual_seed(seed)
    network = build_model(
        model,
        bundle.num_classes,
        input_shape=bundle.input_shape,
        pretrained=pretrained,
        checkpoint=checkpoint,
    )
    data = IndexedDataset(bundle.train_plain if train else bundle.test)
    return collect_latents(network, DataLoader(data, batch_size=batch_size), layers, pool=pool)
