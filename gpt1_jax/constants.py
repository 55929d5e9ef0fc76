"""The numbers and names the recipes, their defaults and the code below them share, each in one place.

Light on purpose: a recipe file (`configs/*.py`) imports this and nothing of the training stack, so loading
a recipe takes no jax, flax or TensorFlow import.
"""

# The released vocabulary's 40,478 BPE ids, then the three tokens fine-tuning adds after them, in the
# released code's order (train.py: encoder['_start_'] = len(encoder), then _delimiter_, then _classify_).
VOCAB_SIZE = 40478
N_SPECIAL = 3

# The model config's keys that fix the parameters' shapes; a fine-tuning recipe leaves them 0 ("take them
# from the starting point").
SHAPE_KEYS = ("vocab_size", "n_ctx", "width", "n_head", "n_layer", "mlp_width")

# Story Cloze has no training split: the released code trains on its validation set less 374 stories, drawn
# by sklearn's train_test_split with this random_state (datasets.py); fine-tuning does the same.
RELEASED_HELDOUT_EXAMPLES = 374
RELEASED_HELDOUT_SEED = 3535999445

# The environment variable naming a local data root laid out like shared/data (vocabulary, task files,
# books), for every module that reads it; without it, tasks come from TFDS.
DATA_ENV = "GPT1_JAX_DATA"
