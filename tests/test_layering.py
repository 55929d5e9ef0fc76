"""The ConfigDict ends at the recipe: below it, modules take typed options and import no config machinery."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gpt1_jax"
# The CLI, the recipes and what turns a config into what is below them; nothing else reads a ConfigDict.
CONFIG_LAYER = {
    "train_cli.py", "recipe_flags.py", "compile.py",  # command lines
    "pretrain.py", "finetune.py", "finetune_start.py",  # the recipes, and where fine-tuning starts from
    "config_check.py", "run_options.py", "workdir_guard.py",  # checking a config, options from it, its workdir
    "aot/steps.py", "aot/fit.py",  # gpt1-compile: a run's config compiled for a slice, and changed until it fits
}
CONFIG_MODULES = ("ml_collections", "gpt1_jax.config_check")


def imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_only_the_cli_and_recipe_layer_import_the_config_machinery():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        config_imports = sorted(name for name in imported_modules(path) if name.startswith(CONFIG_MODULES))
        if config_imports and module not in CONFIG_LAYER:
            offenders[module] = config_imports
    assert not offenders, f"below the recipes, these import config machinery: {offenders}"


def test_the_config_layer_lists_only_modules_that_exist():
    """A renamed module must not leave the allowance behind."""
    assert {module for module in CONFIG_LAYER if not (PACKAGE / module).is_file()} == set()
