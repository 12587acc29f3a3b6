"""The latent regularisers of the family, behind one interface (:mod:`lcc.regularisers.base`).

Register a new one with one entry in :data:`REGISTRY`: ``"name": Registration("module:Class",
"module:Options")``; it is then available as ``lcc train --reg NAME:key=value,...``, in YAML
(``regularisers: [{name: NAME, key: value}]``) and documented by ``lcc train --help-reg NAME``.
The options dataclass lives in a module without torch (``NAME_options.py`` beside the
regulariser, as :mod:`lcc.regularisers.lcc_options`), and the first paragraph of its docstring
is the summary ``--help-reg`` prints: the help then starts in a fraction of a second. A bare
``"module:Class"`` registers one too; its help imports the class (and torch).

>>> spec = parse_spec("label-variation:w=0.1,layers=fc1,act1")
>>> spec
('label-variation', {'weight': '0.1', 'layers': ['fc1', 'act1']})
>>> options_class("label-variation").__name__
'LabelVariationOptions'
>>> regulariser_summary("smoothness")
'Smoothness of label variation across consecutive layers (sec. 4.3, eq. 8; weight = gamma).'
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from lcc.errors import LCCInputError
from lcc.regularisers.options import OUTPUT, RegulariserOptions, did_you_mean, option

if TYPE_CHECKING:
    from lcc.regularisers.base import Batch, Regulariser, TrainingLatents

#: names re-exported from :mod:`lcc.regularisers.base` on first use (it imports torch; the
#: option parsers and ``--help-reg`` import this package without it)
_FROM_BASE = ("Batch", "Regulariser", "TrainingLatents")


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        return getattr(importlib.import_module("lcc.regularisers.base"), name)
    raise AttributeError(f"module 'lcc.regularisers' has no attribute {name!r}")


class Registration(NamedTuple):
    """Where a regulariser lives: ``regulariser``, its ``"module:Class"`` (imports torch), and
    ``options``, the ``"module:Class"`` of its options dataclass in a module without torch
    (what ``--help-reg`` reads; empty: the class's ``Options``, importing the class)."""

    regulariser: str
    options: str = ""


def _own(module: str, regulariser: str, options: str) -> Registration:
    """The registration of this package's ``module`` (its options in ``module_options``)."""
    where = f"lcc.regularisers.{module}"
    return Registration(f"{where}:{regulariser}", f"{where}_options:{options}")


#: name -> its :class:`Registration` (or a bare ``"module:Class"``); one entry registers one
REGISTRY: dict[str, Registration | str] = {
    "lcc": _own("lcc", "LCC", "LCCOptions"),
    "label-variation": _own("label_variation", "LabelVariation", "LabelVariationOptions"),
    "smoothness": _own("smoothness", "Smoothness", "SmoothnessOptions"),
    "gkd": _own("gkd", "GraphDistillation", "GraphDistillationOptions"),
    "kmeans": _own("kmeans", "KMeansCentroids", "KMeansOptions"),
    "rkd": _own("rkd", "RelationalDistillation", "RelationalDistillationOptions"),
    "parseval": _own("parseval", "Parseval", "ParsevalOptions"),
}

#: short option names accepted in specs
ALIASES: dict[str, str] = {"w": "weight"}

__all__ = [
    "OUTPUT",
    "REGISTRY",
    "Batch",
    "Registration",
    "Regulariser",
    "RegulariserOptions",
    "TrainingLatents",
    "build_regulariser",
    "option",
    "options_class",
    "parse_spec",
    "registration",
    "regulariser_class",
    "regulariser_help",
    "regulariser_summary",
]


def registration(name: str) -> Registration:
    """The :class:`Registration` of ``name`` (unknown names -> LCCInputError listing the valid
    ones)."""
    if name not in REGISTRY:
        hint = did_you_mean(name, list(REGISTRY))
        raise LCCInputError(
            f"unknown regulariser {name!r}{hint}; available: {', '.join(sorted(REGISTRY))}"
        )
    entry = REGISTRY[name]
    return Registration(entry) if isinstance(entry, str) else entry


def _load(target: str) -> Any:
    """The object that ``"module:name"`` names (imports the module)."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def regulariser_class(name: str) -> type[Regulariser]:
    """The class registered as ``name`` (imports it, and torch)."""
    return _load(registration(name).regulariser)


def options_class(name: str) -> type[RegulariserOptions]:
    """The options dataclass of the regulariser registered as ``name``, imported without torch
    when its registration names it (else the class's ``Options``)."""
    entry = registration(name)
    return _load(entry.options) if entry.options else regulariser_class(name).Options


def regulariser_summary(name: str) -> str:
    """One paragraph on ``name``: the first of its options' docstring (or, when that has
    none, of the regulariser class's), on one line."""
    options = options_class(name)
    doc = options.__doc__ or ""
    if not doc.strip() or doc.startswith(f"{options.__name__}("):  # dataclass's generated one
        doc = regulariser_class(name).__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"NAME:key=value,key=value"`` (or a mapping with ``name``) -> (name, options).

    A piece without ``=`` continues the previous key's value as a list
    (``layers=fc1,act1``). Values stay strings here; the options dataclass converts them.
    """
    if isinstance(spec, Mapping):
        values = {str(k).replace("-", "_"): v for k, v in spec.items()}
        name = values.pop("name", None)
        if not isinstance(name, str) or not name:
            raise LCCInputError(f"a regulariser entry needs a name: {dict(spec)!r}")
        return name, {ALIASES.get(k, k): v for k, v in values.items()}
    if not isinstance(spec, str) or not spec.strip():
        raise LCCInputError(f"empty regulariser spec {spec!r}; write NAME or NAME:key=value,...")
    name, _, rest = spec.strip().partition(":")
    options: dict[str, Any] = {}
    last: str | None = None
    for piece in filter(None, (part.strip() for part in rest.split(","))):
        if "=" in piece:
            key, _, value = piece.partition("=")
            key = ALIASES.get(key.strip().replace("-", "_"), key.strip().replace("-", "_"))
            if key in options:
                raise LCCInputError(
                    f"regulariser spec {spec!r} gives {key!r} twice; keep one value"
                )
            options[key] = value.strip()
            last = key
        elif last is not None:
            previous = options[last]
            options[last] = [*previous, piece] if isinstance(previous, list) else [previous, piece]
        else:
            raise LCCInputError(
                f"cannot read {piece!r} in regulariser spec {spec!r}; write NAME:key=value,..."
            )
    return name.strip(), options


def build_regulariser(spec: str | Mapping[str, Any], **defaults: Any) -> Regulariser:
    """A regulariser from a spec (see :func:`parse_spec`); ``defaults`` fill unset options."""
    name, options = parse_spec(spec)
    cls = regulariser_class(name)
    known = {item.name for item in dataclasses.fields(cls.Options)}
    merged = {k: v for k, v in defaults.items() if k in known}
    merged.update(options)
    return cls(**merged)


def regulariser_help(name: str) -> str:
    """Text of ``lcc train --help-reg NAME``: its summary and each option with its default
    (read from :func:`options_class`: no torch for a full :class:`Registration`)."""
    import textwrap

    options = options_class(name)
    lines = textwrap.wrap(f"--reg {name}: {regulariser_summary(name)}", 100)
    lines += ["", f"options (--reg {name}:key=value,...; lists as key=a,b; w=... is weight=...):"]
    for item in dataclasses.fields(options):
        default = item.default_factory() if callable(item.default_factory) else item.default  # type: ignore[misc]
        shown = "the trainer's --layers" if item.name == "layers" and default == [] else default
        choices = item.metadata.get("choices")
        extra = f" (one of {', '.join(choices)})" if choices else ""
        text = f"{item.metadata.get('help', '')}{extra} [default: {shown}]"
        lines += textwrap.wrap(
            text, 100, initial_indent=f"  {item.name:<16} ", subsequent_indent=" " * 19
        )
    return "\n".join(lines)
