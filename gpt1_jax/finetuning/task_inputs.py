"""The paper's task-specific input transformations (Sec. 3.3, Figure 1 right) as padded numpy arrays.

Every task becomes one or more token rows per example, each `[_start_] ... [_classify_]`, so the pre-trained
model runs unchanged and only the head differs. All kinds share one layout, `[examples, rows, seq]`:
- classification (1 row):   `[s] text [c]`
- entailment (1 row):       `[s] premise [d] hypothesis [c]`
- similarity (2 rows):      `[s] A [d] B [c]` and `[s] B [d] A [c]`; the model adds the two final hidden states
- multiple choice (k rows): `[s] context question [d] answer_k [c]`; one logit per row, softmax over rows.

Truncation follows the released code (finetune-transformer-lm `transform_roc`): each text of a pair and
each answer is cut to `max_text_len` tokens, default `n_ctx // 2 - 2`, keeping its beginning, so a row is
at most `n_ctx - 1` tokens. A single classification text has the row to itself and is cut to `n_ctx - 2`.
For multiple choice the context (article, then the RACE question) gets all the room the longest answer
leaves, `n_ctx - 3 - longest answer`, and is cut from the *front*: the question sits at its end and must
survive, and a story ending follows from the last sentences. No row ever exceeds `n_ctx`.

`load` turns a task's splits into these arrays for a run: read (local files or TFDS), cap, tokenize,
transform. Every split is padded to one context length, the released code's "longest example + 3"
over all splits, capped at the model's n_ctx, so a run compiles one train step and one eval step.
"""

import dataclasses
import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from gpt1_jax import constants
from gpt1_jax.errors import UserError
from gpt1_jax.finetuning import tasks
from gpt1_jax.finetuning.task_readers import DataError, Example, local_root, read_task
from gpt1_jax.text.tokenizer import GPT1Tokenizer
from gpt1_jax.text.vocab_files import CLASSIFY_ID, DELIMITER_ID, START_ID

log = logging.getLogger(__name__)

TRAIN = "train"
TEST = "test"  # also test_matched / test_mismatched (MNLI)
PAD_ID = 0  # padding positions are masked out, so any in-vocabulary id works; 0 is `<unk>`

Tokens = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TaskDataOptions:
    """Where a run reads its tasks and which of their examples it uses; the recipes build it from their config."""

    source: str  # "local" (files under $GPT1_JAX_DATA, laid out like shared/data) or "tfds"
    tfds_data_dir: str = ""  # "" for TFDS's default
    vocab_dir: str = ""  # "" to find the BPE files as `vocab_files` does
    seed: int = 0  # which training examples a cap keeps
    max_train_examples: int = 0  # 0: all
    max_text_len: int = 0  # tokens a text keeps (0: the released code's n_ctx // 2 - 2)
    # A task without a training split trains on its first evaluation split less `heldout_examples` of it,
    # drawn with `heldout_seed`; `train_from_eval` does the same for a task whose training file is not here.
    train_from_eval: bool = False
    heldout_examples: int = constants.RELEASED_HELDOUT_EXAMPLES
    heldout_seed: int = constants.RELEASED_HELDOUT_SEED


class TaskFileMissingError(UserError, FileNotFoundError):
    """A task's file is not under the local data root; `tfds_names` says where TFDS has the task."""

    def __init__(self, message: str, tfds_names: tuple[str, ...]):
        super().__init__(message)
        self.tfds_names = tfds_names


class HeldOutSizeError(UserError, ValueError):
    """`heldout_examples` leaves nothing to train on, or holds nothing out."""


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    """An `Example` with its texts as BPE ids; `b` is None for single-text tasks."""

    a: Tokens
    b: Tokens | None
    choices: tuple[Tokens, ...] | None
    label: int | float | None


@dataclasses.dataclass(frozen=True)
class TaskArrays:
    """Model inputs for a set of examples.

    tokens: int32 [examples, rows, seq]; mask: float32 [examples, rows, seq], 1 on real tokens (the
    auxiliary LM loss, L3 = L2 + 0.5 * L1 of Sec. 3.2, is taken over them); classify_positions: int32
    [examples, rows], where `_classify_` sits; labels: int32 [examples] (-1 when unlabeled) or float32
    [examples] for regression (nan when unlabeled).
    """

    tokens: np.ndarray
    mask: np.ndarray
    classify_positions: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]


def encode_examples(examples: Sequence[Example],
                    encode_batch: Callable[[list[str]], list[list[int]]]) -> list[EncodedExample]:
    """Encodes all texts of `examples` with one `encode_batch` call (e.g. `GPT1Tokenizer.encode_batch`)."""
    texts: list[str] = []
    for ex in examples:
        texts.append(ex.text_a)
        texts.extend([ex.text_b] if ex.text_b is not None else [])
        texts.extend(ex.choices or ())
    ids = iter(encode_batch(texts))
    encoded = []
    for ex in examples:
        a = tuple(next(ids))
        b = tuple(next(ids)) if ex.text_b is not None else None
        choices = tuple(tuple(next(ids)) for _ in ex.choices) if ex.choices is not None else None
        encoded.append(EncodedExample(a, b, choices, ex.label))
    return encoded


def _single(ex: EncodedExample, n_ctx: int, max_text_len: int) -> list[list[int]]:
    del max_text_len
    return [[START_ID, *ex.a[:n_ctx - 2], CLASSIFY_ID]]


def _pair(first: Tokens, second: Tokens, max_text_len: int) -> list[int]:
    return [START_ID, *first[:max_text_len], DELIMITER_ID, *second[:max_text_len], CLASSIFY_ID]


def _entailment(ex: EncodedExample, n_ctx: int, max_text_len: int) -> list[list[int]]:
    del n_ctx
    return [_pair(ex.a, _need(ex.b, "text_b"), max_text_len)]


def _similarity(ex: EncodedExample, n_ctx: int, max_text_len: int) -> list[list[int]]:
    del n_ctx
    b = _need(ex.b, "text_b")
    return [_pair(ex.a, b, max_text_len), _pair(b, ex.a, max_text_len)]


def _multiple_choice(ex: EncodedExample, n_ctx: int, max_text_len: int) -> list[list[int]]:
    answers = [c[:max_text_len] for c in _need(ex.choices, "choices")]
    context = ex.a + (ex.b or ())
    room = n_ctx - 3 - max(len(a) for a in answers)
    context = context[len(context) - room:] if len(context) > room else context  # keep the end
    return [[START_ID, *context, DELIMITER_ID, *answer, CLASSIFY_ID] for answer in answers]


def _need(value, field: str):
    if value is None:
        raise ValueError(f"this task kind needs {field} in every example, and one has none")
    return value


_ROWS = {
    tasks.CLASSIFICATION: _single,
    tasks.ENTAILMENT: _entailment,
    tasks.SIMILARITY: _similarity,
    tasks.REGRESSION_SIMILARITY: _similarity,
    tasks.MULTIPLE_CHOICE: _multiple_choice,
}


def _all_rows(encoded: Sequence[EncodedExample], kind: str, n_ctx: int,
              max_text_len: int | None) -> list[list[list[int]]]:
    if kind not in _ROWS:
        raise ValueError(f"unknown task kind {kind!r}; kinds: {sorted(_ROWS)}")
    max_text_len = n_ctx // 2 - 2 if max_text_len is None else max_text_len
    if not 0 < max_text_len <= (n_ctx - 3) // 2:
        raise ValueError(f"max_text_len must be in [1, (n_ctx - 3) // 2 = {(n_ctx - 3) // 2}] so that a pair "
                         f"and its 3 special tokens fit in n_ctx={n_ctx}; got {max_text_len}")
    return [_ROWS[kind](ex, n_ctx, max_text_len) for ex in encoded]


def context_length(encoded: Sequence[EncodedExample], kind: str, n_ctx: int = 512,
                   max_text_len: int | None = None) -> int:
    """The shortest padded length that holds every row: the longest truncated example + 3 special tokens,
    as the released code sizes its context (it is at most `n_ctx`). Pass it as `seq_len` to `build_inputs`."""
    return max(len(row) for rows in _all_rows(encoded, kind, n_ctx, max_text_len) for row in rows)


def build_inputs(encoded: Sequence[EncodedExample], kind: str, n_ctx: int = 512, max_text_len: int | None = None,
                 seq_len: int | None = None) -> TaskArrays:
    """Transforms (Sec. 3.3), truncates to `n_ctx` and pads to `seq_len` (default `n_ctx`) every example."""
    if not encoded:
        raise ValueError("no examples to build inputs from")
    all_rows = _all_rows(encoded, kind, n_ctx, max_text_len)
    seq_len = n_ctx if seq_len is None else seq_len
    longest = max(len(row) for rows in all_rows for row in rows)
    if longest > seq_len:
        raise ValueError(f"seq_len={seq_len} is shorter than the longest row ({longest}); use context_length()")
    n_rows = {len(rows) for rows in all_rows}
    if len(n_rows) != 1:
        raise ValueError(f"every example needs the same number of rows (choices), got {sorted(n_rows)}")
    shape = (len(all_rows), n_rows.pop(), seq_len)
    tokens = np.full(shape, PAD_ID, np.int32)  # [examples, rows, seq]
    mask = np.zeros(shape, np.float32)  # [examples, rows, seq]
    classify_positions = np.zeros(shape[:2], np.int32)  # [examples, rows]
    for i, rows in enumerate(all_rows):
        for j, row in enumerate(rows):
            tokens[i, j, :len(row)] = row
            mask[i, j, :len(row)] = 1.0
            classify_positions[i, j] = len(row) - 1
    regression = kind == tasks.REGRESSION_SIMILARITY
    missing = np.nan if regression else -1
    labels = np.array([missing if ex.label is None else ex.label for ex in encoded],
                      np.float32 if regression else np.int32)  # [examples]
    return TaskArrays(tokens, mask, classify_positions, labels)


def batch_indices(n: int, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                  drop_remainder: bool = False) -> Iterator[np.ndarray]:
    """The example indices of each batch `batches` yields, before its padding: the one place the order is made."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def lm_target_counts(arrays: TaskArrays) -> np.ndarray:
    """Per example, the next-token targets L1 scores over all its rows (position t predicts t + 1 where
    mask[t + 1] is 1): int [examples]."""
    return arrays.mask[:, :, 1:].sum(axis=(1, 2)).astype(np.int64)


def batches(arrays: TaskArrays, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            drop_remainder: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches (one jit shape). Unless `drop_remainder`, the last batch is filled with padding
    examples of weight 0, so an evaluation that weights by `weights` counts every example exactly once.

    Each batch: tokens/mask [batch, rows, seq], classify_positions [batch, rows], labels [batch],
    weights float32 [batch] (1 real, 0 padding), index int32 [batch] (position in `arrays`, -1 padding).
    Shuffling uses `numpy.random.default_rng(seed)`; pass a new seed per epoch for a new order.
    """
    for index in batch_indices(len(arrays), batch_size, shuffle=shuffle, seed=seed, drop_remainder=drop_remainder):
        real = len(index)
        index = np.concatenate([index, np.zeros(batch_size - real, index.dtype)])  # [batch]
        weights = (np.arange(batch_size) < real).astype(np.float32)  # [batch]
        labels = arrays.labels[index].copy()
        labels[real:] = 0  # a valid label, so losses stay finite before weighting
        yield {
            "tokens": np.where(weights[:, None, None] > 0, arrays.tokens[index], PAD_ID).astype(np.int32),
            "mask": arrays.mask[index] * weights[:, None, None],
            "classify_positions": arrays.classify_positions[index] * (weights[:, None] > 0),
            "labels": labels,
            "weights": weights,
            "index": np.where(weights > 0, index, -1).astype(np.int32),
        }


# ---------------------------------------------------------------- a task's splits for one run


@dataclasses.dataclass
class TaskData:
    """train: the training arrays; evals: labelled evaluation splits in the spec's order (the first
    selects the best checkpoint); predict: the test splits, labelled or not (GLUE test), with the ids of
    their examples, for the predictions files."""

    spec: tasks.TaskSpec
    train: TaskArrays
    evals: dict[str, TaskArrays]
    predict: dict[str, tuple[TaskArrays, list[str]]]
    seq_len: int
    tokenizer_identity: str


def _splits(spec: tasks.TaskSpec, source: str) -> tuple[str, ...]:
    return tuple(spec.local) if source == "local" else tuple(spec.tfds.splits)


def task_source(spec: tasks.TaskSpec, options: TaskDataOptions) -> str:
    """Where this run reads the task: the options' source, or the one source a user's own task has."""
    if not spec.tfds.names:
        return "local"
    if not spec.local:
        return "tfds"
    return options.source


def read_split(spec: tasks.TaskSpec, split: str, options: TaskDataOptions) -> list[Example]:
    """The examples of one split; a `TaskFileMissingError` naming the file the local source lacks."""
    source = task_source(spec, options)
    if source == "local" and split not in spec.local:
        root = os.environ.get(constants.DATA_ENV, "<unset>")
        raise TaskFileMissingError(f"task {spec.name!r} has no local {split!r} file under ${constants.DATA_ENV}={root} "
                                   f"(local splits: {sorted(spec.local)})", spec.tfds.names)
    try:
        examples = read_task(spec, split, source, data_dir=options.tfds_data_dir or None,
                             on_error=spec.on_error).examples
    except FileNotFoundError as err:
        raise TaskFileMissingError(str(err), spec.tfds.names) from err
    if not examples:
        where = [f.path for f in spec.local[split]] if source == "local" else f"TFDS {spec.tfds.names}"
        raise DataError(f"task {spec.name!r}, split {split!r}: no examples in {where} (only a header, or every "
                        "row skipped).")
    return examples


def _trains_on_eval_split(spec: tasks.TaskSpec, options: TaskDataOptions) -> bool:
    """Whether the run trains on its first evaluation split less a held-out part: the task has no training
    split (Story Cloze), or `train_from_eval` is set and the local training file is not on this
    machine (QNLI and SciTail in shared/data, whose training sets are too large to be there)."""
    if TRAIN not in spec.local and TRAIN not in spec.tfds.splits:
        return True
    if not options.train_from_eval or task_source(spec, options) != "local":
        return False
    if TRAIN not in spec.local:
        return True
    root = local_root(spec, TRAIN)
    return not all((root / f.path).is_file() for f in spec.local[TRAIN])


def train_and_evals(spec: tasks.TaskSpec, options: TaskDataOptions) -> tuple[list[Example], dict[str, list[Example]]]:
    """Story Cloze has no training split: as the released code does, train on the validation set less a
    held-out part (`heldout_examples`, 374 in the released code) that stands in as "validation". With
    `train_from_eval`, a task whose training file is missing here does the same.

    The split is the released one (datasets.py: sklearn's `train_test_split(..., test_size=374,
    random_state=3535999445)`): `RandomState(heldout_seed).permutation(n)`, the first 374 held
    out and the rest trained on, both in that permuted order, so dev numbers compare with the release's.
    """
    evals = {split: read_split(spec, split, options) for split in spec.eval_splits
             if split in _splits(spec, task_source(spec, options))}
    if not _trains_on_eval_split(spec, options):
        return read_split(spec, TRAIN, options), evals
    first = spec.eval_splits[0]
    held = options.heldout_examples
    examples = evals[first]
    if not 0 < held < len(examples):
        raise HeldOutSizeError(f"heldout_examples={held} must be in 1..{len(examples) - 1}: task {spec.name!r} "
                               f"trains on its {first!r} split less that many held-out examples.")
    order = np.random.RandomState(options.heldout_seed).permutation(len(examples))
    evals[first] = [examples[i] for i in order[:held]]
    log.info("Task %s has no training split here: training on %d %s examples, %d held out.", spec.name,
             len(examples) - held, first, held)
    return [examples[i] for i in order[held:]], evals


def training_subset(train: list[Example], options: TaskDataOptions) -> list[Example]:
    """`max_train_examples` of the training examples (all when 0), drawn with the options' seed and kept in
    their file order."""
    cap = options.max_train_examples
    if not cap:
        return train
    order = np.random.default_rng(options.seed).permutation(len(train))[:cap]
    return [train[i] for i in np.sort(order)]


def load(options: TaskDataOptions, spec: tasks.TaskSpec, n_ctx: int) -> TaskData:
    train, evals = train_and_evals(spec, options)
    train = training_subset(train, options)
    predict = {}
    for split in _splits(spec, task_source(spec, options)):
        if split.startswith(TEST) and split not in evals:
            examples = read_split(spec, split, options)  # GLUE test sets: labels kept by the server
            if examples:
                predict[split] = examples
    tokenizer = GPT1Tokenizer.from_files(options.vocab_dir or None)
    groups = {TRAIN: train, **{f"eval:{k}": v for k, v in evals.items()},
              **{f"predict:{k}": v for k, v in predict.items()}}
    encoded = {name: encode_examples(examples, tokenizer.encode_batch) for name, examples in groups.items()}
    max_text_len = options.max_text_len or None
    seq_len = max(context_length(e, spec.kind, n_ctx, max_text_len) for e in encoded.values() if e)
    arrays = {name: build_inputs(e, spec.kind, n_ctx, max_text_len, seq_len) for name, e in encoded.items()}
    log.info("Task %s: %d train examples, eval %s, context length %d.", spec.name, len(train),
             {k: len(v) for k, v in evals.items()}, seq_len)
    # Test splits get a predictions file whether their labels are known (scored too) or not (GLUE).
    predictions = {k: (arrays[f"eval:{k}"], [ex.uid for ex in v]) for k, v in evals.items() if k.startswith(TEST)}
    predictions.update({k: (arrays[f"predict:{k}"], [ex.uid for ex in v]) for k, v in predict.items()})
    return TaskData(spec, arrays[TRAIN], {k: arrays[f"eval:{k}"] for k in evals}, predictions, seq_len,
                    tokenizer.fingerprint)
