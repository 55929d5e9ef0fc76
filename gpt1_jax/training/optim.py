"""The paper's optimiser: Adam with decoupled weight decay, global-norm clipping and its schedules.

Sec. 4.1: Adam (0.9, 0.999, 1e-8), max learning rate 2.5e-4 "increased linearly from zero over the
first 2000 updates and annealed to 0 using a cosine schedule", "a modified version of L2
regularization with w = 0.01 on all non bias or gain weights", and the released code's
gradient clipping at global norm 1. Fine-tuning (Sec. 4.1, "Fine-tuning details") uses a linear
learning-rate decay with warm-up over 0.2% of training.

`optimizer.kind` picks the Adam:
- "released" (the default): the released code's `opt.adam` ("adam with weight decay fix",
  finetune-transformer-lm opt.py), which is the paper's reference [37] (Loshchilov & Hutter's decoupled
  decay) as OpenAI wrote it. A fine-tuning run with it takes the released code's updates.
- "adamw": `optax.adamw`. The two differ in where epsilon sits (optax adds it to the bias-corrected
  sqrt(v), the release to the raw one, so the release moves parameters with tiny gradients less) and in
  the decay's scale (the release multiplies it by the bias correction too).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("warmup_cosine", "warmup_linear", "constant")
KINDS = ("released", "adamw")


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """The update rule and its learning-rate schedule; the recipes build it from their `optimizer.*`."""

    kind: str  # one of KINDS
    lr: float  # the schedule's peak
    b1: float
    b2: float
    eps: float
    weight_decay: float  # decoupled: a fraction of the learning rate times the parameter
    grad_clip_norm: float  # 0: no clipping
    schedule: str  # one of SCHEDULES
    warmup_steps: int  # warmup_cosine
    warmup_fraction: float  # warmup_linear, of all updates


def learning_rate_schedule(opt: OptimizerOptions, total_steps: int) -> optax.Schedule:
    """lr(step) for the schedule named by `opt.schedule`; `step` counts the updates already applied.

    warmup_cosine: peak * step / warmup during warm-up, then peak * (1 + cos(pi * progress)) / 2
    with progress going from 0 at the end of warm-up to 1 at `total_steps` (the pre-training schedule).
    warmup_linear: the released fine-tuning code's `warmup_linear` (opt.py): with x = step / total_steps,
    w = warmup fraction and s = (x <= w), peak * (s * x / w + (1 - s)) * (1 - x). The (1 - x) factor
    applies during warm-up too, and the release calls it with the update count before the update, so
    the first update has lr 0.
    """
    peak = opt.lr
    if opt.schedule == "warmup_cosine":
        warmup = min(opt.warmup_steps, total_steps)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
            end_value=0.0)
    if opt.schedule == "warmup_linear":
        warmup = max(opt.warmup_fraction, 1e-12)

        def schedule(step):
            x = jnp.asarray(step, jnp.float32) / total_steps
            return peak * jnp.where(x <= warmup, x / warmup, 1.0) * jnp.maximum(1.0 - x, 0.0)

        return schedule
    if opt.schedule == "constant":
        return optax.constant_schedule(peak)
    raise ValueError(f"schedule={opt.schedule!r}; choose one of {SCHEDULES}.")


def make_optimizer(opt: OptimizerOptions, total_steps: int, params) -> optax.GradientTransformation:
    """clip(global norm) -> the Adam of `optimizer.kind`, decaying matrices only."""
    schedule = learning_rate_schedule(opt, total_steps)
    if opt.kind == "released":
        adam = released_adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                             mask=rank_mask(params))
    elif opt.kind == "adamw":
        adam = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=rank_mask(params))
    else:
        raise ValueError(f"optimizer kind={opt.kind!r}; choose one of {KINDS}.")
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0 else optax.identity(),
        adam,
    )


class ReleasedAdamState(NamedTuple):
    count: jax.Array  # int32 []: updates applied
    mu: optax.Updates  # first moment, uncorrected
    nu: optax.Updates  # second moment, uncorrected


def released_adam(learning_rate: optax.Schedule, *, b1: float, b2: float, eps: float, weight_decay: float,
                  mask) -> optax.GradientTransformation:
    """Adam as finetune-transformer-lm's `opt.adam` computes it.

    With t the updates already applied and g the (clipped) gradient:
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,
        lr_t = learning_rate(t) * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)),
        p <- p - lr_t * (m / (sqrt(v) + eps) + weight_decay * p)   (the decay term on masked leaves only).
    The bias correction is folded into the step size, so eps is added to the uncorrected sqrt(v).
    """

    def init(params):
        zeros = lambda: jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)  # noqa: E731
        return ReleasedAdamState(jnp.zeros((), jnp.int32), zeros(), zeros())  # two buffers: both are donated

    def update(grads, state, params):
        if params is None:
            raise ValueError("released_adam needs the parameters for its weight decay.")
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, grads)
        t = (state.count + 1).astype(jnp.float32)
        lr_t = learning_rate(state.count) * jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)

        def step(m, v, p, decays):
            direction = m / (jnp.sqrt(v) + eps)
            if decays and weight_decay > 0:
                direction = direction + weight_decay * p
            return -lr_t * direction

        updates = jax.tree.map(step, mu, nu, params, mask)
        return updates, ReleasedAdamState(state.count + 1, mu, nu)

    return optax.GradientTransformation(init, update)


def rank_mask(params):
    """Weight decay mask by the rank of one layer's parameter (the stack axis does not count).

    The release decays tensors of rank > 1 (`len(p.get_shape()) > 1`): weights and the embedding
    tables, not biases or LayerNorm gains.
    """
    def is_matrix(path, p):
        rank = jnp.ndim(p) - (1 if _is_stacked(path) else 0)
        return rank >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def _is_stacked(path) -> bool:
    return any(getattr(k, "key", None) == "blocks" for k in path)
