"""A GPT-1-shaped mini model that pre-trains on the shared books in two hours on a 2-core CPU (issue 17).

GPT-1's shape at a small size: the real 40,478-token BPE vocabulary, post-LN blocks, a tied head, heads
of 64 dimensions and an MLP four times as wide. 192 wide and 4 deep: 9.6M parameters, 19 MB in
bfloat16, ~1,300 tokens/s on 2 cores (docs/benchmarks.md, "Mini pre-training sizing"). It trains on the
17 Gutenberg books named `*-0.txt` (about 4.3M tokens, the last 2% held out for validation); the six
`pg*.txt` books are never seen, for perplexity on unseen text (`gpt1-evaluate`).

The shipped checkpoint `gpt1_jax/weights/pretrained/mini` (`init=mini`) is this recipe's update 3,000: validation
perplexity 102.5 (0.157 x unigram), 120.7 on the six unseen books, 91 minutes on 2 cores
(docs/finetuning.md, "The shipped mini model"). The optimizer leaves the unigram plateau thanks to `eps`
1e-5 instead of 1e-8. With a 40,478-row tied table and 2,048-token batches, most rows see no token in a
batch. Their only gradient is the softmax's tiny push away from the mean hidden state, and Adam with a
tiny eps scales it up to a full-size step. So every rare row drifts along one shared direction, and the
input embeddings of rare tokens become one large, identical vector. With eps 1e-5 the pilot's optimizer
is at 0.43 x unigram after 200 updates, against above the unigram after 600 with eps 1e-8
(docs/benchmarks.md, "Mini pre-training sizing").
"""

from gpt1_jax.configs.common import base_config, has_local_data, model_section

TRAINING_BOOKS = "local:corpus/gutenberg/*-0.txt"
UNSEEN_BOOKS = "local:corpus/gutenberg/pg*.txt"


def get_config():
    config = base_config()
    config.model = model_section(n_ctx=128, width=192, n_head=3, n_layer=4, mlp_width=768,
                                 embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    config.data.source = TRAINING_BOOKS if has_local_data() else "tfds:tiny_shakespeare"
    config.data.val_fraction = 0.02
    config.optimizer.kind = "adamw"
    config.optimizer.lr = 2e-3
    config.optimizer.b1 = 0.8
    config.optimizer.b2 = 0.95
    config.optimizer.warmup_steps = 100
    config.optimizer.eps = 1e-5
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.eval_batches = 16
    config.train.num_steps = 3000
    config.train.log_every = 50
    config.train.eval_every = 300
    config.checkpoint.every = 300
    return config
