"""The ConfigDict ends at the recipe: below it, modules take typed options and import no config machinery."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gpt1_jax"
# The CLI, the recipes and what turns a config into what is below them; nothing else reads a ConfigDict.
CONFIG_LAYER = {
    "train_cli.py", "recipe_flags.py", "compile.py",  # command lines
    "pretraining/pretrain.py", "finetuning/finetune.py",  # the recipes
    "finetuning/finetune_start.py",  # where fine-tuning starts from: a checkpoint checked against the config
    "config_check.py", "run_options.py", "training/workdir_guard.py",  # a config checked, options from it, its workdir
    "aot/steps.py", "aot/fit.py",  # gpt1-compile: a run's config compiled for a slice, and changed until it fits
}
CONFIG_MODULES = ("ml_collections", "gpt1_jax.config_check")
RECIPE_FILES = "configs/"  # the recipe files themselves: ConfigDicts are what they are made of


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
        if config_imports and module not in CONFIG_LAYER and not module.startswith(RECIPE_FILES):
            offenders[module] = config_imports
    assert not offenders, f"below the recipes, these import config machinery: {offenders}"


def test_the_config_layer_lists_only_modules_that_exist():
    """A renamed module must not leave the allowance behind."""
    assert {module for module in CONFIG_LAYER if not (PACKAGE / module).is_file()} == set()


def test_loading_a_recipe_file_loads_no_training_code():
    """A recipe file is read before anything runs (and by every `--config` error): it loads its defaults and the
    project's constants, never the model or the training stack."""
    code = ("import importlib.util, sys\n"
            "for path in sys.argv[1:]:\n"
            "    spec = importlib.util.spec_from_file_location('recipe', path)\n"
            "    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module.get_config()\n"
            "print(sorted(m for m in sys.modules if m.startswith('gpt1_jax')))")
    recipes = [str(path) for path in sorted((PACKAGE / "configs").glob("*.py"))
               if path.stem not in ("__init__", "common")]
    loaded = subprocess.run([sys.executable, "-c", code, *recipes], capture_output=True, text=True, check=True).stdout
    modules = set(ast.literal_eval(loaded))
    assert modules - {"gpt1_jax", "gpt1_jax.constants"} == {m for m in modules if m.startswith("gpt1_jax.configs")}
