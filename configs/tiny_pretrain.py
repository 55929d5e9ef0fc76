"""A 2-layer, 64-wide GPT-1 that pre-trains on a few books in a couple of minutes on a CPU.

Same code path as the paper's recipe; only sizes, steps and the learning rate differ (a tiny
model trained for a few hundred steps wants a larger step than 2.5e-4).
"""

from configs.common import base_config, has_local_data, model_section

# The six books with two-digit numbers: Alice, The Time Machine, The War of the Worlds, Tom Sawyer,
# Huckleberry Finn, A Tale of Two Cities (2.6 MB).
TINY_BOOKS = "local:corpus/gutenberg/[0-9][0-9]-0.txt"


def get_config():
    config = base_config()
    config.model = model_section(n_ctx=64, width=64, n_head=2, n_layer=2, mlp_width=256)
    config.data.source = TINY_BOOKS if has_local_data() else "tfds:tiny_shakespeare"
    config.data.val_fraction = 0.05
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 30
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.eval_batches = 8
    config.train.num_steps = 300
    config.train.log_every = 25
    config.train.eval_every = 100
    config.checkpoint.every = 100
    return config
