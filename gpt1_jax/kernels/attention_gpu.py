"""Causal attention with dropout on its probabilities, fused with Pallas into Triton kernels: GPU.

The same computation as `attention_tpu`, shaped for a GPU: each program is one block of 64 queries (or
keys) of one (sequence, head), so a step launches batch x heads x seq / 64 of them, enough to fill an
H100's 132 SMs. Triton wants power-of-two blocks, so instead of the TPU kernels' static causal windows the
forward kernel walks the key blocks up to its diagonal in a loop with an online softmax (a running maximum
and sum; the dropped, unnormalised probabilities go into the output, which is divided by the sum at the
end: dropout and normalisation commute, both scale a probability). The backward pass is two kernels, as in
flash attention: one per key block sums dK and dV over the query blocks at or below its diagonal; one per
query block sums dQ over the key blocks up to its diagonal. Both recompute the probabilities from the
forward's log-sum-exp and draw the dropout mask where they use it (`masks.keep_mask`), so nothing
[seq, seq] is ever written to memory.

q, k, v and the output keep the model's layout, [batch, seq, heads, head_dim]: the block specs pick one
head's rows, so no transpose runs around the kernels. A head_dim that is not a power of two of at least 16
(Triton's smallest matmul) is zero-padded, which changes no score.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gpt1_jax.kernels import masks

BLOCK = 64  # queries (or keys) per program and per loop iteration
_WARPS, _STAGES = 4, 2  # Triton launch parameters: 128 threads a program, double-buffered loads


def fused_attention(q, k, v, *, rate: float = 0.0, streams: jax.Array | None = None,
                    interpret: bool = False) -> jax.Array:
    """The kernels' causal attention: q, k, v [batch, seq, heads, head_dim] -> [batch, seq, heads, head_dim].

    `streams` (`masks.dropout_streams`, [batch * heads]) is needed when `rate` > 0. A sequence that is not a
    multiple of the block is padded: the padding keys lie above every real query's diagonal.
    """
    batch, seq, heads, head_dim = q.shape
    padded_seq, padded_dim = -(-seq // BLOCK) * BLOCK, max(16, 1 << (head_dim - 1).bit_length())
    if (padded_seq, padded_dim) != (seq, head_dim):
        widths = ((0, 0), (0, padded_seq - seq), (0, 0), (0, padded_dim - head_dim))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    if streams is None:
        streams = jnp.zeros((batch * heads,), jnp.int32)
    out = _attention(q, k, v, streams.reshape(batch, heads), float(rate), 1.0 / math.sqrt(head_dim), interpret)
    return out[:, :seq, :, :head_dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, streams, rate, scale, interpret):
    return _forward(q, k, v, streams, rate, scale, interpret)[0]


def _attention_fwd(q, k, v, streams, rate, scale, interpret):
    out, lse = _forward(q, k, v, streams, rate, scale, interpret)
    return out, (q, k, v, streams, out, lse)


def _attention_bwd(rate, scale, interpret, residuals, d_out):
    q, k, v, streams, out, lse = residuals
    # delta_i = sum_j dP_ij P_ij of the softmax's backward, which with dropout is still dO_i . O_i.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [b, h, seq]
    dk, dv = _backward_keys(q, k, v, streams, d_out, lse, delta, rate, scale, interpret)
    dq = _backward_queries(q, k, v, streams, d_out, lse, delta, rate, scale, interpret)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _block_scores(q, k, first_row, first_col, scale):
    """float32 [BLOCK, BLOCK] scaled scores of a query block against a key block, masked above the diagonal,
    with the rows' and columns' positions."""
    scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    rows = first_row + lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0)
    cols = first_col + lax.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1)
    return jnp.where(cols <= rows, scores, masks.MASKED), rows, cols


def _dropped(x, keep, rate: float):
    """x where the mask keeps it, scaled by 1 / (1 - rate); x itself without dropout."""
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0.0) if rate else x


def _forward_kernel(streams_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, *, rate: float, scale: float):
    """Queries block i of one (sequence, head) against key blocks 0..i, online softmax."""
    stream, i = streams_ref[()], pl.program_id(2)
    q = q_ref[...]

    def visit(j, carry):
        acc, top, total = carry
        block = pl.ds(j * BLOCK, BLOCK)
        scores, rows, cols = _block_scores(q, k_ref[block, :], i * BLOCK, j * BLOCK, scale)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        rescale = jnp.exp(top - new_top)
        unnormalised = jnp.exp(scores - new_top[:, None])
        total = total * rescale + jnp.sum(unnormalised, axis=1)
        kept = jnp.where(masks.keep_mask(stream, rows, cols, rate), unnormalised, 0.0) if rate else unnormalised
        v = v_ref[block, :]
        acc = acc * rescale[:, None] + lax.dot_general(kept.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                       preferred_element_type=jnp.float32)
        return acc, new_top, total

    start = (jnp.zeros(q.shape, jnp.float32), jnp.full((BLOCK,), masks.MASKED, jnp.float32),
             jnp.zeros((BLOCK,), jnp.float32))
    acc, top, total = lax.fori_loop(0, i + 1, visit, start)  # key block 0 holds key 0: every row sees one
    out_ref[...] = (acc * (1.0 / (total * (1.0 - rate)))[:, None]).astype(out_ref.dtype)
    lse_ref[...] = top + jnp.log(total)


def _backward_keys_kernel(streams_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                          rate: float, scale: float):
    """dK and dV of key block j of one (sequence, head), summed over query blocks j.. (the causal ones)."""
    stream, j = streams_ref[()], pl.program_id(2)
    k, v = k_ref[...], v_ref[...]

    def visit(i, carry):
        dk, dv = carry
        block = pl.ds(i * BLOCK, BLOCK)
        q, d_out = q_ref[block, :], d_out_ref[block, :]
        scores, rows, cols = _block_scores(q, k, i * BLOCK, j * BLOCK, scale)
        probs = jnp.exp(scores - lse_ref[block][:, None])
        d_dropped = lax.dot_general(d_out, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        keep = masks.keep_mask(stream, rows, cols, rate) if rate else None
        d_scores = probs * (_dropped(d_dropped, keep, rate) - delta_ref[block][:, None])
        dv = dv + lax.dot_general(_dropped(probs, keep, rate).astype(d_out.dtype), d_out,
                                  (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        dk = dk + lax.dot_general(d_scores.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(j, q_ref.shape[0] // BLOCK, visit, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_queries_kernel(streams_ref, q_ref, k_ref, v_ref, d_out_ref, lse_ref, delta_ref, dq_ref, *,
                             rate: float, scale: float):
    """dQ of query block i of one (sequence, head), summed over key blocks 0..i."""
    stream, i = streams_ref[()], pl.program_id(2)
    q, d_out, lse, delta = q_ref[...], d_out_ref[...], lse_ref[...], delta_ref[...]

    def visit(j, dq):
        block = pl.ds(j * BLOCK, BLOCK)
        k, v = k_ref[block, :], v_ref[block, :]
        scores, rows, cols = _block_scores(q, k, i * BLOCK, j * BLOCK, scale)
        probs = jnp.exp(scores - lse[:, None])
        d_dropped = lax.dot_general(d_out, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        keep = masks.keep_mask(stream, rows, cols, rate) if rate else None
        d_scores = probs * (_dropped(d_dropped, keep, rate) - delta[:, None])
        return dq + lax.dot_general(d_scores.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, i + 1, visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _specs(seq: int, head_dim: int):
    """Block specs over the grid (sequence b, head h, block n): that block of a [batch, seq, heads, head_dim]
    array, all of its rows, that block of a [batch, heads, seq] row statistic, and the (b, h) stream."""
    block = pl.BlockSpec((None, BLOCK, None, head_dim), lambda b, h, n: (b, n, h, 0))
    rows = pl.BlockSpec((None, seq, None, head_dim), lambda b, h, n: (b, 0, h, 0))
    statistic_block = pl.BlockSpec((None, None, BLOCK), lambda b, h, n: (b, h, n))
    statistic_rows = pl.BlockSpec((None, None, seq), lambda b, h, n: (b, h, 0))
    stream = pl.BlockSpec((None, None), lambda b, h, n: (b, h))
    return block, rows, statistic_block, statistic_rows, stream


def _cost(q, matmuls: int, arrays: list) -> pl.CostEstimate:
    """What a kernel does over the causal half of the [seq, seq] blocks, for XLA's scheduler."""
    batch, seq, heads, head_dim = q.shape
    blocks = seq // BLOCK
    window = BLOCK * BLOCK * blocks * (blocks + 1) // 2  # score entries computed per (sequence, head)
    return pl.CostEstimate(flops=batch * heads * window * 2 * head_dim * matmuls,
                           transcendentals=batch * heads * window,
                           bytes_accessed=sum(math.prod(x.shape) * x.dtype.itemsize for x in arrays))


def _call(kernel, q, grid_along: str, out_specs, out_shape, in_specs, cost, interpret, name):
    batch, seq, heads, _ = q.shape
    return pl.pallas_call(
        kernel, grid=(batch, heads, seq // BLOCK), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=_WARPS, num_stages=_STAGES),
        cost_estimate=cost, interpret=interpret, name=f"gpt1_attention_{name}_by_{grid_along}_block")


def _forward(q, k, v, streams, rate, scale, interpret):
    batch, seq, heads, head_dim = q.shape
    block, rows, statistic_block, _, stream = _specs(seq, head_dim)
    return _call(functools.partial(_forward_kernel, rate=rate, scale=scale), q, "query",
                 out_specs=[block, statistic_block],
                 out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                            jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)],
                 in_specs=[stream, block, rows, rows], cost=_cost(q, 2, [q, k, v, q]),
                 interpret=interpret, name="forward")(streams, q, k, v)


def _backward_keys(q, k, v, streams, d_out, lse, delta, rate, scale, interpret):
    _, seq, _, head_dim = q.shape
    block, rows, _, statistic_rows, stream = _specs(seq, head_dim)
    return _call(functools.partial(_backward_keys_kernel, rate=rate, scale=scale), q, "key",
                 out_specs=[block, block], out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v)],
                 in_specs=[stream, rows, block, block, rows, statistic_rows, statistic_rows],
                 cost=_cost(q, 4, [q, k, v, d_out, k, v]), interpret=interpret,
                 name="backward")(streams, q, k, v, d_out, lse, delta)


def _backward_queries(q, k, v, streams, d_out, lse, delta, rate, scale, interpret):
    _, seq, _, head_dim = q.shape
    block, rows, statistic_block, _, stream = _specs(seq, head_dim)
    return _call(functools.partial(_backward_queries_kernel, rate=rate, scale=scale), q, "query",
                 out_specs=block, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
                 in_specs=[stream, block, rows, rows, block, statistic_block, statistic_block],
                 cost=_cost(q, 3, [q, k, v, d_out, q]), interpret=interpret,
                 name="backward")(streams, q, k, v, d_out, lse, delta)
