"""The command line of every entry point: absl flags per call, dashed spellings, --help, usage errors."""

import importlib
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from gpt1_jax import cli, generate, recipe_flags, train_cli, zeroshot
from pretrain_helpers import RECIPES, REPO

TOOLS = ["generate", "convert", "zeroshot", "report", "evaluate", "compile", "reproduce"]


def define_toy_flags(flag_values: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "A checkpoint.", required=True, flag_values=flag_values)
    flags.DEFINE_integer("max_new_tokens", 50, "How many tokens.", flag_values=flag_values)


def parse_toy(argv, positional=None) -> cli.CommandLine:
    return cli.parse(argv, define_toy_flags, prog="toy", synopsis="--checkpoint DIR", doc="A toy tool.\n\nMore.",
                     positional=positional)


def test_a_multi_word_flag_takes_underscores_or_dashes_and_each_call_starts_from_the_defaults():
    assert parse_toy(["--checkpoint", "a", "--max_new_tokens", "3"]).flags.max_new_tokens == 3
    assert parse_toy(["--checkpoint=a", "--max-new-tokens=4"]).flags.max_new_tokens == 4
    assert parse_toy(["--checkpoint", "a"]).flags.max_new_tokens == 50


def test_help_lists_the_flags_and_exits_0_without_the_required_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_toy(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage: toy --checkpoint DIR\n\nA toy tool.\n") and "--max_new_tokens" in out
    assert "--max-new-tokens is --max_new_tokens" in out and "More." not in out


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "a", "--top_q", "1"], "Unknown command line flag 'top_q'"),
    ([], "Flag --checkpoint must have a value"),
    (["--checkpoint", "a", "--max_new_tokens", "many"], "max_new_tokens"),
    (["--checkpoint", "a", "extra"], "unexpected arguments ['extra']"),
])
def test_a_bad_command_line_exits_2_with_the_usage_and_the_reason(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_toy(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.USAGE_ERROR_STATUS and err.startswith("usage: toy") and message in err


def test_positional_arguments_come_back_in_order_around_the_flags():
    assert parse_toy(["run1", "--checkpoint", "a", "run2"], positional="RUN_DIR").args == ["run1", "run2"]
    with pytest.raises(SystemExit):
        parse_toy(["--checkpoint", "a"], positional="RUN_DIR")


def test_tools_with_the_same_flag_names_live_in_one_process(capsys):
    """generate and zeroshot both define --checkpoint and --hf; neither touches absl's global FLAGS."""
    for tool in (generate, zeroshot, generate):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(["--help"])
        assert exit_info.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    assert "checkpoint" not in flags.FLAGS


def test_train_reads_config_overrides_from_the_argv_it_is_given(tmp_path, capsys):
    argv = ["--config", str(RECIPES / "tiny_pretrain.py"), "--workdir", str(tmp_path), "--config.mode=bogus"]
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    assert exit_info.value.code == 2 and "error: mode='bogus'" in capsys.readouterr().err


def test_configs_name_names_the_shipped_recipe_from_any_directory_and_a_file_there_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recipe_flags.recipe_file("configs/finetune.py") == RECIPES / "finetune.py"
    assert recipe_flags.with_recipe_resolved(["--config=configs/finetune.py:tiny"]) == [
        f"--config={RECIPES / 'finetune.py'}:tiny"]
    (tmp_path / "configs").mkdir()
    own = tmp_path / "configs" / "finetune.py"
    own.write_text("def get_config(arg=None):\n    return None\n")
    assert recipe_flags.recipe_file("configs/finetune.py") == pathlib.Path("configs/finetune.py")


@pytest.mark.parametrize("name", ["train", "compile"])
@pytest.mark.parametrize("problem", ["missing", "syntax error"])
def test_a_missing_or_broken_recipe_file_is_one_line_naming_it(tmp_path, capsys, name, problem):
    recipe = tmp_path / "recipe.py"
    if problem == "syntax error":
        recipe.write_text("def get_config(arg=None):\n    return {\n\nx = 1\n")
    argv = ["--config", f"{recipe}:tiny", "--workdir", str(tmp_path / "w")] if name == "train" else [
        "--config", f"{recipe}:tiny", "--topology", "v5e:2x2"]
    tool = train_cli if name == "train" else importlib.import_module("gpt1_jax.compile")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    expected = (f"error: --config: {recipe}:2: " if problem == "syntax error"
                else f"error: --config: no recipe file '{recipe}'")
    assert err[0].startswith(expected), err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override, message", [
    ("--config.train.num_step=3", "--config.train.num_step: {recipe} has no key 'num_step' in section 'train'; "
                                  "nearest valid key: train.num_steps."),
    ("--config.trian.num_steps=3", "--config.trian.num_steps: {recipe} has no key 'trian' in the top level; "
                                   "nearest valid key: train."),
    ("--config.bogus=1",
     "--config.bogus: {recipe} has no key 'bogus' in the top level; valid keys there: checkpoint, "),
    ("--config.seed.x=1",
     "--config.seed.x: {recipe} has no key 'x' in section 'seed'; seed is a value, not a section."),
])
def test_an_unknown_config_key_names_its_section_and_the_nearest_valid_key(tmp_path, capsys, override, message):
    recipe = str(RECIPES / "finetune.py") + ":tiny"
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", recipe, "--workdir", str(tmp_path / "w"), override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: " + message.format(recipe=recipe))
    assert not (tmp_path / "w").exists()


def user_error_command_lines(tmp_path: pathlib.Path) -> dict[str, tuple]:
    """One command line per entry point that fails on the user's input, and what its message must name."""
    missing = str(tmp_path / "no-such-checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "train": (train_cli, ["--config", str(RECIPES / "tiny_pretrain.py"), "--workdir", str(tmp_path / "w"),
                              "--config.train.batch_size=0"], "train.batch_size=0"),
        "generate": (generate, ["--checkpoint", missing, "--prompt", "hello"], missing),
        "zeroshot": (zeroshot, ["--checkpoint", missing, "--task", "sst2"], missing),
        "evaluate": ("evaluate", ["--checkpoint", missing, "--data", "files:*.txt"], missing),
        "convert": ("convert", ["--openai", str(empty), "--orbax", str(tmp_path / "out")], str(empty)),
        "report": ("report", [str(empty)], str(empty)),
        "compile": ("compile", ["--config", str(RECIPES / "tiny_pretrain.py"), "--topology", "v9:2x2"],
                    "'v9:2x2'"),
    }


@pytest.mark.parametrize("name", ["train", "generate", "zeroshot", "evaluate", "convert", "report", "compile"])
def test_our_own_errors_are_one_line_and_exit_2_with_the_traceback_behind_verbose(tmp_path, capsys, name):
    tool, argv, named = user_error_command_lines(tmp_path)[name]
    if isinstance(tool, str):
        tool = importlib.import_module(f"gpt1_jax.{tool}")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and named in err
    with pytest.raises(SystemExit):
        tool.main([*argv, "--verbose"])
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(generate, "load_model", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        generate.main(["--checkpoint", "x", "--prompt", "hello"])


def entry_points() -> list[tuple[list[str], str]]:
    """(command, the program its usage line names) for every console script and its `python` form."""
    scripts = pathlib.Path(sys.executable).parent
    commands = [([str(scripts / f"gpt1-{tool}")], f"gpt1-{tool}") for tool in ["train", *TOOLS]]
    commands += [([sys.executable, "-m", f"gpt1_jax.{tool}"], f"python -m gpt1_jax.{tool}") for tool in TOOLS]
    return commands + [([sys.executable, str(REPO / "train.py")], "python train.py")]


@pytest.mark.slow
@pytest.mark.parametrize("command, prog", entry_points(), ids=lambda value: value if isinstance(value, str) else None)
def test_every_entry_point_prints_its_help(command, prog):
    if not pathlib.Path(command[0]).exists():
        pytest.fail(f"{command[0]} is missing: `pip install -e .` creates the console scripts of pyproject.toml")
    result = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: {prog} ") and "\nflags:\n  -h, --help" in result.stdout


@pytest.mark.parametrize("tool, argv, named", [
    (generate, ["--max_new_tokens", "0"], "--max_new_tokens"),
    (generate, ["--temperature", "nan"], "--temperature"),
    (generate, ["--temperature", "-1"], "--temperature"),
    (generate, ["--top_p", "1.5"], "--top_p"),
    (zeroshot, ["--task", "sst2", "--max_examples", "-5"], "--max_examples"),
    (generate, ["--seed", "-1"], "--seed"),
    (generate, ["--seed", str(2**63)], "--seed"),  # past int64: jax.random.key raised OverflowError
])
def test_numeric_flags_out_of_range_are_usage_errors(capsys, tool, argv, named):
    base = ["--checkpoint", "x"] + (["--prompt", "hi"] if tool is generate else [])
    with pytest.raises(SystemExit) as exit_info:
        tool.main(base + argv)
    assert exit_info.value.code == 2 and named.lstrip("-") in capsys.readouterr().err
