"""The fine-tuning model (Sec. 3.2-3.3): the pre-trained backbone plus one linear layer W_y.

Every task arrives as `[batch, rows, seq]` token rows built by `gpt1_jax.finetuning.task_inputs`; the only
new parameters are W_y and the three special-token embeddings, as the paper stresses ("the only
extra parameters we require during fine-tuning are W_y, and embeddings for delimiter tokens").
How the `_classify_` hidden states of the rows meet W_y depends on the task kind alone:
- classification / entailment: one row, softmax over the labels,
- similarity: both orders of the pair, the two states added element-wise before W_y (Sec. 3.3),
  with one real output and a squared-error loss for STS-B,
- multiple choice: each row (context + answer k) scored to one logit, softmax over the rows.

The objective is L3 = L2 + lambda * L1 (Sec. 3.2, Eq. 5): the task loss plus the language-model loss
on the task's own text, which "improves generalization" and "accelerates convergence". L1 is taken as
the released code takes it (finetune-transformer-lm train.py `model`): the mean NLL of each row's real
tokens, then the mean over rows, with the softmax over the whole dropped embedding table
[BPE | specials | positions] unless `lm_softmax_rows="tokens"`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gpt1_jax.finetuning import tasks
from gpt1_jax.model.losses import real_target_nll_sums, token_nll_of
from gpt1_jax.model.transformer import GPT1, dropout, linear

_PAIR_SUM = (tasks.SIMILARITY, tasks.REGRESSION_SIMILARITY)
# Rows of the auxiliary LM softmax: "all" = the released code's whole table `we` (BPE, specials and the
# run's position rows); "tokens" = BPE and specials only, 512 fewer rows for GPT-1 at full context.
LM_SOFTMAX_ROWS = ("all", "tokens")


class ClassifierHead(nnx.Module):
    """W_y of Sec. 3.2: a linear layer on the hidden state read at the `_classify_` position."""

    def __init__(self, width: int, n_out: int, *, dropout_rate: float = 0.1, rngs: nnx.Rngs):
        self.dropout_rate = dropout_rate
        self.dense = linear(width, n_out, jnp.float32, rngs)

    def __call__(self, pooled, *, dropout_key=None, shared_axes: tuple[int, ...] = ()):
        """pooled [..., width] -> float32 outputs [..., n_out].

        `shared_axes`: axes of `pooled` that share one dropout mask. The released code drops the
        `[batch, choices, width]` states with noise shape `[batch, 1, width]`, one mask per example.
        """
        pooled = dropout(pooled.astype(jnp.float32), self.dropout_rate, dropout_key, shared_axes=shared_axes)
        return self.dense(pooled)


def gather_positions(hidden, positions):
    """hidden [batch, seq, width], positions [batch] -> [batch, width]: the state at each position."""
    return jnp.take_along_axis(hidden, positions[:, None, None].astype(jnp.int32), axis=1)[:, 0]


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
        body_key, head_key = _body_and_head_keys(dropout_key)
        hidden = self.backbone(tokens.reshape(batch * rows, seq), dropout_key=body_key)  # [batch*rows, seq, width]
        pooled = gather_positions(hidden, classify_positions.reshape(batch * rows))  # [batch*rows, width]
        pooled = pooled.reshape(batch, rows, -1)  # [batch, rows, width]
        hidden = hidden.reshape(batch, rows, seq, -1)
        if self.kind == tasks.MULTIPLE_CHOICE:
            # One dropout mask per example, shared by its answers (the release's noise shape [batch, 1, width]).
            return self.head(pooled, dropout_key=head_key, shared_axes=(1,))[..., 0], hidden  # [batch, rows]
        if self.kind in _PAIR_SUM:
            pooled = pooled.sum(axis=1)  # [batch, width]: both orders added (Sec. 3.3)
        else:
            pooled = pooled[:, 0]  # [batch, width]: the single row
        outputs = self.head(pooled, dropout_key=head_key)  # [batch, n_out]
        return (outputs[:, 0] if self.kind == tasks.REGRESSION_SIMILARITY else outputs), hidden

    def row_lm_losses(self, hidden, tokens, mask, *, dropout_key=None, softmax_rows: str = "all", chunk: int = 0,
                      target_slots: int = 0, target_shards: int = 1):
        """L1 of every row, float32 [batch, rows]: the mean NLL of its real next tokens (0 for an empty row).

        hidden [batch, rows, seq, width] from `__call__` with the same `dropout_key`; tokens, mask
        [batch, rows, seq]. Position t predicts token t + 1, counted where mask[t + 1] is 1.
        `target_slots` > 0 scores only the real targets, that many per shard of `target_shards`
        (`losses.real_target_nll_sums`); 0 scores every position and masks.
        """
        if softmax_rows not in LM_SOFTMAX_ROWS:
            raise ValueError(f"finetune.lm_softmax_rows={softmax_rows!r}; choose one of {LM_SOFTMAX_ROWS}.")
        batch, rows, seq, width = hidden.shape
        body_key, _ = _body_and_head_keys(dropout_key)
        table = self.backbone.head_table(dropout_key=body_key, position_rows=seq if softmax_rows == "all" else 0)
        hidden = hidden[:, :, :-1].reshape(-1, seq - 1, width)  # [batch*rows, seq-1, width]
        next_tokens = tokens[:, :, 1:].reshape(-1, seq - 1)
        targets = mask[:, :, 1:].reshape(-1, seq - 1).astype(jnp.float32)
        if target_slots:
            sums = real_target_nll_sums(self.backbone, hidden, next_tokens, targets, slots=target_slots,
                                        shards=target_shards, table=table, chunk=chunk)
        else:
            sums = jnp.sum(token_nll_of(self.backbone, hidden, next_tokens, table=table, chunk=chunk) * targets, -1)
        per_row = sums / jnp.maximum(jnp.sum(targets, axis=-1), 1.0)
        return per_row.reshape(batch, rows)


def _body_and_head_keys(dropout_key):
    """The task model's split of its dropout key: (backbone, classifier head); (None, None) in evaluation."""
    if dropout_key is None:
        return None, None
    body_key, head_key = jax.random.split(dropout_key)
    return body_key, head_key


def task_loss(model: TaskModel, batch: dict, key, *, lm_coef: float, lm_softmax_rows: str = "all",
              loss_chunk: int = 0, lm_target_slots: int = 0, lm_target_shards: int = 1):
    """(L3, {"task_loss": L2, "lm_loss": L1}) over the real examples of `batch` (weights > 0).

    As the released code: L2 is the mean cross-entropy (squared error for regression) over examples;
    L1 the mean over rows of each row's mean next-token NLL (`TaskModel.row_lm_losses`), over the rows
    that hold tokens, so batch padding counts in neither. `lm_coef` = 0 skips L1 and its 40k-way softmax
    entirely (the "no auxiliary loss" ablation); `lm_target_slots` > 0 computes it on the real tokens alone.
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
    per_row = model.row_lm_losses(hidden, batch["tokens"], batch["mask"], dropout_key=key,
                                  softmax_rows=lm_softmax_rows, chunk=loss_chunk, target_slots=lm_target_slots,
                                  target_shards=lm_target_shards)  # [batch, rows]
    real_rows = (jnp.sum(batch["mask"][:, :, 1:], axis=-1) > 0).astype(jnp.float32)  # [batch, rows]
    lm = jnp.sum(per_row * real_rows) / jnp.maximum(jnp.sum(real_rows), 1.0)
    return task + lm_coef * lm, {"task_loss": task, "lm_loss": lm}


def predictions(kind: str, outputs):
    """Model outputs -> predicted label index (answer index for multiple choice) or score (regression)."""
    if kind == tasks.REGRESSION_SIMILARITY:
        return outputs
    return jnp.argmax(outputs, axis=-1)
