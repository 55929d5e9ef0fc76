"""`python -m gpt1_jax.report RUN_DIR...` (`gpt1-report`): our results next to the paper's numbers, as markdown.

A fine-tuning workdir contributes its `results.json` (best dev scores per split and the paper's
number, Tables 2-4); a pre-training workdir its last validation perplexity from `metrics.jsonl`
(the paper reports 18.4 on BooksCorpus, not comparable with other corpora). `--plots DIR` also
draws each run's curves as PNG files; a run with nothing to draw yet is named on stderr and skipped.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from gpt1_jax import cli, storage
from gpt1_jax.errors import UserError
from gpt1_jax.training.run_log import METRICS_FILE, read_metrics

PAPER_BOOKSCORPUS_PERPLEXITY = 18.4
HEADER = ["| run | task | split | metric | ours | paper | difference |", "|---|---|---|---|---:|---:|---:|"]


class ReportError(UserError, ValueError):
    """A folder that is not a gpt1_jax run directory."""


def _finetune_rows(run: storage.Path, results: dict) -> list[str]:
    metric = results["metric"]
    rows = []
    for split, scores in results["dev"].items():
        ours = 100 * scores[metric]
        paper = results["paper"].get(split)
        difference = "-" if paper is None else f"{ours - paper:+.1f}"
        rows.append(f"| {run.name} | {results['task']} | {split} | {metric} | {ours:.1f} | "
                    f"{'-' if paper is None else f'{paper:.1f}'} | {difference} |")
    return rows


def _pretrain_rows(run: storage.Path, metrics: list[dict]) -> list[str]:
    validation = [m for m in metrics if "val_perplexity" in m]
    if not validation:
        return [f"| {run.name} | pre-training | - | perplexity | (no validation yet) | "
                f"{PAPER_BOOKSCORPUS_PERPLEXITY} | - |"]
    last = validation[-1]
    return [f"| {run.name} | pre-training (step {last['step']}) | validation | perplexity | "
            f"{last['val_perplexity']:.1f} | {PAPER_BOOKSCORPUS_PERPLEXITY} (BooksCorpus) | - |"]


def rows_for(run: storage.Path) -> list[str]:
    results_file, metrics_file = run / "results.json", run / METRICS_FILE
    if results_file.is_file():
        return _finetune_rows(run, json.loads(results_file.read_text()))
    if metrics_file.is_file():
        return _pretrain_rows(run, read_metrics(run))
    raise ReportError(f"{run}: neither results.json nor {METRICS_FILE}; pass a train.py --workdir.")


def render(runs: list[storage.Path]) -> str:
    rows = [row for run in runs for row in rows_for(run)]
    return "\n".join(HEADER + rows) + "\n"


SYNOPSIS = "RUN_DIR... [--out FILE] [--plots DIR]"


def _define_flags(flag_values: flags.FlagValues) -> None:
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("out", None, "Write the markdown here (default: print it).", **define)
    flags.DEFINE_string("plots", None, "Write each run's curves as PNG files here.", **define)


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python -m gpt1_jax.report RUN_DIR...` (`gpt1-report`); `argv` excludes the program name."""
    command = cli.parse(argv, _define_flags, prog="python -m gpt1_jax.report", synopsis=SYNOPSIS, doc=__doc__,
                        positional="RUN_DIR (a train.py --workdir)")
    runs = [storage.path(run) for run in command.args]
    args = command.flags
    table = render(runs)
    if args.out:
        storage.write_whole(storage.path(args.out), table)
    else:
        print(table, end="")
    if args.plots:
        from gpt1_jax.plots import PlotError, plot_run

        for run in runs:
            try:
                print(f"Wrote {plot_run(run, args.plots)}")
            except PlotError as err:  # the table is written; the other runs still get their curves
                print(f"No curves for {run}: {err}", file=sys.stderr)


if __name__ == "__main__":
    main()
