"""The latent regularisers of the family, behind one interface (:mod:`lcc.regularisers.base`).

Register a new one with one line in :data:`REGISTRY` (``"name": "module:Class"``); it is then
available as ``lcc train --reg NAME:key=value,...``, in YAML (``regularisers: [{name: NAME,
key: value}]``) and documented by ``lcc train --help-reg NAME``.

>>> spec = parse_spec("label-variation:w=0.1,layers=fc1,act1")
>>> spec
('label-variation', {'weight': '0.1', 'layers': ['fc1', 'act1']})
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lcc.errors import LCCInputError
from lcc.regularisers.options import RegulariserOptions, did_you_mean, option

if TYPE_CHECKING:
    from lcc.regularisers.base import OUTPUT, Batch, Regulariser, TrainingLatents

#: names re-exported from :mod:`lcc.regularisers.base` on first use (it imports torch; the
#: option parsers import this package without it)
_FROM_BASE = ("OUTPUT", "Batch", "Regulariser", "TrainingLatents")


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        return getattr(importlib.import_module("lcc.regularisers.base"), name)
    raise AttributeError(f"module 'lcc.regularisers' has no attribute {name!r}")


#: name -> "module:Class"; one line registers a regulariser
REGISTRY: dict[str, str] = {
    "lcc": "lcc.regularisers.lcc:LCC",
    "label-variation": "lcc.regularisers.label_variation:LabelVariation",
    "smoothness": "lcc.regularisers.smoothness:Smoothness",
    "gkd": "lcc.regularisers.gkd:GraphDistillation",
    "kmeans": "lcc.regularisers.kmeans:KMeansCentroids",
    "rkd": "lcc.regularisers.rkd:RelationalDistillation",
    "parseval": "lcc.regularisers.parseval:Parseval",
}

#: short option names accepted in specs
ALIASES: dict[str, str] = {"w": "weight"}

__all__ = [
    "OUTPUT",
    "REGISTRY",
    "Batch",
    "Regulariser",
    "RegulariserOptions",
    "TrainingLatents",
    "build_regulariser",
    "option",
    "parse_spec",
    "regulariser_class",
    "regulariser_help",
]


def regulariser_class(name: str) -> type[Regulariser]:
    """The class registered as ``name`` (unknown names -> LCCInputError listing the valid ones)."""
    if name not in REGISTRY:
        hint = did_you_mean(name, list(REGISTRY))
        raise LCCInputError(
            f"unknown regulariser {name!r}{hint}; available: {', '.join(sorted(REGISTRY))}"
        )
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


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
    """Text of ``lcc train --help-reg NAME``: the docstring's first paragraph and each option."""
    cls = regulariser_class(name)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    import textwrap

    lines = textwrap.wrap(f"--reg {name}: {' '.join(doc.split())}", 100)
    lines += ["", f"options (--reg {name}:key=value,...; lists as key=a,b; w=... is weight=...):"]
    for item in dataclasses.fields(cls.Options):
        default = item.default_factory() if callable(item.default_factory) else item.default  # type: ignore[misc]
        shown = "the trainer's --layers" if item.name == "layers" and default == [] else default
        choices = item.metadata.get("choices")
        extra = f" (one of {', '.join(choices)})" if choices else ""
        text = f"{item.metadata.get('help', '')}{extra} [default: {shown}]"
        lines += textwrap.wrap(
            text, 100, initial_indent=f"  {item.name:<16} ", subsequent_indent=" " * 19
        )
    return "\n".join(lines)
