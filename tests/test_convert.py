"""Weight conversion: parity with transformers' OpenAIGPT on the same weights, both file formats."""

import json
import logging
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

from gpt1_jax import convert
from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.training import checkpoint
from gpt1_jax.weights.weight_formats import (
    DEFAULT_N_HEAD,
    HF_PREFIX,
    WeightFormatError,
    load_hf,
    load_openai_original,
    model_from_params,
    original_names,
    params_of,
    save_hf,
)

SMALL_HF = dict(vocab_size=500, n_positions=64, n_embd=64, n_layer=3, n_head=4)
SMALL_12_HEADS = dict(SMALL_HF, n_embd=48, n_head=12)  # a width GPT-1's default 12 heads divide
FULL_HF = dict(vocab_size=40478, n_positions=512, n_embd=768, n_layer=12, n_head=12)


def random_hf_model(sizes: dict, seed: int = 0) -> OpenAIGPTLMHeadModel:
    torch.manual_seed(seed)
    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(**sizes)).eval()
    with torch.no_grad():  # Non-trivial LayerNorm parameters so the test sees them.
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def torch_outputs(model: OpenAIGPTLMHeadModel, ids: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()


def our_outputs(model: GPT1, ids: np.ndarray):
    hidden = model(ids)
    return np.asarray(hidden), np.asarray(model.logits(hidden)[..., : model.config.n_vocab])


def random_ids(vocab: int, batch: int, seq: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, (batch, seq)).astype(np.int64)


@pytest.mark.parametrize("sizes", [
    pytest.param(SMALL_HF, id="small"),
    pytest.param(FULL_HF, id="gpt1", marks=pytest.mark.slow),
])
def test_hf_import_matches_transformers(tmp_path, sizes):
    reference = random_hf_model(sizes)
    reference.save_pretrained(tmp_path)
    config, params = load_hf(tmp_path)
    ours = model_from_params(config, params)
    ids = random_ids(sizes["vocab_size"], 2, min(64, sizes["n_positions"]))
    ref_hidden, ref_logits = torch_outputs(reference, ids)
    hidden, logits = our_outputs(ours, ids)
    assert np.abs(hidden - ref_hidden).max() <= 1e-4
    assert np.abs(logits - ref_logits).max() <= 1e-4


def write_original_release(directory, sizes: dict, seed: int = 0) -> list[np.ndarray]:
    """Random weights in the released layout: 146 (for 12 layers) arrays flattened into 10 shards."""
    d, n_ctx, vocab = sizes["n_embd"], sizes["n_positions"], sizes["vocab_size"]
    per_layer = [(1, d, 3 * d), (3 * d,), (1, d, d), (d,), (d,), (d,),
                 (1, d, 4 * d), (4 * d,), (1, 4 * d, d), (d,), (d,), (d,)]
    shapes = [(n_ctx, d), (vocab, d)] + per_layer * sizes["n_layer"]
    rng = np.random.default_rng(seed)
    arrays = [(0.02 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    (directory / "params_shapes.json").write_text(json.dumps([list(s) for s in shapes]))
    for i, shard in enumerate(np.array_split(flat, 10)):
        np.save(directory / f"params_{i}.npy", shard)
    return arrays


def reference_from_original(arrays: list[np.ndarray], sizes: dict) -> OpenAIGPTLMHeadModel:
    """An independent reader of the original layout (transformers 5 has none): fill a PyTorch model."""
    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(**sizes)).eval()
    state = model.state_dict()
    for name, array in zip(original_names(sizes["n_layer"]), arrays):
        key = "transformer." + name
        state[key] = torch.from_numpy(array.reshape(state[key].shape).copy())
    state["lm_head.weight"] = state["transformer.tokens_embed.weight"]
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("sizes", [
    pytest.param(SMALL_HF, id="small"),
    pytest.param(FULL_HF, id="gpt1", marks=pytest.mark.slow),
])
def test_original_release_import_matches_an_independent_reader(tmp_path, sizes):
    arrays = write_original_release(tmp_path, sizes)
    if sizes is FULL_HF:
        assert len(arrays) == 146
    config, params = load_openai_original(tmp_path, config=GPT1Config(
        vocab_size=sizes["vocab_size"], n_ctx=sizes["n_positions"], width=sizes["n_embd"],
        n_layer=sizes["n_layer"], n_head=sizes["n_head"], mlp_width=4 * sizes["n_embd"]))
    ids = random_ids(sizes["vocab_size"], 2, 32)
    ref_hidden, ref_logits = torch_outputs(reference_from_original(arrays, sizes), ids)
    hidden, logits = our_outputs(model_from_params(config, params), ids)
    assert np.abs(hidden - ref_hidden).max() <= 1e-4
    assert np.abs(logits - ref_logits).max() <= 1e-4


def test_original_release_sizes_are_read_from_the_shapes_and_heads_from_the_user(tmp_path):
    write_original_release(tmp_path, SMALL_HF)
    config, _ = load_openai_original(tmp_path, n_head=4)
    assert (config.vocab_size, config.n_ctx, config.width, config.n_layer, config.mlp_width) == (500, 64, 64, 3, 256)
    assert config.n_head == 4


def test_original_release_head_count_defaults_to_gpt1s_12(tmp_path):
    write_original_release(tmp_path, SMALL_12_HEADS)
    config, _ = load_openai_original(tmp_path)
    assert DEFAULT_N_HEAD == 12 and config.n_head == 12


@pytest.mark.parametrize("n_head", [5, 0])
def test_a_head_count_that_does_not_divide_the_width_is_refused(tmp_path, n_head):
    write_original_release(tmp_path, SMALL_HF)
    with pytest.raises(WeightFormatError, match=rf"--n-head {n_head} does not divide the width 64 .*params_shapes"):
        load_openai_original(tmp_path, n_head=n_head)


def test_cli_n_head_reaches_the_orbax_checkpoint(tmp_path):
    (tmp_path / "release").mkdir()
    write_original_release(tmp_path / "release", SMALL_HF)
    subprocess.run([sys.executable, "-m", "gpt1_jax.convert", "--openai", str(tmp_path / "release"),
                    "--orbax", str(tmp_path / "ckpt"), "--n_head", "4"], check=True)
    config, params, _ = checkpoint.load_pretrained(tmp_path / "ckpt")
    expected_config, expected = load_openai_original(tmp_path / "release", n_head=4)
    assert config.n_head == 4 and config == expected_config
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_round_trip_through_hf_is_exact_and_pytorch_gives_our_logits(tmp_path):
    ours = GPT1(GPT1Config(vocab_size=500, n_special=3, n_ctx=64, width=64, n_head=4, n_layer=2, mlp_width=256),
                rngs=nnx.Rngs(0))
    save_hf(ours, tmp_path)
    reference, info = OpenAIGPTLMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    config, params = load_hf(tmp_path)
    assert config == ours.config
    for a, b in zip(jax.tree.leaves(params_of(ours)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    ids = random_ids(503, 2, 40)
    ref_hidden, ref_logits = torch_outputs(reference.eval(), ids)
    hidden, logits = our_outputs(ours, ids)
    assert np.abs(logits - ref_logits).max() <= 1e-4


def test_cli_writes_an_orbax_checkpoint_training_can_start_from(tmp_path):
    random_hf_model(SMALL_HF).save_pretrained(tmp_path / "hf")
    subprocess.run([sys.executable, "-m", "gpt1_jax.convert", "--hf", str(tmp_path / "hf"),
                    "--orbax", str(tmp_path / "ckpt")], check=True)
    config, params, metadata = checkpoint.load_pretrained(tmp_path / "ckpt")
    expected_config, expected = load_hf(tmp_path / "hf")
    assert config == expected_config and metadata["kind"] == "converted"
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_missing_shard_names_the_file(tmp_path):
    write_original_release(tmp_path, SMALL_HF)
    (tmp_path / "params_7.npy").unlink()
    with pytest.raises(WeightFormatError, match="params_7.npy"):
        load_openai_original(tmp_path, n_head=4)


def test_an_extra_shard_in_a_release_folder_is_named_as_unused(tmp_path):
    """The reader took params_0..9.npy and ignored any other shard beside them."""
    write_original_release(tmp_path, SMALL_HF)
    np.save(tmp_path / "params_10.npy", np.zeros(100, np.float32))
    with pytest.raises(WeightFormatError, match=rf"{re.escape(str(tmp_path))}: 1 shard unused .*'params_10\.npy'\. "
                                                r"The release has 10 shards params_0\.npy\.\.params_9\.npy"):
        load_openai_original(tmp_path, n_head=4)


@pytest.mark.parametrize("n_layer, difference", [
    pytest.param(2, r"12 tensors unused \(the model has no place for them\): 'h\.2\.attn\.c_attn\.bias', "
                 r".* and 7 more tensors", id="fewer-layers"),
    pytest.param(4, r"12 tensors missing: 'h\.3\.attn\.c_attn\.bias', .* and 7 more tensors", id="more-layers"),
])
def test_a_config_with_another_layer_count_than_the_release_names_the_arrays_it_leaves_out(tmp_path, n_layer,
                                                                                           difference):
    write_original_release(tmp_path, SMALL_HF)  # 3 layers
    config = GPT1Config(vocab_size=500, n_ctx=64, width=64, n_head=4, n_layer=n_layer, mlp_width=256)
    with pytest.raises(WeightFormatError, match=rf"params_shapes\.json and its shards\): {difference}\. The model "
                                                rf"config given \({n_layer} layers\) must describe the release "
                                                r"\(3 layers"):
        load_openai_original(tmp_path, config=config)


def _set_entry(index: int, shape):
    def edit(shapes: list) -> None:
        shapes[index] = shape
    return edit


# SMALL_HF: d = 64, m = 256, 3 layers = 38 entries; entry 2 + 12 + 6 = 20 is layer 1's c_fc kernel.
@pytest.mark.parametrize("edit, message", [
    pytest.param(_set_entry(20, [1, 64, 200]),
                 r"params_shapes\.json entry 20 \(h\.1\.mlp\.c_fc\.weight\): "
                 r"expected \(1, 64, 256\), found \(1, 64, 200\)",
                 id="entry-shape"),
    pytest.param(_set_entry(3, [64, 3]),
                 r"params_shapes\.json entry 3 \(h\.0\.attn\.c_attn\.bias\): expected \(192,\), found \(64, 3\)",
                 id="entry-rank"),
    pytest.param(list.pop, r"params_shapes\.json: expected 2 \+ 12 k entries .*found 37", id="layer-count"),
    pytest.param(_set_entry(0, [64]), r"params_shapes\.json entry 0 \(positions_embed\.weight\): "
                 r"expected \(n_ctx, width\), found \(64,\)", id="positions-rank"),
    pytest.param(_set_entry(5, [64, "x"]), r"params_shapes\.json entry 5: expected a shape .*found \[64, 'x'\]",
                 id="not-ints"),
])
def test_a_shapes_file_off_the_release_layout_names_the_entry_and_both_shapes(tmp_path, edit, message):
    write_original_release(tmp_path, SMALL_HF)
    shapes_file = tmp_path / "params_shapes.json"
    shapes = json.loads(shapes_file.read_text())
    edit(shapes)
    shapes_file.write_text(json.dumps(shapes))
    with pytest.raises(WeightFormatError, match=message):
        load_openai_original(tmp_path, n_head=4)


def test_shards_of_the_wrong_total_size_name_the_files_and_both_sizes(tmp_path):
    total = sum(a.size for a in write_original_release(tmp_path, SMALL_HF))
    shard_file = tmp_path / "params_9.npy"
    np.save(shard_file, np.load(shard_file)[:-1])
    with pytest.raises(WeightFormatError, match=rf"params_0\.npy\.\.params_9\.npy: expected {total} values in total "
                                                rf"\(the shapes in params_shapes\.json\), found {total - 1}"):
        load_openai_original(tmp_path, n_head=4)


def test_transformers_save_pretrained_writes_only_the_parameters(tmp_path):
    """What transformers 5 writes for OpenAIGPTLMHeadModel: the parameters of its `transformer`, no tied
    lm_head.weight and no buffers (older versions wrote both; the reader accepts them: HF_CONSTANT_BUFFERS)."""
    random_hf_model(SMALL_HF).save_pretrained(tmp_path)
    from safetensors.numpy import load_file

    assert set(load_file(str(tmp_path / "model.safetensors"))) == {HF_PREFIX + name for name in original_names(3)}


def edit_safetensors(folder, edit) -> None:
    """Rewrite `folder`'s model.safetensors with `edit` applied to its {name: array}."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_a_config_json_with_fewer_layers_than_the_weights_is_refused_naming_the_unused_layer(tmp_path, capsys):
    """config.json saying n_layer=3 over 4 layers of weights converted into a 3-layer checkpoint without h.3.*."""
    random_hf_model(dict(SMALL_HF, n_layer=4)).save_pretrained(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "n_layer": 3}))
    with pytest.raises(SystemExit) as exit_:
        convert.main(["--hf", str(tmp_path / "hf"), "--orbax", str(tmp_path / "ckpt")])
    assert exit_.value.code == 2 and not (tmp_path / "ckpt").exists()
    assert re.search(r"error: \S+/hf/model\.safetensors: 12 tensors unused \(the model has no place for them\): "
                     r"'h\.3\.attn\.c_attn\.bias', .* and 7 more tensors\. Its config\.json \(n_layer=3, n_embd=64\) "
                     r"must describe these weights: fix config\.json, or use the folder", capsys.readouterr().err)


def test_a_tensor_deleted_from_the_safetensors_file_is_named_as_missing(tmp_path):
    random_hf_model(SMALL_HF).save_pretrained(tmp_path)
    edit_safetensors(tmp_path, lambda tensors: tensors.pop("transformer.h.1.ln_2.bias"))
    with pytest.raises(WeightFormatError, match=r"model\.safetensors: 1 tensor missing: 'h\.1\.ln_2\.bias'\."):
        load_hf(tmp_path)


def add_older_transformers_extras(tensors: dict) -> None:
    """What older transformers versions saved besides the parameters: the tied output layer and the buffers."""
    n_ctx = SMALL_HF["n_positions"]
    tensors["lm_head.weight"] = tensors["transformer.tokens_embed.weight"].copy()
    tensors["transformer.position_ids"] = np.arange(n_ctx)
    for i in range(SMALL_HF["n_layer"]):
        tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]


def test_the_extras_older_transformers_saved_are_accepted_but_an_untied_output_layer_is_not(tmp_path):
    random_hf_model(SMALL_HF).save_pretrained(tmp_path)
    _, expected = load_hf(tmp_path)
    edit_safetensors(tmp_path, add_older_transformers_extras)
    jax.tree.map(np.testing.assert_array_equal, load_hf(tmp_path)[1], expected)
    edit_safetensors(tmp_path, lambda tensors: tensors.update({"lm_head.weight": tensors["lm_head.weight"] + 1}))
    with pytest.raises(WeightFormatError, match=r"model\.safetensors: 1 tensor unused .*: 'lm_head\.weight'\."):
        load_hf(tmp_path)


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    random_hf_model(SMALL_HF).save_pretrained(tmp_path)
    name = "transformer.h.1.mlp.c_fc.weight"
    edit_safetensors(tmp_path, lambda tensors: tensors.update({name: tensors[name][:, :100].copy()}))
    with pytest.raises(WeightFormatError, match=r"h\.1\.mlp\.c_fc\.weight.*\(64, 100\).*\(64, 256\)"):
        load_hf(tmp_path)


def test_config_of_another_width_than_the_checkpoint_is_refused(tmp_path):
    write_original_release(tmp_path, SMALL_HF)
    with pytest.raises(WeightFormatError, match=r"tokens_embed.weight.*\(500, 64\).*\(500, 128\)"):
        load_openai_original(tmp_path, config=GPT1Config(vocab_size=500, n_ctx=64, width=128, n_head=4, n_layer=3,
                                                         mlp_width=512))


def test_a_relative_checkpoint_path_loads(tmp_path, monkeypatch):
    """The README passes `--config.init=runs/tiny/checkpoints`: relative to the working directory."""
    model = GPT1(GPT1Config(vocab_size=500, n_ctx=64, width=64, n_head=4, n_layer=2, mlp_width=256), rngs=nnx.Rngs(0))
    checkpoint.save_pretrained(tmp_path / "ckpt", model)
    monkeypatch.chdir(tmp_path)
    config, params, _ = checkpoint.load_pretrained("ckpt")
    assert config == model.config
    for a, b in zip(jax.tree.leaves(params_of(model)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def save_hf_with_nonfinite(folder) -> None:
    """A transformers folder whose h.1.mlp.c_fc.weight holds 2 NaN and 1 inf."""
    random_hf_model(SMALL_HF).save_pretrained(folder)

    def spoil(tensors: dict) -> None:
        bad = tensors["transformer.h.1.mlp.c_fc.weight"]
        bad[0, :2], bad[3, 5] = np.nan, -np.inf

    edit_safetensors(folder, spoil)


NONFINITE_C_FC = r"non-finite weights in 'h\.1\.mlp\.c_fc\.weight' \(2 NaN, 1 inf of 16384\)"


def test_load_hf_refuses_non_finite_weights_naming_the_tensor(tmp_path):
    """The check is in the loader, so fine-tuning's init=hf: and gpt1-generate --hf refuse them too."""
    save_hf_with_nonfinite(tmp_path)
    with pytest.raises(WeightFormatError, match=rf"{re.escape(str(tmp_path))}: {NONFINITE_C_FC}"):
        load_hf(tmp_path)
    assert np.isnan(load_hf(tmp_path, allow_nonfinite=True)[1]["blocks"]["mlp"]["fc"]["kernel"][1, 0, 0])


def test_load_openai_original_refuses_non_finite_weights_naming_the_tensor(tmp_path):
    write_original_release(tmp_path, SMALL_HF)
    shard_file = tmp_path / "params_0.npy"  # starts with positions_embed.weight
    shard = np.load(shard_file)
    shard[1] = np.inf
    np.save(shard_file, shard)
    with pytest.raises(WeightFormatError, match=r"non-finite weights in 'positions_embed\.weight' "
                                                r"\(0 NaN, 1 inf of 4096\)"):
        load_openai_original(tmp_path, n_head=4)


def test_cli_refuses_non_finite_weights_unless_allowed(tmp_path, capsys, caplog):
    save_hf_with_nonfinite(tmp_path / "hf")
    command = ["--hf", str(tmp_path / "hf"), "--orbax", str(tmp_path / "ckpt")]
    with pytest.raises(SystemExit) as exit_:
        convert.main(command)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and re.search(rf"error: .*hf: {NONFINITE_C_FC}.*--allow_nonfinite", error)
    assert not (tmp_path / "ckpt").exists()
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.weights.weight_files"):
        convert.main([*command, "--allow-nonfinite"])
    assert re.search(rf"{NONFINITE_C_FC}; loaded anyway", caplog.text)
    assert np.isnan(checkpoint.load_pretrained(tmp_path / "ckpt")[1]["blocks"]["mlp"]["fc"]["kernel"][1, 0, 0])


def test_cli_refuses_a_non_finite_orbax_checkpoint(tmp_path, capsys):
    model = GPT1(GPT1Config(vocab_size=500, n_ctx=64, width=64, n_head=4, n_layer=2, mlp_width=256), rngs=nnx.Rngs(0))
    model.positions_embed.value = model.positions_embed.value.at[0, 0].set(np.nan)
    checkpoint.save_pretrained(tmp_path / "ckpt", model)
    with pytest.raises(SystemExit):
        convert.main(["--orbax_in", str(tmp_path / "ckpt"), "--hf_out", str(tmp_path / "hf")])
    assert re.search(r"ckpt: non-finite weights in 'positions_embed\.weight' \(1 NaN", capsys.readouterr().err)
    assert not (tmp_path / "hf").exists()


def test_cli_writes_a_half_size_bfloat16_checkpoint_that_loads_as_float32_with_its_provenance(tmp_path):
    """How the shipped mini model is made: a pre-training run's step, halved, still telling gpt1-evaluate
    which books it was trained on and with which tokenizer."""
    model = GPT1(GPT1Config(vocab_size=500, n_ctx=64, width=64, n_head=4, n_layer=2, mlp_width=256), rngs=nnx.Rngs(0))
    run = {"data": {"source": "local:corpus/gutenberg/*-0.txt", "val_fraction": 0.02}}
    checkpoint.save_pretrained(tmp_path / "run", model, metadata={"config": run, "tokenizer": "bpe-1234"})
    convert.main(["--orbax_in", str(tmp_path / "run"), "--orbax", str(tmp_path / "half"), "--dtype", "bfloat16"])

    def size(folder):
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "params" in f.parts)

    assert size(tmp_path / "half") < 0.6 * size(tmp_path / "run")
    config, params, metadata = checkpoint.load_pretrained(tmp_path / "half")
    assert config == model.config and metadata["config"] == run and metadata["tokenizer"] == "bpe-1234"
    for want, got in zip(jax.tree.leaves(params_of(model)), jax.tree.leaves(params)):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(want.astype(jnp.bfloat16), np.float32))
    with pytest.raises(SystemExit):
        convert.main(["--orbax_in", str(tmp_path / "run"), "--hf_out", str(tmp_path / "hf"), "--dtype", "bfloat16"])
