"""`gpt1-convert`: GPT-1 weights in and out, between the original OpenAI release, Hugging Face and our Orbax
checkpoints (the layouts themselves: `weight_formats`). Every tensor of the input must be one of the model its
config describes, and none may lack: a difference is refused, naming the tensors. Weights holding NaN or inf are
refused, naming each such tensor; `--allow_nonfinite` turns that into a warning.

Command line (installed as `gpt1-convert`):
    python -m gpt1_jax.convert --openai DIR --orbax OUT [--n_head N]  # the original params_*.npy release
    python -m gpt1_jax.convert --hf DIR --orbax OUT                   # openai-community/openai-gpt layout
    python -m gpt1_jax.convert --hf openai-gpt --orbax OUT            # the released GPT-1, from the hub
    python -m gpt1_jax.convert --hf hf:ORG/NAME@REV --orbax OUT       # any OpenAIGPT model on the hub
    python -m gpt1_jax.convert --orbax_in CKPT --hf_out OUT           # ours -> transformers
    python -m gpt1_jax.convert --hf DIR --orbax OUT --allow_nonfinite # NaN/inf weights kept, with a warning
    python -m gpt1_jax.convert --orbax_in RUN/checkpoints --orbax OUT --dtype bfloat16  # half-size, to ship
"""

from __future__ import annotations

from absl import flags

from gpt1_jax import cli
from gpt1_jax.weights import sources
from gpt1_jax.weights.weight_formats import (
    DEFAULT_N_HEAD,
    checked_finite,
    load_hf,
    load_openai_original,
    model_from_params,
    save_hf,
)

# ---------------------------------------------------------------- command line


SYNOPSIS = ("(--openai DIR [--n_head N] | --hf DIR | --orbax_in CKPT) [--orbax OUT [--dtype bfloat16]] [--hf_out OUT] "
            "[--allow_nonfinite]")


def _define_flags(flag_values: flags.FlagValues) -> None:
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("openai", None, "Read the original release: a folder with params_shapes.json and "
                        "params_0..9.npy.", **define)
    flags.DEFINE_string("hf", None, "Read a Hugging Face folder with config.json and model.safetensors or "
                        "pytorch_model.bin, or a model on the hub: openai-gpt (the released GPT-1), "
                        "hf:ORG/NAME[@REVISION].", **define)
    flags.DEFINE_string("orbax_in", None, "Read an Orbax checkpoint of ours (pre-training or converted).", **define)
    flags.mark_flags_as_mutual_exclusive(["openai", "hf", "orbax_in"], required=True, **define)
    flags.DEFINE_integer("n_head", None, f"Attention heads of the --openai release, which does not record them "
                         f"(default {DEFAULT_N_HEAD}, GPT-1's).", **define)
    flags.DEFINE_string("orbax", None, "Write an Orbax checkpoint here (fine-tuning's --config.init).", **define)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "The dtype of the --orbax parameters: bfloat16 "
                      "halves the files (the model widens them to float32 when it loads them).", **define)
    flags.DEFINE_string("hf_out", None, "Write a Hugging Face model folder here.", **define)
    flags.DEFINE_boolean("allow_nonfinite", False, "Convert weights holding NaN or inf, with a warning, instead of "
                         "refusing them.", **define)
    flags.register_multi_flags_validator(["orbax", "hf_out"], lambda f: bool(f["orbax"] or f["hf_out"]),
                                         message="give --orbax and/or --hf_out", **define)
    flags.register_multi_flags_validator(
        ["n_head", "openai"], lambda f: f["n_head"] is None or f["openai"] is not None,
        message="--n_head is for --openai only: the other formats record their head count", **define)
    flags.register_multi_flags_validator(
        ["dtype", "orbax"], lambda f: f["dtype"] == "float32" or f["orbax"] is not None,
        message="--dtype is for --orbax only: Hugging Face folders are written in float32", **define)


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python -m gpt1_jax.convert` (`gpt1-convert`); `argv` excludes the program name."""
    args = cli.parse(argv, _define_flags, prog="python -m gpt1_jax.convert", synopsis=SYNOPSIS, doc=__doc__).flags

    from gpt1_jax.training import checkpoint

    provenance = {}  # an Orbax input's training run and tokenizer, which gpt1-evaluate reads for its unigram column
    if args.openai:
        n_head = DEFAULT_N_HEAD if args.n_head is None else args.n_head
        config, params = load_openai_original(args.openai, n_head=n_head, allow_nonfinite=args.allow_nonfinite)
    elif args.hf:
        source = sources.resolve(sources.hf_location(args.hf))  # a folder, or a hub name fetched first
        config, params = load_hf(source.folder, allow_nonfinite=args.allow_nonfinite)
        provenance = {"weights": source.pinned}
    else:
        with checkpoint.named_by("--orbax_in"):
            config, params, metadata = checkpoint.load_pretrained(args.orbax_in)
        provenance = {key: metadata[key] for key in ("config", "tokenizer") if key in metadata}
        params = checked_finite(params, config, args.orbax_in, args.allow_nonfinite)
    source = args.openai or args.hf or args.orbax_in
    model = model_from_params(config, params)
    if args.orbax:
        checkpoint.save_pretrained(args.orbax, model, metadata={"source": source, **provenance}, dtype=args.dtype)
        print(f"Wrote Orbax checkpoint to {args.orbax}")
    if args.hf_out:
        save_hf(model, args.hf_out)
        print(f"Wrote Hugging Face model to {args.hf_out}")


if __name__ == "__main__":
    main()
