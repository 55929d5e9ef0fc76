"""Fine-tuning's starting points (config key `init`) and the layer-transfer study (Sec. 5, Figure 2 left).

  ""               from scratch: the paper's "no pre-training" ablation, sizes from config.model,
  anything else    weights as `gpt1_jax.weights.sources` reads them: an Orbax checkpoint folder (a pre-training
                   run's `checkpoints`, `convert --orbax`; the model config comes from its metadata), `mini`,
                   `openai-gpt` or `hf:ORG/NAME[@REVISION]` from the Hugging Face Hub, `hf:<folder>`, `openai:<folder>`.

Sizes rule: the shape keys of config.model (`SHAPE_KEYS`) are 0 in gpt1_jax/configs/finetune.py, meaning "take
them from the checkpoint" (or, from scratch, the paper's 12 x 768 model). A non-zero value is a user
choice: from scratch it is used, with a checkpoint it must equal the checkpoint's value or the run stops
naming the key. Run choices (`RUN_KEYS`: dropouts, dtype, remat, attention, layers, the head's backward)
always come from config.model.

The fine-tuning recipe (`finetune`) reads its starting point here; the weights themselves come from the
library readers (`checkpoint`, `weight_formats`).
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from gpt1_jax.config_check import ConfigError
from gpt1_jax.constants import N_SPECIAL, SHAPE_KEYS
from gpt1_jax.finetuning import tasks
from gpt1_jax.model.heads import TaskModel
from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.training import checkpoint
from gpt1_jax.weights import loading, sources, weight_formats

log = logging.getLogger(__name__)

RUN_KEYS = ("embd_dropout", "attn_dropout", "resid_dropout", "embd_dropout_site", "dtype", "layers",
            "remat", "attention", "head_backward")


def _user_shapes(config: ConfigDict) -> dict:
    return {key: config.model[key] for key in SHAPE_KEYS if config.model[key]}


def _run_choices(config: ConfigDict) -> dict:
    return {key: config.model[key] for key in RUN_KEYS}


def _scratch_config(config: ConfigDict) -> GPT1Config:
    try:
        return GPT1Config(**_user_shapes(config), **_run_choices(config),
                          vocab_pad_multiple=config.model.vocab_pad_multiple)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _openai_n_head(config: ConfigDict) -> int:
    """The release records no head count: model.n_head gives it, 0 meaning GPT-1's 12."""
    return config.model.n_head or weight_formats.DEFAULT_N_HEAD


def load_init(config: ConfigDict) -> tuple[GPT1Config, dict | None, str]:
    """(backbone config without specials, its pre-trained parameters or None, a description).

    Records in `config.init_weights` exactly which weights `init` named (`sources.Source.pinned`).
    """
    if not config.init:
        return _scratch_config(config), None, "scratch (no pre-training)"
    source = sources.resolve(config.init)
    config.init_weights = source.pinned
    with checkpoint.named_by("--config.init"):
        cfg, params = loading.read_weights(source, n_head=_openai_n_head(config))
    return _checked_init_config(config, cfg), params, f"pre-trained ({source.pinned})"


def init_model_config(config: ConfigDict) -> GPT1Config:
    """The fine-tuned backbone's config (special-token rows included) from `config.init`'s metadata alone.

    What `build_params` builds, without reading a weight: a slice can be sized before the weights are at hand.
    """
    if not config.init:
        return _scratch_config(config).replace(n_special=N_SPECIAL)
    source = sources.resolve(config.init, config_only=True)
    if source.kind == sources.HF:
        cfg = weight_formats.read_hf_config(source.folder)
    elif source.kind == sources.OPENAI:
        cfg = weight_formats.read_openai_original_config(source.folder, n_head=_openai_n_head(config))
    else:
        with checkpoint.named_by("--config.init"):
            cfg = checkpoint.read_model_config(source.folder)
    return _checked_init_config(config, cfg).replace(n_special=N_SPECIAL)


def _checked_init_config(config: ConfigDict, cfg: GPT1Config) -> GPT1Config:
    """A checkpoint's backbone config with the run's choices, once its sizes agree with the non-zero model keys."""
    init = config.init
    for key, value in _user_shapes(config).items():
        if getattr(cfg, key) != value:
            raise ConfigError(
                f"model.{key}={value} but the checkpoint init={init} has {key}={getattr(cfg, key)}. Leave model.{key} "
                "at 0 to take the checkpoint's sizes, or point init at a checkpoint of that size.")
    if cfg.n_special not in (0, N_SPECIAL):
        raise ConfigError(f"init={init} has {cfg.n_special} special tokens; fine-tuning needs 0 or {N_SPECIAL}.")
    log.info("Model sizes from init=%s (config.model sizes left at 0 are ignored): %s", init,
             {key: getattr(cfg, key) for key in SHAPE_KEYS})
    return cfg.replace(**_run_choices(config))


def build_params(config: ConfigDict, spec: tasks.TaskSpec, seed: int) -> tuple[GPT1Config, dict, str]:
    """(backbone config with specials, TaskModel parameters as a host pure dict, starting-point description).

    The special-token rows and the head are always freshly initialised (Sec. 3.3). With
    `finetune.transfer_layers` = k >= 0 only the embeddings and the first k blocks keep pre-trained
    values; the later blocks are the fresh draw a from-scratch run of the same seed would use.
    """
    cfg, pretrained, description = load_init(config)
    # One stream per part, so a pre-trained and a from-scratch run of the same seed share the head's init.
    key = jax.random.key(seed)
    fresh = GPT1(cfg.replace(n_special=N_SPECIAL), rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    if pretrained is None:
        backbone = fresh
    else:
        specials = nnx.Rngs(params=jax.random.fold_in(key, 1))
        backbone = weight_formats.model_from_params(cfg, pretrained).with_special_tokens(N_SPECIAL, rngs=specials)
        backbone = _transfer_layers(backbone, fresh, config.finetune.transfer_layers, cfg.n_layer)
        if config.finetune.transfer_layers >= 0:
            description += f", first {config.finetune.transfer_layers} of {cfg.n_layer} layers transferred"
    model = TaskModel(backbone, spec.kind, spec.num_outputs, clf_dropout=config.finetune.clf_dropout,
                      rngs=nnx.Rngs(params=jax.random.fold_in(key, 2)))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return backbone.config, params, description


def _transfer_layers(pretrained: GPT1, fresh: GPT1, k: int, n_layer: int) -> GPT1:
    """`pretrained` with blocks k.. replaced by `fresh`'s (k = -1 keeps all); the blocks are stacked on axis 0."""
    if k < 0:
        return pretrained
    if k > n_layer:
        raise ConfigError(f"finetune.transfer_layers={k} but the checkpoint has {n_layer} layers; use 0..{n_layer} "
                          "or -1 for all.")
    keep = np.arange(n_layer) < k  # [n_layer]
    blocks = jax.tree.map(lambda p, f: np.where(keep.reshape(-1, *([1] * (p.ndim - 1))), p, f),
                          nnx.to_pure_dict(nnx.state(pretrained.blocks)), nnx.to_pure_dict(nnx.state(fresh.blocks)))
    nnx.update(pretrained.blocks, _as_state(pretrained.blocks, blocks))
    return pretrained


def _as_state(module: nnx.Module, values: dict) -> nnx.State:
    state = nnx.state(module)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, values))
    return state


def abstract_model(model_cfg: GPT1Config, spec: tasks.TaskSpec, clf_dropout: float) -> TaskModel:
    """The TaskModel's structure without values (for shapes, shardings and the graph definition)."""
    def make():
        rngs = nnx.Rngs(0)
        return TaskModel(GPT1(model_cfg, rngs=rngs), spec.kind, spec.num_outputs, clf_dropout=clf_dropout, rngs=rngs)

    return nnx.eval_shape(make)
