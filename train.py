"""The one entry point: `python train.py --config configs/<recipe>.py --workdir DIR [--config.key=value ...]`.

`config.mode` picks the job: "pretrain" (objective L1) or "finetune" (L3 on one of the paper's
tasks). Rerunning the same command in the same workdir resumes from its latest checkpoint.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from gpt1_jax import config_check, distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A configs/*.py recipe.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("gpt1_jax").setLevel(logging.INFO)
    distributed.initialize_from_env()
    config = FLAGS.config
    if config.mode == "pretrain":
        from gpt1_jax.train_lib import pretrain

        pretrain(config, FLAGS.workdir)
    elif config.mode == "finetune":
        from gpt1_jax.finetune_lib import finetune

        finetune(config, FLAGS.workdir)
    else:
        raise config_check.ConfigError(f"mode={config.mode!r}: use 'pretrain' or 'finetune'.")


if __name__ == "__main__":
    app.run(main)
