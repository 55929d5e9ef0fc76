"""The `--config RECIPE.py[:ARG]` flag of the commands that run a recipe: `train.py` and `gpt1-compile`.

The recipe is an ml_collections config file (`get_config(arg)`), loaded with `lock_config=True`, so
`--config.KEY=VALUE` overrides only keys the recipe has. ml_collections reports an unknown key as a bare
`AttributeError: 'bogus'` traceback from inside flag parsing, a missing file as two chained tracebacks and a
syntax error as a long one; `parse` turns each into one line naming the key or the file (and line).

The project's recipes ship inside the package (gpt1_jax/configs/), so `configs/NAME.py` names them from any
directory: a file at that path wins when it exists (your own copy), else the shipped one is loaded.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
from typing import Callable

from absl import flags
from ml_collections import ConfigDict, config_flags

from gpt1_jax import cli
from gpt1_jax.config_check import ConfigError

CONFIG_SYNOPSIS = "--config configs/RECIPE.py[:ARG] [--config.KEY=VALUE ...]"
SHIPPED_RECIPES = pathlib.Path(__file__).parent / "configs"


def parse(argv: list[str], define_flags: Callable[[flags.FlagValues], None], *, prog: str, synopsis: str,
          doc: str) -> cli.CommandLine:
    """`cli.parse` for a command that takes a recipe: `--config` (required) and its overrides, plus `define_flags`'."""
    argv = with_recipe_resolved(argv)

    def define(flag_values: flags.FlagValues) -> None:
        # config_flags looks for the --config.KEY=VALUE overrides in the raw command line before parsing; given
        # `sys_argv`, it does not fall back on sys.argv, which is not this command line when a test calls main.
        config_flags.DEFINE_config_file(
            "config", None, "A recipe file with its argument after a colon (configs/finetune.py:rte names the "
            "shipped one); --config.KEY=VALUE overrides one value.", flag_values=flag_values, lock_config=True,
            sys_argv=[prog, *argv])
        flags.mark_flag_as_required("config", flag_values=flag_values)
        define_flags(flag_values)

    try:
        return cli.parse(argv, define, prog=prog, synopsis=synopsis, doc=doc)
    except (AttributeError, KeyError):
        error = unknown_override(argv)
        if error is None:
            raise
        raise error from None


def with_recipe_resolved(argv: list[str]) -> list[str]:
    """`argv` with its `--config` naming a file that exists (a shipped recipe when `configs/NAME.py` is not a
    file here), checked to compile; a ConfigError names the file (and line) otherwise."""
    spec = _flag_value(argv, "config")
    if spec is None:
        return argv
    path, colon, arg = spec.partition(":")
    resolved = recipe_file(path)
    try:
        compile(resolved.read_bytes(), str(resolved), "exec")
    except SyntaxError as err:
        raise ConfigError(f"--config: {resolved}:{err.lineno}: {err.msg}; fix the recipe file.") from None
    new_spec = f"{resolved}{colon}{arg}"
    resolved_argv = []
    for i, item in enumerate(argv):
        if item == f"--config={spec}":
            item = f"--config={new_spec}"
        elif item == spec and i and argv[i - 1] == "--config":
            item = new_spec
        resolved_argv.append(item)
    return resolved_argv


def recipe_file(path: str | os.PathLike) -> pathlib.Path:
    """The recipe file `path` names: itself when it is a file, else the shipped recipe of that file name when
    `path` is `configs/NAME.py` (or `NAME.py`)."""
    given = pathlib.Path(path)
    if given.is_file():
        return given
    shipped = SHIPPED_RECIPES / given.name
    if given.parent in (pathlib.Path("configs"), pathlib.Path(".")) and given.suffix == ".py" and shipped.is_file():
        return shipped
    names = sorted(p.name for p in SHIPPED_RECIPES.glob("*.py") if p.stem not in ("__init__", "common"))
    raise ConfigError(f"--config: no recipe file {str(path)!r} (from {os.getcwd()}); give a path to one, or "
                      f"configs/NAME.py for a shipped recipe: {', '.join(names)}.")


def unknown_override(argv: list[str]) -> ConfigError | None:
    """An error naming the first `--config.KEY` override the recipe lacks, its section and the nearest key."""
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
            return ConfigError(f"--config.{key}: {spec} has no key {part!r} in {where}; {hint}.")
    return None


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
    module_spec = importlib.util.spec_from_file_location("gpt1_jax_recipe", recipe_file(path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
