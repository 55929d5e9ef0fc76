"""Metrics against hand-computed values and independent numpy formulas."""

import warnings

import numpy as np
import pytest

from gpt1_jax.finetuning import metrics

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


def test_spearman_with_ties_uses_average_ranks():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]; centred cross-product 4.5, squares 4.5 and 5
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
    assert metrics.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear


@pytest.mark.parametrize("name", ["pearson", "spearman"])
@pytest.mark.parametrize("predictions,labels", [([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [0.5, 0.5, 0.5]), ([2.0], [3.0])])
def test_correlation_of_a_constant_side_is_zero_without_warnings(name, predictions, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.METRICS[name](predictions, labels) == 0.0


def test_correlations_agree_with_numpy_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    ranks = [np.argsort(np.argsort(v)) for v in (x, y)]  # no ties among continuous draws
    assert metrics.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert metrics.spearman(x, y) == pytest.approx(np.corrcoef(*ranks)[0, 1])


def test_compute_by_name_and_bad_input():
    assert metrics.compute(("f1", "accuracy"), PRED, GOLD) == {"f1": 6 / 9, "accuracy": 5 / 8}
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute(("bleu",), PRED, GOLD)
    with pytest.raises(ValueError, match="same length"):
        metrics.accuracy([1, 0], [1])
