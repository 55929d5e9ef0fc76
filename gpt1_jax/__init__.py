"""gpt1_jax: GPT-1 (Radford et al., 2018) in JAX and Flax NNX."""

from gpt1_jax.model import GPT1, GPT1Config

__all__ = ["GPT1", "GPT1Config"]
