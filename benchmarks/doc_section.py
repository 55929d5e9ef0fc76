"""Each benchmark script owns one `## ...` section of a doc (docs/benchmarks.md unless it says otherwise).

A script rewrites only its own section, so that scripts run on different days, or at the same time, leave
each other's numbers and the hand-written notes under other headings alone.
"""

from __future__ import annotations

import pathlib
import re

from absl import flags

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def define_doc_flags(flag_values: flags.FlagValues, *, tiny_help: str | None = None) -> None:
    """`--no_doc`; with `tiny_help`, also `--tiny` (a small model that checks the script runs), which needs
    `--no_doc` so that a table of the real model never receives its numbers."""
    flags.DEFINE_boolean("no_doc", False, f"Print the section only; by default it is also written to "
                         f"{DOC.relative_to(DOC.parents[1])}.", flag_values=flag_values)
    if tiny_help is None:
        return
    flags.DEFINE_boolean("tiny", False, tiny_help, flag_values=flag_values)
    flags.register_multi_flags_validator(
        ["tiny", "no_doc"], lambda values: values["no_doc"] or not values["tiny"], flag_values=flag_values,
        message="--tiny only checks that the script runs: add --no_doc, so the table keeps the paper's model")


def publish(heading: str, text: str, *, write: bool = True, doc: pathlib.Path = DOC) -> None:
    """Print a benchmark's section and, unless the run was asked not to (`--no_doc`), write it to `doc`.

    `text` starts with `heading`. It replaces the section's generated part (up to the next heading of any
    level, so hand-written `###` notes below it stay) or, when the doc has no such heading yet, is appended.
    """
    print(text)
    if not write:
        return
    current = doc.read_text()
    section = re.compile(rf"^{re.escape(heading)}\n.*?(?=^##+ |\Z)", re.S | re.M)
    if section.search(current):
        current = section.sub(lambda _: text + "\n", current, count=1)
    else:
        current = current.rstrip("\n") + "\n\n" + text
    doc.write_text(current)
