"""Generative pre-training end to end on real books: learning, exact resume, errors (the schedule: test_optim.py)."""

import json

import pytest
from ml_collections import ConfigDict

from gpt1_jax.config_check import ConfigError
from gpt1_jax.pretraining import pretrain
from gpt1_jax.training.run_log import read_metrics
from pretrain_helpers import assert_trees_equal, final_params, losses, tiny_config


@pytest.mark.slow
def test_tiny_config_falls_well_below_the_unigram_baseline(tiny_pretraining):
    """The tiny recipe (300 steps) on real books: validation perplexity under 3/4 of the unigram baseline.

    The baseline is add-one-smoothed training frequencies scored on the same held-out windows, so
    beating it by this much means the model predicts from its context, not from word counts alone.
    """
    metrics = read_metrics(tiny_pretraining)
    run_config = ConfigDict(json.loads((tiny_pretraining / "config.json").read_text()))
    unigram = pretrain.lm_data(run_config).unigram_perplexity
    validation = {m["step"]: m["val_perplexity"] for m in metrics if "val_perplexity" in m}
    print(f"\nunigram perplexity {unigram:.1f}, validation perplexity by step {validation}")
    assert validation[300] < 0.75 * unigram
    assert validation[300] < validation[200] < validation[100] < 1.2 * unigram
    assert (tiny_pretraining / "tensorboard").is_dir() and any((tiny_pretraining / "tensorboard").iterdir())
    assert {"loss", "perplexity", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(metrics[0])


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, token_cache_dir):
    straight = tmp_path / "straight"
    pretrain.pretrain(tiny_config(token_cache_dir), str(straight))
    resumed = tmp_path / "resumed"
    first_half = pretrain.pretrain(tiny_config(token_cache_dir, **{"train.stop_at": 3}), str(resumed))
    assert first_half["loss"] == losses(straight)[3]
    pretrain.pretrain(tiny_config(token_cache_dir), str(resumed))
    assert losses(resumed) == losses(straight)
    assert_trees_equal(final_params(resumed), final_params(straight))


def test_gradient_accumulation_gives_the_same_update(tmp_path, token_cache_dir):
    no_dropout = {"model.embd_dropout": 0.0, "model.attn_dropout": 0.0, "model.resid_dropout": 0.0,
                  "train.num_steps": 2, "checkpoint.every": 2}
    pretrain.pretrain(tiny_config(token_cache_dir, **no_dropout), str(tmp_path / "one"))
    four = tiny_config(token_cache_dir, **no_dropout, **{"train.grad_accum_steps": 4})
    pretrain.pretrain(four, str(tmp_path / "four"))
    for step, loss in losses(tmp_path / "one").items():
        assert losses(tmp_path / "four")[step] == pytest.approx(loss, rel=1e-5)
    assert_trees_equal(final_params(tmp_path / "one"), final_params(tmp_path / "four"), atol=1e-6)


@pytest.mark.parametrize("overrides,key", [
    ({"data.source": "tfds:no_such_dataset_xyz"}, "data.source"),
    ({"train.grad_accum_steps": 3}, "train.batch_size"),
    ({"model.n_head": 3}, "model.width"),
    ({"train.nonfinite": "ignore"}, "train.nonfinite"),
    ({"model.n_ctx": 100_000}, "model.n_ctx"),
    ({"data.task_source": "ftp"}, "data.task_source"),
])
def test_bad_configs_fail_before_compiling_and_name_the_key(tmp_path, token_cache_dir, overrides, key):
    with pytest.raises((ValueError, ConfigError), match=key.replace(".", r"\.")):
        pretrain.pretrain(tiny_config(token_cache_dir, **overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_empty_and_too_short_corpora_are_refused(tmp_path, token_cache_dir):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Just a few words of text.")
    with pytest.raises(ValueError, match="data.source"):
        empty = tiny_config(token_cache_dir, **{"data.source": str(tmp_path / "empty.txt")})
        pretrain.pretrain(empty, str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"model\.n_ctx"):
        short = tiny_config(token_cache_dir, **{"data.source": str(tmp_path / "short.txt")})
        pretrain.pretrain(short, str(tmp_path / "b"))


def test_a_workdir_of_another_run_is_refused_unless_starting_over(tmp_path, token_cache_dir):
    pretrain.pretrain(tiny_config(token_cache_dir, **{"train.num_steps": 1, "checkpoint.every": 1}), str(tmp_path))
    other = tiny_config(token_cache_dir, **{"train.num_steps": 1, "checkpoint.every": 1, "seed": 7})
    with pytest.raises(ConfigError, match="seed.*start_over"):
        pretrain.pretrain(other, str(tmp_path))
    other.start_over = True
    pretrain.pretrain(other, str(tmp_path))
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert len(kept) == 1 and (kept[0] / "checkpoints").is_dir()
