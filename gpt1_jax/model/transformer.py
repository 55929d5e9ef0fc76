"""The GPT-1 network (Radford et al., 2018, Sec. 3.1 and the released code), in Flax NNX.

Post-LayerNorm decoder blocks, tanh-GELU, fused QKV, learned positions, LM head tied to the
token embedding and no final LayerNorm. Parameters are float32; `GPT1Config.dtype` sets the
compute dtype. The blocks' parameters are stacked on a leading layer axis and run with
`jax.lax.scan`, so compile time does not grow with depth. Decoding runs this same forward with
an optional key/value cache threaded through the blocks and attention (`GPT1.init_cache`).

Dropout keys are passed explicitly (`dropout_key=None` means evaluation mode), which keeps the
model's state equal to its parameters: nothing but weights travels through `nnx.split`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from gpt1_jax import constants
from gpt1_jax.kernels import attention as attention_kernel
from gpt1_jax.training.sharding import DATA_AXES

INIT_STD = 0.02  # Sec. 4.1: "weights initialized from N(0, 0.02)"
LAYER_NORM_EPS = 1e-5

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class GPT1Config:
    """Sizes of the network; the defaults are the paper's 12 x 768 model with no special tokens.

    `n_special` rows follow the 40,478 BPE rows in the token table (the fine-tuning layout of the
    released code); the table is padded to a multiple of `vocab_pad_multiple` rows so the LM head
    maps well onto matrix units, and the padded logits are masked out.
    """

    vocab_size: int = constants.VOCAB_SIZE
    n_special: int = 0
    n_ctx: int = 512
    width: int = 768
    n_head: int = 12
    n_layer: int = 12
    mlp_width: int = 3072
    embd_dropout: float = 0.1
    attn_dropout: float = 0.1
    resid_dropout: float = 0.1
    # "table" drops entries of the embedding tables once per step as the released code does, and the
    # LM head then multiplies by the dropped table; "hidden" drops the summed input embeddings (and the
    # head sees the clean table) as Hugging Face's OpenAIGPTModel does.
    embd_dropout_site: Literal["table", "hidden"] = "table"
    dtype: str = "float32"
    vocab_pad_multiple: int = 128
    # "scan": the blocks run as one lax.scan (compile time flat in depth); "unrolled": one after another in the
    # program; "auto": unrolled on a TPU, where XLA then keeps 3.5 GiB per v5e chip for the paper's step
    # against 8.0 under the scan (docs/benchmarks.md), and scanned elsewhere.
    layers: Literal["auto", "scan", "unrolled"] = "auto"
    remat: str = "none"
    # "faithful": softmax and dropout written out in XLA (the [batch, heads, seq, seq] arrays materialised);
    # "fused": with attention dropout, the Pallas kernels of gpt1_jax.kernels.attention (Mosaic on a TPU, Triton
    # on a GPU; interpreted on a CPU); "fast": jax.nn.dot_product_attention (cuDNN's on a GPU in 16-bit), which
    # has no dropout; "auto": "fused" on a TPU and "faithful" elsewhere while attention dropout is active (the
    # GPU kernels wait for a measurement on a GPU), "fast" when it is not (evaluation, generation).
    attention: Literal["auto", "faithful", "fused", "fast"] = "auto"
    # The tied head's backward matmuls: "compute" runs them in `dtype` with float32 accumulation (bfloat16
    # tensor cores), "float32" in float32 from the float32 logits' gradient (TF32 on a GPU). The same under
    # dtype=float32.
    head_backward: Literal["compute", "float32"] = "compute"

    def __post_init__(self):
        checks = [
            (self.width % self.n_head == 0, "width", f"width {self.width} is not divisible by n_head {self.n_head}"),
            (self.n_layer >= 1, "n_layer", "n_layer must be >= 1"),
            (self.n_ctx >= 1, "n_ctx", "n_ctx must be >= 1"),
            (self.vocab_size >= 1, "vocab_size", "vocab_size must be >= 1"),
            (self.n_special >= 0, "n_special", "n_special must be >= 0"),
            (self.vocab_pad_multiple >= 1, "vocab_pad_multiple", "vocab_pad_multiple must be >= 1"),
            (self.remat in REMAT_POLICIES, "remat", f"remat must be one of {sorted(REMAT_POLICIES)}"),
            (self.embd_dropout_site in ("table", "hidden"), "embd_dropout_site", "use 'table' or 'hidden'"),
            (self.layers in ("auto", "scan", "unrolled"), "layers", "use 'auto', 'scan' or 'unrolled'"),
            (self.attention in ("auto", "faithful", "fused", "fast"), "attention",
             "use 'auto', 'faithful', 'fused' or 'fast'"),
            (self.head_backward in ("compute", "float32"), "head_backward", "use 'compute' or 'float32'"),
            (self.dtype in ("float32", "bfloat16", "float16"), "dtype", "use float32, bfloat16 or float16"),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ValueError(f"model.{key}: {message}.")

    @property
    def n_vocab(self) -> int:
        """Rows of the token table that are real tokens: BPE entries plus special tokens."""
        return self.vocab_size + self.n_special

    @property
    def n_vocab_padded(self) -> int:
        return -(-self.n_vocab // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def head_dim(self) -> int:
        return self.width // self.n_head

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "GPT1Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPT1Config":
        """The config of `to_dict`'s values; checkpoints written before `layers` record `scan_layers` (bool)."""
        if "scan_layers" in values:
            values = {**values, "layers": "scan" if values["scan_layers"] else "unrolled"}
            del values["scan_layers"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown model config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**values)


def dropout(x, rate: float, key, *, shared_axes: tuple[int, ...] = ()):
    """Inverted dropout; identity when `key` is None (evaluation) or the rate is 0.

    `shared_axes`: axes of `x` along which one mask is broadcast (TensorFlow's `noise_shape` with a 1 there).
    """
    if key is None or rate == 0.0:
        return x
    shape = tuple(1 if axis in shared_axes else n for axis, n in enumerate(x.shape))
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _normal(rngs: nnx.Rngs, shape) -> nnx.Param:
    return nnx.Param(INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32))


def linear(n_in: int, n_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """x @ kernel + bias, the released code's `conv1d` (its 1x1 case): kernel [in, out] drawn from N(0, 0.02)
    and a zero bias, both stored in float32 and cast to `dtype`, the compute dtype, for the product."""
    return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(INIT_STD), rngs=rngs)


def _layer_norm(width: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """The released code's `norm`: epsilon 1e-5 and the two-pass variance E[(x - E[x])^2].

    It runs wholly in float32 (input, statistics, gain and bias), whatever the compute dtype, so bf16
    training normalises as precisely as float32; the caller casts the result back to the compute dtype.
    """
    return nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


@jax.custom_vjp
def _scores_against_table(hidden, table):
    """float32 hidden [..., width] . table [rows, width]^T, accumulated in float32, whose backward casts the
    logits' float32 gradient to the inputs' dtype first: the two backward products then run in bfloat16 as
    the forward does, not in float32 (TF32 on a GPU: 8% of the paper's step on an H200, docs/benchmarks.md)."""
    return jnp.einsum("...d,vd->...v", hidden, table, preferred_element_type=jnp.float32)


def _scores_against_table_fwd(hidden, table):
    return _scores_against_table(hidden, table), (hidden, table)


def _scores_against_table_bwd(residuals, d_logits):
    hidden, table = residuals
    d_logits = d_logits.astype(hidden.dtype)
    d_hidden = jnp.einsum("...v,vd->...d", d_logits, table, preferred_element_type=jnp.float32)
    d_table = jnp.einsum("...v,...d->vd", d_logits, hidden, preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_table.astype(table.dtype)


_scores_against_table.defvjp(_scores_against_table_fwd, _scores_against_table_bwd)


def _fast_attention_kind(q) -> str | None:
    """cuDNN's fused attention on a GPU, where it takes 16-bit inputs with head_dim a multiple of 8; XLA's
    (None) elsewhere."""
    gpu = attention_kernel.tracing_platform() == "gpu"
    return "cudnn" if gpu and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 else None


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPT1Config, *, rngs: nnx.Rngs):
        self.config = config
        self.qkv = linear(config.width, 3 * config.width, config.compute_dtype, rngs)
        self.proj = linear(config.width, config.width, config.compute_dtype, rngs)

    def __call__(self, x, attn_key=None, resid_key=None, *, cache=None, start=0):
        """x [batch, seq, width] at positions start..start+seq-1 -> (out [batch, seq, width], cache or None).

        `cache`: this layer's (keys, values), each [batch, n_ctx, heads, head_dim]. The new keys and values
        are written at `start` and the queries read every earlier position from it, as decoding needs.
        """
        cfg = self.config
        batch, seq, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)  # 3 x [batch, seq, width]
        q, k, v = (t.reshape(batch, seq, cfg.n_head, cfg.head_dim) for t in (q, k, v))
        if cache is not None:  # keys and values become [batch, n_ctx, heads, head_dim]
            k, v = (jax.lax.dynamic_update_slice(c, t.astype(c.dtype), (0, start, 0, 0)) for c, t in zip(cache, (k, v)))
            cache = (k, v)
        if cache is None and self._use_kernel(attn_key):
            out = attention_kernel.causal_attention(q, k, v, rate=cfg.attn_dropout, dropout_key=attn_key,
                                                    data_axes=DATA_AXES)
        elif cache is None and self._use_fast_path(attn_key):
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=_fast_attention_kind(q))
        else:
            out = self._masked_attention(q, k, v, 0 if cache is None else start, attn_key)
        out = out.reshape(batch, seq, cfg.width)  # [batch, seq, width]
        return dropout(self.proj(out), cfg.resid_dropout, resid_key), cache

    def _use_fast_path(self, attn_key) -> bool:
        mode = self.config.attention
        return mode == "fast" or (mode in ("auto", "fused") and not self._dropping(attn_key))

    def _use_kernel(self, attn_key) -> bool:
        mode = self.config.attention
        on_tpu = attention_kernel.tracing_platform() == "tpu"
        return self._dropping(attn_key) and (mode == "fused" or (mode == "auto" and on_tpu))

    def _dropping(self, attn_key) -> bool:
        return attn_key is not None and self.config.attn_dropout > 0.0

    def _masked_attention(self, q, k, v, offset, attn_key):
        """Softmax(QK^T / sqrt(d)), causal, with dropout on the probabilities (the released code's `attn`).

        Query i of q [batch, q, heads, head_dim] sees keys <= offset + i of k, v [batch, k, heads, head_dim];
        with a cache, offset = start, which also hides the rows not written yet.
        """
        cfg = self.config
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
        causal = jnp.arange(k.shape[1])[None, :] <= offset + jnp.arange(q.shape[1])[:, None]  # [q, k]
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [batch, heads, q, k]
        probs = dropout(probs, cfg.attn_dropout, attn_key)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class MLP(nnx.Module):
    def __init__(self, config: GPT1Config, *, rngs: nnx.Rngs):
        self.config = config
        self.fc = linear(config.width, config.mlp_width, config.compute_dtype, rngs)
        self.proj = linear(config.mlp_width, config.width, config.compute_dtype, rngs)

    def __call__(self, x, resid_key=None):
        """The position-wise feed-forward layer with the released code's tanh-approximated GELU."""
        hidden = jax.nn.gelu(self.fc(x), approximate=True)  # [batch, seq, mlp_width]
        return dropout(self.proj(hidden), self.config.resid_dropout, resid_key)


class Block(nnx.Module):
    """Post-LN block of the released code: n = LN1(x + attn(x)); h = LN2(n + mlp(n))."""

    def __init__(self, config: GPT1Config, *, rngs: nnx.Rngs):
        self.attn = CausalSelfAttention(config, rngs=rngs)
        self.ln_1 = _layer_norm(config.width, rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.ln_2 = _layer_norm(config.width, rngs)

    def __call__(self, x, key=None, *, cache=None, start=0):
        """x [batch, seq, width] -> (h [batch, seq, width], this layer's cache as the attention returns it).

        The LayerNorms return float32; their outputs go back to the compute dtype of `x`.
        """
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        a, cache = self.attn(x, attn_key=keys[0], resid_key=keys[1], cache=cache, start=start)
        n = self.ln_1(x + a).astype(x.dtype)
        return self.ln_2(n + self.mlp(n, resid_key=keys[2])).astype(x.dtype), cache


class GPT1(nnx.Module):
    """The backbone (last hidden states) and the tied LM head.

    `tokens_embed` holds [BPE tokens | special tokens | padding] rows, `positions_embed` the
    n_ctx learned positions; the original single table [positions | tokens] is split in two so
    special tokens can be added without moving anything else (`with_special_tokens`).
    """

    def __init__(self, config: GPT1Config, *, rngs: nnx.Rngs):
        self.config = config
        self.tokens_embed = nnx.Param(_token_table(rngs, config))
        self.positions_embed = _normal(rngs, (config.n_ctx, config.width))
        self.blocks = _stacked_blocks(config, rngs)

    def __call__(self, tokens, *, dropout_key=None, cache=None, start=0):
        """tokens [batch, seq] int at positions start..start+seq-1 -> hidden [batch, seq, width], compute dtype.

        `cache`: None (training, scoring), or the (keys, values) of `init_cache`, each [n_layer, batch, n_ctx,
        heads, head_dim], holding positions 0..start-1; the call then writes the tokens' keys and values at
        `start` and returns (hidden, updated cache), so decoding feeds only the newest token.
        """
        cfg = self.config
        seq = tokens.shape[-1]
        if seq > cfg.n_ctx:
            raise ValueError(f"Sequence length {seq} exceeds model.n_ctx={cfg.n_ctx}.")
        embd_key, layers_key = _embedding_and_layer_keys(dropout_key)
        hidden = self._embed(tokens, embd_key, start)  # [batch, seq, width]
        hidden, cache = self._run_blocks(hidden, layers_key, cache, start)
        return hidden if cache is None else (hidden, cache)

    def init_cache(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """Zeroed (keys, values) for `__call__`, each [n_layer, batch, n_ctx, heads, head_dim] in the compute dtype."""
        cfg = self.config
        shape = (cfg.n_layer, batch, cfg.n_ctx, cfg.n_head, cfg.head_dim)
        return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)

    def embedding_tables(self, embd_key=None):
        """(token table [n_vocab_padded, width], position table [n_ctx, width]), float32, as the step sees them.

        With `embd_dropout_site="table"` and a key, entries of both tables are dropped once for the
        whole step, as the released code drops its single table `we` before every lookup: a token
        repeated in the batch keeps one mask, and the tied LM head multiplies by the same dropped table.
        """
        cfg = self.config
        token_table, pos_table = self.tokens_embed[...], self.positions_embed[...]
        if cfg.embd_dropout_site == "table" and embd_key is not None:
            tok_key, pos_key = jax.random.split(embd_key)
            token_table = dropout(token_table, cfg.embd_dropout, tok_key)
            pos_table = dropout(pos_table, cfg.embd_dropout, pos_key)
        return token_table, pos_table

    def _embed(self, tokens, key, start=0):
        cfg = self.config
        token_table, pos_table = self.embedding_tables(key)
        positions = jax.lax.dynamic_slice_in_dim(pos_table, start, tokens.shape[-1])  # [seq, width]
        hidden = jnp.take(token_table, tokens, axis=0) + positions  # [batch, seq, width]
        if cfg.embd_dropout_site == "hidden":
            hidden = dropout(hidden, cfg.embd_dropout, key)
        return hidden.astype(cfg.compute_dtype)

    def _run_blocks(self, hidden, key, cache, start):
        """The layers in turn, each with its slice of the dropout keys and of the cache: (hidden, cache)."""
        cfg = self.config
        graphdef, state = nnx.split(self.blocks)
        keys = None if key is None else jax.random.split(key, cfg.n_layer)

        def layer(h, layer_state, layer_key, layer_cache):
            return nnx.merge(graphdef, layer_state)(h, layer_key, cache=layer_cache, start=start)

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat])
        if cfg.layers == "scan" or (cfg.layers == "auto" and attention_kernel.tracing_platform() != "tpu"):
            return jax.lax.scan(lambda h, xs: layer(h, *xs), hidden, (state, keys, cache))
        caches = []
        for i in range(cfg.n_layer):
            hidden, layer_cache = layer(hidden, *jax.tree.map(lambda a, i=i: a[i], (state, keys, cache)))
            caches.append(layer_cache)
        return hidden, jax.tree.map(lambda *layers: jnp.stack(layers), *caches)

    def head_table(self, *, dropout_key=None, position_rows: int = 0):
        """The rows the tied LM head scores, float32 [n_vocab_padded + position_rows, width].

        `dropout_key`: the key the forward pass took; with `embd_dropout_site="table"` the head then
        multiplies by the same dropped table (the released code's `matmul(lm_h, we, transpose_b=True)`
        after `we = dropout(we)`). `position_rows` > 0 appends the first that many position rows, as the
        released fine-tuning code does: its `we` is [BPE | specials | positions], and the auxiliary LM
        loss normalises over all of it.
        """
        embd_key, _ = _embedding_and_layer_keys(dropout_key)
        token_table, pos_table = self.embedding_tables(embd_key)
        if not position_rows:
            return token_table
        return jnp.concatenate([token_table, pos_table[:position_rows]])

    def logits(self, hidden, table=None):
        """Tied LM head: hidden [..., width] -> float32 logits [..., rows of `table`], padding rows masked.

        `table`: what `head_table` returns; None is the clean token table (evaluation and generation).
        """
        table = (self.tokens_embed[...] if table is None else table).astype(hidden.dtype)
        if self.config.head_backward == "compute":
            logits = _scores_against_table(hidden, table)
        else:
            logits = jnp.einsum("...d,vd->...v", hidden, table, preferred_element_type=jnp.float32)
        return mask_padded_logits(logits, self.config)

    def with_special_tokens(self, n_special: int, *, rngs: nnx.Rngs) -> "GPT1":
        """A copy whose token table gains `n_special` freshly initialised rows after the BPE rows.

        Every other parameter is carried over unchanged (Sec. 3.3: the only new parameters of
        fine-tuning are W_y and the delimiter-token embeddings).
        """
        cfg = self.config
        new_cfg = cfg.replace(n_special=n_special)
        fresh = _token_table(rngs, new_cfg)
        kept_rows = cfg.vocab_size + min(cfg.n_special, n_special)  # BPE rows and specials already learned
        values = nnx.to_pure_dict(nnx.state(self))
        values["tokens_embed"] = fresh.at[:kept_rows].set(self.tokens_embed[:kept_rows])
        graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT1(new_cfg, rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, values)
        return nnx.merge(graphdef, state)


def mask_padded_logits(logits, config: GPT1Config):
    """Padding rows of the token table are never predicted; rows past them (positions) are kept."""
    if config.n_vocab_padded == config.n_vocab:
        return logits
    rows = jnp.arange(logits.shape[-1])
    valid = (rows < config.n_vocab) | (rows >= config.n_vocab_padded)
    return jnp.where(valid, logits, jnp.finfo(logits.dtype).min)


def _embedding_and_layer_keys(dropout_key):
    """The forward pass's split of its dropout key: (embedding tables, blocks); (None, None) in evaluation."""
    if dropout_key is None:
        return None, None
    embd_key, layers_key = jax.random.split(dropout_key)
    return embd_key, layers_key


def _token_table(rngs: nnx.Rngs, config: GPT1Config):
    """[n_vocab_padded, width]: N(0, 0.02) rows for real tokens, zeros for the padding rows."""
    table = INIT_STD * jax.random.normal(rngs.params(), (config.n_vocab_padded, config.width), jnp.float32)
    return table.at[config.n_vocab:].set(0.0)


def _stacked_blocks(config: GPT1Config, rngs: nnx.Rngs) -> Block:
    """One Block whose parameters carry a leading [n_layer] axis (each layer drawn independently)."""

    @nnx.split_rngs(splits=config.n_layer)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(layer_rngs):
        return Block(config, rngs=layer_rngs)

    return make(rngs)


def count_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
