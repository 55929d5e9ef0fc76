"""Causal self-attention with dropout on its probabilities, fused into one Pallas kernel each way (TPU).

GPT-1 drops attention probabilities: the released code's `attn` computes `w = dropout(softmax(w))` before
`w @ v`. Written in XLA, the step keeps the float32 scores, their probabilities and the dropout mask of every
layer for the backward pass, [batch, heads, seq, seq] each: 3.9 GiB per v5e chip for the paper's config
(docs/benchmarks.md). Here the forward kernel keeps per row only the log-sum-exp of its scores; the
backward kernel recomputes the probabilities from it, as flash attention does.

The dropout mask is never stored either. Whether probability (query i, key j) of head h of sequence b is
kept is a pure function of (seed, b, h, i, j): a counter hash (`keep_mask`) that both kernels evaluate where
they use it, so the backward pass drops exactly what the forward dropped, by construction. `b` is the
sequence's index in the global batch, so the chips of a data-parallel mesh draw different masks; the seed
comes from the layer's dropout key, so steps and layers differ. The hash is murmur3's 32-bit finaliser,
run over a per-(b, h) stream word and the (i, j) counter: a bijection of the counter for each stream, so no
two probabilities of a row share bits. A kept probability is scaled by 1 / (1 - rate) (inverted dropout).

`reference_attention` is the same computation in plain JAX over the full [seq, seq] scores, the mask from
the same hash; the tests compare the two in Pallas's interpret mode on CPU, forward and gradients.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BLOCK = 128  # query rows per kernel iteration; keys are visited in the same blocks up to the diagonal
KEEP_BITS = 24  # a probability is kept when the top 24 bits of its hash are >= rate * 2^24
_MASKED = -1e30  # scores above the diagonal (finite: exp(_MASKED - max) is exactly 0 in float32)
_COLUMN_BITS = 16  # the counter is (query << 16) | key: sequences up to 65,536 tokens


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_streams(dropout_key: jax.Array, batch: int, heads: int, batch_offset=0) -> jax.Array:
    """int32 [batch * heads]: one stream word per (sequence, head), sequences counted from `batch_offset` in
    the global batch. The kernels read them as scalars (int32, the word's bits) and hash within each."""
    seed = jax.random.bits(dropout_key, (2,), jnp.uint32)
    sequence = jnp.arange(batch, dtype=jnp.uint32)[:, None] + jnp.asarray(batch_offset, jnp.uint32)
    pair = sequence * jnp.uint32(heads) + jnp.arange(heads, dtype=jnp.uint32)[None, :]  # [batch, heads]
    streams = _fmix32(seed[0] ^ _fmix32(seed[1] ^ (pair * jnp.uint32(0x9E3779B1))))
    return lax.bitcast_convert_type(streams.reshape(-1), jnp.int32)


def keep_mask(stream: jax.Array, rows: jax.Array, cols: jax.Array, rate: float) -> jax.Array:
    """Whether each probability (rows[...], cols[...]) of one (sequence, head) survives dropout at `rate`."""
    counter = (rows.astype(jnp.uint32) << _COLUMN_BITS) | cols.astype(jnp.uint32)
    bits = _fmix32(lax.bitcast_convert_type(stream, jnp.uint32) ^ (counter * jnp.uint32(0x27D4EB2F)))
    return (bits >> (32 - KEEP_BITS)).astype(jnp.int32) >= _threshold(rate)


def _threshold(rate: float) -> int:
    return int(round(rate * (1 << KEEP_BITS)))


def reference_attention(q, k, v, *, rate: float = 0.0, streams: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d), causal), dropped as the kernels drop it, times v; q, k, v and the result
    [batch, heads, seq, head_dim], the scores and probabilities in float32."""
    batch, heads, seq, head_dim = q.shape
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    rows, cols = lax.broadcasted_iota(jnp.int32, (seq, seq), 0), lax.broadcasted_iota(jnp.int32, (seq, seq), 1)
    probs = jax.nn.softmax(jnp.where(cols <= rows, scores, _MASKED), axis=-1)  # [batch, heads, seq, seq]
    if rate:
        keep = jax.vmap(lambda stream: keep_mask(stream, rows, cols, rate))(streams).reshape(batch, heads, seq, seq)
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
    return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def causal_attention(q, k, v, *, rate: float, dropout_key: jax.Array, data_axes: tuple[str, ...]) -> jax.Array:
    """The model's attention with dropout, fused: q, k, v and the result [batch, seq, heads, head_dim].

    Under a mesh whose axes include `data_axes` (the training step traces under its abstract mesh), each
    device runs the kernels on its own rows of the batch (a Pallas call has no rule for splitting itself),
    drawing the masks of their global batch indices. On a CPU the kernels run interpreted (tests).
    """
    mesh, platform = jax.sharding.get_abstract_mesh(), tracing_platform()
    if platform not in ("tpu", "cpu"):
        raise ValueError(f"model.attention=fused runs on TPUs (and on CPUs, interpreted), not on {platform}: use "
                         "model.attention=auto or faithful there.")
    sharded = not mesh.empty and set(data_axes) <= set(mesh.axis_names)

    def local(q, k, v, dropout_key):
        batch, _, heads, _ = q.shape
        offset = lax.axis_index(data_axes) * batch if sharded else 0
        streams = dropout_streams(dropout_key, batch, heads, offset)
        heads_first = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]  # [batch, heads, seq, head_dim]
        out = fused_attention(*heads_first, rate=rate, streams=streams, interpret=platform == "cpu")
        return out.transpose(0, 2, 1, 3)  # [batch, seq, heads, head_dim]

    if not sharded:
        return local(q, k, v, dropout_key)
    rows = jax.sharding.PartitionSpec(data_axes)
    return jax.shard_map(local, in_specs=(rows, rows, rows, jax.sharding.PartitionSpec()), out_specs=rows,
                         check_vma=False)(q, k, v, dropout_key)


def tracing_platform() -> str:
    """The platform the code being traced will run on: its mesh's (a TPU slice compiled for ahead of time on a
    CPU host included; the training step traces under its mesh), else this process's default."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def fused_attention(q, k, v, *, rate: float = 0.0, streams: jax.Array | None = None,
                    interpret: bool = False) -> jax.Array:
    """The kernels' causal attention: q, k, v [batch, heads, seq, head_dim] -> [batch, heads, seq, head_dim].

    `streams` (`dropout_streams`) is needed when `rate` > 0. A sequence longer than a block is padded to a
    multiple of it: the padding keys lie above every real query's diagonal, so nothing real sees them.
    """
    batch, heads, seq, _ = q.shape
    padded = -(-seq // BLOCK) * BLOCK
    if padded != seq:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, padded - seq), (0, 0))) for x in (q, k, v))
    if streams is None:
        streams = jnp.zeros((batch * heads,), jnp.int32)
    out = _attention(q, k, v, streams, float(rate), interpret)
    return out[:, :, :seq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, streams, rate, interpret):
    return _forward(q, k, v, streams, rate, interpret)[0]


def _attention_fwd(q, k, v, streams, rate, interpret):
    out, lse = _forward(q, k, v, streams, rate, interpret)
    return out, (q, k, v, streams, out, lse)


def _attention_bwd(rate, interpret, residuals, d_out):
    q, k, v, streams, out, lse = residuals
    # delta_i = sum_j dP_ij P_ij of the softmax's backward; with dropout it is still dO_i . O_i, since
    # O_i = sum_j D_ij v_j for the dropped probabilities D.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # [b, h, seq, 1]
    dq, dk, dv = _backward(q, k, v, streams, d_out, lse, delta, rate, interpret)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _scores(q, k, first_row: int):
    """float32 [rows, keys] scaled scores of a block of queries against keys 0.., masked above the diagonal."""
    scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(q.shape[-1]))
    rows = first_row + lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    return jnp.where(cols <= rows, scores, _MASKED), rows, cols


def _forward_kernel(streams_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, *, rate: float, heads: int):
    """One (sequence, head): each block of queries against the keys up to its diagonal block."""
    stream = streams_ref[pl.program_id(0) * heads + pl.program_id(1)]
    for first in range(0, q_ref.shape[2], BLOCK):
        width = first + BLOCK  # keys 0..width-1: the causal window of this block, a static size
        scores, rows, cols = _scores(q_ref[0, 0, first:width, :], k_ref[0, 0, :width, :], first)
        top = jnp.max(scores, axis=1, keepdims=True)  # [block, 1]
        unnormalised = jnp.exp(scores - top)
        total = jnp.sum(unnormalised, axis=1, keepdims=True)
        probs = unnormalised / total  # [block, width]
        if rate:
            probs = jnp.where(keep_mask(stream, rows, cols, rate), probs * (1.0 / (1.0 - rate)), 0.0)
        v = v_ref[0, 0, :width, :]
        out = lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        out_ref[0, 0, first:width, :] = out.astype(out_ref.dtype)
        lse_ref[0, 0, first:width, :] = top + jnp.log(total)


def _backward_kernel(streams_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref,
                     dk_acc, dv_acc, *, rate: float, heads: int):
    """One (sequence, head): dQ block by block; dK and dV summed over the query blocks in float32."""
    stream = streams_ref[pl.program_id(0) * heads + pl.program_id(1)]
    scale = 1.0 / math.sqrt(q_ref.shape[-1])
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)
    for first in range(0, q_ref.shape[2], BLOCK):
        width = first + BLOCK
        q, d_out = q_ref[0, 0, first:width, :], d_out_ref[0, 0, first:width, :]
        k, v = k_ref[0, 0, :width, :], v_ref[0, 0, :width, :]
        scores, rows, cols = _scores(q, k, first)
        probs = jnp.exp(scores - lse_ref[0, 0, first:width, :])  # [block, width]; 0 above the diagonal
        d_dropped = lax.dot_general(d_out, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        dropped = probs
        if rate:
            keep = keep_mask(stream, rows, cols, rate)
            d_dropped = jnp.where(keep, d_dropped * (1.0 / (1.0 - rate)), 0.0)  # now dL/dP
            dropped = jnp.where(keep, probs * (1.0 / (1.0 - rate)), 0.0)
        d_scores = probs * (d_dropped - delta_ref[0, 0, first:width, :])  # [block, width]
        dq = lax.dot_general(d_scores.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        dq_ref[0, 0, first:width, :] = (dq * scale).astype(dq_ref.dtype)
        dk_acc[:width, :] += lax.dot_general(d_scores.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32) * scale
        dv_acc[:width, :] += lax.dot_general(dropped.astype(d_out.dtype), d_out, (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)
    dk_ref[0, 0] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[0, 0] = dv_acc[...].astype(dv_ref.dtype)


def _cost(q, matmuls: int, exps: int, arrays: list) -> pl.CostEstimate:
    """What a kernel does, for XLA's scheduler and cost_analysis(): `matmuls` products of a query block with its
    causal window of keys (2 x block x window x head_dim FLOPs each), `exps` exponentials per window entry."""
    batch, heads, seq, head_dim = q.shape
    window = sum(BLOCK * (first + BLOCK) for first in range(0, seq, BLOCK))  # entries per (sequence, head)
    return pl.CostEstimate(flops=batch * heads * window * 2 * head_dim * matmuls,
                           transcendentals=batch * heads * window * exps,
                           bytes_accessed=sum(math.prod(x.shape) * x.dtype.itemsize for x in arrays))


def _per_sequence_and_head(shape) -> pl.BlockSpec:
    """One (sequence, head) of a [batch, heads, seq, last] array per grid step (b, h)."""
    return pl.BlockSpec((1, 1, *shape[2:]), lambda b, h, streams: (b, h, 0, 0))


def _forward(q, k, v, streams, rate, interpret):
    batch, heads, seq, _ = q.shape
    lse_shape = (batch, heads, seq, 1)
    return pl.pallas_call(
        functools.partial(_forward_kernel, rate=rate, heads=heads),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, heads),
            in_specs=[_per_sequence_and_head(x.shape) for x in (q, k, v)],
            out_specs=[_per_sequence_and_head(q.shape), _per_sequence_and_head(lse_shape)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(lse_shape, jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=_cost(q, matmuls=2, exps=1, arrays=[q, k, v, q]),
        interpret=interpret, name="gpt1_attention_forward",
    )(streams, q, k, v)


def _backward(q, k, v, streams, d_out, lse, delta, rate, interpret):
    batch, heads, seq, head_dim = q.shape
    return pl.pallas_call(
        functools.partial(_backward_kernel, rate=rate, heads=heads),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, heads),
            in_specs=[_per_sequence_and_head(x.shape) for x in (q, k, v, d_out, lse, delta)],
            out_specs=[_per_sequence_and_head(x.shape) for x in (q, k, v)],
            scratch_shapes=[pltpu.VMEM((seq, head_dim), jnp.float32), pltpu.VMEM((seq, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=_cost(q, matmuls=5, exps=1, arrays=[q, k, v, d_out, q, k, v]),
        interpret=interpret, name="gpt1_attention_backward",
    )(streams, q, k, v, d_out, lse, delta)
