"""Reading weight files without ever running code, and refusing damaged or unsafe ones by file name.

A weight file comes from a download, a colleague or an old run, and the common formats can hide code:
numpy pickles object-dtype arrays, and `pytorch_model.bin` is a pickle that may name any class or
function. So numpy reads with `allow_pickle=False` (after checking the header, to refuse a pickled
array by name rather than with numpy's generic error), safetensors files have their header length
checked against the file size, and PyTorch files load only with `weights_only=True`. Every refusal is a
`WeightFormatError` naming the file and what to do. `check_finite` refuses NaN or inf weights, naming
each such tensor: they would otherwise surface only later, as NaN logits or a NaN loss. `name_mismatch`
compares the names a file holds with those a model needs, for every reader (ours included: Orbax
checkpoints), so that no tensor is silently left out.

Which tensors a format holds and how they map onto our parameter tree is `weight_formats`' job; this module
only turns files into arrays.
"""

from __future__ import annotations

import logging
import pathlib
import pickle
from collections.abc import Iterable

import numpy as np

from gpt1_jax.errors import UserError

MAX_NAMED_TENSORS = 5  # tensors listed by name in one message; the rest are counted

log = logging.getLogger(__name__)


class WeightFormatError(UserError, ValueError):
    """Weights on disk do not have the layout or shapes the model needs, or are unsafe to read."""


# ---------------------------------------------------------------- the original OpenAI release


def read_shard(shard_file: pathlib.Path) -> np.ndarray:
    """One params_i.npy of the original release: a 1-D float32 slice of the flat parameter vector.

    The header is read first so that an object-dtype array (numpy pickles each element) is refused by
    name: its payload can only be read by unpickling, which may run code.

    Returns:
        The shard, [shard_size] float32.
    """
    try:
        with shard_file.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            pickled = read_header(f)[2].hasobject
            f.seek(0)
            shard = None if pickled else np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise WeightFormatError(f"{shard_file}: not a readable .npy array ({err}); re-download the release.") from err
    if pickled:
        raise WeightFormatError(
            f"{shard_file}: an object-dtype (pickled) array, refused because loading it would need unpickling, "
            "which can run code. The release's shards are plain float32 arrays: re-download them, or re-save this "
            "one with np.save(path, array.astype(np.float32)) where you trust it.")
    if shard.ndim != 1 or shard.dtype != np.float32:
        raise WeightFormatError(
            f"{shard_file}: expected a 1-D float32 array (a slice of the flat parameter vector), found shape "
            f"{shard.shape} and dtype {shard.dtype}. Use the release's shards unmodified.")
    return shard


# ---------------------------------------------------------------- Hugging Face folders


def read_hf_tensors(directory: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """The weights file of a `save_pretrained` folder, model.safetensors if present, else pytorch_model.bin
    (older exports), and every tensor in it by its name there; the file, so that errors can name it."""
    safetensors_file = directory / "model.safetensors"
    torch_file = directory / "pytorch_model.bin"
    if safetensors_file.is_file():
        return safetensors_file, _read_safetensors(safetensors_file)
    if torch_file.is_file():
        return torch_file, _read_torch_state(torch_file)
    raise WeightFormatError(f"{directory}: neither model.safetensors nor pytorch_model.bin found.")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A safetensors file, its header length checked against the file size before safetensors parses it.

    The file opens with the header's length (8 bytes, little-endian); a cut-off download or another
    format there makes safetensors fail with a bare "invalid header length".
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    size = path.stat().st_size
    with path.open("rb") as f:
        header_length = int.from_bytes(f.read(8), "little")  # of the JSON header that follows
    if size < 8 or header_length > size - 8:
        found = f"only {size} bytes" if size < 8 else \
            f"a header length of {header_length} bytes, but only {size - 8} bytes follow"
        raise WeightFormatError(f"{path}: not a complete safetensors file ({found}); the download or export was cut "
                                "short, or the file is not safetensors. Download or export it again.")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise WeightFormatError(f"{path}: not a readable safetensors file ({err}); download or export it again.") \
            from err


def _read_torch_state(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict, unpickled with `weights_only=True`: tensors and plain containers only.

    A file that also pickles objects (an optimizer, argparse.Namespace, a whole nn.Module) is refused
    rather than loaded with `weights_only=False`, which would run whatever code the file names.
    """
    try:
        import torch
    except ImportError as err:
        raise WeightFormatError(f"{path} needs PyTorch to read; install torch or convert it to safetensors.") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightFormatError(
            f"{path}: refused, loading it would need code execution ({_unsafe_globals(path)}). Where you "
            "trust the file, load it yourself and save it as safetensors, e.g. with transformers' "
            "model.save_pretrained(DIR, safe_serialization=True) or safetensors.torch.save_file(state_dict, "
            "'model.safetensors') next to its config.json, then convert that folder.") from err
    except (RuntimeError, EOFError, KeyError) as err:
        raise WeightFormatError(f"{path}: not a readable PyTorch file ({err}); download or export it again.") from err
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise WeightFormatError(f"{path}: expected a state dict of tensors (as save_pretrained writes), found a "
                                f"{type(state).__name__} holding other values.")
    return {k: v.float().numpy() for k, v in state.items()}


def _unsafe_globals(path: pathlib.Path) -> str:
    """What in a PyTorch file `weights_only=True` refused: the classes or functions it pickles, which torch
    lists for its zip format (the default since torch 1.6); older files cannot be inspected without unpickling."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        names = get_unsafe_globals_in_checkpoint(path)
    except ValueError:
        names = []
    return f"it pickles {', '.join(names)}" if names else "it pickles objects besides tensors, or is not a PyTorch file"


# ---------------------------------------------------------------- names


def name_mismatch(found: Iterable[str], expected: Iterable[str], *, noun: str = "tensor") -> str:
    """How the names a file holds differ from those the model needs: "" when they are the same set, else the
    unused names and the missing ones, a few of each by name and the rest counted.

    A reader that looks up each name the config lists ignores whatever else the file holds: a config.json
    saying n_layer=3 over 4 layers of weights converted into a 3-layer model without h.3.*, silently.
    Comparing the whole sets makes every tensor of a file either used or an error naming it.
    """
    found, expected = set(found), set(expected)
    differences = [(found - expected, "unused (the model has no place for them)"), (expected - found, "missing")]
    return "; ".join(f"{len(names)} {noun}{'s' * (len(names) != 1)} {what}: "
                     f"{_a_few([repr(name) for name in sorted(names)], noun + 's')}"
                     for names, what in differences if names)


def _a_few(items: list[str], noun: str) -> str:
    """The first MAX_NAMED_TENSORS of `items` joined, then how many more: a message stays one readable line."""
    more = f" and {len(items) - MAX_NAMED_TENSORS} more {noun}" if len(items) > MAX_NAMED_TENSORS else ""
    return ", ".join(items[:MAX_NAMED_TENSORS]) + more


# ---------------------------------------------------------------- values


def check_finite(named: dict[str, np.ndarray], source: str, *, allow: bool = False) -> None:
    """Refuses weights holding NaN or inf, naming each such tensor and how many of its entries are bad.

    Such weights load without complaint but turn every logit that reads them into NaN, which then
    surfaces in generation or as a NaN fine-tuning loss, far from the file to blame. `allow`
    (`gpt1-convert --allow_nonfinite`, e.g. to inspect a diverged run) logs the same list as a warning.
    """
    counts = {name: (int(np.isnan(a).sum()), int(np.isinf(a).sum()), a.size) for name, a in named.items()}
    bad = [f"'{name}' ({nan} NaN, {inf} inf of {size})" for name, (nan, inf, size) in counts.items() if nan or inf]
    if not bad:
        return
    message = f"{source}: non-finite weights in {_a_few(bad, 'tensors')}"
    if allow:
        log.warning("%s; loaded anyway (allow_nonfinite).", message)
        return
    raise WeightFormatError(f"{message}. They would give NaN logits: use weights saved before the values went bad, "
                            "or, to inspect these anyway, convert them with gpt1-convert --allow_nonfinite.")
