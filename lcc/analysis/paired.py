"""Paired statistics of a setting against its baseline over the same seeds.

When a setting and the baseline ran with the same seeds, seed ``s`` of both shares its data
order, initial weights and (with ``--source``) augmentations, so the per-seed differences
``d_s = value_s - baseline_s`` remove most of the seed noise that a difference of means keeps.
:func:`paired_gain` gives their mean, a two-sided 95 % confidence interval by Student's t
(``mean ± t_{0.975, n-1} · sd / sqrt(n)``, assuming roughly normal differences; none below two
pairs), an exact two-sided sign test (ties dropped) and a seeded percentile bootstrap interval
of the mean (10,000 resamples) for readers who distrust the normal assumption.

>>> gain = paired_gain({0: 0.80, 1: 0.82, 2: 0.79}, {0: 0.78, 1: 0.81, 2: 0.78})
>>> gain.pairs, round(gain.mean, 4), round(gain.low, 4), round(gain.high, 4)
(3, 0.0133, -0.001, 0.0277)
>>> round(gain.sign_p, 3)
0.25
>>> gain.text()
'+1.33 [-0.10, +2.77] n=3'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields

import numpy as np
from scipy import stats

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "CONFIDENCE",
    "PAIRED_CAPTION",
    "PAIRED_COLUMNS",
    "PairedGain",
    "gain_text",
    "paired_cells",
    "paired_gain",
    "sign_test",
]

#: Confidence of the t and bootstrap intervals.
CONFIDENCE = 0.95
#: Resamples of the percentile bootstrap (seeded: the same table every time).
BOOTSTRAP_RESAMPLES = 10_000
#: The sweep table's caption line when some gain is paired.
PAIRED_CAPTION = (
    "Where a setting ran the baseline's seeds, its gain is the mean paired difference (same "
    "seed) with a 95 % Student-t confidence interval [low, high] and the number of pairs n; "
    "table.csv adds the sign test's p-value and a bootstrap interval.",
)
#: The sweep CSV's columns of the paired statistics (fractions, like the other columns).
PAIRED_COLUMNS: tuple[str, ...] = tuple(
    f"{metric}_{part}"
    for metric in ("paired_top1", "paired_top5")
    for part in ("pairs", "mean", "low", "high", "sign_p", "boot_low", "boot_high")
)


@dataclass(frozen=True)
class PairedGain:
    """Mean paired difference over ``pairs`` seeds with its t interval ``[low, high]`` (None
    below two pairs), the sign test's two-sided p-value and the bootstrap interval."""

    pairs: int
    mean: float
    low: float | None
    high: float | None
    sign_p: float
    boot_low: float | None
    boot_high: float | None

    def text(self, scale: float = 100.0) -> str:
        """``+mean [low, high] n=N`` in percentage points (``scale`` 100: fractions in)."""
        mean = f"{scale * self.mean:+.2f}"
        if self.low is None or self.high is None:
            return f"{mean} n={self.pairs}"
        return f"{mean} [{scale * self.low:+.2f}, {scale * self.high:+.2f}] n={self.pairs}"

    @property
    def beyond_noise(self) -> bool:
        """Whether the t interval excludes 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_gain(
    values: Mapping[int, float], baseline: Mapping[int, float], *, confidence: float = CONFIDENCE
) -> PairedGain | None:
    """Statistics of ``values[s] - baseline[s]`` over the seeds ``s`` both hold; None when they
    share no seed or the seed sets differ (then the samples are not paired)."""
    if not values or set(values) != set(baseline):
        return None
    seeds = sorted(values)
    differences = np.array([float(values[s]) - float(baseline[s]) for s in seeds])
    n = differences.shape[0]
    mean = float(differences.mean())
    low = high = boot_low = boot_high = None
    if n >= 2:
        spread = float(differences.std(ddof=1)) / math.sqrt(n)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * spread
        low, high = mean - half, mean + half
        rng = np.random.default_rng(0)
        means = differences[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
        tail = (1 - confidence) / 2
        boot_low, boot_high = (float(q) for q in np.quantile(means, [tail, 1 - tail]))
    return PairedGain(n, mean, low, high, sign_test(differences), boot_low, boot_high)


def sign_test(differences: np.ndarray) -> float:
    """Exact two-sided sign test of a zero median (zero differences dropped; 1.0 if none left).

    >>> sign_test(np.array([0.1, 0.2, 0.3, 0.0]))
    0.25
    """
    nonzero = differences[differences != 0]
    if nonzero.size == 0:
        return 1.0
    positive = int(np.count_nonzero(nonzero > 0))
    return float(stats.binomtest(positive, int(nonzero.size), 0.5).pvalue)


def gain_text(unpaired: float | None, paired: PairedGain | None) -> str:
    """A sweep table's gain cell: the paired gain with its interval when the seeds pair, else
    the difference of means (percentage points), ``-`` when there is none.

    >>> gain_text(0.0123, None), gain_text(None, None)
    ('+1.23', '-')
    """
    if paired is not None:
        return paired.text()
    return "-" if unpaired is None else f"{100 * unpaired:+.2f}"


def paired_cells(*gains: PairedGain | None) -> list[str]:
    """The CSV cells of :data:`PAIRED_COLUMNS` for the top-1 and top-5 gains (empty: unpaired).

    >>> len(paired_cells(None, None)) == len(PAIRED_COLUMNS)
    True
    """
    cells: list[str] = []
    for gain in gains:
        values = [None] * len(fields(PairedGain)) if gain is None else astuple(gain)
        cells += ["" if value is None else repr(value) for value in values]
    return cells
