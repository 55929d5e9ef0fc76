"""Zero-shot probes during pre-training: `zeroshot.*` checked and the probe examples read by the recipe before
training (`pretrain.zeroshot_tracker`), the tracker's `due` schedule.

(The probes logged by a pre-training run, and an unknown probe failing its launch: test_zeroshot.py.)
"""

import pytest
from flax import nnx

from gpt1_jax import run_options
from gpt1_jax.config_check import ConfigError
from gpt1_jax.configs import tiny_pretrain
from gpt1_jax.finetuning import tasks
from gpt1_jax.finetuning.task_inputs import read_split
from gpt1_jax.model.scoring import SCORE_BATCH
from gpt1_jax.pretraining import pretrain
from gpt1_jax.text.tokenizer import GPT1Tokenizer
from gpt1_jax.training.preemption import Interrupted


@pytest.fixture(scope="module")
def tokenizer(data_root):
    return GPT1Tokenizer.from_files()


def probe_config(probes="sst2", every=2, num_steps=5, eval_every=3, max_examples=10):
    config = tiny_pretrain.get_config()
    config.data.task_source = "local"
    config.zeroshot.update(tasks=probes, every=every, max_examples=max_examples)
    config.train.update(num_steps=num_steps, eval_every=eval_every)
    return config


def test_probe_names_are_split_and_trimmed():
    names = pretrain.zeroshot_probe_names(probe_config(" sst2,story_cloze , race/middle,"))
    assert names == ["sst2", "story_cloze", "race/middle"]
    assert pretrain.zeroshot_probe_names(probe_config("")) == []


@pytest.mark.parametrize("overrides, message", [
    ({"tasks": "sst2,mnli,qqp"}, r"zeroshot\.tasks: no zero-shot probe for \['mnli', 'qqp'\]; available: cola, "),
    ({"every": -1}, r"zeroshot\.every and zeroshot\.max_examples must be >= 0"),
    ({"max_examples": -5}, r"zeroshot\.every and zeroshot\.max_examples must be >= 0"),
])
def test_bad_probe_settings_are_config_errors(overrides, message):
    config = probe_config()
    config.zeroshot.update(overrides)
    with pytest.raises(ConfigError, match=message):
        pretrain.zeroshot_probe_names(config)


@pytest.mark.parametrize("probes, every, expected", [
    ("sst2", 2, [2, 4, 5]),  # every 2 steps, and the last step
    ("sst2", 0, [3, 5]),  # 0: with validation (train.eval_every=3), and the last step
    ("", 2, []),  # no probes: never
])
def test_due_every_n_steps_and_at_the_last(tokenizer, probes, every, expected):
    tracker = pretrain.zeroshot_tracker(probe_config(probes, every=every), tokenizer)
    assert [step for step in range(1, 6) if tracker.due(step)] == expected


def test_probe_examples_are_the_first_max_examples_of_the_split(tokenizer):
    config = probe_config("sst2,cola", max_examples=10)
    tracker = pretrain.zeroshot_tracker(config, tokenizer)
    for name in ("sst2", "cola"):
        options = run_options.task_data_options(config)
        assert tracker.examples[name] == read_split(tasks.get_task(name), "validation", options)[:10]


def test_missing_probe_file_fails_at_construction_naming_the_keys(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT1_JAX_DATA", str(tmp_path))  # a data root without the SST-2 files
    with pytest.raises(ConfigError, match=r"zeroshot\.tasks='sst2', zeroshot\.split='validation': .*dev\.tsv"):
        pretrain.zeroshot_tracker(probe_config("sst2"), tokenizer)


def test_probe_split_without_a_local_file_fails_at_construction(tokenizer):
    config = probe_config("story_cloze")
    config.zeroshot.split = "train"  # Story Cloze has no training split
    with pytest.raises(ConfigError, match=r"zeroshot\.tasks='story_cloze', zeroshot\.split='train'"):
        pretrain.zeroshot_tracker(config, tokenizer)


def test_the_probes_check_for_a_stop_before_each_batch_and_end_at_one(tokenizer):
    """The probes run inside the loop's evaluation: a SIGTERM must end them within a batch, not at their end."""
    config = probe_config("sst2", max_examples=40)
    tracker = pretrain.zeroshot_tracker(config, tokenizer)
    model_cfg = pretrain.model_config(config)
    graphdef, params = nnx.split(pretrain.abstract_model(model_cfg))[0], pretrain.initial_params(model_cfg, 0)
    checks = []
    scores = tracker.evaluate(graphdef, params, lambda: checks.append(1))
    # One check per batch: SST-2 scores both label words of each of its 40 examples.
    assert set(scores) == {"zeroshot/sst2"} and len(checks) == 40 * 2 // SCORE_BATCH

    def stop_at_the_third_batch():
        checks.append(1)
        if len(checks) == 3:
            raise Interrupted("SIGTERM")

    checks.clear()
    with pytest.raises(Interrupted):
        tracker.evaluate(graphdef, params, stop_at_the_third_batch)
    assert len(checks) == 3
