"""A user's own task: its description (files or a TFDS name, columns, kind) as a `TaskSpec`.

Fine-tuning treats it exactly like the paper's tasks: the spec names its kind (one of the input
transformations of Sec. 3.3, or `regression`, STS-B's single output on a pair), its files and columns,
its label set and metrics. Nothing else in the recipe knows the task is not registered.

    python train.py --config configs/finetune.py:custom --config.init=CKPT --workdir W \\
        --config.custom.kind=classification --config.custom.train=train.tsv \\
        --config.custom.validation=dev.tsv --config.custom.text_a=question --config.custom.label=label

The description is a `CustomTaskOptions`, which the fine-tuning recipe builds from its `custom.*` keys (one
field each, same names); a `CustomTaskError` names the field at fault, and the recipe the key. Labels are
`labels` (comma-separated, in index order) or else the sorted distinct labels of the training file; the
recipe writes the set it used back into the config, so `config.json` and
`results.json` record it and predictions map back to the user's own labels. A multiple-choice label is
the 0-based index or the text of the right choice.

Labels are compared as the classes they name (`task_readers.label_key`), in every file format and in
`labels`: stripped of surrounding whitespace (`pos ` is `pos`; a label empty after stripping is a bad row),
numbers by value (`1`, `1.0` and `"1"` are the class named "1"). A text field that is empty is kept, and
counted in a warning naming the first file:line.
"""

from __future__ import annotations

import codecs
import dataclasses
import os

from gpt1_jax.errors import UserError
from gpt1_jax.finetuning import metrics, task_readers, tasks

NAME = "custom"
KINDS = {"classification": tasks.CLASSIFICATION, "entailment": tasks.ENTAILMENT, "similarity": tasks.SIMILARITY,
         "multiple_choice": tasks.MULTIPLE_CHOICE, "regression": tasks.REGRESSION_SIMILARITY}
DEFAULT_METRICS = {tasks.CLASSIFICATION: ("accuracy",), tasks.ENTAILMENT: ("accuracy",),
                   tasks.SIMILARITY: ("accuracy",), tasks.MULTIPLE_CHOICE: ("accuracy",),
                   tasks.REGRESSION_SIMILARITY: ("pearson", "spearman")}
METRIC_ALIASES = {"mcc": "matthews_corr"}
BINARY_METRICS = ("f1", "matthews_corr")  # of the positive class 1: two labels only
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class CustomTaskOptions:
    """A user's task: its kind, where its examples are, which column plays which role."""

    kind: str  # one of KINDS
    train: str  # file paths (.tsv, .csv, .jsonl); a test file may lack the label
    validation: str
    test: str
    tfds: str  # a TFDS dataset instead of files ...
    splits: str  # ... and OURS=TFDS split pairs
    format: str  # tsv, csv or jsonl when the suffix does not say
    columns: str  # COL1,COL2,... for a TSV/CSV without a header line
    encoding: str
    text_a: str
    text_b: str
    choices: str  # COL1,COL2,... (multiple choice)
    label: str
    labels: str  # a,b,c in index order (default: the sorted training labels)
    uid: str  # an id column for the predictions file (default: the row number)
    metrics: str  # default: DEFAULT_METRICS of the kind
    on_error: str  # a bad row: "raise" or "skip"


class CustomTaskError(UserError, ValueError):
    """A task description that cannot work; `option` is the field to change, which the message starts with."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}{message}")
        self.option = option


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


def _check_columns(custom: CustomTaskOptions, kind: str) -> tuple[str, ...]:
    """The choice columns; a CustomTaskError for a kind whose text columns are missing."""
    for key in ("text_a", "label"):
        if not getattr(custom, key):
            raise CustomTaskError(key, " is not set: name the column (or JSON field) that holds it.")
    choices = _names(custom.choices)
    if kind in (tasks.ENTAILMENT, tasks.SIMILARITY, tasks.REGRESSION_SIMILARITY) and not custom.text_b:
        raise CustomTaskError("text_b", f" is not set, and kind={custom.kind} pairs two texts: name the second "
                                        "text's column.")
    if kind == tasks.MULTIPLE_CHOICE and len(choices) < 2:
        raise CustomTaskError("choices", "=COL1,COL2[,...] is needed by kind=multiple_choice: the columns of the "
                                         "answers (text_a is the context).")
    if kind != tasks.MULTIPLE_CHOICE and choices:
        raise CustomTaskError("choices", f" is for kind=multiple_choice, not {custom.kind}.")
    return choices


def _file(custom: CustomTaskOptions, split: str, choices: tuple[str, ...]) -> tasks.LocalFile:
    """One split's file, checked to exist; a test file without the label column is read unlabeled, a file
    without the `uid` column numbers its rows."""
    given = getattr(custom, split)
    path = os.path.abspath(os.path.expanduser(given))
    if not os.path.isfile(path):
        raise CustomTaskError(split, f"={given!r}: no such file ({path}).")
    header = _names(custom.columns) or None
    fmt = task_readers.table_format(path, custom.format or None)
    columns = task_readers.table_columns(path, format=fmt, header=header, encoding=custom.encoding)
    # A test file may lack the label (predictions only, as GLUE's test sets); any file may lack the id column.
    label = None if split == "test" and custom.label not in columns else custom.label
    uid = custom.uid if custom.uid in columns else None
    return tasks.LocalFile(path, fmt, custom.text_a, custom.text_b or None, label, uid, header=header,
                           choices=choices or None, encoding=custom.encoding)


def _tfds_labels(custom: CustomTaskOptions, data_dir: str | None) -> tuple[str, ...]:
    """The class names of a TFDS label feature (a ClassLabel), for a task that gives no `labels`."""
    import tensorflow_datasets as tfds  # deferred: TensorFlow costs seconds a file-based task never needs

    feature = tfds.builder(custom.tfds, data_dir=data_dir).info.features[custom.label]
    names = getattr(feature, "names", None)
    if not names:
        raise CustomTaskError("label", f"={custom.label!r} of TFDS {custom.tfds} is not a ClassLabel: give the "
                                       "label set with labels=a,b,...")
    return tuple(names)


def _labels(custom: CustomTaskOptions, kind: str, local: dict, choices: tuple[str, ...], data_dir: str | None):
    """The label names in index order: given, from TFDS, or the sorted distinct training labels."""
    if kind == tasks.REGRESSION_SIMILARITY:
        return ()
    if kind == tasks.MULTIPLE_CHOICE:
        return tuple(str(i) for i in range(len(choices)))
    if _names(custom.labels):
        return _given_labels(custom.labels)
    if custom.tfds:
        return _tfds_labels(custom, data_dir)
    train = local["train"][0]
    values = task_readers.label_values(train.path, custom.label, format=train.format, header=train.header,
                                       encoding=custom.encoding, on_error=custom.on_error)
    return tuple(sorted(set(values)))


def _given_labels(text: str) -> tuple[str, ...]:
    """`labels` as the classes they name (`task_readers.label_key`: "1.0" is "1"); two names of one class
    would leave one of them an output no row is labelled with, so they are refused."""
    labels = tuple(task_readers.label_key(name) for name in _names(text))
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise CustomTaskError("labels", f"={text!r} names the class(es) {twice} more than once (labels are "
                                        "compared stripped, numbers by value): list each class once.")
    return labels


def _metrics(custom: CustomTaskOptions, kind: str, labels: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(METRIC_ALIASES.get(name, name) for name in _names(custom.metrics)) or DEFAULT_METRICS[kind]
    unknown = [name for name in names if name not in metrics.METRICS]
    if unknown:
        raise CustomTaskError("metrics", f": unknown {unknown}; use {sorted(metrics.METRICS)} (or mcc).")
    if len(labels) != 2 and any(name in BINARY_METRICS for name in names):
        raise CustomTaskError("metrics", f"={custom.metrics!r}: f1 and mcc score two classes (the second is "
                                         f"positive), but the task has {len(labels) or 'real-valued'} labels.")
    return names


def _tfds_splits(custom: CustomTaskOptions) -> dict[str, str]:
    """`splits` ("train=train,validation=dev,...") as {our split: TFDS split}; the three by name if empty."""
    pairs = [item.split("=", 1) for item in _names(custom.splits)]
    if any(len(pair) != 2 or pair[0].strip() not in SPLITS for pair in pairs):
        raise CustomTaskError("splits", f"={custom.splits!r}: give OURS=TFDS pairs, e.g. train=train,"
                                        "validation=validation[:50%],test=test, with OURS one of train, validation, "
                                        "test.")
    mapping = {ours.strip(): theirs.strip() for ours, theirs in pairs} or {split: split for split in SPLITS[:2]}
    if not {"train", "validation"} <= set(mapping):
        raise CustomTaskError("splits", f"={custom.splits!r} must map at least train and validation.")
    return mapping


def task_spec(custom: CustomTaskOptions, tfds_data_dir: str | None = None) -> tasks.TaskSpec:
    """The TaskSpec of the task `custom` describes, or a CustomTaskError naming the option to fix."""
    if custom.kind not in KINDS:
        raise CustomTaskError("kind", f"={custom.kind!r}: use one of {', '.join(KINDS)}.")
    kind = KINDS[custom.kind]
    choices = _check_columns(custom, kind)
    if custom.on_error not in task_readers.ON_ERROR:
        raise CustomTaskError("on_error", f"={custom.on_error!r}: use 'raise' or 'skip'.")
    try:
        codecs.lookup(custom.encoding)
    except LookupError:
        raise CustomTaskError("encoding", f"={custom.encoding!r} is not a Python codec (utf-8, latin-1, "
                                          "...).") from None
    files = [split for split in SPLITS if getattr(custom, split)]
    if custom.tfds and files:
        raise CustomTaskError("tfds", f"={custom.tfds!r} and {files[0]} are both set: a task reads files or one "
                                      "TFDS dataset.")
    if not custom.tfds and not {"train", "validation"} <= set(files):
        missing = "train" if "train" not in files else "validation"
        raise CustomTaskError(missing, " is not set: train and validation name the task's files (or tfds a TFDS "
                                       "dataset).")
    local = {split: (_file(custom, split, choices),) for split in files}
    tfds_splits = _tfds_splits(custom) if custom.tfds else {}
    labels = _labels(custom, kind, local, choices, tfds_data_dir)
    if kind != tasks.REGRESSION_SIMILARITY and len(labels) < 2:
        option, source = (("labels", "them") if _names(custom.labels)
                          else ("label", f"column {custom.label!r} of train={custom.train!r}"))
        raise CustomTaskError(option, f": {len(labels)} label(s) {list(labels)} in {source}; a classifier needs two "
                                      "or more.")
    # A labelled test file is scored too; a TFDS test split (GLUE's hides its labels) gets predictions only.
    scored = ["validation"] + (["test"] if "test" in local and local["test"][0].label is not None else [])
    return tasks.TaskSpec(
        name=NAME, kind=kind, label_names=labels, metrics=_metrics(custom, kind, labels), paper={},
        eval_splits=tuple(scored),
        tfds=tasks.TfdsTaskSource((custom.tfds,) if custom.tfds else (), tfds_splits, custom.text_a,
                                  custom.text_b or None, choices or None, custom.label, custom.uid or None),
        local=local, on_error=custom.on_error)
