"""Hierarchical labels: superclass maps (fine class -> superclass) and ``DATASET:super`` specs.

A model trained on superclasses while the fine labels are kept is the set-up of the
intraclass-clustering paper (sec. 2.2): c1 and c2 measure how well the fine classes
(subclasses) are told apart inside each superclass. Built-in maps:

- ``cifar100``: the dataset's 20 standard superclasses ("coarse labels"), 5 fine classes each,
  derived from the published class lists (:data:`CIFAR100_SUPERCLASSES`);
- ``fashion-mnist``: 3 superclasses chosen here (the dataset has none): ``tops`` (T-shirt/top,
  pullover, coat, shirt), ``footwear`` (sandal, sneaker, ankle boot), ``other`` (trouser,
  dress, bag);
- ``mnist`` and ``digits``: 2 superclasses chosen here (none exists): digits 0-4 and 5-9.

A user map is a YAML file ``fine class: superclass`` (integers, or names for the
superclasses, numbered in sorted order), given with ``--superclasses MAP.yaml``; every fine
class of the dataset must appear.

>>> spec, wants = split_spec("fashion-mnist:super")
>>> spec, wants
('fashion-mnist', True)
>>> mapping = builtin_map("fashion-mnist")
>>> mapping.num_superclasses, mapping.apply([0, 5, 8]).tolist()
(3, [2, 0, 1])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcc.errors import LCCInputError

__all__ = [
    "BUILTIN",
    "CIFAR100_FINE",
    "CIFAR100_SUPERCLASSES",
    "SuperclassMap",
    "builtin_map",
    "load_map",
    "resolve",
    "split_spec",
]

SUFFIX = ":super"

#: CIFAR-100's 20 superclasses and their fine classes, as the dataset's documentation lists
#: them (names as in the dataset's label files); superclass and fine indices are the sorted
#: positions of the names, as in the dataset.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
#: CIFAR-100's 100 fine class names in label order (sorted)
CIFAR100_FINE: tuple[str, ...] = tuple(sorted(n for f in CIFAR100_SUPERCLASSES.values() for n in f))


@dataclass(frozen=True)
class SuperclassMap:
    """``fine_to_super[c]`` is the superclass of fine class ``c``; ``names`` the superclasses'
    names; ``source`` where the map comes from (``builtin:NAME`` or a file path).

    >>> SuperclassMap((0, 0, 1), ("a", "b"), "example").apply(np.array([2, 0])).tolist()
    [1, 0]
    """

    fine_to_super: tuple[int, ...]
    names: tuple[str, ...]
    source: str

    @property
    def num_fine(self) -> int:
        return len(self.fine_to_super)

    @property
    def num_superclasses(self) -> int:
        return len(self.names)

    def apply(self, y: Any) -> np.ndarray:
        """Superclass labels of fine labels ``y`` (int64); a label outside the map is refused."""
        labels = np.asarray(y, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_fine):
            bad = int(labels[(labels < 0) | (labels >= self.num_fine)][0])
            raise LCCInputError(
                f"fine label {bad} is not in the superclass map {self.source} (classes 0.."
                f"{self.num_fine - 1}); pass a map covering every class of the dataset"
            )
        return np.asarray(self.fine_to_super, dtype=np.int64)[labels]

    def check_classes(self, num_classes: int, dataset: str) -> SuperclassMap:
        """Refuse a map that does not cover exactly the dataset's ``num_classes`` classes."""
        if self.num_fine != num_classes:
            raise LCCInputError(
                f"the superclass map {self.source} covers {self.num_fine} fine classes but "
                f"{dataset} has {num_classes}; give every class 0..{num_classes - 1} a superclass"
            )
        return self


def _from_groups(groups: Mapping[str, Sequence[int]], source: str) -> SuperclassMap:
    fine = sorted(c for members in groups.values() for c in members)
    table = [0] * len(fine)
    for index, members in enumerate(groups.values()):
        for c in members:
            table[c] = index
    return SuperclassMap(tuple(table), tuple(groups), source)


_CIFAR100 = {  # superclass name -> fine class indices, superclasses in sorted order
    name: [CIFAR100_FINE.index(f) for f in fine]
    for name, fine in sorted(CIFAR100_SUPERCLASSES.items())
}
_DIGITS = {"0-4": (0, 1, 2, 3, 4), "5-9": (5, 6, 7, 8, 9)}
#: built-in maps by dataset preset name
BUILTIN: dict[str, SuperclassMap] = {
    "cifar100": _from_groups(_CIFAR100, "builtin:cifar100"),
    "fashion-mnist": _from_groups(
        {"footwear": (5, 7, 9), "other": (1, 3, 8), "tops": (0, 2, 4, 6)}, "builtin:fashion-mnist"
    ),
    "mnist": _from_groups(_DIGITS, "builtin:mnist"),
    "digits": _from_groups(_DIGITS, "builtin:digits"),
}


def split_spec(spec: str) -> tuple[str, bool]:
    """``(dataset spec without ':super', whether ':super' was asked for)``.

    >>> split_spec("cifar100:super"), split_spec("folder:/data/x")
    (('cifar100', True), ('folder:/data/x', False))
    """
    if spec.endswith(SUFFIX):
        return spec[: -len(SUFFIX)], True
    return spec, False


def builtin_map(dataset: str) -> SuperclassMap:
    """The built-in map of a dataset preset, or one line naming the ones that exist."""
    name, _ = split_spec(dataset)
    if name not in BUILTIN:
        raise LCCInputError(
            f"{name} has no built-in superclasses (built in: {', '.join(sorted(BUILTIN))}); "
            "pass --superclasses MAP.yaml (fine class: superclass)"
        )
    return BUILTIN[name]


def load_map(path: str | os.PathLike[str]) -> SuperclassMap:
    """A user map from YAML: ``fine class: superclass`` (integers, or names numbered sorted).

    >>> import tempfile, pathlib
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "map.yaml"
    >>> _ = file.write_text("0: animal\\n1: vehicle\\n2: animal\\n")
    >>> load_map(file).fine_to_super, load_map(file).names
    ((0, 1, 0), ('animal', 'vehicle'))
    """
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise LCCInputError(f"cannot read the superclass map {file}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise LCCInputError(f"{file} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, Mapping) or not data:
        raise LCCInputError(f"{file} must map each fine class to its superclass ('3: 1' lines)")
    pairs = {}
    for key, value in data.items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise LCCInputError(f"{file}: fine class {key!r} must be an integer >= 0")
        if value is None or isinstance(value, (bool, list, dict)):
            raise LCCInputError(f"{file}: class {key} needs one superclass, got {value!r}")
        pairs[key] = value
    missing = sorted(set(range(max(pairs) + 1)) - set(pairs))
    if missing:
        raise LCCInputError(f"{file}: fine classes {missing[:5]} have no superclass; add them")
    names = sorted({str(v) for v in pairs.values()}, key=_natural)
    table = tuple(names.index(str(pairs[c])) for c in range(len(pairs)))
    if len(names) < 2 or len(names) == len(table):
        raise LCCInputError(
            f"{file} gives {len(names)} superclass(es) for {len(table)} classes; a hierarchy "
            "needs at least 2 superclasses and one holding 2 or more fine classes"
        )
    return SuperclassMap(table, tuple(names), str(file))


def _natural(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def resolve(dataset: str, superclasses: str | None) -> tuple[str, SuperclassMap | None]:
    """The plain dataset spec and the map a run trains with: ``--superclasses MAP.yaml`` wins,
    else the built-in map when the spec ends with ``:super``, else None.

    >>> resolve("mnist:super", None)[1].source, resolve("mnist", None)[1]
    ('builtin:mnist', None)
    """
    spec, wants = split_spec(dataset)
    if superclasses:
        return spec, load_map(superclasses)
    return spec, builtin_map(spec) if wants else None
