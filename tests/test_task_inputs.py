"""Input transformations of Sec. 3.3 (exact token layout per kind, truncation, padding, batching) and the
splits a fine-tuning run reads (Story Cloze's held-out stories, missing files)."""

import numpy as np
import pytest

from gpt1_jax import run_options
from gpt1_jax.config_check import ConfigError
from gpt1_jax.configs import finetune as finetune_recipe
from gpt1_jax.finetuning import finetune, task_inputs, tasks
from gpt1_jax.finetuning.task_readers import DataError, Example

S, D, C = 40478, 40479, 40480  # _start_, _delimiter_, _classify_ (fixed by the released code)


def fake_encode_batch(texts):
    """Each whitespace word `wN` becomes id N, so expected layouts are readable."""
    return [[int(word[1:]) for word in text.split()] for text in texts]


def build(examples, kind, **kwargs):
    return task_inputs.build_inputs(task_inputs.encode_examples(examples, fake_encode_batch), kind, **kwargs)


def tiny_config(init=""):
    """gpt1_jax/configs/finetune.py:tiny reading task files from the local data root."""
    config = finetune_recipe.get_config("tiny")
    config.init = str(init)
    config.data.task_source = "local"
    return config


def test_special_ids_agree_with_the_tokenizer():
    assert (task_inputs.START_ID, task_inputs.DELIMITER_ID, task_inputs.CLASSIFY_ID) == (S, D, C)


def test_classification_layout_and_mask():
    arrays = build([Example("0", "w1 w2 w3", label=1)], tasks.CLASSIFICATION, n_ctx=8)
    assert arrays.tokens.tolist() == [[[S, 1, 2, 3, C, 0, 0, 0]]]  # [examples, rows, seq]
    assert arrays.mask.tolist() == [[[1, 1, 1, 1, 1, 0, 0, 0]]]
    assert arrays.classify_positions.tolist() == [[4]] and arrays.labels.tolist() == [1]
    assert arrays.tokens.dtype == np.int32 and arrays.mask.dtype == np.float32


def test_entailment_layout():
    arrays = build([Example("0", "w1 w2", "w3", label=2)], tasks.ENTAILMENT, n_ctx=10)
    assert arrays.tokens[0, 0, :6].tolist() == [S, 1, 2, D, 3, C]


def test_similarity_has_both_orders():
    arrays = build([Example("0", "w1 w2", "w3", label=0.5)], tasks.REGRESSION_SIMILARITY, n_ctx=8, seq_len=6)
    assert arrays.tokens.tolist() == [[[S, 1, 2, D, 3, C], [S, 3, D, 1, 2, C]]]  # [1, 2, seq]
    assert arrays.classify_positions.tolist() == [[5, 5]] and arrays.labels.dtype == np.float32


def test_multiple_choice_one_row_per_answer_with_question_after_context():
    example = Example("a-0", "w1 w2", "w3", ("w4", "w5 w6", "w7", "w8"), label=1)
    arrays = build([example], tasks.MULTIPLE_CHOICE, n_ctx=16, seq_len=8)
    assert arrays.tokens.shape == (1, 4, 8)  # [examples, choices, seq]
    assert arrays.tokens[0, 1].tolist() == [S, 1, 2, 3, D, 5, 6, C]
    assert arrays.tokens[0, 0].tolist() == [S, 1, 2, 3, D, 4, C, 0]
    assert arrays.classify_positions.tolist() == [[6, 7, 6, 6]]


def test_truncation_never_exceeds_n_ctx():
    long = " ".join(f"w{i}" for i in range(1, 40))
    pair = build([Example("0", long, long)], tasks.SIMILARITY, n_ctx=16)
    assert pair.tokens[0, 0].tolist() == [S, 1, 2, 3, 4, 5, 6, D, 1, 2, 3, 4, 5, 6, C, 0]  # each cut to 16//2-2
    single = build([Example("0", long)], tasks.CLASSIFICATION, n_ctx=16)
    assert single.mask.sum() == 16 and single.tokens[0, 0, -1] == C
    choice = build([Example("0", long, "w90", ("w91", "w92 w93"))], tasks.MULTIPLE_CHOICE, n_ctx=16)
    # the context keeps its end (the question): 16 - 3 - 2 (longest answer) = 11 tokens
    assert choice.tokens[0, 1].tolist() == [S, *range(30, 40), 90, D, 92, 93, C]
    assert choice.mask.sum(-1).max() <= 16


def test_unlabeled_examples_get_sentinel_labels():
    assert build([Example("0", "w1")], tasks.CLASSIFICATION, n_ctx=6).labels.tolist() == [-1]
    assert np.isnan(build([Example("0", "w1", "w2")], tasks.REGRESSION_SIMILARITY, n_ctx=8).labels[0])


def test_context_length_is_longest_example_plus_three():
    encoded = task_inputs.encode_examples([Example("0", "w1 w2", "w3"), Example("1", "w1", "w2 w3 w4 w5")],
                                          fake_encode_batch)
    assert task_inputs.context_length(encoded, tasks.ENTAILMENT, n_ctx=512) == 5 + 3
    # each text cut to 8 // 2 - 2 = 2 tokens: w1 [d] w2 w3 is the longest
    assert task_inputs.context_length(encoded, tasks.ENTAILMENT, n_ctx=8) == 1 + 2 + 3
    with pytest.raises(ValueError, match="shorter than the longest row"):
        task_inputs.build_inputs(encoded, tasks.ENTAILMENT, n_ctx=512, seq_len=7)


def test_bad_arguments_are_rejected():
    encoded = task_inputs.encode_examples([Example("0", "w1")], fake_encode_batch)
    with pytest.raises(ValueError, match="unknown task kind"):
        task_inputs.build_inputs(encoded, "translation", n_ctx=8)
    with pytest.raises(ValueError, match="max_text_len"):
        task_inputs.build_inputs(encoded, tasks.CLASSIFICATION, n_ctx=8, max_text_len=3)
    with pytest.raises(ValueError, match="needs text_b"):
        task_inputs.build_inputs(encoded, tasks.ENTAILMENT, n_ctx=8)


def test_batches_count_every_example_once():
    arrays = build([Example(str(i), f"w{i + 1}", label=i % 2) for i in range(7)], tasks.CLASSIFICATION, n_ctx=6)
    out = list(task_inputs.batches(arrays, 3, shuffle=True, seed=0))
    assert [b["tokens"].shape for b in out] == [(3, 1, 6)] * 3
    index = np.concatenate([b["index"] for b in out])
    weights = np.concatenate([b["weights"] for b in out])
    assert sorted(index[weights > 0].tolist()) == list(range(7)) and weights.sum() == 7
    assert out[-1]["mask"][1:].sum() == 0 and out[-1]["index"][1:].tolist() == [-1, -1]
    for b in out:  # rows follow their index
        real = b["weights"] > 0
        np.testing.assert_array_equal(b["tokens"][real], arrays.tokens[b["index"][real]])
    again = [b["index"] for b in task_inputs.batches(arrays, 3, shuffle=True, seed=0)]
    assert all(np.array_equal(a, b["index"]) for a, b in zip(again, out))
    assert len(list(task_inputs.batches(arrays, 3, drop_remainder=True))) == 2


def test_real_sst2_dev_builds_within_context(data_root):
    from gpt1_jax.finetuning import task_readers

    examples = task_readers.read_local(tasks.get_task("sst2"), "validation", data_root).examples
    encoded = task_inputs.encode_examples(examples, lambda texts: [[ord(c) for c in t] for t in texts])
    n_ctx = task_inputs.context_length(encoded, tasks.CLASSIFICATION, n_ctx=128)
    arrays = task_inputs.build_inputs(encoded, tasks.CLASSIFICATION, n_ctx=128, seq_len=n_ctx)
    assert arrays.tokens.shape == (872, 1, n_ctx) and n_ctx == 128  # some reviews exceed 126 characters
    rows = np.arange(872)
    assert (arrays.tokens[rows, 0, arrays.classify_positions[:, 0]] == C).all()


def test_missing_training_file_names_it(data_root, monkeypatch):
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    config = tiny_config("")
    missing = r"task 'snli' has no local 'train' file under \$GPT1_JAX_DATA"
    with pytest.raises(task_inputs.TaskFileMissingError, match=missing):
        task_inputs.read_split(tasks.get_task("snli"), "train", run_options.task_data_options(config))
    # The recipe names the key that reads it from TFDS instead.
    with pytest.raises(ConfigError, match=r"snli.*train.*--config\.data\.task_source=tfds \(TFDS snli"):
        finetune.task_data(config, tasks.get_task("snli"), 128)


def test_story_cloze_holds_out_the_released_codes_374_stories(data_root, monkeypatch):
    """datasets.py: train_test_split(..., test_size=374, random_state=3535999445) over the validation file."""
    train_test_split = pytest.importorskip("sklearn.model_selection").train_test_split
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    config, spec = tiny_config(""), tasks.get_task("story_cloze")
    options = run_options.task_data_options(config)
    train, evals = task_inputs.train_and_evals(spec, options)
    stories = [ex.uid for ex in task_inputs.read_split(spec, "validation", options)]
    released_train, released_dev = train_test_split(stories, test_size=374, random_state=3535999445)
    assert [ex.uid for ex in evals["validation"]] == released_dev
    assert [ex.uid for ex in train] == released_train and len(train) == 1497


@pytest.mark.parametrize("task, first, n_first, scored", [("scitail", "validation", 1304, "test"),
                                                          ("qnli", "validation", 5732, None)])
def test_train_from_eval_trains_a_task_whose_training_file_is_missing_on_its_dev_split(
        data_root, monkeypatch, task, first, n_first, scored):
    """shared/data lacks QNLI's and SciTail's training sets: with finetune.train_from_eval they train on
    their dev split less the held-out part, as Story Cloze does; without it they stop naming the file."""
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    config, spec = tiny_config(""), tasks.get_task(task)
    with pytest.raises(task_inputs.TaskFileMissingError, match=r"train"):
        task_inputs.train_and_evals(spec, run_options.task_data_options(config))
    config.finetune.train_from_eval = True
    train, evals = task_inputs.train_and_evals(spec, run_options.task_data_options(config))
    held = config.finetune.heldout_examples
    assert len(train) == n_first - held and len(evals[first]) == held
    assert not {ex.uid for ex in train} & {ex.uid for ex in evals[first]}
    if scored:
        assert len(evals[scored]) > 0 and all(ex.label is not None for ex in evals[scored])


def test_train_from_eval_leaves_a_task_with_its_training_file_alone(data_root, monkeypatch):
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    config, spec = tiny_config(""), tasks.get_task("rte")
    config.finetune.train_from_eval = True
    options = run_options.task_data_options(config)
    train, evals = task_inputs.train_and_evals(spec, options)
    assert len(train) == len(task_inputs.read_split(spec, "train", options)) and len(evals["validation"]) == 277


def test_data_on_error_skips_and_counts_bad_rows_of_a_registered_task(tmp_path, monkeypatch, caplog):
    dev = tmp_path / "glue" / "RTE" / "dev.tsv"
    dev.parent.mkdir(parents=True)
    dev.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tentailment\n"
                   "1\ta row with\ttoo few columns\n2\tIt rains.\tIt is dry.\tnot_entailment\n")
    monkeypatch.setenv("GPT1_JAX_DATA", str(tmp_path))
    config = tiny_config()
    config.task = "rte"
    with pytest.raises(DataError, match=r"dev.tsv:3: expected 4 columns.*data.on_error=skip"):
        task_inputs.read_split(finetune.task_spec(config), "validation", run_options.task_data_options(config))
    config.data.on_error = "skip"
    examples = task_inputs.read_split(finetune.task_spec(config), "validation", run_options.task_data_options(config))
    assert [ex.label for ex in examples] == [0, 1] and "skipped 1 malformed rows" in caplog.text
