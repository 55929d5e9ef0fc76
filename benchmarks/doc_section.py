"""Each benchmark script owns one `## ...` section of docs/benchmarks.md and rewrites only that."""

from __future__ import annotations

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(heading: str, text: str, doc_path: pathlib.Path = DOC) -> None:
    """Replace `heading`'s generated part (up to the next heading) with `text`, or append it; keep the rest."""
    doc = doc_path.read_text()
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^##+ |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text + "\n", doc, count=1)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    doc_path.write_text(doc)


def publish(heading: str, text: str, *, write: bool = True) -> None:
    """Print a benchmark's section and, unless the run was asked not to (`--no-doc`), write it to the doc."""
    print(text)
    if write:
        write_section(heading, text)
