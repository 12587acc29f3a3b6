"""Options declared once: dataclass fields with help texts, and the one converter of values.

A field built with :func:`option` carries its help text and choices; ``lcc train --help``,
``lcc train --help-reg NAME``, ``lcc cluster --help`` and the YAML config keys are generated
from such fields. :func:`coerce` converts a value given as text (``--reg NAME:key=value``,
``key: value`` in YAML, a command-line string) or as a Python value to the field's kind (read
from its annotation by :func:`kind_of`), or says in one line what is wrong. This module imports
neither torch nor the engine, so parsers built from it start fast.

>>> kind_of("int | None"), kind_of("list[str]"), kind_of("bool")
('int?', 'list', 'bool')
>>> coerce("3", "int?", "k"), coerce("none", "int?", "k"), coerce("yes", "bool", "squared")
(3, None, True)
>>> coerce("act1, fc1", "list", "layers")
['act1', 'fc1']
>>> coerce("2.5", "int", "k")
Traceback (most recent call last):
...
lcc.errors.LCCInputError: k must be an integer, got '2.5'
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lcc.errors import LCCInputError, check_choice, check_integer, check_number

__all__ = [
    "OUTPUT",
    "RegulariserOptions",
    "coerce",
    "did_you_mean",
    "kind_of",
    "make_options",
    "option",
]

#: Pseudo layer name of the model's output (the logits), accepted wherever layers are named.
OUTPUT = "output"

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NONE = ("none", "null", "")


def option(
    default: Any, help: str, *, choices: tuple[str, ...] | None = None, **metadata: Any
) -> Any:
    """A dataclass field with the help text (and choices) its parsers show; ``metadata`` adds
    more (e.g. ``kind``, ``shown``, ``group`` for ``lcc train``)."""
    metadata = {"help": help, "choices": choices, **metadata}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def kind_of(annotation: str) -> str:
    """The kind of a field from its annotation text: ``bool``, ``int``, ``float``, ``str``,
    ``list`` (of names), with ``?`` when None is allowed."""
    parts = {part.strip() for part in str(annotation).split("|")}
    optional = "?" if "None" in parts else ""
    parts.discard("None")
    if len(parts) > 1:
        return "mixed" + optional  # e.g. int | list[int]: its check() validates
    for kind in ("bool", "int", "float", "str"):
        if kind in parts:
            return kind + optional
    if any(part.startswith(("list[", "Sequence[", "tuple[")) for part in parts):
        return "list" + optional
    return "str" + optional


def coerce(value: Any, kind: str, name: str, choices: tuple[str, ...] | None = None) -> Any:
    """``value`` (text or a Python value) as ``kind`` (see :func:`kind_of`; ``specs``: a list of
    regulariser specs), or :class:`LCCInputError` naming ``name``."""
    optional, base = kind.endswith("?"), kind.rstrip("?")
    if isinstance(value, str) and optional and base != "str" and value.strip().lower() in _NONE:
        value = None
    if value is None:
        if optional:
            return None
        raise LCCInputError(f"{name} must not be empty (null)")
    convert = _CONVERTERS.get(base, _to_str)
    result = convert(value, name)
    if choices and result is not None:
        check_choice(result, choices, name=name)
    return result


def _to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise LCCInputError(f"{name} must be true or false, got {value!r}")


def _to_int(value: Any, name: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LCCInputError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise LCCInputError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LCCInputError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise LCCInputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _to_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise LCCInputError(f"{name} must be a list of names, got {value!r}")
    names: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            what = "layer names" if "layers" in name else "names"
            raise LCCInputError(f"{name} must hold {what} (strings), got {entry!r}")
        names.extend(part.strip() for part in entry.split(",") if part.strip())
    return names


def _to_specs(value: Any, name: str) -> list[Any]:
    entries = value if isinstance(value, (list, tuple)) else [value]
    specs: list[Any] = []
    for entry in entries:
        if isinstance(entry, Mapping):
            specs.append(dict(entry))
        elif isinstance(entry, str) and entry.strip():
            specs.append(entry.strip())
        else:
            raise LCCInputError(
                f"{name} entries are NAME:key=value strings or mappings with a name, got {entry!r}"
            )
    return specs


def _to_mixed(value: Any, name: str) -> Any:
    """Text as a number where it reads as one; any other value as it is."""
    if isinstance(value, str):
        for convert in (int, float):
            try:
                return convert(value.strip())
            except ValueError:
                pass
    return value


def _to_str(value: Any, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise LCCInputError(f"{name} must be a string, got {value!r}")
    return os.fspath(value)


_CONVERTERS = {
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "list": _to_list,
    "specs": _to_specs,
    "mixed": _to_mixed,
    "str": _to_str,
}


def field_kind(item: dataclasses.Field) -> str:
    """A field's kind: its ``kind`` metadata, else read from its annotation."""
    return item.metadata.get("kind") or kind_of(str(item.type))


def add_fields(cls: type, fields: Sequence[dataclasses.Field], after: str, **metadata: Any) -> type:
    """Add ``fields`` of another dataclass to ``cls`` (before ``@dataclass`` runs), after its
    field ``after`` (at the end without one), each with its kind and ``metadata`` added."""
    annotations = dict(cls.__annotations__)
    order = list(annotations)
    at = order.index(after) + 1 if after in order else len(order)
    for item in reversed(fields):
        order.insert(at, item.name)
        annotations[item.name] = item.type
        extra = {**item.metadata, "kind": field_kind(item), **metadata}
        setattr(cls, item.name, field(default=item.default, metadata=extra))
    cls.__annotations__ = {name: annotations[name] for name in order}
    return cls


def coerce_fields(obj: Any) -> None:
    """Convert every field of the dataclass instance ``obj`` to its kind (:func:`coerce`)."""
    for item in dataclasses.fields(obj):
        value = getattr(obj, item.name)
        converted = coerce(value, field_kind(item), item.name, item.metadata.get("choices"))
        setattr(obj, item.name, converted)


@dataclass
class RegulariserOptions:
    """Options every regulariser has; subclasses add their own fields after these.

    ``layers``: the submodules it reads (names from ``lcc layers MODEL``; ``output`` is the
    model's logits; empty: the trainer's default layer); ``weight``: factor of its term in the
    loss; ``warmup``: epochs (from 0) during which the term is off. Every field is converted
    by :func:`coerce` (text from ``--reg`` or YAML), then :meth:`check` validates ranges.
    """

    layers: list[str] = option(  # noqa: RUF009 - copied per instance
        [], "layers it reads (`lcc layers MODEL`; 'output' = the logits)"
    )
    weight: float = option(0.1, "weight of its term in CE + sum of weighted terms")
    warmup: int = option(0, "epochs without this term at the start")

    def __post_init__(self) -> None:
        coerce_fields(self)
        self.check()

    def check(self) -> None:
        """Validate values; subclasses extend it (call ``super().check()``)."""
        if len(set(self.layers)) != len(self.layers):
            raise LCCInputError(f"layers lists a layer twice: {self.layers}")
        self.weight = check_number(self.weight, "weight", low=0.0)
        self.warmup = check_integer(self.warmup, "warmup", low=0)


def check_positive(value: Any, name: str) -> float:
    """``value`` as a positive finite number, else :class:`LCCInputError`."""
    number = check_number(value, name)
    if not number > 0:
        raise LCCInputError(f"{name} must be a positive number, got {number!r}")
    return number


def did_you_mean(name: str, valid: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to ``name``, or ``""``.

    >>> did_you_mean("wieght", ["weight", "warmup"])
    " (did you mean 'weight'?)"
    """
    import difflib

    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def make_options(
    cls: type[RegulariserOptions],
    options: RegulariserOptions | None,
    overrides: Mapping[str, Any],
    owner: str = "",
) -> Any:
    """``options`` (or the defaults) with ``overrides`` applied, validated.

    >>> make_options(RegulariserOptions, None, {"weight": "0.5"}).weight
    0.5
    >>> make_options(RegulariserOptions, None, {"wieght": 1}, "lcc")
    Traceback (most recent call last):
    ...
    lcc.errors.LCCInputError: unknown option 'wieght' of lcc (did you mean 'weight'?); valid: layers, warmup, weight
    """  # noqa: E501
    known = [item.name for item in dataclasses.fields(cls)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise LCCInputError(
                f"unknown option {key!r} of {owner or cls.__name__}{did_you_mean(name, known)}; "
                f"valid: {', '.join(sorted(known))}"
            )
        changes[name] = value
    if options is None:
        return cls(**changes)
    if not isinstance(options, cls):
        raise LCCInputError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    return dataclasses.replace(options, **changes) if changes else options
