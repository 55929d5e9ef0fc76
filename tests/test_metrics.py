"""Metrics against hand-computed values, and against scipy when it happens to be installed."""

import numpy as np
import pytest

from gpt1_jax import metrics

PRED = np.array([1, 1, 0, 0, 1, 0, 1, 1])
GOLD = np.array([1, 0, 0, 1, 1, 0, 1, 0])  # tp=3, fp=2, fn=1, tn=2


def test_accuracy():
    assert metrics.accuracy(PRED, GOLD) == 5 / 8


def test_f1_of_positive_class():
    assert metrics.f1(PRED, GOLD) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert metrics.f1([0, 0], [0, 0]) == 0.0


def test_matthews_correlation():
    expected = (3 * 2 - 2 * 1) / np.sqrt(5 * 4 * 4 * 3)
    assert metrics.matthews_corr(PRED, GOLD) == pytest.approx(expected)
    assert metrics.matthews_corr([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction


def test_pearson():
    assert metrics.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / np.sqrt(2 * 12.666666666666666))
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_average_ranks_and_spearman_with_ties():
    assert metrics.average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]; centred cross-product 4.5, squares 4.5 and 5
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))


def test_compute_by_name_and_bad_input():
    assert metrics.compute(("f1", "accuracy"), PRED, GOLD) == {"f1": 6 / 9, "accuracy": 5 / 8}
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute(("bleu",), PRED, GOLD)
    with pytest.raises(ValueError, match="same length"):
        metrics.accuracy([1, 0], [1])


def test_against_scipy_if_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.normal(size=200)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)
    assert metrics.average_ranks(x) == pytest.approx(stats.rankdata(x))
