"""Readers that turn task data, from local files or TFDS, into one common `Example` record.

Fine-tuning (Sec. 3.2) sees every task as text(s) plus a label; these readers hide each source's format so
the input transformations of Sec. 3.3 (`gpt1_jax.finetuning.task_inputs`) and the loop feed on one record type,
whether the data comes from `tfds.load` or from files laid out like `shared/data` (the `local` field of a
`gpt1_jax.finetuning.tasks.TaskSpec`).

Bad input is an error naming file and line by default (`on_error="raise"`). With `on_error="skip"` a bad row
is skipped, counted in `ReadResult.skipped` and logged, and undecodable bytes are replaced (counted in
`ReadResult.repaired`). Rows whose raw label means "no gold label" (SNLI '-', TFDS -1) are the standard
exclusion, not errors: they are counted in `ReadResult.dropped`. A text field that is empty is kept but
counted (`ReadResult.empty_texts`) and logged with the first file:line, as skipped rows are.

Labels are compared as the classes they name (`label_key`): stripped of surrounding whitespace, a number by
its value, so `pos ` is `pos` and `1`, `1.0` and `"1"` are one class.
"""

import collections
import contextlib
import csv
import ctypes
import dataclasses
import decimal
import json
import logging
import math
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

from gpt1_jax.constants import DATA_ENV
from gpt1_jax.errors import UserError
from gpt1_jax.finetuning import tasks

ON_ERROR = ("raise", "skip")
_RACE_LETTERS = "ABCD"
_STORY_SENTENCES = tuple(f"InputSentence{i}" for i in range(1, 5))
_STORY_ENDINGS = ("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,4})?", re.ASCII)  # a label spelt as a number
_C_LONG_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_long) - 1) - 1  # the largest csv.field_size_limit takes


class DataError(UserError, ValueError):
    """Input data that cannot be read as the task expects; the message says where and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One task example. `text_b` is the hypothesis/second sentence (or a RACE question, which the
    multiple-choice layout appends to the context); `choices` holds the candidate answers; `label` is a
    class/answer index, a float for regression, or None when the split is unlabeled (GLUE test).
    `uid` identifies the example in a submission file (GLUE `index`, RACE `<article>-<question>`, ...)."""

    uid: str
    text_a: str
    text_b: str | None = None
    choices: tuple[str, ...] | None = None
    label: int | float | None = None


@dataclasses.dataclass
class ReadResult:
    examples: list[Example]
    skipped: int = 0  # malformed rows left out with on_error="skip"
    dropped: int = 0  # rows without a gold label, left out by design
    repaired: int = 0  # rows whose non-UTF-8 bytes were replaced with on_error="skip"
    problems: list[str] = dataclasses.field(default_factory=list)  # one message per skipped/repaired row
    empty_texts: list[str] = dataclasses.field(default_factory=list)  # "file:line: empty FIELD" per kept row

    def __len__(self) -> int:
        return len(self.examples)

    def extend(self, other: "ReadResult") -> None:
        self.examples.extend(other.examples)
        self.skipped += other.skipped
        self.dropped += other.dropped
        self.repaired += other.repaired
        self.problems.extend(other.problems)
        self.empty_texts.extend(other.empty_texts)


class _Policy:
    """Applies `on_error` to one read: raise at once, or record the problem into the result."""

    def __init__(self, on_error: str, result: ReadResult):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.skip = on_error == "skip"
        self.result = result

    def bad_row(self, message: str) -> None:
        if not self.skip:
            raise DataError(message + " (data.on_error=skip, or custom.on_error for your own task, skips and "
                            "counts such rows)")
        self.result.skipped += 1
        self.result.problems.append(message)

    def bad_bytes(self, message: str) -> None:
        if not self.skip:
            raise DataError(message + " (name the file's encoding, e.g. latin-1: custom.encoding for your own "
                            "task; or data.on_error=skip / custom.on_error=skip to replace such bytes)")
        self.result.repaired += 1
        self.result.problems.append(message)


def resolve_data_root(data_root: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder laid out like `shared/data`: `data_root` if given, else `$GPT1_JAX_DATA`."""
    root = data_root if data_root is not None else os.environ.get(DATA_ENV)
    if root is None:
        raise DataError(f"no data root: pass data_root or set ${DATA_ENV} to a folder laid out like shared/data")
    return pathlib.Path(root)


def _lines(path: pathlib.Path, policy: _Policy, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end-of-line) for each line; strict decoding, BOM stripped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                policy.bad_bytes(f"{path}:{number}: byte {raw[e.start]:#04x} at column {e.start + 1} is not valid "
                                 f"{encoding}")
                line = raw.decode(encoding, errors="replace")
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield number, line.rstrip("\r\n")


def _check_unique_columns(path: pathlib.Path, header: Sequence[str], given: bool) -> None:
    """Refuse a column name that occurs twice: a row becomes a dict by name, so all but the last column of
    that name would vanish and the task would train on whichever came last without a word."""
    counts = collections.Counter(header)
    twice = sorted(name for name, count in counts.items() if count > 1)
    if twice:
        source = "the column names given (custom.columns)" if given else "the header line"
        raise DataError(f"{path}: column name(s) {twice} occur more than once in {source} {list(header)}; rename "
                        "them so that each column has a name of its own")


def _table_records(rows: Iterable[tuple[int, list[str]]], path: pathlib.Path, header: Sequence[str] | None,
                   required: Sequence[str], policy: _Policy) -> Iterator[tuple[int, dict[str, str]]]:
    rows = iter(rows)
    given = header is not None
    if header is None:
        number, header = next(rows, (0, None))
        if header is None or header == [""]:
            raise DataError(f"{path}: the file is empty; a table needs a header line naming its columns")
    _check_unique_columns(path, header, given)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: no column(s) {missing}; the columns are {list(header)} (a file without a header "
                        "line needs its column names given: custom.columns for your own task)")
    for number, fields in rows:
        if fields == [""] or not fields:
            continue  # blank line, e.g. at the end of a file
        if len(fields) != len(header):
            policy.bad_row(f"{path}:{number}: expected {len(header)} columns {list(header)}, found {len(fields)}")
            continue
        yield number, dict(zip(header, fields))


def _tsv_records(path, header, required, policy, encoding="utf-8"):
    """GLUE TSV: split on tabs with no quote handling, because several files hold unbalanced `"`."""
    rows = ((number, line.split("\t")) for number, line in _lines(path, policy, encoding))
    return _table_records(rows, path, header, required, policy)


def _csv_records(path, header, required, policy, encoding="utf-8"):
    lines = _lines(path, policy, encoding)
    numbers = []

    def text() -> Iterator[str]:
        for number, line in lines:
            numbers.append(number)
            yield line + "\n"

    reader = csv.reader(text())
    rows = []
    with _unlimited_csv_fields():
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # the reader resumes at the next line, so skip mode can go on
                policy.bad_row(f"{path}:{numbers[-1]}: malformed CSV ({e})")
                continue
            rows.append((numbers[-1], fields))
    return _table_records(rows, path, header, required, policy)


@contextlib.contextmanager
def _unlimited_csv_fields() -> Iterator[None]:
    """Lift the csv module's field size limit (131,072 characters) while one file is read: a long document in
    one field is ordinary task data, which the input transformation truncates to the context as it does a TSV's.
    The limit is process-wide, so the previous one is put back for other code."""
    previous = csv.field_size_limit(_C_LONG_MAX)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object as a dict, refusing a key that occurs twice, which `json.loads` would resolve silently to
    the last value, as a table would with two columns of one name (`_check_unique_columns`)."""
    counts = collections.Counter(key for key, _ in pairs)
    twice = sorted(key for key, count in counts.items() if count > 1)
    if twice:
        raise ValueError(f"field(s) {twice} occur more than once in the object; give each field a name of its own")
    return dict(pairs)


def _jsonl_records(path, header, required, policy, encoding="utf-8"):
    del header
    for number, line in _lines(path, policy, encoding):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            policy.bad_row(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        except ValueError as e:  # a key twice (`_unique_keys`), or an integer too long for Python to convert
            policy.bad_row(f"{path}:{number}: {e}")
            continue
        if not isinstance(record, dict):
            policy.bad_row(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            continue
        missing = [c for c in required if c not in record]
        if missing:
            policy.bad_row(f"{path}:{number}: no field(s) {missing}; the fields are {sorted(record)}")
            continue
        yield number, record


_RECORDS = {"tsv": _tsv_records, "csv": _csv_records, "jsonl": _jsonl_records}


def _json_kind(value: Any) -> str:
    """A JSON value as its file spells it, with its type (`null`, `an object {"x": 1}`, `a number 3`): the
    user looks for `null` in the file, not Python's `None`."""
    kinds = {type(None): "", dict: "an object ", list: "a list ", bool: "a boolean ", int: "a number ",
             float: "a number "}
    shown = json.dumps(value, ensure_ascii=False)
    return kinds.get(type(value), "") + (shown if len(shown) <= 40 else shown[:37] + "...")


def _not_text(field: str, value: Any) -> str | None:
    """Why a text field's value is unusable, or None. No dataset in shared/data has numeric text, so a
    number there (as much as null, an object or a list) means the wrong field is mapped."""
    if isinstance(value, str):
        return None
    return f"field {field!r} is {_json_kind(value)}, not a string (is the right field mapped?)"


def _not_scalar(field: str, value: Any) -> str | None:
    """Why a label's or id's value is unusable, or None: any JSON scalar (an integer class, a float score, a
    boolean answer) is one, but null, an object or a list is not."""
    if value is not None and not isinstance(value, (dict, list)):
        return None
    return f"field {field!r} is {_json_kind(value)}; it must be a string, a number or a boolean"


def _field_problem(record: dict, texts: Iterable[str | None], scalars: Iterable[str | None]) -> str | None:
    """The first unusable field of a row, or None. Only JSON lines hold non-strings; `str()` would turn them
    into the text "None" or "{'x': 1}" and train on it."""
    problems = [_not_text(f, record[f]) for f in texts if f is not None]
    problems += [_not_scalar(f, record[f]) for f in scalars if f is not None]
    return next((p for p in problems if p), None)


def label_key(raw: Any) -> str:
    """The class a raw label names, spelt one way: stripped of surrounding whitespace, a number by its value
    (`1`, `1.0`, `"1"` and `" 01"` are all "1", `0.50` is "0.5"), a JSON boolean as JSON spells it; "" if empty.

    Hand-made files spell one label several ways (a stray space, a spreadsheet's `1.0` beside `1`); compared
    as written, each spelling became a class of its own and the run trained on the wrong classes, silently."""
    if isinstance(raw, bool):
        return json.dumps(raw)
    text = str(raw).strip()
    if not _NUMBER.fullmatch(text):
        return text
    exact = decimal.Context(prec=len(text), Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)  # never rounds
    number = decimal.Decimal(text).normalize(exact)
    return f"{number:f}" if number else "0"  # "-0" is 0


def _empty_label(record: dict, field: str | None) -> str | None:
    """Why the row's label is unusable for being empty or blank, or None (also when the file has no labels)."""
    if field is not None and not label_key(record[field]):
        return f"field {field!r} is empty: a labelled row needs its label"
    return None


def _parse_label(raw: Any, label_index: dict[str, int] | None, where: str, policy: _Policy) -> int | float | None:
    """The class index of `raw` (by `label_key`); a float when `label_index` is None (regression, STS-B)."""
    if label_index is None:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):  # float() reads "nan" and "inf", which no regression target is
            policy.bad_row(f"{where}: label {raw!r} is not a finite number")
            return None
        return value
    key = label_key(raw)
    if key not in label_index:
        policy.bad_row(f"{where}: label {raw!r} is not one of {list(label_index)}")
        return None
    return label_index[key]


def _parse_choice(raw: Any, choices: Sequence[str], where: str, policy: _Policy) -> int | None:
    """The right answer of a multiple-choice row: the text of one of its choices (stripped), or its 0-based
    index, a number in any spelling (`label_key`)."""
    texts, text = [choice.strip() for choice in choices], str(raw).strip()
    if text in texts:
        return texts.index(text)
    indices = [str(i) for i in range(len(choices))]
    if label_key(raw) in indices:
        return int(label_key(raw))
    policy.bad_row(f"{where}: label {raw!r} is neither an index 0..{len(choices) - 1} nor the text of a choice")
    return None


def table_format(path: str | os.PathLike, format: str | None = None) -> str:
    """`format`, else the file's suffix; one of tsv, csv, jsonl."""
    path = pathlib.Path(path)
    format = format or path.suffix.lstrip(".").lower()
    if format not in _RECORDS:
        raise DataError(f"{path}: unknown format {format!r}; use one of {sorted(_RECORDS)} (a suffix or custom.format)")
    return format


def read_columns(path: str | os.PathLike, *, text_a: str, text_b: str | None = None, label: str | None = None,
                 label_names: Sequence[str] | None = None, uid: str | None = None, format: str | None = None,
                 header: Sequence[str] | None = None, drop_labels: Sequence[str] = (),
                 choices: Sequence[str] | None = None, encoding: str = "utf-8", on_error: str = "raise") -> ReadResult:
    """Classification, pair or multiple-choice data from a TSV, CSV or JSON-lines file, its columns named.

    Works for the task files (GLUE, SNLI, MNLI, SciTail) and for a user's own data. `format` defaults to the
    suffix (.tsv/.csv/.jsonl); `header` names the columns of a file without a header line; `label=None`
    reads an unlabeled file; `label_names` gives the raw label values in index order, compared as `label_key`
    spells them (None: float labels). With `choices` (column names) a row is a multiple-choice example whose
    label is the index or the text of the right choice.
    """
    path = pathlib.Path(path)
    format = table_format(path, format)
    result = ReadResult([])
    policy = _Policy(on_error, result)
    label_index = {label_key(name): i for i, name in enumerate(label_names)} if label_names is not None else None
    text_fields = [c for c in (text_a, text_b, *(choices or ())) if c is not None]
    required = [*text_fields, *(c for c in (label, uid) if c is not None)]
    for row, (number, record) in enumerate(_RECORDS[format](path, header, required, policy, encoding)):
        where = f"{path}:{number}"
        problem = _field_problem(record, text_fields, (label, uid)) or _empty_label(record, label)
        if problem:
            policy.bad_row(f"{where}: {problem}")
            continue
        choice_texts = tuple(str(record[c]) for c in choices) if choices else None
        parsed = None
        if label is not None:
            if label_key(record[label]) in drop_labels:
                result.dropped += 1
                continue
            if choice_texts:
                parsed = _parse_choice(record[label], choice_texts, where, policy)
            else:
                parsed = _parse_label(record[label], label_index, where, policy)
            if parsed is None:
                continue
        texts = {field: str(record[field]) for field in text_fields}
        _note_empty_texts(result, where, texts.items())
        result.examples.append(Example(str(record[uid]) if uid else str(row), texts[text_a], texts.get(text_b),
                                       choice_texts, label=parsed))
    return _logged(result, str(path))


def _note_empty_texts(result: ReadResult, where: str, texts: Iterable[tuple[str, str]]) -> None:
    """Count a row whose text field (name, value) is empty or blank: it is kept, but trains on the special
    tokens alone, which in a real file is most often a cell left blank or the wrong column named."""
    empty = [field for field, text in texts if not text.strip()]
    if empty:
        result.empty_texts.append(f"{where}: empty {', '.join(map(repr, empty))}")


def label_values(path: str | os.PathLike, column: str, *, format: str | None = None,
                 header: Sequence[str] | None = None, encoding: str = "utf-8", on_error: str = "raise") -> list[str]:
    """Every label of one column (or JSON field) of a table as `label_key` spells it, in file order: what a
    user's own label set is made of. An empty label is a bad row, never a class."""
    path = pathlib.Path(path)
    policy = _Policy(on_error, ReadResult([]))
    values = []
    for number, record in _RECORDS[table_format(path, format)](path, header, [column], policy, encoding):
        problem = _field_problem(record, (), (column,)) or _empty_label(record, column)
        if problem:
            policy.bad_row(f"{path}:{number}: {problem}")
            continue
        values.append(label_key(record[column]))
    return values


def table_columns(path: str | os.PathLike, *, format: str | None = None, header: Sequence[str] | None = None,
                  encoding: str = "utf-8") -> list[str]:
    """The column names of a table (its header, or `header`), or the fields of a JSON-lines file's first row."""
    if header is not None:
        return list(header)
    path = pathlib.Path(path)
    records = _RECORDS[table_format(path, format)](path, None, [], _Policy("skip", ReadResult([])), encoding)
    first = next(iter(records), None)
    return list(first[1]) if first else []


def _is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _race_type_problem(article_id, article, questions, options, answers) -> str | None:
    """What is of the wrong JSON type in a RACE record, or None: hand-made files mix up nesting levels."""
    if problem := _not_scalar("id", article_id):
        return problem
    if not isinstance(article, str):
        return f"'article' must be a string, got {type(article).__name__}"
    if not _is_strings(questions):
        return "'questions' must be a list of strings"
    if not (isinstance(options, list) and all(_is_strings(choices) for choices in options)):
        return "'options' must be a list of lists of strings (4 per question)"
    if not _is_strings(answers):
        return "'answers' must be a list of letters A-D"
    return None


def _race_examples(article_id: str, article: str, questions: Sequence[str], options: Sequence[Sequence[str]],
                   answers: Sequence[str], where: str, policy: _Policy) -> Iterator[Example]:
    """One Example per question of a RACE article (the source stores one record per article)."""
    problem = _race_type_problem(article_id, article, questions, options, answers)
    if problem:
        policy.bad_row(f"{where}: {problem}")
        return
    if not len(questions) == len(options) == len(answers):
        policy.bad_row(f"{where}: {len(questions)} questions, {len(options)} option lists, {len(answers)} answers")
        return
    for i, (question, choices, answer) in enumerate(zip(questions, options, answers)):
        if len(choices) != len(_RACE_LETTERS) or answer not in _RACE_LETTERS:
            policy.bad_row(f"{where}: question {i} needs 4 options and an answer in A-D, got "
                           f"{len(choices)} options and answer {answer!r}")
            continue
        yield Example(f"{article_id}-{i}", article, question, tuple(choices), _RACE_LETTERS.index(answer))


def read_race_jsonl(path: str | os.PathLike, on_error: str = "raise") -> ReadResult:
    """RACE, one article per line: `{"id", "article", "questions", "options", "answers"}`."""
    path = pathlib.Path(path)
    result = ReadResult([])
    policy = _Policy(on_error, result)
    fields = ("id", "article", "questions", "options", "answers")
    for number, r in _jsonl_records(path, None, fields, policy):
        result.examples.extend(_race_examples(r["id"], r["article"], r["questions"], r["options"],
                                              r["answers"], f"{path}:{number}", policy))
    return _logged(result, str(path))


def read_story_cloze_csv(path: str | os.PathLike, on_error: str = "raise") -> ReadResult:
    """Story Cloze Test CSV: four context sentences, two endings, `AnswerRightEnding` 1 or 2.

    The context is the four sentences joined by spaces, as TFDS `story_cloze` builds it."""
    path = pathlib.Path(path)
    result = ReadResult([])
    policy = _Policy(on_error, result)
    required = ("InputStoryid", *_STORY_SENTENCES, *_STORY_ENDINGS, "AnswerRightEnding")
    for number, r in _csv_records(path, None, required, policy):
        answer = r["AnswerRightEnding"]
        if answer not in ("1", "2"):
            policy.bad_row(f"{path}:{number}: AnswerRightEnding {answer!r} is not 1 or 2")
            continue
        result.examples.append(Example(r["InputStoryid"], " ".join(r[s] for s in _STORY_SENTENCES),
                                       choices=tuple(r[e] for e in _STORY_ENDINGS), label=int(answer) - 1))
    return _logged(result, str(path))


def _read_columns_file(file: tasks.LocalFile, path: pathlib.Path, spec: tasks.TaskSpec, on_error: str):
    label_names = spec.raw_labels if spec.label_names else None
    return read_columns(path, text_a=file.text_a, text_b=file.text_b, label=file.label, label_names=label_names,
                        uid=file.uid, format=file.format, header=file.header, drop_labels=file.drop_labels,
                        choices=file.choices, encoding=file.encoding, on_error=on_error)


_LOCAL_FORMATS: dict[str, Callable[..., ReadResult]] = {
    "tsv": _read_columns_file,
    "csv": _read_columns_file,
    "jsonl": _read_columns_file,
    "race_jsonl": lambda file, path, spec, on_error: read_race_jsonl(path, on_error),
    "story_cloze_csv": lambda file, path, spec, on_error: read_story_cloze_csv(path, on_error),
}


def local_root(spec: tasks.TaskSpec, split: str, data_root: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder the local file paths of `split` are relative to: a user's own task names its files by
    absolute path; the paper's tasks live under the data root."""
    if all(os.path.isabs(f.path) for f in spec.local[split]):
        return pathlib.Path("/")
    return resolve_data_root(data_root)


def read_local(spec: tasks.TaskSpec, split: str, data_root: str | os.PathLike | None = None,
               on_error: str = "raise") -> ReadResult:
    """The examples of `split` of a task from its local files (see `TaskSpec.local`) under the data root."""
    if split not in spec.local:
        raise DataError(f"task {spec.name!r} has no local {split!r} split (local splits: {sorted(spec.local)}); "
                        f"read it from TFDS with read_tfds (TFDS splits: {sorted(spec.tfds.splits)})")
    root = local_root(spec, split, data_root)
    result = ReadResult([])
    for file in spec.local[split]:
        path = root / file.path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: task {spec.name!r} split {split!r} expects it under the "
                                    f"data root {root} (set ${DATA_ENV} or pass data_root)")
        result.extend(_LOCAL_FORMATS[file.format](file, path, spec, on_error))
    return result


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_columns(record: dict, src: tasks.TfdsTaskSource, spec: tasks.TaskSpec, index: int, where: str,
                  policy: _Policy, result: ReadResult) -> None:
    if isinstance(src.choices, tuple):  # one feature per choice
        choices = tuple(_text(record[c]) for c in src.choices)
    else:  # one feature holding the list of choices
        choices = tuple(_text(c) for c in record[src.choices]) if src.choices else None
    raw = record[src.label].item()
    if isinstance(raw, (bytes, str)):  # a label stored as text: its index among the task's raw labels
        keys = [label_key(name) for name in spec.raw_labels]
        if label_key(_text(raw)) not in keys:
            policy.bad_row(f"{where}: label {_text(raw)!r} is not one of {keys}")
            return
        raw = keys.index(label_key(_text(raw)))
    if not spec.label_names:
        label = float(raw)
    elif raw == -1:  # TFDS marks unlabeled (GLUE test) and gold-less (SNLI) examples with -1
        if src.drop_unlabeled:
            result.dropped += 1
            return
        label = None
    else:
        label = int(raw) + src.label_offset
        n_classes = len(choices) if choices is not None else len(spec.label_names)
        if not 0 <= label < n_classes:
            policy.bad_row(f"{where}: label {raw} out of range for {n_classes} classes")
            return
    uid = _text(record[src.uid]) if src.uid else str(index)
    texts = {field: _text(record[field]) for field in (src.text_a, src.text_b) if field}
    _note_empty_texts(result, where, [*texts.items(), *((f"choice {i}", text) for i, text in enumerate(choices or ()))])
    result.examples.append(Example(uid, texts[src.text_a], texts.get(src.text_b), choices, label))


def _tfds_race(record, src, spec, index, where, policy, result) -> None:
    del spec, index
    questions = [_text(q) for q in record[src.text_b]]
    options = [[_text(o) for o in opts] for opts in record[src.choices]]
    answers = [_text(a) for a in record[src.label]]
    result.examples.extend(_race_examples(_text(record[src.uid]), _text(record[src.text_a]), questions, options,
                                          answers, where, policy))


_TFDS_LAYOUTS = {"columns": _tfds_columns, "race": _tfds_race}


def read_tfds(spec: tasks.TaskSpec, split: str, data_dir: str | None = None, on_error: str = "raise") -> ReadResult:
    """The examples of `split` from TFDS (`tfds.load` + `tfds.as_numpy`), as the same `Example` records."""
    import tensorflow_datasets as tfds  # deferred: importing TensorFlow costs seconds the local path never needs

    src = spec.tfds
    if split not in src.splits:
        raise DataError(f"task {spec.name!r} has no TFDS split {split!r}; TFDS splits: {sorted(src.splits)}")
    result = ReadResult([])
    policy = _Policy(on_error, result)
    for name in src.names:
        dataset = tfds.load(name, split=src.splits[split], data_dir=data_dir)
        for index, record in enumerate(tfds.as_numpy(dataset)):
            _TFDS_LAYOUTS[src.layout](record, src, spec, index, f"{name}[{src.splits[split]}] #{index}", policy,
                                      result)
    return _logged(result, f"{spec.name} TFDS {split}")


def read_task(spec: tasks.TaskSpec, split: str, source: str = "local", *, data_root: str | None = None,
              data_dir: str | None = None, on_error: str = "raise") -> ReadResult:
    """Dispatch on `source` ("local" files under the data root, or "tfds" under `data_dir`)."""
    readers = {"local": lambda: read_local(spec, split, data_root, on_error),
               "tfds": lambda: read_tfds(spec, split, data_dir, on_error)}
    if source not in readers:
        raise ValueError(f"source must be one of {sorted(readers)}, got {source!r}")
    return readers[source]()


def _logged(result: ReadResult, what: str) -> ReadResult:
    if result.skipped or result.repaired:
        logging.warning("%s: skipped %d malformed rows, replaced bad bytes in %d; first: %s", what,
                        result.skipped, result.repaired, result.problems[0])
    if result.dropped:
        logging.info("%s: dropped %d rows without a gold label", what, result.dropped)
    if result.empty_texts:
        logging.warning("%s: %d rows have an empty text field, kept as they are (a blank cell, or the wrong column "
                        "named?); first: %s", what, len(result.empty_texts), result.empty_texts[0])
    return result
