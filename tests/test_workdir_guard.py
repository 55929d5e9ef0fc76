"""A workdir holds one run: config.json records it, a launch of another config is refused, start_over moves it aside.

(The same refusal through a whole pre-training launch: test_pretrain.py.)
"""

import json
import pathlib
import re

import pytest

from configs import finetune, tiny_pretrain
from gpt1_jax import workdir_guard
from gpt1_jax.config_check import ConfigError


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def claimed_workdir(folder: pathlib.Path, config) -> pathlib.Path:
    """A workdir claimed by `config` that also holds a checkpoint file, as after some training."""
    workdir_guard.claim(folder, config)
    (folder / "checkpoints" / "3").mkdir(parents=True)
    (folder / "checkpoints" / "3" / "state").write_bytes(b"step 3")
    return folder


def test_first_claim_creates_the_workdir_and_records_the_config(tmp_path):
    config = tiny_pretrain.get_config()
    workdir = tmp_path / "runs" / "a"
    workdir_guard.claim(workdir, config)
    assert json.loads((workdir / workdir_guard.RUN_CONFIG_FILE).read_text()) == json.loads(config.to_json_best_effort())


def test_same_identity_may_change_other_keys(tmp_path):
    workdir = claimed_workdir(tmp_path / "run", tiny_pretrain.get_config())
    again = tiny_pretrain.get_config()
    again.train.log_every = 1
    again.train.eval_every = 7
    workdir_guard.claim(workdir, again)
    recorded = json.loads((workdir / workdir_guard.RUN_CONFIG_FILE).read_text())
    assert (recorded["train"]["log_every"], recorded["train"]["eval_every"]) == (1, 7)
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", workdir_guard.RUN_CONFIG_FILE]


@pytest.mark.parametrize("recipe, key, value, named", [
    (tiny_pretrain.get_config, "seed", 7, "seed"),
    (tiny_pretrain.get_config, "model.width", 128, "model"),
    (tiny_pretrain.get_config, "train.batch_size", 32, "train.batch_size"),
    (finetune.get_config, "task", "rte", "task"),
    (finetune.get_config, "init", "gs://bucket/run/checkpoints", "init"),
])
def test_another_identity_is_refused_naming_the_key_and_leaving_the_workdir(tmp_path, recipe, key, value, named):
    workdir = claimed_workdir(tmp_path / "run", recipe())
    before = snapshot(workdir)
    other = recipe()
    section, _, name = key.rpartition(".")
    (other[section] if section else other)[name] = value
    with pytest.raises(ConfigError, match=rf"different {re.escape(named)}\. .*--config\.start_over=True"):
        workdir_guard.claim(workdir, other)
    assert snapshot(workdir) == before


def test_start_over_moves_the_old_run_aside_and_records_the_new_config(tmp_path):
    workdir = claimed_workdir(tmp_path / "run", tiny_pretrain.get_config())
    before = snapshot(workdir)
    other = tiny_pretrain.get_config()
    other.seed = 7
    other.start_over = True
    workdir_guard.claim(workdir, other)
    (aside,) = [p for p in workdir.iterdir() if p.name.startswith("previous-")]
    assert snapshot(aside) == before
    assert sorted(p.name for p in workdir.iterdir()) == [workdir_guard.RUN_CONFIG_FILE, aside.name]
    assert json.loads((workdir / workdir_guard.RUN_CONFIG_FILE).read_text())["seed"] == 7
