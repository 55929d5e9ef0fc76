"""Pre-train or fine-tune GPT-1, as the recipe's `config.mode` says: "pretrain" (objective L1) or
"finetune" (L3 on one of the paper's tasks). Rerunning the same command in the same workdir resumes
from its latest checkpoint; a multi-host run starts the same command on every host.

    python train.py --config configs/<recipe>.py --workdir DIR [--config.key=value ...]

Installed as `gpt1-train`; `train.py` at the repository root only calls `main`. Multi-process
start-up is `gpt1_jax.training.distributed`'s. A SIGTERM or Ctrl-C exits 0 with a line saying where the
run stopped: saved by the loop, or (`preemption.Interrupted`) in a phase outside it that the rerun redoes.
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import flags

from gpt1_jax import cli, config_check, recipe_flags
from gpt1_jax.training import distributed, workdir_guard
from gpt1_jax.training.preemption import Interrupted

SYNOPSIS = f"--workdir DIR {recipe_flags.CONFIG_SYNOPSIS}"


def _define_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go; rerunning resumes there.",
                        flag_values=flag_values)
    flags.mark_flag_as_required("workdir", flag_values=flag_values)


class _TracebacksBehindVerbose(logging.Filter):
    """Keeps the message of a library's logged error and drops its traceback (shown with --verbose).

    Orbax's background save threads log every failure through absl with its traceback: a full disk
    printed five tracebacks, 350 lines, before the save error that names the cause reached the entry
    point and was printed as its one `error:` line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


_TRACEBACKS_BEHIND_VERBOSE = _TracebacksBehindVerbose()


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python train.py` (`gpt1-train`); `argv` excludes the program name."""
    argv = sys.argv[1:] if argv is None else argv
    args = recipe_flags.parse(argv, _define_flags, prog="python train.py", synopsis=SYNOPSIS, doc=__doc__).flags
    # Warnings from every library; progress from ours (the loop's step lines, checkpoints, evaluations).
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(asctime)s %(name)s] %(message)s")
    logging.getLogger("gpt1_jax").setLevel(logging.INFO)
    if args.verbose:
        logging.getLogger("absl").removeFilter(_TRACEBACKS_BEHIND_VERBOSE)
    else:
        logging.getLogger("absl").addFilter(_TRACEBACKS_BEHIND_VERBOSE)
    distributed.initialize_from_env()
    distributed.warn_if_workdir_not_shared(args.workdir)
    if jax.process_index() == 0:
        workdir_guard.refuse_if_held(args.workdir)
    try:
        _run_recipe(args.config, args.workdir)
    except Interrupted as stopped:  # a stop outside the loop (the token cache, the test predictions): exit 0
        logging.getLogger(__name__).warning("%s", stopped)


def _run_recipe(config, workdir: str) -> None:
    if config.mode == "pretrain":
        from gpt1_jax.pretraining.pretrain import pretrain

        pretrain(config, workdir)
    elif config.mode == "finetune":
        from gpt1_jax.finetuning.finetune import finetune

        finetune(config, workdir)
    else:
        raise config_check.ConfigError(f"mode={config.mode!r}: use 'pretrain' or 'finetune'.")


if __name__ == "__main__":
    main()
