"""Task readers: the real files in shared/data (counts from its README), TFDS through mock_data, bad
input (a DataError naming the file and line, or skipped rows counted), and hostile and random files
(hypothesis, bounded examples and deadlines): a DataError naming the file, or examples; never another
exception, never a hang."""

import collections
import csv
import json
import pathlib
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpt1_jax.finetuning import task_readers, tasks
from gpt1_jax.finetuning.task_readers import DataError, ReadResult, read_columns, read_race_jsonl, read_story_cloze_csv

# (task, split) -> (examples, label counts by index; None for unlabeled or float labels), from data/README.md.
LOCAL_COUNTS = {
    ("snli", "validation"): (9842, {0: 3329, 1: 3235, 2: 3278}),
    ("snli", "test"): (1277 - 23, None),
    ("mnli", "validation_matched"): (9815, {0: 3479, 1: 3123, 2: 3213}),
    ("qnli", "validation"): (5732, {0: 2866, 1: 2866}),
    ("qnli", "test"): (5740, None),
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "validation"): (277, {0: 146, 1: 131}),
    ("rte", "test"): (3000, None),
    ("scitail", "validation"): (1304, {0: 657, 1: 647}),
    ("scitail", "test"): (2126, {0: 842, 1: 1284}),
    ("race/middle", "validation"): (1436, None),
    ("race/middle", "test"): (1436, None),
    ("race/high", "validation"): (3451, None),
    ("race/high", "test"): (3498, None),
    ("race/all", "validation"): (4887, None),
    ("race/all", "test"): (4934, None),
    ("story_cloze", "validation"): (1871, None),
    ("story_cloze", "test"): (1871, None),
    ("mrpc", "train"): (3668, {1: 2474, 0: 1194}),
    ("mrpc", "validation"): (408, {1: 279, 0: 129}),
    ("mrpc", "test"): (1725, None),
    ("stsb", "train"): (5749, None),
    ("stsb", "validation"): (1500, None),
    ("stsb", "test"): (1379, None),
    ("cola", "train"): (8551, {1: 6023, 0: 2528}),
    ("cola", "validation"): (1043, {1: 721, 0: 322}),
    ("cola", "test"): (1063, None),
    ("sst2", "train"): (67349, {1: 37569, 0: 29780}),
    ("sst2", "validation"): (872, {1: 444, 0: 428}),
    ("sst2", "test"): (1821, None),
    ("wnli", "train"): (635, None),
    ("wnli", "validation"): (71, None),
    ("wnli", "test"): (146, None),
}


@pytest.mark.parametrize("task,split", sorted(LOCAL_COUNTS))
def test_local_reader_counts(data_root, task, split):
    spec = tasks.get_task(task)
    result = task_readers.read_local(spec, split, data_root)
    count, label_counts = LOCAL_COUNTS[(task, split)]
    assert len(result) == count and result.skipped == 0
    labels = [ex.label for ex in result.examples]
    if label_counts is not None:
        assert dict(collections.Counter(labels)) == label_counts
    if split == "test" and task not in ("snli", "scitail", "race/middle", "race/high", "race/all", "story_cloze"):
        assert set(labels) == {None}  # GLUE test sets are unlabeled
    if spec.kind == tasks.MULTIPLE_CHOICE:
        n_choices = len(spec.label_names)
        assert all(len(ex.choices) == n_choices and 0 <= ex.label < n_choices for ex in result.examples)
        assert len(set(labels)) == n_choices  # every answer position occurs
    if spec.kind == tasks.REGRESSION_SIMILARITY and split != "test":
        assert 0.0 <= min(labels) and max(labels) <= 5.0


def test_snli_gold_less_pairs_are_dropped_and_counted(data_root):
    result = task_readers.read_local(tasks.get_task("snli"), "test", data_root)
    assert result.dropped == 23


def test_record_contents(data_root):
    race = task_readers.read_local(tasks.get_task("race/middle"), "validation", data_root).examples[0]
    assert race.text_b and len(race.choices) == 4 and "-0" in race.uid
    story = task_readers.read_local(tasks.get_task("story_cloze"), "validation", data_root).examples[0]
    assert story.text_a.startswith("Rick grew up in a troubled household. He never found")
    assert story.choices == ("He is happy now.", "He joined a gang.") and story.label == 0
    stsb = task_readers.read_local(tasks.get_task("stsb"), "test", data_root).examples[0]
    assert stsb.uid == "0" and stsb.text_b is not None


def test_missing_local_split_points_to_tfds(data_root):
    with pytest.raises(DataError, match="no local 'validation_mismatched'.*read_tfds"):
        task_readers.read_local(tasks.get_task("mnli"), "validation_mismatched", data_root)


def _race_dataset(self, split, **kwargs):
    import tensorflow as tf

    def generate():
        for i in range(3):
            yield {"article": f"article {i}", "questions": ["q1?", "q2?"], "options": [list("abcd"), list("efgh")],
                   "answers": ["B", "D"], "example_id": f"middle{i}.txt"}

    signature = {"article": tf.TensorSpec((), tf.string), "questions": tf.TensorSpec((None,), tf.string),
                 "options": tf.TensorSpec((None, None), tf.string), "answers": tf.TensorSpec((None,), tf.string),
                 "example_id": tf.TensorSpec((), tf.string)}
    return tf.data.Dataset.from_generator(generate, output_signature=signature)


def _story_dataset(self, split, **kwargs):
    import tensorflow as tf

    signature = {"context": tf.TensorSpec((), tf.string), "endings": tf.TensorSpec((None,), tf.string),
                 "label": tf.TensorSpec((), tf.int32)}
    return tf.data.Dataset.from_generator(
        lambda: ({"context": "c", "endings": ["e1", "e2"], "label": 1 + i % 2} for i in range(3)),
        output_signature=signature)


# RACE and Story Cloze need consistent nested lists and 1-based labels, which random mock data lacks.
_MOCK_DATASETS = {"race/middle": _race_dataset, "race/high": _race_dataset, "race/all": _race_dataset,
                  "story_cloze": _story_dataset}


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_tfds_reader_on_mock_data(task):
    tfds = pytest.importorskip("tensorflow_datasets")
    spec = tasks.get_task(task)
    split = spec.eval_splits[0]
    with tfds.testing.mock_data(num_examples=3, as_dataset_fn=_MOCK_DATASETS.get(task)):
        result = task_readers.read_tfds(spec, split)
    per_record = 2 if spec.tfds.layout == "race" else 1
    assert len(result) + result.dropped == 3 * per_record * len(spec.tfds.names)
    for ex in result.examples:
        assert isinstance(ex.text_a, str) and (ex.text_b is None) == (spec.tfds.text_b is None)
        if spec.kind == tasks.MULTIPLE_CHOICE:
            assert len(ex.choices) in (2, 4) and 0 <= ex.label < len(ex.choices)
        elif spec.label_names:
            assert ex.label in range(len(spec.label_names))
        else:
            assert isinstance(ex.label, float)
    if task == "race/middle":
        assert [(e.uid, e.label) for e in result.examples[:2]] == [("middle0.txt-0", 1), ("middle0.txt-1", 3)]


def _write(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_malformed_tsv_row_names_file_and_line(tmp_path):
    path = _write(tmp_path, "d.tsv", b"sentence\tlabel\ngood\t1\nbad row\n")
    with pytest.raises(DataError, match=r"d\.tsv:3: expected 2 columns"):
        task_readers.read_columns(path, text_a="sentence", label="label", label_names=("0", "1"))


def test_bad_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, "d.jsonl", b'{"t": "a", "y": "x"}\n{"t": oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        task_readers.read_columns(path, text_a="t", label="y", label_names=("x",))


def test_label_outside_label_set(tmp_path):
    path = _write(tmp_path, "d.csv", b"text,label\nfine,pos\nodd,maybe\n")
    with pytest.raises(DataError, match=r"d\.csv:3: label 'maybe' is not one of \['neg', 'pos'\]"):
        task_readers.read_columns(path, text_a="text", label="label", label_names=("neg", "pos"))


def test_missing_column_lists_the_columns(tmp_path):
    path = _write(tmp_path, "d.tsv", b"sentence\tlabel\na\t1\n")
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\]; the columns are \['sentence', 'label'\]"):
        task_readers.read_columns(path, text_a="text", label="label", label_names=("0", "1"))


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = _write(tmp_path, "d.tsv", b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(DataError, match=r"d\.tsv:2: byte 0xe9 at column \d+ is not valid utf-8"):
        task_readers.read_columns(path, text_a="sentence", label="label", label_names=("0", "1"))
    result = task_readers.read_columns(path, text_a="sentence", label="label", label_names=("0", "1"),
                                       on_error="skip")
    assert result.repaired == 1 and result.examples[0].text_a == "caf\ufffd"


def test_skip_mode_counts_and_keeps_good_rows(tmp_path):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "bad"}, {"label": "pos"}]
    content = "\n".join(json.dumps(r) for r in rows) + "\n{broken\n" + json.dumps({"text": "c", "label": "neg"})
    path = _write(tmp_path, "d.jsonl", content.encode())
    result = task_readers.read_columns(path, text_a="text", label="label", label_names=("neg", "pos"),
                                       on_error="skip")
    assert [(e.text_a, e.label) for e in result.examples] == [("a", 1), ("c", 0)]
    assert result.skipped == 3 and len(result.problems) == 3


def test_user_data_with_float_labels_and_no_header(tmp_path):
    path = _write(tmp_path, "pairs.tsv", b"x\ty\t0.5\nz\tw\t4\n")
    result = task_readers.read_columns(path, text_a="a", text_b="b", label="s", header=("a", "b", "s"))
    assert [(e.text_b, e.label) for e in result.examples] == [("y", 0.5), ("w", 4.0)]
    assert np.isclose(sum(e.label for e in result.examples), 4.5)


def _jsonl(tmp_path, records) -> pathlib.Path:
    return _write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())


@pytest.mark.parametrize("value, shown", [(None, "null"), ({"x": 1}, r'an object \{"x": 1\}'),
                                          (["a", "b"], r'a list \["a", "b"\]'), (7, "a number 7")])
def test_a_text_field_that_is_not_a_string_is_a_bad_row_naming_file_line_and_field(tmp_path, value, shown):
    path = _jsonl(tmp_path, [{"premise": "a", "hypothesis": "b", "label": "neutral"},
                             {"premise": "c", "hypothesis": value, "label": "neutral"}])
    read = dict(text_a="premise", text_b="hypothesis", label="label", label_names=("neutral",))
    with pytest.raises(DataError, match=rf"d\.jsonl:2: field 'hypothesis' is {shown}, not a string"):
        read_columns(path, **read)
    result = read_columns(path, on_error="skip", **read)
    assert [e.text_b for e in result.examples] == ["b"] and result.skipped == 1


def test_labels_and_ids_may_be_numbers_but_not_null_objects_or_lists(tmp_path):
    path = _jsonl(tmp_path, [{"t": "a", "y": 1, "id": 10}, {"t": "b", "y": None, "id": 11},
                             {"t": "c", "y": 0, "id": {"n": 12}}, {"t": "d", "y": [1], "id": 13}])
    result = read_columns(path, text_a="t", label="y", uid="id", label_names=("0", "1"), on_error="skip")
    assert [(e.uid, e.label) for e in result.examples] == [("10", 1)] and result.skipped == 3
    assert "d.jsonl:2: field 'y' is null" in result.problems[0] and "field 'id' is an object" in result.problems[1]
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'y' is null; it must be a string, a number"):
        task_readers.label_values(path, "y")  # a custom task's label set never gains the label "None"
    assert task_readers.label_values(path, "y", on_error="skip") == ["1", "0"]
    scores = _jsonl(tmp_path, [{"t": "a", "s": 4.5}, {"t": "b", "s": 2}])
    assert [e.label for e in read_columns(scores, text_a="t", label="s").examples] == [4.5, 2.0]


def test_a_race_record_with_a_null_id_names_file_and_line(tmp_path):
    record = {"id": None, "article": "a", "questions": ["q"], "options": [list("abcd")], "answers": ["A"]}
    path = _jsonl(tmp_path, [record])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'id' is null"):
        read_race_jsonl(path)


@pytest.mark.parametrize("name, content, header", [
    ("d.csv", b"text,text,label\na,b,1\n", None),
    ("d.tsv", b"text\ttext\tlabel\na\tb\t1\n", None),
    ("d.tsv", b"a\tb\t1\n", ("text", "text", "label")),
])
def test_a_duplicated_column_name_is_refused_naming_the_file_and_the_column(tmp_path, name, content, header):
    path = _write(tmp_path, name, content)
    source = "the column names given" if header else "the header line"
    with pytest.raises(DataError, match=rf"{name}: column name\(s\) \['text'\] occur more than once in {source}"
                                        r".*rename them"):
        read_columns(path, text_a="text", label="label", label_names=("1",), header=header)


def test_a_json_key_written_twice_is_a_bad_row_naming_file_line_and_key(tmp_path):
    path = _write(tmp_path, "d.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "text": "c", "label": 1}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: field\(s\) \['text'\] occur more than once"):
        read_columns(path, text_a="text", label="label", label_names=("1",))
    result = read_columns(path, text_a="text", label="label", label_names=("1",), on_error="skip")
    assert [e.text_a for e in result.examples] == ["a"] and result.skipped == 1


def test_a_csv_field_past_the_csv_modules_limit_is_read_whole_as_the_same_tsv_is(tmp_path):
    document = "word " * 40_000  # 200,000 characters, past csv's default limit of 131,072
    limit = csv.field_size_limit()
    csv_file = _write(tmp_path, "d.csv", f'text,label\n"{document}",1\nshort,0\n'.encode())
    tsv_file = _write(tmp_path, "d.tsv", f"text\tlabel\n{document}\t1\nshort\t0\n".encode())
    read = dict(text_a="text", label="label", label_names=("0", "1"))
    assert read_columns(csv_file, **read).examples == read_columns(tsv_file, **read).examples
    assert read_columns(csv_file, **read).examples[0].text_a == document
    assert csv.field_size_limit() == limit  # the process-wide limit is put back


def test_empty_text_fields_are_kept_counted_and_the_first_named_in_a_warning(tmp_path, caplog):
    path = _write(tmp_path, "d.tsv", b"premise\thypothesis\tlabel\na\tb\t1\n\tb\t0\nc\t   \t1\nd\te\t0\n")
    with caplog.at_level("WARNING"):
        result = read_columns(path, text_a="premise", text_b="hypothesis", label="label", label_names=("0", "1"))
    assert len(result) == 4 and result.empty_texts == [f"{path}:3: empty 'premise'", f"{path}:4: empty 'hypothesis'"]
    assert "2 rows have an empty text field" in caplog.text and f"first: {path}:3: empty 'premise'" in caplog.text
    records = _jsonl(tmp_path, [{"t": "", "y": 1}, {"t": "x", "y": 0}])
    empty_in_jsonl = read_columns(records, text_a="t", label="y", label_names=("0", "1")).empty_texts
    assert empty_in_jsonl == [f"{records}:1: empty 't'"]


# ---------------------------------------------------------------- hostile and random files

PROPERTY = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
rows = st.lists(st.lists(cells, min_size=0, max_size=5), max_size=8)


def _temp_file(data: bytes, suffix: str) -> pathlib.Path:
    handle = tempfile.NamedTemporaryFile(delete=False, suffix=suffix)
    handle.write(data)
    handle.close()
    return pathlib.Path(handle.name)


def _read_or_data_error(read, path: pathlib.Path, **kwargs) -> None:
    for on_error in ("raise", "skip"):
        try:
            result = read(path, on_error=on_error, **kwargs)
        except DataError as err:
            assert on_error == "raise" or "column" in str(err), err
            assert str(path) in str(err)
        else:
            assert isinstance(result, ReadResult)
            for example in result.examples:
                assert isinstance(example.text_a, str) and isinstance(example.text_b, (str, type(None)))


@PROPERTY
@given(rows=rows, label_names=st.sampled_from([None, ("0", "1")]))
def test_random_tsv_tables(rows, label_names):
    text = "sentence\tlabel\n" + "\n".join("\t".join(row) for row in rows)
    path = _temp_file(text.encode("utf-8"), ".tsv")
    _read_or_data_error(read_columns, path, text_a="sentence", label="label", label_names=label_names)


@PROPERTY
@given(data=st.binary(max_size=400))
def test_random_bytes_as_tsv_csv_and_jsonl(data):
    for suffix in (".tsv", ".csv", ".jsonl"):
        path = _temp_file(b"premise\thypothesis\tlabel\n" + data if suffix == ".tsv" else data, suffix)
        _read_or_data_error(read_columns, path, text_a="premise", text_b="hypothesis", label="label",
                            label_names=("entailment", "neutral", "contradiction"))


@PROPERTY
@given(records=st.lists(st.dictionaries(st.sampled_from(["id", "article", "questions", "options", "answers"]),
                                        st.one_of(cells, st.lists(cells, max_size=4),
                                                  st.lists(st.lists(cells, max_size=4), max_size=3)),
                                        max_size=5), max_size=4))
@example(records=[{"id": "", "article": "", "questions": ["", ""], "options": [[], []], "answers": [[], []]}])
def test_random_race_records(records):
    path = _temp_file("\n".join(json.dumps(r) for r in records).encode("utf-8"), ".jsonl")
    _read_or_data_error(read_race_jsonl, path)


@PROPERTY
@given(rows=rows)
def test_random_story_cloze_tables(rows):
    header = "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4," \
             "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
    body = "\n".join(",".join(row) for row in rows)
    path = _temp_file((header + body).encode("utf-8"), ".csv")
    _read_or_data_error(read_story_cloze_csv, path)
