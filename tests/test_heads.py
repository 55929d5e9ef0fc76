"""The fine-tuning model (Sec. 3.2-3.3): one head per task kind, the classifier dropout, and L3 = L2 + λ·L1."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt1_jax.finetuning import tasks
from gpt1_jax.model.heads import ClassifierHead, TaskModel, gather_positions, task_loss
from gpt1_jax.model.transformer import GPT1, GPT1Config

TINY = GPT1Config(n_special=3, n_ctx=32, width=32, n_head=2, n_layer=2, mlp_width=64)


def tiny_task_model(kind: str, n_out: int) -> TaskModel:
    rngs = nnx.Rngs(0)
    return TaskModel(GPT1(TINY, rngs=rngs), kind, n_out, clf_dropout=0.1, rngs=rngs)


def test_similarity_adds_both_orders():
    """Sec. 3.3: the pair has no natural order, so swapping A and B must not change the logits."""
    model = tiny_task_model(tasks.SIMILARITY, 2)
    a, b = [40478, 5, 6, 7, 40479, 8, 9, 40480], [40478, 8, 9, 40479, 5, 6, 7, 40480]
    tokens = jnp.array([[a, b]])  # [batch 1, rows 2, seq 8]
    positions = jnp.array([[7, 7]])
    logits, _ = model(tokens, positions)
    swapped, _ = model(tokens[:, ::-1], positions)
    assert logits.shape == (1, 2)
    np.testing.assert_allclose(logits, swapped, rtol=1e-6)


def test_multiple_choice_scores_one_logit_per_answer():
    model = tiny_task_model(tasks.MULTIPLE_CHOICE, 1)
    tokens = jax.random.randint(jax.random.key(0), (3, 4, 10), 0, 40478)  # [batch, answers, seq]
    logits, hidden = model(tokens, jnp.full((3, 4), 9))
    assert logits.shape == (3, 4) and hidden.shape == (3, 4, 10, TINY.width)


def test_lm_loss_ignores_padding_tokens():
    """L1 is taken over real tokens only: what sits in padded positions cannot change L3."""
    model = tiny_task_model(tasks.CLASSIFICATION, 2)
    tokens = np.zeros((2, 1, 12), np.int32)
    tokens[:, 0, :8] = [40478, 11, 12, 13, 14, 15, 16, 40480]
    mask = np.zeros((2, 1, 12), np.float32)
    mask[:, :, :8] = 1.0
    batch = {"tokens": tokens, "mask": mask, "classify_positions": np.full((2, 1), 7), "labels": np.array([0, 1]),
             "weights": np.ones(2, np.float32)}
    loss, aux = task_loss(model, batch, None, lm_coef=0.5)
    noisy = dict(batch, tokens=tokens.copy())
    noisy["tokens"][:, :, 8:] = 999  # padding positions only
    noisy_loss, _ = task_loss(model, noisy, None, lm_coef=0.5)
    changed = dict(batch, tokens=tokens.copy())
    changed["tokens"][:, :, 3] = 999  # a real token
    changed_loss, _ = task_loss(model, changed, None, lm_coef=0.5)
    assert float(aux["lm_loss"]) > 0
    assert float(noisy_loss) == pytest.approx(float(loss), abs=1e-6)
    assert float(changed_loss) != pytest.approx(float(loss), abs=1e-4)


def test_classifier_dropout_mask_is_shared_by_the_choices():
    """The release drops the [batch, choices, width] states with noise shape [batch, 1, width]."""
    rngs = nnx.Rngs(0)
    cfg = TINY.replace(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    model = TaskModel(GPT1(cfg, rngs=rngs), tasks.MULTIPLE_CHOICE, 1, clf_dropout=0.5, rngs=rngs)
    tokens = jax.random.randint(jax.random.key(0), (4, 3, 10), 0, 40478)  # [batch, answers, seq]
    graphdef, state = nnx.split(model)

    def logits(kernel):  # d logit[b, k] / d W_y = the dropped state of answer k
        state["head"]["dense"]["kernel"] = nnx.Param(kernel)
        return nnx.merge(graphdef, state)(tokens, jnp.full((4, 3), 9), dropout_key=jax.random.key(1))[0]

    kept = np.asarray(jax.jacobian(logits)(model.head.dense.kernel[...]))[..., 0] != 0  # [batch, answers, width]
    assert 0.3 < kept.mean() < 0.7
    assert (kept == kept[:, :1]).all()  # every answer of an example keeps the same features
    assert not (kept == kept[:1]).all()  # and examples differ


@pytest.mark.parametrize("site, zero_fraction", [("table", 0.1), ("hidden", 0.0)])
def test_lm_head_multiplies_by_the_dropped_embedding_table(site, zero_fraction):
    """The release drops entries of `we` once per step, looks tokens up in it and scores the LM loss
    against it: a table entry that is dropped gets exactly zero gradient, whether its row is in the
    batch (the lookup and the head share the mask) or not (the head alone)."""
    rngs = nnx.Rngs(0)
    cfg = TINY.replace(embd_dropout=0.1, attn_dropout=0.0, resid_dropout=0.0, embd_dropout_site=site)
    model = TaskModel(GPT1(cfg, rngs=rngs), tasks.CLASSIFICATION, 2, clf_dropout=0.0, rngs=rngs)
    tokens = np.random.default_rng(0).integers(0, 200, (4, 1, 16)).astype(np.int32)
    batch = {"tokens": tokens, "mask": np.ones(tokens.shape, np.float32), "labels": np.array([0, 1, 0, 1]),
             "classify_positions": np.full((4, 1), 15), "weights": np.ones(4, np.float32)}
    grads = nnx.grad(lambda m: task_loss(m, batch, jax.random.key(3), lm_coef=0.5)[0])(model)
    table = np.asarray(grads["backbone"]["tokens_embed"][...])[:TINY.n_vocab]  # [rows, width]
    present = np.isin(np.arange(TINY.n_vocab), tokens)
    assert np.mean(table[~present] == 0) == pytest.approx(zero_fraction, abs=0.005)
    assert np.mean(table[present] == 0) == pytest.approx(zero_fraction, abs=0.03)


def test_classifier_head_reads_the_state_at_the_given_positions():
    hidden = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    picked = hidden[jnp.array([0, 1]), jnp.array([4, 1])]
    np.testing.assert_array_equal(gather_positions(hidden, jnp.array([4, 1])), picked)
    head = ClassifierHead(3, 2, rngs=nnx.Rngs(0))
    assert head(gather_positions(hidden, jnp.array([4, 1]))).shape == (2, 2)
    params = nnx.to_pure_dict(nnx.state(ClassifierHead(48, 2, rngs=nnx.Rngs(0)), nnx.Param))
    assert jax.tree.map(jnp.shape, params) == {"dense": {"kernel": (48, 2), "bias": (2,)}}


def test_lm_loss_on_the_real_tokens_alone_equals_the_masked_loss():
    """Scoring only the real targets (a gather per shard, then a sum per row) gives L3 and its gradient as
    the masked loss over every position does, to float32 rounding, on rows of very different lengths; two
    shards here (one per device: each sums its own rows), eight devices in the test below."""
    shards = 2
    model = tiny_task_model(tasks.ENTAILMENT, 3)
    rng = np.random.default_rng(0)
    lengths = np.array([12, 3, 7, 1, 0, 9, 5, 2])  # one row each; the fifth is batch padding (no tokens)
    mask = (np.arange(12)[None, None, :] < lengths[:, None, None]).astype(np.float32)  # [batch 8, rows 1, seq 12]
    tokens = np.where(mask > 0, rng.integers(0, 40478, mask.shape), 0).astype(np.int32)
    batch = {"tokens": tokens, "mask": mask, "classify_positions": np.maximum(lengths - 1, 0)[:, None],
             "labels": rng.integers(0, 3, 8), "weights": (lengths > 0).astype(np.float32)}
    most = max(np.maximum(lengths - 1, 0).reshape(shards, -1).sum(1))  # real next-token targets per shard
    graphdef, params = nnx.split(model)

    def loss(params, slots):
        return task_loss(nnx.merge(graphdef, params), batch, jax.random.key(1), lm_coef=0.5, lm_target_slots=slots,
                         lm_target_shards=shards)

    (dense, dense_aux), dense_grad = jax.value_and_grad(loss, has_aux=True)(params, 0)
    (gathered, aux), grad = jax.value_and_grad(loss, has_aux=True)(params, int(most))
    assert float(aux["lm_loss"]) > 0
    np.testing.assert_allclose(aux["lm_loss"], dense_aux["lm_loss"], rtol=1e-6)
    np.testing.assert_allclose(gathered, dense, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(dense_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # One slot too few drops a target: the sizing (finetune.needed_lm_target_slots) is what keeps it exact.
    (short, short_aux), _ = jax.value_and_grad(loss, has_aux=True)(params, int(most) - 1)
    assert abs(float(short_aux["lm_loss"]) - float(dense_aux["lm_loss"])) > 1e-4


EIGHT_DEVICE_CHECK = """
import jax, numpy as np
from flax import nnx
from gpt1_jax.training import sharding
from gpt1_jax.finetuning import tasks
from gpt1_jax.model.heads import TaskModel, task_loss
from gpt1_jax.model.transformer import GPT1, GPT1Config

assert jax.device_count() == 8
rngs = nnx.Rngs(0)
model = TaskModel(GPT1(GPT1Config(n_special=3, n_ctx=32, width=32, n_head=2, n_layer=2, mlp_width=64), rngs=rngs),
                  tasks.ENTAILMENT, 3, clf_dropout=0.1, rngs=rngs)
rng = np.random.default_rng(0)
lengths = rng.integers(0, 17, 16)
mask = (np.arange(16)[None, None, :] < lengths[:, None, None]).astype(np.float32)  # [16, 1, 16]
batch = {"tokens": np.where(mask > 0, rng.integers(0, 40478, mask.shape), 0).astype(np.int32), "mask": mask,
         "classify_positions": np.maximum(lengths - 1, 0)[:, None], "labels": rng.integers(0, 3, 16),
         "weights": (lengths > 0).astype(np.float32)}
slots = int(np.maximum(lengths - 1, 0).reshape(8, 2).sum(1).max())
graphdef, params = nnx.split(model)
mesh = sharding.make_mesh(1)
placed = {k: jax.device_put(v, sharding.batch_sharding(mesh, np.ndim(v))) for k, v in batch.items()}

def loss(params, batch, slots, shards):
    return task_loss(nnx.merge(graphdef, params), batch, jax.random.key(1), lm_coef=0.5, lm_target_slots=slots,
                     lm_target_shards=shards)[0]

dense, dense_grad = jax.value_and_grad(loss)(params, batch, 0, 1)
grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=(2, 3))
gathered, grad = grad_fn(params, placed, slots, 8)
np.testing.assert_allclose(gathered, dense, rtol=1e-6)
for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(dense_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
print("ok", float(gathered), slots)
"""


def test_the_gather_per_device_on_eight_devices_equals_the_masked_loss_on_one():
    """A batch split over 8 (simulated) devices, each gathering its own rows' real targets, gives L3 and its
    gradient as the masked loss over every position on one device does."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]
