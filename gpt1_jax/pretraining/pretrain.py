"""Generative pre-training (objective L1, Sec. 3.1) as a recipe of the shared loop (`train_lib.run`).

What is particular to pre-training: the LM loss over windows of a token stream, validation
perplexity beside the unigram baseline, the zero-shot probes of Figure 2 (right) as training goes
on, and throughput (tokens/s, model FLOPs utilisation) in the logs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from gpt1_jax import config_check, run_options, storage
from gpt1_jax.aot import measure, slices
from gpt1_jax.config_check import ConfigError
from gpt1_jax.model import losses
from gpt1_jax.model.losses import lm_loss_sum
from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.pretraining.lm_pipeline import LMData, VocabularyTooSmallError, default_cache_dir
from gpt1_jax.pretraining.zeroshot_tracking import ZeroShotTracker, probe_examples, probe_names
from gpt1_jax.training import checkpoint, optim, sharding, train_lib, workdir_guard
from gpt1_jax.training.preemption import StopRequest
from gpt1_jax.training.run_log import RunLog

PEAK_FLOPS = {  # bfloat16 dense peak per device; used for MFU when train.peak_flops is 0.
    **{kind: tpu.peak_bf16_flops for tpu in slices.GENERATIONS.values() for kind in tpu.device_kinds},
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def model_config(config: ConfigDict) -> GPT1Config:
    """`config.model` as a GPT1Config, or a ConfigError naming the bad value."""
    try:
        return GPT1Config.from_dict(config.model.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err


def initial_params(model_cfg: GPT1Config, seed: int) -> dict:
    return nnx.to_pure_dict(nnx.state(GPT1(model_cfg, rngs=nnx.Rngs(params=seed))))


def abstract_model(model_cfg: GPT1Config) -> GPT1:
    return nnx.eval_shape(lambda: GPT1(model_cfg, rngs=nnx.Rngs(0)))


def make_lm_loss(config: ConfigDict):
    """graphdef -> loss_fn(params, tokens [batch, n_ctx + 1], key): the mean next-token NLL (L1)."""
    chunk = config.train.loss_chunk

    def make(graphdef):
        def loss_fn(params, tokens, key):
            model = nnx.merge(graphdef, params)
            hidden = model(tokens[:, :-1], dropout_key=key)  # [batch, n_ctx, width]
            total, count = lm_loss_sum(model, hidden, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape),
                                       table=model.head_table(dropout_key=key), chunk=chunk)
            return total / count, {}

        return loss_fn

    return make


def compile_pretraining(config: ConfigDict, model_cfg: GPT1Config, optimizer, schedule,
                        devices=None) -> train_lib.Compiled:
    """The sharded, donating L1 train step for `model_cfg` on the configured mesh (over `devices`, default all)."""
    windows = jax.ShapeDtypeStruct((config.train.batch_size, model_cfg.n_ctx + 1), jnp.int32)  # [batch, n_ctx + 1]
    return train_lib.compile_run(run_options.loop_options(config), abstract_model(model_cfg), optimizer, schedule,
                                 make_lm_loss(config), windows, devices)


def make_lm_eval_step(graphdef, config: ConfigDict):
    """(params, tokens [batch, n_ctx + 1], weights [batch]) -> (sum NLL, number of tokens)."""

    def eval_step(params, tokens, weights):
        return losses.window_nll(nnx.merge(graphdef, params), tokens, weights, config.train.loss_chunk)

    return eval_step


def lm_data(config: ConfigDict) -> LMData:
    """The run's corpus, windows and validation; a ConfigError naming model.vocab_size when it is too small.

    A SIGTERM or Ctrl-C while the corpus is tokenized into the token cache ends the build at once
    (`preemption.Interrupted`, which train.py reports and exits 0 on): a batch of text can take a minute,
    and a build has nothing worth finishing; its temporary folder is removed and the rerun builds it.
    """
    options = run_options.lm_data_options(config)
    phase = f"reading data.source into the token cache in {options.cache_dir or default_cache_dir()}"
    try:
        with StopRequest(phase, at_once=True):
            return LMData.build(options)
    except VocabularyTooSmallError as err:
        raise ConfigError(f"model.vocab_size={err.vocab_size} is smaller than the tokenizer's {err.tokenizer_ids:,} "
                          f"ids: larger ids would index past the token table. Set model.vocab_size to at least "
                          f"{err.tokenizer_ids}.") from None


def zeroshot_probe_names(config: ConfigDict) -> list[str]:
    """The probes of `zeroshot.tasks`, or a ConfigError naming the zeroshot key to fix."""
    try:
        names = probe_names(config.zeroshot.tasks)
    except ValueError as err:
        raise ConfigError(f"zeroshot.tasks: {err}") from None
    if config.zeroshot.every < 0 or config.zeroshot.max_examples < 0:
        raise ConfigError("zeroshot.every and zeroshot.max_examples must be >= 0 (0: every eval step, all examples).")
    return names


def zeroshot_tracker(config: ConfigDict, tokenizer) -> ZeroShotTracker:
    """The probes' examples, read once before training so that a missing file fails the launch, not a late step."""
    probes, examples = config.zeroshot, {}
    for name in zeroshot_probe_names(config):
        try:
            with run_options.task_data_keys():
                examples[name] = probe_examples(name, probes.split, probes.max_examples,
                                                run_options.task_data_options(config), config.data.on_error)
        except (OSError, ValueError) as err:
            raise ConfigError(f"zeroshot.tasks={name!r}, zeroshot.split={probes.split!r}: {err}") from err
    return ZeroShotTracker(examples, every=probes.every or config.train.eval_every,
                           last_step=config.train.num_steps, tokenizer=tokenizer)


def evaluate_lm(eval_step, params, data: LMData, mesh, check_stop: Callable[[], None] = lambda: None
                ) -> dict[str, float]:
    """Validation loss and perplexity over the fixed held-out windows; `check_stop()` runs before each batch
    (and raises to abandon the evaluation, see `train_lib.Recipe`)."""
    total, count = 0.0, 0.0
    for batch in data.validation:
        check_stop()
        nll, n = eval_step(params, *sharding.global_batch((batch.tokens, batch.weights), mesh))
        total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def forward_flops_per_token(cfg: GPT1Config, seq: int, *, lm_head: bool = True) -> float:
    """Model FLOPs of one forward pass per token at context `seq`, counting matmuls only."""
    per_layer = 2 * (3 * cfg.width**2 + cfg.width**2 + 2 * cfg.width * cfg.mlp_width) + 2 * 2 * seq * cfg.width
    return cfg.n_layer * per_layer + (2 * cfg.width * cfg.n_vocab if lm_head else 0)


def train_flops_per_token(cfg: GPT1Config, seq: int) -> float:
    """Model FLOPs of forward + backward per token (3 x forward), counting matmuls only."""
    return 3.0 * forward_flops_per_token(cfg, seq)


def peak_flops(config: ConfigDict) -> float:
    if config.train.peak_flops > 0:
        return config.train.peak_flops * jax.device_count()
    kind = jax.devices()[0].device_kind
    return PEAK_FLOPS.get(kind, math.nan) * jax.device_count()


def pretrain(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Pre-train with objective L1 until `train.num_steps`; resumes from the workdir's latest checkpoint."""
    workdir_path = storage.path(workdir)
    config_check.check_pretrain(config)
    model_cfg = model_config(config)
    zeroshot_probe_names(config)  # before the workdir is claimed; the probe files are read after the corpus
    total_steps = config.train.num_steps
    optimizer_options = run_options.optimizer_options(config)
    schedule = optim.learning_rate_schedule(optimizer_options, total_steps)
    abstract_params = jax.eval_shape(lambda: initial_params(model_cfg, 0))
    optimizer = optim.make_optimizer(optimizer_options, total_steps, abstract_params)
    # On a TPU slice, a step that does not fit stops the run here, before it claims the workdir or reads data:
    # the step's shapes come from the config alone.
    compiled = measure.check_before_training(compile_pretraining(config, model_cfg, optimizer, schedule))
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(workdir_guard.claim(workdir_path, config))  # locked until the run ends, any way
        data = lm_data(config)
        probes = zeroshot_tracker(config, data.tokenizer)
        eval_step = jax.jit(make_lm_eval_step(compiled.graphdef, config))
        checkpointer = cleanup.enter_context(contextlib.closing(checkpoint.TrainCheckpointer(
            workdir_path / "checkpoints", keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)))
        state, resumed = train_lib.restore_or_init(checkpointer, compiled,
                                                   lambda: initial_params(model_cfg, config.seed), optimizer)
        start = int(state.step)
        run_log = cleanup.enter_context(contextlib.closing(RunLog(
            workdir_path, total_steps=total_steps, initial_step=start, description="pre-train")))
        if resumed:
            run_log.message(f"Resumed from step {start} in {checkpointer.directory}.")
        run_log.message(f"Unigram baseline perplexity on validation: {data.unigram_perplexity:.1f}")
        tokens_per_step = config.train.batch_size * model_cfg.n_ctx
        flops_per_step = train_flops_per_token(model_cfg, model_cfg.n_ctx) * tokens_per_step

        @contextlib.contextmanager
        def batches(start_step: int):
            with data.batches(start_step, total_steps) as local:
                yield (sharding.global_batch(tokens, compiled.mesh) for _, tokens in local)

        def evaluate(done: int, state: train_lib.TrainState, check_stop: Callable[[], None]) -> dict[str, float]:
            scores = {}
            if config.train.eval_every and (done % config.train.eval_every == 0 or done == total_steps):
                scores.update(evaluate_lm(eval_step, state.params, data, compiled.mesh, check_stop))
            if probes.due(done):
                scores.update(probes.evaluate(compiled.graphdef, state.params, check_stop))
            return scores

        def derived(scalars: dict, seconds_per_step: float) -> dict[str, float]:
            return {"perplexity": math.exp(min(scalars["loss"], 50.0)),
                    "tokens_per_s": tokens_per_step / seconds_per_step,
                    "mfu": flops_per_step / seconds_per_step / peak_flops(config)}

        recipe = train_lib.Recipe(
            total_steps=total_steps, batches=batches, evaluate=evaluate, derived=derived,
            metadata=train_lib.run_metadata(run_options.as_json(config), model_cfg.to_dict(),
                                            data.tokenizer.fingerprint, "pretrain"))
        _, final = train_lib.run(run_options.loop_options(config), compiled, state, checkpointer, run_log, recipe)
    return final
