"""Where weights come from, as a user writes it: fine-tuning's `init`, the tools' `--checkpoint`, convert's `--hf`.

  <folder>                 one of our Orbax checkpoints (a run's `checkpoints/`, a step folder, `convert --orbax`),
  mini                     the checkpoint shipped in the package (`gpt1_jax.weights.pretrained`),
  openai-gpt               the released GPT-1 on the Hugging Face Hub (openai-community/openai-gpt),
  hf:ORG/NAME[@REVISION]   any transformers OpenAIGPT model on the hub, at a branch, tag or commit,
  hf:<folder>              a transformers `save_pretrained` folder (a folder wins over a hub name),
  openai:<folder>          the original release (params_shapes.json, params_0..9.npy).

`resolve` turns one into a local folder and its format, fetching a hub name first (`hub`). `pinned` names the
exact weights: for a hub name the repository at the commit the revision resolved to, which the run records in
its config.json and results.json, so a result says which weights it came from.
"""

from __future__ import annotations

import dataclasses
import os

from gpt1_jax.weights import hub

ORBAX, HF, OPENAI = "orbax", "hf", "openai"


@dataclasses.dataclass(frozen=True)
class Source:
    """A starting point resolved to a local folder: its format, the folder, and the name of exactly these weights."""

    kind: str  # ORBAX, HF or OPENAI
    folder: str | os.PathLike
    pinned: str


def hf_location(value: str) -> str:
    """The location a `--hf` flag names: a folder, or a hub name (`openai-gpt`, `hf:ORG/NAME@REV`) as written."""
    return value if value.startswith("hf:") else f"hf:{value}"


def resolve(location: str | os.PathLike, *, config_only: bool = False) -> Source:
    """The local weights `location` names; a hub name is fetched (only its config.json with `config_only`)."""
    hub_model = hub.parse(location)
    if hub_model is not None:
        fetched = hub.fetch(hub_model, filenames=("config.json",) if config_only else hub.WEIGHT_FILES)
        return Source(HF, fetched.folder, fetched.pinned)
    text = str(location)
    if text.startswith("hf:"):
        return Source(HF, text[len("hf:"):], text)
    if text.startswith("openai:"):
        return Source(OPENAI, text[len("openai:"):], text)
    return Source(ORBAX, location, text)
