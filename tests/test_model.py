"""The GPT-1 network: structure, parameter count, dropout sites, scan vs unrolled, special tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt1_jax.model.transformer import GPT1, Block, GPT1Config, count_params
from gpt1_jax.weights.weight_formats import model_from_params, params_of

TINY = GPT1Config(vocab_size=300, n_ctx=32, width=48, n_head=4, n_layer=3, mlp_width=96, vocab_pad_multiple=128)


def tokens(batch=2, seq=16, high=300, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, (batch, seq)), jnp.int32)


def test_parameter_count_of_gpt1_is_the_papers():
    abstract = nnx.eval_shape(lambda: GPT1(GPT1Config(vocab_pad_multiple=1), rngs=nnx.Rngs(0)))
    assert count_params(abstract) == 116_534_784
    with_specials = nnx.eval_shape(lambda: GPT1(GPT1Config(n_special=3, vocab_pad_multiple=1), rngs=nnx.Rngs(0)))
    assert count_params(with_specials) == 116_534_784 + 3 * 768


def test_init_is_normal_002_with_zero_biases_and_unit_gains():
    model = GPT1(GPT1Config(vocab_size=2000, n_layer=2, width=128, n_head=2, mlp_width=512, n_ctx=64), rngs=nnx.Rngs(0))
    assert abs(float(jnp.std(model.tokens_embed[...])) - 0.02) < 1e-3
    assert abs(float(jnp.std(model.blocks.mlp.fc.kernel[...])) - 0.02) < 1e-3
    assert float(jnp.abs(model.blocks.attn.qkv.bias[...]).max()) == 0.0
    assert float(jnp.abs(model.blocks.ln_2.scale[...] - 1).max()) == 0.0
    # Each layer is drawn independently, not copied.
    kernels = model.blocks.attn.qkv.kernel[...]
    assert kernels.shape[0] == 2 and not np.allclose(kernels[0], kernels[1])


def test_parameter_paths_shapes_and_dtypes_match_saved_checkpoints():
    """Checkpoints store the state by these paths; any change would strand every existing checkpoint."""
    state = nnx.to_pure_dict(nnx.state(GPT1(TINY, rngs=nnx.Rngs(0)), nnx.Param))
    layout = {jax.tree_util.keystr(path, simple=True, separator="/"): (leaf.shape, leaf.dtype)
              for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
    f32 = jnp.float32
    assert layout == {
        "tokens_embed": ((384, 48), f32), "positions_embed": ((32, 48), f32),
        "blocks/attn/qkv/kernel": ((3, 48, 144), f32), "blocks/attn/qkv/bias": ((3, 144), f32),
        "blocks/attn/proj/kernel": ((3, 48, 48), f32), "blocks/attn/proj/bias": ((3, 48), f32),
        "blocks/ln_1/scale": ((3, 48), f32), "blocks/ln_1/bias": ((3, 48), f32),
        "blocks/mlp/fc/kernel": ((3, 48, 96), f32), "blocks/mlp/fc/bias": ((3, 96), f32),
        "blocks/mlp/proj/kernel": ((3, 96, 48), f32), "blocks/mlp/proj/bias": ((3, 48), f32),
        "blocks/ln_2/scale": ((3, 48), f32), "blocks/ln_2/bias": ((3, 48), f32),
    }


def _one_block(dtype: str) -> Block:
    """An unstacked block with gains and biases away from 1 and 0, so every term of the layers counts."""
    block = Block(TINY.replace(dtype=dtype), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for layer in (block.ln_1, block.ln_2, block.attn.qkv, block.mlp.fc):
        layer.bias[...] = jnp.asarray(rng.normal(0.0, 0.3, layer.bias.shape), jnp.float32)
    block.ln_1.scale[...] = jnp.asarray(rng.normal(1.0, 0.3, (TINY.width,)), jnp.float32)
    return block


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_casts_float32_parameters_to_the_compute_dtype(dtype):
    block = _one_block(dtype)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, TINY.width)), dtype)
    kernel, bias = block.attn.qkv.kernel[...], block.attn.qkv.bias[...]
    assert kernel.dtype == bias.dtype == jnp.float32
    out = block.attn.qkv(x)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(out, x @ kernel.astype(dtype) + bias.astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_statistics_are_float32_two_pass_with_epsilon_1e_5(dtype):
    """A common offset of 30 makes E[x^2] - E[x]^2 lose ~1e-4 of the variance to cancellation, and bf16
    statistics or gains lose ~1e-2; only the released code's float32 E[(x - E[x])^2] stays within 2e-5."""
    block = _one_block(dtype)
    x = jnp.asarray(30.0 + np.random.default_rng(3).normal(size=(4, TINY.width)), dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    scale, bias = (np.asarray(p[...], np.float64) for p in (block.ln_1.scale, block.ln_1.bias))
    want = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + 1e-5) * scale + bias
    got = block.ln_1(x)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    assert block(x[None])[0].dtype == jnp.dtype(dtype)  # the block returns to the compute dtype


def test_mlp_uses_the_tanh_approximation_of_gelu():
    """The released code's gelu is 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); the exact erf form
    differs from it by up to ~1e-3, far above this tolerance."""
    block = _one_block("float32")
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, TINY.width)), jnp.float32)
    h = block.mlp.fc(x)
    gelu = 0.5 * h * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))
    np.testing.assert_allclose(block.mlp(x), block.mlp.proj(gelu), atol=1e-6)


def test_scanned_and_unrolled_layers_give_the_same_output():
    scanned = GPT1(TINY, rngs=nnx.Rngs(0))
    unrolled = model_from_params(TINY.replace(layers="unrolled"), params_of(scanned))
    x = tokens()
    np.testing.assert_allclose(scanned(x), unrolled(x), atol=1e-6)
    key = jax.random.key(3)
    np.testing.assert_allclose(scanned(x, dropout_key=key), unrolled(x, dropout_key=key), atol=1e-6)


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_cached_forward_equals_one_uncached_pass(layers):
    """A prefill of the prompt, then one token at a time through the key/value cache, gives the
    hidden states of a single uncached pass over the whole sequence."""
    model = GPT1(TINY.replace(layers=layers), rngs=nnx.Rngs(0))
    x = tokens(seq=12)
    hidden, cache = model(x[:, :8], cache=model.init_cache(2))
    steps = [hidden]  # [batch, 8, width], then [batch, 1, width] per step
    for t in range(8, 12):
        hidden, cache = model(x[:, t:t + 1], cache=cache, start=t)
        steps.append(hidden)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), model(x), atol=1e-5)


def test_remat_does_not_change_outputs_or_gradients():
    model = GPT1(TINY, rngs=nnx.Rngs(0))
    remat = model_from_params(TINY.replace(remat="full"), params_of(model))
    x = tokens()

    def loss(m):
        return jnp.mean(m.logits(m(x, dropout_key=jax.random.key(0)))[..., :300] ** 2)

    g1, g2 = nnx.grad(loss)(model), nnx.grad(loss)(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_eval_mode_is_deterministic_and_dropout_is_active_in_training():
    model = GPT1(TINY, rngs=nnx.Rngs(0))
    x = tokens()
    np.testing.assert_array_equal(model(x), model(x))
    assert float(jnp.abs(model(x, dropout_key=jax.random.key(1)) - model(x)).max()) > 1e-2
    no_dropout_cfg = TINY.replace(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    no_dropout = model_from_params(no_dropout_cfg, params_of(model))
    np.testing.assert_allclose(no_dropout(x, dropout_key=jax.random.key(1)), model(x), atol=1e-6)


@pytest.mark.parametrize("site", ["embd_dropout", "attn_dropout", "resid_dropout"])
def test_each_dropout_site_acts_on_its_own(site):
    off = dict(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    model = GPT1(TINY.replace(**{**off, site: 0.5}), rngs=nnx.Rngs(0))
    x = tokens()
    assert float(jnp.abs(model(x, dropout_key=jax.random.key(1)) - model(x)).max()) > 1e-3


def test_table_dropout_masks_repeated_tokens_identically():
    """The released code drops entries of the embedding table, so a token repeated at several
    positions gets the same mask; dropping the summed hidden states (Hugging Face) does not."""
    cfg = TINY.replace(embd_dropout=0.5)
    params = params_of(GPT1(cfg, rngs=nnx.Rngs(0)))
    params["positions_embed"] = np.zeros_like(params["positions_embed"])
    x = jnp.full((1, 8), 7, jnp.int32)
    key = jax.random.key(2)
    table_embed = model_from_params(cfg, params)._embed(x, key)[0]  # [seq, width]
    hidden_embed = model_from_params(cfg.replace(embd_dropout_site="hidden"), params)._embed(x, key)[0]
    np.testing.assert_array_equal(table_embed[0], table_embed[5])
    assert not np.allclose(hidden_embed[0], hidden_embed[5])
    assert 0.3 < float(jnp.mean(table_embed[0] == 0)) < 0.7


def test_fast_and_faithful_attention_agree_without_dropout():
    faithful = GPT1(TINY.replace(attention="faithful"), rngs=nnx.Rngs(0))
    fast = model_from_params(TINY.replace(attention="fast"), params_of(faithful))
    x = tokens()
    np.testing.assert_allclose(faithful(x), fast(x), atol=2e-5)


def test_attention_is_causal():
    model = GPT1(TINY, rngs=nnx.Rngs(0))
    x = tokens()
    y = x.at[:, 10:].set(5)
    np.testing.assert_allclose(model(x)[:, :10], model(y)[:, :10], atol=1e-6)


def test_padded_vocabulary_changes_no_logit_and_padding_is_masked():
    padded = GPT1(TINY, rngs=nnx.Rngs(0))
    params = params_of(padded)
    params["tokens_embed"] = params["tokens_embed"][:300]
    unpadded = model_from_params(TINY.replace(vocab_pad_multiple=1), params)
    x = tokens()
    logits_padded, logits_plain = padded.logits(padded(x)), unpadded.logits(unpadded(x))
    assert logits_padded.shape[-1] == 384 and logits_plain.shape[-1] == 300
    np.testing.assert_allclose(logits_padded[..., :300], logits_plain, atol=1e-6)
    assert float(jax.nn.softmax(logits_padded)[..., 300:].max()) == 0.0


def test_adding_special_tokens_keeps_every_other_parameter():
    model = GPT1(TINY, rngs=nnx.Rngs(0))
    tuned = model.with_special_tokens(3, rngs=nnx.Rngs(1))
    assert tuned.config.n_special == 3 and tuned.config.n_vocab == 303
    np.testing.assert_array_equal(tuned.tokens_embed[:300], model.tokens_embed[:300])
    assert float(jnp.std(tuned.tokens_embed[300:303])) > 0.005
    old, new = params_of(model), params_of(tuned)
    for a, b in zip(jax.tree.leaves(old["blocks"]), jax.tree.leaves(new["blocks"])):
        np.testing.assert_array_equal(a, b)
    x = tokens()
    np.testing.assert_array_equal(model(x), tuned(x))
    assert tuned(jnp.asarray([[1, 300, 301, 302]])).shape == (1, 4, TINY.width)


def test_bfloat16_compute_keeps_float32_parameters_and_stays_close():
    model = GPT1(TINY, rngs=nnx.Rngs(0))
    bf16 = model_from_params(TINY.replace(dtype="bfloat16"), params_of(model))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params_of(bf16)))
    x = tokens()
    out = bf16(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), model(x), atol=0.1)
    assert bf16.logits(out).dtype == jnp.float32


def product_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """The operand dtypes of every matrix product in a program, sub-programs (custom_vjp, pjit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(var.aval.dtype) for var in eqn.invars))
        for param in eqn.params.values():
            for inner in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += product_operand_dtypes(inner)
    return found


def head_gradients(config: GPT1Config, params):
    """Gradients of a loss over the tied head's log-softmax, with respect to the hidden states and the table,
    and the operand dtypes of the products that compute them."""
    model = model_from_params(config, params)
    hidden = jax.random.normal(jax.random.key(1), (2, 16, config.width)).astype(config.compute_dtype)
    target = jax.random.normal(jax.random.key(2), (2, 16, 384))

    def loss(hidden, table):
        return jnp.sum(jax.nn.log_softmax(model.logits(hidden, table)) * target)

    grad = jax.grad(loss, argnums=(0, 1))
    table = model.tokens_embed[...]
    return grad(hidden, table), product_operand_dtypes(jax.make_jaxpr(grad)(hidden, table).jaxpr)


def test_the_heads_backward_runs_in_the_compute_dtype_with_float32_accumulation():
    """head_backward="compute": in bfloat16 every product of the head's forward and backward takes bfloat16
    operands (with "float32" the backward's take the float32 logits' gradient: TF32 on a GPU), and the
    gradients stay within bfloat16 rounding of float32's; under dtype=float32 the two are the same."""
    params = params_of(GPT1(TINY, rngs=nnx.Rngs(0)))
    bf16 = TINY.replace(dtype="bfloat16")
    (ours, ours_products), (f32, f32_products) = (head_gradients(bf16.replace(head_backward=how), params)
                                                  for how in ("compute", "float32"))
    assert len(ours_products) == 3 and set(ours_products) == {("bfloat16", "bfloat16")}
    assert sum("float32" in operands for operands in f32_products) == 2
    for got, want in zip(ours, f32):
        got, want = (np.asarray(x, np.float32) for x in (got, want))
        assert np.linalg.norm(got - want) < 0.01 * np.linalg.norm(want)  # bfloat16 keeps 8 bits: 0.4%
    same = [head_gradients(TINY.replace(head_backward=how), params)[0] for how in ("compute", "float32")]
    for got, want in zip(*same):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("changes,key", [
    (dict(width=50, n_head=4), "width"),
    (dict(remat="sometimes"), "remat"),
    (dict(dtype="int8"), "dtype"),
])
def test_impossible_configs_name_the_key(changes, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        TINY.replace(**changes)


def test_sequence_longer_than_the_position_table_is_refused():
    model = GPT1(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_ctx"):
        model(tokens(seq=40))
