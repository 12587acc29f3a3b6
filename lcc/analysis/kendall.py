"""The granulated Kendall coefficient of Jiang et al. (2020), as the intraclass paper uses it.

Sec. 3.2 of ``intraclass-clustering-measures``: for each hyperparameter ``i``, the models are
grouped by the values of every *other* hyperparameter (and by the repeat ``seed``, which is
not a hyperparameter); inside each group only ``i`` varies. Kendall's tau between the measure
and the test accuracy is computed in every group of two or more models and averaged over the
groups; the overall score is the mean over the hyperparameters.

Counting rules (every skip is counted, never silent):

- a model whose ``status`` is not ``ok`` (failed, diverged) or whose measure value or target
  is missing or not finite is left out (``left_out``);
- a group of fewer than two models is skipped (``small``), e.g. a setting an ``exclude:``
  removed or a model that failed;
- a group whose tau is undefined (all measure values or all targets equal: tau-b divides by
  zero, ``scipy.stats.kendalltau`` returns NaN) is skipped (``undefined``);
- a hyperparameter without any usable group has no coefficient (None) and is left out of the
  overall mean.

Sign: tau is computed between ``sign * measure`` and the target, with ``sign = +1`` for a
measure whose larger values should mean better generalisation (c1-c4) and ``-1`` for one whose
larger values mean worse generalisation (the sharpness measures 1/sigma' and 1/alpha', LCC's
misclustered fraction, label variation): a positive coefficient always means "ranks the
models like their test accuracy does". tau is scipy's tau-b (ties handled), the authors' code
(``kendal_coefficient.py``) counts ordered pairs with ``copysign``, which differs on ties.

>>> rows = [{"lr": lr, "bs": bs, "m": lr * 10 + bs, "test_top1": lr - bs / 100}
...         for lr in (0.1, 0.2) for bs in (1, 2)]
>>> result = granulated_kendall(rows, ["lr", "bs"], "m")
>>> result.per_hyperparameter, result.overall   # lr: +1 in both groups; bs: -1
({'lr': 1.0, 'bs': -1.0}, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from lcc.errors import LCCInputError

__all__ = ["KendallResult", "granulated_kendall", "kendall_rows", "value_key"]

TARGET = "test_top1"


@dataclass
class KendallResult:
    """Granulated Kendall coefficient of one measure.

    ``per_hyperparameter[i]`` is the mean tau over the usable groups of ``i`` (None without
    any); ``groups[i]`` how many groups were used, ``small[i]`` how many had fewer than two
    models, ``undefined[i]`` how many had an undefined tau; ``left_out`` the models without a
    usable value; ``overall`` the mean of the defined per-hyperparameter coefficients.
    """

    measure: str
    sign: int
    per_hyperparameter: dict[str, float | None] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    small: dict[str, int] = field(default_factory=dict)
    undefined: dict[str, int] = field(default_factory=dict)
    left_out: int = 0
    overall: float | None = None


def value_key(value: Any) -> str:
    """A hashable, order-independent key of a hyperparameter value (``0.1`` and ``"0.1"``
    read from a CSV are the same setting).

    >>> value_key(0.1) == value_key("0.1"), value_key(True) == value_key("True"), value_key("adam")
    (True, True, 'adam')
    """
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, np.integer, np.floating)):
        return repr(float(value))
    if isinstance(value, str):
        try:
            return repr(float(value))
        except ValueError:
            return value.strip().lower() if value.strip().lower() in ("true", "false") else value
    return repr(value)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):  # None and "" too
        return None
    return number if math.isfinite(number) else None


def _usable(row: Mapping[str, Any], measure: str, target: str) -> bool:
    status = row.get("status", "ok")
    return (
        (status in (None, "", "ok"))
        and _number(row.get(measure)) is not None
        and _number(row.get(target)) is not None
    )


def granulated_kendall(
    rows: Sequence[Mapping[str, Any]],
    hyperparameters: Sequence[str],
    measure: str,
    *,
    higher_is_better: bool = True,
    target: str = TARGET,
    repeat: str | None = "seed",
) -> KendallResult:
    """The granulated Kendall coefficient of ``measure`` against ``target`` over ``rows``.

    ``rows``: one mapping per model with its ``hyperparameters``' values, the ``measure``
    value, the ``target`` (test accuracy) and optionally ``status``. ``repeat`` names the
    repeat key (seeds) that is part of every group key when present. See the module
    docstring for the counting and sign rules.

    >>> rows = [{"a": a, "m": 1.0, "test_top1": a} for a in (1, 2)]
    >>> granulated_kendall(rows, ["a"], "m").undefined  # a constant measure: tau undefined
    {'a': 1}
    """
    if not hyperparameters:
        raise LCCInputError("no hyperparameter given; name the grid's hyperparameters")
    sign = 1 if higher_is_better else -1
    usable = [row for row in rows if _usable(row, measure, target)]
    result = KendallResult(measure=measure, sign=sign, left_out=len(rows) - len(usable))
    for name in hyperparameters:
        others = [other for other in hyperparameters if other != name]
        if repeat and repeat not in hyperparameters:
            others.append(repeat)
        groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for row in usable:
            key = tuple(value_key(row.get(other)) for other in others)
            groups.setdefault(key, []).append(row)
        taus, small, undefined = [], 0, 0
        for members in groups.values():
            if len(members) < 2:
                small += 1
                continue
            x = [sign * float(row[measure]) for row in members]
            y = [float(row[target]) for row in members]
            tau = kendalltau(x, y).statistic
            if tau is None or not math.isfinite(tau):
                undefined += 1
                continue
            taus.append(float(tau))
        result.groups[name] = len(taus)
        result.small[name] = small
        result.undefined[name] = undefined
        result.per_hyperparameter[name] = float(np.mean(taus)) if taus else None
    defined = [v for v in result.per_hyperparameter.values() if v is not None]
    result.overall = float(np.mean(defined)) if defined else None
    return result


def kendall_rows(
    rows: Sequence[Mapping[str, Any]],
    hyperparameters: Sequence[str],
    measures: Mapping[str, bool],
    *,
    target: str = TARGET,
    repeat: str | None = "seed",
) -> list[dict[str, Any]]:
    """One row per measure (``measures``: column name -> higher_is_better): ``measure``, one
    column per hyperparameter, ``overall``, then ``sign``, ``groups``, ``skipped_small``,
    ``skipped_undefined`` and ``left_out`` (totals over the hyperparameters).

    >>> rows = [{"a": a, "m": a, "n": -a, "test_top1": a} for a in (1, 2, 3)]
    >>> table = kendall_rows(rows, ["a"], {"m": True, "n": False})
    >>> [(r["measure"], r["a"], r["sign"]) for r in table]
    [('m', 1.0, 1), ('n', 1.0, -1)]
    """
    table = []
    for name, higher in measures.items():
        result = granulated_kendall(
            rows, hyperparameters, name, higher_is_better=higher, target=target, repeat=repeat
        )
        table.append(
            {
                "measure": name,
                **{hp: result.per_hyperparameter[hp] for hp in hyperparameters},
                "overall": result.overall,
                "sign": result.sign,
                "groups": sum(result.groups.values()),
                "skipped_small": sum(result.small.values()),
                "skipped_undefined": sum(result.undefined.values()),
                "left_out": result.left_out,
            }
        )
    return table
