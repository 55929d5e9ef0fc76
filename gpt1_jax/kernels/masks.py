"""What every attention kernel and its reference agree on: the causal mask's fill and the dropout mask.

The dropout mask is never stored. Whether probability (query i, key j) of head h of sequence b is kept is a
pure function of (seed, b, h, i, j): a counter hash that a kernel evaluates where it uses it, so a backward
pass drops exactly what its forward dropped, by construction, and the TPU kernels, the GPU kernels and
`attention.reference_attention` all drop the same probabilities. `b` is the sequence's index in the global
batch, so the devices of a data-parallel mesh draw different masks; the seed comes from the layer's dropout
key, so steps and layers differ. The hash is murmur3's 32-bit finaliser, run over a per-(b, h) stream word
and the (i, j) counter: a bijection of the counter for each stream, so no two probabilities of a row share
bits. A kept probability is scaled by 1 / (1 - rate) (inverted dropout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

MASKED = -1e30  # scores above the diagonal (finite: exp(MASKED - max) is exactly 0 in float32)
KEEP_BITS = 24  # a probability is kept when the top 24 bits of its hash are >= rate * 2^24
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
    return (bits >> (32 - KEEP_BITS)).astype(jnp.int32) >= int(round(rate * (1 << KEEP_BITS)))
