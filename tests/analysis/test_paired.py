"""Paired gains against scipy called directly and against a binomial sum written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lcc.analysis.paired import gain_text, paired_gain, sign_test


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_t_interval_matches_scipy_ttest_rel(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.7, 0.9, 6)
    values = base + rng.normal(0.01, 0.01, 6)
    gain = paired_gain(dict(enumerate(values)), dict(enumerate(base)))
    assert gain is not None and gain.pairs == 6
    expected = stats.ttest_rel(values, base).confidence_interval(confidence_level=0.95)
    assert gain.mean == pytest.approx(float(np.mean(values - base)))
    assert gain.low == pytest.approx(expected.low, rel=1e-9)
    assert gain.high == pytest.approx(expected.high, rel=1e-9)
    # the bootstrap interval covers the mean and is about as wide as the t one
    assert gain.boot_low < gain.mean < gain.boot_high
    assert 0.4 < (gain.boot_high - gain.boot_low) / (gain.high - gain.low) < 1.5


def test_pairs_follow_the_seeds_not_the_order() -> None:
    shuffled = paired_gain({2: 0.9, 0: 0.8, 1: 0.7}, {0: 0.75, 1: 0.7, 2: 0.8})
    assert shuffled is not None
    assert shuffled.mean == pytest.approx(np.mean([0.05, 0.0, 0.1]))


def test_different_seed_sets_are_not_paired() -> None:
    assert paired_gain({0: 0.8, 1: 0.8}, {0: 0.7, 2: 0.7}) is None
    assert paired_gain({}, {}) is None
    one = paired_gain({0: 0.8}, {0: 0.7})
    assert one is not None and one.low is None and one.text() == "+10.00 n=1"


def binomial_two_sided(positive: int, n: int) -> float:
    """Exact two-sided sign test p-value by summing binomial(n, 1/2) probabilities."""
    probability = [math.comb(n, i) / 2**n for i in range(n + 1)]
    observed = probability[positive]
    return min(1.0, sum(p for p in probability if p <= observed * (1 + 1e-12)))


@pytest.mark.parametrize(
    "differences",
    [[0.1, 0.2, 0.3, 0.4, 0.5], [0.1, -0.2, 0.3, 0.4, 0.0, 0.2, 0.1], [-0.1, -0.2, 0.05]],
)
def test_sign_test_matches_the_binomial_sum(differences: list[float]) -> None:
    array = np.array(differences)
    nonzero = array[array != 0]
    expected = binomial_two_sided(int((nonzero > 0).sum()), nonzero.size)
    assert sign_test(array) == pytest.approx(expected, rel=1e-9)


def test_gain_cell_shows_the_interval_and_the_pairs() -> None:
    gain = paired_gain({0: 0.80, 1: 0.82}, {0: 0.79, 1: 0.80})
    assert gain is not None
    assert gain_text(0.015, gain).endswith("n=2") and "[" in gain_text(0.015, gain)
    assert gain_text(0.015, None) == "+1.50"


def _runs(tmp_path, kind: str, setting: tuple, top1: dict[int, float]) -> list:
    import json

    from lcc.train.config import TrainConfig
    from lcc.train.sweep import SweepRun

    runs = []
    for seed, value in top1.items():
        out = tmp_path / f"{kind}-{len(setting)}-{seed}"
        out.mkdir()
        (out / "metrics.json").write_text(json.dumps({"test_top1": value, "test_top5": 0.99}))
        config = TrainConfig(out=str(out))
        runs.append(SweepRun(out.name, setting, seed, kind, config=config))
    return runs


def test_sweep_table_shows_paired_gains_when_the_seeds_match(tmp_path) -> None:
    from lcc.train.sweep import Sweep, format_table, sweep_table, table_csv

    base = {0: 0.80, 1: 0.78, 2: 0.83}
    lcc = {2: 0.845, 0: 0.81, 1: 0.79}
    sweep = Sweep(base={}, grid={"weight": [0.1], "seed": [0, 1, 2]}, baseline={})
    runs = _runs(tmp_path, "baseline", (), base) + _runs(tmp_path, "grid", (("weight", 0.1),), lcc)
    rows = sweep_table(sweep, runs)
    gain = rows[1].paired_top1
    assert gain is not None and gain.pairs == 3
    expected = stats.ttest_rel([lcc[s] for s in range(3)], [base[s] for s in range(3)])
    interval = expected.confidence_interval()
    assert (gain.low, gain.high) == pytest.approx((interval.low, interval.high))
    table = format_table(sweep, rows)
    assert gain.text() in table and "Student-t" in table
    header, _, row = table_csv(sweep, rows).splitlines()
    cells = dict(zip(header.split(","), row.split(","), strict=True))
    assert float(cells["paired_top1_sign_p"]) == pytest.approx(0.25)
    assert float(cells["paired_top1_low"]) == pytest.approx(interval.low)


def test_sweep_table_keeps_the_difference_of_means_when_seeds_differ(tmp_path) -> None:
    from lcc.train.sweep import Sweep, format_table, sweep_table

    sweep = Sweep(base={}, grid={"weight": [0.1], "seed": [0, 1]}, baseline={})
    runs = _runs(tmp_path, "baseline", (), {0: 0.8}) + _runs(
        tmp_path, "grid", (("weight", 0.1),), {0: 0.81, 1: 0.83}
    )
    rows = sweep_table(sweep, runs)
    assert rows[1].paired_top1 is None
    assert "+2.00 |" in format_table(sweep, rows) and "Student-t" not in format_table(sweep, rows)
