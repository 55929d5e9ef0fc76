"""`python -m gpt1_jax.evaluate`: perplexity of a checkpoint on your own text, per document and overall."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt1_jax import evaluate
from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.text.tokenizer import GPT1Tokenizer
from gpt1_jax.training import checkpoint
from gpt1_jax.weights.weight_formats import model_from_params

UNSEEN_BOOKS = "local:corpus/gutenberg/1[12][05]*-0.txt"  # 1155 and 120: not among the tiny recipe's books


def parse(output: str) -> dict[str, tuple[int, float, float]]:
    rows = {}
    for line in output.splitlines()[1:]:
        if line.startswith("("):
            continue
        name, tokens, perplexity, unigram = line.rsplit(maxsplit=3)
        rows[name.strip()] = (int(tokens.replace(",", "")), float(perplexity), float(unigram))
    return rows


@pytest.mark.slow
def test_books_it_never_saw_get_a_perplexity_below_the_unigram_baseline(tiny_pretraining, data_root, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    evaluate.main(["--checkpoint", str(tiny_pretraining / "checkpoints"), "--data", UNSEEN_BOOKS])
    rows = parse(capsys.readouterr().out)
    books = {name: row for name, row in rows.items() if name != "overall"}
    assert len(books) == 2 and all(name.endswith(("1155-0.txt", "120-0.txt")) for name in books)
    tokens, perplexity, unigram = rows["overall"]
    assert tokens == sum(row[0] for row in books.values()) > 10_000
    assert math.isfinite(unigram) and perplexity < 0.8 * unigram  # the tiny model beats word frequencies
    n_ctx = checkpoint.read_metadata(tiny_pretraining / "checkpoints")["model_config"]["n_ctx"]
    for count, book_perplexity, book_unigram in books.values():
        assert book_perplexity < book_unigram and count % n_ctx == 0  # whole windows of the model's context


def test_a_documents_perplexity_is_the_mean_next_token_nll_of_its_windows(tiny_model):
    """Window by window, the same number as a plain log-softmax over the model's logits."""
    model, tokenizer = tiny_model
    text = "it was a bright cold day in april , and the clocks were striking thirteen . " * 20
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    nll, count, windows = evaluate.document_nll(model, tokens, batch_size=2)
    n_ctx = model.config.n_ctx
    assert count == (tokens.size - 1) // n_ctx * n_ctx
    expected = 0.0
    for start in range(0, count, n_ctx):
        window = jnp.asarray(tokens[start:start + n_ctx + 1])  # [n_ctx + 1]
        log_probs = jax.nn.log_softmax(model.logits(model(window[None, :-1]))[0], axis=-1)  # [n_ctx, vocab]
        expected -= float(log_probs[jnp.arange(n_ctx), window[1:]].sum())
    assert nll == pytest.approx(expected, rel=1e-4)


def test_a_document_shorter_than_one_window_counts_no_tokens(tiny_model):
    model, _ = tiny_model
    assert evaluate.document_nll(model, np.arange(10, dtype=np.int32), batch_size=2) == (0.0, 0, [])


@pytest.fixture(scope="module")
def tiny_model(tiny_pretraining):
    config, params, _ = checkpoint.load_pretrained(tiny_pretraining / "checkpoints")
    return model_from_params(config, params), GPT1Tokenizer.from_files()


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> str:
    """A random 16-token-context model without training data: its unigram baseline is unknown."""
    folder = tmp_path_factory.mktemp("random_checkpoint")
    checkpoint.save_pretrained(folder, GPT1(GPT1Config(n_ctx=16, width=16, n_head=2, n_layer=1, mlp_width=32),
                                            rngs=nnx.Rngs(0)))
    return str(folder)


def evaluate_texts(folder, texts: dict[str, str], checkpoint_dir: str) -> None:
    """`gpt1-evaluate` on one file per text of `texts` (file name: text) written into `folder`."""
    folder.mkdir()
    for name, text in texts.items():
        (folder / name).write_text(text)
    evaluate.main(["--checkpoint", checkpoint_dir, "--data", f"files:{folder}/*.txt", "--batch_size", "2"])


A_TEXT = "it was a bright cold day in april , and the clocks were striking thirteen . " * 6  # about 100 tokens


def test_empty_and_whitespace_files_are_named_in_a_warning_and_left_out_of_the_table(tmp_path, random_checkpoint,
                                                                                     capsys, caplog):
    """They printed a row of 0 tokens and perplexity nan, and the run exited 0 as if all was well."""
    texts = {"a_empty.txt": "", "b_blank.txt": " \n\t \n", "c_short.txt": "a few words .", "d_book.txt": A_TEXT}
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.evaluate"):
        evaluate_texts(tmp_path / "docs", texts, random_checkpoint)
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows[1:-1]] == [str(tmp_path / "docs" / "d_book.txt"), "overall"]
    assert "nan" not in "".join(rows)
    warned = [record.getMessage() for record in caplog.records if record.name == "gpt1_jax.evaluate"]
    assert warned == [f"{tmp_path / 'docs' / 'a_empty.txt'} holds no text: left out of the table.",
                      f"{tmp_path / 'docs' / 'b_blank.txt'} holds no text: left out of the table.",
                      f"{tmp_path / 'docs' / 'c_short.txt'} has 4 tokens, fewer than one window (n_ctx + 1 = 17): "
                      "left out of the table."]


def test_files_that_all_hold_no_text_are_one_error_line_and_exit_2(tmp_path, random_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_texts(tmp_path / "docs", {"a_empty.txt": "", "b_blank.txt": "\n \n"}, random_checkpoint)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --data files:{tmp_path / 'docs'}/*.txt: none of the 2 documents holds text to score: each is "
        "empty, whitespace, or shorter than one window of n_ctx + 1 = 17 tokens.")


def test_tokenizing_and_scoring_show_progress_on_stderr(tmp_path, random_checkpoint, capsys):
    """11 books ran 11 minutes on 2 cores with no output before the table."""
    evaluate_texts(tmp_path / "docs", {"a.txt": A_TEXT, "b.txt": A_TEXT * 2}, random_checkpoint)
    captured = capsys.readouterr()
    bars = {line.split(":")[0]: line for line in captured.err.replace("\r", "\n").splitlines() if "|" in line}
    assert "2/2 [" in bars["Tokenizing"] and "doc" in bars["Tokenizing"]
    assert "batch" in bars["Scoring"] and "Tokenizing" not in captured.out and "Scoring" not in captured.out


def test_the_unigram_column_is_a_dash_when_the_training_data_is_not_cached(tmp_path, random_checkpoint, capsys):
    """It printed nan on every row."""
    evaluate_texts(tmp_path / "docs", {"a.txt": A_TEXT}, random_checkpoint)
    rows = parse_unscored_unigram(capsys.readouterr().out)
    assert [unigram for _, _, unigram in rows] == ["-", "-"]
    assert all(math.isfinite(perplexity) for _, perplexity, _ in rows)


def parse_unscored_unigram(output: str) -> list[tuple[int, float, str]]:
    """(tokens, perplexity, unigram column) of each row of the table, once its note says the baseline is unknown."""
    lines = output.splitlines()
    assert lines[-1] == "(unigram: the checkpoint's training data is not cached on this machine)"
    return [(int(tokens.replace(",", "")), float(perplexity), unigram)
            for tokens, perplexity, unigram in (line.rsplit(maxsplit=3)[1:] for line in lines[1:-1])]
