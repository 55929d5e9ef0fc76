"""The fused causal attention with in-kernel dropout, TPU (Mosaic) and GPU (Triton) kernels alike: numerics
against the reference and against the model's own attention for the same mask, the statistics of the mask,
the GPU kernels lowered for a GPU (the TPU ones are compiled for a slice in tests/aot/test_steps.py)."""

import functools
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt1_jax.kernels import attention, attention_gpu, attention_tpu, masks
from gpt1_jax.model import transformer as model_lib
from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.weights.weight_formats import model_from_params, params_of


def qkv(batch: int, heads: int, seq: int, head_dim: int = 64, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (batch, heads, seq, head_dim), jnp.float32) for key in keys]


def tpu_kernels(q, k, v, *, rate, streams):
    return attention_tpu.fused_attention(q, k, v, rate=rate, streams=streams, interpret=True)


def gpu_kernels(q, k, v, *, rate, streams):
    """The GPU kernels in the tests' layout [batch, heads, seq, head_dim]; they take the model's."""
    swap = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    return swap(attention_gpu.fused_attention(*map(swap, (q, k, v)), rate=rate, streams=streams, interpret=True))


EACH_KERNEL = pytest.mark.parametrize("kernels", [tpu_kernels, gpu_kernels], ids=["tpu", "gpu"])


@EACH_KERNEL
@pytest.mark.parametrize("batch, heads, seq, head_dim", [
    (2, 1, 128, 64),  # one head; one TPU block, two GPU blocks
    (1, 3, 256, 64),  # several heads, blocks whose keys span the earlier blocks
    (3, 2, 77, 24),  # a fine-tuning batch's context, padded to a block inside (and head_dim to 32 on a GPU)
])
@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_kernels_equal_the_reference_forward_and_gradients(kernels, batch, heads, seq, head_dim, rate):
    q, k, v = qkv(batch, heads, seq, head_dim)
    streams = masks.dropout_streams(jax.random.key(7), batch, heads)
    kernel = functools.partial(kernels, rate=rate, streams=streams)
    reference = functools.partial(attention.reference_attention, rate=rate, streams=streams)
    np.testing.assert_allclose(kernel(q, k, v), reference(q, k, v), atol=2e-6)
    weights = jax.random.normal(jax.random.key(1), q.shape)  # a loss that weighs every output differently
    grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * weights), argnums=(0, 1, 2))(q, k, v)
             for f in (kernel, reference)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=5e-6)


def test_the_gpu_kernels_lower_to_three_triton_calls_for_a_gpu():
    """The paper's attention, bfloat16, forward and backward, lowered for CUDA on this CPU machine: Pallas
    writes each kernel's Triton IR at lowering, so a kernel Triton cannot express fails here, not on a GPU."""
    batch, seq, heads, head_dim = 2, 512, 12, 64
    x = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.bfloat16)

    def loss(q, k, v, key):
        streams = masks.dropout_streams(key, batch, heads)
        return jnp.sum(attention_gpu.fused_attention(q, k, v, rate=0.1, streams=streams).astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, jax.random.key(0))
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert sorted(re.findall(r'name = "(gpt1_attention\w+)"', text)) == [
        "gpt1_attention_backward_by_key_block", "gpt1_attention_backward_by_query_block",
        "gpt1_attention_forward_by_query_block"]
    assert f"{batch}x{heads}x{seq}x{seq}" not in text and f"{batch}x{seq}x{heads}x{seq}" not in text


TINY = GPT1Config(vocab_size=101, n_ctx=40, width=64, n_head=2, n_layer=2, mlp_width=128, embd_dropout=0.0,
                  attn_dropout=0.1, resid_dropout=0.0)


def test_the_model_with_the_kernels_equals_its_written_out_attention_given_the_kernels_mask(monkeypatch):
    """attention="fused" against "faithful" whose dropout of the probabilities draws the kernels' mask: the
    same hidden states and gradients, through both layers of the scan."""
    fused = GPT1(TINY.replace(attention="fused"), rngs=nnx.Rngs(0))
    faithful = model_from_params(TINY.replace(attention="faithful"), params_of(fused))
    tokens = jax.random.randint(jax.random.key(2), (3, TINY.n_ctx), 0, TINY.vocab_size)
    plain_dropout = model_lib.dropout

    def kernels_mask(x, rate, key, **kwargs):
        if x.ndim != 4:  # not the probabilities [batch, heads, seq, seq]
            return plain_dropout(x, rate, key, **kwargs)
        batch, heads, seq, _ = x.shape
        grid = jax.lax.broadcasted_iota(jnp.int32, (seq, seq), 0), jax.lax.broadcasted_iota(jnp.int32, (seq, seq), 1)
        keep = jax.vmap(lambda s: masks.keep_mask(s, *grid, rate))(masks.dropout_streams(key, batch, heads))
        return jnp.where(keep.reshape(x.shape), x / (1.0 - rate), 0.0)

    monkeypatch.setattr(model_lib, "dropout", kernels_mask)
    key = jax.random.key(5)

    def loss(model):
        return jnp.sum(model(tokens, dropout_key=key) ** 2)

    np.testing.assert_allclose(fused(tokens, dropout_key=key), faithful(tokens, dropout_key=key), atol=2e-5)
    got, want = (nnx.grad(loss)(m) for m in (fused, faithful))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)


def kernels_mask(kernels, rate: float, streams, batch: int, heads: int, seq: int = 128) -> np.ndarray:
    """The mask the forward kernel applied, read off its output: with q = k = 0 every allowed key weighs
    1 / (row + 1), and with v the identity, output [i, j] is that weight, kept or dropped and rescaled."""
    zeros = jnp.zeros((batch, heads, seq, seq), jnp.float32)
    identity = jnp.broadcast_to(jnp.eye(seq, dtype=jnp.float32), zeros.shape)
    out = kernels(zeros, zeros, identity, rate=rate, streams=streams)
    scaled = np.asarray(out) * (np.arange(seq)[:, None] + 1) * (1.0 - rate)  # 1 where kept, 0 where dropped
    assert np.all(np.isclose(scaled, 0.0, atol=1e-5) | np.isclose(scaled, 1.0, atol=1e-5))
    return np.isclose(scaled, 1.0, atol=1e-5)[..., np.tril_indices(seq)[0], np.tril_indices(seq)[1]]


@EACH_KERNEL
def test_the_in_kernel_mask_keeps_90_percent_and_differs_by_head_row_step_and_device(kernels):
    rate, batch, heads = 0.1, 2, 12
    streams = masks.dropout_streams(jax.random.key(3), batch, heads)
    mask = kernels_mask(kernels, rate, streams, batch, heads)  # [batch, heads, 8,256 probabilities of the triangle]
    kept, n = mask.mean(), mask.size
    assert abs(kept - 0.9) < 4 * math.sqrt(0.9 * 0.1 / n), kept
    flat = mask.reshape(batch * heads, -1)
    assert len({row.tobytes() for row in flat}) == batch * heads  # every (sequence, head) its own mask
    # The rows of one head: the 64 probabilities of row 63 against those of row 64 (its first 64 keys).
    triangle = np.tril_indices(128)
    row = lambda i: flat[0][triangle[0] == i][:64]  # noqa: E731
    assert not np.array_equal(row(63), row(64))
    next_step = kernels_mask(kernels, rate, masks.dropout_streams(jax.random.key(4), batch, heads), batch, heads)
    assert (next_step != mask).mean() > 0.1
    # The device holding global sequences 2 and 3 draws other masks than the one holding 0 and 1 ...
    other_device = kernels_mask(kernels, rate, masks.dropout_streams(jax.random.key(3), batch, heads, 2), batch, heads)
    assert (other_device != mask).mean() > 0.1
    # ... and a device that holds all four draws both.
    both = kernels_mask(kernels, rate, masks.dropout_streams(jax.random.key(3), 4, heads), 4, heads)
    np.testing.assert_array_equal(both[:2], mask)
    np.testing.assert_array_equal(both[2:], other_device)
    # The same key, the same mask.
    np.testing.assert_array_equal(kernels_mask(kernels, rate, streams, batch, heads), mask)


@EACH_KERNEL
def test_the_backward_kernel_drops_what_the_forward_dropped(kernels):
    """The gradients equal the written-out attention's under the mask read off the forward kernel's output."""
    rate, batch, heads, seq = 0.1, 1, 2, 128
    streams = masks.dropout_streams(jax.random.key(9), batch, heads)
    rows, cols = np.tril_indices(seq)
    keep = np.zeros((batch, heads, seq, seq), bool)
    keep[..., rows, cols] = kernels_mask(kernels, rate, streams, batch, heads, seq)
    q, k, v = qkv(batch, heads, seq, seed=4)

    def with_mask(q, k, v):
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        probs = jax.nn.softmax(jnp.where(np.tril(np.ones((seq, seq), bool)), scores, -1e30), axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", jnp.where(keep, probs / (1 - rate), 0.0), v)

    def fused(q, k, v):
        return kernels(q, k, v, rate=rate, streams=streams)

    weights = jax.random.normal(jax.random.key(8), q.shape)
    got, want = (jax.grad(lambda *x, f=f: jnp.sum(f(*x) * weights), argnums=(0, 1, 2))(q, k, v)
                 for f in (fused, with_mask))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=5e-6)


# Run in a process of its own, with 8 simulated CPU devices: a mesh of 4 x 2 over (data, fsdp).
EIGHT_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gpt1_jax.kernels import attention
from gpt1_jax.training.sharding import DATA_AXES

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), DATA_AXES)
q, k, v = (jax.random.normal(jax.random.key(i), (8, 128, 2, 64)) for i in range(3))  # [batch, seq, heads, dim]
key, weights = jax.random.key(5), jax.random.normal(jax.random.key(6), (8, 128, 2, 64))

for kernels in ("tpu", "gpu"):
    def loss(q, k, v):
        out = attention.causal_attention(q, k, v, rate=0.1, dropout_key=key, data_axes=DATA_AXES, kernels=kernels)
        return jnp.sum(out * weights)

    def on_mesh(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    rows = NamedSharding(mesh, P(DATA_AXES))
    sharded = jax.jit(on_mesh, in_shardings=(rows, rows, rows))(q, k, v)
    whole = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)  # one device, the whole batch
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
print("equal")
"""


@pytest.mark.slow
def test_on_eight_devices_each_runs_its_rows_with_the_masks_of_their_global_indices():
    """Under the training step's mesh every device runs the kernels (TPU's, then GPU's) on its own sequences,
    drawing the masks of their places in the global batch: loss and gradients equal one device's over the
    whole batch."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "equal", done.stderr[-3000:]
