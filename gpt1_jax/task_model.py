"""The fine-tuning model (Sec. 3.2-3.3): the pre-trained backbone plus one linear layer W_y.

Every task arrives as `[batch, rows, seq]` token rows built by `gpt1_jax.data.task_inputs`; the only
new parameters are W_y and the three special-token embeddings, as the paper stresses ("the only
extra parameters we require during fine-tuning are W_y, and embeddings for delimiter tokens").
How the `_classify_` hidden states of the rows meet W_y depends on the task kind alone:
- classification / entailment: one row, softmax over the labels,
- similarity: both orders of the pair, the two states added element-wise before W_y (Sec. 3.3),
  with one real output and a squared-error loss for STS-B,
- multiple choice: each row (context + answer k) scored to one logit, softmax over the rows.

The objective is L3 = L2 + lambda * L1 (Sec. 3.2, Eq. 5): the task loss plus the language-model loss
on the task's own text, which "improves generalization" and "accelerates convergence".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gpt1_jax import tasks
from gpt1_jax.losses import lm_loss_sum
from gpt1_jax.model import GPT1, ClassifierHead, gather_positions

N_SPECIAL = 3  # _start_, _delimiter_, _classify_ (Sec. 3.3)
_PAIR_SUM = (tasks.SIMILARITY, tasks.REGRESSION_SIMILARITY)


class TaskModel(nnx.Module):
    """`backbone` (a GPT1 with the special-token rows) and `head` (W_y) for one task kind.

    Its state is the pure dict {"backbone": ..., "head": ...}, so the backbone's parameter paths keep
    their names and the partition rules and weight-decay mask of pre-training apply unchanged.
    """

    def __init__(self, backbone: GPT1, kind: str, n_out: int, *, clf_dropout: float, rngs: nnx.Rngs):
        if kind not in tasks.KINDS:
            raise ValueError(f"unknown task kind {kind!r}; kinds: {tasks.KINDS}")
        self.kind = kind
        self.backbone = backbone
        self.head = ClassifierHead(backbone.config.width, n_out, dropout_rate=clf_dropout, rngs=rngs)

    def __call__(self, tokens, classify_positions, *, dropout_key=None):
        """tokens [batch, rows, seq], classify_positions [batch, rows] -> (outputs, hidden).

        outputs (float32): [batch, labels] for classification, entailment and similarity; [batch] for
        regression; [batch, rows] (one logit per answer) for multiple choice.
        hidden: [batch, rows, seq, width], the last layer's states (for the auxiliary LM loss).
        """
        batch, rows, seq = tokens.shape
        body_key, head_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        hidden = self.backbone(tokens.reshape(batch * rows, seq), dropout_key=body_key)  # [batch*rows, seq, width]
        pooled = gather_positions(hidden, classify_positions.reshape(batch * rows))  # [batch*rows, width]
        pooled = pooled.reshape(batch, rows, -1)  # [batch, rows, width]
        hidden = hidden.reshape(batch, rows, seq, -1)
        if self.kind == tasks.MULTIPLE_CHOICE:
            return self.head(pooled, dropout_key=head_key)[..., 0], hidden  # [batch, rows]
        if self.kind in _PAIR_SUM:
            pooled = pooled.sum(axis=1)  # [batch, width]: both orders added (Sec. 3.3)
        else:
            pooled = pooled[:, 0]  # [batch, width]: the single row
        outputs = self.head(pooled, dropout_key=head_key)  # [batch, n_out]
        return (outputs[:, 0] if self.kind == tasks.REGRESSION_SIMILARITY else outputs), hidden


def task_loss(model: TaskModel, batch: dict, key, *, lm_coef: float, loss_chunk: int = 0):
    """(L3, {"task_loss": L2, "lm_loss": L1}) over the real examples of `batch` (weights > 0).

    L2 is the mean cross-entropy (squared error for regression) over real examples; L1 the mean
    next-token NLL over real tokens of every row, the targets weighted by the mask so padding never
    counts. `lm_coef` = 0 skips L1 and its 40k-way softmax entirely (the "no auxiliary loss" ablation).
    """
    outputs, hidden = model(batch["tokens"], batch["classify_positions"], dropout_key=key)
    weights = batch["weights"]  # [batch]
    if model.kind == tasks.REGRESSION_SIMILARITY:
        per_example = jnp.square(outputs - batch["labels"])
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["labels"].astype(jnp.int32))
    task = jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    if lm_coef == 0.0:
        return task, {"task_loss": task, "lm_loss": jnp.zeros((), jnp.float32)}
    lm = lm_loss(model.backbone, hidden, batch["tokens"], batch["mask"], chunk=loss_chunk)
    return task + lm_coef * lm, {"task_loss": task, "lm_loss": lm}


def lm_loss(backbone: GPT1, hidden, tokens, mask, *, chunk: int = 0):
    """L1 on the task's text: hidden [batch, rows, seq, width] predicts tokens[..., 1:], weighted by mask[..., 1:]."""
    width = hidden.shape[-1]
    seq = tokens.shape[-1]
    total, count = lm_loss_sum(backbone, hidden[:, :, :-1].reshape(-1, seq - 1, width),
                               tokens[:, :, 1:].reshape(-1, seq - 1), mask[:, :, 1:].reshape(-1, seq - 1),
                               chunk=chunk)
    return total / jnp.maximum(count, 1.0)


def predictions(kind: str, outputs):
    """Model outputs -> predicted label index (answer index for multiple choice) or score (regression)."""
    if kind == tasks.REGRESSION_SIMILARITY:
        return outputs
    return jnp.argmax(outputs, axis=-1)
