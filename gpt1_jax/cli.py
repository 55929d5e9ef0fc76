"""The command line of every entry point: absl flags, parsed into a fresh `flags.FlagValues` per call.

`train.py` (`gpt1-train`) and the tools `gpt1_jax.generate`, `.convert`, `.zeroshot` and `.report`
(`gpt1-generate`, ...) each define their flags in a function that `parse` runs on a new
`flags.FlagValues`, never on absl's global `flags.FLAGS`. The tools are imported side by side (one
pytest process, a notebook), where global definitions of `--checkpoint` or `--hf` in two modules would
collide; and a fresh set per call means a second `main([...])` starts from the defaults rather than
from the first call's values.

absl spells a multi-word flag with underscores (`--top_p`, as in `--config.data.task_source`). Each
such flag also answers to its dashed spelling (`--top-p`), the one these tools had under argparse, so
older command lines keep working. `--help` prints the usage and the flags and exits 0; a command line
that cannot run prints the usage and the reason and exits 2, as argparse did. An entry point decorated
with `reports_user_errors` prints our own errors (`gpt1_jax.errors.UserError`: a bad config key, file or
checkpoint) as one line `error: ...` and exits 2; `--verbose` adds the traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from absl import flags

from gpt1_jax.errors import UserError
from gpt1_jax.weights import sources

USAGE_ERROR_STATUS = 2  # argparse's, and the shell's convention for a misused command


class _HelpRequested(Exception):
    """Raised by `--help` as soon as it is parsed, before absl validates the other flags."""


class _HelpFlag(flags.BooleanFlag):
    """`--help`/`-h`. It stops parsing at once, so `--help` works without the required flags."""

    def __init__(self):
        super().__init__("help", False, "Show this help and exit.", short_name="h")

    def parse(self, argument):
        super().parse(argument)
        if self.value:
            raise _HelpRequested


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """A parsed command line: the flag values and the positional arguments (flags removed)."""

    flags: flags.FlagValues
    args: list[str]
    usage: str

    def fail(self, message: str) -> NoReturn:
        """Reports a command line that cannot run, argparse style: usage and reason on stderr, exit 2."""
        _exit_with_usage_error(self.usage, message)


def parse(argv: Sequence[str] | None, define_flags: Callable[[flags.FlagValues], None], *, prog: str,
          synopsis: str, doc: str, positional: str | None = None) -> CommandLine:
    """Parses `argv` (the arguments after the program name; None: `sys.argv[1:]`) for one entry point.

    Args:
      argv: the command line without the program name, as tests pass it; None reads `sys.argv`.
      define_flags: defines the entry point's flags on the `FlagValues` it is given.
      prog: how to run the entry point (`python -m gpt1_jax.generate`) for the usage line; run as an
        installed console script (`gpt1-generate`), the usage line shows that name instead.
      synopsis: the arguments after the program name in the usage line.
      doc: the entry point's module docstring; its first paragraph opens `--help`.
      positional: what the positional arguments are (`RUN_DIR`), when one or more are required; None
        when the entry point takes none.

    Returns:
      The flag values and the positional arguments. Exits 0 after `--help`, 2 on a bad command line.
    """
    argv = sys.argv[1:] if argv is None else argv
    installed = os.path.basename(sys.argv[0])
    prog = installed if installed.startswith("gpt1-") else prog
    usage = f"usage: {prog} {synopsis}"
    flag_values = flags.FlagValues()
    flags.DEFINE_flag(_HelpFlag(), flag_values=flag_values)
    flags.DEFINE_boolean("verbose", False, "Show the traceback of an error too, not only its one-line message.",
                         flag_values=flag_values)
    define_flags(flag_values)
    dashed = {name.replace("_", "-"): name for name in list(flag_values) if "_" in name}
    for alias, name in dashed.items():
        flags.DEFINE_alias(alias, name, flag_values=flag_values)
    try:
        args = flag_values([prog, *argv])[1:]
    except _HelpRequested:
        print(_help(usage, doc.split("\n\n")[0], flag_values, dashed))
        raise SystemExit(0) from None
    except flags.Error as err:
        _exit_with_usage_error(usage, str(err))
    if positional is None and args:
        _exit_with_usage_error(usage, f"unexpected arguments {args}; every input is a --flag")
    if positional is not None and not args:
        _exit_with_usage_error(usage, f"give at least one {positional}")
    return CommandLine(flag_values, args, usage)


def reports_user_errors(main: Callable[[Sequence[str] | None], None]) -> Callable[[Sequence[str] | None], None]:
    """`main(argv)` with our own errors printed as one line `error: ...` (status 2) instead of a traceback.

    The message of a `UserError` names the key, file or checkpoint and what to do; a traceback would bury
    it. With `--verbose` the traceback is printed first. Every other exception is a bug and propagates.
    """

    @functools.wraps(main)
    def entry_point(argv: Sequence[str] | None = None) -> None:
        try:
            main(argv)
        except UserError as err:
            if "--verbose" in (sys.argv[1:] if argv is None else argv):
                traceback.print_exc()
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(USAGE_ERROR_STATUS) from None

    return entry_point


def define_model_flags(flag_values: flags.FlagValues) -> None:
    """The flags of a tool that reads a trained model: `--checkpoint DIR` or `--hf DIR`, and `--vocab_dir`."""
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "The weights: an Orbax checkpoint folder of ours, `mini`, `openai-gpt` "
                        "or hf:ORG/NAME[@REV] from the Hugging Face Hub, hf:FOLDER, openai:FOLDER.", **define)
    flags.DEFINE_string("hf", None, "A transformers OpenAIGPT folder with config.json and model.safetensors.", **define)
    flags.mark_flags_as_mutual_exclusive(["checkpoint", "hf"], required=True, **define)
    flags.DEFINE_string("vocab_dir", None, "Folder with the BPE files (default: see gpt1_jax.text.vocab_files).",
                        **define)


def model_weights(args: flags.FlagValues) -> str:
    """The weights `define_model_flags`' flags name, as `gpt1_jax.weights.sources` reads them."""
    return args.checkpoint if args.checkpoint is not None else sources.hf_location(args.hf)


def define_choices(name: str, default: Sequence[str], choices: Sequence[str], help_text: str,
                   flag_values: flags.FlagValues) -> None:
    """A comma-separated list flag whose every item must be one of `choices`: a name outside them is a usage
    error when the command line is parsed (exit 2), before any work starts."""
    flags.DEFINE_list(name, list(default), f"{help_text} Some of: {', '.join(choices)}.", flag_values=flag_values)

    def known(values: list[str]) -> bool:
        unknown = sorted(set(values) - set(choices))
        if unknown:
            raise flags.ValidationError(f"unknown --{name} {', '.join(unknown)}: use {', '.join(choices)}")
        return True

    flags.register_validator(name, known, flag_values=flag_values)


def _exit_with_usage_error(usage: str, message: str) -> NoReturn:
    sys.stderr.write(f"{usage}\nerror: {message}\nRun with --help to see every flag.\n")
    raise SystemExit(USAGE_ERROR_STATUS)


def _help(usage: str, description: str, flag_values: flags.FlagValues, dashed: dict[str, str]) -> str:
    lines = [usage, "", description.strip(), "", "flags:"]
    for name in flag_values:
        flag = flag_values[name]
        if name != flag.name or name in dashed:  # a short name (-h), shown with its flag, or a dashed alias
            continue
        names = f"-{flag.short_name}, --{flag.name}" if flag.short_name else f"--{flag.name}"
        default = "" if flag.default is None or flag.default is False else f" (default: {flag.default})"
        lines.append(flags.text_wrap(f"{names}: {flag.help}{default}", indent="      ", firstline_indent="  "))
    if dashed:
        alias, name = next(iter(dashed.items()))
        lines += ["", f"A multi-word flag may also be spelled with dashes: --{alias} is --{name}."]
    return "\n".join(lines)
