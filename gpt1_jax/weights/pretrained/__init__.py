"""Pre-trained checkpoints shipped inside the package, usable by name wherever a checkpoint folder is.

`mini`: the GPT-1-shaped 192 x 4 model of gpt1_jax/configs/mini_pretrain.py, pre-trained for two hours on the
shared books on a 2-core CPU and stored as parameters only in bfloat16 (about 19 MB), so a laptop or a
free Colab runtime fine-tunes from a model that transfers without pre-training first. Its files' SHA-256
and the commands that reproduce it are in docs/finetuning.md ("The shipped mini model").

A name wins over a folder of the same name in the working directory; write `./mini` for the folder.
"""

from __future__ import annotations

import os
import pathlib

SHIPPED = ("mini",)


def resolve(location: str | os.PathLike) -> str | os.PathLike:
    """The folder of a shipped checkpoint when `location` is its name (e.g. "mini"), else `location` as given."""
    if isinstance(location, str) and location in SHIPPED:
        return pathlib.Path(__file__).parent / location
    return location
