"""Evaluation metrics of the fine-tuning tasks (Sec. 4.2, Tables 2-4), in numpy.

GLUE fixes the metric per task: Matthews correlation for CoLA, F1 and accuracy for MRPC and QQP, Pearson and
Spearman correlation for STS-B, accuracy elsewhere. `gpt1_jax.tasks.TaskSpec.metrics` names them from
`METRICS`; `compute` evaluates a spec's list. All return fractions (multiply by 100 to compare with the
paper's percentages) and take predictions and labels of the evaluated examples only (drop batch padding
first, e.g. with the `weights` of `gpt1_jax.data.task_inputs.batches`).
"""

from typing import Callable, Mapping, Sequence

import numpy as np


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


def pearson(predictions, labels) -> float:
    """Pearson correlation; 0 when either side is constant (the correlation is undefined)."""
    x, y = (a.astype(np.float64) for a in _pair(predictions, labels))
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator else 0.0


def average_ranks(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (as Spearman's rho requires)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], len(values)]
    group_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def spearman(predictions, labels) -> float:
    """Spearman's rho: Pearson correlation of average ranks, so ties are handled exactly."""
    predictions, labels = _pair(predictions, labels)
    return pearson(average_ranks(predictions), average_ranks(labels))


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
