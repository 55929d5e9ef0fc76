"""Registry of the fine-tuning tasks of GPT-1 (Radford et al., 2018, Sec. 4.2, Tables 2-4).

Each task is one frozen `TaskSpec`, looked up by name with `get_task`; the training loop never branches on
a task's name, only on the fields of its spec (its `kind` picks the input transformation of Sec. 3.3 and
the head, its `metrics` pick the evaluators). A spec also says where the data lives: in TFDS (feature
names verified against `tfds.builder(...).info.features`) and as local files under a data root laid out
like `shared/data` (see `gpt1_jax.finetuning.task_readers`), so both sources yield the same `Example` records.

The paper numbers are the paper's *test-set* results (GLUE server, SNLI/SciTail/RACE/Story Cloze test);
the local files are dev sets, so a comparison with them is indicative only.
"""

import dataclasses
from typing import Mapping

# Input transformation kinds (Sec. 3.3, Figure 1 right). `regression_similarity` is STS-B: the similarity
# layout with a single real-valued output.
CLASSIFICATION = "classification"
ENTAILMENT = "entailment"
SIMILARITY = "similarity"
REGRESSION_SIMILARITY = "regression_similarity"
MULTIPLE_CHOICE = "multiple_choice"
KINDS = (CLASSIFICATION, ENTAILMENT, SIMILARITY, REGRESSION_SIMILARITY, MULTIPLE_CHOICE)


@dataclasses.dataclass(frozen=True)
class TfdsTaskSource:
    """Where a task lives in TFDS and which features play which role.

    `names` has several entries when a task is the union of TFDS configs (RACE-all = race/middle +
    race/high). `layout` is "columns" (one example per record) or "race" (one record per article with
    parallel `questions`/`options`/`answers` lists, flattened to one example per question).
    """

    names: tuple[str, ...]
    splits: Mapping[str, str]  # our split name -> TFDS split name
    text_a: str
    text_b: str | None = None
    choices: str | tuple[str, ...] | None = None  # a feature holding the list of choices, or one feature each
    label: str = "label"
    uid: str | None = None  # feature used as the example id; None: running index
    layout: str = "columns"
    label_offset: int = 0  # added to the stored label (story_cloze stores 1/2)
    drop_unlabeled: bool = False  # SNLI marks pairs without a gold label with -1; standard practice drops them


@dataclasses.dataclass(frozen=True)
class LocalFile:
    """One local file of a split, relative to the data root, and the names of its columns/fields.

    `format` is "tsv" (split on tab, no quoting, as GLUE requires), "csv", "jsonl", "race_jsonl" or
    "story_cloze_csv". `header` names the columns of a file without a header line (CoLA train/dev,
    SciTail); None means the first line is the header. `label` None marks an unlabeled (test) file.
    """

    path: str
    format: str
    text_a: str | None = None
    text_b: str | None = None
    label: str | None = None
    uid: str | None = None
    header: tuple[str, ...] | None = None
    drop_labels: tuple[str, ...] = ()  # raw labels meaning "no gold label" (SNLI '-'), dropped not errors
    choices: tuple[str, ...] | None = None  # columns of a multiple-choice table, one per answer
    encoding: str = "utf-8"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything the fine-tuning loop needs to know about one task; see the module docstring."""

    name: str
    kind: str
    label_names: tuple[str, ...]  # class names in label-index order (TFDS ClassLabel order); () for regression
    metrics: tuple[str, ...]  # names in `gpt1_jax.finetuning.metrics.METRICS`; the first is the primary metric
    paper: Mapping[str, float]  # evaluation split -> the paper's primary-metric result, in percent
    eval_splits: tuple[str, ...]
    tfds: TfdsTaskSource
    local: Mapping[str, tuple[LocalFile, ...]]  # split -> files under the data root
    local_labels: tuple[str, ...] | None = None  # raw label strings in local files, in index order
    on_error: str = "raise"  # bad rows: "raise" names file:line; "skip" skips and counts them

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def num_outputs(self) -> int:
        """Width of the task head: classes, 1 for regression, 1 logit per row for multiple choice."""
        return len(self.label_names) if self.kind in (CLASSIFICATION, ENTAILMENT, SIMILARITY) else 1

    @property
    def rows_per_example(self) -> int:
        """Token rows the input transformation makes of one example (Sec. 3.3, Figure 1 right): both orders of
        a similarity pair, one per answer of a multiple-choice question, else one."""
        if self.kind == MULTIPLE_CHOICE:
            return len(self.label_names)
        return 2 if self.kind in (SIMILARITY, REGRESSION_SIMILARITY) else 1

    @property
    def raw_labels(self) -> tuple[str, ...]:
        return self.local_labels if self.local_labels is not None else self.label_names


_GLUE_SPLITS = {"train": "train", "validation": "validation", "test": "test"}  # also snli and sci_tail
_BINARY = ("0", "1")


def _glue_local(folder: str, text_a: str, text_b: str | None, label: str, test_uid: str = "index",
                header: tuple[str, ...] | None = None) -> dict[str, tuple[LocalFile, ...]]:
    """The `glue_data` layout: train.tsv/dev.tsv labelled, test.tsv unlabeled with an id column."""
    names = {"train": "train.tsv", "validation": "dev.tsv"}
    local = {split: (LocalFile(f"glue/{folder}/{names[split]}", "tsv", text_a, text_b, label,
                               header=header),) for split in names}
    local["test"] = (LocalFile(f"glue/{folder}/test.tsv", "tsv", text_a, text_b, uid=test_uid),)
    return local


def _race(subsets: tuple[str, ...], paper: float) -> TaskSpec:
    name = "race/" + ("all" if len(subsets) > 1 else subsets[0])
    return TaskSpec(
        name=name, kind=MULTIPLE_CHOICE, label_names=("A", "B", "C", "D"), metrics=("accuracy",),
        paper={"test": paper}, eval_splits=("validation", "test"),
        tfds=TfdsTaskSource(tuple(f"race/{s}" for s in subsets), {"train": "train", "validation": "dev",
                                                              "test": "test"},
                        text_a="article", text_b="questions", choices="options", label="answers",
                        uid="example_id", layout="race"),
        local={split: tuple(LocalFile(f"race/{prefix}-{s}.jsonl", "race_jsonl") for s in subsets)
               for split, prefix in (("validation", "dev"), ("test", "test"))},
    )


_STORY_FILE = "story_cloze/cloze_test_{0}__spring2016 - cloze_test_ALL_{0}.csv"

_TASKS = (
    TaskSpec(
        name="snli", kind=ENTAILMENT, label_names=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",), paper={"test": 89.9}, eval_splits=("validation", "test"),
        tfds=TfdsTaskSource(("snli",), _GLUE_SPLITS, "premise", "hypothesis", drop_unlabeled=True),
        # dev.jsonl is the complete dev set already without '-' pairs; the original-format test file is a
        # 1,277-line subset, 23 of them '-' (dropped).
        local={"validation": (LocalFile("snli/dev.jsonl", "jsonl", "premise", "hypothesis", "label"),),
               "test": (LocalFile("snli/snli_1.0_test.jsonl", "jsonl", "sentence1", "sentence2",
                                  "gold_label", uid="pairID", drop_labels=("-",)),)},
    ),
    TaskSpec(
        name="mnli", kind=ENTAILMENT, label_names=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",), paper={"validation_matched": 82.1, "validation_mismatched": 81.4},
        eval_splits=("validation_matched", "validation_mismatched"),
        tfds=TfdsTaskSource(("glue/mnli",), {s: s for s in ("train", "validation_matched", "validation_mismatched",
                                                       "test_matched", "test_mismatched")},
                        "premise", "hypothesis", uid="idx"),
        local={"validation_matched": (LocalFile("mnli/dev.jsonl", "jsonl", "premise", "hypothesis", "label"),)},
    ),
    TaskSpec(
        name="qnli", kind=ENTAILMENT, label_names=("entailment", "not_entailment"), metrics=("accuracy",),
        paper={"validation": 88.1}, eval_splits=("validation",),
        tfds=TfdsTaskSource(("glue/qnli",), _GLUE_SPLITS, "question", "sentence", uid="idx"),
        # QNLI_v1 is the 2018 GLUE release the paper was evaluated on; TFDS serves the current v2.
        local={"validation": (LocalFile("glue/QNLI_v1/dev.tsv", "tsv", "question", "sentence", "label",
                                        uid="index"),),
               "test": (LocalFile("glue/QNLI_v1/test.tsv", "tsv", "question", "sentence", uid="index"),)},
    ),
    TaskSpec(
        name="rte", kind=ENTAILMENT, label_names=("entailment", "not_entailment"), metrics=("accuracy",),
        paper={"validation": 56.0}, eval_splits=("validation",),
        tfds=TfdsTaskSource(("glue/rte",), _GLUE_SPLITS, "sentence1", "sentence2", uid="idx"),
        local=_glue_local("RTE", "sentence1", "sentence2", "label"),
    ),
    TaskSpec(
        name="scitail", kind=ENTAILMENT, label_names=("entails", "neutral"), metrics=("accuracy",),
        paper={"test": 88.3}, eval_splits=("validation", "test"),
        tfds=TfdsTaskSource(("sci_tail",), _GLUE_SPLITS, "premise", "hypothesis"),
        local={split: (LocalFile(f"scitail/scitail_1.0_{f}.tsv", "tsv", "premise", "hypothesis", "label",
                                 header=("premise", "hypothesis", "label")),)
               for split, f in (("validation", "dev"), ("test", "test"))},
    ),
    _race(("middle",), 62.9),
    _race(("high",), 57.4),
    _race(("middle", "high"), 59.0),
    TaskSpec(
        name="story_cloze", kind=MULTIPLE_CHOICE, label_names=("1", "2"), metrics=("accuracy",),
        paper={"test": 86.5}, eval_splits=("validation", "test"),
        tfds=TfdsTaskSource(("story_cloze/2016",), {"validation": "validation", "test": "test"}, "context",
                        choices="endings", label_offset=-1),
        local={split: (LocalFile(_STORY_FILE.format(f), "story_cloze_csv"),)
               for split, f in (("validation", "val"), ("test", "test"))},
    ),
    TaskSpec(
        name="mrpc", kind=SIMILARITY, label_names=("not_equivalent", "equivalent"), metrics=("f1", "accuracy"),
        paper={"validation": 82.3}, eval_splits=("validation",),
        tfds=TfdsTaskSource(("glue/mrpc",), _GLUE_SPLITS, "sentence1", "sentence2", uid="idx"),
        local=_glue_local("MRPC", "#1 String", "#2 String", "Quality"), local_labels=_BINARY,
    ),
    TaskSpec(
        name="qqp", kind=SIMILARITY, label_names=("not_duplicate", "duplicate"), metrics=("f1", "accuracy"),
        paper={"validation": 70.3}, eval_splits=("validation",),
        tfds=TfdsTaskSource(("glue/qqp",), _GLUE_SPLITS, "question1", "question2", uid="idx"),
        # Not in shared/data (too large); a downloaded glue_data/QQP folder works under the same layout.
        local=_glue_local("QQP", "question1", "question2", "is_duplicate", test_uid="id"), local_labels=_BINARY,
    ),
    TaskSpec(
        name="stsb", kind=REGRESSION_SIMILARITY, label_names=(), metrics=("pearson", "spearman"),
        paper={"validation": 82.0}, eval_splits=("validation",),
        tfds=TfdsTaskSource(("glue/stsb",), _GLUE_SPLITS, "sentence1", "sentence2", uid="idx"),
        local=_glue_local("STS-B", "sentence1", "sentence2", "score"),
    ),
    TaskSpec(
        name="cola", kind=CLASSIFICATION, label_names=("unacceptable", "acceptable"),
        metrics=("matthews_corr",), paper={"validation": 45.4}, eval_splits=("validation",),
        tfds=TfdsTaskSource(("glue/cola",), _GLUE_SPLITS, "sentence", uid="idx"),
        local=_glue_local("CoLA", "sentence", None, "label",
                          header=("source", "label", "original_label", "sentence")),
        local_labels=_BINARY,
    ),
    TaskSpec(
        name="sst2", kind=CLASSIFICATION, label_names=("negative", "positive"), metrics=("accuracy",),
        paper={"validation": 91.3}, eval_splits=("validation",),
        tfds=TfdsTaskSource(("glue/sst2",), _GLUE_SPLITS, "sentence", uid="idx"),
        local=_glue_local("SST-2", "sentence", None, "label"), local_labels=_BINARY,
    ),
    TaskSpec(
        name="wnli", kind=ENTAILMENT, label_names=("not_entailment", "entailment"), metrics=("accuracy",),
        paper={}, eval_splits=("validation",),  # not reported in the paper
        tfds=TfdsTaskSource(("glue/wnli",), _GLUE_SPLITS, "sentence1", "sentence2", uid="idx"),
        local=_glue_local("WNLI", "sentence1", "sentence2", "label"), local_labels=_BINARY,
    ),
)

TASKS: Mapping[str, TaskSpec] = {task.name: task for task in _TASKS}


def get_task(name: str) -> TaskSpec:
    """The spec registered as `name`; an unknown name lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
