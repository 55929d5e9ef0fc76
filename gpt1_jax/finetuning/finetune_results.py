"""What a fine-tuning run leaves: predictions for the test splits (GLUE's submission files) and its results.

`predict` runs the compiled evaluation step over a split's arrays, batch by batch, each process feeding its
rows; the recipe scores the dev splits with it, and at the end `write_predictions` writes the test splits'
files and `write_results` results.json and results.md beside the paper's numbers.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np

from gpt1_jax import storage
from gpt1_jax.finetuning import task_inputs, tasks
from gpt1_jax.finetuning.task_inputs import TaskData
from gpt1_jax.training import sharding

log = logging.getLogger(__name__)

# GLUE submission file names (https://gluebenchmark.com/faq): <name>.tsv with `index\tprediction`.
GLUE_FILES = {("cola", "test"): "CoLA", ("sst2", "test"): "SST-2", ("mrpc", "test"): "MRPC",
              ("stsb", "test"): "STS-B", ("qqp", "test"): "QQP", ("mnli", "test_matched"): "MNLI-m",
              ("mnli", "test_mismatched"): "MNLI-mm", ("qnli", "test"): "QNLI", ("rte", "test"): "RTE",
              ("wnli", "test"): "WNLI"}


def predict(eval_step, params, arrays: task_inputs.TaskArrays, batch_size: int, mesh) -> np.ndarray:
    """Predictions for every example of `arrays`, in order; batch padding is dropped."""
    out = []
    for batch in task_inputs.batches(arrays, batch_size):
        inputs = sharding.process_rows({"tokens": batch["tokens"], "classify_positions": batch["classify_positions"]})
        result = eval_step(params, *sharding.global_batch((inputs["tokens"], inputs["classify_positions"]), mesh))
        out.append(np.asarray(jax.device_get(result))[batch["weights"] > 0])
    return np.concatenate(out)


def write_predictions(eval_step, params, data: TaskData, batch_size: int, mesh, workdir: storage.Path) -> list[str]:
    """GLUE submission files for the unlabeled test split(s): `index\\tprediction`, label names or floats."""
    spec, written = data.spec, []
    for split, (arrays, uids) in data.predict.items():
        preds = predict(eval_step, params, arrays, batch_size, mesh)
        name = GLUE_FILES.get((spec.name, split), f"{spec.name.replace('/', '_')}-{split}")
        lines = ["index\tprediction"]
        if spec.kind == tasks.REGRESSION_SIMILARITY:
            lines += [f"{uid}\t{float(p):.3f}" for uid, p in zip(uids, preds)]
        else:
            lines += [f"{uid}\t{spec.raw_labels[int(p)]}" for uid, p in zip(uids, preds)]
        if jax.process_index() == 0:
            written.append(f"predictions/{name}.tsv")
            storage.write_whole(workdir / written[-1], "\n".join(lines) + "\n")
    return written


def write_results(workdir: storage.Path, run_config: dict, spec: tasks.TaskSpec, best: dict, description: str,
                  files: list[str]) -> dict:
    """results.json and results.md: the best dev scores beside the paper's numbers (Tables 2-4).

    Each in one write: results.json is what says a run finished (report, benchmarks), so a kill must
    not leave part of it."""
    results = {"task": spec.name, "metric": spec.primary_metric, "metrics": list(spec.metrics),
               "init": run_config["init"], "starting_point": description, "best_step": best["step"],
               "best_epoch": best["epoch"], "dev": best["dev"], "paper": dict(spec.paper),
               "labels": list(spec.raw_labels), "predictions": files, "config": run_config}
    rows = ["| task | split | metric | ours | paper | starting point |", "|---|---|---|---:|---:|---|"]
    for split, scores in best["dev"].items():
        paper = spec.paper.get(split)
        rows.append(f"| {spec.name} | {split} | {spec.primary_metric} | {100 * scores[spec.primary_metric]:.1f} | "
                    f"{'-' if paper is None else f'{paper:.1f}'} | {description} |")
    if jax.process_index() == 0:
        storage.write_whole(workdir / "results.md", "\n".join(rows) + "\n")
        storage.write_whole(workdir / "results.json", json.dumps(results, indent=2) + "\n")
    log.info("Results (best at step %d):\n%s", best["step"], "\n".join(rows))
    return results
