"""The paper's fine-tuning recipe (Sec. 4.1 "Fine-tuning details" and the released code).

`get_config(arg)`: arg is a task name (default sst2; see gpt1_jax.finetuning.tasks.TASKS), "custom" (your own task,
the `custom.*` keys; see gpt1_jax/finetuning/custom_task.py), or a CPU-sized run:
  "mini"  the shipped mini model (`init=mini`, gpt1_jax/configs/mini_pretrain.py's sizes) on a subset of SST-2 in a
          few minutes; `--config.init=` gives the same model from scratch, `--config.task=` another task
          (the quick start and docs/finetuning.md's "Table 5 in miniature"),
  "tiny"  the tiny pre-training model's sizes, SST-2, 320 training examples, 1 epoch.

    python train.py --config configs/finetune.py:rte --config.init=RUN/checkpoints --workdir W
    python train.py --config configs/finetune.py:mini --workdir W

The model's shape keys (vocab_size, n_ctx, width, n_head, n_layer, mlp_width) are 0: "take them from
the checkpoint in `init`" (from scratch, init="", 0 means the paper's 12 x 768 model). A non-zero
value is checked against the checkpoint.
"""

from gpt1_jax.configs.common import base_config, model_section
from gpt1_jax.configs.mini_pretrain import get_config as mini_pretrain_config
from gpt1_jax.configs.tiny_pretrain import get_config as tiny_pretrain_config
from gpt1_jax.constants import RELEASED_HELDOUT_EXAMPLES, RELEASED_HELDOUT_SEED, SHAPE_KEYS


def get_config(arg=None):
    config = base_config()
    config.mode = "finetune"
    config.task = "sst2" if arg in (None, "", "tiny", "mini") else arg  # "custom": config.custom
    config.model = model_section(**{key: 0 for key in SHAPE_KEYS})
    config.optimizer.kind = "released"  # finetune-transformer-lm's opt.adam (gpt1_jax/training/optim.py)
    config.optimizer.lr = 6.25e-5
    config.optimizer.schedule = "warmup_linear"  # linear decay, warm-up over 0.2% of training
    config.optimizer.warmup_fraction = 0.002
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip_norm = 1.0
    config.train.batch_size = 32
    config.train.eval_batch_size = 64
    config.train.log_every = 20
    config.checkpoint.every = 500
    config.finetune = dict(
        epochs=3,
        lm_coef=0.5,  # lambda of L3 = L2 + lambda * L1 (Sec. 3.2); 0 switches the auxiliary loss off
        # Rows of L1's softmax: "all" as the released code (tokens, specials and the run's positions), or
        # "tokens" (tokens and specials; skips up to 512 rows of 40,993 for GPT-1 at full context).
        lm_softmax_rows="all",
        # Extra evaluations (keeping the best parameters) after these updates of the first epoch, as the
        # released code; "" for epoch ends only.
        eval_at="1000,2000,4000,8000,16000,32000",
        clf_dropout=0.1,
        transfer_layers=-1,  # embeddings + first k blocks pre-trained, the rest fresh (Sec. 5); -1: all
        max_train_examples=0,  # a random subset of this many training examples for quick runs; 0: all
        max_text_len=0,  # tokens kept per text of a pair / answer; 0: n_ctx // 2 - 2 as the released code
        eval_every=0,  # also evaluate every this many steps; 0: after each epoch only
        # Story Cloze (no training split): validation examples held out as dev
        heldout_examples=RELEASED_HELDOUT_EXAMPLES,
        # A task whose local training file is missing (QNLI, SciTail in shared/data) trains on its first
        # evaluation split less heldout_examples, as Story Cloze does, instead of stopping.
        train_from_eval=False,
        heldout_seed=RELEASED_HELDOUT_SEED,  # ... chosen as the released code's train_test_split does (datasets.py)
    )
    # Your own task (task=custom): files (train and validation, optionally test) or one TFDS dataset, the
    # columns of each role, the kind of input transformation; see gpt1_jax/finetuning/custom_task.py.
    config.custom = dict(
        kind="",  # classification, entailment, similarity, multiple_choice or regression (a pair, one output)
        train="", validation="", test="",  # file paths (.tsv, .csv, .jsonl); a test file may lack the label
        format="",  # tsv, csv or jsonl when the suffix does not say
        columns="",  # COL1,COL2,... for a TSV/CSV without a header line
        encoding="utf-8",  # e.g. latin-1
        text_a="", text_b="", choices="",  # the text columns; choices: COL1,COL2,... (multiple choice)
        label="", labels="",  # the label column; labels: a,b,c in index order (default: sorted training labels)
        uid="",  # an id column for the predictions file (default: the row number)
        metrics="",  # e.g. accuracy,f1,mcc (default: accuracy; pearson,spearman for regression)
        on_error="raise",  # bad rows: "raise" names file:line, "skip" skips and counts them
        tfds="", splits="",  # a TFDS dataset instead of files; splits: train=train,validation=validation,...
    )
    if arg == "mini":
        mini = mini_pretrain_config().model
        config.model.update({key: mini[key] for key in SHAPE_KEYS})
        config.init = "mini"
        config.finetune.max_train_examples = 1000
        config.finetune.eval_at = ""
        # Measured on SST-2 (docs/finetuning.md): at 2e-4 the fresh head barely leaves chance in 3 epochs.
        config.optimizer.lr = 1e-3
        config.optimizer.warmup_fraction = 0.1
        config.train.eval_batch_size = 128
        config.train.log_every = 10
    if arg == "tiny":
        tiny = tiny_pretrain_config().model
        config.model.update({key: tiny[key] for key in SHAPE_KEYS})
        config.finetune.max_train_examples = 320
        config.finetune.epochs = 1
        config.optimizer.lr = 1e-3  # a tiny model over a few steps wants a larger step, as in tiny_pretrain
        config.optimizer.warmup_fraction = 0.1
        config.train.batch_size = 16
        config.train.eval_batch_size = 128
        config.train.log_every = 5
    return config
