"""Causal self-attention with dropout on its probabilities, fused: which kernel runs where, and the reference.

GPT-1 drops attention probabilities: the released code's `attn` computes `w = dropout(softmax(w))` before
`w @ v`. Written in XLA, the step keeps the float32 scores, their probabilities and the dropout mask of every
layer for the backward pass, [batch, heads, seq, seq] each: 3.9 GiB per v5e chip for the paper's config
(docs/benchmarks.md). The kernels keep per row only the log-sum-exp of its scores and recompute the
probabilities in the backward pass, as flash attention does, drawing the dropout mask where they use it
(`masks`): `attention_tpu` (Mosaic) on TPUs and `attention_gpu` (Triton) on GPUs.

`reference_attention` is the same computation in plain JAX over the full [seq, seq] scores, the mask from
the same hash; the tests compare each kernel with it in Pallas's interpret mode on CPU, forward and
gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from gpt1_jax.kernels import attention_gpu, attention_tpu, masks


def reference_attention(q, k, v, *, rate: float = 0.0, streams: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d), causal), dropped as the kernels drop it, times v; q, k, v and the result
    [batch, heads, seq, head_dim], the scores and probabilities in float32."""
    batch, heads, seq, head_dim = q.shape
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    rows, cols = lax.broadcasted_iota(jnp.int32, (seq, seq), 0), lax.broadcasted_iota(jnp.int32, (seq, seq), 1)
    probs = jax.nn.softmax(jnp.where(cols <= rows, scores, masks.MASKED), axis=-1)  # [batch, heads, seq, seq]
    if rate:
        keep = jax.vmap(lambda stream: masks.keep_mask(stream, rows, cols, rate))(streams)
        probs = jnp.where(keep.reshape(batch, heads, seq, seq), probs / (1.0 - rate), 0.0)
    return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def causal_attention(q, k, v, *, rate: float, dropout_key: jax.Array, data_axes: tuple[str, ...],
                     kernels: str | None = None) -> jax.Array:
    """The model's attention with dropout, fused: q, k, v and the result [batch, seq, heads, head_dim].

    `kernels` ("tpu" or "gpu") defaults to the platform being traced for; on a CPU the TPU kernels run
    interpreted, and "gpu" there runs the GPU kernels interpreted (tests). Under a mesh whose axes include
    `data_axes` (the training step traces under its abstract mesh), each device runs the kernels on its own
    rows of the batch (a Pallas call has no rule for splitting itself), drawing the masks of their global
    batch indices.
    """
    mesh, platform = jax.sharding.get_abstract_mesh(), tracing_platform()
    kernels = kernels or {"cpu": "tpu", "tpu": "tpu", "gpu": "gpu"}.get(platform)
    if kernels is None:
        raise ValueError(f"model.attention=fused runs on TPUs and GPUs (and on CPUs, interpreted), not on "
                         f"{platform}: use model.attention=auto or faithful there.")
    interpret = platform == "cpu"
    sharded = not mesh.empty and set(data_axes) <= set(mesh.axis_names)

    def local(q, k, v, dropout_key):
        batch, _, heads, _ = q.shape
        offset = lax.axis_index(data_axes) * batch if sharded else 0
        streams = masks.dropout_streams(dropout_key, batch, heads, offset)
        if kernels == "gpu":
            return attention_gpu.fused_attention(q, k, v, rate=rate, streams=streams, interpret=interpret)
        heads_first = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]  # [batch, heads, seq, head_dim]
        out = attention_tpu.fused_attention(*heads_first, rate=rate, streams=streams, interpret=interpret)
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
