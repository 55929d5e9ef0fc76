"""Pre-train or fine-tune GPT-1, as the recipe's `config.mode` says: "pretrain" (objective L1) or
"finetune" (L3 on one of the paper's tasks). Rerunning the same command in the same workdir resumes
from its latest checkpoint; a multi-host run starts the same command on every host.

    python train.py --config configs/<recipe>.py --workdir DIR [--config.key=value ...]

Installed as `gpt1-train`; `train.py` at the repository root only calls `main`. Multi-process
start-up is `gpt1_jax.distributed`'s.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import sys

import jax
from absl import flags
from ml_collections import ConfigDict, config_flags

from gpt1_jax import cli, config_check, distributed, workdir_guard

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


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in `argv`, None when absent."""
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _load_recipe(spec: str) -> ConfigDict:
    """The config of a recipe file `path[:arg]`, loaded as config_flags loads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("gpt1_jax_recipe", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_override(argv: list[str]) -> config_check.ConfigError | None:
    """An error naming the first `--config.KEY` override the recipe lacks, its section and the nearest key.

    ml_collections reports such a key as a bare `AttributeError: 'bogus'` traceback from inside flag parsing.
    """
    spec = _flag_value(argv, "config")
    if spec is None:
        return None
    config = _load_recipe(spec)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if isinstance(node, ConfigDict) and part in node:
                node = node[part]
                continue
            section = ".".join(parts[:depth])
            where = f"section {section!r}" if section else "the top level"
            valid = sorted(node.keys()) if isinstance(node, ConfigDict) else []
            prefix = f"{section}." if section else ""
            nearest = difflib.get_close_matches(part, valid, n=1)
            hint = (f"nearest valid key: {prefix}{nearest[0]}" if nearest
                    else f"valid keys there: {', '.join(prefix + k for k in valid)}" if valid
                    else f"{section} is a value, not a section")
            return config_check.ConfigError(f"--config.{key}: {spec} has no key {part!r} in {where}; {hint}.")
    return None


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python train.py` (`gpt1-train`); `argv` excludes the program name."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = cli.parse(argv, functools.partial(_define_flags, argv=argv), prog="python train.py",
                         synopsis=SYNOPSIS, doc=__doc__).flags
    except (AttributeError, KeyError):
        error = unknown_override(argv)
        if error is None:
            raise
        raise error from None
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
    config = args.config
    if config.mode == "pretrain":
        from gpt1_jax.pretrain import pretrain

        pretrain(config, args.workdir)
    elif config.mode == "finetune":
        from gpt1_jax.finetune import finetune

        finetune(config, args.workdir)
    else:
        raise config_check.ConfigError(f"mode={config.mode!r}: use 'pretrain' or 'finetune'.")
