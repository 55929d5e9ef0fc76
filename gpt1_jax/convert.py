"""GPT-1 weights in and out: the original OpenAI release, Hugging Face, and our Orbax checkpoints.

Loading never executes code: numpy with `allow_pickle=False`, safetensors, and PyTorch files
only with `weights_only=True`.

Command line:
    python -m gpt1_jax.convert --openai DIR --orbax OUT      # the original params_*.npy release
    python -m gpt1_jax.convert --hf DIR --orbax OUT          # openai-community/openai-gpt layout
    python -m gpt1_jax.convert --orbax-in CKPT --hf-out OUT  # ours -> transformers
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt1_jax.model import GPT1, GPT1Config

N_ORIGINAL_SHARDS = 10
HF_PREFIX = "transformer."
# transformers counts special tokens in vocab_size; this extra config.json key lets us split them off again.
N_SPECIAL_KEY = "gpt1_jax_n_special"


class WeightFormatError(ValueError):
    """Weights on disk do not have the layout or shapes the model needs."""


# ---------------------------------------------------------------- our parameter tree


def _layer_names(cfg: GPT1Config) -> list[tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """(path in our blocks tree, Hugging Face / original name, per-layer shape), in original order."""
    d, m = cfg.width, cfg.mlp_width
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


def params_from_named(named: dict[str, np.ndarray], cfg: GPT1Config, source: str) -> dict:
    """Hugging Face names (without prefix) -> our pure parameter dict, every shape checked."""

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in named:
            raise WeightFormatError(f"{source}: missing tensor '{name}'.")
        return _check_shape(np.asarray(named[name], np.float32), shape, name, source)

    tokens = take("tokens_embed.weight", (cfg.n_vocab, cfg.width))
    table = np.zeros((cfg.n_vocab_padded, cfg.width), np.float32)
    table[: cfg.n_vocab] = tokens
    params = {
        "tokens_embed": table,
        "positions_embed": take("positions_embed.weight", (cfg.n_ctx, cfg.width)),
        "blocks": {},
    }
    for path, hf_name, shape in _layer_names(cfg):
        layers = [take(f"h.{i}.{hf_name}", shape) for i in range(cfg.n_layer)]
        _set_path(params["blocks"], path, np.stack(layers))  # [n_layer, *shape]
    return params


def named_from_params(params: dict, cfg: GPT1Config) -> dict[str, np.ndarray]:
    """Our pure parameter dict -> Hugging Face names (without prefix); padding rows dropped."""
    named = {
        "tokens_embed.weight": np.asarray(params["tokens_embed"])[: cfg.n_vocab],
        "positions_embed.weight": np.asarray(params["positions_embed"]),
    }
    for path, hf_name, _ in _layer_names(cfg):
        stacked = np.asarray(_get_path(params["blocks"], path))
        for i in range(cfg.n_layer):
            named[f"h.{i}.{hf_name}"] = stacked[i]
    return named


def model_from_params(cfg: GPT1Config, params: dict) -> GPT1:
    """Build a GPT1 holding exactly `params` (a pure dict as `nnx.to_pure_dict` gives)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT1(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def params_of(model: GPT1) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# ---------------------------------------------------------------- the original OpenAI release


def original_names(n_layer: int) -> list[str]:
    """The 146 arrays of params_shapes.json in order, named as Hugging Face names them."""
    names = ["positions_embed.weight", "tokens_embed.weight"]
    for i in range(n_layer):
        names += [f"h.{i}.{name}" for _, name, _ in _layer_names(GPT1Config())]
    return names


def load_openai_original(directory: str | os.PathLike, config: GPT1Config | None = None) -> tuple[GPT1Config, dict]:
    """Read `params_shapes.json` + `params_0.npy`..`params_9.npy` (one flat float32 array split in 10).

    The released table is [positions (n_ctx) | tokens (40478)]; Conv1D kernels are stored as
    (1, in, out). The layer count and sizes are read from the shapes unless `config` is given.
    """
    directory = pathlib.Path(directory)
    shapes_file = directory / "params_shapes.json"
    if not shapes_file.is_file():
        raise WeightFormatError(f"{shapes_file} not found: the original release has params_shapes.json and params_0..9.npy.")
    shapes = [tuple(s) for s in json.loads(shapes_file.read_text())]
    shards = []
    for i in range(N_ORIGINAL_SHARDS):
        shard_file = directory / f"params_{i}.npy"
        if not shard_file.is_file():
            raise WeightFormatError(f"Missing shard {shard_file}: the release has {N_ORIGINAL_SHARDS} files params_0.npy..params_9.npy.")
        shards.append(np.load(shard_file, allow_pickle=False).reshape(-1))
    flat = np.concatenate(shards)
    expected_size = sum(int(np.prod(s)) for s in shapes)
    if flat.size != expected_size:
        raise WeightFormatError(
            f"{directory}: the shards hold {flat.size} values but params_shapes.json describes {expected_size}."
        )
    arrays = np.split(flat, np.cumsum([int(np.prod(s)) for s in shapes])[:-1])
    arrays = [a.reshape(s).astype(np.float32) for a, s in zip(arrays, shapes)]
    if config is None:
        n_ctx, width = shapes[0]
        config = GPT1Config(
            vocab_size=shapes[1][0], n_ctx=n_ctx, width=width, n_layer=(len(shapes) - 2) // 12,
            mlp_width=shapes[8][-1], n_head=_original_heads(width),
        )
    names = original_names(config.n_layer)
    if len(arrays) != len(names):
        raise WeightFormatError(
            f"{shapes_file}: {len(arrays)} arrays but a {config.n_layer}-layer model has {len(names)}."
        )
    named = {name: (a[0] if a.ndim == 3 else a) for name, a in zip(names, arrays)}  # (1, in, out) -> (in, out)
    return config, params_from_named(named, config, str(directory))


def _original_heads(width: int) -> int:
    """The release does not record the head count; GPT-1 uses heads of size 64."""
    return max(1, width // 64)


# ---------------------------------------------------------------- Hugging Face format


def _read_hf_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    safetensors_file = directory / "model.safetensors"
    torch_file = directory / "pytorch_model.bin"
    if safetensors_file.is_file():
        from safetensors.numpy import load_file

        return load_file(str(safetensors_file))
    if torch_file.is_file():
        try:
            import torch
        except ImportError as err:
            raise WeightFormatError(f"{torch_file} needs PyTorch to read; install torch or convert it to safetensors.") from err
        state = torch.load(torch_file, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise WeightFormatError(f"{directory}: neither model.safetensors nor pytorch_model.bin found.")


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


def load_hf(directory: str | os.PathLike) -> tuple[GPT1Config, dict]:
    """Read a `save_pretrained` directory of OpenAIGPTModel / OpenAIGPTLMHeadModel."""
    directory = pathlib.Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise WeightFormatError(f"{config_file} not found: a Hugging Face model directory has config.json.")
    config = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    tensors = _read_hf_tensors(directory)
    named = {k.removeprefix(HF_PREFIX): v for k, v in tensors.items() if k != "lm_head.weight"}
    return config, params_from_named(named, config, str(directory))


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


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt1_jax.convert", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--openai", help="folder with params_shapes.json and params_0..9.npy")
    source.add_argument("--hf", help="folder with config.json and model.safetensors or pytorch_model.bin")
    source.add_argument("--orbax-in", help="an Orbax checkpoint of ours (pre-training or converted)")
    parser.add_argument("--orbax", help="write an Orbax checkpoint here (fine-tuning's --config.init)")
    parser.add_argument("--hf-out", help="write a Hugging Face model folder here")
    args = parser.parse_args(argv)
    if not (args.orbax or args.hf_out):
        parser.error("give --orbax and/or --hf-out")

    from gpt1_jax import checkpoint

    if args.openai:
        config, params = load_openai_original(args.openai)
    elif args.hf:
        config, params = load_hf(args.hf)
    else:
        config, params, _ = checkpoint.load_pretrained(args.orbax_in)
    model = model_from_params(config, params)
    if args.orbax:
        checkpoint.save_pretrained(args.orbax, model, metadata={"source": args.openai or args.hf or args.orbax_in})
        print(f"Wrote Orbax checkpoint to {args.orbax}")
    if args.hf_out:
        save_hf(model, args.hf_out)
        print(f"Wrote Hugging Face model to {args.hf_out}")


if __name__ == "__main__":
    main()
