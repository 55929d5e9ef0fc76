"""Config-only validation: the shipped recipes pass, and each bad value is a ConfigError naming its key.

Tested elsewhere: refused `train.profile_steps` (test_train_lib.py), an unknown `optimizer.kind`
(test_optim.py), and bad configs failing a whole pre-training launch (test_pretrain.py).
"""

import pathlib
import re
import subprocess
import sys
import time

import jax
import pytest
from ml_collections import ConfigDict

from gpt1_jax import config_check
from gpt1_jax.config_check import RANGES, ConfigError, check_common
from gpt1_jax.configs import finetune, gpt1_pretrain, mini_pretrain, tiny_pretrain

RECIPES = {"tiny_pretrain": tiny_pretrain.get_config, "finetune": finetune.get_config,
           "finetune:tiny": lambda: finetune.get_config("tiny")}


def overridden(config, overrides: dict):
    """`config` with each 'section.key' of `overrides` set to its value."""
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def test_shipped_recipes_pass():
    config_check.check_pretrain(tiny_pretrain.get_config())
    config_check.check_pretrain(gpt1_pretrain.get_config())
    config_check.check_pretrain(mini_pretrain.get_config())
    for arg in (None, "tiny", "rte", "story_cloze"):
        config_check.check_common(finetune.get_config(arg))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("overrides, message", [
    ({"train.grad_accum_steps": 3}, r"train\.batch_size=\d+ must be divisible by train\.grad_accum_steps"),
    ({"train.grad_accum_steps": 0}, r"train\.grad_accum_steps=0"),
    ({"train.batch_size": 0}, r"train\.batch_size=0"),
    ({"train.eval_batch_size": 0}, r"train\.eval_batch_size=0"),
    ({"train.log_every": 0}, r"train\.log_every=0"),
    ({"checkpoint.every": 0}, r"checkpoint\.every=0"),
    ({"checkpoint.keep": 0}, r"checkpoint\.keep=0"),
    ({"train.nonfinite": "ignore"}, r"train\.nonfinite='ignore'.*'stop'.*'skip'"),
    ({"data.task_source": "ftp"}, r"data\.task_source='ftp'.*'local'.*'tfds'"),
    ({"mesh.fsdp": 0}, r"mesh\.fsdp=0"),
])
def test_bad_common_value_names_its_key(recipe, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_check.check_common(overridden(RECIPES[recipe](), overrides))


def test_global_batch_must_split_over_accumulation_times_devices(monkeypatch):
    """16 examples over 2 accumulation steps fit one device, not 16 devices (2 x 16 = 32 per update)."""
    config = overridden(tiny_pretrain.get_config(), {"train.batch_size": 16, "train.grad_accum_steps": 2})
    config_check.check_batching(config)
    monkeypatch.setattr(jax, "device_count", lambda: 16)
    with pytest.raises(ConfigError, match=r"train\.batch_size=16 .* = 2 x 16; choose a multiple of 32"):
        config_check.check_batching(config)


@pytest.mark.parametrize("overrides, message", [
    ({"model.n_special": 3}, r"model\.n_special must be 0 for pre-training"),
    ({"train.num_steps": 0}, r"train\.num_steps=0"),
    ({"train.nonfinite": "ignore"}, r"train\.nonfinite='ignore'"),  # check_pretrain includes check_common
    ({"model.width": 0}, r"model\.width=0 must be >= 1 for pre-training"),
    ({"model.n_head": 0}, r"model\.n_head=0 must be >= 1 for pre-training"),
    ({"model.n_layer": 0}, r"model\.n_layer=0 must be >= 1 for pre-training"),
    ({"model.vocab_size": 0}, r"model\.vocab_size=0 must be >= 1 for pre-training"),
    ({"model.n_head": 3}, r"model\.width=64 must be divisible by model\.n_head=3"),
    ({"model.mlp_width": -4}, r"model\.mlp_width=-4 is out of range: it must be >= 0"),
])
def test_bad_pretraining_value_names_its_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_check.check_pretrain(overridden(tiny_pretrain.get_config(), overrides))


def test_a_zero_width_model_is_refused_at_once_instead_of_training_and_hanging(tmp_path):
    """It used to train with a zero gradient, fail to save ("zero size") and never exit."""
    command = [sys.executable, "train.py", "--config", "configs/tiny_pretrain.py", "--workdir", str(tmp_path / "run"),
               "--config.model.width=0"]
    started = time.monotonic()
    result = subprocess.run(command, cwd=pathlib.Path(__file__).parents[1], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 60
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: model.width=0 must be >= 1 for pre-training."
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, window", [("", None), ("5", (5, 5)), ("3-7", (3, 7)), (" 1-1 ", (1, 1))])
def test_profile_window_reads_one_update_or_a_range(text, window):
    config = overridden(tiny_pretrain.get_config(), {"train.profile_steps": text})
    assert config_check.profile_window(config) == window


@pytest.mark.parametrize("key, value, wording", [
    ("optimizer.lr", 0.0, "> 0"), ("optimizer.lr", -1e-4, "> 0"), ("optimizer.eps", 0.0, "> 0"),
    ("optimizer.b1", 1.0, "in [0, 1)"), ("optimizer.b2", -0.1, "in [0, 1)"), ("optimizer.weight_decay", -0.01, ">= 0"),
    ("optimizer.grad_clip_norm", -1.0, ">= 0"), ("optimizer.warmup_steps", -1, ">= 0"),
    ("optimizer.warmup_fraction", 1.5, "in [0, 1]"), ("model.attn_dropout", 1.0, "in [0, 1)"),
    ("model.embd_dropout", -0.1, "in [0, 1)"), ("train.eval_every", -1, ">= 0"), ("train.eval_batches", -2, ">= 0"),
    ("train.stop_at", -1, ">= 0"), ("train.loss_chunk", -8, ">= 0"), ("optimizer.lr", float("nan"), "> 0"),
    ("finetune.clf_dropout", 1.2, "in [0, 1)"),
])
def test_every_key_with_a_range_is_checked_before_anything_compiles(key, value, wording):
    config = finetune.get_config("tiny")
    section, name = key.split(".")
    config[section][name] = value
    message = rf"{re.escape(key)}={value} is out of range: it must be {re.escape(wording)}"
    with pytest.raises(ConfigError, match=message):
        check_common(config)


def test_the_range_table_only_names_keys_the_recipes_have():
    keys = set()
    for config in (tiny_pretrain.get_config(), finetune.get_config("tiny")):
        keys |= {f"{section}.{name}" for section, values in config.items() if isinstance(values, ConfigDict)
                 for name in values}
        keys |= {name for name, value in config.items() if not isinstance(value, ConfigDict)}
    assert set(RANGES) <= keys


SEED_WORDING = {"seed": "an integer in [0, 2**63 - 1]", "finetune.heldout_seed": "an integer in [0, 2**32 - 1]"}


@pytest.mark.parametrize("recipe, key, value", [
    *[(recipe, "seed", value) for recipe in sorted(RECIPES) for value in (-1, 2**63)],
    ("finetune", "finetune.heldout_seed", -3), ("finetune:tiny", "finetune.heldout_seed", 2**32),
])
def test_a_negative_or_too_large_seed_is_refused_before_anything_compiles(recipe, key, value):
    """A negative seed compiled the step and wrote config.json, then failed 17 s later with NumPy's traceback
    (`default_rng` needs a non-negative seed); every seed-like key is checked with the other ranges."""
    config = RECIPES[recipe]()
    section, _, name = key.rpartition(".")
    values = config[section] if section else config
    values[name] = value
    message = rf"^{re.escape(key)}={value} is out of range: it must be {re.escape(SEED_WORDING[key])}\.$"
    with pytest.raises(ConfigError, match=message):
        check_common(config)
    values[name] = 2**32 - 1  # the largest seed both accept
    check_common(config)
    (config[section] if section else config)[name] = 2**32 - 1  # the largest seed both accept
    check_common(config)


def test_the_config_checker_imports_neither_the_model_nor_the_zero_shot_code():
    """Dependencies point down: checking a config must not build the model's or generation's modules."""
    code = "import sys, gpt1_jax.config_check; print(sorted(m for m in sys.modules if m.startswith('gpt1_jax')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "gpt1_jax.config_check" in loaded

