"""gpt1_jax: GPT-1 (Radford et al., 2018) in JAX and Flax NNX.

`gpt1_jax.GPT1` and `gpt1_jax.GPT1Config` are loaded on first use, so importing a light module (the
config checker, the tokenizer) does not build the model's dependencies.

URLs (gs://...) go through fsspec rather than TensorFlow's file system: etils.epath, which Orbax and
this package use, chooses once per process, at its first path, so it is set here, before any import
can make that choice (gpt1_jax/storage.py says why).
"""

import os

os.environ.setdefault("EPATH_USE_TF", "false")

__all__ = ["GPT1", "GPT1Config"]


def __getattr__(name: str):
    if name in __all__:
        from gpt1_jax.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'gpt1_jax' has no attribute {name!r}")
