"""A GPT1 ready to sample and score, from any place weights come from: one of our Orbax checkpoints (a
workdir's `checkpoints/`, a shipped name such as `mini`) or a transformers OpenAIGPT folder.

The tools (`generate`, `zeroshot`, `evaluate`) load through here; fine-tuning's starting points
(`gpt1_jax.finetuning.finetune_start`) keep the special-token rows and read the same files.
"""

from __future__ import annotations

from flax import nnx

from gpt1_jax.model.transformer import GPT1
from gpt1_jax.weights import weight_formats


def load_model(checkpoint_dir: str | None = None, hf_dir: str | None = None) -> GPT1:
    """A GPT1 from one of our Orbax checkpoints or from a transformers OpenAIGPT folder, text tokens only.

    A fine-tuned backbone's special tokens (start, delimiter, extract) are not text the tokenizer can
    write, so their rows are dropped: sampling and scoring range over the BPE vocabulary.
    """
    from gpt1_jax.training import checkpoint  # Orbax, only when a checkpoint is read

    if (checkpoint_dir is None) == (hf_dir is None):
        raise ValueError("Give exactly one of a checkpoint directory and a Hugging Face directory.")
    if checkpoint_dir is not None:
        config, params, _ = checkpoint.load_pretrained(checkpoint_dir)
    else:
        config, params = weight_formats.load_hf(hf_dir)
    model = weight_formats.model_from_params(config, params)
    return model.with_special_tokens(0, rngs=nnx.Rngs(0)) if config.n_special else model
