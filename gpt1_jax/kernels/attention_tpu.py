"""Causal attention with dropout on its probabilities, fused into one Pallas (Mosaic) kernel each way: TPU.

Each grid step is one (sequence, head). The forward kernel visits the queries in blocks of 128, each against
the keys up to its diagonal block, and keeps per row only the log-sum-exp of its scores; the backward kernel
recomputes the probabilities from it, as flash attention does, and sums dK and dV over the query blocks in
VMEM. The dropout mask is drawn where it is used (`masks.keep_mask`). On a CPU the kernels run interpreted.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gpt1_jax.kernels import masks

BLOCK = 128  # query rows per kernel iteration; keys are visited in the same blocks up to the diagonal


def fused_attention(q, k, v, *, rate: float = 0.0, streams: jax.Array | None = None,
                    interpret: bool = False) -> jax.Array:
    """The kernels' causal attention: q, k, v [batch, heads, seq, head_dim] -> [batch, heads, seq, head_dim].

    `streams` (`masks.dropout_streams`) is needed when `rate` > 0. A sequence longer than a block is padded to a
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
    return jnp.where(cols <= rows, scores, masks.MASKED), rows, cols


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
            probs = jnp.where(masks.keep_mask(stream, rows, cols, rate), probs * (1.0 / (1.0 - rate)), 0.0)
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
            keep = masks.keep_mask(stream, rows, cols, rate)
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
