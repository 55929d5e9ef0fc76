"""Our results beside the paper's, as one markdown table over run directories (`gpt1-report`, `gpt1-reproduce`).

A fine-tuning workdir contributes its `results.json` (best dev scores per split and the paper's number, Tables
2-4); a pre-training workdir its last validation perplexity from `metrics.jsonl` (the paper reports 18.4 on
BooksCorpus, not comparable with other corpora). The paper's numbers are GPT-1's, 12 layers of 768 at 117M
parameters: the difference is given only for runs of that shape, and each row says its model's shape, so a small
model's gap is never read as a shortfall against the paper. Under the table, the weights each run started from
(a hub name at its commit, `gpt1_jax.weights.sources`).
"""

from __future__ import annotations

import json

from gpt1_jax import storage
from gpt1_jax.errors import UserError
from gpt1_jax.training.run_log import METRICS_FILE, read_metrics

PAPER_BOOKSCORPUS_PERPLEXITY = 18.4
PAPER_SHAPE = (12, 768)  # GPT-1's layers and width (117M parameters), the model of every number in the paper
HEADER = ["| run | task | split | metric | model | ours | paper (GPT-1 117M) | difference |",
          "|---|---|---|---|---|---:|---:|---:|"]


class ReportError(UserError, ValueError):
    """A folder that is not a gpt1_jax run directory."""


def _shape(model: dict | None) -> tuple[int, int] | None:
    return (model["n_layer"], model["width"]) if model and model.get("n_layer") and model.get("width") else None


def _shape_text(shape: tuple[int, int] | None) -> str:
    return "?" if shape is None else f"{shape[0]} x {shape[1]}"


def _finetune_rows(run: storage.Path, results: dict) -> list[str]:
    metric, shape = results["metric"], _shape(results.get("model"))
    rows = []
    for split, scores in results["dev"].items():
        ours = 100 * scores[metric]
        paper = results["paper"].get(split)
        difference = "-" if paper is None or shape != PAPER_SHAPE else f"{ours - paper:+.1f}"
        rows.append(f"| {run.name} | {results['task']} | {split} | {metric} | {_shape_text(shape)} | {ours:.1f} | "
                    f"{'-' if paper is None else f'{paper:.1f}'} | {difference} |")
    return rows


def _pretrain_rows(run: storage.Path, metrics: list[dict]) -> list[str]:
    shape = _shape(_run_config(run).get("model"))
    validation = [m for m in metrics if "val_perplexity" in m]
    if not validation:
        return [f"| {run.name} | pre-training | - | perplexity | {_shape_text(shape)} | (no validation yet) | "
                f"{PAPER_BOOKSCORPUS_PERPLEXITY} | - |"]
    last = validation[-1]
    return [f"| {run.name} | pre-training (step {last['step']}) | validation | perplexity | {_shape_text(shape)} | "
            f"{last['val_perplexity']:.1f} | {PAPER_BOOKSCORPUS_PERPLEXITY} (BooksCorpus) | - |"]


def _run_config(run: storage.Path) -> dict:
    """The run's config.json (train.py writes it at the start), or {} when it is missing or unreadable."""
    try:
        return json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def rows_for(run: storage.Path) -> list[str]:
    results_file, metrics_file = run / "results.json", run / METRICS_FILE
    if results_file.is_file():
        return _finetune_rows(run, json.loads(results_file.read_text()))
    if metrics_file.is_file():
        return _pretrain_rows(run, read_metrics(run))
    raise ReportError(f"{run}: {_why_not_a_run(run)}; pass a train.py --workdir.")


def _why_not_a_run(run: storage.Path) -> str:
    """What `run` is instead of a run directory: a missing folder (a typo) is not told it lacks results.json."""
    try:
        if storage.is_dir(run):
            return f"neither results.json nor {METRICS_FILE}"
    except OSError as err:  # a bucket that refuses this machine, or cannot be reached
        raise storage.explain(err, run, "read the run") from err
    return "not a folder" if run.exists() else "does not exist"


def _starting_points(runs: list[storage.Path]) -> list[str]:
    """One line per starting point of the fine-tuning runs, naming its runs."""
    by_start: dict[str, list[str]] = {}
    for run in runs:
        results_file = run / "results.json"
        if results_file.is_file():
            start = json.loads(results_file.read_text()).get("starting_point", "?")
            by_start.setdefault(start, []).append(run.name)
    return [f"- {start}: {', '.join(names)}" for start, names in by_start.items()]


def render(runs: list[storage.Path]) -> str:
    rows = [row for run in runs for row in rows_for(run)]
    starts = _starting_points(runs)
    return "\n".join(HEADER + rows + (["", "Starting points:", *starts] if starts else [])) + "\n"
