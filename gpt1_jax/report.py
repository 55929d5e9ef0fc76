"""`python -m gpt1_jax.report RUN_DIR...` (`gpt1-report`): our results next to the paper's numbers, as markdown.

The table is `gpt1_jax.results_table`'s (fine-tuning's best dev scores, pre-training's validation perplexity,
each row with its model's shape; the paper's difference only for GPT-1's). `--plots DIR` also draws each run's
curves as PNG files; a run with nothing to draw yet is named on stderr and skipped.
"""

from __future__ import annotations

import sys

from absl import flags

from gpt1_jax import cli, storage
from gpt1_jax.results_table import render

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
