"""Weights by name from the Hugging Face Hub: `hf:ORG/NAME[@REVISION]`, and `openai-gpt` for the released GPT-1.

Names resolve through `huggingface_hub`, so its cache (`HF_HOME`, `HF_HUB_CACHE`), `HF_HUB_OFFLINE`, `HF_ENDPOINT`
and tokens (`HF_TOKEN`, `hf auth login`) work as they do for every transformers user, and its progress bars show
the download. Only the files we read are fetched: `config.json` and `model.safetensors`, not the PyTorch and
TensorFlow duplicates a model repository also holds. The hub writes each file to a temporary name and renames it
only when it is whole; a dropped connection is retried (5 times) from the last whole 10 MiB chunk, and a download
that still fails leaves nothing behind, so nothing half-written is ever loaded.

`hf:X` names a folder when X is one (a `save_pretrained` folder, as before); otherwise X is a repository id.
`openai-gpt` always names the released model; write `./openai-gpt` for a folder of that name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

from gpt1_jax.errors import UserError

RELEASED_REPO = "openai-community/openai-gpt"
SHORT_NAMES = {"openai-gpt": RELEASED_REPO}
WEIGHT_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
MODEL_TYPE = "openai-gpt"  # config.json's model_type in every transformers OpenAIGPT save
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class HubError(UserError, OSError):
    """A hub name that cannot be fetched; the message names the repository and revision and what to do."""


@dataclasses.dataclass(frozen=True)
class HubModel:
    """A model repository on the hub and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"hf:{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


@dataclasses.dataclass(frozen=True)
class Fetched:
    """The local snapshot folder of a hub model's files, and the commit they are from."""

    folder: pathlib.Path
    model: HubModel
    commit: str

    @property
    def pinned(self) -> str:
        """The name that fetches exactly these files again: the repository at the resolved commit."""
        return f"hf:{self.model.repo_id}@{self.commit}"


def parse(location: str | os.PathLike) -> HubModel | None:
    """The hub model `location` names (`openai-gpt`, or `hf:ID[@REV]` where ID is no folder here), else None."""
    if not isinstance(location, str):
        return None
    if location in SHORT_NAMES:
        return HubModel(SHORT_NAMES[location])
    if not location.startswith("hf:"):
        return None
    name, _, revision = location[len("hf:"):].partition("@")
    if name in SHORT_NAMES:
        name = SHORT_NAMES[name]
    elif pathlib.Path(name).exists() or not _REPO_ID.match(name):
        return None  # a folder (or a path that will be reported as a missing folder)
    return HubModel(name, revision or None)


def fetch(model: HubModel, filenames: tuple[str, ...] = WEIGHT_FILES) -> Fetched:
    """Download (or find in the hub's cache) `filenames` of `model`; a HubError in one line when that fails.

    config.json comes first and must be an OpenAIGPT model's, so a wrong repository costs no weights download.
    """
    folder, commit = None, None
    for filename in filenames:
        path = pathlib.Path(_download(model, filename, filenames))
        folder, commit = path.parent, path.parent.name  # .../snapshots/<commit>/<filename>
        if filename == "config.json":
            _check_model_type(model, path)
    return Fetched(folder, model, commit)


def _download(model: HubModel, filename: str, all_files: tuple[str, ...]) -> str:
    import huggingface_hub
    from huggingface_hub import errors

    where = f"{model} ({filename})"
    try:
        return huggingface_hub.hf_hub_download(model.repo_id, filename, revision=model.revision)
    except errors.GatedRepoError:
        raise HubError(f"{where}: the repository is gated; accept its terms on its page on the hub, then log in "
                       "(`hf auth login`) or set HF_TOKEN.") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{where}: no folder of that name here and no such model repository on the hub, or it is "
                       "private and no token with access is set (`hf auth login` or HF_TOKEN); check the name."
                       ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: the repository has no revision {model.revision!r}; give a branch, tag or "
                       "commit it has.") from None
    except errors.LocalEntryNotFoundError:
        folder = ", or give a folder: hf:FOLDER" if all_files == WEIGHT_FILES else ""
        raise HubError(f"{where}: offline (HF_HUB_OFFLINE is set, or the hub cannot be reached) and not in the hub "
                       f"cache. Download it where there is a network (`hf download {model.repo_id} "
                       f"{' '.join(all_files)}`, same HF_HOME){folder}.") from None
    except errors.RemoteEntryNotFoundError:
        raise HubError(f"{where}: the repository has no {filename}, so it is not a transformers OpenAIGPT model "
                       "saved with save_pretrained (safetensors).") from None
    except (OSError, errors.HTTPError) as err:  # the connection dropped for good (after the hub's retries), a full disk
        raise HubError(f"{where}: the download failed ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                       "nothing half-written was kept or loaded: rerun to download it.") from None


def _check_model_type(model: HubModel, config_file: pathlib.Path) -> None:
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise HubError(f"{model}: its config.json is not a JSON object ({err}).") from None
    if model_type != MODEL_TYPE:
        raise HubError(f"{model}: not an OpenAIGPT model (config.json's model_type is {model_type!r}, not "
                       f"{MODEL_TYPE!r}); GPT-1 weights are needed, e.g. {RELEASED_REPO}.")
