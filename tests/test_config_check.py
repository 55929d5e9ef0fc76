"""Config-only validation: the shipped recipes pass, and each bad value is a ConfigError naming its key.

Tested elsewhere: refused `train.profile_steps` (test_train_lib.py), an unknown `optimizer.kind`
(test_optim.py), and bad configs failing a whole pre-training launch (test_pretrain.py).
"""

import jax
import pytest

from configs import finetune, gpt1_pretrain, tiny_pretrain
from gpt1_jax import config_check
from gpt1_jax.config_check import ConfigError

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
])
def test_bad_pretraining_value_names_its_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_check.check_pretrain(overridden(tiny_pretrain.get_config(), overrides))


@pytest.mark.parametrize("text, window", [("", None), ("5", (5, 5)), ("3-7", (3, 7)), (" 1-1 ", (1, 1))])
def test_profile_window_reads_one_update_or_a_range(text, window):
    config = overridden(tiny_pretrain.get_config(), {"train.profile_steps": text})
    assert config_check.profile_window(config) == window
