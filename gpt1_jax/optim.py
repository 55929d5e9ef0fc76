"""The paper's optimiser: Adam with decoupled weight decay, global-norm clipping and its schedules.

Sec. 4.1: Adam (0.9, 0.999, 1e-8), max learning rate 2.5e-4 "increased linearly from zero over the
first 2000 updates and annealed to 0 using a cosine schedule", "a modified version of L2
regularization with w = 0.01 on all non bias or gain weights", and the released code's
gradient clipping at global norm 1. Fine-tuning (Sec. 4.1, "Fine-tuning details") uses a linear
learning-rate decay with warm-up over 0.2% of training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

SCHEDULES = ("warmup_cosine", "warmup_linear", "constant")


def learning_rate_schedule(opt: ConfigDict, total_steps: int) -> optax.Schedule:
    """lr(step) for the schedule named by `optimizer.schedule`.

    warmup_cosine: peak * step / warmup during warm-up, then peak * (1 + cos(pi * progress)) / 2
    with progress going from 0 at the end of warm-up to 1 at `total_steps` (the pre-training schedule).
    warmup_linear: the released fine-tuning code's `warmup_linear`: with x = step / total_steps and
    w = warmup fraction, peak * x / w while x < w, then peak * (1 - x).
    """
    peak = opt.lr
    if opt.schedule == "warmup_cosine":
        warmup = min(opt.warmup_steps, total_steps)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0)
    if opt.schedule == "warmup_linear":
        warmup = max(opt.warmup_fraction, 1e-12)

        def schedule(step):
            x = jnp.asarray(step, jnp.float32) / total_steps
            return peak * jnp.where(x < warmup, x / warmup, jnp.maximum(1.0 - x, 0.0))

        return schedule
    if opt.schedule == "constant":
        return optax.constant_schedule(peak)
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; choose one of {SCHEDULES}.")


def make_optimizer(opt: ConfigDict, total_steps: int, params) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(decoupled decay scaled by the scheduled learning rate)."""
    schedule = learning_rate_schedule(opt, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                    mask=rank_mask(params)),
    )


def rank_mask(params):
    """Weight decay mask by the rank of one layer's parameter (the stack axis does not count)."""
    def is_matrix(path, p):
        rank = jnp.ndim(p) - (1 if _is_stacked(path) else 0)
        return rank >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def _is_stacked(path) -> bool:
    return any(getattr(k, "key", None) == "blocks" for k in path)

