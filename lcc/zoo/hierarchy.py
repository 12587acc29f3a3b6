"""A run's dataset with its training augmentation (``--augment``) and, optionally, trained on
superclass labels (``DATASET:super``, ``--superclasses MAP.yaml``) with the fine labels kept.

``--augment basic`` per dataset: random crop with zero padding ``round(H / 8)`` (mnist,
fashion-mnist: 4 px at 28 px; cifar: 4 px; eurosat: 8 px; digits: 1 px) and a random
horizontal flip, except for digit datasets (``mnist``, ``digits``, ``idx:``), whose classes a
mirror image can change. ``default`` keeps the dataset's usual augmentation (crop + flip for
colour data, none for grayscale), ``none`` turns it off.

With a superclass map the bundle's labels (``targets``, every split's ``y``) are the
superclasses, ``num_classes`` their count, and :class:`HierarchicalBundle` keeps
``fine_targets`` / ``fine_test_targets``; the stratified ``--subset`` is drawn on the fine
labels (every subclass kept in proportion).

>>> bundle = load_run_dataset("digits:super", subset=100, augment="basic")
>>> bundle.num_classes, sorted(set(bundle.fine_targets.tolist())) == list(range(10))
(2, True)
>>> bundle.train.padding, bundle.train.flip
(1, False)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcc.zoo.datasets import DatasetBundle, ImageTensorDataset, load_dataset
from lcc.zoo.superclasses import SuperclassMap, resolve

__all__ = [
    "AugmentedImages",
    "HierarchicalBundle",
    "basic_augmentation",
    "hierarchical_latents",
    "load_run_dataset",
]

#: datasets a horizontal flip can change the class of (digits)
NO_FLIP: tuple[str, ...] = ("mnist", "digits", "idx:")


class AugmentedImages(ImageTensorDataset):
    """:class:`ImageTensorDataset` whose augmentation may crop without flipping."""

    def __init__(self, *args: Any, flip: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.flip = bool(flip)


@dataclass
class HierarchicalBundle(DatasetBundle):
    """A :class:`DatasetBundle` trained on superclasses, with the fine labels kept."""

    fine_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fine_test_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    superclass_map: SuperclassMap | None = None


def basic_augmentation(spec: str, height: int) -> tuple[int, bool]:
    """(padding, flip) of ``--augment basic`` for a dataset spec and image height.

    >>> basic_augmentation("fashion-mnist", 28), basic_augmentation("mnist", 28)
    ((4, True), (4, False))
    """
    return max(1, round(height / 8)), not spec.startswith(NO_FLIP)


def _dataset(source: ImageTensorDataset, labels: np.ndarray, padding: int, flip: bool) -> Any:
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return AugmentedImages(source.images, y, source.mean, source.std, padding=padding, flip=flip)


def load_run_dataset(
    spec: str,
    *,
    superclasses: str | Path | None = None,
    augment: str = "default",
    root: str | Path | None = None,
    subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> DatasetBundle:
    """The dataset of a run (see the module docstring); ``augment`` in default, none, basic."""
    plain, mapping = resolve(spec, None if superclasses is None else str(superclasses))
    bundle = load_dataset(
        plain,
        root=root,
        subset=subset,
        test_subset=test_subset,
        seed=seed,
        augment=augment != "none",
    )
    if augment == "basic":
        padding, flip = basic_augmentation(plain, bundle.input_shape[1])
    else:
        padding, flip = getattr(bundle.train, "padding", 0), True
    targets = np.asarray(bundle.targets)
    if mapping is None:
        if augment == "basic":
            bundle.train = _dataset(bundle.train, targets, padding, flip)
        return bundle
    mapping.check_classes(bundle.num_classes, plain)
    test_targets = np.asarray(bundle.test_targets)
    train_super, test_super = mapping.apply(targets), mapping.apply(test_targets)
    values = {f.name: getattr(bundle, f.name) for f in dataclasses.fields(DatasetBundle)}
    values.update(
        name=spec,
        train=_dataset(bundle.train, train_super, padding, flip),
        train_plain=_dataset(bundle.train_plain, train_super, 0, False),
        test=_dataset(bundle.test, test_super, 0, False),
        num_classes=mapping.num_superclasses,
        targets=train_super,
        test_targets=test_super,
        classes=list(mapping.names),
    )
    return HierarchicalBundle(
        **values, fine_targets=targets, fine_test_targets=test_targets, superclass_map=mapping
    )


def hierarchical_latents(
    model: str,
    dataset: str,
    layers: Any,
    *,
    superclasses: str | Path | None = None,
    split: str = "train",
    subset: int | None = None,
    checkpoint: str | Path | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None, np.ndarray]:
    """Max-pooled latents of ``layers`` of ``model`` (built for the *trained* classes: the
    superclasses of a ``DATASET:super`` / ``superclasses`` dataset) on ``split`` without
    augmentation: ``(latents, y_fine, y_super, predictions)``, ``y_fine`` the dataset's own
    labels and ``y_super`` their superclasses (None without a map); ``y_fine``/``y_super`` are
    what c1/c2 read as ``y``/``y_super``, and the predictions are superclasses.

    >>> z, fine, sup, pred = hierarchical_latents("small-cnn", "digits:super", ["fc1"], subset=40)
    >>> z["fc1"].shape, sorted(set(sup.tolist())), int(pred.max()) <= 1
    ((40, 128), [0, 1], True)
    """
    from torch.utils.data import DataLoader

    from lcc.zoo.datasets import IndexedDataset
    from lcc.zoo.latents import collect_latents
    from lcc.zoo.models import build_model

    train = split == "train"
    bundle = load_run_dataset(
        dataset, superclasses=superclasses, augment="none", root=data_dir,
        subset=subset if train else None, test_subset=None if train else subset, seed=seed,
    )  # fmt: skip
    torch.manual_seed(seed)
    network = build_model(
        model, bundle.num_classes, input_shape=bundle.input_shape, pretrained=False,
        checkpoint=checkpoint,
    )  # fmt: skip
    data = IndexedDataset(bundle.train_plain if train else bundle.test)
    latents, y, predictions = collect_latents(
        network, DataLoader(data, batch_size=batch_size), layers, pool="max"
    )
    if not isinstance(bundle, HierarchicalBundle):
        return latents, y, None, predictions
    fine = bundle.fine_targets if train else bundle.fine_test_targets
    return latents, np.asarray(fine), y, predictions
