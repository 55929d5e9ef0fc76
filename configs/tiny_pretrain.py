"""A 2-layer, 64-wide GPT-1 that pre-trains on a few books in a few minutes on a CPU.

Same code path as the paper's recipe; sizes, steps, the learning rate and dropout differ: a tiny
model trained for a few hundred steps wants a much larger step than 2.5e-4 and cannot overfit
300k tokens, so dropout would only slow it. With the full 40,478-token vocabulary its LM head
costs ~0.5 ms per token on a 2-core CPU, so this budget takes it from uniform (ppl ~40,000) to
about the unigram level; going well below needs millions of tokens (see docs/benchmarks.md).
"""

from configs.common import base_config, has_local_data, model_section

# The six books with two-digit numbers: Alice, The Time Machine, The War of the Worlds, Tom Sawyer,
# Huckleberry Finn, A Tale of Two Cities (2.6 MB).
TINY_BOOKS = "local:corpus/gutenberg/[0-9][0-9]-0.txt"


def get_config():
    config = base_config()
    config.model = model_section(n_ctx=64, width=64, n_head=2, n_layer=2, mlp_width=256,
                                 embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    config.data.source = TINY_BOOKS if has_local_data() else "tfds:tiny_shakespeare"
    config.data.val_fraction = 0.05
    config.optimizer.lr = 1e-2
    config.optimizer.warmup_steps = 50
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.eval_batches = 8
    config.train.num_steps = 300
    config.train.log_every = 25
    config.train.eval_every = 100
    config.checkpoint.every = 100
    return config
