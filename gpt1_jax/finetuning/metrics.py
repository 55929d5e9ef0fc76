"""Evaluation metrics of the fine-tuning tasks (Sec. 4.2, Tables 2-4), in numpy.

GLUE fixes the metric per task: Matthews correlation for CoLA, F1 and accuracy for MRPC and QQP, Pearson and
Spearman correlation for STS-B, accuracy elsewhere. `gpt1_jax.finetuning.tasks.TaskSpec.metrics` names them from
`METRICS`; `compute` evaluates a spec's list. All return fractions (multiply by 100 to compare with the
paper's percentages) and take predictions and labels of the evaluated examples only (drop batch padding
first, e.g. with the `weights` of `gpt1_jax.finetuning.task_inputs.batches`).
"""

from typing import Callable, Mapping, Sequence

import numpy as np
import scipy.stats


def _pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1 or predictions.size == 0:
        raise ValueError(f"need two non-empty 1-D arrays of the same length, got shapes {predictions.shape} "
                         f"and {labels.shape}")
    return predictions, labels


def accuracy(predictions, labels) -> float:
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions, labels) -> float:
    """Binary F1 of the positive class 1 (paraphrase / duplicate), as GLUE scores MRPC and QQP."""
    predictions, labels = _pair(predictions, labels)
    true_pos = np.sum((predictions == 1) & (labels == 1))
    false_pos = np.sum((predictions == 1) & (labels != 1))
    false_neg = np.sum((predictions != 1) & (labels == 1))
    denominator = 2 * true_pos + false_pos + false_neg
    return float(2 * true_pos / denominator) if denominator else 0.0


def matthews_corr(predictions, labels) -> float:
    """Matthews correlation of binary predictions (CoLA); 0 when a row or column of the confusion is empty."""
    predictions, labels = _pair(predictions, labels)
    p, y = predictions == 1, labels == 1
    tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
    fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def _correlation(statistic, predictions, labels) -> float:
    """`statistic` (a scipy.stats correlation) of the pair; 0 when either side is constant.

    The correlation is undefined there and scipy would return nan with a warning; a number keeps dev
    scores comparable when fine-tuning picks its best step by them.
    """
    x, y = _pair(predictions, labels)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    return float(statistic(x, y).statistic)


def pearson(predictions, labels) -> float:
    """Pearson correlation (STS-B)."""
    return _correlation(scipy.stats.pearsonr, predictions, labels)


def spearman(predictions, labels) -> float:
    """Spearman's rho (STS-B): the Pearson correlation of average ranks, so tied values share a rank."""
    return _correlation(scipy.stats.spearmanr, predictions, labels)


METRICS: Mapping[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_corr": matthews_corr,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names: Sequence[str], predictions, labels) -> dict[str, float]:
    """{name: value} for each metric name (e.g. a TaskSpec's `metrics`)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    return {name: METRICS[name](predictions, labels) for name in names}
