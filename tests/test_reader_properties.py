"""Hostile and random files through the task readers: a DataError naming the file, or examples; never
another exception, never a hang (hypothesis, bounded examples and deadlines)."""

import json
import pathlib
import tempfile

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpt1_jax.data.task_readers import DataError, ReadResult, read_columns, read_race_jsonl, read_story_cloze_csv

PROPERTY = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
rows = st.lists(st.lists(cells, min_size=0, max_size=5), max_size=8)


def _write(data: bytes, suffix: str) -> pathlib.Path:
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
                assert isinstance(example.text_a, str)


@PROPERTY
@given(rows=rows, label_names=st.sampled_from([None, ("0", "1")]))
def test_random_tsv_tables(rows, label_names):
    text = "sentence\tlabel\n" + "\n".join("\t".join(row) for row in rows)
    path = _write(text.encode("utf-8"), ".tsv")
    _read_or_data_error(read_columns, path, text_a="sentence", label="label", label_names=label_names)


@PROPERTY
@given(data=st.binary(max_size=400))
def test_random_bytes_as_tsv_csv_and_jsonl(data):
    for suffix in (".tsv", ".csv", ".jsonl"):
        path = _write(b"premise\thypothesis\tlabel\n" + data if suffix == ".tsv" else data, suffix)
        _read_or_data_error(read_columns, path, text_a="premise", text_b="hypothesis", label="label",
                            label_names=("entailment", "neutral", "contradiction"))


@PROPERTY
@given(records=st.lists(st.dictionaries(st.sampled_from(["id", "article", "questions", "options", "answers"]),
                                        st.one_of(cells, st.lists(cells, max_size=4),
                                                  st.lists(st.lists(cells, max_size=4), max_size=3)),
                                        max_size=5), max_size=4))
@example(records=[{"id": "", "article": "", "questions": ["", ""], "options": [[], []], "answers": [[], []]}])
def test_random_race_records(records):
    path = _write("\n".join(json.dumps(r) for r in records).encode("utf-8"), ".jsonl")
    _read_or_data_error(read_race_jsonl, path)


@PROPERTY
@given(rows=rows)
def test_random_story_cloze_tables(rows):
    header = "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4," \
             "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
    body = "\n".join(",".join(row) for row in rows)
    path = _write((header + body).encode("utf-8"), ".csv")
    _read_or_data_error(read_story_cloze_csv, path)
