"""A GPT1 ready to sample and score, from any place weights come from (`gpt1_jax.weights.sources`): one of our
Orbax checkpoints (a workdir's `checkpoints/`, the shipped `mini`), the released GPT-1 or another model on the
Hugging Face Hub (`openai-gpt`, `hf:ORG/NAME@REV`), a transformers folder (`hf:DIR`) or the original release.

The tools (`generate`, `zeroshot`, `evaluate`) load through here; fine-tuning's starting points
(`gpt1_jax.finetuning.finetune_start`) keep the special-token rows and read the same files.
"""

from __future__ import annotations

from flax import nnx

from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.weights import sources, weight_formats


def read_weights(source: sources.Source, *, n_head: int = weight_formats.DEFAULT_N_HEAD) -> tuple[GPT1Config, dict]:
    """(config, parameters) of a resolved source, in its format; `n_head` for the original release, which does not
    record it. Fine-tuning's `init` and the tools read weights through here."""
    if source.kind == sources.HF:
        return weight_formats.load_hf(source.folder)
    if source.kind == sources.OPENAI:
        return weight_formats.load_openai_original(source.folder, n_head=n_head)
    from gpt1_jax.training import checkpoint  # Orbax, only when a checkpoint is read

    config, params, _ = checkpoint.load_pretrained(source.folder)
    return config, params


def load_model(weights: str | sources.Source) -> GPT1:
    """A GPT1 from `weights` (any location `sources.resolve` reads, or its result), text tokens only.

    A fine-tuned backbone's special tokens (start, delimiter, extract) are not text the tokenizer can
    write, so their rows are dropped: sampling and scoring range over the BPE vocabulary.
    """
    config, params = read_weights(weights if isinstance(weights, sources.Source) else sources.resolve(weights))
    model = weight_formats.model_from_params(config, params)
    return model.with_special_tokens(0, rngs=nnx.Rngs(0)) if config.n_special else model
