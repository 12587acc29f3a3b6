"""Superclass maps: CIFAR-100's published coarse labels, built-in maps, user YAML maps."""

from __future__ import annotations

import numpy as np
import pytest

from lcc.errors import LCCInputError
from lcc.zoo.superclasses import BUILTIN, CIFAR100_FINE, builtin_map, load_map, resolve

# CIFAR-100's coarse label of each fine label 0..99, as the dataset ships it (its 'coarse_labels'
# field); an independent record of the hierarchy the map derives from the class names
COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]  # fmt: skip


def test_cifar100_matches_the_published_coarse_labels():
    mapping = BUILTIN["cifar100"]
    assert len(CIFAR100_FINE) == 100 and CIFAR100_FINE[0] == "apple"
    assert list(mapping.fine_to_super) == COARSE
    assert np.bincount(mapping.fine_to_super).tolist() == [5] * 20
    assert mapping.names[0] == "aquatic_mammals" and mapping.names[19] == "vehicles_2"


def test_fashion_and_mnist_maps():
    fashion = builtin_map("fashion-mnist:super")
    assert fashion.num_superclasses == 3
    tops = fashion.names.index("tops")
    assert [c for c in range(10) if fashion.fine_to_super[c] == tops] == [0, 2, 4, 6]
    assert builtin_map("mnist").apply(np.arange(10)).tolist() == [0] * 5 + [1] * 5
    with pytest.raises(LCCInputError, match="no built-in superclasses"):
        builtin_map("cifar10:super")
    with pytest.raises(LCCInputError, match="not in the superclass map"):
        builtin_map("mnist").apply([10])
    with pytest.raises(LCCInputError, match="covers 10 fine classes but x has 100"):
        builtin_map("mnist").check_classes(100, "x")


def test_user_map(tmp_path):
    file = tmp_path / "map.yaml"
    file.write_text("0: 1\n1: 0\n2: 1\n3: 0\n")
    mapping = load_map(file)
    assert mapping.fine_to_super == (1, 0, 1, 0)
    spec, resolved = resolve("folder:/data:super", str(file))
    assert spec == "folder:/data" and resolved.fine_to_super == (1, 0, 1, 0)
    for text, message in [
        ("0: a\n2: b\n", "fine classes \\[1\\] have no superclass"),
        ("0: a\n1: b\n", "at least 2 superclasses and one holding 2"),
        ("- 1\n", "must map each fine class"),
        ("a: 1\n", "must be an integer"),
        ("0: [1, 2]\n", "needs one superclass"),
        ("0: [", "not valid YAML"),
    ]:
        file.write_text(text)
        with pytest.raises(LCCInputError, match=message):
            load_map(file)
    with pytest.raises(LCCInputError, match="cannot read"):
        load_map(tmp_path / "missing.yaml")
