"""Tests for the GPT-1 tokenizer: exactness against the released pipeline, speed paths, bad input."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt1_jax.text import tokenizer as tk
from gpt1_jax.text import vocab_files

REPO = Path(__file__).resolve().parents[1]
PER_FIELD = 150  # texts per field in the parity sample; every k-th text so the sample spans the file
PARAGRAPHS_PER_BOOK = 15

# The three patterns of text_utils.py's `text_standardize`, character for character as the release's source
# spells them: plain (not raw) string literals, so Python's escape rules apply before `re` sees them.
RELEASED_PUNCTUATION_SOURCE = r"""'''(-+|~+|!+|"+|;+|\?+|\++|,+|\)+|\(+|\\+|\/+|\*+|\[+|\]+|}+|{+|\|+|_+)'''"""
RELEASED_NEWLINE_SOURCE = r"""'\s*\n\s*'"""
RELEASED_OTHER_SPACE_SOURCE = r"""'[^\S\n]+'"""
# Strings on which the released standardisation is easy to get wrong: every listed character alone, in
# runs and in mixed runs, backslashes (never spaced by the release) next to each of them, and whitespace.
TRICKY_STANDARDIZE_TEXTS = [
    *'-~!";?+,)(\\/*[]}{|_', "a\\b c", "\\", "\\\\", "C:\\Users\\x", "\\n", "x \\ y", "a--b", "-~", "--~~-",
    "+\\+", "\\++", "a+++b", "\\(a\\)", "\\[x\\]", "(-_-)", "[{}]", "|||", "?!?!", "**/*", ",,;;",
    '"\\"q\\""', ":-\\", "\u2014\\\u2026\u00b4", "a \t\n\n \\ b", "  \\  ", "~\\~", "_\\_", "//\\\\//",
]


def _data_root() -> Path:
    return Path(os.environ.get("GPT1_JAX_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="module")
def tok() -> tk.GPT1Tokenizer:
    return tk.GPT1Tokenizer.from_files(_data_root() / "gpt1_vocab")


def _spread(texts: list[str], n: int = PER_FIELD) -> list[str]:
    return texts[:: max(1, len(texts) // n)][:n]


def _tsv(path: Path, columns: list[int], header: bool = True) -> list[list[str]]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1 if header else 0:]]
    return [[row[c] for row in rows if len(row) > max(columns)] for c in columns]


def parity_sample(root: Path) -> dict[str, list[str]]:
    """Deterministic sample of every text field of the shared dev data (and Gutenberg paragraphs)."""
    fields: dict[str, list[str]] = {}
    glue = root / "glue"
    for name, file, cols, header in [
        ("SST-2", "SST-2/dev.tsv", [0], True), ("CoLA", "CoLA/dev.tsv", [3], False),
        ("MRPC", "MRPC/dev.tsv", [3, 4], True), ("STS-B", "STS-B/dev.tsv", [7, 8], True),
        ("RTE", "RTE/dev.tsv", [1, 2], True), ("QNLI", "QNLI/dev.tsv", [1, 2], True),
    ]:
        for col, texts in zip(cols, _tsv(glue / file, cols, header)):
            fields[f"{name}[{col}]"] = _spread(texts)
    for name, file in [("SNLI", "snli/dev.jsonl"), ("MultiNLI", "mnli/dev.jsonl")]:
        rows = [json.loads(line) for line in (root / file).read_text(encoding="utf-8").splitlines()]
        for key in ("premise", "hypothesis"):
            fields[f"{name}.{key}"] = _spread([r[key] for r in rows])
    for col, texts in zip([0, 1], _tsv(root / "scitail/scitail_1.0_dev.tsv", [0, 1], header=False)):
        fields[f"SciTail[{col}]"] = _spread(texts)
    race = [json.loads(line) for line in (root / "race/dev-middle.jsonl").read_text(encoding="utf-8").splitlines()]
    fields["RACE.article"] = _spread([r["article"] for r in race], 60)
    fields["RACE.question"] = _spread([q for r in race for q in r["questions"]])
    fields["RACE.option"] = _spread([o for r in race for opts in r["options"] for o in opts])
    cloze = root / "story_cloze/cloze_test_val__spring2016 - cloze_test_ALL_val.csv"
    with cloze.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for key in list(rows[0])[1:7]:
        fields[f"StoryCloze.{key}"] = _spread([r[key] for r in rows])
    for book in sorted((root / "corpus/gutenberg").glob("*.txt")):
        text = book.read_bytes().decode("utf-8", errors="replace")
        fields[f"gutenberg/{book.name}"] = _spread([p for p in text.split("\r\n\r\n") if p.strip()],
                                                   PARAGRAPHS_PER_BOOK)
    return fields


@pytest.mark.slow
def test_parity_with_transformers_slow_tokenizer(tok):
    """>= 99.9% of sampled texts get exactly the ids of transformers' slow (ftfy + spaCy) tokenizer."""
    from benchmarks.tokenizer import slow_reference_encode

    fields = parity_sample(_data_root())
    # The one known deliberate difference: transformers writes the punctuation pattern as a raw string and so
    # spaces backslashes, the release does not (see tk._PUNCTUATION_RUNS); texts with a backslash are left out.
    texts = [t for field in fields.values() for t in field if "\\" not in t]
    try:
        reference = slow_reference_encode(texts, _data_root() / "gpt1_vocab")
    except RuntimeError as err:
        pytest.skip(str(err))
    ours = tok.encode_batch(texts)
    same = [a == b for a, b in zip(ours, reference["ids"])]
    api_same = sum(a == b for a, b in zip(ours, reference["api_ids"])) / len(texts)
    rate = sum(same) / len(texts)
    print(f"\nparity with slow pipeline: {rate:.5f} over {len(texts)} texts in {len(fields)} fields; "
          f"with its public encode(): {api_same:.5f}")
    for text, ok in zip(texts, same):
        if not ok:
            print("differs:", repr(text[:120]))
    assert rate >= 0.999


def released_literal(source: str) -> str:
    """The string a plain literal of text_utils.py evaluates to, as the release's Python built it.

    Unknown escapes such as `\\?` keep their backslash (Python warns about them: DeprecationWarning, a
    SyntaxWarning from 3.12, silenced here) and `\\\\` becomes one backslash.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.literal_eval(source)


def released_standardize(text: str) -> str:
    """text_utils.py's `text_standardize`, its regexes taken from the release's source text."""
    text = text.replace("\u2014", "-").replace("\u2013", "-").replace("\u2015", "-")
    text = text.replace("\u2026", "...").replace("\u00b4", "'")
    text = re.sub(released_literal(RELEASED_PUNCTUATION_SOURCE), r" \1 ", text)
    text = re.sub(released_literal(RELEASED_NEWLINE_SOURCE), " \n ", text)
    text = re.sub(released_literal(RELEASED_OTHER_SPACE_SOURCE), " ", text)
    return text.strip()


def test_released_pattern_never_matches_a_backslash():
    """The plain literal turns the release's `\\\\+` into `\\+`: one literal '+' (never reached after `\\++`)."""
    pattern = released_literal(RELEASED_PUNCTUATION_SOURCE)
    assert pattern == r"""(-+|~+|!+|"+|;+|\?+|\++|,+|\)+|\(+|\+|\/+|\*+|\[+|\]+|}+|{+|\|+|_+)"""
    assert re.search(pattern, "a\\b\\\\c") is None


@pytest.mark.parametrize("text", TRICKY_STANDARDIZE_TEXTS)
def test_standardize_matches_released_code(text):
    assert tk.standardize(text) == released_standardize(text)


def test_backslashes_are_not_spaced_and_mixed_runs_are_split():
    assert tk.standardize("a\\b c") == "a\\b c"
    assert tk.standardize("x--\\\\--y") == "x -- \\\\ -- y"
    assert tk._PUNCTUATION_RUNS.sub(r" \1 ", "--~") == " --  ~ "  # one run per character, as `(-+|~+|...)`


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('-~!";?+,)(\\/*[]}{|_ab \n\t.\'')), max_size=40))
def test_punctuation_regex_equals_released_alternation(text):
    """Exact substitution output, spaces included, so mixed runs such as "-~" are checked too."""
    released = released_literal(RELEASED_PUNCTUATION_SOURCE)
    assert tk._PUNCTUATION_RUNS.sub(r" \1 ", text) == re.sub(released, r" \1 ", text)


def test_backslash_word_is_one_bpe_word(tok):
    """`a\\b` reaches BPE whole, as in the release; transformers would encode `a`, `\\`, `b`."""
    assert tok.words("a\\b c") == ["a\\b", "c"]
    assert tok.encode("a\\b c") == tok.python_word_ids("a\\b") + tok.python_word_ids("c")
    assert tok.encode("a\\b c") != tok.encode("a \\ b c")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=60))
def test_ftfy_skip_is_exact(text):
    import ftfy

    assert tk.fix_text(text) == ftfy.fix_text(text)


def test_known_ids(tok):
    assert tok.encode("") == []
    assert tok.encode("Hello world!\n\nIt's") == [3570, 1276, 267, 40477, 507, 535]
    assert tok.decode([tk.START_ID, 3570, tk.DELIMITER_ID, 1276, tk.CLASSIFY_ID]) == (
        "_start_ hello _delimiter_ world _classify_")
    assert (tk.VOCAB_SIZE, tk.N_SPECIAL) == (len(tok.encoder), 3)


def test_rust_bpe_equals_python_bpe_on_real_words(tok):
    words = {w for t in parity_sample(_data_root())["MultiNLI.premise"] for w in tok.words(t)}
    words |= {"supercalifragilistic", "naïve", "日本語", "x", "\u200b", "'s", "aaaaaaa"}
    assert {w: tok.word_ids(w) for w in words} == {w: tok.python_word_ids(w) for w in words}


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=20).filter(lambda w: not any(c.isspace() for c in w)))
def test_rust_bpe_equals_python_bpe_on_any_word(tok, word):
    assert tok.word_ids(word) == tok.python_word_ids(word)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["Mr.", "U.S.", "can't", "e.g.", "a", "B", "1", ".", ",", "'", "-", '"', "?",
                                 "(", ")", "$", "%", ":", " ", "\n", "\t", "http://x.org", ":)", "&amp;", "é"]),
                max_size=30).map("".join))
def test_chunk_cache_equals_whole_text_spacy(tok, text):
    """Encoding chunk by chunk (the fast path) gives the ids of spaCy on the whole text."""
    expected = [i for w in tok.words(text) for i in tok.python_word_ids(w)]
    assert tok.encode(text) == expected


def test_round_trip_keeps_words(tok):
    texts = parity_sample(_data_root())["SNLI.premise"] + ["It's a test \u2014 isn't it\u2026 (yes)!"]
    checked = 0
    for text, ids in zip(texts, tok.encode_batch(texts)):
        if tk.UNK_ID in ids:
            continue
        assert tok.decode(ids) == " ".join(tok.words(text))
        checked += 1
    assert checked > len(texts) // 2


def test_batch_equals_single_and_parallel(tok):
    texts = parity_sample(_data_root())["RACE.article"][:20]
    single = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_workers=1) == single
    parallel = list(tok._encode_parallel(texts, 2))
    assert parallel == single


def test_workers_that_die_at_start_up_stop_the_script_with_what_to_do(tmp_path):
    """A script with no `__main__` guard re-runs itself in each spawned worker, which Python stops at once: the
    caller gets an error saying so, where a multiprocessing.Pool would start new workers forever."""
    script = tmp_path / "unguarded.py"
    script.write_text("from gpt1_jax.text.tokenizer import GPT1Tokenizer\n"
                      f"tok = GPT1Tokenizer.from_files({str((_data_root() / 'gpt1_vocab').resolve())!r})\n"
                      "print(list(tok._encode_parallel(['one text', 'and another'], 2)))\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert 'put that under `if __name__ == "__main__":`' in result.stderr.splitlines()[-1], result.stderr[-3000:]


@settings(max_examples=100, deadline=2000)
@given(st.text(max_size=200))
def test_any_text_encodes_and_decodes(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tk.VOCAB_SIZE for i in ids)
    tok.decode(ids)


def test_long_and_hostile_text(tok, tmp_path):
    text = ("Ünïcödé \x00\x07\x1b[31m control \ufffd Ελληνικά русский 中文 عربى " * 2000) + "x" * 50_000
    ids = tok.encode(text)
    assert len(ids) > 10_000
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xe9 \xff\xfe ok\n" + text.encode("utf-8"))
    assert tok.encode_file(path)[:1] == tok.encode("caf\ufffd")[:1]


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match="outside the GPT-1 vocabulary"):
        tok.decode([tk.CLASSIFY_ID + 1])


def test_fingerprint_tracks_vocab_bytes(tok, tmp_path):
    src = _data_root() / "gpt1_vocab"
    for name in vocab_files.VOCAB_FILES:
        (tmp_path / name).write_bytes((src / name).read_bytes())
    assert tk.GPT1Tokenizer.from_files(tmp_path).fingerprint == tok.fingerprint
    with (tmp_path / vocab_files.MERGES_FILE).open("a", encoding="utf-8") as f:
        f.write("q u\n")
    assert tk.GPT1Tokenizer.from_files(tmp_path).fingerprint != tok.fingerprint


def test_vocab_lookup_order_and_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(vocab_files.VOCAB_ENV, raising=False)
    monkeypatch.setenv(vocab_files.DATA_ENV, str(_data_root()))
    assert vocab_files.find_vocab_dir(allow_download=False) == _data_root() / "gpt1_vocab"
    monkeypatch.setenv(vocab_files.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(vocab_files.VocabFilesNotFoundError, match="encoder_bpe_40000.json and vocab_40000.bpe"):
        vocab_files.find_vocab_dir(allow_download=False)
    with pytest.raises(vocab_files.VocabFilesNotFoundError, match="explicit vocab_dir"):
        vocab_files.find_vocab_dir(tmp_path)
