"""Weight file readers: no code runs on load, and damaged or unsafe files are refused naming the file."""

import argparse
import logging
import pathlib
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from gpt1_jax.weights.weight_files import (
    MAX_NAMED_TENSORS,
    WeightFormatError,
    check_finite,
    name_mismatch,
    read_hf_tensors,
    read_shard,
)


def some_tensors() -> dict[str, np.ndarray]:
    """A few named float32 tensors (13 KB), as a save_pretrained folder holds them, only smaller."""
    rng = np.random.default_rng(0)
    return {"transformer.tokens_embed.weight": rng.standard_normal((50, 64), np.float32),
            "transformer.h.0.ln_1.weight": rng.standard_normal(64, np.float32),
            "transformer.h.0.ln_1.bias": rng.standard_normal(64, np.float32)}


# ---------------------------------------------------------------- original release shards


@pytest.mark.parametrize("change, found", [
    pytest.param(lambda a: a.astype(np.float64), r"shape \(100,\) and dtype float64", id="dtype"),
    pytest.param(lambda a: a.reshape(1, -1), r"shape \(1, 100\) and dtype float32", id="rank"),
])
def test_a_shard_that_is_not_1d_float32_names_the_file_its_shape_and_dtype(tmp_path, change, found):
    shard_file = tmp_path / "params_3.npy"
    np.save(shard_file, change(np.zeros(100, np.float32)))
    with pytest.raises(WeightFormatError, match=rf"params_3\.npy: expected a 1-D float32 array.*found {found}"):
        read_shard(shard_file)


def test_a_shard_that_is_not_npy_names_the_file(tmp_path):
    shard_file = tmp_path / "params_3.npy"
    shard_file.write_bytes(b"<html>Not Found</html>")
    with pytest.raises(WeightFormatError, match=r"params_3\.npy: not a readable \.npy array"):
        read_shard(shard_file)


class TouchesWhenUnpickled:
    """An object whose unpickling touches `path`: the code a pickled shard can run."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_an_object_dtype_shard_is_refused_without_unpickling(tmp_path):
    shard_file, marker = tmp_path / "params_3.npy", tmp_path / "code_ran"
    np.save(shard_file, np.array([TouchesWhenUnpickled(marker), None], dtype=object), allow_pickle=True)
    np.load(shard_file, allow_pickle=True)
    assert marker.exists()  # a pickle-enabled reader runs the shard's code
    marker.unlink()
    with pytest.raises(WeightFormatError, match=r"params_3\.npy: an object-dtype \(pickled\) array, refused because "
                                                r"loading it would need unpickling"):
        read_shard(shard_file)
    assert not marker.exists()


# ---------------------------------------------------------------- Hugging Face folders


def _cut(length: int):
    return lambda data: data[:length]


def _header_length(value: int):
    return lambda data: value.to_bytes(8, "little") + data[8:]


@pytest.mark.parametrize("damage, found", [
    pytest.param(_cut(5), r"only 5 bytes", id="shorter-than-the-length-field"),
    pytest.param(_cut(100), r"a header length of \d+ bytes, but only 92 bytes follow", id="header-cut"),
    pytest.param(_header_length(10**9), r"a header length of 1000000000 bytes, but only \d+ bytes follow",
                 id="length-past-the-end"),
    pytest.param(_header_length(2**63), rf"a header length of {2**63} bytes", id="absurd-length"),
    pytest.param(lambda data: data[:-1000], r"not a readable safetensors file \(.*\)", id="data-cut"),
])
def test_a_cut_or_oversized_safetensors_header_names_the_file_and_what_is_wrong(tmp_path, damage, found):
    weights = tmp_path / "model.safetensors"
    save_file(some_tensors(), str(weights))
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(WeightFormatError, match=rf"{re.escape(str(weights))}: .*{found}"):
        read_hf_tensors(tmp_path)


def test_a_folder_without_weights_is_refused_naming_both_files(tmp_path):
    with pytest.raises(WeightFormatError, match=r"neither model\.safetensors nor pytorch_model\.bin found"):
        read_hf_tensors(tmp_path)


def write_pytorch_bin(folder: pathlib.Path, extra: dict) -> dict[str, np.ndarray]:
    """pytorch_model.bin in `folder`: `some_tensors()` as a torch state dict plus `extra`; returns the tensors."""
    tensors = some_tensors()
    torch.save({**{k: torch.from_numpy(v) for k, v in tensors.items()}, **extra}, folder / "pytorch_model.bin")
    return tensors


def test_a_pytorch_state_dict_reads_as_its_tensors(tmp_path):
    expected = write_pytorch_bin(tmp_path, {})
    weights_file, read = read_hf_tensors(tmp_path)
    assert weights_file == tmp_path / "pytorch_model.bin" and read.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(read[name], array)


def test_a_pickled_pytorch_bin_is_refused_as_needing_code_execution(tmp_path):
    write_pytorch_bin(tmp_path, {"args": argparse.Namespace(lr=6.25e-5)})
    with pytest.raises(WeightFormatError, match=r"pytorch_model\.bin: refused, loading it would need code execution "
                                                r"\(it pickles argparse\.Namespace\).*"
                                                r"save_pretrained\(DIR, safe_serialization=True\)"):
        read_hf_tensors(tmp_path)


# ---------------------------------------------------------------- non-finite values


def test_non_finite_weights_are_refused_naming_each_tensor_and_its_counts():
    tensors = some_tensors()
    tensors["transformer.h.0.ln_1.weight"][:2] = np.nan
    tensors["transformer.h.0.ln_1.bias"][5] = -np.inf
    with pytest.raises(WeightFormatError, match=r"^DIR: non-finite weights in 'transformer\.h\.0\.ln_1\.weight' "
                                                r"\(2 NaN, 0 inf of 64\), 'transformer\.h\.0\.ln_1\.bias' "
                                                r"\(0 NaN, 1 inf of 64\)\..*--allow_nonfinite"):
        check_finite(tensors, "DIR")


def test_non_finite_weights_name_a_few_tensors_and_count_the_rest():
    tensors = {f"t{i}": np.full(3, np.nan, np.float32) for i in range(MAX_NAMED_TENSORS + 2)}
    last_named = rf"'t{MAX_NAMED_TENSORS - 1}' \(3 NaN, 0 inf of 3\)"
    with pytest.raises(WeightFormatError, match=rf"{last_named} and 2 more tensors\."):
        check_finite(tensors, "DIR")


def test_allowed_non_finite_weights_are_a_warning(caplog):
    tensors = some_tensors()
    tensors["transformer.h.0.ln_1.bias"][0] = np.inf
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.weights.weight_files"):
        check_finite(tensors, "DIR", allow=True)
    assert re.search(r"DIR: non-finite weights in 'transformer\.h\.0\.ln_1\.bias' \(0 NaN, 1 inf of 64\); "
                     r"loaded anyway", caplog.text)


def test_finite_weights_pass_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.weights.weight_files"):
        check_finite(some_tensors(), "DIR")
    assert not caplog.text


# ---------------------------------------------------------------- names


def test_names_a_file_holds_beyond_or_short_of_the_models_are_listed_a_few_and_counted():
    needed = [f"h.{i}.w" for i in range(3)]
    found = [*needed[1:], *(f"h.9.w{i}" for i in range(MAX_NAMED_TENSORS + 2))]
    assert name_mismatch(needed, needed) == ""
    assert name_mismatch(found, needed) == (
        f"{MAX_NAMED_TENSORS + 2} tensors unused (the model has no place for them): "
        + ", ".join(f"'h.9.w{i}'" for i in range(MAX_NAMED_TENSORS)) + " and 2 more tensors; "
        "1 tensor missing: 'h.0.w'")
