"""Pre-train or fine-tune GPT-1, as the recipe's `config.mode` says: "pretrain" (objective L1) or
"finetune" (L3 on one of the paper's tasks). Rerunning the same command in the same workdir resumes
from its latest checkpoint; a multi-host run starts the same command on every host.

    python train.py --config configs/<recipe>.py --workdir DIR [--config.key=value ...]

Installed as `gpt1-train`; `train.py` at the repository root only calls `main`. Multi-process
start-up is `gpt1_jax.distributed`'s.
"""

from __future__ import annotations

import functools
import logging
import sys

from absl import flags
from ml_collections import config_flags

from gpt1_jax import cli, config_check, distributed

SYNOPSIS = "--config configs/RECIPE.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]"


def _define_flags(flag_values: flags.FlagValues, *, argv: list[str]) -> None:
    # config_flags looks for the --config.KEY=VALUE overrides in the raw command line before parsing;
    # given `argv`, it does not fall back on sys.argv, which is not this command line when a test calls main.
    config_flags.DEFINE_config_file("config", None, "A configs/*.py recipe, with its argument after a colon "
                                    "(configs/finetune.py:rte); --config.KEY=VALUE overrides one value.",
                                    flag_values=flag_values, lock_config=True, sys_argv=["train.py", *argv])
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go; rerunning resumes there.",
                        flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python train.py` (`gpt1-train`); `argv` excludes the program name."""
    argv = sys.argv[1:] if argv is None else argv
    args = cli.parse(argv, functools.partial(_define_flags, argv=argv), prog="python train.py", synopsis=SYNOPSIS,
                     doc=__doc__).flags
    # Warnings from every library; progress from ours (the loop's step lines, checkpoints, evaluations).
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(asctime)s %(name)s] %(message)s")
    logging.getLogger("gpt1_jax").setLevel(logging.INFO)
    distributed.initialize_from_env()
    config = args.config
    if config.mode == "pretrain":
        from gpt1_jax.pretrain import pretrain

        pretrain(config, args.workdir)
    elif config.mode == "finetune":
        from gpt1_jax.finetune import finetune

        finetune(config, args.workdir)
    else:
        raise config_check.ConfigError(f"mode={config.mode!r}: use 'pretrain' or 'finetune'.")
