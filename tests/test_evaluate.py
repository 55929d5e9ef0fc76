"""`python -m gpt1_jax.evaluate`: perplexity of a checkpoint on your own text, per document and overall."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt1_jax import evaluate
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
