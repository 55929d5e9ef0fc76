"""GPT-1's weight layouts, to and from our parameter tree: the original OpenAI release and Hugging Face.

This module maps tensor names and shapes between the formats and our parameter tree; `weight_files`
reads the files (never running code, refusing damaged or unsafe ones). Both loaders also refuse
weights holding NaN or inf, naming each such tensor, so fine-tuning's `init=hf:`/`init=openai:`,
`gpt1-generate --hf` and `gpt1-convert` (`gpt1_jax/convert.py`, the command line over this library) are
covered alike; `allow_nonfinite` turns that into a warning. Every tensor a file holds must be one the model
uses (`params_from_named`), save the harmless extras of older Hugging Face folders (`HF_CONSTANT_BUFFERS`,
`HF_TIED_OUTPUT`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.weights.weight_files import (
    WeightFormatError,
    check_finite,
    name_mismatch,
    read_hf_tensors,
    read_shard,
)

N_ORIGINAL_SHARDS = 10
SHAPES_FILE = "params_shapes.json"
# GPT-1's 12 heads of 64 (Sec. 4.1). The release does not record a head count, so the user gives it.
DEFAULT_N_HEAD = 12
HF_PREFIX = "transformer."
# transformers counts special tokens in vocab_size; this extra config.json key lets us split them off again.
N_SPECIAL_KEY = "gpt1_jax_n_special"
# Tensors that older transformers versions saved besides the parameters (transformers 5's save_pretrained
# writes only the parameters: tests/test_convert.py::test_transformers_save_pretrained_writes_only_the_parameters).
# Both are buffers the model rebuilds from its config, so they hold no weight to lose: `position_ids`, the
# positions 0..n_ctx-1, and each block's `attn.bias`, the causal mask tril(ones) [1, 1, n_ctx, n_ctx] (not
# `attn.c_attn.bias`, a parameter). They were persistent buffers, written into every state dict.
HF_CONSTANT_BUFFERS = re.compile(r"position_ids|h\.\d+\.attn\.bias")
# The output layer, which GPT-1 ties to the token embedding (Eq. 2 scores tokens with W_e); older versions
# saved the tied copy too. It is dropped only when it equals tokens_embed.weight: an untied one holds weights
# this model has no place for, and is reported as unused.
HF_TIED_OUTPUT = "lm_head.weight"


# ---------------------------------------------------------------- our parameter tree


def _layer_names(d: int, m: int) -> list[tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """(path in our blocks tree, Hugging Face / original name, per-layer shape) for width d and MLP width m,
    in original order."""
    return [
        (("attn", "qkv", "kernel"), "attn.c_attn.weight", (d, 3 * d)),
        (("attn", "qkv", "bias"), "attn.c_attn.bias", (3 * d,)),
        (("attn", "proj", "kernel"), "attn.c_proj.weight", (d, d)),
        (("attn", "proj", "bias"), "attn.c_proj.bias", (d,)),
        (("ln_1", "scale"), "ln_1.weight", (d,)),
        (("ln_1", "bias"), "ln_1.bias", (d,)),
        (("mlp", "fc", "kernel"), "mlp.c_fc.weight", (d, m)),
        (("mlp", "fc", "bias"), "mlp.c_fc.bias", (m,)),
        (("mlp", "proj", "kernel"), "mlp.c_proj.weight", (m, d)),
        (("mlp", "proj", "bias"), "mlp.c_proj.bias", (d,)),
        (("ln_2", "scale"), "ln_2.weight", (d,)),
        (("ln_2", "bias"), "ln_2.bias", (d,)),
    ]


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _check_shape(array: np.ndarray, expected: tuple[int, ...], name: str, source: str) -> np.ndarray:
    if tuple(array.shape) != tuple(expected):
        raise WeightFormatError(
            f"{source}: '{name}' has shape {tuple(array.shape)} but the model config expects {tuple(expected)}. "
            "Check that the checkpoint and the config describe the same model (width, layers, vocab, n_ctx)."
        )
    return array


def params_from_named(named: dict[str, np.ndarray], cfg: GPT1Config, source: str, remedy: str) -> dict:
    """Hugging Face names (without prefix) -> our pure parameter dict, every shape checked.

    `named` must hold exactly the tensors of a model of `cfg`: looking up only the names `cfg` lists would
    drop the rest unnoticed (4 layers of weights under a 3-layer config lost h.3.*). A difference is an error
    naming `source`, the tensors, and `remedy`, what the user should do about it.
    """
    if mismatch := name_mismatch(named, original_names(cfg.n_layer)):
        raise WeightFormatError(f"{source}: {mismatch}. {remedy}")

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return _check_shape(np.asarray(named[name], np.float32), shape, name, source)

    tokens = take("tokens_embed.weight", (cfg.n_vocab, cfg.width))
    table = np.zeros((cfg.n_vocab_padded, cfg.width), np.float32)
    table[: cfg.n_vocab] = tokens
    params = {
        "tokens_embed": table,
        "positions_embed": take("positions_embed.weight", (cfg.n_ctx, cfg.width)),
        "blocks": {},
    }
    for path, hf_name, shape in _layer_names(cfg.width, cfg.mlp_width):
        layers = [take(f"h.{i}.{hf_name}", shape) for i in range(cfg.n_layer)]
        _set_path(params["blocks"], path, np.stack(layers))  # [n_layer, *shape]
    return params


def named_from_params(params: dict, cfg: GPT1Config) -> dict[str, np.ndarray]:
    """Our pure parameter dict -> Hugging Face names (without prefix); padding rows dropped."""
    named = {
        "tokens_embed.weight": np.asarray(params["tokens_embed"])[: cfg.n_vocab],
        "positions_embed.weight": np.asarray(params["positions_embed"]),
    }
    for path, hf_name, _ in _layer_names(cfg.width, cfg.mlp_width):
        stacked = np.asarray(_get_path(params["blocks"], path))
        for i in range(cfg.n_layer):
            named[f"h.{i}.{hf_name}"] = stacked[i]
    return named


def checked_finite(params: dict, cfg: GPT1Config, source: str | os.PathLike, allow: bool) -> dict:
    """`params`, once `check_finite` found no NaN or inf in them (the tensors the model uses, by Hugging Face
    name, so a bad tensor the model ignores, or padding, is not blamed)."""
    check_finite(named_from_params(params, cfg), str(source), allow=allow)
    return params


def model_from_params(cfg: GPT1Config, params: dict) -> GPT1:
    """Build a GPT1 holding exactly `params` (a pure dict as `nnx.to_pure_dict` gives)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT1(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def params_of(model: GPT1) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ---------------------------------------------------------------- the original OpenAI release

ARRAYS_PER_LAYER = len(_layer_names(1, 1))  # 12 arrays per block in params_shapes.json


def original_names(n_layer: int) -> list[str]:
    """The 146 arrays of params_shapes.json in order, named as Hugging Face names them."""
    names = ["positions_embed.weight", "tokens_embed.weight"]
    for i in range(n_layer):
        names += [f"h.{i}.{name}" for _, name, _ in _layer_names(1, 1)]  # names do not depend on sizes
    return names


def original_shapes(n_ctx: int, vocab: int, d: int, m: int, n_layer: int) -> list[tuple[int, ...]]:
    """What params_shapes.json lists: positions [n_ctx, d], tokens [vocab, d], then 12 arrays per layer
    with the Conv1D kernels stored as (1, in, out)."""
    per_layer = [(1, *shape) if len(shape) == 2 else shape for _, _, shape in _layer_names(d, m)]
    return [(n_ctx, d), (vocab, d)] + per_layer * n_layer


def load_openai_original(directory: str | os.PathLike, *, n_head: int = DEFAULT_N_HEAD,
                         config: GPT1Config | None = None, allow_nonfinite: bool = False) -> tuple[GPT1Config, dict]:
    """Read `params_shapes.json` + `params_0.npy`..`params_9.npy` (one flat float32 vector cut in 10).

    The released table is [positions (n_ctx) | tokens (40478)]; Conv1D kernels are stored as
    (1, in, out). Layer count and sizes are read from the shapes, which are checked against that layout
    first so a wrong file fails naming the entry. The release does not record the head count (heads only
    split c_attn's columns when the model runs), so it is `n_head` (`--n-head`, default GPT-1's 12),
    checked to divide the width. A given `config` fixes every size, its head count included (`n_head` is
    then unused), and the weights are checked against it: each array used, none missing. NaN or inf weights
    are refused (`weight_files.check_finite`) unless `allow_nonfinite`.
    """
    directory = pathlib.Path(directory)
    shapes_file = directory / SHAPES_FILE
    shapes = _read_original_shapes(shapes_file)
    flat = _read_original_shards(directory, shapes)  # [total]
    arrays = np.split(flat, np.cumsum([math.prod(s) for s in shapes])[:-1])
    arrays = [a.reshape(s) for a, s in zip(arrays, shapes)]
    if config is None:
        config = _original_config(shapes, n_head, shapes_file)
    n_layer = (len(shapes) - 2) // ARRAYS_PER_LAYER
    named = {name: (a[0] if a.ndim == 3 else a) for name, a in zip(original_names(n_layer), arrays)}  # (1, in, out)
    remedy = (f"The model config given ({config.n_layer} layers) must describe the release ({n_layer} layers in "
              f"{SHAPES_FILE}): give the matching one, or none to read the sizes from the release.")
    params = params_from_named(named, config, f"{directory} ({SHAPES_FILE} and its shards)", remedy)
    return config, checked_finite(params, config, directory, allow_nonfinite)


def read_openai_original_config(directory: str | os.PathLike, *, n_head: int = DEFAULT_N_HEAD) -> GPT1Config:
    """The release's model config from `params_shapes.json` alone (no weights read), as `load_openai_original`."""
    shapes_file = pathlib.Path(directory) / SHAPES_FILE
    return _original_config(_read_original_shapes(shapes_file), n_head, shapes_file)


def _read_original_shapes(shapes_file: pathlib.Path) -> list[tuple[int, ...]]:
    """params_shapes.json, checked entry by entry against the release's layout.

    The width d comes from entry 0 (positions [n_ctx, d]) and the MLP width m from entry 8 (the first
    c_fc kernel (1, d, m)); every other entry must then be what `original_shapes` derives from them.
    """
    if not shapes_file.is_file():
        raise WeightFormatError(f"{shapes_file} not found: the original release has {SHAPES_FILE} and params_0..9.npy.")
    try:
        shapes = json.loads(shapes_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightFormatError(f"{shapes_file}: not valid JSON ({err}); use the release's {SHAPES_FILE}.") from err
    if not isinstance(shapes, list):
        raise WeightFormatError(f"{shapes_file}: expected a JSON list of shapes, found a {type(shapes).__name__}.")
    for i, shape in enumerate(shapes):
        if not (isinstance(shape, list) and shape and all(type(n) is int and n > 0 for n in shape)):
            raise WeightFormatError(f"{shapes_file} entry {i}: expected a shape (a list of positive integers), "
                                    f"found {shape!r}.")
    if len(shapes) < 2 + ARRAYS_PER_LAYER or (len(shapes) - 2) % ARRAYS_PER_LAYER:
        raise WeightFormatError(
            f"{shapes_file}: expected 2 + {ARRAYS_PER_LAYER} k entries (positions, tokens, then {ARRAYS_PER_LAYER} "
            f"arrays per layer; 146 for GPT-1's 12 layers), found {len(shapes)}. Use the release's {SHAPES_FILE}.")
    if len(shapes[0]) != 2:
        raise WeightFormatError(f"{shapes_file} entry 0 (positions_embed.weight): expected (n_ctx, width), "
                                f"found {tuple(shapes[0])}.")
    n_layer = (len(shapes) - 2) // ARRAYS_PER_LAYER
    (n_ctx, d), vocab, m = shapes[0], shapes[1][0], shapes[8][-1]
    expected = original_shapes(n_ctx, vocab, d, m, n_layer)
    for i, (name, want, found) in enumerate(zip(original_names(n_layer), expected, shapes)):
        if tuple(found) != want:
            raise WeightFormatError(
                f"{shapes_file} entry {i} ({name}): expected {want}, found {tuple(found)} (width {d} from entry 0, "
                f"MLP width {m} from entry 8). Use the release's {SHAPES_FILE}.")
    return expected


def _read_original_shards(directory: pathlib.Path, shapes: list[tuple[int, ...]]) -> np.ndarray:
    """The shards concatenated into the flat vector [total] of every array in params_shapes.json order.

    The folder must hold exactly the release's shards: a missing one would shift every array after it, and
    an extra one (params_10.npy) would be weights left out.
    """
    files = [directory / f"params_{i}.npy" for i in range(N_ORIGINAL_SHARDS)]
    found = [shard_file.name for shard_file in directory.glob("params_*.npy")]
    if mismatch := name_mismatch(found, [shard_file.name for shard_file in files], noun="shard"):
        raise WeightFormatError(f"{directory}: {mismatch}. The release has {N_ORIGINAL_SHARDS} shards "
                                f"params_0.npy..params_{N_ORIGINAL_SHARDS - 1}.npy beside {SHAPES_FILE}: use its "
                                "folder as downloaded.")
    shards = [read_shard(shard_file) for shard_file in files]
    expected = sum(math.prod(s) for s in shapes)
    found = sum(shard.size for shard in shards)
    if found != expected:
        raise WeightFormatError(
            f"{directory}/params_0.npy..params_{N_ORIGINAL_SHARDS - 1}.npy: expected {expected} values in total (the "
            f"shapes in {SHAPES_FILE}), found {found} (per shard: {[shard.size for shard in shards]}). The shards and "
            f"{SHAPES_FILE} must come from the same release.")
    return np.concatenate(shards)  # [total]


def _original_config(shapes: list[tuple[int, ...]], n_head: int, shapes_file: pathlib.Path) -> GPT1Config:
    """Sizes from the (checked) release shapes, with the user's head count checked to divide the width."""
    (n_ctx, width), vocab = shapes[0], shapes[1][0]
    if n_head < 1 or width % n_head:
        raise WeightFormatError(
            f"--n-head {n_head} does not divide the width {width} read from {shapes_file}: give the head count the "
            f"weights were trained with, a positive divisor of {width} (12 for GPT-1; fine-tuning's init=openai: "
            "takes it from model.n_head).")
    return GPT1Config(vocab_size=vocab, n_ctx=n_ctx, width=width, n_head=n_head,
                      n_layer=(len(shapes) - 2) // ARRAYS_PER_LAYER, mlp_width=shapes[8][-1])


# ---------------------------------------------------------------- Hugging Face format


def config_from_hf(hf_config: dict, source: str) -> GPT1Config:
    afn = hf_config.get("afn", "gelu")
    if afn != "gelu":
        raise WeightFormatError(f"{source}: afn={afn!r}; GPT-1 uses 'gelu' (the tanh approximation).")
    width = hf_config["n_embd"]
    n_special = hf_config.get(N_SPECIAL_KEY, 0)
    return GPT1Config(
        vocab_size=hf_config["vocab_size"] - n_special,
        n_special=n_special,
        n_ctx=hf_config["n_positions"],
        width=width,
        n_head=hf_config["n_head"],
        n_layer=hf_config["n_layer"],
        mlp_width=4 * width,
        embd_dropout=hf_config.get("embd_pdrop", 0.1),
        attn_dropout=hf_config.get("attn_pdrop", 0.1),
        resid_dropout=hf_config.get("resid_pdrop", 0.1),
    )


def read_hf_config(directory: str | os.PathLike) -> GPT1Config:
    """The model config of a `save_pretrained` directory, from its config.json alone."""
    config_file = pathlib.Path(directory) / "config.json"
    if not config_file.is_file():
        raise WeightFormatError(f"{config_file} not found: a Hugging Face model directory has config.json.")
    return config_from_hf(json.loads(config_file.read_text()), str(config_file))


def load_hf(directory: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[GPT1Config, dict]:
    """Read a `save_pretrained` directory of OpenAIGPTModel / OpenAIGPTLMHeadModel.

    The weights file must hold exactly the tensors its config.json describes, besides the harmless extras
    older transformers versions saved (`HF_CONSTANT_BUFFERS`, `HF_TIED_OUTPUT`). NaN or inf weights are refused
    (`weight_files.check_finite`) unless `allow_nonfinite`.
    """
    directory = pathlib.Path(directory)
    config = read_hf_config(directory)
    weights_file, tensors = read_hf_tensors(directory)
    remedy = (f"Its config.json (n_layer={config.n_layer}, n_embd={config.width}) must describe these weights: fix "
              "config.json, or use the folder the weights were saved in (with every tensor save_pretrained wrote).")
    params = params_from_named(_without_harmless_extras(tensors), config, str(weights_file), remedy)
    return config, checked_finite(params, config, directory, allow_nonfinite)


def _without_harmless_extras(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A save_pretrained file's tensors by their names in OpenAIGPTModel (OpenAIGPTLMHeadModel's prefix
    "transformer." removed), without the constant buffers and the tied output layer older versions saved."""
    named = {name.removeprefix(HF_PREFIX): array for name, array in tensors.items()
             if not HF_CONSTANT_BUFFERS.fullmatch(name.removeprefix(HF_PREFIX))}
    tokens = named.get("tokens_embed.weight")
    if HF_TIED_OUTPUT in named and tokens is not None and np.array_equal(named[HF_TIED_OUTPUT], tokens):
        del named[HF_TIED_OUTPUT]
    return named


def save_hf(model: GPT1, directory: str | os.PathLike) -> None:
    """Write config.json + model.safetensors that `OpenAIGPTLMHeadModel.from_pretrained` loads.

    Special-token rows are part of the vocabulary there (vocab_size = 40478 + n_special).
    """
    from safetensors.numpy import save_file

    cfg = model.config
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    named = named_from_params(params_of(model), cfg)
    tensors = {HF_PREFIX + k: np.ascontiguousarray(v, np.float32) for k, v in named.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        "architectures": ["OpenAIGPTLMHeadModel"],
        "model_type": "openai-gpt",
        "vocab_size": cfg.n_vocab,
        "n_positions": cfg.n_ctx,
        "n_embd": cfg.width,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "afn": "gelu",
        "resid_pdrop": cfg.resid_dropout,
        "embd_pdrop": cfg.embd_dropout,
        "attn_pdrop": cfg.attn_dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        N_SPECIAL_KEY: cfg.n_special,
    }
    if cfg.mlp_width != 4 * cfg.width:
        raise WeightFormatError(f"model.mlp_width={cfg.mlp_width}: the Hugging Face model fixes it to 4 x width.")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
