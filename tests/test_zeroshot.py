"""Zero-shot probes: log-likelihood scoring against a direct computation, and the probes on real dev data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt1_jax.config_check import ConfigError
from gpt1_jax.finetuning.task_readers import read_task
from gpt1_jax.finetuning.tasks import get_task
from gpt1_jax.model.scoring import score_continuations
from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.pretraining import pretrain
from gpt1_jax.pretraining.zeroshot_probes import run_probe
from gpt1_jax.text.tokenizer import GPT1Tokenizer
from gpt1_jax.training import checkpoint
from gpt1_jax.training.run_log import read_metrics
from gpt1_jax.weights.weight_formats import model_from_params
from pretrain_helpers import tiny_config


@pytest.fixture(scope="module")
def tokenizer(data_root):
    return GPT1Tokenizer.from_files(data_root / "gpt1_vocab")


@pytest.fixture(scope="module")
def real_vocab_model():
    """The real 40,478-token vocabulary on a tiny network, for the probes on real text."""
    return GPT1(GPT1Config(n_ctx=128, width=8, n_head=2, n_layer=1, mlp_width=16), rngs=nnx.Rngs(0))


def test_score_continuations_equals_direct_log_probabilities():
    model = GPT1(GPT1Config(vocab_size=50, n_ctx=12, width=16, n_head=2, n_layer=2, mlp_width=32),
                 rngs=nnx.Rngs(1))
    context, continuations = [5, 9, 2, 7, 11, 3, 8, 1], [[4], [6, 13, 21, 30], [0, 1]]
    sums = score_continuations(model, context, continuations)
    means = score_continuations(model, context, continuations, average=True)
    log_probs = nnx.jit(lambda m, tokens: jax.nn.log_softmax(m.logits(m(tokens))))
    for continuation, total, mean in zip(continuations, sums, means):
        seq = (context + continuation)[-model.config.n_ctx:]  # the long one loses context from the left
        padded = np.zeros((1, model.config.n_ctx), np.int32)  # one shape, one compilation
        padded[0, :len(seq)] = seq
        logprobs = np.asarray(log_probs(model, jnp.asarray(padded)))[0]
        n = len(continuation)
        direct = [float(logprobs[len(seq) - n - 1 + i, t]) for i, t in enumerate(continuation)]
        np.testing.assert_allclose([total, mean], [sum(direct), np.mean(direct)], rtol=1e-5)


def test_sst2_probe_on_dev_set(real_vocab_model, tokenizer, data_root):
    examples = read_task(get_task("sst2"), "validation", data_root=data_root).examples[:64]
    assert 0.0 <= run_probe(real_vocab_model, tokenizer, "sst2", examples) <= 1.0


def test_story_cloze_probe_runs(real_vocab_model, tokenizer, data_root):
    examples = read_task(get_task("story_cloze"), "validation", data_root=data_root).examples[:4]
    assert run_probe(real_vocab_model, tokenizer, "story_cloze", examples) in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_pretraining_logs_probes_that_match_its_checkpoint(tmp_path, token_cache_dir, data_root, tokenizer):
    """Figure 2 (right) of the paper: probes every `zeroshot.every` steps, equal to a fresh probe of the saved model."""
    config = tiny_config(token_cache_dir, **{"train.num_steps": 4, "checkpoint.every": 4,
                                            "zeroshot.tasks": "sst2, cola", "zeroshot.every": 2,
                                            "zeroshot.max_examples": 24})
    pretrain.pretrain(config, str(tmp_path))
    logged = {(m["step"], k): v for m in read_metrics(tmp_path) for k, v in m.items() if k.startswith("zeroshot/")}
    assert set(logged) == {(s, f"zeroshot/{t}") for s in (2, 4) for t in ("sst2", "cola")}
    model_cfg, params, _ = checkpoint.load_pretrained(str(tmp_path / "checkpoints"))
    model = model_from_params(model_cfg, params)
    for task in ("sst2", "cola"):
        examples = read_task(get_task(task), "validation", data_root=data_root).examples[:24]
        assert logged[4, f"zeroshot/{task}"] == pytest.approx(run_probe(model, tokenizer, task, examples), abs=1e-6)


def test_unknown_probe_task_fails_before_the_workdir_is_touched(tmp_path, token_cache_dir):
    with pytest.raises(ConfigError, match=r"zeroshot\.tasks.*mnli"):
        pretrain.pretrain(tiny_config(token_cache_dir, **{"zeroshot.tasks": "sst2,mnli"}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
