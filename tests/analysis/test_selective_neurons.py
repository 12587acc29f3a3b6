"""Fig. 7's neuron choice against a numpy loop of eq. (1), and the figure from tracked epochs."""

from __future__ import annotations

import numpy as np

from lcc.analysis.selective_neurons import selective_neurons, write_figure
from lcc.io import save_npz_atomic


def test_max_and_median_subclass_neurons_match_a_loop():
    rng = np.random.default_rng(1)
    y_fine = np.arange(300) % 6
    y_super = y_fine // 3
    z = rng.normal(size=(300, 9))
    for sub in range(6):
        z[y_fine == sub, sub] += 0.5 * (sub + 1)
    best = []
    for sub in range(6):
        inside = y_fine == sub
        rest = (y_super == y_super[inside][0]) & ~inside
        s = (z[inside].mean(0) - z[rest].mean(0)) / (z[inside].std(0) + z[rest].std(0))
        best.append((s.max(), sub, int(s.argmax())))
    ranked = sorted(best, key=lambda item: -item[0])
    expected = [ranked[0], ranked[2]]  # max, and the lower middle of six
    got = selective_neurons(z, y_fine, y_super)
    assert [(s, n) for s, n, _ in got] == [(sub, n) for _, sub, n in expected]
    assert [v for _, _, v in got] == [float(v) for v, _, _ in expected]


def test_figure_from_tracked_epochs(tmp_path):
    rng = np.random.default_rng(0)
    y_fine = np.arange(80) % 4
    folder = tmp_path / "run" / "tracking"
    folder.mkdir(parents=True)
    for epoch in (1, 2, 3):  # tracking/epoch=E.npz counts from 1
        z = rng.normal(size=(80, 6))
        save_npz_atomic(folder / f"epoch={epoch}.npz", z_fc=z, y=y_fine // 2, y_fine=y_fine)
    assert write_figure(tmp_path / "run", tmp_path / "fig7")
    assert (tmp_path / "fig7.png").is_file() and (tmp_path / "fig7.svg").is_file()
    assert not write_figure(tmp_path / "none", tmp_path / "x")
