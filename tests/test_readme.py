"""The README's commands are the ones CI runs, and the tests the docs cite exist."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme_commands = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(readme_commands) == 2, "the README opens with two commands: main job, then tests"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_commands[1] in ci_lines


def test_the_tree_is_lint_clean():
    """The linter of pyproject.toml's [tool.ruff], inside the suite, so the README's test command checks it too."""
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_every_test_docs_reliability_names_exists():
    """docs/reliability.md proves each row with a test; a renamed or deleted test must not leave it unproven."""
    doc = (ROOT / "docs" / "reliability.md").read_text()
    defined = {name for path in (ROOT / "tests").rglob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    named = set(re.findall(r"::(test_\w+)|`(test_\w+)`", doc))
    named = {a or b for a, b in named}
    assert named and not named - defined
