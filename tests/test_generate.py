"""KV-cache generation: parity with full recomputation and with transformers, sampling, the window sliding
past n_ctx, and the CLI."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

from gpt1_jax.generate import main
from gpt1_jax.model.sampling import generate, sample_logits
from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.training import checkpoint
from gpt1_jax.weights.weight_formats import load_hf, model_from_params, params_of

PROMPTS = np.array([[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]])  # [batch, seq]
N_NEW = 10


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tiny random transformers model and the same weights loaded as ours.

    Weights are drawn far wider than the N(0, 0.02) init (and LayerNorm gains away from 1) so that
    greedy decoding does not collapse to one repeated token and the comparison sees varied logits.
    """
    torch.manual_seed(0)
    hf = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=100, n_positions=32, n_embd=32, n_layer=2,
                                              n_head=4)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0)
    folder = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(folder)
    return hf, model_from_params(*load_hf(folder))


def wide_random_model(n_ctx: int, seed: int = 0) -> GPT1:
    """Our tiny model with weights from N(0, 0.3) and LayerNorm gains from N(1, 0.5), wide enough (like
    `hf_pair`'s) that greedy decoding keeps varying past the context instead of repeating one token."""
    cfg = GPT1Config(vocab_size=100, n_ctx=n_ctx, width=32, n_head=4, n_layer=2, mlp_width=128)
    rng = np.random.default_rng(seed)

    def draw(path, a):
        mean, std = (1.0, 0.5) if jax.tree_util.keystr(path).endswith("['scale']") else (0.0, 0.3)  # LayerNorm gains
        return (mean + std * rng.standard_normal(a.shape)).astype(np.float32)

    return model_from_params(cfg, jax.tree_util.tree_map_with_path(draw, params_of(GPT1(cfg, rngs=nnx.Rngs(seed)))))


def greedy_pick(logits, step):
    return jnp.argmax(logits, axis=-1)


def recompute(model, prompts, n_new, pick=greedy_pick):
    """Reference decoding without a cache: each token from model(...) over the last n_ctx tokens at most.

    pick(logits [batch, vocab], step) -> tokens [batch]. The window sits left-aligned in a fixed
    [batch, n_ctx] buffer (causal attention never reads the unfilled right part), so the reference
    compiles once.
    """
    n_ctx = model.config.n_ctx
    full_logits = nnx.jit(lambda m, tokens: m.logits(m(tokens)))
    seq = np.asarray(prompts, np.int32)  # [batch, prompt + new so far]
    for step in range(n_new):
        window = seq[:, -n_ctx:]
        buffer = np.zeros((seq.shape[0], n_ctx), np.int32)  # [batch, n_ctx]
        buffer[:, :window.shape[1]] = window
        logits = full_logits(model, jnp.asarray(buffer))[:, window.shape[1] - 1]  # [batch, vocab]
        seq = np.concatenate([seq, np.asarray(pick(logits, step), np.int32)[:, None]], axis=1)
    return seq[:, prompts.shape[1]:]


def test_cached_greedy_equals_recomputation(hf_pair):
    _, model = hf_pair
    cached = generate(model, PROMPTS, max_new_tokens=N_NEW, greedy=True)
    assert len(set(cached.ravel().tolist())) > 2  # a non-degenerate sequence
    np.testing.assert_array_equal(cached, recompute(model, PROMPTS, N_NEW))


def test_greedy_matches_transformers(hf_pair):
    hf, model = hf_pair
    with torch.no_grad():
        expected = hf.generate(torch.tensor(PROMPTS), attention_mask=torch.ones(PROMPTS.shape, dtype=torch.long),
                               max_new_tokens=N_NEW, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(generate(model, PROMPTS, max_new_tokens=N_NEW, greedy=True),
                                  expected[:, PROMPTS.shape[1]:])


def test_sampling_is_seeded_and_top_k_1_is_greedy(hf_pair):
    _, model = hf_pair
    key = jax.random.key(7)
    first = generate(model, PROMPTS, max_new_tokens=N_NEW, key=key, temperature=1.5, top_p=0.9)
    again = generate(model, PROMPTS, max_new_tokens=N_NEW, key=key, temperature=1.5, top_p=0.9)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(generate(model, PROMPTS, max_new_tokens=N_NEW, key=key, top_k=1),
                                  generate(model, PROMPTS, max_new_tokens=N_NEW, greedy=True))


def sampling_pick(key, n_new, **sampling):
    """The draws `generate` makes with `key`: step i samples with the i-th of n_new split keys."""
    keys = jax.random.split(key, n_new)
    return lambda logits, step: sample_logits(logits, keys[step], **sampling)


@pytest.mark.parametrize("sampling", [
    pytest.param(dict(greedy=True), id="greedy"),
    pytest.param(dict(temperature=1.5, top_p=0.9), id="top_p"),
])
def test_generation_past_n_ctx_slides_the_window_and_equals_recomputing_the_last_window(sampling):
    model = wide_random_model(n_ctx=16)
    prompts = np.random.default_rng(1).integers(0, 100, (2, 10))  # [batch, seq]
    key = jax.random.key(3)
    pick = greedy_pick if sampling.get("greedy") else sampling_pick(key, 40, temperature=1.5, top_p=0.9)
    new = generate(model, prompts, max_new_tokens=40, key=key, **sampling)
    assert new.shape == (2, 40) and all(len(set(row[20:].tolist())) > 2 for row in new)  # not stuck on one
    np.testing.assert_array_equal(new, recompute(model, prompts, 40, pick))


def test_a_prompt_longer_than_n_ctx_keeps_its_last_tokens_with_a_warning(caplog):
    model = wide_random_model(n_ctx=16)
    prompt = np.arange(20) % 100
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.model.sampling"):
        new = generate(model, prompt, max_new_tokens=5, greedy=True)
    assert "The prompt has 20 tokens but model.n_ctx is 16: generating from its last 16 tokens" in caplog.text
    np.testing.assert_array_equal(new, generate(model, prompt[-16:], max_new_tokens=5, greedy=True))


def test_cli_generates_from_orbax_checkpoint(tmp_path, capsys, data_root):
    cfg = GPT1Config(n_ctx=16, width=8, n_head=2, n_layer=1, mlp_width=16)
    checkpoint.save_pretrained(tmp_path / "ckpt", GPT1(cfg, rngs=nnx.Rngs(0)))
    main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "The quick brown fox", "--max_new_tokens", "4",
          "--top_k", "5", "--seed", "3", "--vocab_dir", str(data_root / "gpt1_vocab")])
    words = capsys.readouterr().out.split()
    assert words[:4] == ["the", "quick", "brown", "fox"] and len(words) >= 5


def test_a_prompt_byte_that_is_not_utf8_is_named_in_a_warning(tmp_path, capsys, caplog, data_root):
    """Python keeps a command-line byte that is not UTF-8 (a Latin-1 terminal's "é", 0xe9) as the surrogate
    U+DCE9, which the tokenizer silently read as U+FFFD."""
    cfg = GPT1Config(n_ctx=16, width=8, n_head=2, n_layer=1, mlp_width=16)
    checkpoint.save_pretrained(tmp_path / "ckpt", GPT1(cfg, rngs=nnx.Rngs(0)))
    prompt = b"caf\xe9 au lait, cr\xe8me".decode("utf-8", errors="surrogateescape")  # as sys.argv holds it
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.generate"):
        main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", prompt, "--max_new_tokens", "2", "--greedy",
              "--vocab_dir", str(data_root / "gpt1_vocab")])
    assert [record.getMessage() for record in caplog.records if record.name == "gpt1_jax.generate"] == [
        "--prompt holds 2 byte(s) that are not UTF-8 (0xe9 at character 3, 0xe8 at character 16, counting from 0), "
        "each read as U+FFFD; give the prompt in UTF-8 (is the terminal's encoding UTF-8?)."]
    assert capsys.readouterr().out.startswith("caf \N{REPLACEMENT CHARACTER} au lait")


def test_a_fine_tuned_backbone_generates_text_tokens_only(tmp_path):
    """A fine-tuning checkpoint's backbone has 3 special-token rows the tokenizer cannot write: dropped."""
    from gpt1_jax.finetuning import tasks
    from gpt1_jax.model import heads
    from gpt1_jax.weights.loading import load_model

    config = GPT1Config(vocab_size=50, n_special=3, n_ctx=16, width=32, n_head=2, n_layer=1, mlp_width=64,
                        vocab_pad_multiple=1)
    backbone = GPT1(config, rngs=nnx.Rngs(0))
    direction = np.random.default_rng(0).normal(size=32)
    table = np.array(backbone.tokens_embed[...])
    table[50], table[51] = 30 * direction, -30 * direction  # one of them wins every argmax
    backbone.tokens_embed[...] = jnp.asarray(table)
    assert generate(backbone, np.array([1, 2, 3]), max_new_tokens=20, greedy=True).max() >= 50
    task_model = heads.TaskModel(backbone, tasks.CLASSIFICATION, 2, clf_dropout=0.1, rngs=nnx.Rngs(1))
    saver = checkpoint.TrainCheckpointer(tmp_path, keep=1, async_save=False)
    saver.save(3, nnx.to_pure_dict(nnx.state(task_model, nnx.Param)), {"step": np.int32(3)},
               {"model_config": config.to_dict(), "kind": "finetune"})
    saver.close()
    model = load_model(str(tmp_path))
    assert model.config.n_special == 0
    new = generate(model, np.array([1, 2, 3]), max_new_tokens=20, greedy=True)
    assert new.max() < 50
