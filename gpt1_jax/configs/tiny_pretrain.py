"""A 2-layer, 64-wide GPT-1 that pre-trains on a few books in a few minutes on a CPU.

Same code path as the paper's recipe; sizes, steps, the optimizer's step size and momenta, and
dropout differ. With the paper's Adam (0.9, 0.999) a model this small first fits word frequencies
with an output that ignores its input (the unigram plateau), and at any step size we tried it stays
there for hundreds of steps; with less momentum (b1 0.5, b2 0.9), a step of 3e-3 and no warm-up it
leaves the plateau within ~100 steps and halves the unigram perplexity by step 300
(docs/benchmarks.md). It cannot overfit 500k tokens in 300 steps, so dropout would only slow it.

It also trains with `optax.adamw` rather than the released code's Adam (the default, gpt1_jax/configs/common.py).
The two differ only in the first few updates, where the release adds epsilon before the bias
correction and so moves parameters with tiny gradients (rare token rows) less; over 300 steps that
start shows: validation perplexity 275 against 264, and Story Cloze fine-tuning from the model 53.7%
against 56.4% test accuracy (one run each, docs/finetuning.md).
"""

from gpt1_jax.configs.common import base_config, has_local_data, model_section

# The six books with two-digit numbers: Alice, The Time Machine, The War of the Worlds, Tom Sawyer,
# Huckleberry Finn, A Tale of Two Cities (2.6 MB).
TINY_BOOKS = "local:corpus/gutenberg/[0-9][0-9]-0.txt"


def get_config():
    config = base_config()
    config.model = model_section(n_ctx=64, width=64, n_head=2, n_layer=2, mlp_width=256,
                                 embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    config.data.source = TINY_BOOKS if has_local_data() else "tfds:tiny_shakespeare"
    config.data.val_fraction = 0.05
    config.optimizer.kind = "adamw"
    config.optimizer.lr = 3e-3
    config.optimizer.b1 = 0.5
    config.optimizer.b2 = 0.9
    config.optimizer.warmup_steps = 0
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.eval_batches = 8
    config.train.num_steps = 300
    config.train.log_every = 25
    config.train.eval_every = 100
    config.checkpoint.every = 100
    return config
