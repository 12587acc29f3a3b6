"""Build one ``lcc train`` run from its checked config: the data, the model, the layers and
regularisers (probed once on a sample batch), the Lightning module and data module.

:func:`default_layers` picks the penultimate layer; :func:`probe_layers` checks that named
layers run and output tensors; both read one :func:`lcc.zoo.latents.layer_trace` of the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcc.errors import LCCInputError
from lcc.train.config import TrainConfig
from lcc.train.rundir import save_config
from lcc.zoo.latents import check_layer_names, layer_trace

__all__ = ["build", "check_devices", "default_layers", "idle_warnings", "probe_layers"]


def default_layers(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The default LCC layer: the penultimate layer, i.e. the last leaf submodule that runs
    before the classification head (the last Linear/Conv2d, :func:`lcc.zoo.models.find_head`) in a
    forward pass on ``sample``, skipping dropout and identity modules.

    >>> from lcc.zoo.models import build_model
    >>> model = build_model("small-cnn", 10, input_shape=(1, 8, 8))
    >>> default_layers(model, torch.zeros(2, 1, 8, 8))
    ['act1']
    """
    from lcc.zoo.models import find_head

    trace = layer_trace(model, sample)
    order = list(trace)
    modules = dict(model.named_modules())
    head = find_head(model)
    stop = order.index(head) if head in order else len(order) - 1
    skipped = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
    for name in reversed(order[:stop]):
        module = modules[name]
        is_leaf = next(module.children(), None) is None  # a leaf is no ancestor of the head
        if is_leaf and trace[name] is not None and not isinstance(module, skipped):
            return [name]
    raise LCCInputError(
        "cannot find a layer before the classification head; pass --layers "
        "(run `lcc layers MODEL` to list them)"
    )


def probe_layers(model: nn.Module, layers: Sequence[str], sample: torch.Tensor) -> None:
    """Check that each layer exists, runs in the forward pass and outputs a tensor."""
    check_layer_names(model, list(layers))
    trace = layer_trace(model, sample)
    for name in layers:
        if name not in trace:
            raise LCCInputError(
                f"layer {name!r} does not run in the model's forward pass; choose another "
                "(run `lcc layers MODEL`)"
            )
        if trace[name] is None:
            raise LCCInputError(
                f"layer {name!r} outputs no tensor, so its latents cannot be recorded; choose "
                "another layer (run `lcc layers MODEL`)"
            )


def idle_warnings(regularisation: Any, epochs: int) -> list[str]:
    """One line per regulariser that would never act in a run of ``epochs`` epochs (a warmup
    or interval longer than the run), so the user learns it before the run, not after.

    >>> from lcc.regularisers.lcc import LCC
    >>> from lcc.train.loop import Regularisation
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> idle_warnings(Regularisation(model, [LCC(layers=["0"], warmup=5)]), 2)
    ['lcc never acts in this run: warmup=5 >= epochs=2 (it would start at epoch 6 of 2); lower the warmup or raise --epochs']
    >>> idle_warnings(Regularisation(model, [LCC(layers=["0"], weight=0)]), 2)  # monitoring
    []
    """  # noqa: E501
    lines = []
    for key, reg in regularisation.items():
        refreshes = [e for e in range(epochs) if reg.needs_training_latents(e)]
        active = [e for e in range(epochs) if reg.weight_at(e) > 0]
        if (reg.refreshes and not refreshes) or (not active and reg.weight > 0):
            lines.append(
                f"{key} never acts in this run: warmup={reg.warmup} >= epochs={epochs} "
                f"(it would start at epoch {reg.warmup + 1} of {epochs}); lower the warmup or "
                "raise --epochs"
            )
        elif not active and not reg.refreshes:  # weight 0 and nothing to monitor
            lines.append(f"{key} has weight 0: its term is never added; give it a weight")
    return lines


def _labelled_split(config: TrainConfig, bundle: Any, out: Path, rank: int) -> Any:
    """With --labeled-fraction / --labels-per-class / --unlabeled: the training set and the
    non-augmented one as :class:`lcc.zoo.labels.MaskedLabels` (label -1 = unlabelled); None
    otherwise. The split is saved in ``DIR/split.npz`` and reused when the run is resumed."""
    from lcc.zoo.labels import MaskedLabels, UnlabeledImages, load_split, save_split, split_labeled

    fraction, per_class = config.labeled_fraction, config.labels_per_class
    if fraction is None and per_class is None and config.unlabeled is None:
        return None
    saved = out / "split.npz"
    n = len(bundle.train)
    if config.resume and saved.is_file():
        mask = load_split(saved, n_samples=n)
    elif fraction is not None or per_class is not None:
        targets = np.asarray(bundle.targets)
        mask = split_labeled(targets, fraction=fraction, per_class=per_class, seed=config.seed)
    else:
        mask = np.ones(n, dtype=bool)
    extra = None
    if config.unlabeled is not None:  # "" is refused there with one line
        extra = UnlabeledImages.load(
            config.unlabeled, bundle, root=config.data_dir, seed=config.seed
        )
    train = MaskedLabels(bundle.train, mask, extra)
    plain = MaskedLabels(
        bundle.train_plain, mask, None if extra is None else extra.without_augmentation()
    )
    if rank == 0:
        save_split(saved, mask)
    return train, plain


def check_devices(config: TrainConfig) -> None:
    """One line, before any work, for a GPU setting on a machine without CUDA."""
    cuda = torch.cuda.is_available()
    on_cpu = config.accelerator == "cpu" or (config.accelerator == "auto" and not cuda)
    if config.precision == "16-mixed" and on_cpu:
        raise LCCInputError(
            "--precision 16-mixed needs a CUDA device; on the CPU use --precision bf16-mixed"
        )
    if config.refresh_device == "cuda" and not cuda:
        raise LCCInputError("CUDA is not available on this machine; use --refresh-device cpu")
    if config.accelerator in ("gpu", "cuda") and not cuda:
        raise LCCInputError(
            f"--accelerator {config.accelerator} but CUDA is not available on this machine; "
            "use --accelerator cpu"
        )


def _load(config: TrainConfig, bundle: Any) -> Any:
    """The run's dataset bundle (``bundle`` when given); both splits must be non-empty."""
    from lcc.zoo.hierarchy import load_run_dataset

    if bundle is None:
        bundle = load_run_dataset(  # --augment, DATASET:super / --superclasses
            config.dataset or "",
            superclasses=config.superclasses,
            augment=config.augment,
            root=config.data_dir,
            subset=config.subset,
            test_subset=config.test_subset,
            seed=config.seed,
        )
    n_train, n_test = len(bundle.train), len(bundle.test)
    if n_train == 0 or n_test == 0:
        raise LCCInputError(
            f"dataset {config.dataset} has {n_train} training and {n_test} test samples; "
            "both must be non-empty"
        )
    return bundle


def _regularisers(
    config: TrainConfig, model: nn.Module, sample: torch.Tensor | None
) -> tuple[TrainConfig, list[Any]]:
    """The run's regularisers on its layers (default: the penultimate), the layers probed."""
    from lcc.regularisers.base import OUTPUT

    if config.no_lcc or sample is None:
        return config, []
    layers = list(config.layers) if config.layers else default_layers(model, sample)
    config = dataclasses.replace(config, layers=layers)  # names probed below
    regularisers = config.build_regularisers(layers)
    read = [name for reg in regularisers for name in reg.layers if name != OUTPUT]
    if read:  # none when every regulariser reads the logits ('output') only
        probe_layers(model, list(dict.fromkeys(read)), sample)
    return config, regularisers


#: the config's options that :class:`lcc.train.lightning.LCCModule` takes under their own name
_MODULE_OPTIONS = (  # noqa: SIM905 - a list literal would take a line per name
    "source pool refresh_bn ce_weight latents_dtype lr momentum weight_decay optimizer "
    "adam_lr_scale schedule stop_at_train_loss num_workers save_latents"
).split()


def build(
    config: TrainConfig, bundle: Any, out: Path, rank: int, report: bool
) -> tuple[Any, Any, TrainConfig, Any]:
    """Load data and model, resolve and check the layers, save config.yaml (rank 0); returns
    (the Lightning module, its data module, the config with its layers, the dataset bundle)."""
    import lightning.pytorch as pl

    from lcc.train.data import LCCDataModule
    from lcc.train.lightning import LCCModule
    from lcc.train.tracking import make_tracker
    from lcc.zoo.models import build_model

    check_devices(config)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    bundle = _load(config, bundle)
    split = _labelled_split(config, bundle, out, rank)
    train_set, plain_set = (bundle.train, bundle.train_plain) if split is None else split
    targets = np.asarray(bundle.targets if split is None else train_set.targets)
    torch.manual_seed(config.seed)
    model = build_model(
        config.model or "",
        bundle.num_classes,
        input_shape=bundle.input_shape,
        pretrained=not config.no_pretrained,
        checkpoint=config.checkpoint,
        width=config.width,
        depth=config.depth,
        dropout=config.dropout,
    )
    sample = None
    if not config.no_lcc:
        sample = torch.stack([bundle.train_plain[i][0] for i in range(min(2, len(train_set)))])
    config, regularisers = _regularisers(config, model, sample)
    module = LCCModule(
        model,
        regularisers=regularisers,
        sample=sample,
        num_classes=bundle.num_classes,
        n_train=len(train_set),
        latents_dir=out / "latents" if config.latents_on_disk else None,
        tracker=make_tracker(config, bundle, out) if rank == 0 else None,
        refresh_data=plain_set,
        refresh_batch_size=config.batch_size,  # fits; larger was slower on CPU (LCCModule)
        out_dir=out,
        report=report,
        **{name: getattr(config, name) for name in _MODULE_OPTIONS},
    )
    if module.regularisation is not None:
        module.regularisation.check_labels(targets)
    module.fine_targets = getattr(bundle, "fine_targets", None)  # type: ignore[attr-defined]
    module.data_counts = {  # type: ignore[attr-defined]
        "n_labeled": int(np.sum(targets >= 0)),
        "n_unlabeled": int(np.sum(targets < 0)),
    }
    data = LCCDataModule(
        bundle,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        seed=config.seed,
        train=None if split is None else train_set,
        labeled_ratio=config.labeled_ratio,
    )
    if rank == 0:
        save_config(config, out / "config.yaml")
    return module, data, config, bundle
