"""A task's splits as model inputs: read (local files or TFDS), cap, tokenize, transform (Sec. 3.3).

Every split is padded to one context length, the released code's "longest example + 3" over all
splits, capped at the model's n_ctx, so a run compiles one train step and one eval step.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
from ml_collections import ConfigDict

from gpt1_jax import tasks, vocab_files
from gpt1_jax.config_check import ConfigError
from gpt1_jax.data import task_inputs, task_readers
from gpt1_jax.data.task_inputs import TaskArrays
from gpt1_jax.data.task_readers import Example
from gpt1_jax.tokenizer import GPT1Tokenizer

log = logging.getLogger(__name__)

TRAIN = "train"
TEST = "test"  # also test_matched / test_mismatched (MNLI)


@dataclasses.dataclass
class TaskData:
    """train: the training arrays; evals: labelled evaluation splits in the spec's order (the first
    selects the best checkpoint); predict: unlabeled splits (GLUE test) with the ids of their examples."""

    spec: tasks.TaskSpec
    train: TaskArrays
    evals: dict[str, TaskArrays]
    predict: dict[str, tuple[TaskArrays, list[str]]]
    seq_len: int
    tokenizer_identity: str


def _splits(spec: tasks.TaskSpec, source: str) -> tuple[str, ...]:
    return tuple(spec.local) if source == "local" else tuple(spec.tfds.splits)


def read_split(spec: tasks.TaskSpec, split: str, config: ConfigDict) -> list[Example]:
    """The examples of one split, or an error naming the missing file and the config keys to change.

    `data.task_source` is checked with the rest of the config (`config_check.check_common`)."""
    source = config.data.task_source
    if source == "local" and split not in spec.local:
        root = os.environ.get(vocab_files.DATA_ENV, "<unset>")
        raise ConfigError(
            f"task {spec.name!r} has no local {split!r} file under ${vocab_files.DATA_ENV}={root} (local splits: "
            f"{sorted(spec.local)}). Use --config.data.task_source=tfds (TFDS {', '.join(spec.tfds.names)}, "
            f"data dir data.tfds_data_dir).")
    try:
        return task_readers.read_task(spec, split, source, data_dir=config.data.tfds_data_dir or None).examples
    except FileNotFoundError as err:
        raise ConfigError(f"{err}. Put the file there, or use --config.data.task_source=tfds.") from err


def train_and_evals(spec: tasks.TaskSpec, config: ConfigDict) -> tuple[list[Example], dict[str, list[Example]]]:
    """Story Cloze has no training split: as the released code does, train on the validation set less a
    held-out part (`finetune.heldout_examples`, 374 in the released code) that stands in as "validation".

    The split is the released one (datasets.py: sklearn's `train_test_split(..., test_size=374,
    random_state=3535999445)`): `RandomState(finetune.heldout_seed).permutation(n)`, the first 374 held
    out and the rest trained on, both in that permuted order, so dev numbers compare with the release's.
    """
    evals = {split: read_split(spec, split, config) for split in spec.eval_splits
             if split in _splits(spec, config.data.task_source)}
    if TRAIN in spec.local or TRAIN in spec.tfds.splits:
        return read_split(spec, TRAIN, config), evals
    first = spec.eval_splits[0]
    held = config.finetune.heldout_examples
    examples = evals[first]
    if not 0 < held < len(examples):
        raise ConfigError(f"finetune.heldout_examples={held} must be in 1..{len(examples) - 1}: task {spec.name!r} "
                          f"trains on its {first!r} split less that many held-out examples.")
    order = np.random.RandomState(config.finetune.heldout_seed).permutation(len(examples))
    evals[first] = [examples[i] for i in order[:held]]
    log.info("Task %s has no training split: training on %d %s examples, %d held out.", spec.name,
             len(examples) - held, first, held)
    return [examples[i] for i in order[held:]], evals


def load(config: ConfigDict, spec: tasks.TaskSpec, n_ctx: int) -> TaskData:
    train, evals = train_and_evals(spec, config)
    cap = config.finetune.max_train_examples
    if cap:
        order = np.random.default_rng(config.seed).permutation(len(train))[:cap]
        train = [train[i] for i in np.sort(order)]
    predict = {}
    for split in _splits(spec, config.data.task_source):
        if split.startswith(TEST) and split not in evals:
            examples = read_split(spec, split, config)
            if examples and all(ex.label is None for ex in examples):  # GLUE test sets: labels kept by the server
                predict[split] = examples
    tokenizer = GPT1Tokenizer.from_files(config.data.vocab_dir or None)
    groups = {TRAIN: train, **{f"eval:{k}": v for k, v in evals.items()},
              **{f"predict:{k}": v for k, v in predict.items()}}
    encoded = {name: task_inputs.encode_examples(examples, tokenizer.encode_batch) for name, examples in groups.items()}
    max_text_len = config.finetune.max_text_len or None
    seq_len = max(task_inputs.context_length(e, spec.kind, n_ctx, max_text_len) for e in encoded.values() if e)
    arrays = {name: task_inputs.build_inputs(e, spec.kind, n_ctx, max_text_len, seq_len) for name, e in encoded.items()}
    log.info("Task %s: %d train examples, eval %s, context length %d.", spec.name, len(train),
             {k: len(v) for k, v in evals.items()}, seq_len)
    return TaskData(spec, arrays[TRAIN], {k: arrays[f"eval:{k}"] for k in evals},
                    {k: (arrays[f"predict:{k}"], [ex.uid for ex in v]) for k, v in predict.items()},
                    seq_len, tokenizer.fingerprint)
