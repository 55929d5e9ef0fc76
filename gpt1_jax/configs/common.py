"""Defaults shared by every recipe: the run, data, optimizer, checkpoint and mesh sections."""

import os

from ml_collections import ConfigDict

from gpt1_jax.constants import DATA_ENV, VOCAB_SIZE


def has_local_data() -> bool:
    return bool(os.environ.get(DATA_ENV))


def model_section(**overrides) -> ConfigDict:
    """GPT1Config's fields; the defaults are the paper's 12 x 768 model."""
    model = ConfigDict(dict(
        vocab_size=VOCAB_SIZE, n_special=0, n_ctx=512, width=768, n_head=12, n_layer=12, mlp_width=3072,
        embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1, embd_dropout_site="table", dtype="float32",
        vocab_pad_multiple=128, layers="auto", remat="none", attention="auto", head_backward="compute"))
    model.update(overrides)
    return model


def base_config() -> ConfigDict:
    config = ConfigDict()
    config.mode = "pretrain"
    config.seed = 0
    # Move whatever the workdir holds into previous-<time>/ and start from step 0, even with the same config:
    # keep it out of a command that is rerun to resume (a preemptible job's restart).
    config.start_over = False
    # Resume a workdir whose train.num_steps changed (the schedule is recomputed for the new length).
    config.extend = False
    config.task = ""
    config.init = ""
    # Written by a fine-tuning run, not read: the exact weights `init` named (a hub name at the commit its revision
    # resolved to), so config.json and results.json say which weights a result came from.
    config.init_weights = ""
    config.model = model_section()
    config.data = ConfigDict(dict(
        source="", tfds_data_dir="", vocab_dir="", cache_dir="", val_fraction=0.01, shard_by_process=True,
        # Task data (fine-tuning, zero-shot probes): "local" files under $GPT1_JAX_DATA laid out like
        # shared/data, or "tfds" under data.tfds_data_dir.
        task_source="local" if has_local_data() else "tfds",
        # A bad row of a task file: "raise" (an error naming file and line) or "skip" (skipped, counted, logged).
        on_error="raise",
        # A text corpus whose bytes are not UTF-8 for more than 1% of its characters is refused unless True.
        allow_replacement=False))
    # kind: "released" is the released code's Adam (opt.py), the one OpenAI wrote for the paper's
    # decoupled weight decay [37]; its pre-training code is not public, so pre-training uses it too, as
    # the closest evidence of what the paper ran. "adamw" is optax.adamw (gpt1_jax/training/optim.py says how
    # they differ).
    config.optimizer = ConfigDict(dict(
        kind="released", lr=2.5e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0,
        schedule="warmup_cosine", warmup_steps=2000, warmup_fraction=0.002))
    config.train = ConfigDict(dict(
        batch_size=64, grad_accum_steps=1, num_steps=1000, log_every=50, eval_every=1000, eval_batch_size=64,
        eval_batches=0, loss_chunk=0, nonfinite="stop", peak_flops=0.0,
        # With nonfinite="skip": fail at the end when more than this fraction of the updates was skipped.
        max_nonfinite_fraction=0.1,
        # Save and exit after this step (0: never), for time-sliced jobs; rerun without it to continue.
        stop_at=0,
        # A jax.profiler trace of these updates ("FIRST-LAST" or "STEP"; "": off) under the run's tensorboard/
        # folder, shown by TensorBoard's Profile tab; the first update of a (re)start includes compilation.
        profile_steps=""))
    # Zero-shot probes during pre-training (Figure 2, right): comma-separated task names of
    # gpt1_jax.pretraining.zeroshot_probes.PROBES, run every `every` steps (0: with validation) on the first
    # `max_examples` examples (0: all) of `split`.
    config.zeroshot = ConfigDict(dict(tasks="", every=0, max_examples=200, split="validation"))
    config.checkpoint = ConfigDict(dict(every=1000, keep=3, async_save=True))
    config.mesh = ConfigDict(dict(fsdp=1))
    return config
