"""What a fine-tuning run leaves: predictions for the test splits (GLUE's submission files) and its results.

`predict` runs the compiled evaluation step over a split's arrays, batch by batch, each process feeding its
rows; the recipe scores the dev splits with it, and at the end `write_predictions` writes the test splits'
files and `write_results` results.json and results.md beside the paper's numbers.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

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


def predict(eval_step, params, arrays: task_inputs.TaskArrays, batch_size: int, mesh,
            check_stop: Callable[[], None] = lambda: None) -> np.ndarray:
    """Predictions for every example of `arrays`, in order; batch padding is dropped.

    `check_stop()` runs before each batch and raises to abandon them: a SIGTERM during a long evaluation
    (`preemption.StopRequest.check`) ends it within a batch, not at its end.
    """
    out = []
    for batch in task_inputs.batches(arrays, batch_size):
        check_stop()
        inputs = sharding.process_rows({"tokens": batch["tokens"], "classify_positions": batch["classify_positions"]})
        result = eval_step(params, *sharding.global_batch((inputs["tokens"], inputs["classify_positions"]), mesh))
        out.append(np.asarray(jax.device_get(result))[batch["weights"] > 0])
    return np.concatenate(out)


def write_predictions(eval_step, params, data: TaskData, batch_size: int, mesh, workdir: storage.Path,
                      check_stop: Callable[[], None] = lambda: None) -> list[str]:
    """GLUE submission files for the unlabeled test split(s): `index\\tprediction`, label names or floats.

    Each file is written whole (`storage.write_whole`), so `check_stop` raising between batches leaves none cut.
    """
    spec, written = data.spec, []
    for split, (arrays, uids) in data.predict.items():
        preds = predict(eval_step, params, arrays, batch_size, mesh, check_stop)
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


def write_results(workdir: storage.Path, run_config: dict, model: dict, spec: tasks.TaskSpec, best: dict,
                  description: str, files: list[str]) -> dict:
    """results.json and results.md: the best dev scores beside the paper's numbers (Tables 2-4).

    Each in one write: results.json is what says a run finished (report, benchmarks), so a kill must
    not leave part of it."""
    results = {"task": spec.name, "metric": spec.primary_metric, "metrics": list(spec.metrics),
               "init": run_config["init"], "starting_point": description, "best_step": best["step"],
               "best_epoch": best["epoch"], "dev": best["dev"], "paper": dict(spec.paper),
               "labels": list(spec.raw_labels), "predictions": files, "config": run_config,
               "model": {key: model[key] for key in ("n_layer", "width", "n_head", "n_ctx", "vocab_size")}}
    if "lost_best" in best:  # an earlier, better step whose parameters were deleted (finetuning/best_checkpoint.py)
        results["lost_best"] = best["lost_best"]
    rows = ["| task | split | metric | model | ours | paper (GPT-1 117M) | starting point |",
            "|---|---|---|---|---:|---:|---|"]
    shape = f"{model['n_layer']} x {model['width']}"
    for split, scores in best["dev"].items():
        paper = spec.paper.get(split)
        ours = 100 * scores[spec.primary_metric]
        rows.append(f"| {spec.name} | {split} | {spec.primary_metric} | {shape} | {ours:.1f} | "
                    f"{'-' if paper is None else f'{paper:.1f}'} | {description} |")
    if jax.process_index() == 0:
        storage.write_whole(workdir / "results.md", "\n".join(rows) + "\n")
        storage.write_whole(workdir / "results.json", json.dumps(results, indent=2) + "\n")
    log.info("Results (best at step %d):\n%s", best["step"], "\n".join(rows))
    return results
