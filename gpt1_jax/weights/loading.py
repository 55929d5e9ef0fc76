"""A GPT1 ready to sample and score, from any place weights come from (`gpt1_jax.weights.sources`): one of our
Orbax checkpoints (a workdir's `checkpoints/`, the shipped `mini`), the released GPT-1 or another model on the
Hugging Face Hub (`openai-gpt`, `hf:ORG/NAME@REV`), a transformers folder (`hf:DIR`) or the original release.

The tools (`generate`, `zeroshot`, `evaluate`) load through here; fine-tuning's starting points
(`gpt1_jax.finetuning.finetune_start`) keep the special-token rows and read the same files.
"""

from __future__ import annotations

from flax import nnx

from gpt1_jax.model.transformer import GPT1
from gpt1_jax.weights import sources, weight_formats


def load_model(weights: str | sources.Source) -> GPT1:
    """A GPT1 from `weights` (any location `sources.resolve` reads, or its result), text tokens only.

    A fine-tuned backbone's special tokens (start, delimiter, extract) are not text the tokenizer can
    write, so their rows are dropped: sampling and scoring range over the BPE vocabulary.
    """
    source = weights if isinstance(weights, sources.Source) else sources.resolve(weights)
    if source.kind == sources.HF:
        config, params = weight_formats.load_hf(source.folder)
    elif source.kind == sources.OPENAI:
        config, params = weight_formats.load_openai_original(source.folder)
    else:
        from gpt1_jax.training import checkpoint as orbax  # Orbax, only when a checkpoint is read

        config, params, _ = orbax.load_pretrained(source.folder)
    model = weight_formats.model_from_params(config, params)
    return model.with_special_tokens(0, rngs=nnx.Rngs(0)) if config.n_special else model
