"""The paper's pre-training recipe (Sec. 4.1): 12 x 768, context 512, batch 64, Adam 2.5e-4.

Warm-up over 2,000 updates then cosine annealing to 0. The paper trains for 100 epochs of
BooksCorpus (~1B tokens, 32,768 tokens per batch: about 3M updates); BooksCorpus is not public,
so the default corpus is PG-19 books from TFDS, or the local books under $GPT1_JAX_DATA.

The optimizer is the released code's Adam (`optimizer.kind="released"`, from gpt1_jax/configs/common.py): the
pre-training code was not released, but the paper's "modified version of L2 regularization" cites
Loshchilov & Hutter, and the released opt.py ("adam with weight decay fix") is OpenAI's implementation of
it. `--config.optimizer.kind=adamw` trains with optax.adamw instead.
"""

from gpt1_jax.configs.common import base_config, has_local_data


def get_config():
    config = base_config()
    config.data.source = "local:corpus/gutenberg/*.txt" if has_local_data() else "tfds:pg19?feature=book_text"
    config.train.num_steps = 3_000_000
    config.train.log_every = 100
    config.train.eval_every = 5000
    config.train.eval_batches = 50
    config.train.loss_chunk = 8192
    config.checkpoint.every = 5000
    return config
