"""Task registry: the paper's tasks with consistent specs, known names, TFDS label order.

The readers of the task files are tested in test_task_readers.py."""

import pytest

from gpt1_jax.finetuning import metrics, tasks

PAPER_TASKS = ("snli", "mnli", "qnli", "rte", "scitail", "race/middle", "race/high", "race/all", "story_cloze",
               "mrpc", "qqp", "stsb", "cola", "sst2")


def test_registry_holds_the_papers_tasks_with_consistent_specs():
    assert set(PAPER_TASKS) <= set(tasks.TASKS) and "wnli" in tasks.TASKS
    for spec in tasks.TASKS.values():
        assert spec.kind in tasks.KINDS and set(spec.metrics) <= set(metrics.METRICS)
        assert set(spec.paper) <= set(spec.eval_splits) <= set(spec.tfds.splits)
    assert tasks.get_task("mnli").paper == {"validation_matched": 82.1, "validation_mismatched": 81.4}
    assert tasks.get_task("cola").primary_metric == "matthews_corr"
    assert tasks.get_task("mrpc").metrics == ("f1", "accuracy")
    assert tasks.get_task("stsb").num_outputs == 1 and tasks.get_task("snli").num_outputs == 3


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match="unknown task 'glue'.*cola.*sst2"):
        tasks.get_task("glue")


def test_label_order_matches_tfds_class_labels():
    tfds = pytest.importorskip("tensorflow_datasets")
    for spec in tasks.TASKS.values():
        if spec.kind != tasks.MULTIPLE_CHOICE and spec.label_names:
            features = tfds.builder(spec.tfds.names[0]).info.features
            assert tuple(features[spec.tfds.label].names) == spec.label_names, spec.name
