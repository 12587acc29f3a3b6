"""Granulated Kendall coefficient against scipy.stats.kendalltau on hand-built model tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import kendalltau

from lcc.analysis.kendall import granulated_kendall, kendall_rows


def _grid(measure, *, seeds=(0,)):
    rows = []
    for lr, bs, seed in itertools.product((0.01, 0.1, 0.3), (32, 128), seeds):
        row = {"lr": lr, "bs": bs, "seed": seed, "status": "ok"}
        row["test_top1"] = 0.5 + lr - bs / 1000 + 0.001 * seed
        row["m"] = measure(lr, bs, seed)
        rows.append(row)
    return rows


def _brute_tau(x, y):
    """tau-a by counting pairs (no ties in these tables): equals tau-b."""
    pairs = list(itertools.combinations(range(len(x)), 2))
    score = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs)
    return score / len(pairs)


def test_perfect_for_one_hyperparameter_only():
    # m follows lr exactly (same order as the test accuracy) but ranks bs backwards
    rows = _grid(lambda lr, bs, seed: lr + bs / 10)
    result = granulated_kendall(rows, ["lr", "bs"], "m")
    assert result.per_hyperparameter == {"lr": 1.0, "bs": -1.0}
    assert result.groups == {"lr": 2, "bs": 3}
    assert result.overall == 0.0


def test_against_scipy_on_each_group_with_exclusion_failure_and_group_of_one():
    rng = np.random.default_rng(3)
    noise = {key: rng.normal() for key in itertools.product((0.01, 0.1, 0.3), (32, 128))}
    rows = _grid(lambda lr, bs, seed: noise[(lr, bs)])
    # an excluded combination: (lr=0.3, bs=128) never trained
    rows = [r for r in rows if not (r["lr"] == 0.3 and r["bs"] == 128)]
    # a failed model: (lr=0.01, bs=32) diverged -> left out
    for r in rows:
        if r["lr"] == 0.01 and r["bs"] == 32:
            r["status"] = "failed"
    result = granulated_kendall(rows, ["lr", "bs"], "m")
    ok = [r for r in rows if r["status"] == "ok"]
    # oracle for lr: groups by bs; bs=32 holds lr 0.1, 0.3; bs=128 holds lr 0.01, 0.1
    expected_lr = []
    for bs in (32, 128):
        group = [r for r in ok if r["bs"] == bs]
        assert len(group) == 2
        x, y = [r["m"] for r in group], [r["test_top1"] for r in group]
        expected_lr.append(kendalltau(x, y).statistic)
        assert _brute_tau(x, y) == pytest.approx(expected_lr[-1])
    # oracle for bs: groups by lr; lr=0.01 and lr=0.3 hold one model each (skipped)
    group = [r for r in ok if r["lr"] == 0.1]
    expected_bs = kendalltau([r["m"] for r in group], [r["test_top1"] for r in group]).statistic
    assert result.left_out == 1
    assert result.per_hyperparameter["lr"] == pytest.approx(np.mean(expected_lr))
    assert result.per_hyperparameter["bs"] == pytest.approx(expected_bs)
    assert result.small == {"lr": 0, "bs": 2}
    assert result.groups == {"lr": 2, "bs": 1}
    assert result.overall == pytest.approx((np.mean(expected_lr) + expected_bs) / 2)


def test_seeds_are_repeats_not_pooled():
    # within a seed m ranks lr perfectly; across seeds m is shifted against the accuracy, so
    # pooling seeds into one group would lower tau below 1
    rows = _grid(lambda lr, bs, seed: lr - 10 * seed, seeds=(0, 1))
    result = granulated_kendall(rows, ["lr", "bs"], "m")
    assert result.per_hyperparameter["lr"] == 1.0
    assert result.groups["lr"] == 4
    pooled = granulated_kendall(rows, ["lr", "bs"], "m", repeat=None)
    assert pooled.per_hyperparameter["lr"] < 1.0


def test_sign_flip_and_undefined_groups():
    rows = _grid(lambda lr, bs, seed: -lr)  # lower is better
    flipped = granulated_kendall(rows, ["lr", "bs"], "m", higher_is_better=False)
    assert flipped.per_hyperparameter["lr"] == 1.0
    # m does not depend on bs: every bs group has a constant measure, tau undefined
    assert flipped.undefined["bs"] == 3 and flipped.per_hyperparameter["bs"] is None
    assert flipped.overall == 1.0
    table = kendall_rows(rows, ["lr", "bs"], {"m": False})
    assert table[0]["measure"] == "m" and table[0]["sign"] == -1
    assert table[0]["skipped_undefined"] == 3 and table[0]["bs"] is None


def test_values_from_csv_text_group_like_numbers():
    rows = _grid(lambda lr, bs, seed: lr)
    text = [{k: str(v) for k, v in r.items()} for r in rows]
    assert granulated_kendall(text, ["lr", "bs"], "m").per_hyperparameter == (
        granulated_kendall(rows, ["lr", "bs"], "m").per_hyperparameter
    )
