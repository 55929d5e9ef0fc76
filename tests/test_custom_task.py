"""Your own task from the command line (`--config configs/finetune.py:custom`): files the tests write, run through
train.py."""

import csv
import json
import pathlib

import numpy as np
import pytest

from gpt1_jax import run_options, train_cli
from gpt1_jax.config_check import ConfigError
from gpt1_jax.configs import finetune as finetune_recipe
from gpt1_jax.finetuning import custom_task, finetune, task_inputs
from gpt1_jax.finetuning.task_readers import DataError
from pretrain_helpers import RECIPES

QUESTION_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
QUESTIONS = {
    "ABBR": "what does {} stand for ?", "DESC": "why is the {} so famous ?", "ENTY": "which animal lives in {} ?",
    "HUM": "who founded {} ?", "LOC": "where is {} ?", "NUM": "how many people live in {} ?",
}
PLACES = ["Zürich", "São Paulo", "Málaga", "Besançon", "Genève", "Köln", "Ålesund", "Orléans"]


@pytest.fixture(scope="module")
def pretrained(tiny_pretraining) -> pathlib.Path:
    return tiny_pretraining / "checkpoints"


def train(workdir: pathlib.Path, init, *overrides: str, recipe: str = "custom") -> dict:
    """`python train.py --config configs/finetune.py:<recipe>` with the tiny model's settings, one short epoch."""
    train_cli.main(["--config", f"{RECIPES / 'finetune.py'}:{recipe}", "--workdir", str(workdir),
                    f"--config.init={init}", "--config.finetune.epochs=1", "--config.finetune.eval_at=",
                    "--config.train.batch_size=8", "--config.train.eval_batch_size=16",
                    "--config.train.log_every=2", "--config.checkpoint.async_save=False",
                    "--config.optimizer.lr=1e-3", "--config.optimizer.warmup_fraction=0.1", *overrides])
    return json.loads((workdir / "results.json").read_text())


def predictions(workdir: pathlib.Path) -> list[list[str]]:
    lines = (workdir / "predictions" / "custom-test.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    return [line.split("\t") for line in lines[1:]]


def question_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    labels = [QUESTION_CLASSES[i % 6] for i in range(n)]
    return [(QUESTIONS[label].format(PLACES[rng.integers(len(PLACES))]), label) for label in labels]


def write_tsv(path: pathlib.Path, header: list[str] | None, rows, encoding="utf-8") -> pathlib.Path:
    lines = (["\t".join(header)] if header else []) + ["\t".join(row) for row in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def write_csv(path: pathlib.Path, header: list[str], rows) -> pathlib.Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: pathlib.Path, records) -> pathlib.Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ---------------------------------------------------------------- end to end through train.py


@pytest.mark.slow
def test_six_class_latin1_tsv_maps_predictions_back_to_its_labels(pretrained, tmp_path):
    train_file = write_tsv(tmp_path / "train.tsv", ["question", "label"], question_rows(48, 0), "latin-1")
    dev_file = write_tsv(tmp_path / "dev.tsv", ["question", "label"], question_rows(12, 1), "latin-1")
    test_file = write_tsv(tmp_path / "test.tsv", ["id", "question"],
                          [(f"q{i}", q) for i, (q, _) in enumerate(question_rows(10, 2))], "latin-1")
    run = tmp_path / "run"
    results = train(run, pretrained, "--config.custom.kind=classification", f"--config.custom.train={train_file}",
                    f"--config.custom.validation={dev_file}", f"--config.custom.test={test_file}",
                    "--config.custom.text_a=question", "--config.custom.label=label", "--config.custom.uid=id",
                    "--config.custom.encoding=latin-1")
    assert results["task"] == "custom" and results["labels"] == sorted(QUESTION_CLASSES)
    assert set(results["dev"]) == {"validation"} and 0.0 <= results["dev"]["validation"]["accuracy"] <= 1.0
    assert results["paper"] == {} and "| custom | validation | accuracy |" in (run / "results.md").read_text()
    assert "| - |" in (run / "results.md").read_text()
    assert json.loads((run / "config.json").read_text())["custom"]["labels"] == ",".join(sorted(QUESTION_CLASSES))
    rows = predictions(run)
    assert [uid for uid, _ in rows] == [f"q{i}" for i in range(10)]
    assert {label for _, label in rows} <= set(QUESTION_CLASSES)


@pytest.mark.slow
def test_entailment_jsonl_with_a_labelled_test_split(pretrained, tmp_path):
    names = ("entailment", "neutral", "contradiction")
    records = [{"premise": f"a man is playing a {thing} .", "hypothesis": f"someone plays {other} .",
                "label": names[i % 3]} for i, (thing, other) in
               enumerate([("guitar", "music"), ("piano", "a game"), ("flute", "nothing")] * 8)]
    train_file = write_jsonl(tmp_path / "train.jsonl", records[:16])
    dev_file = write_jsonl(tmp_path / "dev.jsonl", records[16:20])
    test_file = write_jsonl(tmp_path / "test.jsonl", records[20:])
    run = tmp_path / "run"
    results = train(run, pretrained, "--config.custom.kind=entailment", f"--config.custom.train={train_file}",
                    f"--config.custom.validation={dev_file}", f"--config.custom.test={test_file}",
                    "--config.custom.text_a=premise", "--config.custom.text_b=hypothesis",
                    "--config.custom.label=label", f"--config.custom.labels={','.join(names)}",
                    "--config.custom.metrics=accuracy")
    assert results["labels"] == list(names) and set(results["dev"]) == {"validation", "test"}
    rows = predictions(run)
    assert [uid for uid, _ in rows] == ["0", "1", "2", "3"] and {label for _, label in rows} <= set(names)


@pytest.mark.slow
def test_multiple_choice_csv_takes_the_answer_as_index_or_text(pretrained, tmp_path):
    def rows(n):
        out = []
        for i in range(n):
            endings = [f"she went home {i}", f"she ate the moon {i}", f"the car sang {i}"]
            answer = endings[0] if i % 2 else "0"  # the text of the right ending, or its index
            out.append((f"mary finished work late on day {i} .", *endings, answer))
        return out

    header = ["story", "ending1", "ending2", "ending3", "answer"]
    files = {split: write_csv(tmp_path / f"{split}.csv", header, rows(n)) for split, n in
             (("train", 16), ("validation", 6), ("test", 5))}
    run = tmp_path / "run"
    results = train(run, pretrained, "--config.custom.kind=multiple_choice",
                    *[f"--config.custom.{split}={path}" for split, path in files.items()],
                    "--config.custom.text_a=story", "--config.custom.choices=ending1,ending2,ending3",
                    "--config.custom.label=answer")
    assert results["labels"] == ["0", "1", "2"] and set(results["dev"]) == {"validation", "test"}
    assert {answer for _, answer in predictions(run)} <= {"0", "1", "2"} and len(predictions(run)) == 5


@pytest.mark.slow
def test_similarity_regression_csv_scores_pearson_and_writes_scores(pretrained, tmp_path):
    rng = np.random.default_rng(0)
    sentences = ["a dog runs in the park .", "a cat sleeps on the sofa .", "two men play chess .",
                 "a woman reads a book .", "the children swim in the lake ."]

    def rows(n):
        return [(sentences[i % 5], sentences[(i + 1) % 5], f"{rng.uniform(0, 5):.2f}") for i in range(n)]

    files = {split: write_csv(tmp_path / f"{split}.csv", ["s1", "s2", "score"], rows(n))
             for split, n in (("train", 16), ("validation", 8))}
    files["test"] = write_csv(tmp_path / "test.csv", ["s1", "s2"], [row[:2] for row in rows(4)])
    run = tmp_path / "run"
    results = train(run, pretrained, "--config.custom.kind=regression",
                    *[f"--config.custom.{split}={path}" for split, path in files.items()],
                    "--config.custom.text_a=s1", "--config.custom.text_b=s2", "--config.custom.label=score")
    assert results["metric"] == "pearson" and results["metrics"] == ["pearson", "spearman"]
    assert results["labels"] == [] and -1.0 <= results["dev"]["validation"]["pearson"] <= 1.0
    assert all(np.isfinite(float(score)) for _, score in predictions(run)) and len(predictions(run)) == 4


@pytest.mark.slow
def test_a_registered_tasks_files_as_custom_give_the_same_metric(pretrained, tmp_path, data_root, monkeypatch):
    """SST-2's own local files fine-tuned as `custom` with the quick start's settings and seed: the same
    examples, labels, context length and initialisation, so the same dev accuracy to the last digit."""
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    sst2 = data_root / "glue" / "SST-2"
    registered = train(tmp_path / "registered", pretrained, "--config.data.task_source=local", recipe="tiny")
    custom = train(tmp_path / "custom", pretrained, "--config.task=custom", "--config.custom.kind=classification",
                   f"--config.custom.train={sst2 / 'train.tsv'}", f"--config.custom.validation={sst2 / 'dev.tsv'}",
                   f"--config.custom.test={sst2 / 'test.tsv'}", "--config.custom.uid=index",
                   "--config.custom.text_a=sentence", "--config.custom.label=label", recipe="tiny")
    assert custom["labels"] == ["0", "1"] and registered["task"] == "sst2"
    assert custom["dev"] == registered["dev"] and custom["best_step"] == registered["best_step"]
    assert (tmp_path / "custom" / "predictions" / "custom-test.tsv").read_text() == \
        (tmp_path / "registered" / "predictions" / "SST-2.tsv").read_text()


# ---------------------------------------------------------------- bad input: one clear error naming file and key


def custom_config(tmp_path, **custom):
    config = finetune_recipe.get_config("custom")
    config.custom.update(custom)
    return config


def load(config):
    spec = finetune.check_config(config)
    return task_inputs.train_and_evals(spec, run_options.task_data_options(config))


@pytest.fixture
def question_files(tmp_path):
    return (write_tsv(tmp_path / "train.tsv", ["question", "label"], question_rows(12, 0)),
            write_tsv(tmp_path / "dev.tsv", ["question", "label"], question_rows(6, 1)))


def test_a_missing_column_lists_the_columns_there_are(tmp_path, question_files):
    config = custom_config(tmp_path, kind="classification", train=str(question_files[0]),
                           validation=str(question_files[1]), text_a="text", label="label")
    with pytest.raises(DataError, match=r"(train|dev).tsv: no column\(s\) \['text'\]; the columns are \['question', "
                                        r"'label'\]"):
        load(config)


def test_a_validation_label_outside_the_training_set_names_file_and_line_or_is_skipped(tmp_path, question_files):
    dev = write_tsv(tmp_path / "odd.tsv", ["question", "label"], [*question_rows(3, 1), ("what is love ?", "MOOD")])
    settings = dict(kind="classification", train=str(question_files[0]), validation=str(dev), text_a="question",
                    label="label")
    with pytest.raises(DataError, match=r"odd.tsv:5: label 'MOOD' is not one of \['ABBR'.*custom.on_error"):
        load(custom_config(tmp_path, **settings))
    _, evals = load(custom_config(tmp_path, on_error="skip", **settings))
    assert len(evals["validation"]) == 3


def test_an_empty_file_and_a_file_without_header_are_named(tmp_path, question_files):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    config = custom_config(tmp_path, kind="classification", train=str(empty), validation=str(question_files[1]),
                           text_a="question", label="label")
    with pytest.raises(DataError, match="empty.tsv: the file is empty"):
        load(config)
    header_only = write_tsv(tmp_path / "header_only.tsv", ["question", "label"], [])
    config.custom.train = str(header_only)
    with pytest.raises((DataError, ConfigError), match="header_only.tsv"):
        load(config)
    bare = write_tsv(tmp_path / "bare.tsv", None, question_rows(6, 0))
    config.custom.train = str(bare)
    with pytest.raises(DataError, match=r"bare.tsv: no column.*custom.columns"):
        load(config)
    config.custom.update(columns="question,label")  # naming the columns reads it, header and all
    config.custom.validation = str(write_tsv(tmp_path / "bare_dev.tsv", None, question_rows(6, 1)))
    train_examples, _ = load(config)
    assert len(train_examples) == 6


@pytest.mark.parametrize("kind, settings, key", [
    ("entailment", {}, "custom.text_b"),
    ("regression", {}, "custom.text_b"),
    ("multiple_choice", {}, "custom.choices"),
    ("classification", {"choices": "a,b"}, "custom.choices"),
    ("ranking", {}, "custom.kind"),
    ("classification", {"encoding": "klingon"}, "custom.encoding"),
    ("classification", {"metrics": "accuracy,f1"}, "custom.metrics"),
    ("classification", {"validation": ""}, "custom.validation"),
])
def test_settings_a_kind_cannot_work_with_are_refused_naming_the_key(tmp_path, question_files, kind, settings, key):
    config = custom_config(tmp_path, kind=kind, train=str(question_files[0]), validation=str(question_files[1]),
                           text_a="question", label="label")
    config.custom.update(settings)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        finetune.check_config(config)


@pytest.mark.parametrize("bad", ["high", "nan", "-inf"])  # float() reads the last two
def test_regression_with_a_label_that_is_no_finite_number_names_file_and_line(tmp_path, bad):
    rows = [("a dog runs .", "a dog walks .", "4.5"), ("a cat sits .", "a man eats .", bad)]
    train_file = write_csv(tmp_path / "train.csv", ["s1", "s2", "score"], rows)
    config = custom_config(tmp_path, kind="regression", train=str(train_file), validation=str(train_file),
                           text_a="s1", text_b="s2", label="score")
    with pytest.raises(DataError, match=rf"train.csv:3: label '{bad}' is not a finite number"):
        load(config)


def test_a_null_jsonl_label_names_file_line_and_field_and_never_becomes_a_class(tmp_path):
    records = [{"q": "who is it ?", "y": "HUM"}, {"q": "where is it ?", "y": None}, {"q": "how many ?", "y": "NUM"}]
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    settings = dict(kind="classification", train=str(train_file), validation=str(train_file), text_a="q", label="y")
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'y' is null.*custom.on_error"):
        load(custom_config(tmp_path, **settings))
    config = custom_config(tmp_path, on_error="skip", **settings)
    train_examples, _ = load(config)
    assert config.custom.labels == "HUM,NUM" and len(train_examples) == 2


def test_undecodable_bytes_name_the_line_and_suggest_custom_encoding(tmp_path, question_files):
    latin = write_tsv(tmp_path / "latin.tsv", ["question", "label"], question_rows(12, 0), "latin-1")
    config = custom_config(tmp_path, kind="classification", train=str(latin), validation=str(question_files[1]),
                           text_a="question", label="label")
    with pytest.raises(DataError, match=r"latin.tsv:\d+: byte 0x[0-9a-f]{2} .* not valid utf-8.*custom.encoding"):
        load(config)


def test_any_tfds_dataset_by_name_with_the_same_column_keys(tmp_path):
    import tensorflow_datasets as tfds

    config = custom_config(tmp_path, kind="classification", tfds="glue/sst2", text_a="sentence", label="label",
                           uid="idx", splits="train=train,validation=validation,test=test")
    with tfds.testing.mock_data(num_examples=6):
        spec = finetune.check_config(config)
        train_examples, evals = task_inputs.train_and_evals(spec, run_options.task_data_options(config))
    assert spec.label_names == ("negative", "positive") and spec.name == custom_task.NAME
    assert len(train_examples) == 6 and len(evals["validation"]) == 6


def write_table(path: pathlib.Path, header: list[str], rows) -> pathlib.Path:
    """`rows` in the format `path`'s suffix names, JSON values as they are (a number stays a JSON number)."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, [dict(zip(header, row)) for row in rows])
    if path.suffix == ".csv":
        return write_csv(path, header, rows)
    return write_tsv(path, header, [[str(value) for value in row] for row in rows])


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_labels_that_differ_only_in_surrounding_whitespace_are_one_class_and_a_blank_label_is_a_bad_row(
        tmp_path, suffix):
    rows = [("good film", "pos "), ("great film", "pos"), ("bad film", " neg"), ("dull film", "neg")]
    train_file = write_table(tmp_path / f"train{suffix}", ["text", "label"], rows)
    settings = dict(kind="classification", validation=str(train_file), text_a="text", label="label")
    config = custom_config(tmp_path, train=str(train_file), **settings)
    train_examples, _ = load(config)
    assert config.custom.labels == "neg,pos" and [e.label for e in train_examples] == [1, 1, 0, 0]
    blank = write_table(tmp_path / f"blank{suffix}", ["text", "label"], [*rows, ("odd film", "  ")])
    with pytest.raises(DataError, match=rf"blank{suffix}:\d: field 'label' is empty.*custom.on_error"):
        load(custom_config(tmp_path, train=str(blank), **settings))
    config = custom_config(tmp_path, train=str(blank), on_error="skip", **settings)
    train_examples, _ = load(config)
    assert config.custom.labels == "neg,pos" and len(train_examples) == 4


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_numeric_labels_written_two_ways_are_one_class_named_plainly(tmp_path, suffix):
    rows = [("good", 1), ("great", 1.0), ("fine", "1"), ("bad", 0), ("awful", 0.0), ("dull", " 0 ")]
    train_file = write_table(tmp_path / f"train{suffix}", ["text", "label"], rows)
    settings = dict(kind="classification", train=str(train_file), validation=str(train_file), text_a="text",
                    label="label")
    config = custom_config(tmp_path, **settings)
    train_examples, _ = load(config)
    assert config.custom.labels == "0,1" and [e.label for e in train_examples] == [1, 1, 1, 0, 0, 0]
    config = custom_config(tmp_path, labels="0.0,1.00", **settings)  # given labels compare by value as well
    train_examples, _ = load(config)
    assert config.custom.labels == "0,1" and [e.label for e in train_examples] == [1, 1, 1, 0, 0, 0]
    with pytest.raises(ConfigError, match=r"custom\.labels='0,1,1\.0' names the class\(es\) \['1'\] more than once"):
        load(custom_config(tmp_path, labels="0,1,1.0", **settings))


def test_a_multiple_choice_answer_index_may_be_written_as_a_float(tmp_path):
    records = [{"story": f"day {i} .", "e1": "home", "e2": "moon", "e3": "sea", "answer": answer}
               for i, answer in enumerate([0, 1.0, "2.0", " moon "])]
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    config = custom_config(tmp_path, kind="multiple_choice", train=str(train_file), validation=str(train_file),
                           text_a="story", choices="e1,e2,e3", label="answer")
    train_examples, _ = load(config)
    assert [e.label for e in train_examples] == [0, 1, 2, 1]
